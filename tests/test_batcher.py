"""The server's engine runner with continuous batching: requests join the batch being decoded and leave it when
their own rows are done (``EngineRunner`` in batch mode over the transformers engine's ``run_feed``).

A tiny randomly initialised model: it never stops early, so ``max_tokens`` sets each request's length exactly.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from diaggym.cases import load_cases
from diaggym.engines import EngineError, SamplingParams
from diaggym.engines.hf import TransformersEngine
from diaggym.model.base import init_base
from diaggym.serialization import render_context, render_prompt


@pytest.fixture(scope="module")
def setup(demo_out, tmp_path_factory):
    out, _ = demo_out
    cases = load_cases(out / "cases.jsonl")
    model = tmp_path_factory.mktemp("batcher") / "tiny"
    init_base([c for c in cases if c.split == "train"], model, "tiny", seed=0)
    test = [c for c in cases if c.split in ("val", "test")][:4]
    prompts = [render_prompt(render_context(c.profile, c.final_diagnosis), [], e)
               for c in test for e in ("Complete Blood Count (CBC)", "Lactate")]
    return model, prompts


def _runner(model, **kw):
    from diaggym_serving.batcher import EngineRunner

    return EngineRunner(TransformersEngine(model, max_batch_size=8, **kw), "batch")


# Exact text equality with a prompt decoded alone needs per-row attention (the default masked call over the
# padded batch agrees up to float rounding, see docs/transformers-engine.md).
EXACT = {"ragged_decode": True}


def test_requests_join_the_running_batch_and_leave_when_done(setup):
    """A long request decodes; short ones sent after it started are answered long before it ends, and every text
    equals what the engine writes for that prompt and seed alone."""
    model, prompts = setup
    long = SamplingParams(max_tokens=1000, temperature=1.0, seed=7)  # ~40x the steps the short ones need
    shorts = [SamplingParams(max_tokens=4 + i, temperature=1.0 if i % 2 else 0.0, seed=i) for i in range(6)]
    runner = _runner(model, **EXACT)

    async def run():
        done: dict[str, float] = {}

        async def one(name, prompt, params, delay=0.0):
            await asyncio.sleep(delay)
            out = await runner.generate([prompt], [params])
            done[name] = time.monotonic()
            return out[0]

        try:
            first = asyncio.create_task(one("long", prompts[0], long))
            while runner._feed is None or runner._feed.waiting() or runner._serving is None:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # the engine took it: the long one is decoding
            others = await asyncio.gather(*(one(f"s{i}", prompts[1 + i], p, delay=0.02 * i)
                                            for i, p in enumerate(shorts)))
            return await first, others, done
        finally:
            await runner.close()

    first, others, done = asyncio.run(run())
    assert first.completion_tokens == 1000 and first.finish_reason == "length"
    assert [c.completion_tokens for c in others] == [p.max_tokens for p in shorts]
    assert max(done[f"s{i}"] for i in range(len(shorts))) < done["long"]
    alone = TransformersEngine(model, max_batch_size=8, **EXACT)
    assert first.text == alone.generate([prompts[0]], [long])[0].text
    for i, (c, p) in enumerate(zip(others, shorts, strict=True)):
        assert c.text == alone.generate([prompts[1 + i]], [p])[0].text


def test_a_prompt_that_cannot_run_fails_alone(setup):
    model, prompts = setup
    runner = _runner(model)
    limit = runner.engine.max_positions
    too_long = prompts[0] + " filler" * limit

    async def run():
        try:
            return await asyncio.gather(
                runner.generate([prompts[1]], [SamplingParams(max_tokens=30, temperature=0.0)]),
                runner.generate([too_long], [SamplingParams(max_tokens=30, temperature=0.0)]),
                runner.generate([prompts[2], too_long], [SamplingParams(max_tokens=5, temperature=0.0)] * 2),
                return_exceptions=True,
            )
        finally:
            await runner.close()

    ok, bad, mixed = asyncio.run(run())
    assert ok[0].completion_tokens == 30
    assert isinstance(bad, EngineError) and bad.reason == "prompt_too_long"
    assert isinstance(mixed, EngineError) and mixed.reason == "prompt_too_long"  # a request fails as a whole
    assert runner.broken() is None


# ---------------------------------------------------------------------------------------------- engine process
def test_engine_process_answers_like_the_engine_and_fails_in_flight_prompts_when_it_dies(setup):
    """The server's default: the engine in a child process, behind the same runner."""
    import os
    import signal

    from diaggym_serving.batcher import EngineRunner
    from diaggym_serving.engine_process import EngineProcess

    model, prompts = setup
    greedy = [SamplingParams(max_tokens=12, temperature=0.0), SamplingParams(max_tokens=7, temperature=0.0)]
    remote = EngineProcess({"model_dir": str(model), "max_batch_size": 8, **EXACT})
    runner = None
    try:
        local = TransformersEngine(model, max_batch_size=8, **EXACT)
        assert remote.max_positions == local.max_positions
        want = [c.text for c in local.generate(prompts[:2], greedy)]
        assert [c.text for c in remote.generate(prompts[:2], greedy)] == want  # the Engine interface
        runner = EngineRunner(remote, "batch")

        async def run():
            pairs = zip(prompts[:2], greedy, strict=True)
            first = await asyncio.gather(*(runner.generate([p], [sp]) for p, sp in pairs))
            # greedy: a sampled random model may draw its EOS and finish before the kill
            endless = SamplingParams(max_tokens=7000, temperature=0.0)
            long = asyncio.create_task(runner.generate([prompts[2]], [endless]))
            await asyncio.sleep(0.5)
            os.kill(remote._child.pid, signal.SIGKILL)  # the engine dies mid-decode
            lost = None
            try:
                await asyncio.wait_for(long, 30)
            except EngineError as err:
                lost = err
            after = await asyncio.gather(runner.generate([prompts[0]], [greedy[0]]), return_exceptions=True)
            for _ in range(100):  # the engine thread stops right after answering that request
                if runner.broken() is not None:
                    break
                await asyncio.sleep(0.05)
            return first, lost, after[0], runner.broken()

        first, lost, after, broken = asyncio.run(run())
        assert [c[0].text for c in first] == want
        assert lost is not None and lost.reason == "engine_crash" and "exited" in str(lost)
        assert isinstance(after, EngineError) and after.reason == "engine_crash"
        assert broken is not None
    finally:
        if runner is not None:
            asyncio.run(runner.close())  # closes the engine process too
        remote.close()


def test_engine_process_names_a_model_it_cannot_load(tmp_path):
    from diaggym_serving.engine_process import EngineProcess

    from diaggym.errors import InputError

    with pytest.raises(InputError, match="could not load the model: InputError: .*not a Hugging Face model folder"):
        EngineProcess({"model_dir": str(tmp_path)})
