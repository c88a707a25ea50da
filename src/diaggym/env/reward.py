"""Episode reward, the reference DiagAgent decomposition with configurable weights.

reward = w_complete × (a diagnosis turn was given)
       + w_correct  × (the judge says the diagnosis is correct)
       + w_exams    × F1(requested exams, key exams)
       − exam_cost × (exams requested) − turn_penalty × (turns taken)

Reference weights 0.1 / 1.0 / 0.5 (range 0–1.6); cost and penalty are off by default.  Each part is reported
apart.  F1 of two empty lists is 1, of one empty list 0 (as the reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from diaggym.cases import Case
from diaggym.env.judges import Judge


@dataclass(frozen=True)
class RewardWeights:
    complete: float = 0.1
    correct: float = 1.0
    exams: float = 0.5
    exam_cost: float = 0.0
    turn_penalty: float = 0.0


@dataclass
class RewardParts:
    complete: float = 0.0  # 1 when a diagnosis turn was given
    correct: float = 0.0  # 1 when judged correct
    exam_f1: float = 0.0
    exams_requested: int = 0
    turns: int = 0
    judge_error: str | None = None  # the judge could not decide (counted; ``correct`` stays 0)
    total: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def exam_f1(requested: Sequence[str], key: Sequence[str], judge: Judge) -> float:
    if not requested and not key:
        return 1.0
    if not requested or not key:
        return 0.0
    hits = judge.match_exams(list(dict.fromkeys(requested)), list(dict.fromkeys(key)))
    if hits == 0:
        return 0.0
    precision = hits / len(set(requested))
    recall = hits / len(set(key))
    return 2 * precision * recall / (precision + recall)


def key_exams(case: Case, exclude_kinds: Sequence[str] = ("physical",), per_case: dict | None = None) -> list[str]:
    """The exams an ideal work-up requests: a per-case list when given, else the record's exams minus the
    excluded kinds (the physical exam is part of the presentation, not an order)."""
    if per_case and case.case_id in per_case:
        return list(per_case[case.case_id])
    return [e.name for e in case.exams if e.kind not in exclude_kinds]


def score_episode(
    case: Case,
    diagnosis: str | None,
    requested: Sequence[str],
    turns: int,
    key: Sequence[str],
    diagnosis_judge: Judge,
    exam_judge: Judge,
    weights: RewardWeights = RewardWeights(),
    primary_only: bool = True,
) -> RewardParts:
    parts = RewardParts(exams_requested=len(requested), turns=turns)
    if diagnosis is not None:
        parts.complete = 1.0
        verdict = diagnosis_judge.judge_diagnosis(diagnosis, case.final_diagnosis, primary_only)
        parts.correct = 1.0 if verdict.correct else 0.0
        parts.judge_error = verdict.error
    parts.exam_f1 = exam_f1(requested, key, exam_judge)
    parts.total = (
        weights.complete * parts.complete
        + weights.correct * parts.correct
        + weights.exams * parts.exam_f1
        - weights.exam_cost * len(requested)
        - weights.turn_penalty * turns
    )
    return parts
