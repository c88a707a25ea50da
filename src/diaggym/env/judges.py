"""Judges: is a diagnosis correct, is a requested exam one of the key exams.

* :class:`ExactJudge` — names equal after normalisation (case, punctuation, an abbreviation in brackets is an
  alias: ``Complete Blood Count (CBC)`` matches ``CBC`` and ``complete blood count``), plus an alias table.
* :class:`FuzzyJudge` — exact/alias first, then a token-set similarity over a threshold.
* :class:`LLMJudge` — a chat model over any OpenAI-compatible endpoint answers ``Correct`` or ``Wrong``.  The
  verdict is parsed strictly: the answer's first word decides, so "Incorrect" is wrong (the reference counts
  ``'correct' in answer.lower()``, which scores "incorrect" as correct).  Unparseable answers are retried;
  when retries run out the verdict is ``None`` with the reason, and the failure is counted, never a silent 0 or 1.

A diagnosis is judged against the case's primary diagnosis (its first line) by default, or any listed line.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher

import httpx


@dataclass
class Verdict:
    correct: bool | None  # None: the judge could not decide (reason in ``error``)
    score: float = 0.0  # similarity or 1/0
    error: str | None = None
    detail: str | None = None


_PUNCT = re.compile(r"[^\w\s]")
_BRACKETED = re.compile(r"[(\[]([^)\]]*)[)\]]")
_STOP = {"of", "the", "and", "with", "without", "a", "an", "in", "on", "to", "unspecified", "nos", "other"}


def normalize(name: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", name.casefold()).split())


def aliases(name: str) -> set[str]:
    """Normalised forms a name answers to: itself, without its bracketed parts, and each bracketed part."""
    out = {normalize(name)}
    inner = [m.group(1) for m in _BRACKETED.finditer(name)]
    bare = _BRACKETED.sub(" ", name)
    if inner:
        out.add(normalize(bare))
        out.update(normalize(i) for i in inner if len(normalize(i)) >= 2)
    out.discard("")
    return out


def tokens(name: str) -> set[str]:
    return {t for t in normalize(name).split() if t not in _STOP}


def token_set_ratio(a: str, b: str) -> float:
    """Token-set similarity in [0, 1] (as fuzzywuzzy's token_set_ratio, without the dependency)."""
    ta, tb = tokens(a), tokens(b)
    if not ta or not tb:
        return 0.0
    inter = " ".join(sorted(ta & tb))
    ra = " ".join(sorted(ta - tb))
    rb = " ".join(sorted(tb - ta))
    s1 = (inter + " " + ra).strip()
    s2 = (inter + " " + rb).strip()
    pairs = [(s1, s2)] + ([(inter, s1), (inter, s2)] if inter else [])
    return max(SequenceMatcher(None, x, y).ratio() for x, y in pairs)


class Judge:
    """``judge(prediction, truth)``: does ``prediction`` name the same thing as ``truth``?"""

    name = "judge"

    def __init__(self) -> None:
        self.calls = 0
        self.failures = 0

    def judge(self, prediction: str, truth: str) -> Verdict:
        raise NotImplementedError

    def judge_diagnosis(self, prediction: str, final_diagnosis: str, primary_only: bool = True) -> Verdict:
        lines = [ln.strip() for ln in final_diagnosis.splitlines() if ln.strip()]
        targets = lines[:1] if primary_only else lines
        best = Verdict(False)
        for t in targets:
            v = self.judge(prediction, t)
            if v.correct:
                return v
            if v.correct is None or best.correct is not None and v.score > best.score:
                best = v
        return best

    def match_exams(self, requested: Sequence[str], key: Sequence[str]) -> int:
        """How many key exams have a matching requested exam (each requested exam used once)."""
        used: set[int] = set()
        n = 0
        for k in key:
            for i, r in enumerate(requested):
                if i not in used and self.judge(r, k).correct:
                    used.add(i)
                    n += 1
                    break
        return n

    def stats(self) -> dict:
        return {"judge": self.name, "calls": self.calls, "failures": self.failures}


class ExactJudge(Judge):
    name = "exact"

    def __init__(self, alias_table: dict[str, Iterable[str]] | None = None) -> None:
        super().__init__()
        # canonical normalised name -> its extra normalised aliases
        self.table: dict[str, set[str]] = {}
        for canon, names in (alias_table or {}).items():
            group = aliases(canon) | {a for n in names for a in aliases(n)}
            for a in group:
                self.table.setdefault(a, set()).update(group)

    def _forms(self, name: str) -> set[str]:
        forms = aliases(name)
        for f in list(forms):
            forms |= self.table.get(f, set())
        return forms

    def judge(self, prediction: str, truth: str) -> Verdict:
        self.calls += 1
        ok = bool(self._forms(prediction) & self._forms(truth))
        return Verdict(ok, 1.0 if ok else 0.0)


class FuzzyJudge(ExactJudge):
    name = "fuzzy"

    def __init__(self, threshold: float = 0.85, alias_table: dict[str, Iterable[str]] | None = None) -> None:
        super().__init__(alias_table)
        self.threshold = threshold

    def judge(self, prediction: str, truth: str) -> Verdict:
        exact = super().judge(prediction, truth)
        if exact.correct:
            return exact
        score = max((token_set_ratio(p, t) for p in self._forms(prediction) for t in self._forms(truth)), default=0.0)
        return Verdict(score >= self.threshold, score)


_VERDICT = re.compile(r"^[\W_]*(correct|wrong|incorrect)\b", re.IGNORECASE)


def parse_verdict(answer: str) -> bool | None:
    """Strict: the first word must be Correct, Wrong or Incorrect (markdown/quotes around it allowed)."""
    m = _VERDICT.match(answer or "")
    if not m:
        return None
    return m.group(1).lower() == "correct"


@dataclass
class LLMJudge(Judge):
    """A chat model over an OpenAI-compatible ``/chat/completions`` endpoint (``base_url`` ends in ``/v1``)."""

    base_url: str = ""
    model: str = "judge"
    api_key: str | None = None
    retries: int = 3
    timeout: float = 30.0
    backoff: float = 0.5
    name: str = "llm"
    _client: httpx.Client | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        Judge.__init__(self)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.Client(base_url=self.base_url.rstrip("/"), timeout=self.timeout, headers=headers)

    PROMPT = (
        "You grade a diagnosis against the reference diagnosis of a patient. They match if they name the same "
        "disease (synonyms and more specific forms of the same disease count).\n"
        "Reference: {truth}\nPrediction: {prediction}\n"
        "Answer with exactly one word: Correct or Wrong."
    )

    def judge(self, prediction: str, truth: str) -> Verdict:
        self.calls += 1
        last = "no answer"
        for attempt in range(self.retries):
            try:
                assert self._client is not None
                r = self._client.post("/chat/completions", json={
                    "model": self.model, "temperature": 0.0, "max_tokens": 8,
                    "messages": [{"role": "user", "content": self.PROMPT.format(truth=truth, prediction=prediction)}],
                })
                if r.status_code != 200:
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                else:
                    answer = r.json()["choices"][0]["message"]["content"] or ""
                    v = parse_verdict(answer)
                    if v is not None:
                        return Verdict(v, 1.0 if v else 0.0, detail=answer.strip()[:100])
                    last = f"unparseable verdict {answer.strip()[:100]!r}"
            except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as err:
                last = f"{type(err).__name__}: {err}"
            if attempt + 1 < self.retries:
                time.sleep(self.backoff * 2**attempt)
        self.failures += 1
        return Verdict(None, 0.0, error=f"LLM judge failed after {self.retries} tries: {last}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def make_judge(kind: str = "fuzzy", **kwargs) -> Judge:
    """``exact``, ``fuzzy`` (default; ``threshold``) or ``llm`` (``base_url``, ``model``, ``api_key``)."""
    if kind == "exact":
        return ExactJudge(kwargs.get("alias_table"))
    if kind == "fuzzy":
        return FuzzyJudge(kwargs.get("threshold", 0.85), kwargs.get("alias_table"))
    if kind == "llm":
        if not kwargs.get("base_url"):
            raise ValueError("the llm judge needs base_url (an OpenAI-compatible endpoint ending in /v1)")
        return LLMJudge(**kwargs)
    raise ValueError(f"unknown judge {kind!r}; choose exact, fuzzy or llm")
