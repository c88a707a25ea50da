"""MIMIC-IV reading: the tables a case needs, filtered to the admissions' time windows.

Everything here is I/O and vectorised joins; turning one admission's rows into a case is
:mod:`diaggym.sources.mimic_assembly`.  Emergency-department labs often carry no ``hadm_id``, so
timed rows (labs, microbiology, radiology reports) are matched to an admission by patient and
time (:func:`window_keep`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import polars as pl

from diaggym.cases import SEP
from diaggym.errors import InputError
from diaggym.sources.discharge_notes import DischargeNote, parse_discharge_note
from diaggym.sources.tables import TableSpec, find_table, scan_table
from diaggym.text_rules import LAB_KEY_ALTERNATION

VITALS = (  # (column, label, unit)
    ("temperature", "Temperature", "°F"),
    ("heartrate", "Heart Rate", "bpm"),
    ("resprate", "Respiratory Rate", "breaths/min"),
    ("o2sat", "O2 Saturation", "%"),
    ("sbp", "Systolic Blood Pressure", "mmHg"),
    ("dbp", "Diastolic Blood Pressure", "mmHg"),
    ("pain", "Pain Score", ""),
)
OUT_OF_WINDOW = "not charted in the 24 h before any admission"
# Column order of the per-admission rows (the fields of mimic_assembly.LabRow / MicroRow).
LAB_COLUMNS = (
    "specimen_id", "charttime", "itemid", "value", "valuenum", "valueuom",
    "ref_range_lower", "ref_range_upper", "flag", "comments",
)  # fmt: skip
MICRO_COLUMNS = (
    "micro_specimen_id", "test_name", "_time", "spec_type_desc", "org_name", "quantity",
    "ab_name", "interpretation", "dilution_comparison", "dilution_value", "comments",
)  # fmt: skip


def one_line_expr(col: str) -> pl.Expr:
    """Vectorised :func:`diaggym.text_rules.one_line`."""
    e = pl.col(col).str.replace_all(SEP, " ", literal=True).str.replace_all(r"\s+", " ").str.strip_chars()
    return pl.when(e == "").then(None).otherwise(e).alias(col)


def item_field_expr(col: str) -> pl.Expr:
    """Vectorised ``escape_lab_keys(one_line(x))``: a lab value/unit/flag safe for the diaggym-v1 line."""
    e = pl.col(col).str.replace_all(SEP, " ", literal=True).str.replace_all(r"\s+", " ").str.strip_chars()
    e = e.str.replace_all(rf"; ({LAB_KEY_ALTERNATION}): ", ", $1 ").str.replace(rf"^({LAB_KEY_ALTERNATION}): ", "$1 ")
    return pl.when(e == "").then(None).otherwise(e).alias(col)


@dataclass
class MimicIVTables:
    """What a build reads, filtered to the admissions (and, for timed rows, to their windows)."""

    adm: pl.DataFrame
    patients: pl.DataFrame
    services: pl.DataFrame
    diagnoses: pl.DataFrame
    d_icd: pl.DataFrame
    d_lab: pl.DataFrame
    edstays: pl.DataFrame
    triage: pl.DataFrame
    vitalsign: pl.DataFrame
    labs: pl.DataFrame  # LAB_COLUMNS + case_hadm, sorted by admission and specimen
    micro: pl.DataFrame  # MICRO_COLUMNS + case_hadm, sorted by admission, specimen and test
    radiology: pl.DataFrame | None  # case_hadm, charttime, exam_name, text; None without note/radiology
    notes: dict[int, DischargeNote] | None  # None when the data has no discharge notes
    # Rows read and dropped by the window join, per table ("read" holds the rows read).
    window_stats: dict[str, Counter] = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)


def check_layout(root: Path) -> None:
    if not root.exists():
        raise InputError("input folder does not exist", root)
    if not root.is_dir():
        raise InputError("input is not a folder (expected a MIMIC-IV layout with hosp/ and ed/)", root)
    if not any(root.iterdir()):
        raise InputError("input folder is empty (expected hosp/ and ed/ with gzip CSV tables)", root)
    for sub in ("hosp", "ed"):
        if not (root / sub).is_dir():
            raise InputError(f"missing folder {sub}/ (expected a MIMIC-IV layout with hosp/ and ed/)", root)


def window_keep(time_col: str, stats: Counter, windows: pl.DataFrame) -> Callable[[pl.DataFrame], pl.DataFrame]:
    """A block filter that attaches each row to the admission whose window holds it (column ``case_hadm``).

    ``windows``: subject_id, case_hadm, admittime, win_start.  The nearest admission at or after the
    row (an as-of join per patient) is the only one whose window can hold it; a row that names another
    admission is matched to that one if its window holds the row, and dropped otherwise.  No
    patient × admission blow-up.  Bounds are inclusive: a row at exactly ``win_start`` is in.
    """
    near_tbl = windows.sort("admittime")
    own_tbl = windows.rename({"case_hadm": "hadm_id"}).drop("subject_id")
    t = pl.col(time_col)

    def keep(df: pl.DataFrame) -> pl.DataFrame:
        stats["read"] += df.height
        timed = df.filter(t.is_not_null())
        stats["no chart time"] += df.height - timed.height
        near = timed.sort(time_col).join_asof(
            near_tbl, left_on=time_col, right_on="admittime", by="subject_id", strategy="forward",
            check_sortedness=False,
        )  # fmt: skip
        in_win = near.filter(t >= pl.col("win_start"))
        stats[OUT_OF_WINDOW] += timed.height - in_win.height
        named_other = pl.col("hadm_id").is_not_null() & (pl.col("hadm_id") != pl.col("case_hadm"))
        same = in_win.filter(~named_other)
        other = (
            in_win.filter(named_other)
            .drop("case_hadm", "admittime", "win_start")
            .join(own_tbl, on="hadm_id", how="inner")
            .filter((t >= pl.col("win_start")) & (t <= pl.col("admittime")))
            .with_columns(pl.col("hadm_id").alias("case_hadm"))
            .select(same.columns)
        )
        ok = pl.concat([same, other])
        stats["charted to another admission"] += in_win.height - ok.height
        return ok

    return keep


def admission_windows(adm: pl.DataFrame, window: timedelta) -> pl.DataFrame:
    return adm.select(
        "subject_id",
        pl.col("hadm_id").alias("case_hadm"),
        "admittime",
        (pl.col("admittime") - pl.duration(microseconds=int(window.total_seconds() * 1e6))).alias("win_start"),
    )


def read_mimic_iv(root: Path, window: timedelta, progress: bool = False) -> MimicIVTables:
    """Read one MIMIC-IV-layout folder (``hosp/``, ``ed/``, optional ``note/``)."""
    check_layout(root)
    inputs: list[Path] = []

    def path(module: str, name: str, required: bool = True) -> Path | None:
        p = find_table(root / module, name, required)
        if p is not None:
            inputs.append(p)
        return p

    def read(module: str, name: str, spec: TableSpec, keep=None) -> tuple[pl.DataFrame, int]:
        p = path(module, name)
        assert p is not None
        return scan_table(p, spec, keep, progress=progress)

    adm, n_adm = read("hosp", "admissions", TableSpec(ints=("subject_id", "hadm_id"), datetimes=("admittime",)))
    if n_adm == 0:
        raise InputError("admissions table has no rows", root / "hosp")
    adm = adm.filter(pl.col("admittime").is_not_null()).unique("hadm_id", keep="first")
    windows = admission_windows(adm, window)
    subjects = list(set(adm["subject_id"].to_list()))
    hadms = adm["hadm_id"].to_list()

    def of_admissions(d: pl.DataFrame) -> pl.DataFrame:
        return d.filter(pl.col("hadm_id").is_in(hadms))

    patients, _ = read(
        "hosp", "patients", TableSpec(ints=("subject_id", "anchor_age", "anchor_year"), strings=("gender",)),
        keep=lambda d: d.filter(pl.col("subject_id").is_in(subjects)),
    )  # fmt: skip
    services, _ = read(
        "hosp", "services", TableSpec(ints=("hadm_id",), datetimes=("transfertime",), strings=("curr_service",)),
        keep=of_admissions,
    )  # fmt: skip
    diagnoses, _ = read(
        "hosp", "diagnoses_icd", TableSpec(ints=("hadm_id", "seq_num", "icd_version"), strings=("icd_code",)),
        keep=of_admissions,
    )  # fmt: skip
    codes = diagnoses.select("icd_code", "icd_version").unique()
    d_icd, _ = read(
        "hosp", "d_icd_diagnoses", TableSpec(ints=("icd_version",), strings=("icd_code", "long_title")),
        keep=lambda d: d.join(codes, on=["icd_code", "icd_version"], how="semi"),
    )  # fmt: skip
    d_lab, _ = read("hosp", "d_labitems", TableSpec(ints=("itemid",), strings=("label", "fluid")))
    edstays, _ = read(
        "ed", "edstays", TableSpec(ints=("subject_id", "hadm_id", "stay_id"), datetimes=("intime",)),
        keep=of_admissions,
    )  # fmt: skip
    stays = edstays["stay_id"].to_list()
    vit_cols = tuple(c for c, _, _ in VITALS)
    triage, _ = read(
        "ed", "triage", TableSpec(ints=("stay_id",), strings=(*vit_cols, "chiefcomplaint")),
        keep=lambda d: d.filter(pl.col("stay_id").is_in(stays)),
    )  # fmt: skip
    vitalsign, _ = read(
        "ed", "vitalsign", TableSpec(ints=("stay_id",), datetimes=("charttime",), strings=(*vit_cols, "rhythm")),
        keep=lambda d: d.filter(pl.col("stay_id").is_in(stays)),
    )  # fmt: skip

    stats = {"lab": Counter(), "microbiology": Counter()}
    lab_spec = TableSpec(
        ints=("labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid"),
        floats=("valuenum", "ref_range_lower", "ref_range_upper"),
        datetimes=("charttime",),
        strings=("value", "valueuom", "flag", "comments"),
        keys=("subject_id", "hadm_id", "charttime"),
    )
    labs, _ = read("hosp", "labevents", lab_spec, keep=window_keep("charttime", stats["lab"], windows))
    # Make every text field safe for the diaggym-v1 line in one vectorised pass.
    labs = labs.with_columns(
        item_field_expr("value"), item_field_expr("valueuom"), item_field_expr("flag"), one_line_expr("comments")
    ).sort(["case_hadm", "specimen_id", "charttime", "labevent_id"])

    micro_spec = TableSpec(
        ints=("microevent_id", "subject_id", "hadm_id", "micro_specimen_id", "isolate_num"),
        datetimes=("chartdate", "charttime"),
        strings=(
            "spec_type_desc", "test_name", "org_name", "quantity", "ab_name", "dilution_comparison",
            "dilution_value", "interpretation", "comments",
        ),
    )  # fmt: skip
    micro_window = window_keep("_time", stats["microbiology"], windows)
    micro, _ = read(
        "hosp", "microbiologyevents", micro_spec,
        keep=lambda d: micro_window(d.with_columns(pl.coalesce("charttime", "chartdate").alias("_time"))),
    )  # fmt: skip
    micro = micro.sort(
        ["case_hadm", "micro_specimen_id", "test_name", "isolate_num", "org_name", "ab_name"], nulls_last=True
    )

    has_notes = (root / "note").is_dir()
    notes = None
    note_path = path("note", "discharge", required=False) if has_notes else None
    if note_path is not None:
        df, _ = scan_table(
            note_path, TableSpec(ints=("hadm_id",), strings=("text",)), keep=of_admissions, progress=progress
        )
        notes = {h: parse_discharge_note(t or "") for h, t in df.unique("hadm_id", keep="first").iter_rows()}

    radiology = None
    rad_path = path("note", "radiology", required=False) if has_notes else None
    if rad_path is not None:
        stats["radiology"] = Counter()
        radiology, _ = scan_table(
            rad_path,
            TableSpec(ints=("subject_id", "hadm_id"), datetimes=("charttime",), strings=("note_id", "text")),
            keep=window_keep("charttime", stats["radiology"], windows),
            progress=progress,
        )
        names: dict[str, str] = {}
        detail = path("note", "radiology_detail", required=False)
        if detail is not None:
            ids = radiology["note_id"].to_list()
            det, _ = scan_table(
                detail,
                TableSpec(strings=("note_id", "field_name", "field_value")),
                keep=lambda d: d.filter(pl.col("note_id").is_in(ids) & (pl.col("field_name") == "exam_name")),
                progress=progress,
            )
            names = dict(det.select("note_id", "field_value").unique("note_id", keep="first").iter_rows())
        radiology = radiology.with_columns(pl.col("note_id").replace_strict(names, default=None).alias("exam_name"))

    return MimicIVTables(
        adm=adm, patients=patients, services=services, diagnoses=diagnoses, d_icd=d_icd, d_lab=d_lab,
        edstays=edstays, triage=triage, vitalsign=vitalsign,
        labs=labs.select(*LAB_COLUMNS, "case_hadm"), micro=micro.select(*MICRO_COLUMNS, "case_hadm"),
        radiology=radiology, notes=notes, window_stats=stats, inputs=inputs,
    )  # fmt: skip
