"""Automatic stand-ins for the judged metrics, named apart from them.

The paper's Similarity (0–5) and Consistency (% pass) come from a judge model.
Where none is configured these automatic scores are reported under their own
names, and they measure exactly this:

* ``auto_similarity`` (0–5) of one generated result against the real one:
  - lab results: for the real analytes, ``coverage`` = share also present in the
    generation (same name, numeric value); ``err`` = mean over those analytes of
    ``min(|generated − real| / sd, 5)`` where ``sd`` is the analyte's standard
    deviation in the training split; score = ``5 · coverage · (1 − err / 5)``;
  - free text: ``5 · max(0, cos)`` of the two sentence embeddings;
* ``auto_consistency`` of one generated chain (pass/fail): every analyte that
  appears more than once in the chain keeps its unit and moves by less than 3
  training standard deviations between appearances, and every numeric value lies
  within the training range widened by 3 standard deviations on each side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from diaggym.cases import LabItem
from diaggym.exam_stats import TrainingStats

MAX_Z = 5.0


def analyte_sd(catalog: TrainingStats, exam: str, analyte: str) -> float | None:
    a = catalog.analyte(exam, analyte)
    if a is None or len(a.values) < 2:
        return None
    mean = sum(a.values) / len(a.values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in a.values) / (len(a.values) - 1))
    return sd or None


def standardized_errors(
    catalog: TrainingStats, exam: str, real: Sequence[LabItem], gen: Sequence[LabItem]
) -> tuple[list[float], int]:
    """(capped |z| per shared numeric analyte, number of real numeric analytes)."""
    gen_by = {g.name: g for g in gen if g.valuenum is not None}
    errs: list[float] = []
    n_real = 0
    for r in real:
        if r.valuenum is None:
            continue
        n_real += 1
        g = gen_by.get(r.name)
        sd = analyte_sd(catalog, exam, r.name)
        if g is None or sd is None:
            continue
        errs.append(min(abs(g.valuenum - r.valuenum) / sd, MAX_Z))  # type: ignore[operator]
    return errs, n_real


def lab_similarity(catalog: TrainingStats, exam: str, real: Sequence[LabItem], gen: Sequence[LabItem]) -> float | None:
    errs, n_real = standardized_errors(catalog, exam, real, gen)
    if n_real == 0:
        return None
    coverage = len(errs) / n_real
    err = sum(errs) / len(errs) if errs else MAX_Z
    return 5.0 * coverage * (1 - err / MAX_Z)


def text_similarity(cos: float) -> float:
    return 5.0 * max(0.0, float(cos))


def chain_consistency(catalog: TrainingStats, chain: Sequence[tuple[str, Sequence[LabItem]]]) -> tuple[bool, list[str]]:
    """(pass, reasons for failing) for one chain of (exam name, parsed analytes)."""
    seen: dict[str, tuple[str | None, float | None, str]] = {}
    problems: list[str] = []
    for exam, items in chain:
        for it in items:
            a = catalog.analyte(exam, it.name)
            if it.valuenum is not None and a is not None and len(a.values) >= 2:
                sd = analyte_sd(catalog, exam, it.name) or 0.0
                lo, hi = min(a.values) - 3 * sd, max(a.values) + 3 * sd
                if not lo <= it.valuenum <= hi:
                    problems.append(f"implausible value for {it.name}")
            if it.name in seen:
                unit, value, first_exam = seen[it.name]
                if it.unit != unit:
                    problems.append(f"unit of {it.name} changed")
                sd = analyte_sd(catalog, exam, it.name) or analyte_sd(catalog, first_exam, it.name)
                if value is not None and it.valuenum is not None and sd and abs(it.valuenum - value) > 3 * sd:
                    problems.append(f"{it.name} jumped by more than 3 sd")
            else:
                seen[it.name] = (it.unit, it.valuenum, exam)
    return not problems, problems
