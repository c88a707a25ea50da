"""The simulator: prompts from cases, engine calls, parsed results; chains feed results back as history."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diaggym.cases import load_cases
from diaggym.engines import SamplingParams, make_engine
from diaggym.engines.base import Completion, Engine
from diaggym.serialization import case_prompts, parse_prompt, render_context
from diaggym.simulator import SimRequest, Simulator


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
    sim = Simulator(engine, {e.name: e.kind for c in train for e in c.exams})
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
