"""The simulator server as an attacker or a careless client meets it: real process, real HTTP on 127.0.0.1.

No admin routes, client mistakes are 400s naming the field (never echoing the prompt), any body that
is not the expected JSON is a 400, strict types, aliases of the model name, the context bound on
max_tokens, honest liveness, and at most one escaped log line per refused request.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from diaggym.cases import SEP, Profile, load_cases
from diaggym.serialization import render_context
from diaggym.testing import diaggym_serve

pytestmark = pytest.mark.integration

TOKEN = "hardening-token-not-a-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CBC = "Complete Blood Count (CBC)"
MARK = "ZQXJMARK"  # text that must never come back in an error body
CONTEXT = 4096


@pytest.fixture(scope="module")
def server(demo_out, tmp_path_factory):
    out, _ = demo_out
    log = tmp_path_factory.mktemp("hardening") / "serve.log"
    proc, url = diaggym_serve(
        ["--engine", "marginal", "--cases", str(out), "--model-alias", "EHRGenerator",
         "--context-length", str(CONTEXT)],
        log,
        env={"DIAGGYM_API_TOKEN": TOKEN},
    )
    try:
        proc.wait_ready(f"{url}/v2/health/ready", timeout=120)
        yield url, proc
    finally:
        proc.stop()


def _prompt(exam: str = CBC) -> str:
    return render_context(Profile(sex="F", age=60), "Anemia") + f"Exam name:\n{exam}\nExam results:\n"


def _instance(**kw) -> dict:
    return {"profile": "Sex: F", "final_diagnosis": "Anemia", "exam": CBC, "seed": 1, "max_tokens": 256, **kw}


def _predict(url: str, body, name: str = "diaggym", **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/{name}:predict", json=body, headers=AUTH, timeout=30, **kw)


def _complete(url: str, body) -> httpx.Response:
    return httpx.post(f"{url}/openai/v1/completions", json=body, headers=AUTH, timeout=30)


def _served(url: str) -> None:
    assert httpx.get(f"{url}/v2/health/live", timeout=10).status_code == 200
    assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    r = _predict(url, {"instances": [_instance()]})
    assert r.status_code == 200 and r.json()["predictions"][0]["items"], r.text


# ---------------------------------------------------------------------------------------------- routes
@pytest.mark.parametrize("headers", [{}, AUTH], ids=["no-token", "token"])
def test_repository_and_admin_routes_are_refused_and_the_model_stays(server, headers):
    url, _ = server
    for action in ("unload", "load"):
        for prefix in ("/v2/repository/models", "/v1/repository/models"):
            r = httpx.post(f"{url}{prefix}/diaggym/{action}", headers=headers, timeout=10)
            assert r.status_code == 403 and r.json()["reason"] == "forbidden", r.text
    assert httpx.get(f"{url}/v2/repository/index", headers=headers, timeout=10).status_code == 403
    for method, path in [("POST", "/v1/models/diaggym:explain"), ("POST", "/v2/models/diaggym/infer"),
                         ("GET", "/docs"), ("GET", "/redoc"), ("POST", "/openai/v1/chat/completions"),
                         ("DELETE", "/v1/models/diaggym")]:
        r = httpx.request(method, f"{url}{path}", headers=headers, timeout=10)
        assert r.status_code in (404, 405), (path, r.status_code, r.text)
    _served(url)


def test_openapi_document_publishes_the_request_schemas_and_no_admin_route(server):
    url, _ = server
    doc = httpx.get(f"{url}/openapi.json", headers=AUTH, timeout=10).json()
    assert not [p for p in doc["paths"] if "repository" in p or p.endswith(":explain")]
    predict = doc["paths"]["/v1/models/{model_name}:predict"]["post"]["requestBody"]["content"]["application/json"]
    assert "instances" in predict["schema"]["properties"]
    completions = doc["paths"]["/openai/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert {"model", "prompt", "max_tokens"} <= set(completions["schema"]["properties"])
    assert "$ref" not in json.dumps(predict) + json.dumps(completions)


def test_liveness_fails_once_the_engine_is_gone(demo_out):
    """In process: the real app routes and a real marginal engine; closing the engine turns liveness to 503."""
    from diaggym_serving.app import install
    from diaggym_serving.model import DiagGymModel
    from fastapi import FastAPI

    from diaggym.engines import make_engine

    out, _ = demo_out
    cases = [c for c in load_cases(out / "cases.jsonl") if c.split == "train"]
    model = DiagGymModel("diaggym", make_engine("marginal", cases=cases), dispatch="inline")
    registered = {"yes": True}
    app = FastAPI()
    install(app, model, registered=lambda: registered["yes"])

    async def run() -> list[int]:
        codes = []
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            codes.append((await client.get("/v2/health/live")).status_code)
            registered["yes"] = False  # taken out of the model registry
            codes.append((await client.get("/v2/health/live")).status_code)
            registered["yes"] = True
            codes.append((await client.get("/v2/health/live")).status_code)
            await model.aclose()  # the engine is gone
            r = await client.get("/v2/health/live")
            codes.append(r.status_code)
            assert "closed" in r.json()["reason"]
            codes.append((await client.get("/v2/health/ready")).status_code)
        return codes

    assert asyncio.run(run()) == [200, 503, 200, 503, 503]


# ---------------------------------------------------------------------------------------------- bad prompts
BAD_PROMPTS = [
    ("hello " + MARK, "prompt"),
    ("", "prompt"),
    ([_prompt(), "not a prompt " + MARK], "prompt[1]"),
    (_prompt().replace("Exam results:\n", MARK), "prompt"),
]


@pytest.mark.parametrize(("prompt", "field"), BAD_PROMPTS)
def test_a_prompt_that_is_not_diaggym_v1_is_a_400_naming_the_field(server, prompt, field):
    url, _ = server
    r = _complete(url, {"model": "diaggym", "prompt": prompt, "max_tokens": 16})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["code"] == "bad_prompt" and field in err["message"]
    assert MARK not in r.text


BAD_INSTANCES = [
    (_instance(exam=f"CBC\n{MARK}"), "instances[0].exam"),
    (_instance(exam=f"CBC{SEP}{MARK}"), "instances[0].exam"),
    (_instance(history=[{"name": f"BMP\n{MARK}", "result": "x"}]), "instances[0].history[0].name"),
    (_instance(history=[{"name": "BMP", "result": f"Sodium: 140{SEP}{MARK}"}]), "instances[0].history[0].result"),
    (_instance(final_diagnosis=f"Anemia{SEP}{MARK}"), "instances[0].final_diagnosis"),
    (_instance(profile=f"Sex: F{SEP}{MARK}"), "instances[0]"),
]


@pytest.mark.parametrize(("instance", "field"), BAD_INSTANCES)
def test_exam_and_history_that_would_break_the_prompt_are_400(server, instance, field):
    url, _ = server
    r = _predict(url, {"instances": [instance]})
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field and field in r.json()["error"]
    assert MARK not in r.text
    ok = {**instance, "history": [{"name": "BMP", "result": "Sodium: 140\nPotassium: 4.1"}]}  # newlines in results
    if field.endswith(("history[0].name", "history[0].result")):
        assert _predict(url, {"instances": [ok]}).status_code == 200


# ---------------------------------------------------------------------------------------------- bodies
DEEP = "[" * 100_000 + "]" * 100_000
NOT_JSON = [
    (DEEP.encode(), "invalid_json"),
    (('{"instances": ' + "[" * 40 + "]" * 40 + "}").encode(), "invalid_json"),
    (b'{"model": "diaggym", "prompt": "x", "temperature": NaN}', "invalid_json"),
    (b'{"model": "diaggym", "prompt": "x", "max_tokens": Infinity}', "invalid_json"),
    (b"\xff\xfe{}", "invalid_json"),
    (b"{not json", "invalid_json"),
    (b"", "invalid_json"),
    (b"[1, 2]", "invalid_request"),
    (b'"a string"', "invalid_request"),
    (b"null", "invalid_request"),
]


@pytest.mark.parametrize("route", ["predict", "completions"])
@pytest.mark.parametrize(("body", "reason"), NOT_JSON, ids=range(len(NOT_JSON)))
def test_any_body_that_is_not_the_expected_json_is_a_400(server, route, body, reason):
    url, _ = server
    path = "/v1/models/diaggym:predict" if route == "predict" else "/openai/v1/completions"
    r = httpx.post(f"{url}{path}", content=body, headers={**AUTH, "content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text[:300]
    got = r.json()["reason"] if route == "predict" else r.json()["error"]["code"]
    assert got == reason


STRICT = [
    ({"max_tokens": "12"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 12.5}, "max_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"temperature": "1"}, "temperature"),
    ({"seed": True}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -1}, "seed"),
    ({"top_p": "0.9"}, "top_p"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"max_tokens": 99_999}, "max_tokens"),
]


@pytest.mark.parametrize(("extra", "field"), STRICT, ids=[json.dumps(e) for e, _ in STRICT])
def test_completions_types_are_strict(server, extra, field):
    url, _ = server
    r = _complete(url, {"model": "diaggym", "prompt": _prompt(), **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"]
    if field == "logit_bias":
        assert "unsupported" in err["message"]
    if extra == {"max_tokens": 99_999}:
        assert str(CONTEXT) in err["message"] and "context" in err["message"]


def test_neutral_values_and_ints_for_floats_are_accepted(server):
    url, _ = server
    body = {"model": "diaggym", "prompt": _prompt(), "max_tokens": 300, "temperature": 1, "seed": 5,
            "logit_bias": {"50256": 0}, "stream": False, "n": 1, "echo": False}
    r = _complete(url, body)
    assert r.status_code == 200, r.text
    assert _complete(url, {**body, "logit_bias": {}}).status_code == 200
    r = _predict(url, {"instances": [_instance(max_tokens=CONTEXT, temperature=0)]})
    assert r.status_code == 200, r.text  # the context bounds max_tokens, not a fixed 2048
    r = _predict(url, {"instances": [_instance(max_tokens=CONTEXT + 1)]})
    assert r.status_code == 400 and r.json()["field"] == "instances[0].max_tokens" and str(CONTEXT) in r.text


# ---------------------------------------------------------------------------------------------- aliases
def test_reference_rollout_name_works_through_an_alias(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/openai/v1", api_key=TOKEN, max_retries=0)
    out = client.completions.create(model="EHRGenerator", prompt=_prompt(), max_tokens=512, temperature=1.0,
                                    stop=[SEP, "<endoftext>"])
    assert "Hemoglobin" in out.choices[0].text and out.model == "EHRGenerator"
    assert {m.id for m in client.models.list()} == {"diaggym", "EHRGenerator"}
    assert _predict(url, {"instances": [_instance()]}, name="EHRGenerator").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=_prompt(), max_tokens=8)


# ---------------------------------------------------------------------------------------------- logs
def test_each_refused_request_is_one_escaped_info_line(server):
    url, proc = server
    before = proc.log_path.read_text().count("\n")
    sent = [
        httpx.post(f"{url}/v1/models/evil%0AFORGED%20ERROR:predict", json={}, headers=AUTH, timeout=10),
        httpx.post(f"{url}/v1/models/diaggym:predict", content=DEEP.encode(), headers=AUTH, timeout=30),
        _predict(url, {"instances": [_instance(exam="CBC\nFORGED")]}),
        _complete(url, {"model": "diaggym", "prompt": "hello"}),
        _complete(url, {"model": "diaggym", "prompt": _prompt(), "max_tokens": "12"}),
        httpx.post(f"{url}/v2/repository/models/diaggym/unload", timeout=10),
        httpx.get(f"{url}/v1/models/x%0D%0AFORGED", headers=AUTH, timeout=10),
    ]
    assert all(400 <= r.status_code < 500 for r in sent), [r.status_code for r in sent]
    give_up = time.monotonic() + 10  # the request line is logged as the answer goes out: it may trail the answer
    while True:
        lines = proc.log_path.read_text().splitlines()[before:]
        ours = [ln for ln in lines if " -> 4" in ln]
        if len(ours) >= len(sent) or time.monotonic() > give_up:
            break
        time.sleep(0.05)
    time.sleep(0.2)  # anything else that would be logged for these requests
    lines = proc.log_path.read_text().splitlines()[before:]
    ours = [ln for ln in lines if " -> 4" in ln]
    assert len(ours) == len(sent), lines
    assert all(" INFO diaggym.serving: " in ln for ln in ours), ours
    assert not [ln for ln in lines if ln.startswith("FORGED") or "Traceback" in ln or " ERROR " in ln], lines
    assert any("evil\\nFORGED" in ln for ln in ours)
    assert len(lines) == len(sent), lines  # nothing else: one line per refused request


# ---------------------------------------------------------------------------------------------- baselines
def test_baseline_honours_max_tokens(server):
    url, _ = server
    pred = _predict(url, {"instances": [_instance(max_tokens=1)]}).json()["predictions"][0]
    assert pred["finish_reason"] == "length" and pred["completion_tokens"] == 1, pred
    full = _predict(url, {"instances": [_instance(max_tokens=CONTEXT)]}).json()["predictions"][0]
    assert full["finish_reason"] == "stop" and full["completion_tokens"] > 20
    cut = _predict(url, {"instances": [_instance(max_tokens=20)]}).json()["predictions"][0]
    assert cut["finish_reason"] == "length" and cut["completion_tokens"] == 20
    assert full["result"].startswith(cut["result"])  # the same draw, cut


def test_unique_unknown_exam_names_do_not_grow_memory(server):
    """300 requests with unique 300 kB exam names the engine never saw: the server's RSS stays flat."""
    import psutil

    url, proc = server
    assert proc.proc is not None
    rss = psutil.Process(proc.proc.pid).memory_info
    with httpx.Client(headers=AUTH, timeout=30) as client:

        def burst(start: int, n: int) -> None:
            for k in range(start, start + n):
                name = f"Unknown exam {k} " + "x" * 300_000
                r = client.post(f"{url}/v1/models/diaggym:predict", json={"instances": [_instance(exam=name)]})
                assert r.status_code == 200 and r.json()["predictions"][0]["result"], r.text[:200]

        burst(0, 50)  # allocator pools and caches settle
        before = rss().rss
        burst(50, 300)
        grown = rss().rss - before
    assert grown < 40e6, f"RSS grew {grown / 1e6:.0f} MB over 300 unique 300 kB names (unbounded: ~90 MB)"


def test_unknown_exam_names_are_all_counted_but_only_a_bounded_table_is_kept(demo_out):
    from diaggym.engines import SamplingParams, make_engine

    out, _ = demo_out
    engine = make_engine("marginal", cases=[c for c in load_cases(out / "cases.jsonl") if c.split == "train"])
    prompts = [_prompt(f"Unknown {k} " + "y" * 1000) for k in range(300)]
    outs = engine.generate(prompts + prompts[:5], SamplingParams(seed=1))
    assert all(o.meta.get("fallback") for o in outs)
    cap = engine.MAX_FALLBACK_NAMES
    assert engine.fallbacks == 305 and len(engine.fallback_exams) == cap
    assert sum(engine.fallback_exams.values()) + engine.fallbacks_unnamed == 305
    assert max(len(n) for n in engine.fallback_exams) <= engine.FALLBACK_NAME_CHARS


def test_a_websocket_upgrade_is_refused(server):
    import base64
    import socket

    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    key = base64.b64encode(b"0123456789abcdef").decode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /v2/health/live HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 403"), answer  # closed before the handshake: no 101 Switching Protocols
    _served(url)
