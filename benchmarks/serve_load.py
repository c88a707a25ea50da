"""P4 — the simulator server under load: 32 concurrent clients for 60 s against ``:predict``.

Why: an RL job sends one request per live episode per turn, from many workers at once;
the server's own overhead (HTTP, validation, prompt rendering, parsing, metrics) must be
small next to the engine's.  The ``marginal`` engine answers in microseconds, so this
measures the server itself.  Target: >= 300 requests/s, p99 < 100 ms, 0 errors.

The server runs as ``diaggym serve --engine marginal`` in its own process on 127.0.0.1
(access log off, as deployed); the load generator is a separate process running
``--clients`` asyncio clients in closed loop (each sends its next request when the last
one returned), each request one instance with a real demo case's profile, diagnosis and
a few exams of history.  Latency is measured by the client, end to end.  On a 2-core
machine the load generator competes with the server for CPU: the figure is a lower bound
of what the server does with cores of its own.

    python benchmarks/serve_load.py --cases work/demo/mimic-iv --seconds 60 --clients 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from diaggym.testing import diaggym_serve, machine_info

ROOT = Path(__file__).resolve().parents[1]


def _bodies(cases_dir: str, n: int, seed: int) -> list[dict]:
    from diaggym.cases import load_cases
    from diaggym.serialization import case_events

    rng = random.Random(seed)
    cases = [c for c in load_cases(cases_dir) if len(c.exams) >= 2]
    bodies = []
    for _ in range(n):
        case = rng.choice(cases)
        events = case_events(case)
        k = rng.randrange(1, min(len(events), 6))
        bodies.append(
            {
                "instances": [
                    {
                        "profile": case.profile.model_dump(exclude_none=True),
                        "final_diagnosis": case.final_diagnosis,
                        "history": [{"name": a, "result": b} for a, b in events[:k]],
                        "exam": events[k][0],
                        "seed": rng.randrange(1 << 30),
                    }
                ]
            }
        )
    return bodies


async def _client(url: str, bodies: list[dict], t_start: float, t_stop: float, lat: list[float],
                  errors: list[str]) -> None:
    """One closed-loop client on one kept-alive connection; only requests sent after ``t_start`` are recorded."""
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=1)) as http:
        i = random.randrange(len(bodies))
        while (t0 := time.perf_counter()) < t_stop:
            try:
                r = await http.post(url, json=bodies[i % len(bodies)])
                error = None if r.status_code == 200 else f"{r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as err:
                error = f"{type(err).__name__}: {err}"
            if t0 >= t_start:
                if error:
                    errors.append(error)
                else:
                    lat.append(time.perf_counter() - t0)
            i += 1


async def load(url: str, bodies: list[dict], clients: int, seconds: float, warmup: float) -> dict:
    """``clients`` connections open and warm for ``warmup`` s, then measured for ``seconds``."""
    lat: list[float] = []
    errors: list[str] = []
    t_start = time.perf_counter() + warmup
    t_stop = t_start + seconds
    await asyncio.gather(*(_client(url, bodies, t_start, t_stop, lat, errors) for _ in range(clients)))
    wall = time.perf_counter() - t_start
    ms = np.array(lat) * 1000
    return {
        "requests_ok": len(lat),
        "errors": len(errors),
        "error_examples": errors[:5],
        "seconds": round(wall, 2),
        "requests_per_s": round(len(lat) / wall, 1),
        "latency_ms": {
            "p50": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "p90": round(float(np.percentile(ms, 90)), 2) if len(ms) else None,
            "p99": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
            "max": round(float(ms.max()), 2) if len(ms) else None,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="work/demo/mimic-iv", help="Preprocess output folder (demo cases).")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--url", default=None, help="Load an already running server instead of starting one.")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = ap.parse_args()

    proc = None
    url = args.url
    started = datetime.now(UTC).isoformat(timespec="seconds")
    if url is None:
        cases = str(Path(args.cases).resolve())
        proc, url = diaggym_serve(["--engine", "marginal", "--cases", cases], ROOT / "work" / "serve_load.log")
        try:
            proc.wait_ready(f"{url}/v2/health/ready", timeout=120)
        except (RuntimeError, TimeoutError) as err:
            proc.stop()
            sys.exit(f"server did not start: {err}")
    try:
        bodies = _bodies(args.cases, 512, args.seed)
        res = asyncio.run(load(f"{url}/v1/models/diaggym:predict", bodies, args.clients, args.seconds, args.warmup))
    finally:
        if proc is not None:
            proc.stop(timeout=30)
    res.update(
        benchmark="serve_load",
        date=started,
        machine=machine_info(),
        clients=args.clients,
        engine="marginal",
        target={"requests_per_s": 300, "p99_ms": 100, "errors": 0},
        met=bool(res["requests_per_s"] >= 300 and (res["latency_ms"]["p99"] or 1e9) < 100 and res["errors"] == 0),
        command=" ".join(sys.argv),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
