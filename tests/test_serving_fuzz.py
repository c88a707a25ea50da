"""Fuzzing the simulator API from its own OpenAPI document (schemathesis), against real server processes.

Requests for ``:predict`` and ``/openai/v1/completions`` are generated from the request schemas the
server publishes at ``/openapi.json``: valid ones (positive mode) and ones that break the schema
(negative mode), with a fixed seed and a bounded number of examples.  Against the marginal engine no
answer may be a 5xx; in front of a slow and failing predictor (tests/openai_server.py) the only 5xx
allowed are the documented engine classes (503 with a known reason, 504 timeout).
"""

from __future__ import annotations

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from diaggym.cases import load_cases
from diaggym.engines.baselines import MarginalEngine
from diaggym.exam_stats import TrainingStats
from diaggym.testing import diaggym_serve
from tests.openai_server import CompletionsServer

pytestmark = pytest.mark.integration

TOKEN = "fuzz-token-not-a-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PREDICT, COMPLETIONS = "/v1/models/{model_name}:predict", "/openai/v1/completions"
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
ENGINE_5XX = {503: {"server_error", "connection", "bad_response", "rate_limited", "engine_crash", "overloaded",
                    "not_ready", "timeout"},
              504: {"timeout"}}
FUZZ = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much])


def _schema(url: str) -> schemathesis.BaseSchema:
    doc = httpx.get(f"{url}/openapi.json", headers=AUTH, timeout=10).json()
    assert PREDICT in doc["paths"] and COMPLETIONS in doc["paths"]
    return schemathesis.openapi.from_dict(doc)


def _strategy(schema, path: str, mode: GenerationMode):
    op = schema[path]["POST"]
    fixed = {"path_parameters": {"model_name": "diaggym"}} if "{model_name}" in path else {}
    return op.as_strategy(generation_mode=mode, **fixed)


def _reason(response: requests.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    err = body.get("error") if isinstance(body, dict) else None
    return err.get("code") if isinstance(err, dict) else body.get("reason") if isinstance(body, dict) else None


@pytest.fixture(scope="module")
def marginal(demo_out, tmp_path_factory):
    out, _ = demo_out
    proc, url = diaggym_serve(["--engine", "marginal", "--cases", str(out)],
                              tmp_path_factory.mktemp("fuzz") / "marginal.log", env={"DIAGGYM_API_TOKEN": TOKEN})
    try:
        proc.wait_ready(f"{url}/v2/health/ready", timeout=120)
        yield url, _schema(url)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def front(demo_out, tmp_path_factory):
    out, _ = demo_out
    cases = [c for c in load_cases(out / "cases.jsonl") if c.split == "train"]
    upstream = CompletionsServer(MarginalEngine(TrainingStats.from_cases(cases), seed=0)).start()
    upstream.cycle, upstream.cycle_delay_s = ["ok", "slow", "503", "ok", "junk", "500", "429"], 1.0
    proc, url = diaggym_serve(
        ["--engine", "openai", "--engine-url", upstream.base_url, "--served-model", "marginal",
         "--request-timeout", "0.5", "--ready-recheck-s", "3600"],
        tmp_path_factory.mktemp("fuzz") / "front.log", env={"DIAGGYM_API_TOKEN": TOKEN},
    )
    try:
        proc.wait_ready(f"{url}/v2/health/ready", timeout=120)
        yield url, _schema(url), upstream
    finally:
        proc.stop()
        upstream.stop()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("path", [PREDICT, COMPLETIONS])
def test_fuzzed_requests_never_get_a_5xx(marginal, path, mode):
    url, schema = marginal
    seen: dict[int, int] = {}

    @FUZZ
    @given(data=st.data())
    def run(data) -> None:
        case = data.draw(_strategy(schema, path, mode))
        response = case.call(base_url=url, headers=AUTH, timeout=30)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
        if response.status_code >= 400:
            assert _reason(response), response.text[:500]

    run()
    if mode is GenerationMode.NEGATIVE:
        assert set(seen) <= {400, 404, 405, 413, 415}, seen
    else:
        assert seen.get(200, 0) > 0 or path == COMPLETIONS, seen  # most valid prompts are not diaggym-v1 text


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("path", [PREDICT, COMPLETIONS])
def test_fuzzed_requests_to_a_front_with_a_failing_predictor_get_only_engine_5xx(front, path, mode):
    url, schema, upstream = front
    seen: dict[int, int] = {}

    @settings(FUZZ, max_examples=30)
    @given(data=st.data())
    def run(data) -> None:
        case = data.draw(_strategy(schema, path, mode))
        response = case.call(base_url=url, headers=AUTH, timeout=30)
        code = response.status_code
        seen[code] = seen.get(code, 0) + 1
        if code >= 500:
            assert _reason(response) in ENGINE_5XX.get(code, set()), (case.body, code, response.text[:500])
        elif code >= 400:
            assert _reason(response), response.text[:500]

    run()
    if mode is GenerationMode.POSITIVE and path == PREDICT:
        assert seen.get(200, 0) and (seen.get(503, 0) or seen.get(504, 0)), seen  # the faults were met
    assert httpx.get(f"{url}/v2/health/live", timeout=10).status_code == 200
