"""The MIMIC-IV rules, tested directly: the window join (mimic_read) and one admission's assembly (mimic_assembly)."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

import polars as pl
import pytest

from diaggym.catalog import PanelCatalog
from diaggym.sources.discharge_notes import DischargeNote
from diaggym.sources.mimic_assembly import (
    DX_ICD_NO_NOTES,
    DX_ICD_NO_SECTION,
    DX_NOTE,
    REPEAT,
    Admission,
    LabRow,
    MicroRow,
    Patient,
    assemble_admission,
    micro_result,
)
from diaggym.sources.mimic_read import OUT_OF_WINDOW, admission_windows, window_keep

ADMIT = datetime(2180, 5, 7, 12, 0, 0)
DAY = timedelta(hours=24)
SEC = timedelta(seconds=1)


def _join(admissions: list[tuple], rows: list[tuple]) -> tuple[dict, Counter]:
    """(row id -> admission it was matched to, drop counts) for rows (id, subject, hadm or None, time)."""
    adm = pl.DataFrame(admissions, schema=["subject_id", "hadm_id", "admittime"], orient="row")
    df = pl.DataFrame(
        rows,
        schema={"id": pl.Int64, "subject_id": pl.Int64, "hadm_id": pl.Int64, "charttime": pl.Datetime("us")},
        orient="row",
    )
    stats: Counter = Counter()
    kept = window_keep("charttime", stats, admission_windows(adm, DAY))(df)
    return dict(kept.select("id", "case_hadm").iter_rows()), stats


def test_window_edges_are_inclusive():
    matched, stats = _join(
        [(1, 10, ADMIT)],
        [
            (1, 1, 10, ADMIT - DAY),  # exactly 24 h before admission: in
            (2, 1, 10, ADMIT - DAY - SEC),  # one second earlier: out
            (3, 1, 10, ADMIT),  # at admission: in
            (4, 1, 10, ADMIT + SEC),  # after admission: out
            (5, 1, 10, None),  # no chart time
        ],
    )
    assert matched == {1: 10, 3: 10}
    assert stats == Counter({"read": 5, OUT_OF_WINDOW: 2, "no chart time": 1, "charted to another admission": 0})


def test_ed_lab_without_admission_id_is_matched_by_patient_and_time():
    matched, _ = _join(
        [(1, 10, ADMIT), (2, 20, ADMIT)],
        [(1, 1, None, ADMIT - timedelta(hours=3)), (2, 2, None, ADMIT - timedelta(hours=30)), (3, 3, None, ADMIT)],
    )
    assert matched == {1: 10}  # patient 2's row is outside the window; patient 3 has no admission


def test_row_fitting_two_admissions_goes_to_the_one_it_names_else_the_nearest_after():
    later = ADMIT + timedelta(hours=12)
    t = ADMIT - timedelta(hours=1)  # inside both windows
    matched, stats = _join(
        [(1, 10, ADMIT), (1, 11, later), (1, 12, ADMIT + 10 * DAY)],
        [(1, 1, 11, t), (2, 1, None, t), (3, 1, 12, t)],
    )
    assert matched == {1: 11, 2: 10}
    assert stats["charted to another admission"] == 1  # row 3 names admission 12, whose window does not hold it


# ------------------------------------------------------------------ one admission -> one case
CATALOG = PanelCatalog.from_mapping(None)
LABINFO = {50868: ("Anion Gap", "Blood"), 51006: ("Urea Nitrogen", "Blood")}
TRIAGE = {"temperature": "98.6", "heartrate": "88", "chiefcomplaint": "Dyspnea"}


def _lab(specimen: int, t: datetime, itemid: int = 50868, value: str = "14") -> LabRow:
    return LabRow(specimen, t, itemid, value, float(value), "mEq/L", 8.0, 20.0, None, None)


def _adm(**kw) -> Admission:
    base = dict(
        subject_id=1, hadm_id=10, admittime=ADMIT, patient=Patient("F", 60, 2180), icd_titles=("Pneumonia",),
        triage=TRIAGE, labs=[_lab(1, ADMIT - timedelta(hours=2))],
    )  # fmt: skip
    return Admission(**{**base, **kw})


def test_demo_layout_case_from_triage_and_icd_titles():
    out = assemble_admission(_adm(), CATALOG, LABINFO)
    c = out.case
    assert out.drop is None and out.diagnosis_from == DX_ICD_NO_NOTES
    assert (c.case_id, c.subject_key, c.profile.age, c.profile.chief_complaint) == (
        "mimic-iv:10",
        "mimic-iv:1",
        60,
        "Dyspnea",
    )
    assert [(e.name, e.group) for e in c.exams] == [("PE: Vital Signs", 0), ("Anion Gap", 1)]
    assert c.exams[0].result == "Temperature: 98.6 °F\nHeart Rate: 88 bpm"
    assert c.exams[1].time == "2180-05-07T10:00:00"
    assert out.rows_used == Counter({"lab": 1})


def test_first_occurrence_wins_and_the_repeat_is_counted():
    labs = [_lab(2, ADMIT - timedelta(hours=1), value="30"), _lab(1, ADMIT - timedelta(hours=5), value="14")]
    out = assemble_admission(_adm(labs=labs), CATALOG, LABINFO)
    gap = [e for e in out.case.exams if e.name == "Anion Gap"]
    assert len(gap) == 1 and gap[0].items[0].value == "14"  # the earlier one, whatever the row order
    assert out.exam_drops == Counter({REPEAT: 1}) and out.row_drops == Counter({("lab", REPEAT): 1})


def test_same_time_exams_share_a_group_in_time_order():
    t1, t2 = ADMIT - timedelta(hours=5), ADMIT - timedelta(hours=1)
    labs = [_lab(1, t2), _lab(2, t1, itemid=51006, value="20")]
    micro = [MicroRow(7, "Blood Culture", t1, "BLOOD", None, None, None, None, None, None, None)]
    out = assemble_admission(_adm(labs=labs, micro=micro), CATALOG, LABINFO)
    assert [(e.name, e.group) for e in out.case.exams[1:]] == [
        ("Blood urea nitrogen (BUN)", 1), ("Blood Culture", 1), ("Anion Gap", 2),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        (dict(triage=None, first_vitals=None), "no physical exam"),
        (dict(icd_titles=()), "no diagnosis"),
        (dict(labs=[]), "no exam in the 24 h before admission"),
        (dict(has_notes=True), "no discharge note"),
        (dict(has_notes=True, note=DischargeNote("HPI", (), "Sepsis")), "no physical exam in the note"),
        (dict(triage={**TRIAGE, "chiefcomplaint": "pneumonia, cough"}), "diagnosis stated in the history"),
    ],
)
def test_drops_carry_their_reason_and_count_the_rows(kw, reason):
    out = assemble_admission(_adm(**kw), CATALOG, LABINFO)
    assert out.case is None and out.drop == reason
    n = len(kw.get("labs", [None]))
    assert out.row_drops == (Counter({("lab", f"case excluded: {reason}"): 1}) if n else Counter())
    assert out.exam_drops == (Counter({f"case excluded: {reason}": 1}) if n else Counter())


def test_note_bearing_case_uses_the_note_exam_and_diagnosis():
    note = DischargeNote("Chief Complaint:\ncough", (("General", "NAD"), ("Lungs", "crackles")), "Primary:\n- CAP")
    out = assemble_admission(_adm(has_notes=True, note=note), CATALOG, LABINFO)
    c = out.case
    assert [(e.name, e.group, e.result) for e in c.exams if e.kind == "physical"] == [
        ("PE: General", 0, "NAD"),
        ("PE: Lungs", 0, "crackles"),
    ]  # fmt: skip  (triage vitals are not used when the data has notes)
    assert c.final_diagnosis == "Primary:\n- CAP" and out.diagnosis_from == DX_NOTE
    assert c.profile.note == "Chief Complaint:\ncough"
    fallback = DischargeNote("HPI", (("General", "NAD"),), None)
    out = assemble_admission(_adm(has_notes=True, note=fallback), CATALOG, LABINFO)
    assert out.case.final_diagnosis == "Pneumonia" and out.diagnosis_from == DX_ICD_NO_SECTION


def test_lab_rows_the_build_cannot_use_are_counted():
    labs = [
        _lab(1, ADMIT, itemid=99999),  # not in d_labitems
        _lab(1, ADMIT),
        _lab(1, ADMIT),  # same analyte again on the specimen
        LabRow(1, ADMIT, 51006, None, None, None, None, None, None, None),  # nothing to show
    ]
    out = assemble_admission(_adm(labs=labs), CATALOG, LABINFO)
    assert out.row_drops == Counter(
        {
            ("lab", "itemid not in d_labitems"): 1,
            ("lab", "analyte repeated on the same specimen"): 1,
            ("lab", "no value, numeric value or comment"): 1,
        }
    )
    assert out.rows_used == Counter({"lab": 1})


def test_micro_result_text():
    t = ADMIT
    rows = [
        MicroRow(1, "URINE CULTURE", t, "URINE", "E. COLI", ">100,000", "AMPICILLIN", "R", "=>", "32", "note a"),
        MicroRow(1, "URINE CULTURE", t, "URINE", "E. COLI", ">100,000", "CEFAZOLIN", "S", None, None, "note a"),
    ]
    assert micro_result(rows) == (
        "Specimen: URINE\nOrganism: E. COLI (>100,000)\n  AMPICILLIN: R (MIC =>32)\n  CEFAZOLIN: S\nComments: note a"
    )
    empty = [MicroRow(2, "BLOOD CULTURE", t, "BLOOD", None, None, None, None, None, None, None)]
    assert micro_result(empty) == "Specimen: BLOOD\nNo organism reported."
