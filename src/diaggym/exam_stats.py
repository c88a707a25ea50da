"""What the training split says about each exam and analyte: the statistics behind the baselines and metrics.

:class:`TrainingStats` holds, per exam name, an :class:`ExamStats` (kind, real result texts and
their counts, analyte lists) and, per analyte, an :class:`AnalyteStats` (units, reference ranges,
numeric values, value decimals, qualitative readings).  The baseline engines
(:mod:`diaggym.engines.baselines`) answer from it and the automatic metrics
(:mod:`diaggym.evaluation.auto`) standardise errors with it.  It is rebuilt from the cases
wherever it is needed (a pass over the training split); it is not persisted.

:func:`exam_kinds` is the one exam name → kind map that sharpens result parsing
(:class:`~diaggym.simulator.Simulator`) and labels the server's metrics.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from diaggym.cases import Case, Exam, LabItem
from diaggym.serialization import render_result

_PLAIN_NUMBER = re.compile(r"^-?\d+(?:\.(\d+))?$")


def exam_kinds(cases: Iterable[Case]) -> dict[str, str]:
    """Exam name → kind (``lab``, ``radiology``, ...); the first case that has the exam decides."""
    kinds: dict[str, str] = {}
    for case in cases:
        for exam in case.exams:
            kinds.setdefault(exam.name, exam.kind)
    return kinds


def _decimals(value: str | None, valuenum: float) -> int:
    """Decimals of a real value as written ("1.84" → 2); from the number when the text is masked ("___")."""
    m = _PLAIN_NUMBER.match(value or "")
    if m:
        return len(m.group(1) or "")
    text = repr(float(valuenum))
    return 0 if text.endswith(".0") or "e" in text else len(text.split(".", 1)[1])


def _mode(counter: Counter) -> object | None:
    """Most common key (first seen wins ties), or None when empty."""
    return counter.most_common(1)[0][0] if counter else None


@dataclass
class AnalyteStats:
    """What the training split says about one analyte of one exam."""

    n: int = 0
    units: Counter[str] = field(default_factory=Counter)
    ranges: Counter[tuple[float | None, float | None]] = field(default_factory=Counter)
    values: list[float] = field(default_factory=list)
    decimals: Counter[int] = field(default_factory=Counter)
    texts: Counter[tuple[str | None, str | None]] = field(default_factory=Counter)  # (value, comment), no number

    def add(self, item: LabItem) -> None:
        self.n += 1
        if item.unit is not None:
            self.units[item.unit] += 1
        if item.ref_low is not None or item.ref_high is not None:
            self.ranges[(item.ref_low, item.ref_high)] += 1
        if item.valuenum is not None:
            self.values.append(item.valuenum)
            self.decimals[_decimals(item.value, item.valuenum)] += 1
        else:
            self.texts[(item.value, item.comment)] += 1

    @property
    def unit(self) -> str | None:
        return _mode(self.units)  # type: ignore[return-value]

    @property
    def ref_range(self) -> tuple[float | None, float | None]:
        """Most common (ref_low, ref_high); (None, None) when no range was ever recorded."""
        return _mode(self.ranges) or (None, None)  # type: ignore[return-value]

    @property
    def is_numeric(self) -> bool:
        """True when most occurrences carry a numeric value (else the analyte is qualitative, e.g. "NEG")."""
        return bool(self.values) and len(self.values) >= sum(self.texts.values())

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def typical_decimals(self) -> int:
        return _mode(self.decimals) or 0  # type: ignore[return-value]

    @property
    def typical_text(self) -> tuple[str | None, str | None]:
        """Most common (value, comment) among occurrences without a number."""
        return _mode(self.texts) or (None, None)  # type: ignore[return-value]


@dataclass
class ExamStats:
    """What the training split says about one exam: kind, real results, analytes."""

    kind: str
    n: int = 0
    results: Counter[str] = field(default_factory=Counter)  # rendered result text → count
    panels: Counter[tuple[str, ...]] = field(default_factory=Counter)  # analyte-name list → count
    analytes: dict[str, AnalyteStats] = field(default_factory=dict)

    def add(self, exam: Exam) -> None:
        self.n += 1
        self.results[render_result(exam)] += 1
        if exam.items is not None:
            self.panels[tuple(it.name for it in exam.items)] += 1
            for it in exam.items:
                self.analytes.setdefault(it.name, AnalyteStats()).add(it)

    @property
    def typical_analytes(self) -> tuple[str, ...]:
        """The most common analyte list; empty for free-text exams."""
        return _mode(self.panels) or ()  # type: ignore[return-value]

    @property
    def is_lab(self) -> bool:
        return bool(self.panels)


@dataclass
class TrainingStats:
    """Per exam name: its :class:`ExamStats`, built from (training) cases."""

    exams: dict[str, ExamStats] = field(default_factory=dict)

    @classmethod
    def from_cases(cls, cases: Iterable[Case]) -> TrainingStats:
        exams: dict[str, ExamStats] = {}
        for case in cases:
            for exam in case.exams:
                exams.setdefault(exam.name, ExamStats(kind=exam.kind)).add(exam)
        return cls(exams)

    def get(self, exam: str) -> ExamStats | None:
        return self.exams.get(exam)

    def analyte(self, exam: str, analyte: str) -> AnalyteStats | None:
        stats = self.exams.get(exam)
        return stats.analytes.get(analyte) if stats else None

    def kind(self, exam: str) -> str | None:
        stats = self.exams.get(exam)
        return stats.kind if stats else None

    def kinds(self) -> dict[str, str]:
        """Exam name → kind; the same map as :func:`exam_kinds` of the cases these statistics come from."""
        return {name: s.kind for name, s in self.exams.items()}
