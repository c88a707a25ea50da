"""Completed episodes per second with 1, 8 and 32 concurrent episodes against `diaggym serve`.

Each episode: the rule-based agent (4 exams, then a diagnosis) in a DiagEnv over HTTP (`:predict`); one
thread per concurrent episode, each with its own environment.  Failed episodes (the simulator failing after the
client's retries) are counted.  Target (transformers engine, tiny model): 32 concurrent ≥ 5× the episodes/s of
one at a time, 0 failed.  The levels run ``--repeat`` times, interleaved (1, 8, 32, 1, 8, 32, ...), so that a slow
spell of a shared machine hits every level alike; the speed-up is the ratio of the per-level medians.  Each
level runs at least ``--waves`` episodes per client back to back: throughput of a steady stream of episodes.

    python benchmarks/episodes.py --engine marginal --cases work/demo/mimic-iv
    python benchmarks/episodes.py --engine transformers --model RUN/final --cases work/demo/mimic-iv --max-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from diaggym.cases import load_cases
from diaggym.env.agents import RuleAgent, run_episode
from diaggym.env.core import DiagEnv, EnvConfig
from diaggym.testing import diaggym_serve, machine_info


def run_level(url: str, cases, concurrency: int, episodes: int, max_tokens: int) -> dict:
    train = [c for c in cases if c.split == "train"]
    ids = [c.case_id for c in cases if c.split in ("val", "test")]
    cfg = EnvConfig(simulator_url=url, split=None, max_tokens=max_tokens, timeout=600, retries=2)
    envs = [DiagEnv(cfg, cases=cases) for _ in range(concurrency)]
    counter = {"next": 0, "done": 0, "failed": 0, "turns": 0}
    lock = threading.Lock()

    def worker(env: DiagEnv) -> None:
        agent = RuleAgent(train)
        while True:
            with lock:
                i = counter["next"]
                if i >= episodes:
                    return
                counter["next"] += 1
            out = run_episode(env, agent, seed=i, case_id=ids[i % len(ids)])
            with lock:
                counter["done"] += 1
                counter["turns"] += out["turn"]
                counter["failed"] += out["end_reason"] == "simulator_error"

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(e,)) for e in envs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for e in envs:
        e.close()
    return {"concurrency": concurrency, "episodes": counter["done"], "failed": counter["failed"],
            "turns": counter["turns"], "seconds": round(wall, 3), "episodes_per_s": round(counter["done"] / wall, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=["marginal", "transformers"], default="marginal")
    p.add_argument("--model", help="checkpoint folder (transformers engine)")
    p.add_argument("--cases", required=True, help="preprocess output folder")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--episodes", type=int, default=16, help="episodes per level (at least --waves x the concurrency)")
    p.add_argument("--waves", type=int, default=3,
                   help="each client runs at least this many episodes back to back, so a level measures a steady "
                   "stream of episodes (as an RL job runs them) rather than the start and the tail of one wave")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3, help="rounds over the levels, interleaved")
    p.add_argument("--server-threads", type=int, default=None,
                   help="the server's torch threads (default: every core, as a deployed server has)")
    p.add_argument("--out", default=None, help="JSON record (default benchmarks/results/episodes-ENGINE.json)")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    cases = load_cases(args.cases)
    serve_args = ["--engine", args.engine, "--cases", args.cases, "--max-batch", str(max(levels))]
    if args.model:
        serve_args += ["--model", args.model]
    log = Path("work") / "bench-episodes-server.log"
    threads = str(args.server_threads or os.cpu_count() or 1)
    proc, url = diaggym_serve(serve_args, log, env={"OMP_NUM_THREADS": threads})
    results = []
    try:
        proc.wait_ready(f"{url}/v2/health/ready", timeout=600)
        run_level(url, cases, 1, 2, args.max_tokens)  # warm-up (not recorded)
        for rep in range(args.repeat):
            for c in levels:
                r = {"round": rep, **run_level(url, cases, c, max(args.episodes, args.waves * c), args.max_tokens)}
                print(json.dumps(r), flush=True)
                results.append(r)
    finally:
        proc.stop()
    median = {c: statistics.median(r["episodes_per_s"] for r in results if r["concurrency"] == c) for c in levels}
    record = {
        "benchmark": "episodes", "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_info(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "engine": args.engine, "model": args.model, "max_tokens": args.max_tokens, "waves": args.waves,
        "server_threads": int(threads),
        "levels": results,
        "median_episodes_per_s": {str(c): round(v, 3) for c, v in median.items()},
        "speedup_vs_1": {str(c): round(v / median[levels[0]], 2) for c, v in median.items()},
        "failed_total": sum(r["failed"] for r in results),
    }
    out = Path(args.out or f"benchmarks/results/episodes-{args.engine}.json")
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}: speed-up {record['speedup_vs_1']}, failed {record['failed_total']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
