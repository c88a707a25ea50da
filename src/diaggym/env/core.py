"""The environment core: one episode = one case, turns in the reference DiagAgent protocol.

``DiagEnv.reset()`` → the agent's view (instruction + presentation: the profile and the physical exam, never
the diagnosis); ``step(text)`` → :class:`StepResult` (observation, reward, terminated, truncated, info).  The
reward comes at the end of the episode with its parts in ``info["reward_parts"]``; ``info["log"]`` holds every
turn: the text (cut to 2000 characters), its parse, the exam, the result, its source and timings.

Results come from a simulator backend: :class:`HTTPBackend` (the served simulator through
:mod:`diaggym.client`) or :class:`LocalBackend` (an engine in this process; the default is the marginal
baseline over the training split, which needs no model and no server).  With ``result_source="record"``
the real result is used when the record has the exam, the simulator otherwise.

Faults never raise out of ``step``: a simulator that fails after the client's bounded retries ends the episode
(``end_reason="simulator_error"``, the message in the log); so do unparseable turns (``format_error``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from diaggym.cases import Case, load_cases
from diaggym.env import protocol
from diaggym.env.judges import ExactJudge, Judge, make_judge
from diaggym.env.reward import RewardParts, RewardWeights, key_exams, score_episode
from diaggym.errors import InputError
from diaggym.serialization import case_events, render_profile

log = logging.getLogger("diaggym.env")

LOG_TEXT_CHARS = 2000
END_REASONS = ("diagnosis", "format_error", "turn_limit", "simulator_error")


@dataclass
class EnvConfig:
    """Everything an episode depends on.  ``cases=None`` means the bundled MIMIC-IV demo cases."""

    cases: str | None = None
    split: str | None = "test"
    simulator_url: str | None = None  # served simulator (…:8080); None = engine in-process
    route: str = "predict"  # or "completions" (the reference rollout's call)
    model_name: str = "diaggym"
    token: str | None = None
    engine: str = "marginal"  # in-process engine when there is no URL
    engine_model: str | None = None  # model folder for engine="transformers"
    max_turns: int = 12
    temperature: float = 1.0
    max_tokens: int = 512
    result_source: str = "model"  # "model" or "record" (the real result when the record has the exam)
    judge: str = "fuzzy"  # diagnosis judge: exact, fuzzy or llm
    exam_judge: str = "fuzzy"  # exam matching for F1
    judge_kwargs: dict = field(default_factory=dict)
    primary_only: bool = True  # judge against the first diagnosis line only
    weights: RewardWeights = field(default_factory=RewardWeights)
    key_exclude_kinds: tuple[str, ...] = ("physical",)
    key_exams_per_case: dict[str, list[str]] | None = None
    show_physical_exam: bool = True
    normalize_exams: bool = False  # map requested names to the catalogue's spelling (CBC → Complete Blood Count…)
    timeout: float = 60.0
    retries: int = 2
    seed: int = 0


@dataclass
class StepResult:
    observation: str
    reward: float
    terminated: bool
    truncated: bool
    info: dict


class Backend(Protocol):
    name: str

    def simulate(self, case: Case, history: list[tuple[str, str]], exam: str, seed: int) -> dict: ...


class HTTPBackend:
    """The served simulator (contract 3) through :class:`diaggym.client.SimulatorClient`."""

    name = "http"

    def __init__(self, cfg: EnvConfig) -> None:
        from diaggym.client import SimulatorClient

        assert cfg.simulator_url
        self.cfg = cfg
        self.client = SimulatorClient(cfg.simulator_url, model=cfg.model_name, route=cfg.route, token=cfg.token,
                                      timeout=cfg.timeout, retries=cfg.retries)

    def simulate(self, case: Case, history: list[tuple[str, str]], exam: str, seed: int) -> dict:
        r = self.client.simulate(case.profile, case.final_diagnosis, history, exam, seed=seed,
                                 temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens)
        return {"result": r.result, "finish_reason": r.finish_reason, "attempts": r.attempts,
                "completion_tokens": r.completion_tokens}

    def close(self) -> None:
        self.client.close()


class LocalBackend:
    """An engine in this process behind :class:`diaggym.simulator.Simulator` (thread-safe by a lock)."""

    name = "local"

    def __init__(self, cfg: EnvConfig, train_cases: list[Case]) -> None:
        from diaggym.engines import make_engine
        from diaggym.simulator import Simulator

        self.cfg = cfg
        engine = make_engine(cfg.engine, model=cfg.engine_model, cases=train_cases, seed=cfg.seed)
        self.sim = Simulator(engine)
        self.name = f"local:{cfg.engine}"
        self._lock = threading.Lock()

    def simulate(self, case: Case, history: list[tuple[str, str]], exam: str, seed: int) -> dict:
        from diaggym.engines import SamplingParams
        from diaggym.simulator import SimRequest

        params = SamplingParams(max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature, seed=seed)
        with self._lock:
            r = self.sim.simulate(SimRequest.for_case(case, exam, history), params)
        return {"result": r.result, "finish_reason": r.finish_reason, "completion_tokens": r.completion_tokens}

    def close(self) -> None:
        self.sim.engine.close()


def cache_dir() -> Path:
    base = os.environ.get("DIAGGYM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "diaggym")
    return Path(base)


_demo_lock = threading.Lock()


def demo_cases_path() -> Path:
    """The bundled MIMIC-IV demo preprocessed once into the cache (a few seconds the first time; atomic)."""
    from diaggym.catalog import data_dir
    from diaggym.preprocess import preprocess

    src = data_dir() / "mimic-iv-demo"
    out = cache_dir() / "demo-cases" / "mimic-iv"
    with _demo_lock:
        if not (out / "cases.jsonl").is_file():
            if not src.is_dir():
                raise InputError("the bundled MIMIC-IV demo tables are missing (data/mimic-iv-demo)", src)
            preprocess("mimic-iv", src, out)
    return out


def _seed_of(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "big")


class DiagEnv:
    """One environment instance runs one episode at a time; make one per concurrent episode."""

    def __init__(self, config: EnvConfig | None = None, *, cases: list[Case] | None = None,
                 backend: Backend | None = None, diagnosis_judge: Judge | None = None,
                 exam_judge: Judge | None = None, **overrides: Any) -> None:
        unknown = [k for k in overrides if k not in EnvConfig.__dataclass_fields__]
        if unknown:
            raise TypeError(f"unknown environment option(s) {unknown}")
        # a copy: environments built from one shared config (one per concurrent episode) never change each other
        cfg = dataclasses.replace(config or EnvConfig(), **overrides)
        self.cfg = cfg
        if cfg.result_source not in ("model", "record"):
            raise InputError(f"result_source must be 'model' or 'record', got {cfg.result_source!r}")
        all_cases = cases if cases is not None else load_cases(cfg.cases or demo_cases_path())
        self.cases = [c for c in all_cases if cfg.split is None or c.split == cfg.split]
        if not self.cases:
            raise InputError(f"no cases in split {cfg.split!r}", cfg.cases or "bundled demo")
        self.train_cases = [c for c in all_cases if c.split == "train"] or all_cases
        self.by_id = {c.case_id: c for c in self.cases}
        if backend is None:
            backend = HTTPBackend(cfg) if cfg.simulator_url else LocalBackend(cfg, self.train_cases)
        self.backend = backend
        self.diagnosis_judge = diagnosis_judge or make_judge(cfg.judge, **cfg.judge_kwargs)
        self.exam_judge = exam_judge or make_judge(cfg.exam_judge, **cfg.judge_kwargs)
        self.exam_names = sorted({e.name for c in self.train_cases for e in c.exams})
        self._alias = ExactJudge()
        self._rng = random.Random(cfg.seed)
        self.case: Case | None = None
        self.done = True
        self.episodes = 0
        self.counters: dict[str, int] = {r: 0 for r in END_REASONS}
        self.counters["redactions"] = 0

    # ------------------------------------------------------------------ episode
    def reset(self, seed: int | None = None, case_id: str | None = None) -> tuple[str, dict]:
        if seed is not None:
            self._rng = random.Random(seed)
        if case_id is not None:
            if case_id not in self.by_id:
                raise InputError(f"case {case_id!r} is not in split {self.cfg.split!r}")
            self.case = self.by_id[case_id]
        else:
            self.case = self._rng.choice(self.cases)
        self.episode_seed = self._rng.getrandbits(31)
        self.history: list[tuple[str, str]] = []
        self.requested: list[str] = []
        self.turns = 0
        self.log: list[dict] = []
        self.done = False
        self.end_reason: str | None = None
        self.reward_parts: RewardParts | None = None
        self.episodes += 1
        self._secrets = [ln.strip() for ln in self.case.final_diagnosis.splitlines() if len(ln.strip()) >= 4]
        obs = self.agent_view(self.case)
        return obs, {"case_id": self.case.case_id, "turn": 0, "max_turns": self.cfg.max_turns}

    def presentation(self, case: Case) -> str:
        parts = [render_profile(case.profile)]
        if self.cfg.show_physical_exam:
            pe = [f"{e.name}:\n{r}" for e, (_, r) in zip(case.exams, case_events(case), strict=True)
                  if e.kind == "physical"]
            if pe:
                parts.append("Physical examination:\n" + "\n".join(pe))
        return "\n\n".join(parts)

    def agent_view(self, case: Case) -> str:
        return f"{protocol.INSTRUCTION}\n\nPatient presentation:\n{self.presentation(case)}"

    def step(self, text: object) -> StepResult:
        if self.done or self.case is None:
            return StepResult("The episode is over; call reset().", 0.0, True, False,
                              {"error": "step after the episode ended", "end_reason": self.end_reason})
        start = time.perf_counter()
        self.turns += 1
        turn = protocol.parse_turn(text)
        entry: dict = {"turn": self.turns, "text": text[:LOG_TEXT_CHARS] if isinstance(text, str) else repr(text)[
            :LOG_TEXT_CHARS], "parse": turn.to_dict()}
        self.log.append(entry)
        if turn.kind == "invalid":
            log.info("episode %s turn %d: format error: %s", self.case.case_id, self.turns, turn.error)
            return self._finish("format_error", None, f"Format error: {turn.error}", entry, start)
        if turn.kind == "diagnosis":
            return self._finish("diagnosis", turn.diagnosis, "Diagnosis received.", entry, start)
        exam = self._exam_name(turn.exam or "")
        entry["exam"] = exam
        self.requested.append(exam)
        try:
            result, source, meta = self._result(exam)
        except Exception as err:  # noqa: BLE001 - a rollout loop must never see it; the reason is logged
            reason = f"{type(err).__name__}: {err}"
            entry["error"] = reason[:1000]
            log.warning("episode %s turn %d: simulator failed: %s", self.case.case_id, self.turns, reason[:300])
            return self._finish("simulator_error", None, "The simulator is unavailable; the episode ends.", entry,
                                start, truncated=True)
        result = self._redact(result)
        entry.update(result=result, source=source, seconds=round(time.perf_counter() - start, 4), **meta)
        self.history.append((exam, result))
        obs = protocol.format_result(result)
        if self.turns >= self.cfg.max_turns:
            return self._finish("turn_limit", None, obs, entry, start, truncated=True, timed=False)
        return StepResult(obs, 0.0, False, False, self._info())

    # ------------------------------------------------------------------ helpers
    def _exam_name(self, exam: str) -> str:
        if not self.cfg.normalize_exams:
            return exam
        for name in self.exam_names:
            if self._alias.judge(exam, name).correct:
                return name
        return exam

    def _result(self, exam: str) -> tuple[str, str, dict]:
        assert self.case is not None
        if self.cfg.result_source == "record":
            for e, (name, res) in zip(self.case.exams, case_events(self.case), strict=True):
                if self._alias.judge(exam, e.name).correct:
                    return res, "record", {"record_exam": name}
        out = self.backend.simulate(self.case, list(self.history), exam,
                                    _seed_of(self.episode_seed, self.turns, exam))
        result = out.pop("result")
        return result, self.backend.name, out

    def _redact(self, result: str) -> str:
        """A result that spells out a diagnosis line would hand the agent the answer: cut it (counted)."""
        for s in self._secrets:
            if s.casefold() in result.casefold():
                result = re.sub(re.escape(s), "[redacted]", result, flags=re.IGNORECASE)
                self.counters["redactions"] += 1
        return result

    def real_result(self, exam: str) -> str | None:
        """The record's result for ``exam`` (for the hand-play page and evaluation; never sent to the agent)."""
        if self.case is None:
            return None
        for e, (_, res) in zip(self.case.exams, case_events(self.case), strict=True):
            if self._alias.judge(exam, e.name).correct:
                return res
        return None

    def _finish(self, reason: str, diagnosis: str | None, obs: str, entry: dict, start: float,
                truncated: bool = False, timed: bool = True) -> StepResult:
        assert self.case is not None
        self.done = True
        self.end_reason = reason
        self.counters[reason] += 1
        key = key_exams(self.case, self.cfg.key_exclude_kinds, self.cfg.key_exams_per_case)
        self.reward_parts = score_episode(self.case, diagnosis, self.requested, self.turns, key,
                                          self.diagnosis_judge, self.exam_judge, self.cfg.weights,
                                          self.cfg.primary_only)
        if timed:
            entry["seconds"] = round(time.perf_counter() - start, 4)
        info = self._info()
        info["reward_parts"] = self.reward_parts.to_dict()
        return StepResult(obs, self.reward_parts.total, reason != "turn_limit" and not truncated, truncated, info)

    def _info(self) -> dict:
        assert self.case is not None
        return {"case_id": self.case.case_id, "turn": self.turns, "end_reason": self.end_reason,
                "requested": list(self.requested), "log": self.log}

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close:
            close()
