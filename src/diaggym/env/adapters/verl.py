"""verl adapter: ``DiagGymInteraction``, a ``verl.interactions.base.BaseInteraction`` (verl 0.7; the 0.8+ wheels
ship no ``verl.interactions``).  Configured by ``configs/verl/interaction.yaml`` through
``actor_rollout_ref.rollout.multi_turn.interaction_config_path``.

verl's tool agent loop calls ``start_interaction(request_id, **interaction_kwargs)`` with the dataset row's
``extra_info.interaction_kwargs`` (``name`` picks this interaction; ``case_id`` and ``seed`` pick the episode), then
after each model turn ``generate_response(request_id, messages, **interaction_kwargs)`` with the whole
conversation; the last assistant message is the agent's turn.  The returned text goes back to the model as the
next user message; the score lands in verl's ``turn_scores`` (0 until the last turn, then the episode reward;
its parts are in the metadata); verl trains on it through the reward function
:func:`diaggym.env.adapters.verl_reward.compute_score` (the snippet's ``reward:`` block).  The prompt itself comes
from the dataset: :func:`dataset_rows` builds rows whose prompt is the environment's agent view.

verl never calls ``finalize_interaction`` and abandons episodes it cuts short (response length, its own turn
caps) without a word, so the interaction cleans up itself: an episode's state is dropped the moment it ends,
and at most ``max_live_episodes`` are kept open; starting one more drops the oldest (counted in
:attr:`DiagGymInteraction.counters` and logged).  Environments are pooled and share one simulator backend and
judges; ``step`` (a blocking HTTP call) runs in a worker thread so concurrent rollouts don't stall verl's loop.
Nothing here raises into a rollout after the start: an unknown or finished instance answers with a sentence,
``should_terminate=True`` and the reason in the metadata.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from typing import Any

from verl.interactions.base import BaseInteraction

from diaggym.cases import load_cases
from diaggym.env.core import DiagEnv, EnvConfig, demo_cases_path
from diaggym.env.reward import RewardWeights
from diaggym.errors import InputError

log = logging.getLogger("diaggym.env.verl")

# the interaction's own options; every other config key must be an EnvConfig field
OWN_KEYS = ("name", "max_live_episodes")
DEFAULT_MAX_LIVE = 4096
# ended episodes' rewards kept for calculate_score (bounded like the live episodes)
SCORES_KEPT = 4096


def env_config(config: dict[str, Any]) -> EnvConfig:
    """An :class:`EnvConfig` from the interaction's config dict (the YAML's ``config:`` block)."""
    fields = EnvConfig.__dataclass_fields__
    unknown = sorted(k for k in config if k not in fields and k not in OWN_KEYS)
    if unknown:
        raise InputError(f"unknown DiagGym interaction option(s) {unknown}; allowed: {sorted(fields)} and "
                         f"{list(OWN_KEYS)}")
    kw = {k: v for k, v in config.items() if k in fields}
    if isinstance(kw.get("weights"), dict):
        kw["weights"] = RewardWeights(**kw["weights"])
    if "key_exclude_kinds" in kw:
        kw["key_exclude_kinds"] = tuple(kw["key_exclude_kinds"])
    return EnvConfig(**kw)


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a multimodal content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


class DiagGymInteraction(BaseInteraction):
    """One object serves every concurrent rollout of a verl worker; episodes are keyed by instance id."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.cfg = env_config(config)
        self.max_live = int(config.get("max_live_episodes", DEFAULT_MAX_LIVE))
        if self.max_live < 1:
            raise InputError(f"max_live_episodes must be at least 1, got {self.max_live}")
        self.cases = load_cases(self.cfg.cases or demo_cases_path())
        self._first = DiagEnv(self.cfg, cases=self.cases)  # owns the shared backend and judges
        self._pool: list[DiagEnv] = [self._first]
        self._live: OrderedDict[str, DiagEnv] = OrderedDict()
        self._scores: OrderedDict[str, float] = OrderedDict()
        self._stepping: set[str] = set()  # instances with a step running in a worker thread
        self.counters = {"started": 0, "ended": 0, "evicted": 0, "finalized_open": 0, "unknown_instance": 0}

    # ------------------------------------------------------------------ pool
    def _take(self) -> DiagEnv:
        if self._pool:
            return self._pool.pop()
        f = self._first
        return DiagEnv(self.cfg, cases=self.cases, backend=f.backend, diagnosis_judge=f.diagnosis_judge,
                       exam_judge=f.exam_judge)

    def _release(self, instance_id: str) -> None:
        env = self._live.pop(instance_id, None)
        # an environment still stepping (its episode dropped meanwhile) is not reused: a reset would race the step
        if env is not None and instance_id not in self._stepping and len(self._pool) < self.max_live:
            self._pool.append(env)

    @property
    def live(self) -> int:
        """Episodes started and not yet ended (what this object holds per episode)."""
        return len(self._live)

    # ------------------------------------------------------------------ verl API
    async def start_interaction(self, instance_id: str | None = None, case_id: str | None = None,
                                seed: int | None = None, **kwargs: Any) -> str:
        """Open an episode on ``case_id`` (drawn when absent); an unknown case raises :class:`InputError`."""
        instance_id = instance_id or uuid.uuid4().hex
        env = self._take()
        try:  # first, so that a bad row (unknown case) drops no open episode
            env.reset(seed=int(seed) if seed is not None else None,
                      case_id=str(case_id) if case_id is not None else None)
        except Exception:
            self._pool.append(env)
            raise
        if instance_id in self._live:  # a reused id restarts its episode; the old one is counted as dropped
            self.counters["evicted"] += 1
            self._release(instance_id)
        while len(self._live) >= self.max_live:
            old = next(iter(self._live))
            self.counters["evicted"] += 1
            log.warning("verl interaction: %d episodes open (max_live_episodes); dropping the oldest, %s "
                        "(%d dropped so far)", len(self._live), old, self.counters["evicted"])
            self._release(old)
        self._live[instance_id] = env
        self._scores.pop(instance_id, None)
        self.counters["started"] += 1
        return instance_id

    async def generate_response(self, instance_id: str, messages: list[dict[str, Any]],
                                **kwargs: Any) -> tuple[bool, str, float, dict[str, Any]]:
        """Step the episode with the last assistant message: (done, observation, turn reward, metadata)."""
        env = self._live.get(instance_id)
        if env is None:
            self.counters["unknown_instance"] += 1
            return True, "The episode is over.", 0.0, {"error": f"no open episode {instance_id!r} (never "
                                                                f"started, already ended, or dropped)"}
        text = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "assistant"), "")
        self._stepping.add(instance_id)
        try:
            r = await asyncio.to_thread(env.step, text)
        finally:
            self._stepping.discard(instance_id)
        done = r.terminated or r.truncated
        meta: dict[str, Any] = {k: r.info.get(k) for k in ("case_id", "turn", "end_reason")}
        last = r.info["log"][-1] if r.info.get("log") else {}
        meta.update({k: last[k] for k in ("exam", "source", "error") if k in last})
        if done:
            meta["reward_parts"] = r.info["reward_parts"]
        if done and instance_id in self._live:  # (not when the episode was dropped during the step)
            self._scores[instance_id] = float(r.reward)
            while len(self._scores) > SCORES_KEPT:
                self._scores.popitem(last=False)
            self.counters["ended"] += 1
            self._release(instance_id)  # cleaned up here: verl never calls finalize_interaction
        return done, r.observation, float(r.reward), meta

    async def calculate_score(self, instance_id: str | None = None, **kwargs: Any) -> float:
        """The episode's reward once it ended (kept for the last few thousand); 0 while open or unknown."""
        return self._scores.get(instance_id, 0.0) if instance_id is not None else 0.0

    async def finalize_interaction(self, instance_id: str | None = None, **kwargs: Any) -> None:
        """Drop the episode's state (an open one is counted as ``finalized_open``)."""
        if instance_id is None:
            return
        if instance_id in self._live:
            self.counters["finalized_open"] += 1
            self._release(instance_id)
        self._scores.pop(instance_id, None)

    def close(self) -> None:
        """Close the shared simulator backend."""
        self._first.close()


def dataset_rows(config: dict[str, Any], name: str = "diaggym") -> list[dict[str, Any]]:
    """verl dataset rows, one per case of the configured split: the agent view as the prompt, the case in
    ``extra_info.interaction_kwargs`` (write them to parquet for ``data.train_files``)."""
    cfg = env_config(config)
    cases = load_cases(cfg.cases or demo_cases_path())
    env = DiagEnv(cfg, cases=cases)  # only renders prompts (an HTTP backend connects on first use)
    rows = [{"data_source": "diaggym", "agent_name": "tool_agent",
             "prompt": [{"role": "user", "content": env.agent_view(c)}],
             "reward_model": {"style": "interaction", "ground_truth": c.final_diagnosis},
             "extra_info": {"index": i, "interaction_kwargs": {"name": name, "case_id": c.case_id}}}
            for i, c in enumerate(env.cases)]
    env.close()
    return rows
