"""Conditioning probe: train the local model on a cohort with planted dependencies, compare with baselines.

    .venv/bin/python benchmarks/conditioning.py [--cases 600] [--steps 800] [--lr 3e-3] [--preset tiny]
        [--no-finding-plant]

Writes ``benchmarks/results/conditioning.json``: mean absolute error of the planted analytes (Creatinine,
shifted +3 sd by the diagnosis; Procalcitonin, shifted +3 sd by an earlier X-ray finding; "Lactate, repeat",
the first Lactate + a small change) for the trained model (greedy), marginal sampling and the training median,
on the held-out split.  See
:mod:`diaggym.probe` for the cohort and :func:`~diaggym.probe.run_probe` for the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from diaggym.probe import run_probe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=600)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-finding-plant", dest="finding_plant", action="store_false", help="two plants only")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "conditioning")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "conditioning.json")
    args = ap.parse_args()
    res = run_probe(
        args.work, args.cases, args.steps, args.preset, args.lr, args.batch_size, args.seed, args.finding_plant
    )
    res["command"] = " ".join(["benchmarks/conditioning.py", *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
