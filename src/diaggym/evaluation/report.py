"""Writing an evaluation: ``metrics.json`` (versioned), ``report.md`` with plots, and the MLflow run."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from diaggym.atomic import atomic_file

TABLE = [  # (metric key, column title, better)
    ("similarity", "Similarity (judge, 0–5)", "higher"),
    ("consistency", "Consistency (judge)", "higher"),
    ("format_stop_rate", "stops at <SEP>", "higher"),
    ("format_parse_rate", "parses", "higher"),
    ("format_valid_rate", "well formed (stop + parse)", "higher"),
    ("analyte_overlap", "analyte overlap", "higher"),
    ("value_numeric_agreement", "Value = Numeric Value", "higher"),
    ("auto_similarity", "auto_similarity (0–5)", "higher"),
    ("lab_abs_z_capped", "lab |z| (capped 5)", "lower"),
    ("auto_consistency", "auto_consistency", "higher"),
    ("num_var", "Num. Var", "closer to real"),
    ("num_wdist", "Num. WDist (vs training)", "lower"),
    ("text_diversity", "text diversity (radiology)", "closer to real"),
    ("text_fid", "text FID (radiology)", "lower"),
    # the variant for data without radiology (the MIMIC-IV demo): not the paper's metric, named apart
    ("microbiology_text_diversity", "microbiology text diversity (variant)", "closer to real"),
    ("microbiology_text_fid", "microbiology text FID (variant)", "lower"),
    ("seconds_per_exam", "s / exam", "lower"),
    ("seconds_per_case", "s / case (chain)", "lower"),
]


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _plots(out: Path, doc: dict, real_values: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    engines = doc["engines"]
    # WDist per engine (bar chart)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    vals = [engines[e]["metrics"].get("num_wdist") for e in engines]
    ax.bar(list(engines), [v if v is not None else 0 for v in vals], color="#3b75af")
    ax.set_ylabel("Num. WDist (real sd)")
    ax.set_title("Numeric distance to real values (lower is better)")
    fig.tight_layout()
    fig.savefig(out / "wdist.png")
    plt.close(fig)
    names.append("wdist.png")
    # Numeric distributions of the most frequent analytes
    top = sorted(real_values, key=lambda k: -len(real_values[k]))[:4]
    if top:
        fig, axes = plt.subplots(1, len(top), figsize=(3.2 * len(top), 3), dpi=110)
        for ax, key in zip(np.atleast_1d(axes), top, strict=False):
            ax.hist(real_values[key], bins=20, alpha=0.5, density=True, label="real")
            for e, rep in engines.items():
                g = rep.get("generated_values", {}).get(key, [])
                if len(g) > 1:
                    ax.hist(g, bins=20, alpha=0.35, density=True, histtype="step", label=e)
            ax.set_title(key.split(" / ")[-1], fontsize=9)
        np.atleast_1d(axes)[0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "numeric_distributions.png")
        plt.close(fig)
        names.append("numeric_distributions.png")
    # Diversity per exam type
    div_key = next(
        (f"{k}_per_group" for k in ("text_diversity", "microbiology_text_diversity")
         if any(f"{k}_per_group" in r["metrics"] for r in engines.values())),
        "text_diversity_per_group",
    )
    groups = sorted({g for rep in engines.values() for g in rep["metrics"].get(div_key, {})})
    if groups:
        fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
        width = 0.8 / max(1, len(engines))
        for i, (e, rep) in enumerate(engines.items()):
            per = rep["metrics"].get(div_key, {})
            ax.bar(np.arange(len(groups)) + i * width, [per.get(g, 0) for g in groups], width, label=e)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [g[:18] for g in groups], rotation=30, fontsize=7)
        ax.set_ylabel("1 − mean cosine")
        ax.set_title(div_key.removesuffix("_per_group").replace("_", " "), fontsize=9)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "diversity.png")
        plt.close(fig)
        names.append("diversity.png")
    return names


def slug(engine: str) -> str:
    """A file name for an engine label (``base (untuned)`` → ``base_untuned``)."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.\-]", "_", engine)).strip("_") or "engine"


def _write_generations(out: Path, doc: dict) -> None:
    """Every step-level generation, one JSON line each, so a failed format can be read, not just counted."""
    folder = out / "generations"
    folder.mkdir(exist_ok=True)
    for e, rep in doc["engines"].items():
        with atomic_file(folder / f"{slug(e)}.jsonl") as fh:
            for rec in rep.get("samples", []):
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _failure_lines(doc: dict, examples: int = 3) -> list[str]:
    """Per engine: step generations that are not well formed, by cause, with a few offending lines."""
    lines = ["", "## Format failures (step level)", ""]
    for e, rep in doc["engines"].items():
        samples = rep.get("samples", [])
        bad = [r for r in samples if r.get("failure")]
        if not samples:
            continue
        causes = Counter(r["failure"] for r in bad)
        summary = ", ".join(f"{c}: {n}" for c, n in causes.most_common()) or "none"
        lines.append(
            f"- **{e}**: {len(bad)} of {len(samples)} not well formed ({summary}); all in `generations/{slug(e)}.jsonl`"
        )
        shown = [(r["exam"], ln) for r in bad for ln in r.get("unparsed_lines", [])[:1]][:examples]
        for exam, ln in shown:
            quoted = ln[:120].replace("`", "'")
            lines.append(f"  - {exam}: `{quoted}`")
    return lines


def _real_note(real: dict | None) -> str:
    if not real:
        return "."
    kind = real.get("text_kind")
    if kind is None:
        return "; it has no radiology or microbiology reports, so there are no text metrics."
    exams = ", ".join(real.get("text_exams", [])) or "none with enough reports"
    if kind == "radiology":
        return f"; text metrics over its most frequent radiology exams ({exams})."
    return (
        f"; it has no radiology reports, so the paper's text metrics cannot be computed: the {kind} variant "
        f"(same rule over {kind} exams: {exams}) is reported under its own name."
    )


def write_report(out: Path, doc: dict, real_values: dict) -> None:
    """``doc`` is the metrics.json content; plots and the markdown table are derived from it."""
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(out, doc, real_values)
    _write_generations(out, doc)
    heavy = {"generated_values", "samples"}
    slim = {
        **doc,
        "engines": {e: {k: v for k, v in r.items() if k not in heavy} for e, r in doc["engines"].items()},
    }
    with atomic_file(out / "metrics.json") as fh:
        json.dump(slim, fh, indent=2, default=float)
    lines = [
        f"# Evaluation — {doc['split']} split ({doc['cases']} of {doc.get('split_cases', doc['cases'])} cases)",
        "",
        f"Embedding model: `{doc['embedding_model']}`. Candidate: `{doc['candidate']}`. "
        "Automatic scores stand in for the judged ones (definitions in `diaggym.evaluation.auto`). "
        "Distribution metrics compare with the training split's real data"
        + _real_note(doc.get("real_data")),
        "",
        "| engine | " + " | ".join(t for _, t, _ in TABLE) + " |",
        "|---|" + "---:|" * len(TABLE),
        "| *better* | " + " | ".join(b for _, _, b in TABLE) + " |",
    ]
    real_row: dict = {}
    for e, rep in doc["engines"].items():
        m = rep["metrics"]
        real_row["num_var"] = m.get("num_var_real")
        for k in ("text_diversity", "microbiology_text_diversity"):
            real_row[k] = m.get(f"{k}_real")
        lines.append(f"| {e} | " + " | ".join(_fmt(m.get(k)) for k, _, _ in TABLE) + " |")
    lines.append("| *real data* | " + " | ".join(_fmt(real_row.get(k)) for k, _, _ in TABLE) + " |")
    lines += ["", *[f"![{p}]({p})" for p in plots], "", "## Skipped (counted, with reasons)", ""]
    any_skip = False
    for reason, n in sorted((doc.get("real_data") or {}).get("skipped", {}).items()):
        lines.append(f"- real data (training split): {reason}: {n}")
        any_skip = True
    for e, rep in doc["engines"].items():
        for reason, n in sorted(rep["skipped"].items()):
            lines.append(f"- {e}: {reason}: {n}")
            any_skip = True
    if not any_skip:
        lines.append("- nothing")
    lines += _failure_lines(doc)
    if doc.get("judge"):
        j = doc["judge"]
        lines += [
            "",
            f"Judge `{j['model']}`: {j['calls']} calls; failures: "
            + (", ".join(f"{k} {v}" for k, v in j["failures"].items()) or "none"),
        ]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def metric_key(engine: str, metric: str) -> str:
    """``eval.{engine}.{metric}`` in the characters MLflow accepts (``base (untuned)`` → ``base_untuned``)."""
    return f"eval.{slug(engine)}.{metric}"  # metric names are our own identifiers; engine labels are free text


def log_to_mlflow(out: Path, doc: dict, card: dict | None, run_id: str | None, experiment: str) -> str:
    """Log the numbers and the report folder; under ``run_id`` when given (e.g. the training run)."""
    import mlflow

    from diaggym.training.tracking import ensure_experiment, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    kwargs = {"run_id": run_id} if run_id else {"experiment_id": ensure_experiment(experiment)}
    with mlflow.start_run(**kwargs) as run:
        for e, rep in doc["engines"].items():
            for k, v in rep["metrics"].items():
                if isinstance(v, int | float) and v == v:
                    mlflow.log_metric(metric_key(e, k), float(v))
        mlflow.set_tag("diaggym.eval_split", doc["split"])
        if card:
            mlflow.log_dict(card, "dataset/card.json")
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
        return run.info.run_id
