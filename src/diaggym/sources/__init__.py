"""Sources turn raw records into cases (contract 1).

Each source returns a :class:`SourceResult`: the cases it built (splits not yet
assigned), the files it read, and a :class:`FilterLog` that counts every case
and row it dropped with the reason, so the dataset card can show that
``input = kept + every exclusion`` at each step.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from diaggym.cases import Case


@dataclass
class FilterStep:
    """One filter step: ``input == kept + sum(dropped.values())`` by construction."""

    name: str
    unit: str  # "case", "row", "exam", ...
    input: int
    dropped: dict[str, int]

    @property
    def kept(self) -> int:
        return self.input - sum(self.dropped.values())

    def to_dict(self) -> dict:
        return {
            "step": self.name,
            "unit": self.unit,
            "input": self.input,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
        }


@dataclass
class FilterLog:
    """Ordered record of filter steps; every dropped unit is counted with a reason."""

    steps: list[FilterStep] = field(default_factory=list)

    def add(self, name: str, unit: str, input: int, dropped: dict[str, int] | Counter) -> FilterStep:
        dropped = {k: int(v) for k, v in dict(dropped).items() if v}
        if sum(dropped.values()) > input or any(v < 0 for v in dropped.values()):
            raise ValueError(f"filter step {name!r}: dropped {dropped} exceeds input {input}")
        step = FilterStep(name, unit, int(input), dropped)
        self.steps.append(step)
        return step

    def to_list(self) -> list[dict]:
        return [s.to_dict() for s in self.steps]


@dataclass
class SourceResult:
    """``cases`` may be a generator (streamed to the writer); ``log`` is complete once it is exhausted."""

    cases: Iterable[Case]
    inputs: list[Path]
    log: FilterLog
    source: str
    # What each kept case's parts were built from, e.g. {"final diagnosis": {"ICD long titles (...)": 156}};
    # complete once ``cases`` is exhausted.  Shown in the dataset card, so a fallback is never silent.
    provenance: dict[str, Counter] = field(default_factory=dict)
    remarks: list[str] = field(default_factory=list)  # what the card must say about this data
