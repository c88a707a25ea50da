"""The conditioning probe: can the pipeline learn to condition on the patient, not just on the exam name?

On the demo data a model can look good by writing plausible marginals.  This
probe plants two (or three) dependencies in a synthetic cohort (in the normal case schema,
trained with the normal trainer) so that only a model that learned conditioning
can beat the unconditional baselines on the planted analytes:

* **diagnosis → value**: Creatinine in the BMP is N(1.0, 0.2) mg/dL, shifted by
  +3 standard deviations (to 1.6) when the final diagnosis is "Acute kidney injury";
* **history → value**: Lactate is measured early (N(2.5, 0.8) mmol/L) and repeated
  later as "Lactate, repeat" with a small change (+N(0.1, 0.05)), so the repeat is
  predictable only from the first measurement in the history;
* optionally (``finding_plant=True``, the benchmark's default) **history → value by a
  finding**: an early chest X-ray reads a consolidation in half the cases (at random,
  independent of the diagnosis) and a later Procalcitonin is N(0.4, 0.1) ng/mL,
  shifted by +3 standard deviations after a consolidation.  It has its own random
  generator, so the other values are those of the cohort without it.

Everything else (sodium, potassium, vital signs) is noise that does not depend on
anything.  :func:`probe_errors` scores greedy generations of the planted analytes
(with the true history) by mean absolute error against the truth.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from statistics import fmean

from diaggym.cases import Case, Exam, LabItem, Profile
from diaggym.engines import Engine, SamplingParams
from diaggym.exam_stats import exam_kinds
from diaggym.serialization import case_events
from diaggym.simulator import SimRequest, Simulator
from diaggym.splits import split_of

DX_SHIFT = "Acute kidney injury"
DX_OTHER = "Community-acquired pneumonia"
PLANTED = (
    ("Basic Metabolic Panel (BMP)", "Creatinine"),
    ("Procalcitonin", "Procalcitonin"),
    ("Lactate, repeat", "Lactate, repeat"),
)
XRAY_CONSOLIDATION = "FINDINGS: Right lower lobe consolidation.\nIMPRESSION: Consolidation."
XRAY_CLEAR = "FINDINGS: The lungs are clear.\nIMPRESSION: No acute cardiopulmonary process."


def _item(name: str, x: float, unit: str, low: float, high: float, decimals: int = 1) -> LabItem:
    v = f"{x:.{decimals}f}"
    return LabItem(name=name, value=v, valuenum=float(v), unit=unit, ref_low=low, ref_high=high)


def make_probe_cohort(
    n: int = 600,
    seed: int = 0,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    finding_plant: bool = False,
) -> list[Case]:
    """``n`` synthetic cases with the planted dependencies (deterministic in ``seed``)."""
    rng = random.Random(seed)
    rng_xray = random.Random(f"{seed}:xray")
    cases = []
    for i in range(n):
        consolidation = rng_xray.random() < 0.5
        pct = rng_xray.gauss(0.7 if consolidation else 0.4, 0.1)
        aki = rng.random() < 0.5
        sex = rng.choice("FM")
        vitals = (
            f"Heart Rate: {rng.randint(60, 110)} bpm\nTemperature: {rng.uniform(97, 101):.1f} °F\n"
            f"O2 Saturation: {rng.randint(90, 100)} %"
        )
        creat = rng.gauss(1.6 if aki else 1.0, 0.2)
        lact = max(0.3, rng.gauss(2.5, 0.8))
        repeat = lact + rng.gauss(0.1, 0.05)
        bmp = [
            _item("Sodium", rng.gauss(139, 3), "mEq/L", 135, 145, 0),
            _item("Potassium", rng.gauss(4.2, 0.4), "mEq/L", 3.5, 5.1),
            _item("Creatinine", creat, "mg/dL", 0.5, 1.2),
        ]
        # One exam per group, in chain order: the group is the position.
        chain: list[tuple[str, dict]] = [("PE: Vital Signs", {"kind": "physical", "result": vitals})]
        if finding_plant:
            chain.append(
                ("Chest X-ray", {"kind": "radiology", "result": XRAY_CONSOLIDATION if consolidation else XRAY_CLEAR})
            )
        chain += [
            ("Lactate", {"kind": "lab", "items": [_item("Lactate", lact, "mmol/L", 0.5, 2.0)]}),
            ("Basic Metabolic Panel (BMP)", {"kind": "lab", "items": bmp}),
        ]
        if finding_plant:
            pct_item = _item("Procalcitonin", max(0.01, pct), "ng/mL", 0.0, 0.5, 2)
            chain.append(("Procalcitonin", {"kind": "lab", "items": [pct_item]}))
        chain.append(
            ("Lactate, repeat", {"kind": "lab", "items": [_item("Lactate, repeat", repeat, "mmol/L", 0.5, 2.0)]})
        )
        exams = [Exam(name=name, group=g, **fields) for g, (name, fields) in enumerate(chain)]
        key = f"probe:{seed}:{i}"
        cases.append(
            Case(
                case_id=f"probe:{i}",
                source="probe",
                split=split_of(key, ratios),
                subject_key=key,
                profile=Profile(sex=sex, age=rng.randint(30, 85), chief_complaint="malaise"),
                final_diagnosis=DX_SHIFT if aki else DX_OTHER,
                exams=exams,
            )
        )
    return cases


def probe_errors(engine: Engine, cases: list[Case], max_tokens: int = 160) -> dict[str, float | None]:
    """Mean absolute error of each planted analyte (greedy, true history); unparsed answers counted apart."""
    present = {e.name for e in cases[0].exams} if cases else set()
    planted = [(exam, analyte) for exam, analyte in PLANTED if exam in present]
    sim = Simulator(engine, exam_kinds(cases))
    out: dict[str, float | None] = {}
    for exam_name, analyte in planted:
        reqs, truth = [], []
        for c in cases:
            events = case_events(c)
            k = next(i for i, (n, _) in enumerate(events) if n == exam_name)
            reqs.append(SimRequest.for_case(c, exam_name, events[:k]))
            real = next(it for it in c.exams[k].items or [] if it.name == analyte)
            truth.append(real.valuenum)
        # One seed per case: a seeded sampler (the marginal baseline) draws per (seed, exam), so a shared
        # seed would give every case the same draw, i.e. a random constant instead of marginal sampling.
        params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=i) for i in range(len(reqs))]
        results = sim.simulate_many(reqs, params)
        errs, missing = [], 0
        for res, t in zip(results, truth, strict=True):
            got = next((it.valuenum for it in res.items if it.name == analyte and it.valuenum is not None), None)
            if got is None:
                missing += 1
            else:
                errs.append(abs(got - t))
        out[f"{analyte} MAE"] = fmean(errs) if errs else None
        out[f"{analyte} unparsed"] = missing
    return out


def run_probe(
    work: str | Path,
    n_cases: int = 600,
    steps: int = 400,
    preset: str = "tiny",
    lr: float = 3e-3,
    batch_size: int = 8,
    seed: int = 0,
    finding_plant: bool = False,
    max_tokens: int = 160,
    threads: int | None = None,
) -> dict:
    """Build the cohort, a base, train it with the normal trainer, and score it beside the baselines.

    Returns the errors of the trained model (greedy), marginal sampling and the training median on
    the held-out split, with the training cost and held-out losses.  ``max_tokens`` bounds each
    scored generation; ``threads`` fixes torch's thread count for the run (restored afterwards).
    """
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_probe(work, n_cases, steps, preset, lr, batch_size, seed, finding_plant, max_tokens)
    finally:
        torch.set_num_threads(before)


def _run_probe(
    work: str | Path,
    n_cases: int,
    steps: int,
    preset: str,
    lr: float,
    batch_size: int,
    seed: int,
    finding_plant: bool,
    max_tokens: int,
) -> dict:
    from diaggym.cases import write_jsonl
    from diaggym.engines import make_engine
    from diaggym.model.base import init_base
    from diaggym.training.train import TrainConfig, train

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    cohort = make_probe_cohort(n_cases, seed, finding_plant=finding_plant)
    write_jsonl(cohort, work / "cases.jsonl")
    train_cases = [c for c in cohort if c.split == "train"]
    test_cases = [c for c in cohort if c.split == "test"]
    t0 = time.perf_counter()
    init_base(train_cases, work / "base", preset, seed)
    summary = train(
        TrainConfig(
            cases=str(work / "cases.jsonl"),
            base=str(work / "base"),
            out=str(work / "run"),
            max_steps=steps,
            lr=lr,
            warmup=0.05,
            batch_size=batch_size,
            grad_accum=1,
            max_length=512,
            save_steps=10**9,
            logging_steps=50,
            mlflow=False,
            seed=seed,
        )
    )
    minutes = (time.perf_counter() - t0) / 60
    engines = {
        "model (greedy)": make_engine("transformers", model=work / "run" / "final"),
        "marginal": make_engine("marginal", cases=train_cases, seed=seed),
        "median": make_engine("median", cases=train_cases),
    }
    return {
        "cases": n_cases,
        "train_cases": len(train_cases),
        "test_cases": len(test_cases),
        "preset": preset,
        "finding_plant": finding_plant,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "train_minutes": round(minutes, 2),
        "val_loss_before": summary.get("val_loss_before"),
        "val_loss_after": summary.get("val_loss_after"),
        "errors": {name: probe_errors(engine, test_cases, max_tokens) for name, engine in engines.items()},
    }
