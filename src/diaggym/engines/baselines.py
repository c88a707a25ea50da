"""Baseline engines: what a world model has to beat, built from the training split alone.

The reference work compares DiagGym with (a) *normal readings*, what rule-based
patient simulators answer for a test that is not in the record, and (b) *marginal
sampling*, a random real result of the same exam.  A third baseline, the training
*median* of every analyte, is the strongest unconditional point predictor and a
useful floor for numeric error metrics.  None of them looks at the patient: they
read only the requested exam name from the prompt (:func:`serialization.parse_prompt`).

Everything they need comes from :class:`~diaggym.exam_stats.TrainingStats` (per exam: kind,
real result texts, typical analyte list; per analyte: units, reference ranges, numeric
values, value decimals), rebuilt from the training cases when an engine is made.

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
import threading
from collections import Counter
from decimal import Decimal

from diaggym.cases import Exam, LabItem
from diaggym.engines.base import Completion, Engine, EngineError, SamplingParams
from diaggym.exam_stats import AnalyteStats, ExamStats, TrainingStats
from diaggym.serialization import parse_prompt, render_result

FALLBACK_TEXT = "Normal."
# What a rule-based simulator says about a free-text exam it has no record of.
NORMAL_TEXT: dict[str, str] = {
    "physical": "Within normal limits.",
    "radiology": "No acute abnormality.",
    "microbiology": "No growth.",
    "other": "Normal.",
    "lab": "Normal.",
}
_MAX_DECIMALS = 6


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


def cut_to_tokens(text: str, max_tokens: int) -> tuple[str, str]:
    """(text cut after ``max_tokens`` words, finish reason): ``length`` when it was cut, else ``stop``."""
    words = list(re.finditer(r"\S+", text))
    if len(words) <= max_tokens:
        return text, "stop"
    return text[: words[max_tokens - 1].end()], "length"


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


class StatsEngine(Engine):
    """Shared machinery: read the exam from the prompt, answer from the training statistics, count fallbacks.

    Token counts are rough (:func:`rough_tokens`: words, not tokenizer tokens).  A result longer than
    ``max_tokens`` words is cut after that many and reports ``finish_reason="length"``, as a model would;
    ``temperature`` and ``top_p`` are ignored.  Unseen exam names are counted in ``fallbacks``; the first
    ``MAX_FALLBACK_NAMES`` distinct names (cut to ``FALLBACK_NAME_CHARS``) are kept in ``fallback_exams``
    and the rest only counted in ``fallbacks_unnamed``, so a stream of unique names cannot grow memory.
    With ``SamplingParams.seed`` set, the draw depends only on (engine seed, request seed,
    exam name), so it is reproducible whatever else is in the batch; without one, the engine's own RNG
    stream is used.
    """

    name = "stats"
    fallback_reason = "unseen_exam"
    MAX_FALLBACK_NAMES = 256
    FALLBACK_NAME_CHARS = 200

    def __init__(self, stats: TrainingStats, seed: int = 0) -> None:
        self.stats = stats
        self.seed = seed
        self.fallbacks = 0
        self.fallback_exams: Counter[str] = Counter()
        self.fallbacks_unnamed = 0  # fallbacks whose name was not kept (the name table was full)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _generate(self, prompts: list[str], params: list[SamplingParams]) -> list[Completion]:
        return [self._complete(p, sp) for p, sp in zip(prompts, params, strict=True)]

    def _complete(self, prompt: str, params: SamplingParams) -> Completion:
        exam = exam_from_prompt(prompt)
        stats = self.stats.get(exam)
        if stats is None:
            self._count_fallback(exam)
            text, meta = FALLBACK_TEXT, {"fallback": self.fallback_reason}
        else:
            text, meta = self._answer(exam, stats, self._rng_for(params, exam)), {"kind": stats.kind}
        text, finish = cut_to_tokens(text, params.max_tokens)
        return Completion(
            text=text,
            finish_reason=finish,
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
        name = exam[: self.FALLBACK_NAME_CHARS]
        with self._lock:
            self.fallbacks += 1
            if name in self.fallback_exams or len(self.fallback_exams) < self.MAX_FALLBACK_NAMES:
                self.fallback_exams[name] += 1
            else:
                self.fallbacks_unnamed += 1

    def _answer(self, exam: str, stats: ExamStats, rng: random.Random) -> str:
        raise NotImplementedError


class NormalEngine(StatsEngine):
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


class MarginalEngine(StatsEngine):
    """Marginal sampling: a random real result of the same exam from the training split (by frequency).

    An exam never seen in training answers ``"Normal."`` with ``meta={"fallback": "unseen_exam"}`` and
    is counted in ``fallbacks`` / ``fallback_exams``.
    """

    name = "marginal"

    def _answer(self, exam: str, stats: ExamStats, rng: random.Random) -> str:
        texts = list(stats.results)
        return rng.choices(texts, weights=[stats.results[t] for t in texts], k=1)[0]


class MedianEngine(StatsEngine):
    """Deterministic: each typical analyte at its training median; free text: the most common real text."""

    name = "median"

    def __init__(self, stats: TrainingStats) -> None:
        super().__init__(stats, seed=0)

    def _answer(self, exam: str, stats: ExamStats, rng: random.Random) -> str:
        if stats.is_lab:
            return _lab_text(exam, stats, lambda a: _format(a.median, a.typical_decimals))
        return stats.results.most_common(1)[0][0]
