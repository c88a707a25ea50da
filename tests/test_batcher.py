"""How the server's engine runner gathers concurrent requests into engine calls (``EngineRunner`` in batch mode).

A real marginal engine; the engine calls are observed by wrapping its ``generate`` (the runner calls it on its
worker thread).  Timings use wide margins: the waits under test are 1 s, the work microseconds.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from diaggym.cases import load_cases
from diaggym.engines import SamplingParams, make_engine
from diaggym.serialization import render_context, render_prompt

WAIT_MS = 1000.0


@pytest.fixture(scope="module")
def prompt(demo_out) -> str:
    out, _ = demo_out
    case = load_cases(out / "cases.jsonl", split="test")[0]
    return render_prompt(render_context(case.profile, case.final_diagnosis), [], "Complete Blood Count (CBC)")


@pytest.fixture
def runner(demo_out):
    from diaggym_serving.batcher import EngineRunner

    out, _ = demo_out
    engine = make_engine("marginal", cases=load_cases(out / "cases.jsonl", split="train"))
    calls: list[int] = []
    generate = engine.generate

    def observed(prompts, params):
        calls.append(len(prompts))
        return generate(prompts, params)

    engine.generate = observed  # type: ignore[method-assign]
    r = EngineRunner(engine, "batch", max_batch=8, max_wait_ms=WAIT_MS)
    r.calls = calls  # type: ignore[attr-defined]
    return r


async def _one(runner, prompt: str, delay: float = 0.0) -> float:
    await asyncio.sleep(delay)
    start = time.monotonic()
    await runner.generate([prompt], [SamplingParams(max_tokens=16, seed=1)])
    return time.monotonic() - start


def test_a_lone_request_runs_at_once(runner, prompt):
    async def run():
        try:
            return [await _one(runner, prompt) for _ in range(3)]
        finally:
            await runner.close()

    waits = asyncio.run(run())
    assert runner.calls == [1, 1, 1]
    assert max(waits) < WAIT_MS / 1000 / 2  # never the gathering wait


def test_lockstep_clients_arriving_spread_out_stay_in_one_batch(runner, prompt):
    """After a batch of 6, six requests arriving over 300 ms (well inside the wait) make one engine call."""

    async def run():
        try:
            await asyncio.gather(*(_one(runner, prompt) for _ in range(6)))
            await asyncio.gather(*(_one(runner, prompt) for _ in range(6)))
            first = list(runner.calls)
            await asyncio.gather(*(_one(runner, prompt, delay=0.05 * i) for i in range(6)))
            return first
        finally:
            await runner.close()

    first = asyncio.run(run())
    assert sum(first) == 12 and first[-1] == 6  # the runner now expects 6
    assert runner.calls[len(first):] == [6]


def test_fewer_clients_than_last_time_wait_at_most_the_limit(runner, prompt):
    async def run():
        try:
            await asyncio.gather(*(_one(runner, prompt) for _ in range(4)))
            await asyncio.gather(*(_one(runner, prompt) for _ in range(4)))  # now the runner expects 4
            n = len(runner.calls)
            start = time.monotonic()
            await asyncio.gather(*(_one(runner, prompt) for _ in range(2)))
            return n, time.monotonic() - start
        finally:
            await runner.close()

    n, took = asyncio.run(run())
    assert runner.calls[n - 1] == 4 and runner.calls[n:] == [2]
    assert WAIT_MS / 1000 * 0.9 <= took < WAIT_MS / 1000 * 3
