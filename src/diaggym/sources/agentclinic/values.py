"""AgentClinic lab values: ``"15,000 /μL (elevated)"`` -> value, numeric value, unit, range, comment.

A test with at least one numeric-looking result becomes analytes (:func:`lab_item`); the unit words
that make a token after a number a unit are data (``unit_words.txt``).
"""

from __future__ import annotations

import math
import re
from importlib.resources import files
from typing import Any

from diaggym.cases import LabItem
from diaggym.sources.agentclinic.tree import Analyte, Leaf
from diaggym.text_rules import escape_lab_keys, item_name, one_line


def _load_unit_words() -> frozenset[str]:
    text = files("diaggym.sources.agentclinic").joinpath("unit_words.txt").read_text(encoding="utf-8")
    return frozenset(w.strip().lower() for w in text.splitlines() if w.strip() and not w.startswith("#"))


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
_UNIT_WORDS = _load_unit_words()
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


def parse_value(text: str) -> dict[str, Any] | None:
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
        "value": one_line(text[: m.start("rest")]),
        "valuenum": _num(m["a"]) if plain else None,
        "unit": unit,
        "comment": "; ".join(comments) or None,
    }
    if ref is not None:
        fields["ref_low"], fields["ref_high"] = ref
    return fields


def leaf_numeric(leaf: Leaf) -> bool:
    return leaf.num is not None or parse_value(leaf.text) is not None


def _leaf_fields(leaf: Leaf) -> dict[str, Any]:
    if leaf.num is not None:
        return {"value": leaf.text, "valuenum": leaf.num}
    return parse_value(leaf.text) or {"value": leaf.text}


def lab_item(path: list[str], node: Leaf | Analyte, exam_name: str) -> LabItem:
    if isinstance(node, Leaf):
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
            fields[key] = escape_lab_keys(fields[key])
    return LabItem(name=item_name(", ".join(path), fallback=exam_name), **fields)
