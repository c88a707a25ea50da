"""Agents that speak the turn protocol: rule-based, random, and an OpenAI-compatible chat model.

Every agent sees only what the environment shows it (the presentation and the results); the rule-based one
reads the chief complaint from the presentation text.  :func:`run_episode` plays one episode.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Sequence

import httpx

from diaggym.cases import Case
from diaggym.env.protocol import format_diagnosis, format_request

_CC = re.compile(r"^Chief Complaint:\s*(.+)$", re.MULTILINE)


def chief_complaint(presentation: str) -> str:
    m = _CC.search(presentation)
    return " ".join(m.group(1).casefold().split()) if m else ""


def primary_diagnosis(case: Case) -> str:
    return case.final_diagnosis.strip().splitlines()[0].strip()


class Agent:
    def reset(self, observation: str, info: dict) -> None:  # noqa: B027 - optional hook
        pass

    def act(self, observation: str) -> str:
        raise NotImplementedError


class RuleAgent(Agent):
    """Orders the ``n_exams`` most common exams for the chief complaint in training, then names the most common
    primary diagnosis for it (the overall most common ones when the complaint was never seen)."""

    def __init__(self, train_cases: Sequence[Case], n_exams: int = 4,
                 exclude_kinds: Sequence[str] = ("physical",)) -> None:
        self.n_exams = n_exams
        self.exams_by_cc: dict[str, Counter] = defaultdict(Counter)
        self.dx_by_cc: dict[str, Counter] = defaultdict(Counter)
        self.exams_all: Counter = Counter()
        self.dx_all: Counter = Counter()
        for c in train_cases:
            cc = " ".join((c.profile.chief_complaint or "").casefold().split())
            names = [e.name for e in c.exams if e.kind not in exclude_kinds]
            self.exams_by_cc[cc].update(names)
            self.exams_all.update(names)
            self.dx_by_cc[cc][primary_diagnosis(c)] += 1
            self.dx_all[primary_diagnosis(c)] += 1
        self.plan: list[str] = []
        self.diagnosis = ""

    def reset(self, observation: str, info: dict) -> None:
        cc = chief_complaint(observation)
        exams = self.exams_by_cc.get(cc) or self.exams_all
        ranked = [n for n, _ in exams.most_common()] + [n for n, _ in self.exams_all.most_common()]
        self.plan = list(dict.fromkeys(ranked))[: self.n_exams]
        dx = self.dx_by_cc.get(cc) or self.dx_all
        self.diagnosis = dx.most_common(1)[0][0] if dx else "Unknown"

    def act(self, observation: str) -> str:
        if self.plan:
            return format_request(self.plan.pop(0))
        return format_diagnosis(self.diagnosis)


class RandomAgent(Agent):
    """Requests uniformly random known exams and stops with probability ``p_stop`` per turn; random diagnosis."""

    def __init__(self, exam_names: Sequence[str], diagnoses: Sequence[str], p_stop: float = 0.2,
                 seed: int = 0) -> None:
        self.exams = list(exam_names)
        self.diagnoses = list(diagnoses)
        self.p_stop = p_stop
        self.rng = random.Random(seed)

    def act(self, observation: str) -> str:
        if self.rng.random() < self.p_stop:
            return format_diagnosis(self.rng.choice(self.diagnoses))
        return format_request(self.rng.choice(self.exams))


class ChatAgent(Agent):
    """A chat model over an OpenAI-compatible ``/chat/completions`` endpoint, prompted with the protocol's
    instruction (part of the first observation).  A failed call becomes an empty turn (a format failure the
    environment logs), never an exception in the rollout loop."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, temperature: float = 0.0,
                 max_tokens: int = 512, timeout: float = 60.0, retries: int = 2) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.model, self.temperature, self.max_tokens, self.retries = model, temperature, max_tokens, retries
        self.messages: list[dict] = []
        self.errors: list[str] = []

    def reset(self, observation: str, info: dict) -> None:
        self.messages = []

    def act(self, observation: str) -> str:
        self.messages.append({"role": "user", "content": observation})
        for attempt in range(self.retries + 1):
            try:
                r = self.http.post("/chat/completions", json={
                    "model": self.model, "messages": self.messages, "temperature": self.temperature,
                    "max_tokens": self.max_tokens})
                r.raise_for_status()
                text = r.json()["choices"][0]["message"]["content"] or ""
                self.messages.append({"role": "assistant", "content": text})
                return text
            except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as err:
                self.errors.append(f"{type(err).__name__}: {err}"[:300])
                time.sleep(0.25 * 2**attempt)
        return ""

    def close(self) -> None:
        self.http.close()


def run_episode(env, agent: Agent, seed: int | None = None, case_id: str | None = None) -> dict:
    """One episode of ``agent`` in a :class:`diaggym.env.DiagEnv`; returns the final info with the reward."""
    obs, info = env.reset(seed=seed, case_id=case_id)
    agent.reset(obs, info)
    observations = [obs]
    while True:
        r = env.step(agent.act(obs))
        obs = r.observation
        observations.append(obs)
        if r.terminated or r.truncated:
            return {**r.info, "reward": r.reward, "observations": observations}
