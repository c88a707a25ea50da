"""GPU figures P6 (training throughput, MFU) and P5 (engine GPU·s per 30-exam case at 7B shape).

One short script for a lent GPU (a few minutes):

1. **P6**: DeepSpeed ZeRO-2, bf16, a 0.5B-shaped random Qwen2 (``qwen2.5-0.5b-shape`` preset), through the real
   trainer (:func:`diaggym.training.train.train`) on the bundled demo cases for ``--steps`` optimizer steps.
   Tokens/s counts the non-padding tokens the steps consumed (measured by the dataset itself), MFU =
   achieved model FLOP/s / the card's dense bf16 peak, with model FLOPs per token = 6·N + 12·L·d·T
   (N non-embedding parameters, L layers, d width, T mean sequence length).  Target ≥ 35 %.
2. **P5**: the in-process engine at 7B shape (``qwen2.5-7b-shape``, random weights, bf16) advancing 32
   30-exam chains with batching and prefix-KV reuse (``benchmarks/chain.py``); GPU·s per case = wall
   seconds × 1 GPU / cases.  Target ≤ 1.

``--smoke`` runs both parts on CPU with the tiny preset, to check the code path where no GPU is lent.
Results go to ``benchmarks/results/train_gpu.json``; copy them into RESULTS.md with the card they ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from diaggym.testing import machine_info

ROOT = Path(__file__).resolve().parents[1]

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_flops(name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def build_cases(work: Path) -> Path:
    from diaggym.preprocess import preprocess

    out = work / "cases"
    if not (out / "cases.jsonl").is_file():
        preprocess("mimic-iv", ROOT / "data" / "mimic-iv-demo", out)
    return out


def build_base(cases: Path, work: Path, preset: str) -> Path:
    from diaggym.cases import load_cases
    from diaggym.model.base import init_base

    out = work / f"base-{preset}"
    if not (out / "config.json").is_file():
        init_base(load_cases(cases, split="train"), out, preset=preset)
    return out


def train_part(args, work: Path, cases: Path) -> dict:
    import torch

    from diaggym.model.base import PRESETS
    from diaggym.training.data import CaseDataset
    from diaggym.training.train import TrainConfig, load_base, train

    preset = "tiny" if args.smoke else "qwen2.5-0.5b-shape"
    base = build_base(cases, work, preset)
    cfg = TrainConfig(
        cases=str(cases),
        base=str(base),
        out=str(work / f"run-{int(time.time())}"),
        max_steps=args.steps,
        lr=1e-4,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        bf16=not args.smoke,
        gradient_checkpointing=False,
        deepspeed=None if args.smoke else str(ROOT / "configs" / "deepspeed" / "zero2.json"),
        save_steps=10**9,
        logging_steps=1,
        eval=False,
        mlflow=False,
        use_cpu=args.smoke,
    )
    t0 = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - t0
    # Tokens consumed: every optimizer step takes batch × accumulation cases in the sampler's order; the
    # dataset's mean length is exact per epoch, so this is exact to within one partial epoch.
    from diaggym.cases import load_cases

    tokenizer, model = load_base(base)
    embed = model.get_input_embeddings().weight.numel()
    n_params = sum(p.numel() for p in model.parameters()) - embed  # non-embedding parameters (tied head)
    del model
    ds = CaseDataset(load_cases(cases, split="train"), tokenizer, args.max_length)
    mean_len = ds.n_tokens() / len(ds)
    tokens = summary["global_step"] * args.batch_size * args.grad_accum * mean_len
    shape = PRESETS[preset]
    flops_per_token = 6 * n_params + 12 * shape.num_hidden_layers * shape.hidden_size * mean_len
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    peak = peak_flops(device)
    # Wall time includes Trainer/DeepSpeed start-up; the trainer's own runtime is closer to steady state.
    runtime = summary.get("train_runtime") or wall
    tps = tokens / runtime
    return {
        "preset": preset,
        "device": device,
        "steps": summary["global_step"],
        "tokens": round(tokens),
        "mean_seq_len": round(mean_len, 1),
        "train_runtime_s": round(runtime, 2),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tps, 1),
        "model_tflops_per_s": round(tps * flops_per_token / 1e12, 2),
        "mfu": round(tps * flops_per_token / peak, 4) if peak else None,
        "target_mfu": 0.35,
    }


def engine_part(args, work: Path, cases: Path) -> dict:
    preset = "tiny" if args.smoke else "qwen2.5-7b-shape"
    out = work / "chain.json"
    cmd = [  # chain.py builds the random 7B-shaped model in memory (no 15 GB of weights on disk)
        sys.executable,
        str(ROOT / "benchmarks" / "chain.py"),
        "--preset",
        preset,
        "--cases",
        str(cases),
        "--n-cases",
        str(args.chain_cases),
        "--n-steps",
        "30",
        "--out",
        str(out),
        "--skip-baseline",
    ]
    if not args.smoke:
        cmd += ["--device", "cuda", "--dtype", "bfloat16"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr[-2000:]}
    res = json.loads(out.read_text())
    engine = res.get("engine", res)
    seconds = engine.get("seconds")
    return {
        "preset": preset,
        "chain": res,
        "gpu_s_per_case": round(seconds / args.chain_cases, 3) if seconds else None,
        "target_gpu_s_per_case": 1.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset: check the code path only")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--chain-cases", type=int, default=32)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "gpu")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_gpu.json")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.max_length, args.chain_cases = 3, 1, 1024, 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    cases = build_cases(args.work)
    result: dict = {
        "benchmark": "train_gpu",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info("torch", "transformers", "deepspeed"),
        "command": " ".join(sys.argv),
        "smoke": args.smoke,
    }
    if not args.skip_train:
        result["p6_training"] = train_part(args, args.work, cases)
    if not args.skip_engine:
        result["p5_engine"] = engine_part(args, args.work, cases)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
