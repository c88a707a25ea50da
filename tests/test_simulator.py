"""The simulator: prompts from cases, engine calls, parsed results; chains feed results back as history."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from diaggym.cases import load_cases
from diaggym.engines import SamplingParams, make_engine
from diaggym.engines.base import DEFAULT_MAX_TOKENS, MAX_TEMPERATURE, Completion, Engine
from diaggym.engines.openai_compat import OpenAIEngine
from diaggym.errors import InputError
from diaggym.exam_stats import exam_kinds
from diaggym.serialization import case_events, case_prompts, parse_prompt, render_context
from diaggym.simulator import SimRequest, Simulator, history_before, pick_case


class RecordingEngine(Engine):
    """Wraps a real engine and keeps the prompts it was given."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.prompts: list[str] = []

    def _generate(self, prompts, params) -> list[Completion]:
        self.prompts.extend(prompts)
        return self.inner.generate(prompts, params)


@pytest.fixture(scope="module")
def cases(demo_out):
    return load_cases(demo_out[0])


def test_step_prompt_equals_the_case_prompt_and_result_parses(cases):
    train = [c for c in cases if c.split == "train"]
    case = next(c for c in cases if c.split == "test")
    engine = RecordingEngine(make_engine("normal", cases=train))
    sim = Simulator(engine, exam_kinds(train))
    k = next(i for i, e in enumerate(case.exams) if e.name == "Complete Blood Count (CBC)" or e.kind == "lab")
    history = [(e.name, r) for e, r in zip(case.exams[:k], [p for p in _results(case)][:k], strict=True)]
    res = sim.simulate(SimRequest.for_case(case, case.exams[k].name, history))
    assert engine.prompts[0] == case_prompts(case)[k]
    assert res.items and res.complete and res.finish_reason == "stop"


def _results(case):
    from diaggym.serialization import render_result

    return [render_result(e) for e in case.exams]


def test_chains_feed_generated_results_back_and_stay_append_only(cases):
    train = [c for c in cases if c.split == "train"]
    engine = RecordingEngine(make_engine("marginal", cases=train, seed=1))
    sim = Simulator(engine)
    chosen = [c for c in cases if c.split == "test"][:3]
    exams = [[e.name for e in c.exams][: 4 + i] for i, c in enumerate(chosen)]
    out = sim.run_chains([SimRequest.for_case(c, "") for c in chosen], exams, SamplingParams(seed=7))
    assert [len(o) for o in out] == [len(e) for e in exams]
    # Each chain's prompts: step k+1's prompt starts with step k's prompt + step k's generated result.
    for i, c in enumerate(chosen):
        context = render_context(c.profile, c.final_diagnosis)
        mine = [p for p in engine.prompts if p.startswith(context)]
        assert len(mine) == len(exams[i])
        for k in range(len(mine) - 1):
            assert mine[k + 1].startswith(mine[k] + out[i][k].result + "<SEP>")
        _, hist, name = parse_prompt(mine[-1])
        assert [h[1] for h in hist] == [r.result for r in out[i][:-1]] and name == exams[i][-1]
    again = Simulator(make_engine("marginal", cases=train, seed=1)).run_chains(
        [SimRequest.for_case(c, "") for c in chosen], exams, SamplingParams(seed=7)
    )
    assert [[r.result for r in o] for o in again] == [[r.result for r in o] for o in out]


@pytest.mark.integration
def test_simulate_cli_with_a_baseline(demo_out):
    cases_dir, _ = demo_out
    case = next(c for c in load_cases(cases_dir) if c.split == "test")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "diaggym.cli",
            "simulate",
            "--cases",
            str(cases_dir),
            "--case-id",
            case.case_id,
            "--exam",
            "Complete Blood Count (CBC)",
            "--engine",
            "normal",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout)
    assert out["exam"] == "Complete Blood Count (CBC)" and len(out["items"]) > 5 and out["complete"]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "diaggym.cli",
            "simulate",
            "--cases",
            str(cases_dir),
            "--case-id",
            "nope",
            "--exam",
            "X",
            "--engine",
            "normal",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "no case with id 'nope'" in bad.stderr


@pytest.mark.parametrize(("command", "option"), [("simulate", "--top-p"), ("evaluate", "--top-p")])
def test_bad_sampling_option_is_a_clear_error(demo_out, tmp_path, command, option):
    cases_dir, _ = demo_out
    extra = ["--exam", "X"] if command == "simulate" else ["--out", str(tmp_path / "rep")]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "diaggym.cli",
            command,
            "--cases",
            str(cases_dir),
            "--engine",
            "median",
            option,
            "0",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "bad sampling option: top_p must be in (0, 1], got 0.0" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "rep").exists()


def test_async_simulation_equals_sync_and_uses_the_given_engine_call(cases):
    train = [c for c in cases if c.split == "train"]
    chosen = [c for c in cases if c.split == "test"][:4]
    reqs = [SimRequest.for_case(c, "Complete Blood Count (CBC)", history_before(c, "Complete Blood Count (CBC)"))
            for c in chosen]
    params = [SamplingParams(seed=i) for i in range(len(reqs))]
    sim = Simulator(make_engine("marginal", cases=train, seed=3), exam_kinds(train))
    sync = [r.to_dict() for r in sim.simulate_many(reqs, params)]
    assert [r.to_dict() for r in asyncio.run(sim.asimulate_many(reqs, params))] == sync

    calls: list[tuple[list[str], list[SamplingParams]]] = []

    async def generate(prompts, plist):  # what the server passes: its batcher, timeout and metrics
        calls.append((prompts, plist))
        return await asyncio.to_thread(sim.engine.generate, prompts, plist)

    out = asyncio.run(sim.asimulate_many(reqs, SamplingParams(seed=0), generate))
    assert [p for p, _ in calls] == [[r.prompt() for r in reqs]]
    assert calls[0][1] == [SamplingParams(seed=0)] * len(reqs)  # one params per prompt
    assert all(r.items and r.complete for r in out)
    assert asyncio.run(sim.asimulate(reqs[0], params[0])).to_dict() == sync[0]


def test_history_before_is_the_real_events_up_to_the_first_occurrence(cases):
    case = next(c for c in cases if len({e.name for e in c.exams}) > 3)
    events = case_events(case)
    k = 3
    assert history_before(case, events[k][0]) == events[: next(i for i, e in enumerate(events) if e[0] == events[k][0])]
    assert history_before(case, events[0][0]) == []
    assert history_before(case, "Not An Exam Of This Case") == events


def test_pick_case_by_id_or_first_of_split(cases):
    assert pick_case(cases) == next(c for c in cases if c.split == "test")
    assert pick_case(cases, split="val") == next(c for c in cases if c.split == "val")
    assert pick_case(cases, cases[5].case_id) == cases[5]
    with pytest.raises(InputError, match="where.jsonl: no case with id 'nope'"):
        pick_case(cases, "nope", source="where.jsonl")
    with pytest.raises(InputError, match="no test-split case"):
        pick_case([c for c in cases if c.split != "test"])


def test_sampling_defaults_and_bounds_are_one_definition():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.seed) == (DEFAULT_MAX_TOKENS, 1.0, None, None)
    SamplingParams(temperature=MAX_TEMPERATURE, top_p=1.0)
    for bad in ({"temperature": MAX_TEMPERATURE + 0.1}, {"temperature": -0.1}, {"top_p": 0.0}, {"max_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    # Unset top_p is not sent at all (the server's default applies); a set one is.
    engine = OpenAIEngine("http://127.0.0.1:9/v1", "m")
    try:
        assert "top_p" not in engine._request("x", SamplingParams())
        assert engine._request("x", SamplingParams(top_p=0.9))["top_p"] == 0.9
    finally:
        engine.close()
