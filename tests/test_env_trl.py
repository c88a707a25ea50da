"""The TRL adapter against the served simulator: the class GRPOTrainer(environment_factory=...) instantiates, its
tools and reward over one episode, and that TRL accepts it (tool schemas from the docstrings)."""

from __future__ import annotations

import pytest

from diaggym.cases import load_cases
from diaggym.env.core import EnvConfig

pytestmark = pytest.mark.integration
CBC = "Complete Blood Count (CBC)"


@pytest.fixture(scope="module")
def server(marginal_simulator):
    return marginal_simulator


def test_tool_env_episode(server, demo_out):
    from diaggym.env.adapters.trl import DiagGymToolEnv

    out, _ = demo_out
    make = DiagGymToolEnv.factory(EnvConfig(cases=str(out), split="test", simulator_url=server))
    env = make()
    case = load_cases(out / "cases.jsonl", split="test")[0]
    prompt = env.reset(case_id=case.case_id, prompt="ignored")
    assert "request_exam" in prompt and "Patient presentation:" in prompt
    assert case.final_diagnosis.splitlines()[0] not in prompt
    result = env.request_exam(CBC)
    assert "Hemoglobin" in result and env.last_info["log"][0]["source"] == "http"
    assert env.get_reward() > 0  # an open episode scores its exams
    assert env.diagnose(case.final_diagnosis.splitlines()[0]) == "Diagnosis received."
    assert env.get_reward() == pytest.approx(1.1 + 0.5 * env.last_info["reward_parts"]["exam_f1"])
    assert env.request_exam("Lactate").startswith("The episode is over")  # never raises after the end


def test_trl_reads_the_tools(server, demo_out):
    """TRL builds the tool schema from the public methods' signatures and docstrings, as GRPOTrainer does."""
    from transformers.utils import get_json_schema

    from diaggym.env.adapters.trl import DiagGymToolEnv

    out, _ = demo_out
    env = DiagGymToolEnv.factory(EnvConfig(cases=str(out), split="test", simulator_url=server))()
    schema = get_json_schema(env.request_exam)["function"]
    assert schema["name"] == "request_exam" and schema["parameters"]["required"] == ["exam"]
    assert "investigation" in schema["parameters"]["properties"]["exam"]["description"]
    assert get_json_schema(env.diagnose)["function"]["parameters"]["required"] == ["diagnosis"]
