"""The AgentClinic normaliser: any hand-written JSON value -> a small tree, and the tree -> exam text.

The OSCE parts are written by hand per vignette (dicts, lists of strings, lists of dicts, numbers with
or without units, empty sections).  Nothing here lists keys per case: :func:`tree` turns any JSON value
into leaves, analytes (``{"Value": 13.5, "Units": "g/dL"}``) and groups, and :func:`render_text` writes a
tree as indented ``Key: value`` lines.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from diaggym.serialization import format_number
from diaggym.text_rules import norm, one_line


def key_label(key: Any) -> str | None:
    """A JSON key as a display label: underscores become spaces; ``None`` when empty."""
    return one_line(str(key).replace("_", " "))


def scalar_text(value: Any) -> str | None:
    """A JSON scalar as one line of text (``None`` for null or empty)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):  # str() would write 1e-05, which no diaggym-v1 reader parses
        return format_number(value) if math.isfinite(value) else None
    return one_line(str(value))


def get(obj: dict, key: str) -> Any:
    """``obj[key]`` matching keys by :func:`~diaggym.text_rules.norm` (case, underscores, hyphens ignored)."""
    for k, v in obj.items():
        if norm(str(k)) == key:
            return v
    return None


def _json_number(value: Any) -> float | None:
    """The float of a JSON number (never a bool), when finite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        num = float(value)
    except OverflowError:
        return None
    return num if math.isfinite(num) else None


def _join(parts: list[str]) -> str | None:
    """Join inline parts with ``; `` (just a space after a part that already ends a sentence)."""
    out = ""
    for part in parts:
        out += part if not out else (" " if out[-1] in ".;!?" else "; ") + part
    return out or None


def inline(value: Any) -> str | None:
    """Any JSON value as one line: dicts as ``Key: value; ...``, lists joined with ``; ``."""
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            text = inline(v)
            if text is None:
                continue
            if isinstance(v, dict):
                text = f"({text})"
            name = key_label(k)
            parts.append(f"{name}: {text}" if name else text)
        return _join(parts)
    if isinstance(value, list):
        return _join([t for t in (inline(v) for v in value) if t])
    return scalar_text(value)


# --------------------------------------------------------------------------- normalised tree


@dataclass
class Leaf:
    label: str | None
    text: str
    num: float | None = None  # set when the JSON value itself was a number


@dataclass
class Analyte:
    """A dict such as ``{"Value": 13.5, "Units": "g/dL", "Reference_Range": "12-16"}``."""

    label: str | None
    value: Leaf
    unit: str | None
    ref: str | None
    notes: list[str]
    fields: list[Leaf]  # every key, in order, for free-text rendering


@dataclass
class Group:
    label: str | None
    children: list[Node]
    is_list: bool = False


Node = Leaf | Analyte | Group

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


def name_key(obj: dict) -> Any | None:
    """The key that names a list element (``{"Test": "CBC", ...}``), when it has other keys too."""
    if len(obj) < 2:
        return None
    for k, v in obj.items():
        if norm(k) in _NAME_KEYS and isinstance(v, str) and v.strip():
            return k
    return None


def as_analyte(label: str | None, obj: dict) -> Analyte | None:
    """Read ``obj`` as one analyte when its keys are only value/unit/range/comment keys."""
    if not obj or any(isinstance(v, dict | list) for v in obj.values()):
        return None
    keys = {norm(k): k for k in obj}
    if not set(keys) <= _VALUE_KEYS | _UNIT_KEYS | _RANGE_KEYS | _NOTE_KEYS:
        return None
    value_keys = [keys[k] for k in keys if k in _VALUE_KEYS]
    if len(value_keys) != 1:
        return None
    raw = obj[value_keys[0]]
    text = scalar_text(raw)
    if text is None:
        return None
    unit = ref = None
    notes: list[str] = []
    fields: list[Leaf] = []
    for k, v in obj.items():
        t = scalar_text(v)
        if t is None:
            continue
        fields.append(Leaf(key_label(k), t, _json_number(v)))
        nk = norm(k)
        if nk in _UNIT_KEYS:
            unit = t
        elif nk in _RANGE_KEYS:
            ref = t
        elif nk in _NOTE_KEYS:
            notes.append(t)
    return Analyte(label, Leaf(label, text, _json_number(raw)), unit, ref, notes, fields)


def tree(label: str | None, obj: Any) -> Node | None:
    """Normalise any JSON value; empty values (null, "", {}, []) give ``None``."""
    if isinstance(obj, dict):
        if label is None and (nk := name_key(obj)) is not None:
            label = key_label(obj[nk])
            obj = {k: v for k, v in obj.items() if k != nk}
        analyte = as_analyte(label, obj)
        if analyte is not None:
            return analyte
        children = [c for k, v in obj.items() if (c := tree(key_label(k), v)) is not None]
        if not children:
            return None
        if label is None and len(children) == 1:
            return children[0]
        return Group(label, children)
    if isinstance(obj, list):
        children = [c for v in obj if (c := tree(None, v)) is not None]
        return Group(label, children, is_list=True) if children else None
    text = scalar_text(obj)
    return Leaf(label, text, _json_number(obj)) if text is not None else None


def sections(obj: Any, default: str) -> list[tuple[str, Any]]:
    """Top-level (name, content) pairs of a findings/results object of any shape."""
    if obj is None:
        return []
    if isinstance(obj, dict):
        return [(key_label(k) or default, v) for k, v in obj.items()]
    if not isinstance(obj, list):
        return [(default, obj)]
    out: list[tuple[str, Any]] = []
    loose: list[Any] = []
    for elem in obj:
        if isinstance(elem, dict) and (nk := name_key(elem)) is not None:
            rest = {k: v for k, v in elem.items() if k != nk}
            only = next(iter(rest.values()))
            content = only if len(rest) == 1 and isinstance(only, dict | list) else rest
            out.append((key_label(elem[nk]) or default, content))
        elif isinstance(elem, dict) and len(elem) == 1:
            k, v = next(iter(elem.items()))
            out.append((key_label(k) or default, v))
        elif isinstance(elem, str) and ": " in elem:
            name, _, rest_text = elem.partition(": ")
            out.append((key_label(name) or default, rest_text))
        else:
            loose.append(elem)
    if loose:
        out.append((default, loose))
    return out


# --------------------------------------------------------------------------- free-text rendering


def _lines(node: Node, depth: int) -> list[str]:
    ind = "  " * depth
    if isinstance(node, Leaf):
        return [f"{ind}{node.label}: {node.text}" if node.label else f"{ind}{node.text}"]
    if isinstance(node, Analyte):
        body = [ln for f in node.fields for ln in _lines(f, depth + 1)]
        return [f"{ind}{node.label}:", *body] if node.label else _lines(Group(None, list(node.fields)), depth)
    if node.label:
        return [f"{ind}{node.label}:", *_body(node, depth + 1)]
    return _body(node, depth)


def _body(group: Group, depth: int) -> list[str]:
    out: list[str] = []
    for child in group.children:
        if group.is_list:
            lines = _lines(child, depth + 1)
            lines[0] = "  " * depth + "- " + lines[0].lstrip()
            out.extend(lines)
        else:
            out.extend(_lines(child, depth))
    return out


def render_text(node: Node) -> str:
    """Result text of a whole exam: the exam's own label is the exam name, not repeated."""
    if isinstance(node, Leaf):
        return node.text
    if isinstance(node, Analyte):
        return "\n".join(_lines(Group(None, list(node.fields)), 0))
    return "\n".join(_body(node, 0)).strip()


def _walk(node: Node, path: list[str]) -> Iterator[tuple[list[str], Leaf | Analyte]]:
    if isinstance(node, Group):
        sub = [*path, node.label] if node.label else path
        for child in node.children:
            yield from _walk(child, sub)
    else:
        yield ([*path, node.label] if node.label else path), node


def leaves(root: Node) -> list[tuple[list[str], Leaf | Analyte]]:
    """Analyte-level leaves of an exam with their label paths (the exam's own label excluded)."""
    if isinstance(root, Group):
        return [p for child in root.children for p in _walk(child, [])]
    return [([], root)]
