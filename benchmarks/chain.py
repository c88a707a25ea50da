"""P2 — multi-step chains: the in-process engine against sequential ``model.generate``.

Why: the simulator advances many cases one exam at a time, and every step's prompt
is the previous one plus one event (diaggym-v1 is append-only).  A naive loop calls
``model.generate`` once per prompt (batch 1) and re-encodes the whole history every
step; :class:`~diaggym.engines.hf.TransformersEngine` advances all chains together
(one batched ``generate`` per step) and reuses the KV of each chain's previous
prompt, so only each step's new event is prefilled.  Target: >= 10x cases/s on CPU.

Workload: the ``--n-cases`` cases with the most exams; each chain has ``--n-steps``
steps built with the **true history** (:func:`serialization.render_prompt` on the
case's real events, as :func:`serialization.case_prompts` does), so both paths see
exactly the same prompts and greedy outputs can be compared one to one.  A case with
fewer exams than ``--n-steps`` **cycles** its events (exam ``k`` is event
``k mod n_exams``, with its true result), so its history repeats exams; this keeps
every chain at the same length and the prompts realistic in size.

Baseline: for each prompt ``model.generate`` at batch 1, greedy, same ``max_tokens``,
stopping at ``<SEP>`` (``stop_strings``) or EOS, whole prompt encoded each time.  On a
slow machine ``--baseline-cases`` runs it on an evenly spaced subset of the cases
(all steps of each) and extrapolates linearly: cases are independent, so baseline
time is the sum of per-case times; the JSON says so (``baseline.extrapolated``) and
gives the subset's mean prompt length next to the full set's.

Timing: by default the two paths are **interleaved** step by step (engine step *k*, then
the baseline's step *k* of its cases), each with its own clock, so that background load on a
shared machine hits both alike; ``--no-interleave`` runs the engine to the end first.  On a
busy 2-core machine use ``--threads 1``: torch's intra-op thread pool contending with other
processes can slow small models down many times over.

Equality: each (case, step) the baseline ran is compared with the engine's text for
the same prompt; the counts of equal and different outputs are reported.  With a
random base both paths mostly repeat one token until ``max_tokens``, so equality is
weak evidence there; the engine's tests check it on a perturbed model whose outputs
vary.

Model: ``--preset-dir`` (a local HF folder, e.g. ``diaggym base init`` output) or
``--preset NAME`` (a random base of that shape built in memory, straight on the
device, with a tokenizer trained on the cases' training split: how the 7B-shape GPU
run avoids writing 15 GB of random weights).

Usage::

    .venv/bin/python benchmarks/chain.py --preset-dir /tmp/hf-base-small --baseline-cases 4 --threads 1
    python benchmarks/chain.py --preset qwen2.5-7b-shape --device cuda --dtype bfloat16 --baseline-cases 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

from diaggym.cases import SEP, Case, load_cases
from diaggym.engines.base import SamplingParams, cut_at_stop
from diaggym.serialization import case_events, render_context, render_prompt
from diaggym.testing import machine_info

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_WORK = ROOT / "benchmarks" / ".work"
DEMO = ROOT / "data" / "mimic-iv-demo"



def chain_prompts(case: Case, n_steps: int) -> list[str]:
    """``n_steps`` prompts with the true history; events cycle when the case has fewer exams."""
    context = render_context(case.profile, case.final_diagnosis)
    events = case_events(case)
    steps = [events[k % len(events)] for k in range(n_steps)]
    return [render_prompt(context, steps[:k], steps[k][0]) for k in range(n_steps)]


def pick_cases(cases: list[Case], n: int) -> list[Case]:
    """The ``n`` cases with the most exams (ties by case id, so the choice is stable)."""
    return sorted(cases, key=lambda c: (-len(c.exams), c.case_id))[:n]


def spaced(n: int, k: int) -> list[int]:
    """``k`` indices evenly spaced over ``range(n)``."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n // 2]


def ensure_cases(path: Path | None) -> Path:
    if path is not None:
        return path
    out = DEFAULT_WORK / "chain-cases"
    if not (out / "cases.jsonl").is_file():
        from diaggym.preprocess import preprocess

        print(f"preprocessing the demo into {out} ...", flush=True)
        preprocess("mimic-iv", DEMO, out)
    return out


def build_random_base(preset: str, cases: list[Case], device: str, dtype: str):
    """(model, tokenizer): a random Qwen2 of ``preset``'s shape built on ``device`` in ``dtype``."""
    import torch

    from diaggym.model.base import PRESETS, build_model, case_texts, train_tokenizer

    p = PRESETS[preset]
    tokenizer = train_tokenizer(case_texts([c for c in cases if c.split == "train"] or cases), p.vocab_size)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = build_model(p, len(tokenizer), tokenizer.eos_token_id, seed=0)
    finally:
        torch.set_default_dtype(previous)
    model.to(getattr(torch, dtype))  # in case the model class ignored the default dtype
    model.config._attn_implementation = "sdpa"
    return model.eval(), tokenizer


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def baseline_one(model, tokenizer, prompt: str, max_tokens: int) -> tuple[str, int]:
    """(text, prompt tokens) of one prompt through plain ``model.generate`` at batch 1, greedy."""
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    out = model.generate(
        **enc,
        max_new_tokens=max_tokens,
        do_sample=False,
        stop_strings=[SEP],
        tokenizer=tokenizer,
        pad_token_id=tokenizer.pad_token_id,
    )
    raw = tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return cut_at_stop(raw, (SEP,), tokenizer.eos_token)[0], enc.input_ids.shape[1]


def run(engine, chains: list[list[str]], subset: list[int], params: SamplingParams, device: str, interleave: bool):
    """Time the engine (all chains, one batched call per step) and the baseline (``subset``, one call per prompt).

    Interleaved (the default), step *k* of the engine is followed by step *k* of the baseline, so
    both see the same background load over time (the development machine is shared); otherwise
    the engine runs all steps first.  Each side's clock runs only during its own work.
    """
    import torch

    model, tokenizer = engine.model, engine.tokenizer
    n_steps = len(chains[0])
    eng_texts: list[list[str]] = [[] for _ in chains]
    base_texts: list[list[str]] = [[] for _ in subset]
    finish: dict[str, int] = {}
    step_s: list[float] = []
    eng_s = base_s = 0.0
    before = dict(engine.stats)

    def engine_step(k: int) -> None:
        nonlocal eng_s
        sync(device)
        t = time.perf_counter()
        out = engine.generate([ch[k] for ch in chains], params)
        sync(device)
        step_s.append(time.perf_counter() - t)
        eng_s += step_s[-1]
        for i, c in enumerate(out):
            eng_texts[i].append(c.text)
            finish[c.finish_reason] = finish.get(c.finish_reason, 0) + 1

    def baseline_step(k: int) -> None:
        nonlocal base_s
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            for j, i in enumerate(subset):
                base_texts[j].append(baseline_one(model, tokenizer, chains[i][k], params.max_tokens)[0])
        sync(device)
        base_s += time.perf_counter() - t

    order = [(k, side) for k in range(n_steps) for side in ("engine", "baseline")]
    if not interleave:
        order = sorted(order, key=lambda x: x[1] == "baseline")
    for k, side in order:
        if side == "engine":
            engine_step(k)
        elif subset:
            baseline_step(k)
        if (side == "baseline" or not subset) and (k % 5 == 4 or k == n_steps - 1):
            print(f"  step {k + 1}/{n_steps}: engine {eng_s:.1f} s, baseline {base_s:.1f} s", flush=True)
    stats = {k: v - before.get(k, 0) for k, v in engine.stats.items()}
    eng = {
        "seconds": eng_s,
        "cases_per_s": len(chains) / eng_s,
        "exams_per_s": len(chains) * n_steps / eng_s,
        "step_seconds": {"mean": statistics.mean(step_s), "first": step_s[0], "last": step_s[-1]},
        "finish_reasons": finish,
        "prompt_tokens": stats["prompt_tokens"],
        "cached_prompt_tokens": stats["cached_prompt_tokens"],
        "cached_fraction": stats["cached_prompt_tokens"] / max(1, stats["prompt_tokens"]),
        "cache_tokens_at_end": engine.stats["cache_tokens"],
    }
    return eng, eng_texts, {"seconds": base_s, "texts": base_texts}


def machine(device: str) -> dict:
    import torch

    info = {**machine_info("torch", "transformers"), "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset-dir", type=Path, help="local HF model folder (e.g. from `diaggym base init`)")
    ap.add_argument("--preset", default="small", help="without --preset-dir: build a random base of this shape")
    ap.add_argument("--cases", type=Path, help="cases folder or file (default: the demo, preprocessed once)")
    ap.add_argument("--n-cases", type=int, default=32)
    ap.add_argument("--n-steps", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--baseline-cases", type=int, help="run the baseline on this many cases and extrapolate")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--no-interleave", action="store_true", help="run all engine steps first, then the baseline")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    ap.add_argument("--prefill-chunk", type=int, default=4096, help="engine: most tokens per packed prefill forward")
    ap.add_argument("--out", type=Path, help="result JSON (default: benchmarks/results/chain-{tag}.json)")
    ap.add_argument("--keep-texts", action="store_true", help="write every generated text into the JSON")
    args = ap.parse_args(argv)

    import torch

    from diaggym.engines.hf import TransformersEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    all_cases = load_cases(ensure_cases(args.cases))
    cases = pick_cases(all_cases, args.n_cases)
    if len(cases) < args.n_cases:
        print(f"note: only {len(cases)} cases available", flush=True)
    chains = [chain_prompts(c, args.n_steps) for c in cases]
    cycled = sum(len(c.exams) < args.n_steps for c in cases)

    t_load = time.perf_counter()
    if args.preset_dir is not None:
        engine = TransformersEngine(
            args.preset_dir,
            device=args.device,
            dtype=args.dtype,
            max_batch_size=max(32, len(chains)),
            prefill_chunk=args.prefill_chunk,
        )
        model_desc = {"dir": str(args.preset_dir)}
        info = args.preset_dir / "diaggym_base.json"
        if info.is_file():
            model_desc.update(json.loads(info.read_text()))
        tag = args.preset_dir.name
    else:
        model, tokenizer = build_random_base(args.preset, all_cases, args.device, args.dtype)
        engine = TransformersEngine(
            None,
            device=args.device,
            dtype=args.dtype,
            max_batch_size=max(32, len(chains)),
            prefill_chunk=args.prefill_chunk,
            model=model,
            tokenizer=tokenizer,
        )
        model_desc = {"preset": args.preset, "built": "random, in memory"}
        tag = args.preset
    model, tokenizer = engine.model, engine.tokenizer
    model_desc["parameters"] = sum(p.numel() for p in model.parameters())
    model_desc["vocab"] = len(tokenizer)
    load_s = time.perf_counter() - t_load
    lengths = [[len(ids) for ids in tokenizer(ch)["input_ids"]] for ch in chains]
    print(
        f"model {model_desc.get('preset')} ({model_desc['parameters']:,} params) on {args.device}/{args.dtype}; "
        f"{len(chains)} chains x {args.n_steps} steps ({cycled} cycled), prompts "
        f"{min(map(min, lengths))}-{max(map(max, lengths))} tokens, max_tokens {args.max_tokens}",
        flush=True,
    )

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    engine.generate(["Warm-up prompt.\nExam name:\nX\nExam results:\n"], SamplingParams(max_tokens=4, temperature=0))
    engine.close()  # forget the warm-up's cache entries
    subset = [] if args.skip_baseline else spaced(len(chains), args.baseline_cases or len(chains))
    print(f"engine on {len(chains)} cases, baseline on {len(subset)} ...", flush=True)
    eng, eng_texts, base = run(engine, chains, subset, params, args.device, not args.no_interleave)
    print(f"engine: {eng['seconds']:.1f} s, {eng['cases_per_s']:.4f} cases/s", flush=True)

    result: dict = {
        "benchmark": "chain",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(args.device),
        "model": model_desc,
        "model_load_seconds": load_s,
        "settings": {
            "n_cases": len(chains),
            "n_steps": args.n_steps,
            "max_tokens": args.max_tokens,
            "greedy": True,
            "dtype": args.dtype,
            "interleaved": bool(subset) and not args.no_interleave,
            "engine_options": {"prefill_chunk": engine.prefill_chunk, "ragged_decode": engine.ragged_decode},
            "history": "true history (case events), cycled when a case has fewer exams than n_steps",
            "cycled_cases": cycled,
            "prompt_tokens": {
                "min": min(map(min, lengths)),
                "max": max(map(max, lengths)),
                "mean": statistics.mean(x for ls in lengths for x in ls),
            },
        },
        "engine": eng,
    }
    if subset:
        per_case = base["seconds"] / len(subset)
        equal = sum(
            a == b
            for i, texts in zip(subset, base["texts"], strict=True)
            for a, b in zip(eng_texts[i], texts, strict=True)
        )
        compared = len(subset) * args.n_steps
        sub_tokens = [x for i in subset for x in lengths[i]]
        result["baseline"] = {
            "method": "model.generate per prompt, batch 1, greedy, stop_strings=<SEP>, whole prompt re-encoded",
            "cases_run": len(subset),
            "case_indices": subset,
            "seconds_measured": base["seconds"],
            "extrapolated": len(subset) < len(chains),
            "seconds_for_all_cases": per_case * len(chains),
            "cases_per_s": len(subset) / base["seconds"],
            "exams_per_s": len(subset) * args.n_steps / base["seconds"],
            "subset_mean_prompt_tokens": statistics.mean(sub_tokens),
            "all_mean_prompt_tokens": result["settings"]["prompt_tokens"]["mean"],
        }
        if len(subset) < len(chains):
            result["baseline"]["note"] = (
                f"baseline ran {len(subset)} evenly spaced cases of {len(chains)} (all {args.n_steps} steps each); "
                "cases are independent, so its cases/s is measured on the subset and its time for all cases is "
                "that rate times the case count"
            )
        result["speedup"] = eng["cases_per_s"] / result["baseline"]["cases_per_s"]
        result["equality"] = {"compared": compared, "equal": equal, "different": compared - equal}
        result["target"] = {"speedup_at_least": 10.0, "met": result["speedup"] >= 10.0}
        print(
            f"baseline: {base['seconds']:.1f} s for {len(subset)} cases, "
            f"{result['baseline']['cases_per_s']:.4f} cases/s; speed-up {result['speedup']:.1f}x; "
            f"equal outputs {equal}/{compared}",
            flush=True,
        )
    if args.keep_texts:
        result["engine_texts"] = eng_texts
    out = args.out or DEFAULT_RESULTS / f"chain-{tag}-{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
