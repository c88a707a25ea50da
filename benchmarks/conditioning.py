"""Conditioning probe: train the local model on a cohort with planted dependencies, compare with baselines.

    .venv/bin/python benchmarks/conditioning.py [--cases 600] [--steps 300] [--preset tiny]

Writes ``benchmarks/results/conditioning.json``: mean absolute error of the planted analytes (Creatinine,
shifted +3 sd by the diagnosis; "Lactate, repeat", the first Lactate + a small change) for the trained model
(greedy), marginal sampling and the training median, on the held-out split.  See
:mod:`diaggym.evaluation.probe` for the cohort.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(n_cases: int, steps: int, preset: str, work: Path, seed: int = 0, lr: float = 3e-3) -> dict:
    from diaggym.cases import write_jsonl
    from diaggym.engines import make_engine
    from diaggym.evaluation.probe import make_probe_cohort, probe_errors
    from diaggym.model.base import init_base
    from diaggym.training.train import TrainConfig, train

    work.mkdir(parents=True, exist_ok=True)
    cohort = make_probe_cohort(n_cases, seed)
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
            batch_size=8,
            grad_accum=1,
            max_length=512,
            save_steps=10**9,
            logging_steps=50,
            mlflow=False,
            seed=seed,
        )
    )
    minutes = (time.perf_counter() - t0) / 60
    results = {}
    for name, engine in (
        ("model (greedy)", make_engine("transformers", model=work / "run" / "final")),
        ("marginal", make_engine("marginal", cases=train_cases, seed=seed)),
        ("median", make_engine("median", cases=train_cases)),
    ):
        results[name] = probe_errors(engine, test_cases)
    return {
        "cases": n_cases,
        "train_cases": len(train_cases),
        "test_cases": len(test_cases),
        "preset": preset,
        "steps": steps,
        "train_minutes": round(minutes, 2),
        "val_loss_before": summary.get("val_loss_before"),
        "val_loss_after": summary.get("val_loss_after"),
        "errors": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=600)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "conditioning")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "conditioning.json")
    args = ap.parse_args()
    res = run(args.cases, args.steps, args.preset, args.work, lr=args.lr)
    res["command"] = " ".join(["benchmarks/conditioning.py", *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
