"""The simulator client and HTTP episodes against real servers: ``diaggym serve`` (marginal engine) and a
scripted fault server (503s, slow answers, garbage) on 127.0.0.1; the LLM judge against a scripted chat model."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from diaggym.client import AsyncSimulatorClient, ClientError, SimulatorClient
from diaggym.env import DiagEnv, format_diagnosis, format_request
from diaggym.env.judges import LLMJudge
from diaggym.testing import diaggym_serve

pytestmark = pytest.mark.integration

TOKEN = "client-test-token"
CBC = "Complete Blood Count (CBC)"


@pytest.fixture(scope="module")
def cases(demo_cases):
    return demo_cases


@pytest.fixture(scope="module")
def server(demo_out, tmp_path_factory):
    out, _ = demo_out
    proc, url = diaggym_serve(["--engine", "marginal", "--cases", str(out)],
                              tmp_path_factory.mktemp("serve") / "marginal.log", env={"DIAGGYM_API_TOKEN": TOKEN})
    try:
        proc.wait_ready(f"{url}/v2/health/ready", timeout=120)
        yield url
    finally:
        proc.stop()


class Scripted:
    """A stdlib HTTP server on 127.0.0.1 whose answers follow a script: a list of (status, body, delay)."""

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                n = int(self.headers.get("content-length", 0))
                owner.requests.append({"path": self.path, "body": json.loads(self.rfile.read(n) or b"{}")})
                status, body, delay = owner.script.pop(0) if len(owner.script) > 1 else owner.script[0]
                time.sleep(delay)
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


OK_PREDICTION = {"predictions": [{"exam": CBC, "result": "Hemoglobin: Value: 9", "finish_reason": "stop"}]}


# ---------------------------------------------------------------------------------------------- real server
def test_predict_and_completions_routes(server, cases):
    case = next(c for c in cases if c.split == "test")
    with SimulatorClient(server, token=TOKEN) as client:
        assert client.ready()
        r = client.simulate(case.profile, case.final_diagnosis, [], CBC, seed=3)
        assert "Hemoglobin" in r.result and r.finish_reason == "stop" and r.items
        again = client.simulate(case.profile, case.final_diagnosis, [], CBC, seed=3)
        assert again.result == r.result
    with SimulatorClient(server, token=TOKEN, route="completions") as client:
        c = client.simulate(case.profile, case.final_diagnosis, [(CBC, r.result)], "Lactate", seed=1)
        assert c.result and "<SEP>" not in c.result and c.completion_tokens > 0
    with SimulatorClient(server, token="wrong") as client, pytest.raises(ClientError) as err:
        client.simulate(case.profile, case.final_diagnosis, [], CBC)
    assert err.value.reason == "http_401" and not err.value.retryable


def test_async_client_concurrent(server, cases):
    test = [c for c in cases if c.split == "test"]

    async def main():
        async with AsyncSimulatorClient(server, token=TOKEN) as client:
            return await asyncio.gather(*(client.simulate(c.profile, c.final_diagnosis, [], CBC, seed=i)
                                          for i, c in enumerate(test * 4)))

    out = asyncio.run(main())
    assert len(out) == len(test) * 4 and all("Hemoglobin" in r.result for r in out)


def test_http_episode_and_server_dying_mid_episode(demo_out, cases, tmp_path):
    """Episodes over the served simulator; then the server is killed mid-episode: the episode ends with the
    reason in its log, in bounded time, and nothing raises."""
    out, _ = demo_out
    proc, url = diaggym_serve(["--engine", "marginal", "--cases", str(out)], tmp_path / "dying.log")
    try:
        proc.wait_ready(f"{url}/v2/health/ready", timeout=120)
        env = DiagEnv(cases=cases, split="test", simulator_url=url, retries=2, timeout=5)
        env.reset(seed=0)
        r = env.step(format_request(CBC))
        assert r.info["log"][0]["source"] == "http" and "Hemoglobin" in r.observation
        proc.stop()
        t = time.perf_counter()
        r = env.step(format_request("Lactate"))
        assert time.perf_counter() - t < 10
        assert r.truncated and r.info["end_reason"] == "simulator_error"
        assert "connect" in r.info["log"][-1]["error"]
        env.reset(seed=1)  # the next episode fails the same way, still without raising
        assert env.step(format_request(CBC)).info["end_reason"] == "simulator_error"
        assert env.counters["simulator_error"] == 2
    finally:
        proc.stop()


# ---------------------------------------------------------------------------------------------- faults
def test_retries_503_then_succeeds():
    with Scripted([(503, {"error": "warming up"}, 0), (503, {"error": "warming up"}, 0), (200, OK_PREDICTION, 0)]) as s:
        client = SimulatorClient(s.url, retries=3, backoff=0.01)
        r = client.simulate("profile", "dx", [], CBC)
        assert r.result == "Hemoglobin: Value: 9" and r.attempts == 3 and len(s.requests) == 3
        assert s.requests[0]["path"] == "/v1/models/diaggym:predict"


def test_gives_up_after_bounded_retries_and_times_out():
    with Scripted([(503, {"error": "down"}, 0)]) as s:
        client = SimulatorClient(s.url, retries=2, backoff=0.01)
        with pytest.raises(ClientError) as err:
            client.simulate("p", "d", [], CBC)
        assert err.value.reason == "http_503" and len(s.requests) == 3
    with Scripted([(200, OK_PREDICTION, 3.0)]) as s:
        client = SimulatorClient(s.url, retries=1, backoff=0.01, timeout=0.5)
        t = time.perf_counter()
        with pytest.raises(ClientError) as err:
            client.simulate("p", "d", [], CBC)
        assert err.value.reason == "timeout" and time.perf_counter() - t < 3
    with Scripted([(200, "<html>proxy</html>", 0)]) as s, pytest.raises(ClientError) as err:
        SimulatorClient(s.url, retries=0).simulate("p", "d", [], CBC)
    assert err.value.reason == "bad_response"


def test_slow_and_failing_simulator_end_episodes_cleanly(cases):
    with Scripted([(503, {"error": "overloaded"}, 0)]) as s:
        env = DiagEnv(cases=cases, split="test", simulator_url=s.url, retries=1, timeout=1)
        env.reset(seed=0)
        r = env.step(format_request(CBC))
        assert r.info["end_reason"] == "simulator_error" and "http_503" in r.info["log"][0]["error"]
    with Scripted([(200, OK_PREDICTION, 2.0)]) as s:
        env = DiagEnv(cases=cases, split="test", simulator_url=s.url, retries=0, timeout=0.3)
        env.reset(seed=0)
        t = time.perf_counter()
        r = env.step(format_request(CBC))
        assert time.perf_counter() - t < 2 and "timeout" in r.info["log"][0]["error"]


# ---------------------------------------------------------------------------------------------- LLM judge
def _chat(content: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def test_llm_judge_strict_and_counted(cases):
    with Scripted([(200, _chat("Incorrect"), 0)]) as s:
        judge = LLMJudge(base_url=s.url, model="m", retries=1)
        v = judge.judge("Sepsis", "Pneumonia")
        assert v.correct is False  # the reference's `'correct' in answer.lower()` would say True
    with Scripted([(200, _chat("Correct."), 0)]) as s:
        assert LLMJudge(base_url=s.url, retries=1).judge("AKI", "Acute kidney injury").correct is True
    with Scripted([(200, _chat("It depends"), 0)]) as s:
        judge = LLMJudge(base_url=s.url, retries=2, backoff=0.01)
        v = judge.judge("AKI", "Acute kidney injury")
        assert v.correct is None and "unparseable" in v.error and judge.failures == 1 and len(s.requests) == 2
    # in an episode a judge failure is reported in the reward parts, not silently scored
    with Scripted([(503, {"error": "down"}, 0)]) as s:
        env = DiagEnv(cases=cases, split="test", judge="llm",
                      judge_kwargs={"base_url": s.url, "retries": 1, "backoff": 0.01})
        env.reset(seed=0)
        r = env.step(format_diagnosis("Sepsis"))
        parts = r.info["reward_parts"]
        assert parts["correct"] == 0.0 and "HTTP 503" in parts["judge_error"]


def test_chat_agent_plays_an_episode(cases):
    """The OpenAI-compatible chat agent speaks the protocol; a failing endpoint is an empty turn, not a crash."""
    from diaggym.env.agents import ChatAgent, run_episode

    case = next(c for c in cases if c.split == "test")
    turns = [(200, _chat(format_request(CBC)), 0), (200, _chat(format_diagnosis("Sepsis")), 0)]
    with Scripted(turns) as s:
        agent = ChatAgent(s.url, model="m", retries=0)
        env = DiagEnv(cases=cases, split="test")
        out = run_episode(env, agent, case_id=case.case_id)
        assert out["end_reason"] == "diagnosis" and out["requested"] == [CBC]
        assert s.requests[1]["body"]["messages"][-1]["content"].startswith("Here is the test result:")
        assert s.requests[0]["body"]["messages"][0]["content"].startswith(env.agent_view(case)[:40])
    with Scripted([(503, {"error": "down"}, 0)]) as s:
        out = run_episode(DiagEnv(cases=cases, split="test"), ChatAgent(s.url, model="m", retries=1), seed=0)
        assert out["end_reason"] == "format_error"
