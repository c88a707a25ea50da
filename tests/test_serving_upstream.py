"""The server in front of a slow or failing OpenAI-compatible predictor (tests/openai_server.py, real HTTP).

Timeouts cancel the upstream call and are never retried past the deadline; upstream calls are bounded
and saturation is a 503 with Retry-After; a client that hangs up is counted as ``client_closed``;
readiness follows the predictor after the warm-up; only the sampling fields the caller set go upstream;
the predictor's context length bounds max_tokens.
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from diaggym.cases import load_cases
from diaggym.engines.baselines import MarginalEngine
from diaggym.exam_stats import TrainingStats
from diaggym.testing import diaggym_serve
from tests.openai_server import CompletionsServer

pytestmark = pytest.mark.integration

CBC = "Complete Blood Count (CBC)"
TIMEOUT_S = 1.0
CONCURRENCY, QUEUE = 4, 6
CONTEXT = 2048


@pytest.fixture(scope="module")
def upstream(demo_out):
    out, _ = demo_out
    cases = [c for c in load_cases(out / "cases.jsonl") if c.split == "train"]
    server = CompletionsServer(MarginalEngine(TrainingStats.from_cases(cases), seed=0))
    server.max_model_len = CONTEXT
    with server:
        yield server


@pytest.fixture(scope="module")
def front(upstream, tmp_path_factory):
    log = tmp_path_factory.mktemp("front") / "serve.log"
    proc, url = diaggym_serve(
        ["--engine", "openai", "--engine-url", upstream.base_url, "--served-model", "marginal",
         "--request-timeout", str(TIMEOUT_S), "--max-concurrency", str(CONCURRENCY), "--max-queue", str(QUEUE),
         "--ready-recheck-s", "0.5"],
        log,
    )
    try:
        proc.wait_ready(f"{url}/v2/health/ready", timeout=120)
        yield url, proc
    finally:
        proc.stop()


@pytest.fixture(autouse=True)
def _clean(upstream, front):
    upstream.reset()
    url, proc = front
    proc.wait_ready(f"{url}/v2/health/ready", timeout=30)
    yield
    upstream.reset()


def _body(**kw) -> dict:
    return {"instances": [{"profile": "Sex: F", "final_diagnosis": "Anemia", "exam": CBC, "seed": 1,
                           "max_tokens": 256, **kw}]}


CLIENT = httpx.Client(timeout=30)  # shared by the threads: a client per request costs more than the deadline


def _predict(url: str, timeout: float = 30, **kw) -> httpx.Response:
    return CLIENT.post(f"{url}/v1/models/diaggym:predict", json=_body(**kw), timeout=timeout)


def _concurrently(n: int, fn, upstream: CompletionsServer | None = None) -> tuple[list, int]:
    """``n`` calls of ``fn`` at once; also the upstream's peak concurrency before any deadline passed.

    The peak is sampled for half the timeout after the first upstream call began: no request can have
    timed out by then.  Later, a freed slot may start a new call a few milliseconds before the upstream
    notices the cancelled one's disconnect, which would count one call twice.
    """
    out: list = [None] * n

    def one(i: int) -> None:
        out[i] = fn()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    peak, first = 0, None
    while upstream is not None and any(t.is_alive() for t in threads):
        now = time.monotonic()
        if upstream.in_flight and first is None:
            first = now
        if first is not None and now - first > TIMEOUT_S / 2:
            break
        peak = max(peak, upstream.in_flight)
        time.sleep(0.005)
    for t in threads:
        t.join()
    return out, peak


def _sample(url: str, name: str, **labels) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _upstream_calls(upstream: CompletionsServer) -> list:
    return [r for r in upstream.log if (r.body or {}).get("max_tokens") != 1]  # not the readiness probes


def test_timed_out_requests_cancel_upstream_and_are_not_retried(front, upstream):
    url, _ = front
    upstream.delay_s = 10.0
    start = time.monotonic()
    answers, peak = _concurrently(10, lambda: _predict(url), upstream)
    assert [r.status_code for r in answers] == [504] * 10, [r.text for r in answers]
    assert all(r.json()["reason"] == "timeout" for r in answers)
    # every answer came at about the deadline (the queued ones shared it), none after a retry
    assert time.monotonic() - start < TIMEOUT_S + 2.0
    time.sleep(1.5)  # any retry or late call would show up now
    calls = _upstream_calls(upstream)
    assert 1 <= len(calls) <= 10, len(calls)
    assert peak == CONCURRENCY  # the bound, reached
    assert upstream.in_flight == 0
    for call in calls:  # each was cut at the deadline (the upstream saw the disconnect)
        assert call.status == 499 and call.time - call.start < TIMEOUT_S + 0.5, call


def test_saturation_is_503_with_retry_after(front, upstream):
    url, _ = front
    upstream.delay_s = 10.0
    answers, peak = _concurrently(CONCURRENCY + QUEUE + 5, lambda: _predict(url), upstream)
    codes = sorted(r.status_code for r in answers)
    refused = [r for r in answers if r.status_code == 503]
    assert len(refused) >= 5 and codes.count(504) + len(refused) == len(answers), codes
    assert all(r.json()["reason"] == "overloaded" and r.headers["retry-after"] == "1" for r in refused)
    assert peak == CONCURRENCY


def test_a_client_that_hangs_up_is_client_closed_not_an_engine_error(front, upstream):
    url, proc = front
    upstream.delay_s = 10.0  # far longer than any cancellation takes, even on a loaded machine
    closed = _sample(url, "diaggym_requests_total", route="predict", outcome="client_closed")
    errors = _sample(url, "diaggym_requests_total", route="predict", outcome="engine_error")
    before = proc.log_path.read_text().count("\n")
    with pytest.raises(httpx.ReadTimeout):
        _predict(url, timeout=0.3)
    deadline = time.monotonic() + 8
    while not _upstream_calls(upstream) and time.monotonic() < deadline:
        time.sleep(0.05)
    call = _upstream_calls(upstream)[0]
    assert call.status == 499 and call.time - call.start < 5.0  # cancelled, not waited out (10 s)
    assert _sample(url, "diaggym_requests_total", route="predict", outcome="client_closed") == closed + 1
    assert _sample(url, "diaggym_requests_total", route="predict", outcome="engine_error") == errors
    deadline = time.monotonic() + 5
    while proc.log_path.read_text().count("\n") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = proc.log_path.read_text().splitlines()[before:]
    assert len(lines) == 1 and "client closed" in lines[0] and " INFO " in lines[0], lines


def test_readiness_is_rechecked_after_warm_up(front, upstream):
    url, _ = front

    def ready() -> httpx.Response:
        return httpx.get(f"{url}/v2/health/ready", timeout=10)

    upstream.fail_status = 503  # the predictor goes bad after the warm-up
    deadline = time.monotonic() + 15
    while ready().status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    r = ready()
    assert r.status_code == 503 and "503" in r.json()["reason"], r.text
    r = _predict(url)
    assert r.status_code == 503 and r.json()["reason"] == "not_ready" and r.headers["retry-after"]
    upstream.fail_status = None
    deadline = time.monotonic() + 20
    while ready().status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready().status_code == 200
    assert _predict(url).status_code == 200


def test_only_the_sampling_fields_the_caller_set_go_upstream(front, upstream):
    url, _ = front
    assert _predict(url).status_code == 200
    assert _predict(url, top_p=0.9, temperature=0.5).status_code == 200
    first, second = (c.body for c in _upstream_calls(upstream))
    assert "top_p" not in first and first["temperature"] == 1.0 and first["seed"] == 1
    assert second["top_p"] == 0.9 and second["temperature"] == 0.5


def test_the_predictors_context_bounds_max_tokens(front, upstream):
    url, _ = front
    r = _predict(url, max_tokens=CONTEXT + 1)
    assert r.status_code == 400 and r.json()["field"] == "instances[0].max_tokens"
    assert re.search(rf"\b{CONTEXT}\b", r.json()["error"]) and "context" in r.json()["error"]
    assert not _upstream_calls(upstream)
