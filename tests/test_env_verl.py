"""The verl adapter against the served simulator: a real ``verl.interactions.base.BaseInteraction`` subclass loaded
from our YAML by verl's own registry, driven the way verl's tool agent loop drives it (start, then one
``generate_response`` per model turn with the whole conversation); and the reward function verl trains on, run by
verl's own agent loop and reward loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from diaggym.errors import InputError

pytestmark = pytest.mark.integration
CBC = "Complete Blood Count (CBC)"
SNIPPET = Path(__file__).resolve().parents[1] / "configs" / "verl" / "interaction.yaml"


@pytest.fixture(scope="module")
def server(marginal_simulator):
    return marginal_simulator


@pytest.fixture(scope="module")
def interaction_config(server, demo_out, tmp_path_factory) -> Path:
    """The shipped snippet pointed at the test's cases and simulator (everything else as shipped)."""
    out, _ = demo_out
    doc = yaml.safe_load(SNIPPET.read_text())
    doc["interaction"][0]["config"].update(cases=str(out), split="test", simulator_url=server)
    path = tmp_path_factory.mktemp("verl") / "interaction.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def with_options(path: Path, **overrides) -> Path:
    """A copy of the interaction YAML with ``overrides`` in its config."""
    doc = yaml.safe_load(path.read_text())
    doc["interaction"][0]["config"].update(overrides)
    path = path.with_name(f"{path.stem}-{'-'.join(sorted(overrides))}.yaml")
    path.write_text(yaml.safe_dump(doc))
    return path


def load(path: Path, **overrides):
    """The interaction as verl builds it (its registry reads the YAML and instantiates the class)."""
    from verl.interactions.utils.interaction_registry import initialize_interactions_from_config

    if overrides:
        path = with_options(path, **overrides)
    return initialize_interactions_from_config(str(path))["diaggym"]


def turn(messages: list[dict], text: str) -> list[dict]:
    return [*messages, {"role": "assistant", "content": text}]


def test_snippet_loads_in_verl(interaction_config):
    from verl.interactions.base import BaseInteraction

    doc = yaml.safe_load(SNIPPET.read_text())
    assert doc["interaction"][0]["class_name"] == "diaggym.env.adapters.verl.DiagGymInteraction"
    it = load(interaction_config)
    assert isinstance(it, BaseInteraction) and type(it).__name__ == "DiagGymInteraction"
    assert it.name == "diaggym" and it.cfg.simulator_url and it.max_live == 4096
    with pytest.raises(InputError, match="max_turn"):
        load(interaction_config, max_turn=3)  # a misspelt option is refused by name


def test_episode_through_verl_calls(interaction_config):
    from diaggym.env.adapters.verl import dataset_rows
    from diaggym.env.protocol import format_diagnosis, format_request

    it = load(interaction_config)
    rows = dataset_rows(it.config)
    row = rows[0]
    kwargs = row["extra_info"]["interaction_kwargs"]
    case = it._first.by_id[kwargs["case_id"]]
    assert kwargs["name"] == "diaggym" and len(rows) == len(it._first.cases)
    assert case.final_diagnosis.splitlines()[0] not in row["prompt"][0]["content"]

    async def episode():
        iid = await it.start_interaction("req-1", **kwargs)
        assert iid == "req-1" and it.live == 1
        msgs = turn(row["prompt"], format_request(CBC))
        done, obs, score, meta = await it.generate_response(iid, msgs, **kwargs)
        assert not done and score == 0.0 and "Hemoglobin" in obs
        assert meta["exam"] == CBC and meta["source"] == "http" and meta["turn"] == 1
        msgs = turn([*msgs, {"role": "user", "content": obs}], format_diagnosis(case.final_diagnosis.splitlines()[0]))
        done, obs, score, meta = await it.generate_response(iid, msgs, **kwargs)
        assert done and obs == "Diagnosis received." and meta["end_reason"] == "diagnosis"
        parts = meta["reward_parts"]
        assert parts["correct"] == 1.0 and score == pytest.approx(1.1 + 0.5 * parts["exam_f1"])
        assert it.live == 0 and it._pool  # cleaned by the interaction itself, environment back in the pool
        assert await it.calculate_score(iid) == score
        again = await it.generate_response(iid, msgs, **kwargs)  # a finished episode never raises
        assert again[0] is True and "error" in again[3] and it.counters["unknown_instance"] == 1
        await it.finalize_interaction(iid)
        assert await it.calculate_score(iid) == 0.0

    asyncio.run(episode())
    assert it.counters["started"] == 1 and it.counters["ended"] == 1
    it.close()


def test_bad_turn_concurrency_and_cap(interaction_config):
    from diaggym.env.protocol import format_request

    it = load(interaction_config, max_live_episodes=2)
    a, b = sorted(it._first.by_id)[:2]

    async def run():
        await asyncio.gather(it.start_interaction("a", name="diaggym", case_id=a, seed=1),
                             it.start_interaction("b", name="diaggym", case_id=b, seed=2))
        assert it.live == 2
        ra, rb = await asyncio.gather(
            it.generate_response("a", [{"role": "assistant", "content": "I think it is the flu, maybe."}]),
            it.generate_response("b", [{"role": "assistant", "content": format_request(CBC)}]))
        assert ra[0] is True and ra[3]["end_reason"] == "format_error" and ra[1].startswith("Format error")
        assert ra[3]["reward_parts"]["complete"] == 0.0 and ra[3]["case_id"] == a
        assert rb[0] is False and rb[3]["case_id"] == b and "Hemoglobin" in rb[1]
        assert it.live == 1  # the ended one is gone, the open one kept
        await it.start_interaction("c", case_id=a)
        await it.start_interaction("d", case_id=a)  # over the cap of 2: the oldest open episode ("b") is dropped
        assert it.live == 2 and it.counters["evicted"] == 1
        assert (await it.generate_response("b", []))[3]["error"].startswith("no open episode")
        with pytest.raises(InputError, match="not-a-case"):
            await it.start_interaction("e", case_id="not-a-case")
        assert it.live == 2
        # an episode dropped while its step runs: the step still answers, its environment is not reused meanwhile
        x_env = it._live["c"]
        task = asyncio.create_task(it.generate_response("c", [{"role": "assistant", "content": format_request(CBC)}]))
        await asyncio.sleep(0)  # the task is now inside its worker-thread step
        await it.start_interaction("f", case_id=b)
        assert "c" not in it._live and it.counters["evicted"] == 2
        assert x_env not in it._pool and all(e is not x_env for e in it._live.values())
        done, obs, _, meta = await task
        assert not done and "Hemoglobin" in obs and meta["case_id"] == a

    asyncio.run(run())
    it.close()


# ---------------------------------------------------------------------------------------------------- reward
def verl_model_dir(root: Path, texts: list[str]) -> Path:
    """What verl loads for ``actor_rollout_ref.model.path`` on CPU: a byte-level tokenizer trained on ``texts`` with
    a chat template, and a Qwen2 config (no weights: the policy's turns are scripted)."""
    from transformers import Qwen2Config

    from diaggym.model.base import train_tokenizer

    tok = train_tokenizer(texts, 600)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(root)
    Qwen2Config(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=32, eos_token_id=tok.eos_token_id, architectures=["Qwen2ForCausalLM"]
                ).save_pretrained(root)
    return root


def verl_config(overrides: list[str]):
    """verl's own ppo_trainer config composed by Hydra with ``overrides``, migrated as verl's main_ppo does."""
    import os

    import verl
    from hydra import compose, initialize_config_dir
    from verl.experimental.reward_loop.reward_loop import migrate_legacy_reward_impl

    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"),
                               version_base=None):
        return migrate_legacy_reward_impl(compose(config_name="ppo_trainer", overrides=overrides))


def reward_overrides(interaction_yaml: Path) -> list[str]:
    """The snippet's ``reward:`` block as the command-line overrides its comment gives."""
    fn = yaml.safe_load(SNIPPET.read_text())["reward"]["custom_reward_function"]
    assert set(fn["reward_kwargs"]) == {"interaction_config"}
    return [f"reward.custom_reward_function.path={fn['path']}", f"reward.custom_reward_function.name={fn['name']}",
            f"+reward.custom_reward_function.reward_kwargs.interaction_config={interaction_yaml}"]


async def played(it, case_id: str, turns: list[str]) -> float:
    """The reward the interaction itself gives ``turns`` on ``case_id`` (the last one must end the episode)."""
    iid = await it.start_interaction(None, name="diaggym", case_id=case_id)
    msgs: list[dict] = []
    for t in turns:
        msgs = turn(msgs, t)
        done, _, score, _ = await it.generate_response(iid, msgs)
    assert done
    return score


def test_reward_through_verl_agent_loop_and_reward_loop(interaction_config, tmp_path):
    """verl's own AgentLoopWorker (tool agent loop + our interaction + the served simulator) and its own
    RewardLoopWorker (naive reward manager loading ``compute_score`` from the snippet's reward block) on a batch of
    five dataset rows.  Only the LLM server is scripted (it returns fixed turns) and Ray's actor call is a direct
    await.  Rows: solved; format error; cut short by max_assistant_turns after three requests; cut short with the
    diagnosis unanswered; first turn over the response length."""
    import numpy as np
    from verl import DataProto
    from verl.experimental.agent_loop import AgentLoopWorker
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.workers.rollout.replica import TokenOutput

    from diaggym.env.adapters.verl import dataset_rows
    from diaggym.env.protocol import format_diagnosis, format_request
    from diaggym.env.reward import key_exams

    it = load(interaction_config)
    rows = dataset_rows(it.config)[:5]
    cases = [it._first.by_id[r["extra_info"]["interaction_kwargs"]["case_id"]] for r in rows]
    keys = [key_exams(c) for c in cases]
    assert all(len(k) >= 3 for k in keys)
    dx = [format_diagnosis(c.final_diagnosis.splitlines()[0]) for c in cases]
    model = verl_model_dir(tmp_path / "model", [r["prompt"][0]["content"] for r in rows])
    cfg = verl_config([
        f"actor_rollout_ref.model.path={model}", "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.multi_turn.enable=true",
        f"actor_rollout_ref.rollout.multi_turn.interaction_config_path={interaction_config}",
        "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=3",
        "actor_rollout_ref.rollout.prompt_length=4096", "actor_rollout_ref.rollout.response_length=4096",
        *reward_overrides(interaction_config)])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    too_long = tok.encode("x ") * 2100  # over response_length=4096 in the first turn
    scripts = [[format_request(keys[0][0]), dx[0]],
               ["I think it is the flu."],
               [format_request(k) for k in keys[2][:3]],
               [format_request(keys[3][0]), format_request(keys[3][1]), dx[3]],
               [too_long]]

    class ScriptedLLM:  # stands in for verl's vLLM/SGLang server manager: the turns of the row whose prompt it sees
        calls: dict[str, list[int]] = {}

        async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, video_data=None):
            if request_id not in self.calls:
                text = tok.decode(prompt_ids)
                row = [i for i, r in enumerate(rows) if r["prompt"][0]["content"] in text]
                assert len(row) == 1
                self.calls[request_id] = [row[0], 0]
            row, n = self.calls[request_id]
            self.calls[request_id][1] += 1
            t = scripts[row][n]
            return TokenOutput(token_ids=t if isinstance(t, list) else tok.encode(t + "<|im_end|>"))

    class Worker(AgentLoopWorker):
        server_manager = ScriptedLLM()

    class Handle:  # a Ray actor handle's ``.compute_score.remote(data)``, awaited in this process
        def __init__(self, worker):
            self.compute_score = type("Method", (), {"remote": staticmethod(worker.compute_score)})

    batch = DataProto.from_single_dict({
        "raw_prompt": np.array([r["prompt"] for r in rows], dtype=object),
        **{k: np.array([r[k] for r in rows], dtype=object)
           for k in ("agent_name", "data_source", "reward_model", "extra_info")}})

    async def rollout():  # both workers made inside the running loop, as in their Ray actors
        worker = Worker(cfg, servers=[], load_balancer_handle=None,
                        reward_loop_worker_handles=[Handle(RewardLoopWorker(cfg))])
        return await worker.generate_sequences(batch)

    out = asyncio.run(rollout())
    nt = out.non_tensor_batch
    rm = out.batch["rm_scores"].sum(-1).tolist()
    turn_scores = [list(t) for t in nt["turn_scores"]]
    assert nt["__num_turns__"].tolist() == [5, 3, 6, 6, 2]
    assert list(nt["diaggym_source"]) == ["interaction", "interaction", "text", "text", "none"]
    assert nt["diaggym_cut_short"].tolist() == [0, 0, 1, 1, 0] and nt["diaggym_unscored"].tolist() == [0, 0, 0, 0, 1]
    assert rm == pytest.approx(nt["score"].tolist(), abs=1e-6)
    # ended by the environment: the reward is the last turn score
    assert turn_scores[0][0] == 0.0 and turn_scores[0][1] >= 1.1 and rm[0] == pytest.approx(turn_scores[0][1])
    assert len(turn_scores[1]) == 1 and rm[1] == pytest.approx(turn_scores[1][0])
    # cut short: scored from the text, the same reward as the environment gives those turns
    assert turn_scores[2] == [0.0, 0.0] and turn_scores[3] == [0.0, 0.0]
    env_c = asyncio.run(played(it, cases[2].case_id, scripts[2] + ["no idea"]))  # ends it: turn_penalty is 0
    env_d = asyncio.run(played(it, cases[3].case_id, scripts[3]))
    assert rm[2] == pytest.approx(env_c, abs=1e-6) and 0 < rm[2] < 0.5
    assert rm[3] == pytest.approx(env_d, abs=1e-6) and rm[3] >= 1.1
    assert turn_scores[4] == [] and rm[4] == 0.0  # nothing to score: 0, flagged
    it.close()


def test_reward_function_as_verl_calls_it(interaction_config, tmp_path):
    """``compute_score`` with the keyword arguments verl's reward manager passes (``reward_kwargs`` merged in)."""
    from functools import partial

    from verl.trainer.ppo.reward import get_custom_reward_fn

    from diaggym.env.adapters import verl_reward
    from diaggym.env.adapters.verl import dataset_rows
    from diaggym.env.protocol import format_diagnosis, format_request
    from diaggym.env.reward import key_exams

    fn = get_custom_reward_fn(verl_config(reward_overrides(interaction_config)))
    assert isinstance(fn, partial) and fn.args[0] is verl_reward.compute_score
    it = load(interaction_config)
    row = dataset_rows(it.config)[0]
    case = it._first.by_id[row["extra_info"]["interaction_kwargs"]["case_id"]]
    key = key_exams(case)
    dx = case.final_diagnosis.splitlines()[0]

    def call(text: str, extra: dict | None = None, ground_truth: str = case.final_diagnosis, f=fn) -> dict:
        return f(data_source="diaggym", solution_str=text, ground_truth=ground_truth,
                 extra_info={**row["extra_info"], "num_turns": None, "rollout_reward_scores": {}, **(extra or {})})

    results = []
    # turn scores of an ended episode: the last one, whatever the text
    results.append(r := call("", {"turn_scores": [0.0, 0.0, 1.25], "num_turns": 7}))
    assert r["score"] == 1.25 and r["diaggym_source"] == "interaction"
    # no turn scores (verl's batch reward paths): the whole transcript, observations included
    transcript = "\n".join([format_request(key[0]), "user", "Here is the test result: Hemoglobin 9.1", "assistant",
                            format_request(key[1]), "user", "Here is the test result: normal", "assistant",
                            format_diagnosis(dx), "user", "Diagnosis received."])
    env_score = asyncio.run(played(it, case.case_id, [format_request(key[0]), format_request(key[1]),
                                                      format_diagnosis(dx)]))
    results.append(r := call(transcript))
    assert r["diaggym_source"] == "text" and r["score"] == pytest.approx(env_score) and r["score"] >= 1.1
    # a JSON final answer counts; a wrong diagnosis gets no 'correct' part
    results.append(r := call(json.dumps({"action": "diagnose", "diagnosis": dx})))
    assert r["score"] >= 1.1
    results.append(r := call(format_diagnosis("Sprained ankle")))
    assert 0.1 <= r["score"] < 1.0
    # the environment's turn limit: with max_turns=2 a diagnosis after two requests is never read
    limited = partial(verl_reward.compute_score, interaction_config=str(with_options(interaction_config, max_turns=2)))
    results.append(r := call(transcript, f=limited))
    assert r["diaggym_source"] == "text" and r["score"] < 1.0
    # nothing parsable and no scores: 0, flagged and counted
    before = verl_reward.COUNTS["unscored"]
    results.append(r := call("I would rather not say."))
    assert r["score"] == 0.0 and r["diaggym_unscored"] == 1 and verl_reward.COUNTS["unscored"] == before + 1
    assert len({tuple(sorted(r)) for r in results}) == 1  # verl stacks every key over the batch
    # misconfiguration is loud: no config, a case outside it, a dataset from other cases
    with pytest.raises(InputError, match="reward_kwargs.interaction_config"):
        verl_reward.compute_score("diaggym", "text", case.final_diagnosis, extra_info=row["extra_info"])
    with pytest.raises(InputError, match="not-a-case"):
        call("text", {"interaction_kwargs": {"name": "diaggym", "case_id": "not-a-case"}})
    with pytest.raises(InputError, match="ground truth"):
        call("text", ground_truth="Something else")
    it.close()
