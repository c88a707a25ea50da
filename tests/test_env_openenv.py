"""The OpenEnv adapter: `diaggym rl env-server` (OpenEnv's server) against `diaggym serve`, episodes through
the client class over WebSocket sessions, two sessions at once kept apart."""

from __future__ import annotations

import asyncio
import sys

import pytest

from diaggym.cases import load_cases
from diaggym.env.protocol import format_diagnosis, format_request
from diaggym.testing import ServerProcess, diaggym_serve, free_port

pytestmark = pytest.mark.integration
CBC = "Complete Blood Count (CBC)"


@pytest.fixture(scope="module")
def servers(demo_out, tmp_path_factory):
    out, _ = demo_out
    logs = tmp_path_factory.mktemp("openenv")
    sim, sim_url = diaggym_serve(["--engine", "marginal", "--cases", str(out)], logs / "sim.log")
    port = free_port()
    env = ServerProcess([sys.executable, "-m", "diaggym.cli", "rl", "env-server", "--cases", str(out),
                         "--simulator-url", sim_url, "--host", "127.0.0.1", "--port", str(port)], logs / "env.log")
    try:
        sim.wait_ready(f"{sim_url}/v2/health/ready", timeout=120)
        env.start().wait_ready(f"http://127.0.0.1:{port}/health", timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        env.stop()
        sim.stop()


def test_episode_over_websocket_sessions(servers, demo_out):
    from diaggym.env.adapters.openenv import DiagAction, DiagGymEnvClient

    out, _ = demo_out
    test = load_cases(out / "cases.jsonl", split="test")

    async def episode(case, exams):
        async with DiagGymEnvClient(servers) as env:
            r = await env.reset(case_id=case.case_id, seed=1)
            assert r.observation.case_id == case.case_id and not r.done
            assert case.final_diagnosis.splitlines()[0] not in r.observation.text
            texts = []
            for exam in exams:
                r = await env.step(DiagAction(text=format_request(exam)))
                texts.append(r.observation.text)
            state = await env.state()
            assert state.case_id == case.case_id and state.step_count == len(exams)
            r = await env.step(DiagAction(text=format_diagnosis(case.final_diagnosis.splitlines()[0])))
            return texts, r

    async def both():
        return await asyncio.gather(episode(test[0], [CBC, "Lactate"]), episode(test[1], [CBC]))

    (texts_a, end_a), (texts_b, end_b) = asyncio.run(both())
    assert texts_a[0].startswith("Here is the test result:") and "Hemoglobin" in texts_a[0]
    assert end_a.done and end_a.observation.end_reason == "diagnosis"
    assert end_a.observation.reward_parts["correct"] == 1.0 and end_a.reward > 1.1
    assert end_b.done and end_b.observation.turn == 2  # its own session: 1 request + the diagnosis


def test_bad_turn_and_sync_client(servers):
    from diaggym.env.adapters.openenv import DiagAction, DiagGymEnvClient

    with DiagGymEnvClient(servers).sync() as env:
        r = env.reset(seed=3)
        assert r.observation.case_id and not r.done
        r = env.step(DiagAction(text="x" * 100_000))
        assert r.done and r.observation.end_reason == "format_error"
        r = env.reset(case_id="no-such-case")
        assert r.done and "not in split" in r.observation.error
