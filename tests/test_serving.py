"""The simulator server (serving/diaggym_serving) as users reach it: real processes over real HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diaggym.cases import SEP, load_cases
from diaggym.serialization import case_events, render_context
from diaggym.testing import diaggym_serve
from tests.openai_server import CompletionsServer

pytestmark = pytest.mark.integration

TOKEN = "test-token-not-a-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CBC = "Complete Blood Count (CBC)"


@pytest.fixture(scope="module")
def marginal_server(demo_out, tmp_path_factory):
    """The server with the marginal engine, the demo cases and bearer-token auth."""
    out, _ = demo_out
    log = tmp_path_factory.mktemp("serve") / "marginal.log"
    proc, url = diaggym_serve(
        ["--engine", "marginal", "--cases", str(out), "--max-tokens-limit", "1024", "--max-body-bytes", "200000"],
        log,
        env={"DIAGGYM_API_TOKEN": TOKEN},
    )
    try:
        proc.wait_ready(f"{url}/v2/health/ready", timeout=120)
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def model_server(trained_tiny, demo_out, tmp_path_factory):
    """The server with the in-process transformers engine on a locally trained tiny checkpoint."""
    out, _ = demo_out
    log = tmp_path_factory.mktemp("serve") / "transformers.log"
    proc, url = diaggym_serve(
        ["--engine", "transformers", "--model", str(trained_tiny), "--cases", str(out)], log
    )
    try:
        proc.wait_ready(f"{url}/v2/health/ready", timeout=180)
        yield url
    finally:
        proc.stop()


def _instance(case, exam=CBC, k=2, **kw) -> dict:
    return {
        "profile": case.profile.model_dump(exclude_none=True),
        "final_diagnosis": case.final_diagnosis,
        "history": [{"name": n, "result": r} for n, r in case_events(case)[:k]],
        "exam": exam,
        **kw,
    }


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def _sample(text: str, name: str, **labels) -> float:
    """Value of one sample in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + ("{" if labels else " ")) and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---------------------------------------------------------------------------------------------- predict
def test_predict_returns_parsed_results_reproducibly(marginal_server, demo_cases):
    case = next(c for c in demo_cases if any(e.name == CBC for e in c.exams))
    body = {"instances": [_instance(case, seed=7), _instance(case, exam="Basic Metabolic Panel", seed=7)]}
    r = httpx.post(f"{marginal_server}/v1/models/diaggym:predict", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["exam"] for p in preds] == [CBC, "Basic Metabolic Panel"]
    cbc = preds[0]
    assert cbc["finish_reason"] == "stop" and cbc["complete"] is True
    names = {i["name"] for i in cbc["items"]}
    assert {"Hemoglobin", "Platelet Count"} <= names
    assert all("valuenum" in i for i in cbc["items"] if i["name"] == "Hemoglobin")
    again = httpx.post(f"{marginal_server}/v1/models/diaggym:predict", json=body, headers=AUTH, timeout=30).json()
    assert again["predictions"][0]["result"] == cbc["result"]  # same seed, same draw


def test_predict_case_id_form(marginal_server, demo_cases):
    case = demo_cases[0]
    body = {"instances": [{"case_id": case.case_id, "exam": CBC, "seed": 1}]}
    r = httpx.post(f"{marginal_server}/v1/models/diaggym:predict", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["exam"] == CBC


BAD_REQUESTS = [
    ({"instances": [{"profile": "p", "final_diagnosis": "d"}]}, 400, "instances[0].exam"),
    ({"instances": [{"profile": "p", "final_diagnosis": "d", "exam": CBC, "history": "CBC"}]}, 400,
     "instances[0].history"),
    ({"instances": [{"profile": "p", "final_diagnosis": "d", "exam": CBC, "temprature": 1}]}, 400,
     "instances[0].temprature"),
    ({"instances": [{"profile": "p", "final_diagnosis": "d", "exam": CBC, "max_tokens": 5000}]}, 400,
     "instances[0].max_tokens"),
    ({"instances": [{"profile": "p", "exam": CBC}]}, 400, "final_diagnosis"),
    ({"instances": [{"case_id": "nope", "exam": CBC}]}, 400, "instances[0].case_id"),
    ({"instances": [{"profile": 5, "final_diagnosis": "d", "exam": CBC}]}, 400, "instances[0].profile"),
    ({"instances": []}, 400, "instances"),
    ({"inputs": []}, 400, "instances"),
    ([1, 2], 400, "body"),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD_REQUESTS)
def test_predict_bad_input_names_the_field(marginal_server, body, status, field):
    r = httpx.post(f"{marginal_server}/v1/models/diaggym:predict", json=body, headers=AUTH, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()
    assert field in err["error"], err


def test_auth_size_and_json_guards(marginal_server):
    url = f"{marginal_server}/v1/models/diaggym:predict"
    body = {"instances": [{"profile": "p", "final_diagnosis": "d", "exam": CBC}]}
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.json()["reason"] == "unauthorized"
    big = {"instances": [{"profile": "x" * 300_000, "final_diagnosis": "d", "exam": CBC}]}
    r = httpx.post(url, json=big, headers=AUTH, timeout=30)
    assert r.status_code == 413 and r.json()["reason"] == "body_too_large"
    r = httpx.post(url, content=b"{not json", headers={**AUTH, "content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "error" in r.json()
    # health and metrics stay open for probes and Prometheus
    assert httpx.get(f"{marginal_server}/v2/health/live", timeout=10).status_code == 200
    assert httpx.get(f"{marginal_server}/metrics", timeout=10).status_code == 200


_fields = st.sampled_from(
    ["profile", "final_diagnosis", "case_id", "history", "exam", "seed", "temperature", "top_p", "max_tokens", "x"]
)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        _json,
        st.fixed_dictionaries({"instances": st.lists(st.dictionaries(_fields, _json, max_size=6), max_size=3)}),
        st.fixed_dictionaries({"instances": _json}),
    )
)
def test_fuzzed_predict_never_500(marginal_server, body):
    r = httpx.post(f"{marginal_server}/v1/models/diaggym:predict", json=body, headers=AUTH, timeout=30)
    assert r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code >= 400:
        assert r.json()["error"], r.text


# ---------------------------------------------------------------------------------------------- openai
def test_openai_client_unchanged(marginal_server, demo_cases):
    case = demo_cases[0]
    prompt = render_context(case.profile, case.final_diagnosis) + f"Exam name:\n{CBC}\nExam results:\n"
    client = openai.OpenAI(base_url=f"{marginal_server}/openai/v1", api_key=TOKEN)
    out = client.completions.create(model="diaggym", prompt=prompt, max_tokens=512, stop=[SEP], seed=3)
    assert out.choices[0].text.startswith("Red Blood Cells") or "Hemoglobin" in out.choices[0].text
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens > 0
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="diaggym", prompt=prompt, max_tokens=512, stop=[SEP], seed=3, stream=True
        )
    )
    assert streamed == out.choices[0].text
    assert [m.id for m in client.models.list()] == ["diaggym"]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt=prompt, max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="diaggym", prompt=prompt, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="diaggym", prompt=prompt, max_tokens=8, echo=True)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{marginal_server}/openai/v1", api_key="wrong").completions.create(
            model="diaggym", prompt=prompt, max_tokens=8
        )


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_count_by_route_and_outcome_without_case_text(marginal_server, demo_cases):
    before = _metrics(marginal_server)
    case = demo_cases[0]
    url = f"{marginal_server}/v1/models/diaggym:predict"
    httpx.post(url, json={"instances": [_instance(case)]}, headers=AUTH, timeout=30)
    httpx.post(url, json={"instances": [{"exam": CBC}]}, headers=AUTH, timeout=30)
    after = _metrics(marginal_server)
    ok = ("diaggym_requests_total", {"route": "predict", "outcome": "ok"})
    bad = ("diaggym_requests_total", {"route": "predict", "outcome": "client_error"})
    assert _sample(after, ok[0], **ok[1]) == _sample(before, ok[0], **ok[1]) + 1
    assert _sample(after, bad[0], **bad[1]) == _sample(before, bad[0], **bad[1]) + 1
    assert _sample(after, "diaggym_exams_total", kind="lab", outcome="ok") >= 1
    assert _sample(after, "diaggym_engine_ready") == 1
    for needle in (CBC, case.final_diagnosis.splitlines()[0], case.case_id):
        assert needle not in after  # no exam names, diagnoses or ids in labels


def test_promtool_accepts_metrics(marginal_server):
    assert shutil.which("promtool"), "promtool missing: `make test` installs the Debian package prometheus"
    body = {"instances": [{"profile": "p", "final_diagnosis": "d", "exam": CBC}]}
    httpx.post(f"{marginal_server}/v1/models/diaggym:predict", json=body, headers=AUTH, timeout=30)
    text = _metrics(marginal_server)
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "diaggym_" in ln]
    assert not ours, ours  # KServe's own metric names are not ours to fix; ours must be clean
    assert "diaggym_request_duration_seconds_bucket" in text


# ---------------------------------------------------------------------------------------------- real model
def test_trained_model_serves_predict_and_openai(model_server, demo_cases):
    case = next(c for c in demo_cases if c.split == "test")
    body = {"instances": [_instance(case, seed=1, max_tokens=24, temperature=0.0)]}
    r = httpx.post(f"{model_server}/v1/models/diaggym:predict", json=body, timeout=120)
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert pred["prompt_tokens"] > 50 and 0 < pred["completion_tokens"] <= 24
    client = openai.OpenAI(base_url=f"{model_server}/openai/v1", api_key="unused")
    prompt = render_context(case.profile, case.final_diagnosis) + f"Exam name:\n{CBC}\nExam results:\n"
    a = client.completions.create(model="diaggym", prompt=prompt, max_tokens=16, temperature=0, stop=[SEP])
    b = client.completions.create(model="diaggym", prompt=prompt, max_tokens=16, temperature=0, stop=[SEP])
    assert a.choices[0].text == b.choices[0].text and a.usage.prompt_tokens > 50


def test_concurrent_requests_reach_the_engine_and_are_prefix_cached(model_server, demo_cases):
    """8 concurrent requests through HTTP into the continuously batching engine (how requests join a running
    batch is tested deterministically in test_batcher.py)."""
    case = max(demo_cases, key=lambda c: len(c.exams))
    events = case_events(case)
    before = _metrics(model_server)
    results: list[int] = []

    def one(k: int) -> None:
        body = {"instances": [_instance(case, exam=events[k][0], k=k, max_tokens=4, temperature=0.0)]}
        r = httpx.post(f"{model_server}/v1/models/diaggym:predict", json=body, timeout=120)
        results.append(r.status_code)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 8
    after = _metrics(model_server)
    calls = _sample(after, "diaggym_engine_batch_size_count") - _sample(before, "diaggym_engine_batch_size_count")
    prompts = _sample(after, "diaggym_engine_batch_size_sum") - _sample(before, "diaggym_engine_batch_size_sum")
    assert prompts == 8 and 1 <= calls <= 8  # every prompt was taken by the engine, in at most 8 takes
    hits = _sample(after, "diaggym_prefix_cache_hit_tokens_total") - _sample(
        before, "diaggym_prefix_cache_hit_tokens_total"
    )
    assert hits > 0  # the prompts share the case's context and history


# ---------------------------------------------------------------------------------------------- engine failures
def test_not_ready_until_engine_answers_then_503_on_engine_failure(demo_out, tmp_path):
    from diaggym.engines.baselines import MarginalEngine
    from diaggym.exam_stats import TrainingStats

    out, _ = demo_out
    cases = [c for c in load_cases(out / "cases.jsonl") if c.split == "train"]
    backend = CompletionsServer(MarginalEngine(TrainingStats.from_cases(cases))).start()
    proc, url = diaggym_serve(
        ["--engine", "openai", "--engine-url", backend.base_url, "--request-timeout", "5"], tmp_path / "openai.log"
    )
    try:
        proc.wait_ready(f"{url}/v2/health/live", timeout=120)
        proc.wait_ready(f"{url}/v2/health/ready", timeout=60)
        body = {"instances": [{"profile": "Sex: F", "final_diagnosis": "Anemia", "exam": CBC, "seed": 1}]}
        r = httpx.post(f"{url}/v1/models/diaggym:predict", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["predictions"][0]["items"], r.text
        backend.stop()  # the predictor goes away
        r = httpx.post(f"{url}/v1/models/diaggym:predict", json=body, timeout=60)
        assert r.status_code == 503, r.text
        assert r.json()["reason"] in {"connection", "connection_error", "timeout", "server_error"}, r.json()
        text = _metrics(url)
        assert _sample(text, "diaggym_requests_total", route="predict", outcome="engine_error") == 1
        assert _sample(text, "diaggym_errors_total", reason=r.json()["reason"]) == 1
    finally:
        proc.stop()
        backend.stop()


def test_server_reports_not_ready_when_predictor_is_down(tmp_path):
    from diaggym.testing import free_port

    proc, url = diaggym_serve(
        ["--engine", "openai", "--engine-url", f"http://127.0.0.1:{free_port()}/v1", "--request-timeout", "2"],
        tmp_path / "down.log",
    )
    try:
        proc.wait_ready(f"{url}/v2/health/live", timeout=120)
        r = httpx.get(f"{url}/v2/health/ready", timeout=10)
        assert r.status_code == 503 and r.json()["ready"] is False and r.json()["reason"]
        body = {"instances": [{"profile": "Sex: F", "final_diagnosis": "Anemia", "exam": CBC}]}
        r = httpx.post(f"{url}/v1/models/diaggym:predict", json=body, timeout=30)
        assert r.status_code == 503, r.text
        assert json.loads(r.text)["error"]
    finally:
        proc.stop()


# ---------------------------------------------------------------------------------------------- prometheus
def test_real_prometheus_scrapes_the_server(marginal_server, tmp_path):
    """Debian's prometheus scrapes /metrics every second; one of our series comes back through its query API."""
    from diaggym.testing import ServerProcess, free_port

    assert shutil.which("prometheus"), "prometheus missing: `make test` installs the Debian package"
    target = marginal_server.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: diaggym\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    prom = ServerProcess(
        ["prometheus", f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
        tmp_path / "prometheus.log",
    ).start()
    try:
        prom.wait_ready(f"http://127.0.0.1:{port}/-/ready", timeout=60)
        body = {"instances": [{"profile": "p", "final_diagnosis": "d", "exam": CBC}]}
        httpx.post(f"{marginal_server}/v1/models/diaggym:predict", json=body, headers=AUTH, timeout=30)
        deadline = time.monotonic() + 60
        result: list = []
        while time.monotonic() < deadline and not result:
            r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query",
                          params={"query": 'diaggym_requests_total{route="predict",outcome="ok"}'}, timeout=10)
            result = r.json()["data"]["result"]
            time.sleep(0.5)
        assert result, prom.log_tail()
        assert result[0]["metric"]["job"] == "diaggym" and float(result[0]["value"][1]) >= 1
        up = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "up"}, timeout=10).json()
        assert up["data"]["result"][0]["value"][1] == "1"
    finally:
        prom.stop()
