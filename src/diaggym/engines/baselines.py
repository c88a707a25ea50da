"""Baseline engines: what a world model has to beat, built from the training split alone.

The reference work compares DiagGym with (a) *normal readings*, what rule-based
patient simulators answer for a test that is not in the record, and (b) *marginal
sampling*, a random real result of the same exam.  A third baseline, the training
*median* of every analyte, is the strongest unconditional point predictor and a
useful floor for numeric error metrics.  None of them looks at the patient: they
read only the requested exam name from the prompt (:func:`serialization.parse_prompt`).

Everything they need is condensed into an :class:`ExamCatalog` (per exam: kind, real
result texts, typical analyte list; per analyte: units, reference ranges, numeric
values, value decimals).  The catalog saves to JSON so that a server can carry it
without the cases.

Because the baselines implement :class:`~diaggym.engines.base.Engine`, the evaluator
and the server treat them exactly like the world model: same prompts, same
completions, same diaggym-v1 text (built with :func:`serialization.render_result`,
so it parses back with :func:`serialization.parse_result`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import statistics
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from diaggym.atomic import atomic_file
from diaggym.cases import Case, Exam, LabItem
from diaggym.engines.base import Completion, Engine, EngineError, SamplingParams
from diaggym.errors import InputError
from diaggym.serialization import parse_prompt, render_result

CATALOG_FORMAT = "diaggym.exam-catalog/1"
FALLBACK_TEXT = "Normal."
# What a rule-based simulator says about a free-text exam it has no record of.
NORMAL_TEXT: dict[str, str] = {
    "physical": "Within normal limits.",
    "radiology": "No acute abnormality.",
    "microbiology": "No growth.",
    "other": "Normal.",
    "lab": "Normal.",
}
_PLAIN_NUMBER = re.compile(r"^-?\d+(?:\.(\d+))?$")
_MAX_DECIMALS = 6


# --------------------------------------------------------------------------- catalog
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

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "units": [[u, c] for u, c in self.units.items()],
            "ranges": [[lo, hi, c] for (lo, hi), c in self.ranges.items()],
            "values": self.values,
            "decimals": [[d, c] for d, c in self.decimals.items()],
            "texts": [[v, cm, c] for (v, cm), c in self.texts.items()],
        }

    @classmethod
    def from_dict(cls, d: dict) -> AnalyteStats:
        return cls(
            n=int(d["n"]),
            units=Counter({u: c for u, c in d["units"]}),
            ranges=Counter({(lo, hi): c for lo, hi, c in d["ranges"]}),
            values=[float(v) for v in d["values"]],
            decimals=Counter({int(k): c for k, c in d["decimals"]}),
            texts=Counter({(v, cm): c for v, cm, c in d["texts"]}),
        )


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

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "n": self.n,
            "results": [[t, c] for t, c in self.results.items()],
            "panels": [[list(p), c] for p, c in self.panels.items()],
            "analytes": {name: a.to_dict() for name, a in self.analytes.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> ExamStats:
        return cls(
            kind=str(d["kind"]),
            n=int(d["n"]),
            results=Counter({t: c for t, c in d["results"]}),
            panels=Counter({tuple(p): c for p, c in d["panels"]}),
            analytes={name: AnalyteStats.from_dict(a) for name, a in d["analytes"].items()},
        )


@dataclass
class ExamCatalog:
    """Per exam name: its :class:`ExamStats`, built from (training) cases."""

    exams: dict[str, ExamStats] = field(default_factory=dict)

    @classmethod
    def from_cases(cls, cases: Iterable[Case]) -> ExamCatalog:
        exams: dict[str, ExamStats] = {}
        for case in cases:
            for exam in case.exams:
                exams.setdefault(exam.name, ExamStats(kind=exam.kind)).add(exam)
        return cls(exams)

    # ----------------------------------------------------------------- queries
    def __contains__(self, exam: object) -> bool:
        return exam in self.exams

    def __len__(self) -> int:
        return len(self.exams)

    def get(self, exam: str) -> ExamStats | None:
        return self.exams.get(exam)

    def analyte(self, exam: str, analyte: str) -> AnalyteStats | None:
        stats = self.exams.get(exam)
        return stats.analytes.get(analyte) if stats else None

    def kind(self, exam: str) -> str | None:
        stats = self.exams.get(exam)
        return stats.kind if stats else None

    def results(self, exam: str) -> list[str]:
        """Every distinct real result text of ``exam`` (most common first)."""
        stats = self.exams.get(exam)
        return [t for t, _ in stats.results.most_common()] if stats else []

    def typical_analytes(self, exam: str) -> tuple[str, ...]:
        stats = self.exams.get(exam)
        return stats.typical_analytes if stats else ()

    def median(self, exam: str, analyte: str) -> float | None:
        a = self.analyte(exam, analyte)
        return a.median if a else None

    def ref_range(self, exam: str, analyte: str) -> tuple[float | None, float | None]:
        a = self.analyte(exam, analyte)
        return a.ref_range if a else (None, None)

    def unit(self, exam: str, analyte: str) -> str | None:
        a = self.analyte(exam, analyte)
        return a.unit if a else None

    # ----------------------------------------------------------------- persistence
    def to_json(self, path: str | Path) -> None:
        doc = {"format": CATALOG_FORMAT, "exams": {name: s.to_dict() for name, s in self.exams.items()}}
        with atomic_file(path) as fh:
            json.dump(doc, fh, ensure_ascii=False)

    @classmethod
    def from_json(cls, path: str | Path) -> ExamCatalog:
        path = Path(path)
        if not path.is_file():
            raise InputError("no such exam catalog file", path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise InputError(f"not valid JSON ({err.msg})", path) from None
        if not isinstance(doc, dict) or doc.get("format") != CATALOG_FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise InputError(f"field 'format' is {found!r}, expected {CATALOG_FORMAT!r}", path)
        try:
            return cls({name: ExamStats.from_dict(s) for name, s in doc["exams"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise InputError(f"malformed exam catalog ({type(err).__name__}: {err})", path) from None


# --------------------------------------------------------------------------- values
def _format(x: float, decimals: int) -> str:
    return f"{x:.{decimals}f}"


def _uniform_in_range(rng: random.Random, low: float, high: float, decimals: int) -> str:
    """A value drawn uniformly from the numbers with ``decimals`` decimals inside [low, high].

    Works on exact decimals, so the rendered value is never outside the range by rounding; more
    decimals are used when the range holds no number with ``decimals`` decimals (e.g. 0.01 - 0.08).
    """
    lo, hi = Decimal(repr(float(low))), Decimal(repr(float(high)))
    for d in range(decimals, _MAX_DECIMALS + 1):
        scale = Decimal(10) ** d
        k_lo, k_hi = math.ceil(lo * scale), math.floor(hi * scale)
        if k_lo <= k_hi:
            return _scaled(rng.randint(k_lo, k_hi), d)
    return _format((low + high) / 2, _MAX_DECIMALS)


def _scaled(k: int, decimals: int) -> str:
    """``k / 10**decimals`` written exactly with ``decimals`` decimals (12, 1 → "1.2")."""
    sign = "-" if k < 0 else ""
    whole, frac = divmod(abs(k), 10**decimals)
    return f"{sign}{whole}.{frac:0{decimals}d}" if decimals else f"{sign}{whole}"


def _normal_value(a: AnalyteStats, rng: random.Random) -> str:
    """Uniform inside a two-sided reference range; else the median (clamped to a one-sided bound)."""
    low, high = a.ref_range
    d = a.typical_decimals
    if low is not None and high is not None and low <= high:
        return _uniform_in_range(rng, low, high, d)
    x = a.median if a.median is not None else (low if low is not None else high)
    assert x is not None
    text = _format(x, d)
    if low is not None and float(text) < low:
        return _uniform_in_range(rng, low, low, d)  # the bound itself, with the decimals it needs
    if high is not None and float(text) > high:
        return _uniform_in_range(rng, high, high, d)
    return text


def _item(name: str, a: AnalyteStats, value: str | None) -> LabItem:
    """One analyte as a real record would show it: numeric ``value`` or the typical qualitative reading."""
    low, high = a.ref_range
    if value is not None:
        return LabItem(name=name, value=value, valuenum=float(value), unit=a.unit, ref_low=low, ref_high=high)
    text, comment = a.typical_text
    if text is None and comment is None:  # qualitative analyte never seen with content: cannot happen for real data
        text = "NEG"
    return LabItem(name=name, value=text, comment=comment, unit=a.unit, ref_low=low, ref_high=high)


def _lab_text(exam: str, stats: ExamStats, value_of) -> str:
    """Render the typical analytes of ``exam``; ``value_of(stats)`` gives a numeric value string."""
    items = []
    for name in stats.typical_analytes:
        a = stats.analytes[name]
        items.append(_item(name, a, value_of(a) if a.is_numeric else None))
    return render_result(Exam(name=exam, kind=stats.kind, group=0, items=items))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- engines
def rough_tokens(text: str) -> int:
    """Whitespace-separated words: a rough, tokenizer-free stand-in for a token count."""
    return len(text.split())


def request_seed(engine_seed: int, seed: int, exam: str) -> int:
    """A stable 64-bit seed for one request (sha256, so it does not change across processes)."""
    key = json.dumps([engine_seed, seed, exam], ensure_ascii=False).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def exam_from_prompt(prompt: str) -> str:
    """The requested exam name; ``EngineError(reason="bad_prompt")`` when the prompt is not diaggym-v1."""
    try:
        return parse_prompt(prompt)[2]
    except ValueError as err:
        raise EngineError(f"bad prompt: {err}", reason="bad_prompt") from None


class CatalogEngine(Engine):
    """Shared machinery: read the exam from the prompt, answer from the catalog, count fallbacks.

    Token counts are rough (:func:`rough_tokens`: words, not tokenizer tokens).  ``finish_reason`` is
    always ``"stop"``: a baseline writes whole results and ignores ``max_tokens``, ``temperature`` and
    ``top_p``.  With ``SamplingParams.seed`` set, the draw depends only on (engine seed, request seed,
    exam name), so it is reproducible whatever else is in the batch; without one, the engine's own RNG
    stream is used.
    """

    name = "catalog"
    fallback_reason = "unseen_exam"

    def __init__(self, catalog: ExamCatalog, seed: int = 0) -> None:
        self.catalog = catalog
        self.seed = seed
        self.fallbacks = 0
        self.fallback_exams: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _generate(self, prompts: list[str], params: list[SamplingParams]) -> list[Completion]:
        return [self._complete(p, sp) for p, sp in zip(prompts, params, strict=True)]

    def _complete(self, prompt: str, params: SamplingParams) -> Completion:
        exam = exam_from_prompt(prompt)
        stats = self.catalog.get(exam)
        if stats is None:
            self._count_fallback(exam)
            text, meta = FALLBACK_TEXT, {"fallback": self.fallback_reason}
        else:
            text, meta = self._answer(exam, stats, self._rng_for(params, exam)), {"kind": stats.kind}
        return Completion(
            text=text,
            finish_reason="stop",
            prompt_tokens=rough_tokens(prompt),
            completion_tokens=rough_tokens(text),
            meta=meta,
        )

    def _rng_for(self, params: SamplingParams, exam: str) -> random.Random:
        if params.seed is not None:
            return random.Random(request_seed(self.seed, params.seed, exam))
        with self._lock:
            return random.Random(self._rng.getrandbits(64))

    def _count_fallback(self, exam: str) -> None:
        with self._lock:
            self.fallbacks += 1
            self.fallback_exams[exam] += 1

    def _answer(self, exam: str, stats: ExamStats, rng: random.Random) -> str:
        raise NotImplementedError


class NormalEngine(CatalogEngine):
    """Normal readings: typical analytes inside their reference ranges; a fixed normal sentence for free text.

    Numeric analytes are drawn uniformly inside the most common reference range, written with the
    analyte's usual number of decimals (the training median when no range is known); qualitative
    analytes take their most common reading ("NEG").  Unknown exams answer ``"Normal."`` with
    ``meta={"fallback": "unknown_exam"}``.
    """

    name = "normal"
    fallback_reason = "unknown_exam"

    def _answer(self, exam: str, stats: ExamStats, rng: random.Random) -> str:
        if stats.is_lab:
            return _lab_text(exam, stats, lambda a: _normal_value(a, rng))
        return NORMAL_TEXT.get(stats.kind, FALLBACK_TEXT)


class MarginalEngine(CatalogEngine):
    """Marginal sampling: a random real result of the same exam from the training split (by frequency).

    An exam never seen in training answers ``"Normal."`` with ``meta={"fallback": "unseen_exam"}`` and
    is counted in ``fallbacks`` / ``fallback_exams``.
    """

    name = "marginal"

    def _answer(self, exam: str, stats: ExamStats, rng: random.Random) -> str:
        texts = list(stats.results)
        return rng.choices(texts, weights=[stats.results[t] for t in texts], k=1)[0]


class MedianEngine(CatalogEngine):
    """Deterministic: each typical analyte at its training median; free text: the most common real text."""

    name = "median"

    def __init__(self, catalog: ExamCatalog) -> None:
        super().__init__(catalog, seed=0)

    def _answer(self, exam: str, stats: ExamStats, rng: random.Random) -> str:
        if stats.is_lab:
            return _lab_text(exam, stats, lambda a: _format(a.median, a.typical_decimals))
        return stats.results.most_common(1)[0][0]
