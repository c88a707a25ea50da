"""verl reward function for DiagGym episodes: ``compute_score``, named by verl's ``reward.custom_reward_function``
(``path: pkg://diaggym.env.adapters.verl_reward``, ``name: compute_score``, ``reward_kwargs.interaction_config``:
the interaction YAML, so the reward scores with the interaction's own cases, judges and weights).

How verl 0.7.1 hands over the interaction's scores: the tool agent loop appends every ``generate_response`` score
to ``turn_scores`` and puts the list in the rollout's ``extra_fields``; the agent loop sends those to the reward
loop as ``tool_extra_fields``, whose naive reward manager merges them into ``extra_info`` before calling
``compute_score(data_source=, solution_str=, ground_truth=, extra_info=)``.  So ``extra_info["turn_scores"]`` is
the list and ``extra_info["num_turns"]`` is ``user turns + assistant turns + 1``.

:class:`~diaggym.env.adapters.verl.DiagGymInteraction` scores 0 until the environment ends the episode, then the
episode reward, so the **last turn score is the episode reward** when the environment ended the episode.  It did
when the interaction answered the model's last turn: ``num_turns == 2 * len(turn_scores) + 1`` (DiagGym uses no
tools).  When verl cut the rollout short (response length, ``max_assistant_turns``) the model's last turn was never
sent to the environment and the last score is a mid-episode 0; then, and when there are no turn scores at all
(verl's other reward paths do not pass them), the rollout text is scored the way the environment would have:
its exam requests and its first final diagnosis, parsed by the turn protocol, scored by the episode reward.  The
text fallback cannot see turn boundaries, so a malformed turn between valid ones is not noticed.

Nothing is silently 0: a rollout with neither turn scores nor one parsable request or diagnosis scores 0 with
``diaggym_unscored = 1`` (logged, counted in :data:`COUNTS`).  Every result has the same keys (verl stacks each
key over the batch and stores them in its non-tensor batch, hence the prefix); the numeric flags show up as
means in verl's validation metrics.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from diaggym.cases import Case, load_cases
from diaggym.env import protocol
from diaggym.env.core import DiagEnv, demo_cases_path
from diaggym.env.reward import RewardParts, key_exams, score_episode
from diaggym.errors import InputError

log = logging.getLogger("diaggym.env.verl")

SOURCES = ("interaction", "text", "none")
COUNTS: Counter[str] = Counter()  # per process: results by source, plus cut_short and unscored
_SUFFICIENT = protocol.SUFFICIENT.rstrip(".").lower()


class _NoSimulator:
    """The scoring environment's backend: scoring a transcript never asks for an exam result."""

    name = "none"

    def simulate(self, case: Case, history: list[tuple[str, str]], exam: str, seed: int) -> dict:
        raise RuntimeError("the verl reward function scores transcripts; it never simulates")


@functools.lru_cache(maxsize=8)
def scoring_env(interaction_config: str, name: str = "diaggym") -> DiagEnv:
    """A :class:`DiagEnv` with the named interaction's config (cases, split, judges, weights), without a simulator."""
    from omegaconf import OmegaConf

    from diaggym.env.adapters.verl import env_config

    doc = OmegaConf.to_container(OmegaConf.load(interaction_config), resolve=True)
    items = [i for i in (doc or {}).get("interaction") or [] if i.get("name") == name]
    if not items:
        raise InputError(f"no interaction named {name!r} in the verl interaction config", interaction_config)
    cfg = env_config(dict(items[0].get("config") or {}))
    return DiagEnv(cfg, cases=load_cases(cfg.cases or demo_cases_path()), backend=_NoSimulator())


def transcript_turns(text: str, env: DiagEnv) -> tuple[list[str], str | None, int]:
    """(requested exams, final diagnosis or None, agent turns) as the environment would have ended the episode:
    at the first final answer (a sufficiency sentence without a diagnosis ends it too) or at ``max_turns``."""
    requested: list[str] = []
    turns = 0
    lines = text.splitlines()
    for i, line in enumerate(lines):
        low = line.lower()
        if _SUFFICIENT in low:
            turn = protocol.parse_turn("\n".join(lines[i:])[:protocol.MAX_TURN_CHARS])
            return requested, turn.diagnosis if turn.kind == "diagnosis" else None, turns + 1
        if "should be performed" in low or "needed:" in low or line.lstrip().startswith("{"):
            turn = protocol.parse_turn(line)
            if turn.kind == "diagnosis":  # a one-line JSON answer
                return requested, turn.diagnosis, turns + 1
            if turn.kind == "request":
                requested.append(env._exam_name(turn.exam or ""))
                turns += 1
                if turns >= env.cfg.max_turns:
                    break
    return requested, None, turns


def score_transcript(text: str, case: Case, env: DiagEnv) -> RewardParts | None:
    """The episode reward of a rollout's text; None when it holds no parsable request or diagnosis."""
    requested, diagnosis, turns = transcript_turns(text, env)
    if not requested and diagnosis is None:
        return None
    key = key_exams(case, env.cfg.key_exclude_kinds, env.cfg.key_exams_per_case)
    return score_episode(case, diagnosis, requested, turns, key, env.diagnosis_judge, env.exam_judge,
                         env.cfg.weights, env.cfg.primary_only)


def _case(env: DiagEnv, extra_info: dict, ground_truth: Any, config: str) -> Case:
    case_id = (extra_info.get("interaction_kwargs") or {}).get("case_id")
    if case_id is None:
        raise InputError("a verl row without extra_info.interaction_kwargs.case_id cannot be scored from its text "
                         "(build rows with diaggym.env.adapters.verl.dataset_rows)")
    case = env.by_id.get(str(case_id))
    if case is None:
        raise InputError(f"case {case_id!r} is not in split {env.cfg.split!r} of the interaction's cases", config)
    if ground_truth is not None and str(ground_truth) != case.final_diagnosis:
        raise InputError(f"the row's ground truth for case {case_id!r} differs from the interaction's cases "
                         f"(dataset built from other cases?)", config)
    return case


def _result(score: float, source: str, cut_short: bool, unscored: bool = False) -> dict[str, Any]:
    COUNTS[source] += 1
    COUNTS["cut_short"] += int(cut_short)
    COUNTS["unscored"] += int(unscored)
    return {"score": float(score), "diaggym_source": source, "diaggym_cut_short": int(cut_short),
            "diaggym_unscored": int(unscored)}


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                  interaction_config: str | None = None, interaction_name: str = "diaggym",
                  **kwargs: Any) -> dict[str, Any]:
    """The episode's DiagGym reward for one verl rollout (the signature verl's reward managers call; the keyword
    arguments after ``extra_info`` come from ``reward_kwargs``, the rest verl may add are ignored)."""
    info = extra_info or {}
    raw = info.get("turn_scores")
    scores: Sequence[float] = [float(s) for s in raw] if raw is not None else []
    num_turns = info.get("num_turns")
    ended = bool(scores) and (num_turns is None or int(num_turns) == 2 * len(scores) + 1)
    if ended:
        return _result(scores[-1], "interaction", False)
    cut_short = bool(scores)
    if interaction_config is None:
        raise InputError("scoring a DiagGym rollout from its text needs the interaction config: set "
                         "reward.custom_reward_function.reward_kwargs.interaction_config")
    env = scoring_env(str(interaction_config), interaction_name)
    parts = score_transcript(solution_str or "", _case(env, info, ground_truth, str(interaction_config)), env)
    if parts is None:
        result = _result(0.0, "none", cut_short, unscored=True)
        log.warning("verl reward: a rollout with %s and no parsable exam request or diagnosis scores 0 "
                    "(%d such so far)", "a cut-short episode" if cut_short else "no turn scores", COUNTS["unscored"])
        return result
    return _result(parts.total, "text", cut_short)
