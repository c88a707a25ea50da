"""One MIMIC-IV admission's rows -> one case, or the reason it is dropped (pure: no I/O, no state).

:func:`assemble_admission` takes an :class:`Admission` (everything the tables hold about one
hospital admission, its timed rows already matched to its window) and returns an
:class:`Assembly`: the case or the drop reason, and how many rows each outcome used or dropped,
so the caller can account for every row.  The rules are listed in :mod:`diaggym.sources.mimic_iv`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from diaggym.cases import Case, Exam, LabItem, Profile
from diaggym.catalog import PanelCatalog
from diaggym.sources.discharge_notes import DischargeNote
from diaggym.sources.mimic_read import VITALS
from diaggym.text_rules import norm, one_line, text_block

SOURCE = "mimic-iv"
BLOOD_FLUIDS = {"blood", "plasma", "serum"}
KIND_ORDER = {"physical": 0, "lab": 1, "microbiology": 2, "radiology": 3, "other": 4}
REPEAT = "repeat of an exam earlier in the case"
# Where a kept case's final diagnosis came from (counted in the dataset card).
DX_NOTE = "the note's Discharge Diagnosis section"
DX_ICD_NO_NOTES = "ICD long titles (the data has no discharge notes)"
DX_ICD_NO_SECTION = "ICD long titles (the note has no Discharge Diagnosis section)"
_DX_SUBHEADER = re.compile(r"(?i)^(?:primary|secondary)?\s*(?:diagnos[ie]s)?\s*:\s*")


class LabRow(NamedTuple):
    specimen_id: int | None
    charttime: datetime
    itemid: int | None
    value: str | None
    valuenum: float | None
    valueuom: str | None
    ref_range_lower: float | None
    ref_range_upper: float | None
    flag: str | None
    comments: str | None


class MicroRow(NamedTuple):
    micro_specimen_id: int | None
    test_name: str | None
    time: datetime
    spec_type_desc: str | None
    org_name: str | None
    quantity: str | None
    ab_name: str | None
    interpretation: str | None
    dilution_comparison: str | None
    dilution_value: str | None
    comments: str | None


class RadiologyRow(NamedTuple):
    charttime: datetime
    exam_name: str | None
    text: str | None


class Patient(NamedTuple):
    gender: str | None
    anchor_age: int | None
    anchor_year: int | None


@dataclass(frozen=True)
class Admission:
    """Everything the tables hold about one admission (timed rows: only those in its window)."""

    subject_id: int
    hadm_id: int
    admittime: datetime
    patient: Patient | None = None
    service: str | None = None
    icd_titles: tuple[str, ...] = ()
    triage: Mapping[str, Any] | None = None  # ED triage row (VITALS columns, chiefcomplaint)
    first_vitals: Mapping[str, Any] | None = None  # first ED vital-sign row with a value
    has_notes: bool = False  # the data has discharge notes (then a case needs one)
    note: DischargeNote | None = None
    labs: Sequence[LabRow] = ()  # sorted by specimen
    micro: Sequence[MicroRow] = ()  # sorted by specimen and test
    radiology: Sequence[RadiologyRow] = ()  # sorted by time


@dataclass
class Assembly:
    case: Case | None = None
    drop: str | None = None
    diagnosis_from: str | None = None
    rows_used: Counter = field(default_factory=Counter)  # kind -> rows in the case
    row_drops: Counter = field(default_factory=Counter)  # (kind, reason) -> rows
    exam_drops: Counter = field(default_factory=Counter)  # reason -> timed exams
    exams_kept: int = 0


class _Timed(NamedTuple):
    time: datetime
    exam: Exam
    kind: str
    rows: int


def assemble_admission(
    adm: Admission, catalog: PanelCatalog, labinfo: Mapping[int, tuple[str, str | None]]
) -> Assembly:
    """The case of one admission, or the first rule it fails; every row is counted in the result.

    ``labinfo``: itemid -> (analyte name, fluid) from ``d_labitems``.
    """
    out = Assembly()
    timed = (
        _lab_exams(adm.labs, catalog, labinfo, out.row_drops)
        + _micro_exams(adm.micro, out.row_drops)
        + _radiology_exams(adm.radiology)
    )

    def drop(reason: str) -> Assembly:
        out.drop = reason
        out.exam_drops[f"case excluded: {reason}"] += len(timed)
        for e in timed:
            out.row_drops[(e.kind, f"case excluded: {reason}")] += e.rows
        return out

    if adm.has_notes and adm.note is None:
        return drop("no discharge note")
    diagnosis, out.diagnosis_from = final_diagnosis(adm)
    if not diagnosis:
        return drop("no diagnosis")
    pe = physical_exam(adm)
    if not pe:
        return drop("no physical exam in the note" if adm.has_notes else "no physical exam")
    if not timed:
        return drop("no exam in the 24 h before admission")
    profile = _profile(adm)
    history = norm(" ".join(x for x in (profile.note, profile.chief_complaint) if x))
    primary = norm(primary_diagnosis(diagnosis))
    if len(primary) >= 4 and primary in history:
        return drop("diagnosis stated in the history")

    timed.sort(key=lambda e: (e.time, KIND_ORDER[e.kind], e.exam.name))
    seen = {x.name for x in pe}
    exams = list(pe)
    groups: dict[datetime, int] = {}
    for e in timed:
        if e.exam.name in seen:  # the first occurrence of each exam wins
            out.exam_drops[REPEAT] += 1
            out.row_drops[(e.kind, REPEAT)] += e.rows
            continue
        seen.add(e.exam.name)
        e.exam.group = groups.setdefault(e.time, len(groups) + 1)
        e.exam.time = e.time.isoformat(timespec="seconds")
        exams.append(e.exam)
        out.rows_used[e.kind] += e.rows
        out.exams_kept += 1
    out.case = Case(
        case_id=f"{SOURCE}:{adm.hadm_id}",
        source=SOURCE,
        subject_key=f"{SOURCE}:{adm.subject_id}",
        profile=profile,
        final_diagnosis=diagnosis,
        exams=exams,
    )
    return out


def final_diagnosis(adm: Admission) -> tuple[str, str]:
    """(diagnosis text, where it came from): the note's section, else the ICD long titles by seq_num."""
    if adm.note is not None and adm.note.discharge_diagnosis:
        return adm.note.discharge_diagnosis, DX_NOTE
    return "\n".join(adm.icd_titles), DX_ICD_NO_SECTION if adm.has_notes else DX_ICD_NO_NOTES


def primary_diagnosis(diagnosis: str) -> str:
    """The first diagnosis written, past sub-headers such as ``Primary:`` and list bullets."""
    for line in diagnosis.split("\n"):
        text = _DX_SUBHEADER.sub("", line.strip().lstrip("-*•# ").strip(), count=1).strip()
        if text:
            return text
    return ""


def physical_exam(adm: Admission) -> list[Exam]:
    """Group 0: the note's exam items when the data has notes, else the ED triage vital signs."""
    if adm.has_notes:
        items = adm.note.physical_exam if adm.note is not None else ()
        return [Exam(name=f"PE: {name}", kind="physical", group=0, result=text) for name, text in items]
    src = adm.triage if adm.triage and any(adm.triage.get(c) for c, _, _ in VITALS) else adm.first_vitals
    if not src:
        return []
    lines = []
    for col, label, unit in VITALS:
        v = one_line(src.get(col))
        if v is not None:
            lines.append(f"{label}: {v}{' ' + unit if unit else ''}")
    if one_line(src.get("rhythm")):
        lines.append(f"Rhythm: {one_line(src['rhythm'])}")
    return [Exam(name="PE: Vital Signs", kind="physical", group=0, result="\n".join(lines))] if lines else []


def _profile(adm: Admission) -> Profile:
    p = adm.patient
    age = None
    if p is not None and p.anchor_age is not None and p.anchor_year is not None:
        age = min(max(int(p.anchor_age) + (adm.admittime.year - int(p.anchor_year)), 0), 130)
    return Profile(
        note=adm.note.header if adm.note is not None else None,
        sex=one_line(p.gender) if p is not None else None,
        age=age,
        service=one_line(adm.service),
        chief_complaint=one_line((adm.triage or {}).get("chiefcomplaint")),
    )


def _runs(rows: Sequence, key) -> list[list]:
    """Consecutive rows with equal ``key(row)``."""
    runs: list[list] = []
    for r in rows:
        if runs and key(r) == key(runs[-1][0]):
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def _lab_exams(rows: Sequence[LabRow], catalog: PanelCatalog, labinfo, row_drops: Counter) -> list[_Timed]:
    """One exam per lab panel / single analyte of each specimen."""
    out: list[_Timed] = []
    for specimen in _runs(rows, lambda r: r.specimen_id):
        by_item: dict[int, LabItem] = {}
        for r in specimen:
            if r.itemid not in labinfo:
                row_drops[("lab", "itemid not in d_labitems")] += 1
            elif r.itemid in by_item:
                row_drops[("lab", "analyte repeated on the same specimen")] += 1
            elif r.value is None and r.valuenum is None and r.comments is None:
                row_drops[("lab", "no value, numeric value or comment")] += 1
            else:
                # Fields were made diaggym-v1-safe in one vectorised pass (mimic_read.item_field_expr); the
                # round trip of every written case is tested, so skip per-field validation here.
                by_item[r.itemid] = LabItem.model_construct(
                    name=labinfo[r.itemid][0], value=r.value, valuenum=r.valuenum, unit=r.valueuom,
                    ref_low=r.ref_range_lower, ref_high=r.ref_range_upper, flag=r.flag, comment=r.comments,
                )  # fmt: skip
        for panel, ids in catalog.cover(by_item):
            items = [by_item[i] for i in ids]
            name = panel
            if not panel:
                label, fluid = labinfo[ids[0]]
                name = f"{label} ({fluid})" if fluid and fluid.lower() not in BLOOD_FLUIDS else label
            exam = Exam.model_construct(name=name, kind="lab", group=1, time=None, items=items, result=None)
            out.append(_Timed(specimen[0].charttime, exam, "lab", len(items)))
    return out


def _micro_exams(rows: Sequence[MicroRow], row_drops: Counter) -> list[_Timed]:
    """One free-text exam per (specimen, test)."""
    out: list[_Timed] = []
    for group in _runs(rows, lambda r: (r.micro_specimen_id, r.test_name)):
        name = one_line(group[0].test_name)
        if name is None:
            row_drops[("microbiology", "no test name")] += len(group)
            continue
        exam = Exam(name=name, kind="microbiology", group=1, result=micro_result(group))
        out.append(_Timed(min(r.time for r in group), exam, "microbiology", len(group)))
    return out


def _radiology_exams(rows: Sequence[RadiologyRow]) -> list[_Timed]:
    out = []
    for r in rows:
        text = text_block(r.text)
        if text is not None:
            name = one_line(r.exam_name) or "Radiology Report"
            out.append(_Timed(r.charttime, Exam(name=name, kind="radiology", group=1, result=text), "radiology", 1))
    return out


def micro_result(rows: Sequence[MicroRow]) -> str:
    """Result text of one microbiology test: specimen, organisms with susceptibilities, comments.

    ``rows`` are sorted by isolate and antibiotic.
    """
    lines: list[str] = []
    spec = one_line(rows[0].spec_type_desc)
    if spec:
        lines.append(f"Specimen: {spec}")
    seen_org: set[tuple] = set()
    seen_ab: set[tuple] = set()
    for r in rows:
        org, qty = one_line(r.org_name), one_line(r.quantity)
        if org is None:
            continue
        if (org, qty) not in seen_org:
            seen_org.add((org, qty))
            lines.append(f"Organism: {org}" + (f" ({qty})" if qty else ""))
        ab = one_line(r.ab_name)
        key = (org, qty, ab, r.interpretation, r.dilution_comparison, r.dilution_value)
        if ab is None or key in seen_ab:
            continue
        seen_ab.add(key)
        mic = "".join(x for x in (one_line(r.dilution_comparison), one_line(r.dilution_value)) if x)
        detail = " ".join(x for x in (one_line(r.interpretation), f"(MIC {mic})" if mic else None) if x)
        lines.append(f"  {ab}: {detail}" if detail else f"  {ab}")
    if not seen_org:
        lines.append("No organism reported.")
    for c in dict.fromkeys(text_block(r.comments) for r in rows):
        if c:
            lines.append(f"Comments: {c}")
    return "\n".join(lines)
