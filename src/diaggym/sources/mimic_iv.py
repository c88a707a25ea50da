"""MIMIC-IV → cases (contract 1), streaming so that the full database fits one machine.

One case per hospital admission.  Rules, as in the reference work:

* only exams charted in the ``window_hours`` (24) before admission are kept (both ends
  inclusive); emergency-department labs often carry no ``hadm_id``, so rows are matched to
  an admission by patient and time (a row charted to another admission is not taken; a row
  that fits two admissions goes to the one it names, else the nearest admission after it);
* lab analytes measured on one specimen are merged into MIMIC-CDM panels
  (:mod:`diaggym.catalog`); an analyte in no panel is its own exam named by its label (with
  the fluid when it is not blood);
* microbiology: one exam per specimen and test, result text = specimen, each organism with
  its susceptibilities, and the comments;
* with discharge notes (``note/discharge.csv.gz``): the profile is the note before
  ``Physical Exam:``, the final diagnosis the note's whole Discharge Diagnosis section, and
  the physical exam (group 0) the note's admission exam split into named items
  (:mod:`diaggym.sources.discharge_notes`); an admission without a note, or whose note has no
  physical exam, is dropped, as the reference drops cases without a physical exam;
* without notes (the open demo): the profile is demographics, service and the triage chief
  complaint; the final diagnosis the ``diagnoses_icd`` long titles by ``seq_num``; the
  physical exam one ``PE: Vital Signs`` event from ED triage (first ED vital-sign row when
  triage has none).  The card counts which diagnosis source each case used;
* the first occurrence of each exam per case is kept; exams at the same time form a group,
  groups in time order;
* exclusions: no diagnosis, no physical exam, no exam in the window, diagnosis already
  stated in the history.  Every dropped case and row is counted.

Reading is :mod:`diaggym.sources.mimic_read`; one admission's rows become a case in
:func:`diaggym.sources.mimic_assembly.assemble_admission`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import polars as pl
from tqdm.auto import tqdm

from diaggym.cases import Case
from diaggym.catalog import PanelCatalog
from diaggym.sources import FilterLog, SourceResult
from diaggym.sources.mimic_assembly import (
    SOURCE,
    Admission,
    LabRow,
    MicroRow,
    Patient,
    RadiologyRow,
    assemble_admission,
)
from diaggym.sources.mimic_read import VITALS, MimicIVTables, read_mimic_iv
from diaggym.text_rules import item_name, one_line

ROW_STEPS = (  # (kind, filter step name)
    ("lab", "labevents rows"),
    ("microbiology", "microbiologyevents rows"),
    ("radiology", "radiology note rows"),
)
NO_NOTES_REMARK = (
    "No discharge notes in the data: the profile is demographics, service and the triage chief complaint, "
    "the physical exam is one 'PE: Vital Signs' event from ED triage, and the final diagnosis is the ICD "
    "long titles. The reference builds all three from the discharge note (and drops cases without a note "
    "physical exam); these cases are not the text the released weights saw."
)


def build_mimic_iv_cases(
    input_dir: str | Path, mapping: str | Path | None = None, window_hours: float = 24.0, progress: bool = False
) -> SourceResult:
    """Build cases from a MIMIC-IV-layout folder (``hosp/``, ``ed/``, optional ``note/``)."""
    catalog = PanelCatalog.from_mapping(mapping)
    tables = read_mimic_iv(Path(input_dir), timedelta(hours=window_hours), progress)
    log = FilterLog()
    provenance: dict[str, Counter] = {"final diagnosis": Counter(), "physical exam": Counter()}
    remarks = [NO_NOTES_REMARK] if tables.notes is None else []
    return SourceResult(
        cases=_cases(tables, catalog, log, provenance, progress),
        inputs=sorted(set(tables.inputs)),
        log=log,
        source=SOURCE,
        provenance=provenance,
        remarks=remarks,
    )


@dataclass
class _Lookups:
    """Per-admission facts from the small tables, keyed for the assembly loop."""

    patient: dict[int, Patient]
    service: dict[int, str]  # the first service of the admission
    icd_titles: dict[int, list[str]]  # by seq_num
    labinfo: dict[int, tuple[str, str | None]]  # itemid -> (analyte name, fluid)
    stay: dict[int, int]  # the latest ED stay of the admission
    triage: dict[int, dict]
    first_vitals: dict[int, dict]  # the first ED vital-sign row with a value, per stay


def _lookups(t: MimicIVTables) -> _Lookups:
    pat = {
        s: Patient(g, a, y)
        for s, g, a, y in t.patients.select("subject_id", "gender", "anchor_age", "anchor_year").iter_rows()
    }
    service: dict[int, str] = {}
    for h, s in t.services.sort("transfertime").select("hadm_id", "curr_service").iter_rows():
        service.setdefault(h, s)
    titles = {(c, v): x for v, c, x in t.d_icd.select("icd_version", "icd_code", "long_title").iter_rows()}
    dx: dict[int, list[str]] = defaultdict(list)
    rows = t.diagnoses.sort(["hadm_id", "seq_num"]).select("hadm_id", "icd_version", "icd_code").iter_rows()
    for h, v, c in rows:
        dx[h].append(one_line(titles.get((c, v))) or f"ICD-{v} {c}")
    labinfo = {
        i: (item_name(lab or f"itemid {i}"), one_line(fl))
        for i, lab, fl in t.d_lab.select("itemid", "label", "fluid").iter_rows()
    }
    stay_of: dict[int, int] = {}
    for h, s in t.edstays.sort("intime").select("hadm_id", "stay_id").iter_rows():
        stay_of[h] = s
    triage = {r["stay_id"]: r for r in t.triage.iter_rows(named=True)}
    first_vs: dict[int, dict] = {}
    for r in t.vitalsign.sort("charttime").iter_rows(named=True):
        if any(r[c] for c, _, _ in VITALS):
            first_vs.setdefault(r["stay_id"], r)
    return _Lookups(pat, service, dx, labinfo, stay_of, triage, first_vs)


def _slices(df: pl.DataFrame, key: str) -> dict[int, tuple[int, int]]:
    """(offset, length) of each run of equal ``key`` in a frame sorted by ``key``."""
    if df.height == 0:
        return {}
    runs = df.select(pl.col(key).rle()).unnest(key)
    out: dict[int, tuple[int, int]] = {}
    offset = 0
    for length, value in runs.select("len", "value").iter_rows():
        out[value] = (offset, length)
        offset += length
    return out


def _cases(
    t: MimicIVTables, catalog: PanelCatalog, log: FilterLog, provenance: dict[str, Counter], progress: bool
) -> Iterator[Case]:
    """A generator: cases stream to the writer, one in memory at a time; the log is complete at its end."""
    look = _lookups(t)
    lab_slices, micro_slices = _slices(t.labs, "case_hadm"), _slices(t.micro, "case_hadm")
    # Drop the key once: a per-admission select() would go through the query engine every time.
    labs, micro = t.labs.drop("case_hadm"), t.micro.drop("case_hadm")
    rad: dict[int, list[RadiologyRow]] = defaultdict(list)
    if t.radiology is not None:
        for h, time, name, text in (
            t.radiology.sort(["case_hadm", "charttime"])
            .select("case_hadm", "charttime", "exam_name", "text")
            .iter_rows()
        ):
            rad[h].append(RadiologyRow(time, name, text))
    case_drop: Counter = Counter()
    exam_stats: Counter = Counter()
    rows_used: Counter = Counter()
    row_drops: Counter = Counter()
    n_kept = 0
    adm_rows = t.adm.sort("hadm_id").select("subject_id", "hadm_id", "admittime").iter_rows()
    for subject, h, admittime in tqdm(adm_rows, total=t.adm.height, desc="cases", disable=not progress, leave=False):
        stay = look.stay.get(h)
        lab_part, micro_part = lab_slices.get(h), micro_slices.get(h)
        adm = Admission(
            subject_id=subject,
            hadm_id=h,
            admittime=admittime,
            patient=look.patient.get(subject),
            service=look.service.get(h),
            icd_titles=tuple(look.icd_titles.get(h, ())),
            triage=look.triage.get(stay),
            first_vitals=look.first_vitals.get(stay),
            has_notes=t.notes is not None,
            note=t.notes.get(h) if t.notes is not None else None,
            labs=[LabRow._make(r) for r in labs.slice(*lab_part).iter_rows()] if lab_part else [],
            micro=[MicroRow._make(r) for r in micro.slice(*micro_part).iter_rows()] if micro_part else [],
            radiology=rad.get(h, []),
        )
        out = assemble_admission(adm, catalog, look.labinfo)
        rows_used.update(out.rows_used)
        row_drops.update(out.row_drops)
        exam_stats.update(out.exam_drops)
        if out.case is None:
            case_drop[out.drop] += 1
            continue
        n_kept += out.exams_kept
        provenance["final diagnosis"][out.diagnosis_from] += 1
        provenance["physical exam"][
            "the note's physical exam, split into named items" if adm.has_notes else "ED triage vital signs"
        ] += 1
        yield out.case

    log.add("admissions → cases", "case", t.adm.height, case_drop)
    for kind, name in ROW_STEPS:
        stats = t.window_stats.get(kind)
        if stats is None:
            continue
        reasons: Counter = Counter({k: v for k, v in stats.items() if k != "read"})
        for (k, r), n in row_drops.items():
            if k == kind:
                reasons[r] += n
        step = log.add(name, "row", stats["read"], reasons)
        if step.kept != rows_used[kind]:  # the arithmetic is the card's promise: check it, never assume it
            raise AssertionError(f"{name}: {step.kept} rows unaccounted vs {rows_used[kind]} used")
    log.add("timed exams (lab panels, cultures, reports) → kept", "exam", n_kept + sum(exam_stats.values()), exam_stats)
