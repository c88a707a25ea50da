"""Contract 1: the case, DiagGym's dataset row.

A case is one patient encounter: a profile, the final diagnosis, and the
time-ordered examinations with their results.  Cases are stored one per line
in JSONL (or as Parquet with one JSON column) and carry a ``schema`` version so
that readers can refuse rows written by an incompatible writer.

Validation is strict because everything downstream (serialization, training,
evaluation, serving) trusts these rows: errors name the file, the line and the
field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diaggym.atomic import atomic_file
from diaggym.errors import InputError

SCHEMA = "diaggym.case/1"
SEP = "<SEP>"
# The reference appends this literal to every training text: Qwen2.5's end-of-document token.  A
# Qwen2.5-*Instruct* tokenizer's ``eos_token`` is ``<|im_end|>``, so the tokenizer's EOS is not used blindly.
END_OF_TEXT = "<|endoftext|>"
# The format's control strings: inside case text they would end a result, or the case, early.
MARKERS = (SEP, END_OF_TEXT)


def _marker_in(text: str) -> str | None:
    return next((m for m in MARKERS if m in text), None)
ExamKind = Literal["physical", "lab", "microbiology", "radiology", "other"]
Split = Literal["train", "val", "test"]

# Keys of the diaggym-v1 lab line.  Item fields must not contain them, or the
# rendered text could not be parsed back unambiguously.
LAB_KEYS = ("Value", "Numeric Value", "Units", "Reference Range", "Comment")
_KEY_RE = re.compile(r"; (?:" + "|".join(re.escape(k) for k in LAB_KEYS) + r"): ")
_KEY_PREFIXES = tuple(f"{k}: " for k in LAB_KEYS)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class LabItem(_Strict):
    """One analyte of a lab exam, with its reference range and abnormal flag."""

    name: str = Field(min_length=1)
    value: str | None = None
    valuenum: float | None = None
    unit: str | None = None
    ref_low: float | None = None
    ref_high: float | None = None
    flag: str | None = None
    comment: str | None = None

    @field_validator("name", "value", "unit", "comment", "flag")
    @classmethod
    def _single_line(cls, v: str | None, info) -> str | None:
        if v is None:
            return v
        field = info.field_name
        if not v or "\n" in v or "\r" in v or v != v.strip():
            raise ValueError(f"{field} must be one non-empty line without surrounding whitespace")
        if marker := _marker_in(v):
            raise ValueError(f"{field} must not contain {marker}")
        if field == "name" and (": " in v or v in LAB_KEYS):
            raise ValueError("name must not contain ': ' or be a lab key")
        if field in ("value", "unit", "flag") and (_KEY_RE.search(v) or v.startswith(_KEY_PREFIXES)):
            raise ValueError(f"{field} must not contain a lab key such as '; Units: '")
        return v

    @field_validator("valuenum", "ref_low", "ref_high")
    @classmethod
    def _finite(cls, v: float | None, info) -> float | None:
        if v is not None and (v != v or v in (float("inf"), float("-inf"))):
            raise ValueError(f"{info.field_name} must be a finite number")
        return v

    @model_validator(mode="after")
    def _has_content(self) -> LabItem:
        if self.value is None and self.valuenum is None and self.comment is None:
            raise ValueError(f"lab item {self.name!r} has no value, numeric value or comment")
        return self


class Exam(_Strict):
    """One examination and its result: ``items`` for labs, ``result`` text for everything else."""

    name: str = Field(min_length=1)
    kind: ExamKind
    group: int = Field(ge=0)
    time: str | None = None
    items: list[LabItem] | None = None
    result: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if "\n" in v or _marker_in(v) or v != v.strip():
            raise ValueError(f"exam name must be one stripped line without {' or '.join(MARKERS)}")
        return v

    @field_validator("result")
    @classmethod
    def _result(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if marker := _marker_in(v):
            raise ValueError(f"result must not contain {marker}")
        if not v.strip() or v != v.strip():
            raise ValueError("result must be non-empty and stripped")
        return v

    @model_validator(mode="after")
    def _one_payload(self) -> Exam:
        if (self.items is None) == (self.result is None):
            raise ValueError(f"exam {self.name!r} needs exactly one of 'items' or 'result'")
        if self.items is not None and not self.items:
            raise ValueError(f"exam {self.name!r} has an empty 'items' list")
        return self


class Profile(_Strict):
    """What is known before any exam: demographics and history (never the diagnosis)."""

    note: str | None = None
    sex: str | None = None
    age: int | None = Field(default=None, ge=0, le=130)
    service: str | None = None
    allergies: str | None = None
    chief_complaint: str | None = None
    history_of_present_illness: str | None = None
    past_medical_history: str | None = None
    social_history: str | None = None
    family_history: str | None = None

    @field_validator("*")
    @classmethod
    def _no_markers(cls, v, info):
        if isinstance(v, str) and (marker := _marker_in(v)):
            raise ValueError(f"profile {info.field_name} must not contain {marker}")
        return v


class Case(_Strict):
    """A whole encounter; see docs/architecture.md, contract 1."""

    schema_: Literal["diaggym.case/1"] = Field(default=SCHEMA, alias="schema")
    case_id: str = Field(min_length=1)
    source: str = Field(min_length=1)
    split: Split | None = None
    subject_key: str = Field(min_length=1)
    profile: Profile
    final_diagnosis: str = Field(min_length=1)
    exams: list[Exam] = Field(min_length=1)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _exams_ordered(self) -> Case:
        groups = [e.group for e in self.exams]
        if groups != sorted(groups):
            raise ValueError("exams must be ordered by group")
        names = [e.name for e in self.exams]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"exam {dup!r} occurs twice (keep the first occurrence only)")
        if marker := _marker_in(self.final_diagnosis):
            raise ValueError(f"final_diagnosis must not contain {marker}")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(by_alias=True, mode="json")


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<case>"
        parts.append(f"field '{loc}': {e['msg']}")
    return "; ".join(parts)


def parse_case(obj: dict, where: str = "") -> Case:
    """Validate one decoded case; ``where`` (e.g. ``file:line``) prefixes errors."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: a case must be a JSON object, got {type(obj).__name__}")
    schema = obj.get("schema")
    if schema != SCHEMA:
        raise InputError(f"{where}: field 'schema' is {schema!r}, expected {SCHEMA!r}")
    try:
        return Case.model_validate(obj)
    except ValidationError as err:
        raise InputError(f"{where}: {_format_validation_error(err)}") from None


def iter_json_lines(path: str | Path, what: str = "case file") -> Iterator[tuple[int, object]]:
    """(line number, decoded JSON) for every non-blank line; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such {what}", path)
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8 text ({err.reason})", path) from None


def iter_jsonl(path: str | Path) -> Iterator[Case]:
    """Stream validated cases from a JSONL file."""
    for lineno, obj in iter_json_lines(path):
        yield parse_case(obj, f"{path}:{lineno}")  # type: ignore[arg-type]


def read_jsonl(path: str | Path) -> list[Case]:
    return list(iter_jsonl(path))


def write_jsonl(cases: Iterable[Case], path: str | Path) -> int:
    """Write cases atomically; returns how many were written."""
    n = 0
    with atomic_file(path) as fh:
        for case in cases:
            fh.write(case.model_dump_json(by_alias=True) + "\n")
            n += 1
    return n


def write_parquet(cases: Iterable[Case], path: str | Path) -> int:
    """Parquet with flat columns for querying plus the whole case as JSON (the lossless copy)."""
    import polars as pl

    rows = [
        {
            "schema": SCHEMA,
            "case_id": c.case_id,
            "source": c.source,
            "split": c.split,
            "subject_key": c.subject_key,
            "n_exams": len(c.exams),
            "case_json": json.dumps(c.to_dict(), ensure_ascii=False),
        }
        for c in cases
    ]
    df = pl.DataFrame(
        rows,
        schema={
            "schema": pl.String,
            "case_id": pl.String,
            "source": pl.String,
            "split": pl.String,
            "subject_key": pl.String,
            "n_exams": pl.Int64,
            "case_json": pl.String,
        },
    )
    with atomic_file(path, "wb") as fh:
        df.write_parquet(fh)
    return len(rows)


def read_parquet(path: str | Path) -> list[Case]:
    import polars as pl

    path = Path(path)
    if not path.is_file():
        raise InputError("no such case file", path)
    try:
        df = pl.read_parquet(path, columns=["case_json"])
    except Exception as err:  # polars raises several types for bad files
        raise InputError(f"not a readable DiagGym Parquet case file ({err})", path) from None
    return [parse_case(json.loads(s), f"{path}:row {i}") for i, s in enumerate(df["case_json"])]


def load_cases(path: str | Path, split: str | None = None) -> list[Case]:
    """Load cases from a ``.jsonl``/``.parquet`` file or a preprocess output folder.

    A folder is read as ``cases.jsonl`` inside it.  ``split`` keeps only that split.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "cases.jsonl"
    cases = read_parquet(path) if path.suffix == ".parquet" else read_jsonl(path)
    if split is not None:
        cases = [c for c in cases if c.split == split]
    return cases
