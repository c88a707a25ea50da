"""The turn protocol of the reference DiagAgent: what an agent writes and what it reads back.

An agent turn is either an exam request::

    Current diagnosis: <working diagnosis>
    Based on the patient's initial presentation, the following investigation(s) should be performed: <exam>
    Reason: <why>

or a final answer::

    The available information is sufficient to make a diagnosis.

    Diagnosis: <diagnosis>
    Reason: <why>

The reference parser takes the text after ``needed:``/``performed:`` on the second line and removes every ``.``;
we accept that exactly, plus tolerant variants (a code fence around the turn, extra blank lines, any casing of
``Diagnosis:``, the request phrase on another line).  Anything else is a format failure with a reason: parsing
never raises, whatever the input (garbage, empty, 100 kB).
A structured form is accepted too: a JSON object ``{"action": "request_exam", "exam": ...}`` or
``{"action": "diagnose", "diagnosis": ...}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

SUFFICIENT = "The available information is sufficient to make a diagnosis."
REQUEST_PHRASE = "Based on the patient's initial presentation, the following investigation(s) should be performed:"
RESULT_PREFIX = "Here is the test result: "

# Limits: turns and names beyond them are format failures (a 10 kB "exam name" is not an exam).
MAX_TURN_CHARS = 20_000
MAX_EXAM_CHARS = 200
MAX_DIAGNOSIS_CHARS = 1_000

INSTRUCTION = f"""You are helping a doctor work up a patient. Read the presentation, ask for one investigation \
at a time, and give a final diagnosis once the results you have are enough.

Answer in exactly one of these two forms.

To ask for an investigation:
```
Current diagnosis: [your working diagnosis from what you know so far]
{REQUEST_PHRASE} [one investigation]
Reason: [why this investigation]
```

To finish:
```
{SUFFICIENT}

Diagnosis: [your diagnosis]
Reason: [why]
```"""

_FENCE = re.compile(r"^\s*```[\w-]*\s*$")
_REQUEST = re.compile(r"(?:needed|performed)\s*:(.*)$", re.IGNORECASE)
_DIAGNOSIS = re.compile(r"^\s*\**\s*diagnosis\s*\**\s*:\s*(.*)$", re.IGNORECASE)
_REASON = re.compile(r"^\s*\**\s*reason\s*\**\s*:", re.IGNORECASE)
_SUFFICIENT_RE = re.compile(r"the available information is sufficient to make a diagnosis\.?", re.IGNORECASE)


@dataclass(frozen=True)
class Turn:
    """A parsed agent turn.  ``kind == "invalid"`` carries the reason in ``error``."""

    kind: Literal["request", "diagnosis", "invalid"]
    exam: str | None = None
    diagnosis: str | None = None
    error: str | None = None
    structured: bool = False

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, False)}


def _invalid(reason: str) -> Turn:
    return Turn("invalid", error=reason)


def _lines(text: str) -> list[str]:
    """Lines without code-fence markers and blank lines."""
    return [ln for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if ln.strip()
            and not _FENCE.match(ln)]


def clean_exam(raw: str) -> str:
    """The reference cleaning: every ``.`` removed, then stripped (also surrounding brackets/quotes/markdown)."""
    return raw.replace(".", "").strip().strip("[]*`\"' ").strip()


def _structured(text: str) -> Turn | None:
    stripped = text.strip()
    if not (stripped.startswith("{") and stripped.endswith("}")):
        return None
    try:
        obj = json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        return _invalid("a JSON turn that does not parse")
    if not isinstance(obj, dict):
        return _invalid("a JSON turn must be an object")
    action = obj.get("action")
    if action == "request_exam":
        exam = obj.get("exam")
        if not isinstance(exam, str):
            return _invalid("request_exam needs a string 'exam'")
        return _check_request(exam.strip(), structured=True)
    if action == "diagnose":
        diagnosis = obj.get("diagnosis")
        if not isinstance(diagnosis, str):
            return _invalid("diagnose needs a string 'diagnosis'")
        return _check_diagnosis(diagnosis.strip(), structured=True)
    return _invalid(f"unknown JSON action {str(action)[:40]!r} (use request_exam or diagnose)")


def _check_request(exam: str, structured: bool = False) -> Turn:
    if not exam:
        return _invalid("the investigation after 'should be performed:' is empty")
    if len(exam) > MAX_EXAM_CHARS:
        return _invalid(f"the investigation name has {len(exam)} characters (limit {MAX_EXAM_CHARS})")
    return Turn("request", exam=exam, structured=structured)


def _check_diagnosis(diagnosis: str, structured: bool = False) -> Turn:
    if not diagnosis:
        return _invalid("the diagnosis after 'Diagnosis:' is empty")
    if len(diagnosis) > MAX_DIAGNOSIS_CHARS:
        return _invalid(f"the diagnosis has {len(diagnosis)} characters (limit {MAX_DIAGNOSIS_CHARS})")
    return Turn("diagnosis", diagnosis=diagnosis, structured=structured)


def parse_turn(text: object) -> Turn:
    """Parse one agent turn; never raises."""
    if not isinstance(text, str):
        return _invalid(f"a turn must be text, got {type(text).__name__}")
    if not text.strip():
        return _invalid("empty turn")
    if len(text) > MAX_TURN_CHARS:
        return _invalid(f"the turn has {len(text)} characters (limit {MAX_TURN_CHARS})")
    structured = _structured(text)
    if structured is not None:
        return structured
    m = _SUFFICIENT_RE.search(text)
    if m:
        # The diagnosis is the first 'Diagnosis:' line after the sufficiency sentence (text on the same line
        # as the sentence counts too); a 'Reason:' line ends it.
        after = _lines(text[m.end():])
        for line in after:
            if _REASON.match(line):
                break
            d = _DIAGNOSIS.match(line)
            if d:
                return _check_diagnosis(d.group(1).strip().strip("*").strip())
        return _invalid("the turn says the information is sufficient but has no 'Diagnosis:' line before 'Reason:'")
    lines = _lines(text)
    # Reference position first: the second non-blank line; then any line carrying the request phrase.
    candidates = lines[1:2] + [ln for ln in lines if "should be performed" in ln.lower() or "needed:" in ln.lower()]
    for line in candidates:
        r = _REQUEST.search(line)
        if r:
            return _check_request(clean_exam(r.group(1)))
    if any(_DIAGNOSIS.match(ln) for ln in lines):
        return _invalid("a 'Diagnosis:' line without the sentence that the information is sufficient")
    return _invalid("neither an investigation request ('... should be performed: EXAM') nor a final diagnosis")


def format_request(exam: str, working: str = "undetermined", reason: str = "to narrow the differential") -> str:
    """A request turn in the reference form (agents and tests write turns with this)."""
    return f"Current diagnosis: {working}\n{REQUEST_PHRASE} {exam}\nReason: {reason}"


def format_diagnosis(diagnosis: str, reason: str = "consistent with the findings") -> str:
    """A final turn in the reference form (the space after the sentence is the reference's)."""
    return f"{SUFFICIENT} \n\nDiagnosis: {diagnosis}\nReason: {reason}"


def format_result(result: str) -> str:
    return f"{RESULT_PREFIX}{result}"
