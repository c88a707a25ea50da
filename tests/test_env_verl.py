"""The verl adapter against the served simulator: a real ``verl.interactions.base.BaseInteraction`` subclass loaded
from our YAML by verl's own registry, driven the way verl's tool agent loop drives it (start, then one
``generate_response`` per model turn with the whole conversation)."""

from __future__ import annotations

import asyncio
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


def load(path: Path, **overrides):
    """The interaction as verl builds it (its registry reads the YAML and instantiates the class)."""
    from verl.interactions.utils.interaction_registry import initialize_interactions_from_config

    if overrides:
        doc = yaml.safe_load(path.read_text())
        doc["interaction"][0]["config"].update(overrides)
        path = path.with_name(f"{path.stem}-{len(overrides)}.yaml")
        path.write_text(yaml.safe_dump(doc))
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
