"""Format ``diaggym-v1``: the exact text the world model reads and writes.

This is the one module that knows the format (docs/architecture.md, contract 2).  It
must stay compatible with the published DiagGym weights, whose reference client
builds prompts as::

    context + SEP.join(events) + SEP + "Exam name:\\n{exam}\\nExam results:\\n"

with ``context`` ending in ``"\\nThe following summarizes the results from the
patient's medical examination:\\n"``.  Every event here ends with ``<SEP>``,
which yields the same string and keeps prompts **append-only**: the prompt for
step *k* is an exact prefix of the prompt for step *k + 1*, so prefix caches hit.

A lab analyte renders as ``Value: 16; Numeric Value: 16.0; Units: mEq/L;
Reference Range: 8.0 - 20.0`` (missing parts omitted); a panel renders one line
per analyte prefixed with ``{Analyte}: ``.  :func:`parse_result` is the exact
inverse for everything the case schema admits (``flag`` is not part of the
text: abnormality is read from the value against the range).  Every number is
written by :func:`format_number` (plain decimal, never ``1e-05``).  A training
text ends with :data:`END_OF_TEXT` as the reference's does, and generation stops
at :data:`STOP_STRINGS`.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from pydantic import ValidationError

from diaggym.cases import END_OF_TEXT, SEP, Case, Exam, LabItem, Profile
from diaggym.text_rules import LAB_KEY_ALTERNATION, LAB_KEY_PREFIXES, cut_at_stop

FORMAT = "diaggym-v1"
EXAMS_HEADER = "The following summarizes the results from the patient's medical examination:\n"
# Where generation ends: after one result (``<SEP>``) or at the end of the case.
STOP_STRINGS: tuple[str, ...] = (SEP, END_OF_TEXT)

# Profile fields rendered note-style when the case has no verbatim note header.
PROFILE_FIELDS: tuple[tuple[str, str], ...] = (
    ("sex", "Sex"),
    ("age", "Age"),
    ("service", "Service"),
    ("allergies", "Allergies"),
    ("chief_complaint", "Chief Complaint"),
    ("history_of_present_illness", "History of Present Illness"),
    ("past_medical_history", "Past Medical History"),
    ("social_history", "Social History"),
    ("family_history", "Family History"),
)


# --------------------------------------------------------------------------- rendering
def render_profile(profile: Profile) -> str:
    """The verbatim note header when present, else ``Field: value`` lines in note order."""
    if profile.note:
        return profile.note.strip()
    lines = []
    for attr, label in PROFILE_FIELDS:
        value = getattr(profile, attr)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        lines.append(f"{label}: {str(value).strip()}")
    return "\n".join(lines)


def render_context(profile: Profile, final_diagnosis: str) -> str:
    """Profile + final diagnosis + the header that introduces the exam history."""
    return f"{render_profile(profile)}\n\nFinal Diagnosis:\n{final_diagnosis.strip()}\n{EXAMS_HEADER}"


def format_number(x: float) -> str:
    """The one way a number is written in diaggym-v1: plain decimal, never exponent form.

    The digits are those of ``repr`` (the shortest string that reads back as the same float), so
    ``float(format_number(x)) == x``; an integral value keeps its ``.0`` ("16.0", as the reference
    writes it).  ``repr`` alone would give ``1e-05`` or ``1e+16``, which the reference parsers cannot
    read, so the decimal point is moved instead.
    """
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"cannot write {x!r} as a diaggym-v1 number (not finite)")
    text = format(Decimal(repr(x)), "f")
    return text if "." in text else text + ".0"


def render_range(low: float | None, high: float | None) -> str | None:
    if low is not None and high is not None:
        return f"{format_number(low)} - {format_number(high)}"
    if low is not None:
        return f">= {format_number(low)}"
    if high is not None:
        return f"<= {format_number(high)}"
    return None


def render_item(item: LabItem, with_name: bool = True) -> str:
    """One analyte line; the name prefix is dropped for a single-analyte exam named after it."""
    parts = []
    if item.value is not None:
        parts.append(f"Value: {item.value}")
    if item.valuenum is not None:
        parts.append(f"Numeric Value: {format_number(item.valuenum)}")
    if item.unit is not None:
        parts.append(f"Units: {item.unit}")
    rng = render_range(item.ref_low, item.ref_high)
    if rng is not None:
        parts.append(f"Reference Range: {rng}")
    if item.comment is not None:
        parts.append(f"Comment: {item.comment}")
    body = "; ".join(parts)
    return f"{item.name}: {body}" if with_name else body


def render_items(exam_name: str, items: Sequence[LabItem]) -> str:
    if len(items) == 1 and items[0].name == exam_name:
        return render_item(items[0], with_name=False)
    return "\n".join(render_item(it) for it in items)


def render_result(exam: Exam) -> str:
    """The result text of one exam (what the model writes after ``Exam results:``)."""
    if exam.items is not None:
        return render_items(exam.name, exam.items)
    assert exam.result is not None
    return exam.result


def exam_header(name: str) -> str:
    """What the prompt ends with when asking for ``name``."""
    return f"Exam name:\n{name}\nExam results:\n"


def render_event(name: str, result: str) -> str:
    """One past exam in the history; always ends with ``<SEP>``."""
    return f"{exam_header(name)}{result.strip()}{SEP}"


def render_prompt(context: str, history: Sequence[tuple[str, str]], exam_name: str) -> str:
    """Prompt for the next exam: context, past events (name, result), then the next exam's header."""
    return context + "".join(render_event(n, r) for n, r in history) + exam_header(exam_name)


def case_events(case: Case, order: Sequence[int] | None = None) -> list[tuple[str, str]]:
    """(name, result text) of a case's exams, in record order or in ``order`` (indices)."""
    exams = case.exams if order is None else [case.exams[i] for i in order]
    return [(e.name, render_result(e)) for e in exams]


def case_prompts(case: Case) -> list[str]:
    """The prompt of every step of a case with the true history (step k asks for exam k)."""
    context = render_context(case.profile, case.final_diagnosis)
    events = case_events(case)
    return [render_prompt(context, events[:k], name) for k, (name, _) in enumerate(events)]


def shuffled_order(case: Case, rng: random.Random) -> list[int]:
    """Exam indices with the order inside each time group shuffled (training augmentation).

    Groups keep their relative order: only exams that happened at the same time swap.
    """
    order: list[int] = []
    start = 0
    exams = case.exams
    while start < len(exams):
        end = start
        while end < len(exams) and exams[end].group == exams[start].group:
            end += 1
        block = list(range(start, end))
        rng.shuffle(block)
        order.extend(block)
        start = end
    return order


def end_of_text(tokenizer) -> str | None:
    """The token that ends a training text for ``tokenizer``: ``<|endoftext|>`` when its vocabulary has it
    (Qwen2.5 base and Instruct both do), else the tokenizer's own EOS (``None`` when it has none)."""
    if END_OF_TEXT in tokenizer.get_vocab():
        return END_OF_TEXT
    return tokenizer.eos_token or None


def training_text(case: Case, eos_token: str, order: Sequence[int] | None = None) -> tuple[str, str]:
    """(context, target): the model is trained on ``context + target`` with loss on ``target`` only.

    ``target`` = every event (ending in ``<SEP>``) followed by the end token (:func:`end_of_text`).
    """
    context = render_context(case.profile, case.final_diagnosis)
    body = "".join(render_event(n, r) for n, r in case_events(case, order))
    return context, body + eos_token


# --------------------------------------------------------------------------- parsing
def clean_completion(text: str, eos_token: str | None = None) -> str:
    """Cut a raw generation at the first ``<SEP>`` (and ``eos_token``) and strip it, as the stop strings do.

    The end token is cut only when given: :func:`parse_result` reads real results too, and the case schema
    forbids ``<SEP>`` in them, not the end token's text.
    """
    return cut_at_stop(text, (SEP,), eos_token)[0]


@dataclass
class ParsedResult:
    """A result parsed back from text: analytes for lab-shaped text, else free text only."""

    text: str
    items: list[LabItem] = field(default_factory=list)
    unparsed_lines: list[str] = field(default_factory=list)

    @property
    def is_lab(self) -> bool:
        return bool(self.items)

    @property
    def complete(self) -> bool:
        """True when every line of a lab-shaped result parsed (free text is always complete)."""
        return not (self.items and self.unparsed_lines)


_NAMED_RE = re.compile(rf"^(?P<name>.+?): (?P<rest>(?:{LAB_KEY_ALTERNATION}): .*)$")
_PART_SPLIT = re.compile(r"; (?=(?:Numeric Value|Units|Reference Range): )")
_FIELDS = {"Value": "value", "Numeric Value": "valuenum", "Units": "unit", "Reference Range": "range"}


def _parse_range(text: str) -> tuple[float | None, float | None]:
    if text.startswith(">= "):
        return float(text[3:]), None
    if text.startswith("<= "):
        return None, float(text[3:])
    low, sep, high = text.partition(" - ")
    if not sep:
        raise ValueError(f"bad reference range {text!r}")
    return float(low), float(high)


def parse_item_line(line: str, exam_name: str) -> LabItem:
    """Parse one analyte line; raises ``ValueError`` when the line is not in diaggym-v1 shape."""
    if line.startswith(LAB_KEY_PREFIXES):
        name, rest = exam_name, line
    else:
        m = _NAMED_RE.match(line)
        if not m:
            raise ValueError(f"not an analyte line: {line!r}")
        name, rest = m["name"], m["rest"]
    comment = None
    if rest.startswith("Comment: "):
        rest, comment = "", rest[len("Comment: ") :]
    elif "; Comment: " in rest:
        rest, comment = rest.split("; Comment: ", 1)
    fields: dict[str, object] = {"name": name, "comment": comment}
    for part in _PART_SPLIT.split(rest) if rest else []:
        key, sep, value = part.partition(": ")
        if not sep or key not in _FIELDS or _FIELDS[key] in fields:
            raise ValueError(f"bad analyte part {part!r}")
        fields[_FIELDS[key]] = value
    if "valuenum" in fields:
        fields["valuenum"] = float(fields["valuenum"])  # type: ignore[arg-type]
    if "range" in fields:
        fields["ref_low"], fields["ref_high"] = _parse_range(fields.pop("range"))  # type: ignore[arg-type]
    try:
        return LabItem(**fields)  # type: ignore[arg-type]
    except ValidationError as err:
        raise ValueError(str(err)) from None


def parse_result(text: str, exam_name: str, kind: str | None = None) -> ParsedResult:
    """Parse a result (real or generated) back into analytes.

    Text whose lines are analyte lines yields ``items``; lines that are not are kept in
    ``unparsed_lines`` (so a half-well-formed generation is visible, not hidden).  Text
    with no analyte line at all is free text (radiology, microbiology, physical exam);
    a ``kind`` other than ``"lab"`` (when known) means free text without trying.
    """
    text = clean_completion(text)
    if kind is not None and kind != "lab":
        return ParsedResult(text=text)
    items: list[LabItem] = []
    bad: list[str] = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            items.append(parse_item_line(line, exam_name))
        except ValueError:
            bad.append(line)
    if not items:
        return ParsedResult(text=text)
    return ParsedResult(text=text, items=items, unparsed_lines=bad)


def parse_prompt(prompt: str) -> tuple[str, list[tuple[str, str]], str]:
    """Inverse of :func:`render_prompt`: (context, history as (name, result) pairs, next exam name).

    Baseline engines use it to learn which exam is asked for; it raises ``ValueError`` for text that
    is not a diaggym-v1 prompt.
    """
    head, sep, tail = prompt.partition(EXAMS_HEADER)
    if not sep or not tail.endswith("\nExam results:\n") or not tail.startswith("Exam name:\n"):
        raise ValueError("not a diaggym-v1 prompt (no exam header, or it does not end with 'Exam results:\\n')")
    context = head + EXAMS_HEADER
    *events, last = tail.split(SEP)
    history = []
    for ev in events:
        if not ev.startswith("Exam name:\n") or "\nExam results:\n" not in ev:
            raise ValueError(f"malformed event in prompt: {ev[:80]!r}")
        name, _, result = ev[len("Exam name:\n") :].partition("\nExam results:\n")
        history.append((name, result))
    name = last[len("Exam name:\n") : -len("\nExam results:\n")]
    if not name or "\n" in name:
        raise ValueError("malformed next-exam header in prompt")
    return context, history, name
