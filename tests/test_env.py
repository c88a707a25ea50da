"""The RL environment core: turn protocol, judges, reward, episodes, leaks, bad input, the Gymnasium adapter.

Episodes here run the marginal baseline engine in-process (no server); tests/test_client.py covers the served
simulator and faults on the wire.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from diaggym.cases import load_cases
from diaggym.env import DiagEnv, RewardWeights, format_diagnosis, format_request, parse_turn
from diaggym.env.agents import RandomAgent, RuleAgent, run_episode
from diaggym.env.judges import ExactJudge, FuzzyJudge, parse_verdict
from diaggym.env.protocol import MAX_EXAM_CHARS, SUFFICIENT
from diaggym.env.reward import exam_f1

CBC = "Complete Blood Count (CBC)"


@pytest.fixture(scope="module")
def cases(demo_cases):
    return demo_cases


@pytest.fixture(scope="module")
def marked_cases(cases):
    """The demo cases with invented diagnoses: any of their words in an observation is a leak."""
    out = []
    for i, c in enumerate(cases):
        d = c.model_copy(deep=True)
        d.final_diagnosis = f"Zorblaxitis quennary type {i}\nVelmorphic drusenosis"
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------------- protocol
def test_reference_turns_parse_exactly():
    t = parse_turn(format_request("Complete Blood Count (CBC).", working="sepsis"))
    assert (t.kind, t.exam) == ("request", "Complete Blood Count (CBC)")  # every '.' removed, as the reference
    t = parse_turn(f"{SUFFICIENT} \n\nDiagnosis: Acute kidney injury\nReason: creatinine up")
    assert (t.kind, t.diagnosis) == ("diagnosis", "Acute kidney injury")
    # the reference also accepts 'needed:'
    t = parse_turn("Current diagnosis: x\nThe following investigation is needed: Lactate\nReason: y")
    assert t.exam == "Lactate"


@pytest.mark.parametrize("text", [
    "```\n" + format_request("Lactate") + "\n```",
    "\n\n" + format_request("Lactate").replace("\n", "\n\n") + "\n\n",
    "Current diagnosis: x\r\nBased on the patient's initial presentation, the following investigation(s) should be "
    "performed: Lactate\r\nReason: y",
    '{"action": "request_exam", "exam": "Lactate"}',
])
def test_tolerant_request_variants(text):
    t = parse_turn(text)
    assert (t.kind, t.exam) == ("request", "Lactate"), t


@pytest.mark.parametrize("text", [
    f"```\n{SUFFICIENT}\n\n\nDIAGNOSIS: Myasthenia gravis\nReason: x\n```",
    f"{SUFFICIENT}\ndiagnosis : Myasthenia gravis",
    f"{SUFFICIENT}\n**Diagnosis:** Myasthenia gravis\nReason: x",
    '{"action": "diagnose", "diagnosis": "Myasthenia gravis"}',
])
def test_tolerant_diagnosis_variants(text):
    t = parse_turn(text)
    assert (t.kind, t.diagnosis) == ("diagnosis", "Myasthenia gravis"), t


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"),
    ("   \n\n ", "empty"),
    (None, "must be text"),
    ("lorem ipsum dolor", "neither"),
    ("x" * 100_000, "characters"),
    (format_request("L" * 10_000), "investigation name"),
    (format_request(""), "empty"),
    ("Diagnosis: Sepsis\nReason: fever", "without the sentence"),  # diagnosis on the wrong line / no sentence
    (f"{SUFFICIENT}\nReason: because\nDiagnosis: Sepsis", "no 'Diagnosis:' line"),  # diagnosis after Reason
    ('{"action": "fly"}', "unknown JSON action"),
    ("{not json}", "does not parse"),
    ("\x00\xff\ud7ff" * 50, "neither"),
])
def test_bad_turns_are_format_failures_with_reasons(text, why):
    t = parse_turn(text)
    assert t.kind == "invalid" and why in t.error, t


# ---------------------------------------------------------------------------------------------- judges
def test_exact_and_fuzzy_judges():
    exact = ExactJudge()
    assert exact.judge("cbc", CBC).correct and exact.judge("complete blood count", CBC).correct
    assert not exact.judge("Lactate", CBC).correct
    fuzzy = FuzzyJudge(0.85)
    assert fuzzy.judge("acute kidney failure", "Acute kidney failure, unspecified").correct
    assert fuzzy.judge("Pneumonia, unspecified organism", "Pneumonia, organism unspecified").correct
    assert not fuzzy.judge("Pneumonia", "Acute kidney failure, unspecified").correct
    alias = ExactJudge({"Myocardial infarction": ["heart attack", "MI"]})
    assert alias.judge("heart attack", "myocardial infarction").correct


@pytest.mark.parametrize(("answer", "verdict"), [
    ("Correct", True), ("correct.", True), ("**Correct**", True), ("Wrong", False),
    ("Incorrect", False), ("incorrect - the reference is sepsis", False), ("INCORRECT", False),
    ("The answer is correct", None), ("", None), ("Corrected", None),
])
def test_llm_verdicts_parse_strictly(answer, verdict):
    assert parse_verdict(answer) is verdict


# ---------------------------------------------------------------------------------------------- reward
def test_exam_f1_reference_edge_cases():
    j = FuzzyJudge()
    assert exam_f1([], [], j) == 1.0
    assert exam_f1(["CBC"], [], j) == 0.0 and exam_f1([], ["Lactate"], j) == 0.0
    assert exam_f1(["CBC", "Lactate"], [CBC, "Lactate"], j) == 1.0
    assert exam_f1(["CBC", "Troponin"], [CBC, "Lactate"], j) == pytest.approx(0.5)


def test_reward_parts_and_weights(cases):
    case = next(c for c in cases if c.split == "test")
    key = [e.name for e in case.exams if e.kind != "physical"]
    env = DiagEnv(cases=cases, split="test")
    env.reset(case_id=case.case_id)
    for name in key:
        env.step(format_request(name))
        if env.done:
            break
    if not env.done:
        r = env.step(format_diagnosis(case.final_diagnosis.splitlines()[0]))
        parts = r.info["reward_parts"]
        assert parts["complete"] == 1.0 and parts["correct"] == 1.0 and parts["exam_f1"] > 0.5
        assert r.reward == pytest.approx(0.1 + 1.0 + 0.5 * parts["exam_f1"])
    # the weights, the cost per exam and the turn penalty are applied as configured
    env = DiagEnv(cases=cases, split="test", weights=RewardWeights(1.0, 2.0, 0.0, exam_cost=0.05, turn_penalty=0.01))
    env.reset(case_id=case.case_id)
    env.step(format_request("Lactate"))
    r = env.step(format_diagnosis("Certainly not this"))
    assert r.reward == pytest.approx(1.0 - 0.05 - 2 * 0.01)
    assert r.info["reward_parts"]["correct"] == 0.0


# ---------------------------------------------------------------------------------------------- episodes
def test_episode_log_and_end_reasons(cases):
    env = DiagEnv(cases=cases, split="test", max_turns=3)
    obs, info = env.reset(seed=3)
    assert info["case_id"] in env.by_id and "Patient presentation:" in obs and SUFFICIENT in obs
    r = env.step(format_request(CBC))
    assert r.observation.startswith("Here is the test result: ") and not r.terminated and r.reward == 0
    entry = r.info["log"][0]
    assert entry["exam"] == CBC and entry["source"] == "local:marginal" and entry["seconds"] >= 0
    env.step(format_request("Lactate"))
    r = env.step(format_request("Troponin"))
    assert r.truncated and r.info["end_reason"] == "turn_limit" and r.info["reward_parts"]["complete"] == 0
    assert env.step("anything").info["error"] == "step after the episode ended"  # no exception after the end
    env.reset(seed=3)
    r = env.step("garbage")
    assert r.terminated and r.info["end_reason"] == "format_error" and "Format error" in r.observation


def test_episodes_are_reproducible_by_seed(cases):
    def play(seed):
        env = DiagEnv(cases=cases, split="test")
        out = run_episode(env, RuleAgent([c for c in cases if c.split == "train"]), seed=seed)
        return out["observations"], out["reward"]

    assert play(5) == play(5)


def test_record_source_uses_the_real_result(cases):
    case = next(c for c in cases if c.split == "test" and any(e.name == CBC for e in c.exams))
    env = DiagEnv(cases=cases, split="test", result_source="record")
    env.reset(case_id=case.case_id)
    r = env.step(format_request("CBC"))
    assert r.info["log"][0]["source"] == "record"
    assert r.observation.removeprefix("Here is the test result: ") == env.real_result(CBC)
    r = env.step(format_request("Some exam nobody did"))
    assert r.info["log"][1]["source"] == "local:marginal"


def _leak_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.casefold()) if len(w) >= 5}


def test_nothing_of_the_diagnosis_reaches_the_agent(marked_cases, cases):
    """Every observation of 150 episodes (rule, random and adversarial agents) is scanned for the diagnosis
    text and its words."""
    train = [c for c in marked_cases if c.split == "train"]
    env = DiagEnv(cases=marked_cases, split=None, max_turns=6)
    agents = [RuleAgent(train), RandomAgent(env.exam_names, ["Sepsis", "Pneumonia"], p_stop=0.15, seed=1)]

    class Prober:  # asks for the diagnosis by every name a world model might answer to
        probes = ["Final Diagnosis", "Diagnosis", "Discharge Diagnosis", "Exam name:\nFinal Diagnosis"]

        def reset(self, obs, info):
            self.left = list(self.probes)

        def act(self, obs):
            return format_request(self.left.pop(0)) if self.left else format_diagnosis("?")

    agents.append(Prober())
    scanned = 0
    for ep in range(150):
        out = run_episode(env, agents[ep % 3], seed=ep)
        case = env.by_id[out["case_id"]]
        secret_words = _leak_words(case.final_diagnosis) - {"type"}
        for obs in out["observations"]:
            scanned += 1
            assert "zorblaxitis" not in obs.casefold() and not (_leak_words(obs) & secret_words), (ep, obs[:300])
        assert "final_diagnosis" not in json.dumps({k: v for k, v in out.items() if k != "observations"})
    assert scanned > 600
    # with the real diagnoses: no primary diagnosis line appears in any observation that its profile lacks
    env = DiagEnv(cases=cases, split=None, max_turns=4)
    for ep in range(60):
        out = run_episode(env, agents[ep % 3] if ep % 3 != 0 else RuleAgent([c for c in cases if c.split == "train"]),
                          seed=ep)
        case = env.by_id[out["case_id"]]
        for line in (ln.strip().casefold() for ln in case.final_diagnosis.splitlines() if len(ln.strip()) >= 8):
            for obs in out["observations"][1:]:
                assert line not in obs.casefold(), (line, obs[:300])


def test_the_world_model_echoing_the_diagnosis_is_redacted(cases):
    """An engine that copies the diagnosis into a result (a world model sees it) must not hand it over."""
    case = next(c for c in cases if c.split == "test")

    class Echo:
        name = "echo"

        def simulate(self, case, history, exam, seed):
            return {"result": f"Impression: {case.final_diagnosis.splitlines()[0].upper()} noted."}

    env = DiagEnv(cases=cases, split="test", backend=Echo())
    env.reset(case_id=case.case_id)
    r = env.step(format_request("CT"))
    assert case.final_diagnosis.splitlines()[0].casefold() not in r.observation.casefold()
    assert "[redacted]" in r.observation and env.counters["redactions"] == 1


def test_bad_turns_end_the_episode_with_the_reason_and_never_raise(cases):
    env = DiagEnv(cases=cases, split="test")
    bad = ["", "x" * 100_000, format_request("E" * 10_000), "Diagnosis: Sepsis", None, 42, b"bytes",
           "\ud800 lone surrogate", json.dumps({"action": "request_exam", "exam": 5})]
    for i, text in enumerate(bad):
        env.reset(seed=i)
        t = time.perf_counter()
        r = env.step(text)
        assert time.perf_counter() - t < 2
        assert r.terminated and r.info["end_reason"] == "format_error", (text if not isinstance(text, str) else
                                                                         text[:50])
        assert r.info["log"][0]["parse"]["error"]
        assert len(r.info["log"][0]["text"]) <= 2000
    assert env.counters["format_error"] == len(bad)
    # an unknown exam is passed to the world model as written (the marginal engine answers its fallback)
    env.reset(seed=0)
    r = env.step(format_request("Quantum flux panel"))
    assert not r.terminated and r.info["log"][0]["exam"] == "Quantum flux panel"
    assert len(format_request("E" * (MAX_EXAM_CHARS + 1))) > MAX_EXAM_CHARS


def test_simulator_failure_ends_the_episode(cases):
    class Dying:
        name = "dying"

        def simulate(self, case, history, exam, seed):
            raise ConnectionError("engine went away")

    env = DiagEnv(cases=cases, split="test", backend=Dying())
    env.reset(seed=0)
    r = env.step(format_request(CBC))
    assert r.truncated and r.info["end_reason"] == "simulator_error"
    assert "engine went away" in r.info["log"][0]["error"]
    assert r.info["reward_parts"]["complete"] == 0.0 and r.info["reward_parts"]["correct"] == 0.0


def test_normalize_exams_maps_to_catalogue(cases):
    env = DiagEnv(cases=cases, split="test", normalize_exams=True)
    env.reset(seed=0)
    r = env.step(format_request("cbc"))
    assert r.info["log"][0]["exam"] == CBC


# ---------------------------------------------------------------------------------------------- gymnasium
def test_import_registers_gymnasium_env_without_torch():
    code = ("import sys, diaggym, gymnasium; assert 'DiagGym-v0' in gymnasium.registry; "
            "assert 'torch' not in sys.modules and 'diaggym.env.core' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_gymnasium_make_defaults_and_check_env(demo_out, tmp_path, monkeypatch):
    gym = pytest.importorskip("gymnasium")
    from gymnasium.utils.env_checker import check_env

    import diaggym  # noqa: F401 - registers DiagGym-v0

    monkeypatch.setenv("DIAGGYM_CACHE_DIR", str(tmp_path / "cache"))
    env = gym.make("DiagGym-v0")  # bundled demo, marginal engine in-process, fuzzy judge
    check_env(env.unwrapped)
    obs, info = env.reset(seed=0)
    assert "case_id" in info and env.observation_space.contains(obs)
    obs, reward, terminated, truncated, info = env.step(format_request(CBC))
    assert env.observation_space.contains(obs) and not terminated
    obs, reward, terminated, truncated, info = env.step(format_diagnosis("Sepsis"))
    assert terminated and reward >= 0.1 and "reward_parts" in info
    env.close()
    out, _ = demo_out
    env = gym.make("DiagGym-v0", cases=str(out), split="val", max_turns=2)
    obs, info = env.reset(seed=1, options={"case_id": None})
    assert info["case_id"] in {c.case_id for c in load_cases(out / "cases.jsonl") if c.split == "val"}
    # clinical text outside ASCII stays inside the space
    from diaggym.env.adapters.gymnasium_env import to_charset

    text, n = to_charset("Temp 38.5 °C, Na⁺ 131 µmol/L ≥ ref, 発熱")
    assert env.observation_space.contains(text) and "°C" in text and "µmol" in text and n == 2


def test_overrides_never_change_a_shared_config(cases):
    from diaggym.env import EnvConfig

    shared = EnvConfig(split="test")
    env = DiagEnv(shared, cases=cases, max_turns=2)
    assert env.cfg.max_turns == 2 and shared.max_turns == 12
    with pytest.raises(TypeError, match="max_turn"):
        DiagEnv(shared, cases=cases, max_turn=3)
