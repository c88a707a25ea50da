"""The TRL adapter against the served simulator: the class GRPOTrainer(environment_factory=...) instantiates, its
tools and reward over one episode, that TRL accepts it (tool schemas from the docstrings), and one real GRPO update
of a tiny policy whose tool calls the simulator answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from diaggym.cases import load_cases
from diaggym.env.core import EnvConfig

pytestmark = pytest.mark.integration
CBC = "Complete Blood Count (CBC)"
FIGURES = ("loss", "grad_norm", "tools/call_frequency", "rewards/DiagGymToolEnv/mean", "rewards/DiagGymToolEnv/std",
           "frac_reward_zero_std", "completions/mean_length", "step_time")


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


def _warm_up(model, prompt_ids: list[int], targets: list[list[int]], steps: int = 80) -> float:
    """Supervised warm-up of a freshly initialised policy on ``prompt_ids`` → each of ``targets`` (a tool call).

    A random tiny LM never writes a parseable tool call, so every GRPO reward would be 0, every advantage 0 and the
    gradient 0.  AdamW steps on the exact prompt TRL will render make it call request_exam with one of the target
    exams at about even odds; sampled groups then differ in reward.  Returns the last loss.
    """
    import torch

    width = max(map(len, targets))
    x = torch.tensor([prompt_ids + t + [0] * (width - len(t)) for t in targets])
    labels = torch.tensor([[-100] * len(prompt_ids) + t + [-100] * (width - len(t)) for t in targets])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A 5-step ramp and clipping bring the loss under 0.03 in ~60 steps; without them it took over 100 (and at
    # lr 1e-2 it stalled near 3).  The floor is ln 2 over the call's ~45 tokens: the exam is a coin toss.
    ramp = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ramp.step()
        opt.zero_grad()
    return loss.item()


def test_grpo_update_through_the_environment(server, demo_out, tmp_path, monkeypatch):
    """One real GRPO step: a tiny policy calls request_exam on the served simulator and the update moves it.

    The policy is our tiny Qwen2 (random weights, the demo's tokenizer) given Qwen's chat markers and TRL's bundled
    Qwen2.5 template, so TRL can render the tool schema and parse ``<tool_call>`` blocks.  After the warm-up above,
    the eight completions of one prompt request CBC (a key exam of the case: reward 0.5 × exam F1 > 0) or a
    nonsense exam (reward 0); the differing rewards give non-zero advantages, a gradient and a parameter update.
    """
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from diaggym.env.adapters.trl import DiagGymToolEnv
    from diaggym.env.reward import key_exams
    from diaggym.model.base import init_base

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    out, _ = demo_out
    train_cases = load_cases(out / "cases.jsonl", split="train")
    case = next(c for c in train_cases if CBC in key_exams(c))
    set_seed(0)
    init_base(train_cases, tmp_path / "policy", "tiny", seed=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "policy")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    tok.eos_token = "<|im_end|>"  # generation stops after the assistant turn, as with a Qwen Instruct tokenizer
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    model.resize_token_embeddings(len(tok), mean_resizing=False)

    envs: list[DiagGymToolEnv] = []
    make = DiagGymToolEnv.factory(EnvConfig(cases=str(out), split="train", simulator_url=server))

    def factory() -> DiagGymToolEnv:
        envs.append(make())
        return envs[-1]

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "A new patient."}], "case_id": case.case_id}])
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), max_steps=1, per_device_train_batch_size=8, num_generations=8,
        # 96 tokens: a call (~47) plus a short answer ("Normal.") fits, so TRL feeds that answer back and the policy
        # writes a second turn; CBC's long panel does not fit and TRL drops it from the sequence (the call stands).
        max_completion_length=96, max_tool_calling_iterations=1, temperature=1.0, beta=0.0, learning_rate=1e-3,
        use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no", seed=0,
    )
    trainer = GRPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, environment_factory=factory)
    tools = trainer._env_tools[None]
    assert [t.__name__ for t in tools] == ["diagnose", "request_exam"]  # reset/get_reward/factory are not tools

    # The prompt exactly as GRPOTrainer renders it: the row's message + reset()'s text, TRL's tool list and template.
    conv = [{"role": "user", "content": data[0]["prompt"][0]["content"] + make().reset(case_id=case.case_id)}]
    prompt_ids = tok.apply_chat_template(conversation=[conv], tools=tools, chat_template=trainer.chat_template,
                                         add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"][0]
    calls = [f'<tool_call>\n{{"name": "request_exam", "arguments": {{"exam": "{exam}"}}}}\n</tool_call><|im_end|>'
             for exam in (CBC, "Zq")]
    assert _warm_up(model, list(prompt_ids), [tok(c, add_special_tokens=False).input_ids for c in calls]) < 0.1

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    log = trainer.state.log_history[0]
    print({k: log[k] for k in FIGURES})  # in the report when an assertion fails
    assert log["tools/call_frequency"] > 0 and log["tools/failure_frequency"] == 0
    answered = [e.last_info["log"][-1] for e in envs if e.env.requested]
    assert answered and all(entry["source"] == "http" for entry in answered)
    # The served simulator's answers are what TRL put into the rollouts as tool messages.
    fed_back = [m["content"] for c in trainer._logs["completion"] for m in c if m["role"] == "tool"]
    assert fed_back and set(fed_back) <= {entry["result"] for entry in answered}
    assert log["rewards/DiagGymToolEnv/std"] > 0 and log["frac_reward_zero_std"] < 1
    assert log["grad_norm"] > 0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
