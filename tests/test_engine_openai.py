"""OpenAIEngine against a real OpenAI-compatible HTTP server (tests/openai_server.py), faults included.

No mock objects: the official ``openai`` client talks HTTP to uvicorn on 127.0.0.1, and a
``MarginalEngine`` writes the results, so what comes back can be checked against the real data.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from diaggym.cases import load_cases
from diaggym.engines.base import EngineError, SamplingParams
from diaggym.engines.baselines import MarginalEngine
from diaggym.engines.openai_compat import OpenAIEngine, RemoteEngineError, map_finish_reason
from diaggym.exam_stats import TrainingStats
from diaggym.serialization import case_prompts, parse_prompt, parse_result
from diaggym.testing import free_port
from tests.openai_server import CompletionsServer

FAST = {"timeout": 2.0, "backoff": 0.01}


@pytest.fixture(scope="module")
def catalog(demo_out) -> TrainingStats:
    out, _card = demo_out
    return TrainingStats.from_cases(load_cases(out / "cases.jsonl", split="train"))


@pytest.fixture(scope="module")
def prompts(demo_out) -> list[str]:
    out, _card = demo_out
    test_cases = load_cases(out / "cases.jsonl", split="test")
    return case_prompts(test_cases[0])[:6]


@pytest.fixture(scope="module")
def server(catalog):
    with CompletionsServer(MarginalEngine(catalog, seed=0)) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fresh_server(server):
    server.reset()


def engine(server: CompletionsServer, model: str = "marginal", **kw) -> OpenAIEngine:
    return OpenAIEngine(server.base_url, model, **{**FAST, **kw})


# ------------------------------------------------------------------ happy path
@pytest.mark.integration
def test_completions_round_trip_through_the_official_client(server, catalog, prompts):
    params = SamplingParams(seed=3, max_tokens=400)
    with engine(server) as eng:
        outs = eng.generate(prompts, params)
    local = MarginalEngine(catalog, seed=0).generate(prompts, params)
    assert [o.text for o in outs] == [o.text for o in local]  # the seed travels over HTTP
    for p, out in zip(prompts, outs, strict=True):
        exam = parse_prompt(p)[2]
        assert out.text in catalog.get(exam).results
        assert parse_result(out.text, exam, catalog.kind(exam)).complete
        assert out.finish_reason == "stop"
        assert out.prompt_tokens == len(p.split())
        assert out.completion_tokens == len(out.text.split())
        assert out.meta["attempts"] == 1
    assert len(server.requests_for("marginal")) == len(prompts)
    assert all(r.status == 200 for r in server.log)


@pytest.mark.integration
def test_prefix_cache_hits_are_reported(server, prompts):
    # The prompts of one case are append-only: each is a prefix of the next.
    with engine(server) as eng:
        outs = [eng.generate([p], SamplingParams(seed=1))[0] for p in prompts]
    assert outs[0].cached_prompt_tokens == 0
    assert [o.cached_prompt_tokens for o in outs[1:]] == [len(p.split()) for p in prompts[:-1]]


@pytest.mark.integration
def test_max_tokens_maps_to_length(server, prompts):
    with engine(server) as eng:
        out = eng.generate([prompts[0]], SamplingParams(seed=1, max_tokens=2))[0]
    assert out.finish_reason == "length"
    assert out.completion_tokens == 2 == len(out.text.split())


@pytest.mark.integration
def test_raw_text_is_cut_at_sep_and_eos_and_missing_usage_is_zero(server, catalog, prompts):
    with engine(server, "raw") as eng:
        out = eng.generate([prompts[1]], SamplingParams(seed=1))[0]
    assert "<SEP>" not in out.text and "<|endoftext|>" not in out.text
    assert out.text == out.text.strip() and out.text in catalog.get(parse_prompt(prompts[1])[2]).results
    assert out.finish_reason == "stop"  # server gave no reason; the stop string was found
    assert (out.prompt_tokens, out.completion_tokens, out.cached_prompt_tokens) == (0, 0, 0)


@pytest.mark.integration
def test_an_empty_completion_is_passed_on_visibly(server, prompts, caplog):
    with engine(server, "empty") as eng:
        out = eng.generate([prompts[0]])[0]
    assert out.text == "" and out.finish_reason == "stop" and out.meta["empty"] is True
    assert "empty completion" in caplog.text


@pytest.mark.integration
def test_a_batch_of_32_runs_concurrently_within_the_bound(server, prompts):
    batch = (prompts * 6)[:32]
    with engine(server, "slow:0.3", concurrency=16) as eng:
        start = time.monotonic()
        outs = eng.generate(batch, SamplingParams(seed=1))
        elapsed = time.monotonic() - start
    assert len(outs) == 32 and all(o.text for o in outs)
    assert elapsed < 3.0, f"32 requests of 0.3 s took {elapsed:.2f} s: they were serialised"
    assert 1 < server.max_in_flight <= 16


# ------------------------------------------------------------------ retries
@pytest.mark.integration
def test_503s_are_retried_then_succeed(server, prompts):
    with engine(server, "flaky:2", max_retries=3) as eng:
        out = eng.generate([prompts[0]], SamplingParams(seed=1))[0]
    seen = [r.status for r in server.requests_for("flaky:2")]
    assert seen == [503, 503, 200]
    assert out.meta["attempts"] == 3 and out.text


@pytest.mark.integration
def test_429_is_retried(server, prompts):
    with engine(server, "ratelimit:1", max_retries=1) as eng:
        out = eng.generate([prompts[0]])[0]
    assert [r.status for r in server.requests_for("ratelimit:1")] == [429, 200]
    assert out.text


@pytest.mark.integration
def test_persistent_503_is_a_server_error_after_max_retries_plus_one(server, prompts):
    with engine(server, "down", max_retries=2) as eng, pytest.raises(EngineError) as info:
        eng.generate([prompts[0]])
    err = info.value
    assert isinstance(err, RemoteEngineError)
    assert (err.reason, err.status, err.attempts, err.retryable) == ("server_error", 503, 3, True)
    assert server.base_url in str(err) and "503" in str(err)
    assert len(server.requests_for("down")) == 3


@pytest.mark.integration
def test_backoff_grows_between_retries(server, prompts):
    with engine(server, "down", max_retries=3, backoff=0.05) as eng, pytest.raises(EngineError):
        eng.generate([prompts[0]])
    times = [r.time for r in server.requests_for("down")]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(gaps) == 3
    # waits are backoff * 2**k with "equal jitter": in [0.5, 1] x (0.05, 0.1, 0.2)
    assert gaps[0] >= 0.025 and gaps[1] >= 0.05 and gaps[2] >= 0.1


@pytest.mark.integration
def test_timeout_is_reported_as_timeout(server, prompts):
    with engine(server, "slow:3", timeout=0.3, max_retries=1) as eng:
        start = time.monotonic()
        with pytest.raises(EngineError) as info:
            eng.generate([prompts[0]])
        elapsed = time.monotonic() - start
    assert info.value.reason == "timeout" and info.value.attempts == 2
    assert server.base_url in str(info.value)
    assert elapsed < 2.0
    deadline = time.monotonic() + 2
    while len(server.requests_for("slow:3")) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # the server notices the disconnects a little later
    assert [r.status for r in server.requests_for("slow:3")] == [499, 499]


@pytest.mark.integration
def test_400_is_a_bad_request_and_not_retried(server, prompts):
    with engine(server, "bad", max_retries=3) as eng, pytest.raises(EngineError) as info:
        eng.generate([prompts[0]])
    assert (info.value.reason, info.value.status, info.value.attempts) == ("bad_request", 400, 1)
    assert not info.value.retryable
    assert "400" in str(info.value) and server.base_url in str(info.value)
    assert len(server.requests_for("bad")) == 1


@pytest.mark.integration
def test_a_prompt_the_server_engine_rejects_is_a_bad_request(server):
    with engine(server) as eng, pytest.raises(EngineError) as info:
        eng.generate(["not a diaggym prompt"])
    assert info.value.reason == "bad_request" and "bad prompt" in str(info.value)


# ------------------------------------------------------------------ malformed replies
@pytest.mark.integration
def test_a_reply_without_choices_is_a_bad_response(server, prompts):
    with engine(server, "junk", max_retries=3) as eng, pytest.raises(EngineError) as info:
        eng.generate([prompts[0]])
    assert info.value.reason == "bad_response" and info.value.attempts == 1
    assert "choices" in str(info.value) and server.base_url in str(info.value)


@pytest.mark.integration
def test_a_reply_whose_text_is_not_a_string_is_a_bad_response(server, prompts):
    with engine(server, "junk-text") as eng, pytest.raises(EngineError) as info:
        eng.generate([prompts[0]])
    assert info.value.reason == "bad_response" and "not a string" in str(info.value)


@pytest.mark.integration
@pytest.mark.parametrize("model", ["html", "broken-json"])
def test_a_200_that_is_not_a_completion_is_a_bad_response(server, prompts, model):
    with engine(server, model, max_retries=3) as eng, pytest.raises(EngineError) as info:
        eng.generate([prompts[0]])
    assert (info.value.reason, info.value.status, info.value.attempts) == ("bad_response", 200, 1)
    assert len(server.requests_for(model)) == 1


@pytest.mark.integration
def test_one_failure_fails_the_batch_loudly(server, prompts):
    with engine(server, "junk-text") as eng, pytest.raises(EngineError):
        eng.generate(prompts)


# ------------------------------------------------------------------ nothing listening
@pytest.mark.integration
def test_nothing_listening_is_a_connection_error():
    port = free_port()
    with OpenAIEngine(f"http://127.0.0.1:{port}/v1", "m", timeout=0.5, max_retries=1, backoff=0.01) as eng:
        start = time.monotonic()
        with pytest.raises(EngineError) as info:
            eng.generate(["anything"])
    assert info.value.reason == "connection" and info.value.attempts == 2
    assert f"127.0.0.1:{port}" in str(info.value)
    assert time.monotonic() - start < 2.0


# ------------------------------------------------------------------ pure helpers (no server)
@pytest.mark.parametrize(
    ("raw", "tokens", "found", "expected"),
    [
        ("stop", 3, False, "stop"),
        ("length", 3, False, "length"),
        ("length", 16, True, "stop"),  # the server ran past <SEP>: the result before it is complete
        ("eos", 3, False, "stop"),
        (None, 3, True, "stop"),
        (None, 16, False, "length"),
        ("abort", 3, False, "stop"),
        ("content_filter", 16, False, "stop"),
    ],
)
def test_finish_reasons_are_mapped(raw, tokens, found, expected):
    assert map_finish_reason(raw, tokens, 16, found) == expected


def test_constructor_rejects_nonsense():
    with pytest.raises(ValueError, match="concurrency"):
        OpenAIEngine("http://127.0.0.1:1/v1", "m", concurrency=0)
    with pytest.raises(ValueError, match="max_retries"):
        OpenAIEngine("http://127.0.0.1:1/v1", "m", max_retries=-1)


# ------------------------------------------------------------------ deadlines, async, what is sent
def _wait_for_log(server: CompletionsServer, model: str, n: int, seconds: float = 8.0) -> list:
    deadline = time.monotonic() + seconds
    while len(server.requests_for(model)) < n and time.monotonic() < deadline:
        time.sleep(0.02)  # the server notices a disconnect a little later
    return server.requests_for(model)


@pytest.mark.integration
def test_a_deadline_cuts_the_attempt_and_no_retry_starts_past_it(server, prompts):
    # Margins are wide so a loaded CI machine meets them: the upstream would answer after 10 s, the engine's own
    # timeout is 20 s, the deadline 0.4 s away; cutting at the deadline means well under 4 s.
    with engine(server, "slow:10", timeout=20.0, max_retries=3) as eng:
        start = time.monotonic()
        with pytest.raises(EngineError) as info:
            eng.generate_until([prompts[0]], [SamplingParams(seed=1)], deadline=start + 0.4)
        elapsed = time.monotonic() - start
    assert info.value.reason == "timeout" and elapsed < 4.0
    time.sleep(0.5)
    seen = _wait_for_log(server, "slow:10", 1)
    assert len(seen) == 1 and seen[0].status == 499 and seen[0].time - seen[0].start < 5.0
    with engine(server, "down", max_retries=3, backoff=0.4) as eng, pytest.raises(EngineError) as info:
        eng.generate_until([prompts[0]], [SamplingParams(seed=1)], deadline=time.monotonic() + 0.15)
    assert info.value.reason == "server_error" and len(server.requests_for("down")) == 1  # the backoff would pass it


@pytest.mark.integration
def test_async_generate_answers_and_a_cancelled_caller_closes_the_upstream_call(server, prompts):
    async def run() -> tuple[list, float]:
        eng = engine(server, concurrency=2)
        try:
            outs = await eng.agenerate(prompts[:3], [SamplingParams(seed=3, max_tokens=400)] * 3)
            slow = OpenAIEngine(server.base_url, "slow:10", timeout=20.0)
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(slow.agenerate([prompts[0]], [SamplingParams(seed=1)]), 0.3)
            await slow.aclose()
            return outs, time.monotonic() - start
        finally:
            await eng.aclose()
            eng.close()

    outs, elapsed = asyncio.run(run())
    with engine(server) as eng:
        again = eng.generate(prompts[:3], SamplingParams(seed=3, max_tokens=400))
    assert [o.text for o in outs] == [o.text for o in again]  # the same answers as the sync path
    assert elapsed < 4.0  # cancelled at 0.3 s; waiting it out would take 10 s
    seen = _wait_for_log(server, "slow:10", 1)
    assert seen[0].status == 499 and seen[0].time - seen[0].start < 5.0


@pytest.mark.integration
def test_only_the_sampling_fields_that_were_set_are_sent(server, prompts):
    with engine(server) as eng:
        eng.generate([prompts[0]], SamplingParams(seed=1))
        eng.generate([prompts[0]], SamplingParams(top_p=0.5, stop=()))
    first, second = (r.body for r in server.requests_for("marginal"))
    assert "top_p" not in first and first["seed"] == 1 and first["stop"] == ["<SEP>"]
    assert second["top_p"] == 0.5 and "seed" not in second and "stop" not in second
