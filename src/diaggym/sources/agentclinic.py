"""AgentClinic OSCE records -> DiagGym cases (contract 1).

Why this source exists: AgentClinic (Schmidgall et al., 2024, MIT licence) ships
small, openly licensed diagnostic vignettes in an OSCE layout.  They give DiagGym
a case set that anyone can build, test and evaluate on without credentialed
MIMIC access, and they exercise the same case schema and ``diaggym-v1`` text.

Each JSONL line holds ``{"OSCE_Examination": {...}}`` with ``Patient_Actor``
(demographics and history), ``Physical_Examination_Findings``, ``Test_Results``
and ``Correct_Diagnosis``.  The nested parts are written by hand per vignette:
dicts, lists of strings, lists of dicts, numbers with or without units, empty
sections.  Nothing here lists keys per case; one recursive normaliser turns any
JSON value into a small tree (leaf, analyte, group) and two renderers turn that
tree into exam text or lab analytes:

* every top-level physical-exam section becomes a ``physical`` exam in group 0,
  named ``PE: {Section}``, with nested keys rendered as indented ``Key: value``
  lines;
* every top-level test becomes one exam in group 1 (the OSCE has no times).  A
  test whose name suggests imaging, microbiology or another procedure keeps
  free text; a lab test with at least one numeric-looking result becomes
  analytes (``LabItem``: value, numeric value, unit, reference range when a
  parenthesis states one cleanly, anything else as comment); other lab tests
  keep free text.

Nothing in ``Patient_Actor`` is dropped: fields without a profile slot (current
medications, a demographics line richer than age and sex, ...) are appended to
the history of present illness as ``Key: value`` lines.  ``Objective_for_Doctor``
is an instruction to the doctor agent, not patient data, and is not used.

A record that cannot become a valid case (no diagnosis, no exam) is dropped and
counted in the :class:`~diaggym.sources.FilterLog`; a line that is not JSON, or
not an OSCE record, raises :class:`~diaggym.errors.InputError` naming the file
and the line.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from diaggym.cases import LAB_KEYS, SEP, Case, Exam, ExamKind, LabItem, Profile, iter_json_lines
from diaggym.errors import InputError
from diaggym.sources import FilterLog, SourceResult

SOURCE = "agentclinic"
PE_GROUP = 0
TEST_GROUP = 1

# --------------------------------------------------------------------------- text helpers

_KEY_RE = re.compile(r"; (?:" + "|".join(re.escape(k) for k in LAB_KEYS) + r"): ")
_KEY_PREFIXES = tuple(f"{k}: " for k in LAB_KEYS)


def _one_line(text: str) -> str:
    """Collapse all whitespace (newlines included) to single spaces and drop ``<SEP>``."""
    return " ".join(text.replace(SEP, " ").split())


def _label(key: Any) -> str | None:
    """A JSON key as a display label: underscores become spaces; ``None`` when empty."""
    text = _one_line(str(key).replace("_", " "))
    return text or None


def _norm(key: Any) -> str:
    """A key for matching: lower case, underscores and hyphens as spaces."""
    return " ".join(str(key).replace("_", " ").replace("-", " ").lower().split())


def _scalar_text(value: Any) -> str | None:
    """A JSON scalar as one line of text (``None`` for null or empty)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _one_line(str(value)) or None


def _json_number(value: Any) -> float | None:
    """The float of a JSON number (never a bool), when finite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        num = float(value)
    except OverflowError:
        return None
    return num if math.isfinite(num) else None


def _safe_field(text: str) -> str:
    """Make text acceptable as a LabItem value/unit: no ``; Units: ``-style keys inside."""
    if _KEY_RE.search(text) or text.startswith(_KEY_PREFIXES):
        text = text.replace(": ", " - ")
    return text


def _join(parts: list[str]) -> str | None:
    """Join inline parts with ``; `` (just a space after a part that already ends a sentence)."""
    out = ""
    for part in parts:
        out += part if not out else (" " if out[-1] in ".;!?" else "; ") + part
    return out or None


def _inline(value: Any) -> str | None:
    """Any JSON value as one line: dicts as ``Key: value; ...``, lists joined with ``; ``."""
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            text = _inline(v)
            if text is None:
                continue
            if isinstance(v, dict):
                text = f"({text})"
            label = _label(k)
            parts.append(f"{label}: {text}" if label else text)
        return _join(parts)
    if isinstance(value, list):
        return _join([t for t in (_inline(v) for v in value) if t])
    return _scalar_text(value)


# --------------------------------------------------------------------------- normalised tree


@dataclass
class _Leaf:
    label: str | None
    text: str
    num: float | None = None  # set when the JSON value itself was a number


@dataclass
class _Analyte:
    """A dict such as ``{"Value": 13.5, "Units": "g/dL", "Reference_Range": "12-16"}``."""

    label: str | None
    value: _Leaf
    unit: str | None
    ref: str | None
    notes: list[str]
    fields: list[_Leaf]  # every key, in order, for free-text rendering


@dataclass
class _Group:
    label: str | None
    children: list[_Node]
    is_list: bool = False


_Node = _Leaf | _Analyte | _Group

_NAME_KEYS = {"name", "test", "test name", "exam", "exam name", "analyte", "parameter", "item", "title"}
_VALUE_KEYS = {"value", "result", "results", "level", "measurement", "reading", "numeric value"}
_UNIT_KEYS = {"unit", "units"}
_RANGE_KEYS = {
    "reference range",
    "normal range",
    "range",
    "reference",
    "ref range",
    "reference interval",
    "normal",
    "normal value",
    "normal values",
}
_NOTE_KEYS = {"comment", "comments", "interpretation", "note", "notes", "flag", "status"}


def _name_key(obj: dict) -> Any | None:
    """The key that names a list element (``{"Test": "CBC", ...}``), when it has other keys too."""
    if len(obj) < 2:
        return None
    for k, v in obj.items():
        if _norm(k) in _NAME_KEYS and isinstance(v, str) and v.strip():
            return k
    return None


def _as_analyte(label: str | None, obj: dict) -> _Analyte | None:
    """Read ``obj`` as one analyte when its keys are only value/unit/range/comment keys."""
    if not obj or any(isinstance(v, dict | list) for v in obj.values()):
        return None
    keys = {_norm(k): k for k in obj}
    if not set(keys) <= _VALUE_KEYS | _UNIT_KEYS | _RANGE_KEYS | _NOTE_KEYS:
        return None
    value_keys = [keys[k] for k in keys if k in _VALUE_KEYS]
    if len(value_keys) != 1:
        return None
    raw = obj[value_keys[0]]
    text = _scalar_text(raw)
    if text is None:
        return None
    unit = ref = None
    notes: list[str] = []
    fields: list[_Leaf] = []
    for k, v in obj.items():
        t = _scalar_text(v)
        if t is None:
            continue
        fields.append(_Leaf(_label(k), t, _json_number(v)))
        nk = _norm(k)
        if nk in _UNIT_KEYS:
            unit = t
        elif nk in _RANGE_KEYS:
            ref = t
        elif nk in _NOTE_KEYS:
            notes.append(t)
    return _Analyte(label, _Leaf(label, text, _json_number(raw)), unit, ref, notes, fields)


def _tree(label: str | None, obj: Any) -> _Node | None:
    """Normalise any JSON value; empty values (null, "", {}, []) give ``None``."""
    if isinstance(obj, dict):
        if label is None and (nk := _name_key(obj)) is not None:
            label = _label(obj[nk])
            obj = {k: v for k, v in obj.items() if k != nk}
        analyte = _as_analyte(label, obj)
        if analyte is not None:
            return analyte
        children = [c for k, v in obj.items() if (c := _tree(_label(k), v)) is not None]
        if not children:
            return None
        if label is None and len(children) == 1:
            return children[0]
        return _Group(label, children)
    if isinstance(obj, list):
        children = [c for v in obj if (c := _tree(None, v)) is not None]
        return _Group(label, children, is_list=True) if children else None
    text = _scalar_text(obj)
    return _Leaf(label, text, _json_number(obj)) if text is not None else None


def _sections(obj: Any, default: str) -> list[tuple[str, Any]]:
    """Top-level (name, content) pairs of a findings/results object of any shape."""
    if obj is None:
        return []
    if isinstance(obj, dict):
        return [(_label(k) or default, v) for k, v in obj.items()]
    if not isinstance(obj, list):
        return [(default, obj)]
    out: list[tuple[str, Any]] = []
    loose: list[Any] = []
    for elem in obj:
        if isinstance(elem, dict) and (nk := _name_key(elem)) is not None:
            rest = {k: v for k, v in elem.items() if k != nk}
            only = next(iter(rest.values()))
            content = only if len(rest) == 1 and isinstance(only, dict | list) else rest
            out.append((_label(elem[nk]) or default, content))
        elif isinstance(elem, dict) and len(elem) == 1:
            k, v = next(iter(elem.items()))
            out.append((_label(k) or default, v))
        elif isinstance(elem, str) and ": " in elem:
            name, _, rest_text = elem.partition(": ")
            out.append((_label(name) or default, rest_text))
        else:
            loose.append(elem)
    if loose:
        out.append((default, loose))
    return out


# --------------------------------------------------------------------------- free-text rendering


def _lines(node: _Node, depth: int) -> list[str]:
    ind = "  " * depth
    if isinstance(node, _Leaf):
        return [f"{ind}{node.label}: {node.text}" if node.label else f"{ind}{node.text}"]
    if isinstance(node, _Analyte):
        body = [ln for f in node.fields for ln in _lines(f, depth + 1)]
        return [f"{ind}{node.label}:", *body] if node.label else _lines(_Group(None, list(node.fields)), depth)
    if node.label:
        return [f"{ind}{node.label}:", *_body(node, depth + 1)]
    return _body(node, depth)


def _body(group: _Group, depth: int) -> list[str]:
    out: list[str] = []
    for child in group.children:
        if group.is_list:
            lines = _lines(child, depth + 1)
            lines[0] = "  " * depth + "- " + lines[0].lstrip()
            out.extend(lines)
        else:
            out.extend(_lines(child, depth))
    return out


def _render_text(node: _Node) -> str:
    """Result text of a whole exam: the exam's own label is the exam name, not repeated."""
    if isinstance(node, _Leaf):
        return node.text
    if isinstance(node, _Analyte):
        return "\n".join(_lines(_Group(None, list(node.fields)), 0))
    return "\n".join(_body(node, 0)).strip()


# --------------------------------------------------------------------------- lab values

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_VALUE_RE = re.compile(
    rf"^(?P<cmp>[<>]=?|[≤≥])?\s*(?P<a>[-+]?(?:{_NUM}))"
    rf"(?:\s*(?P<sep>[-–—/])\s*(?P<b>{_NUM}))?(?P<rest>.*)$"
)
_RANGE_RE = re.compile(
    rf"^(?P<prefix>(?:normal|reference|ref\.?|nl)(?:\s+(?:range|values?|interval))?|range)?\s*[:=]?\s*"
    rf"(?:(?P<lo>[-+]?(?:{_NUM}))\s*(?:-|–|—|to)\s*(?P<hi>[-+]?(?:{_NUM}))"
    rf"|(?P<cmp>[<>]=?|[≤≥])\s*(?P<x>[-+]?(?:{_NUM})))\s*(?P<unit>.*)$",
    re.IGNORECASE,
)
_PAREN_RE = re.compile(r"\(([^()]*)\)")
_UNIT_CHARS = set("/%°μµ^³²")
_UNIT_TOKEN_RE = re.compile(r"^[A-Za-z%°μµ/][A-Za-z0-9%°μµ/^³²·.*\-]*$")
_UNIT_WORDS = {
    "g",
    "gm",
    "mg",
    "mcg",
    "ug",
    "ng",
    "pg",
    "kg",
    "lb",
    "lbs",
    "oz",
    "l",
    "ml",
    "dl",
    "ul",
    "fl",
    "mmol",
    "umol",
    "nmol",
    "mol",
    "meq",
    "iu",
    "u",
    "mu",
    "miu",
    "sec",
    "secs",
    "second",
    "seconds",
    "s",
    "ms",
    "min",
    "mins",
    "minute",
    "minutes",
    "h",
    "hr",
    "hrs",
    "hour",
    "hours",
    "day",
    "days",
    "wk",
    "wks",
    "week",
    "weeks",
    "mo",
    "month",
    "months",
    "yr",
    "yrs",
    "year",
    "years",
    "mm",
    "cm",
    "m",
    "mmhg",
    "bpm",
    "copies",
    "cells",
    "units",
    "mosm",
    "kpa",
    "db",
    "decibels",
    "hz",
    "mv",
    "beats",
    "breaths",
    "degrees",
    "titer",
}
_UNIT_SECOND = {"hg", "h2o"}  # "mm Hg", "cm H2O"


def _num(text: str) -> float | None:
    try:
        num = float(text.replace(",", ""))
    except ValueError:
        return None
    return num if math.isfinite(num) else None


def _unit_like(token: str) -> bool:
    if not _UNIT_TOKEN_RE.match(token):
        return False
    if _UNIT_CHARS & set(token):
        return True
    return re.sub(r"\d+$", "", token).lower() in _UNIT_WORDS


def _parse_ref(text: str, unit: str | None, need_prefix: bool) -> tuple[float | None, float | None] | None:
    """``normal range: 2-6%`` / ``<5`` -> (low, high); ``None`` unless it reads cleanly."""
    m = _RANGE_RE.match(text.strip())
    if not m or (need_prefix and not m["prefix"]):
        return None
    tail = m["unit"].strip().rstrip(".")
    if tail and (unit is None or tail.replace(" ", "") != unit.replace(" ", "")):
        return None
    if m["lo"] is not None:
        lo, hi = _num(m["lo"]), _num(m["hi"])
        if lo is None or hi is None or lo > hi:
            return None
        return lo, hi
    x = _num(m["x"])
    if x is None:
        return None
    return (x, None) if m["cmp"] in (">", ">=", "≥") else (None, x)


def _parse_value(text: str) -> dict[str, Any] | None:
    """Split ``"15,000 /μL (elevated)"`` into LabItem fields; ``None`` when not numeric-looking.

    ``value`` is the number (or range/ratio/comparison) as written, ``valuenum`` its
    float when it is a plain number, ``unit`` the unit word that follows, a
    parenthesis that states a normal range becomes ``ref_low``/``ref_high`` and any
    other parenthesis or trailing words become ``comment``.
    """
    m = _VALUE_RE.match(text)
    if not m:
        return None
    rest = m["rest"]
    if rest and not (rest[0] in " (" or rest[0] in _UNIT_CHARS or rest[0].isalpha()):
        return None
    outside = _PAREN_RE.sub(" ", rest).strip()
    tokens = outside.split()
    unit: str | None = None
    used = 0
    if tokens:
        first = tokens[0].rstrip(".,;")
        if not _unit_like(first):
            return None
        unit, used = first, 1
        if len(tokens) > 1 and first.lower() in ("mm", "cm") and tokens[1].rstrip(".,;").lower() in _UNIT_SECOND:
            unit, used = f"{first} {tokens[1].rstrip('.,;')}", 2
    comments: list[str] = []
    ref: tuple[float | None, float | None] | None = None
    for inner in _PAREN_RE.findall(rest):
        inner = inner.strip()
        if not inner:
            continue
        parsed = _parse_ref(inner, unit, need_prefix=True) if ref is None else None
        if parsed is not None:
            ref = parsed
        else:
            comments.append(inner)
    leftover = " ".join(tokens[used:]).strip(" ,;")
    if leftover:
        comments.append(leftover)
    plain = m["cmp"] is None and m["sep"] is None
    fields: dict[str, Any] = {
        "value": _one_line(text[: m.start("rest")]),
        "valuenum": _num(m["a"]) if plain else None,
        "unit": unit,
        "comment": "; ".join(comments) or None,
    }
    if ref is not None:
        fields["ref_low"], fields["ref_high"] = ref
    return fields


def _leaf_numeric(leaf: _Leaf) -> bool:
    return leaf.num is not None or _parse_value(leaf.text) is not None


def _walk(node: _Node, path: list[str]) -> Iterator[tuple[list[str], _Leaf | _Analyte]]:
    if isinstance(node, _Group):
        sub = [*path, node.label] if node.label else path
        for child in node.children:
            yield from _walk(child, sub)
    else:
        yield ([*path, node.label] if node.label else path), node


def _leaves(root: _Node) -> list[tuple[list[str], _Leaf | _Analyte]]:
    """Analyte-level leaves of an exam with their label paths (the exam's own label excluded)."""
    if isinstance(root, _Group):
        return [p for child in root.children for p in _walk(child, [])]
    return [([], root)]


def _item_name(path: list[str], exam_name: str) -> str:
    name = _one_line(", ".join(path)).replace(": ", " - ") or exam_name.replace(": ", " - ")
    if name in LAB_KEYS:
        name = f"{exam_name.replace(': ', ' - ')} {name.lower()}"
    return name


def _leaf_fields(leaf: _Leaf) -> dict[str, Any]:
    if leaf.num is not None:
        return {"value": leaf.text, "valuenum": leaf.num}
    return _parse_value(leaf.text) or {"value": leaf.text}


def _item(path: list[str], node: _Leaf | _Analyte, exam_name: str) -> LabItem:
    if isinstance(node, _Leaf):
        fields = _leaf_fields(node)
    else:
        fields = _leaf_fields(node.value)
        if node.unit is not None:
            if fields.get("unit") not in (None, node.unit):
                fields = {"value": node.value.text, "valuenum": None}
            fields["unit"] = node.unit
        notes = [fields["comment"]] if fields.get("comment") else []
        if node.ref is not None:
            ref = _parse_ref(node.ref, fields.get("unit"), need_prefix=False)
            if ref is not None:
                fields["ref_low"], fields["ref_high"] = ref
            else:
                notes.append(f"reference range {node.ref}")
        notes.extend(node.notes)
        fields["comment"] = "; ".join(notes) or None
    for key in ("value", "unit"):
        if fields.get(key) is not None:
            fields[key] = _safe_field(fields[key])
    return LabItem(name=_item_name(path, exam_name), **fields)


# --------------------------------------------------------------------------- exam kinds

_MICRO_RE = re.compile(r"\b(cultures?|gram|stains?|staining|pcr|scrapings?|afb|koh)\b")
_RADIOLOGY_RE = re.compile(
    r"\b(x ?rays?|radiographs?|radiography|ct|cta|mri|mra|ultrasound|ultrasonography|sonography|"
    r"doppler|echocardiogram|echocardiography|echo|mammogram|mammography|imaging|angiogram|angiography|"
    r"pyelogram|barium|scan|pet|fluoroscopy|scintigraphy|dexa|venogram|cholangiogram)\b"
)
_OTHER_RE = re.compile(
    r"\b(ecg|ekg|electrocardiogram|electrocardiography|eeg|electroencephalogram|electroencephalography|"
    r"emg|electromyography|nerve conduction|audiometry|audiology|audiogram|hearing|spirometry|"
    r"pulmonary function|biopsy|biopsies|histopathology|histology|cytology|bone marrow|\w+oscopy|"
    r"polysomnography|sleep|assessment|evaluation|questionnaire|checklists?|psychological|psychiatric|"
    r"cognitive|consult|consultation|manoeuvre|maneuver|vestibular|videonystagmography|autonomic|"
    r"stress test|tilt table|diary)\b"
)


def classify(name: str) -> ExamKind:
    """Exam kind from a test's name: microbiology, radiology, other procedures, else lab."""
    text = _norm(name.replace("-", " "))
    if _MICRO_RE.search(text):
        return "microbiology"
    if _RADIOLOGY_RE.search(text):
        return "radiology"
    if _OTHER_RE.search(text):
        return "other"
    return "lab"


# --------------------------------------------------------------------------- profile

_AGE_RES = (
    re.compile(r"\b(\d{1,3})[\s-]*(?:years?|yrs?|y)[\s-]*(?:old|/o)\b", re.IGNORECASE),
    re.compile(r"\b(\d{1,3})\s*-?\s*y\.?\s?o\b\.?", re.IGNORECASE),
    re.compile(r"\bage[d:]?\s*:?\s*(\d{1,3})\b(?!\s*(?:months?|weeks?|days?|hours?|mo|wk))", re.IGNORECASE),
)
_SEX_RE = re.compile(
    r"\b(?P<f>female|woman|women|girl|lady|gravida|nulliparous|primigravida|multiparous|pregnant|postpartum)\b"
    r"|\b(?P<m>male|man|men|boy|gentleman)\b"
    r"|\b(?:sex|gender)\s*[:=]?\s*(?:(?P<f2>f)|(?P<m2>m))\b",
    re.IGNORECASE,
)
_PLAIN_DEMOGRAPHICS = re.compile(r"^\d{1,3}-year-old (?:male|female|man|woman|boy|girl)\.?$", re.IGNORECASE)


def parse_age(text: str) -> int | None:
    """Age in whole years (``"35-year-old female"`` -> 35); ``None`` for months, days, newborns."""
    for rx in _AGE_RES:
        m = rx.search(text)
        if m:
            age = int(m.group(1))
            return age if age <= 130 else None
    return None


def parse_sex(text: str) -> str | None:
    """``"F"``/``"M"`` from the first sex word in the text (``None`` for "child", "student")."""
    m = _SEX_RE.search(text)
    if not m:
        return None
    return "F" if (m["f"] or m["f2"]) else "M"


def _profile_field(key: str) -> str:
    """Which profile slot a ``Patient_Actor`` key fills (``"extra"`` for none)."""
    nk = _norm(key)
    if "demograph" in nk:
        return "demographics"
    if "symptom" in nk and "review" not in nk:
        return "symptoms"
    if "allerg" in nk:
        return "allergies"
    if "family" in nk:
        return "family"
    if "social" in nk:
        return "social"
    if "review of systems" in nk or nk == "ros":
        return "ros"
    if "past medical" in nk or nk in ("pmh", "medical history"):
        return "pmh"
    if nk in ("history", "history of present illness", "present illness", "hpi", "present history"):
        return "hpi"
    return "extra"


def _build_profile(actor: Any) -> Profile:
    slots: dict[str, list[str]] = {}
    extra: list[str] = []
    hpi_extra: list[str] = []
    cc: str | None = None
    if not isinstance(actor, dict):
        actor = {"History": actor} if actor is not None else {}
    for key, value in actor.items():
        slot = _profile_field(key)
        if slot == "symptoms" and isinstance(value, dict):
            for k, v in value.items():
                nk = _norm(k)
                text = _inline(v)
                if text is None:
                    continue
                if cc is None and any(w in nk for w in ("primary", "chief", "main", "presenting")):
                    cc = text
                else:
                    hpi_extra.append(f"{_label(k)}: {text}")
            continue
        text = _inline(value)
        if text is None:
            continue
        if slot == "symptoms":
            cc = text if cc is None else f"{cc}; {text}"
        elif slot == "extra":
            extra.append(f"{_label(key)}: {text}")
        elif slot == "ros":
            hpi_extra.append(f"{_label(key)}: {text}")
        else:
            slots.setdefault(slot, []).append(text)
    demo = "; ".join(slots.get("demographics", []))
    hpi: list[str] = []
    if demo and not _PLAIN_DEMOGRAPHICS.match(demo):
        hpi.append(f"Demographics: {demo}")
    hpi.extend(slots.get("hpi", []))
    hpi.extend(hpi_extra)
    hpi.extend(extra)

    def joined(slot: str) -> str | None:
        return "\n".join(slots[slot]) if slot in slots else None

    return Profile(
        sex=parse_sex(demo) if demo else None,
        age=parse_age(demo) if demo else None,
        chief_complaint=cc,
        history_of_present_illness="\n".join(hpi) or None,
        past_medical_history=joined("pmh"),
        social_history=joined("social"),
        family_history=joined("family"),
        allergies=joined("allergies"),
    )


def _diagnosis(value: Any) -> str | None:
    """Correct_Diagnosis as text: a string, or one line per listed diagnosis."""
    if isinstance(value, list):
        lines = [t for t in (_inline(v) for v in value) if t]
    elif isinstance(value, dict):
        lines = [f"{_label(k)}: {t}" for k, v in value.items() if (t := _inline(v))]
    else:
        lines = [t] if (t := _scalar_text(value)) else []
    return "\n".join(lines) or None


# --------------------------------------------------------------------------- exams


@dataclass
class _ExamStats:
    sections: int = 0
    dropped: Counter = field(default_factory=Counter)


def _unique(name: str, used: set[str]) -> str:
    if name not in used:
        return name
    n = 2
    while f"{name} ({n})" in used:
        n += 1
    return f"{name} ({n})"


def _test_exam(name: str, node: _Node) -> Exam:
    kind = classify(name)
    if kind == "lab":
        leaves = _leaves(node)
        numeric = any(_leaf_numeric(n.value if isinstance(n, _Analyte) else n) for _, n in leaves)
        if numeric:
            try:
                items = [_item(path, n, name) for path, n in leaves]
                return Exam(name=name, kind=kind, group=TEST_GROUP, items=items)
            except ValidationError:
                pass  # an analyte the schema refuses: keep the whole test as text
    return Exam(name=name, kind=kind, group=TEST_GROUP, result=_render_text(node))


# Section names that only wrap several tests ("Imaging": {"Chest CT": {...}, "MRI": {...}}): each child
# that is itself a structured result becomes its own exam, named as a clinician would order it.
_WRAPPER_WORDS = {
    "imaging",
    "tests",
    "test",
    "studies",
    "work",
    "laboratory",
    "labs",
    "lab",
    "additional",
    "other",
    "special",
    "diagnostic",
    "blood",
    "investigations",
    "results",
}


def _split_wrappers(sections: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for label, content in sections:
        words = set(_norm(label).split())
        if (
            words
            and words <= _WRAPPER_WORDS
            and isinstance(content, dict)
            and len(content) >= 1
            and all(isinstance(v, dict) and v and _as_analyte(None, v) is None for v in content.values())
        ):
            out.extend((_label(k) or label, v) for k, v in content.items())
        else:
            out.append((label, content))
    return out


def _build_exams(osce: dict, stats: _ExamStats) -> list[Exam]:
    exams: list[Exam] = []
    used: set[str] = set()
    plan = [(PE_GROUP, s) for s in _sections(_get(osce, "physical examination findings"), "Physical Examination")]
    plan += [(TEST_GROUP, s) for s in _split_wrappers(_sections(_get(osce, "test results"), "Test Results"))]
    for group, (label, content) in plan:
        stats.sections += 1
        node = _tree(label, content)
        if node is None:
            stats.dropped["empty section"] += 1
            continue
        base = f"PE: {label}" if group == PE_GROUP else label
        name = _unique(base, used)
        try:
            if group == PE_GROUP:
                exam = Exam(name=name, kind="physical", group=PE_GROUP, result=_render_text(node))
            else:
                exam = _test_exam(name, node)
        except ValidationError:
            stats.dropped["invalid exam"] += 1
            continue
        used.add(name)
        exams.append(exam)
    return exams


def _get(obj: dict, key: str) -> Any:
    """``obj[key]`` matching keys case- and underscore-insensitively."""
    for k, v in obj.items():
        if _norm(k) == key:
            return v
    return None


# --------------------------------------------------------------------------- public API


def osce_to_case(record: dict, case_id: str, *, source: str = SOURCE) -> Case | str:
    """Convert one decoded OSCE record; returns the case, or the reason it was dropped.

    ``record`` is ``{"OSCE_Examination": {...}}`` or the inner object itself.
    ``subject_key`` is a hash of the record's canonical JSON, so identical records
    (duplicates) share a key and always land in the same split.
    """
    case, reason, _ = _convert(record, case_id, source)
    return case if case is not None else reason  # type: ignore[return-value]


def _osce(record: Any) -> dict | None:
    if not isinstance(record, dict):
        return None
    inner = _get(record, "osce examination")
    if isinstance(inner, dict):
        return inner
    return record if _get(record, "patient actor") is not None else None


def _convert(record: dict, case_id: str, source: str) -> tuple[Case | None, str | None, _ExamStats]:
    stats = _ExamStats()
    osce = _osce(record)
    if osce is None:
        return None, "not an OSCE record", stats
    diagnosis = _diagnosis(_get(osce, "correct diagnosis"))
    if diagnosis is None:
        return None, "no diagnosis", stats
    exams = _build_exams(osce, stats)
    if not exams:
        return None, "no exams", stats
    canonical = json.dumps(osce, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    try:
        case = Case(
            case_id=case_id,
            source=source,
            split=None,
            subject_key=f"{source}:{hashlib.sha1(canonical.encode('utf-8')).hexdigest()}",
            profile=_build_profile(_get(osce, "patient actor")),
            final_diagnosis=diagnosis,
            exams=exams,
        )
    except ValidationError:
        return None, "invalid case", stats
    return case, None, stats


def build_agentclinic_cases(path: str | Path, *, source: str = SOURCE) -> SourceResult:
    """Convert an AgentClinic OSCE JSONL file (any file of that format) into cases.

    Case ids are ``{source}:{line number}`` (1-based, blank lines skipped but
    counted); pass another ``source`` (e.g. ``"agentclinic-mimiciv"``) for a
    second file so ids stay unique.  Log steps: ``parse`` (records read),
    ``build`` (cases dropped with reasons ``no diagnosis``, ``no exams``,
    ``invalid case``) and ``exams`` (top-level sections of kept cases; reasons
    ``empty section``, ``invalid exam``).

    Raises :class:`InputError` for a missing file, a line that is not JSON, or a
    JSON line that is not an OSCE record.
    """
    path = Path(path)
    records: list[tuple[int, dict]] = []
    for lineno, obj in iter_json_lines(path, "AgentClinic file"):
        if _osce(obj) is None:
            raise InputError(f"{path}:{lineno}: not an AgentClinic OSCE record (no 'OSCE_Examination' object)")
        records.append((lineno, obj))  # type: ignore[arg-type]

    log = FilterLog()
    log.add("parse", "case", len(records), {})
    cases: list[Case] = []
    dropped: Counter = Counter()
    sections = 0
    section_drops: Counter = Counter()
    for lineno, obj in records:
        case, reason, stats = _convert(obj, f"{source}:{lineno}", source)
        if case is None:
            dropped[reason] += 1
            continue
        cases.append(case)
        sections += stats.sections
        section_drops.update(stats.dropped)
    log.add("build", "case", len(records), dropped)
    log.add("exams", "exam", sections, section_drops)
    return SourceResult(cases=cases, inputs=[path], log=log, source=source)
