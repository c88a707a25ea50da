"""MIMIC-IV source on the bundled demo, and its behaviour on bad input."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from diaggym.cases import load_cases
from diaggym.errors import InputError
from diaggym.preprocess import preprocess
from diaggym.sources.discharge_notes import parse_discharge_note
from diaggym.sources.mimic_iv import build_mimic_iv_cases
from tests.conftest import DEMO


def test_demo_yields_well_over_100_valid_cases(demo_result):
    cases = demo_result.cases
    assert 120 <= len(cases) <= 196  # 196 admissions have labs in the window; some lack an ED exam
    for c in cases:
        assert c.exams[0].kind == "physical" and c.exams[0].group == 0
        assert any(e.kind != "physical" for e in c.exams)
        assert c.final_diagnosis
        names = [e.name for e in c.exams]
        assert len(names) == len(set(names))
        groups = [e.group for e in c.exams]
        assert groups == sorted(groups)
        times = [e.time for e in c.exams if e.group > 0]
        assert times == sorted(times)


def test_card_counts_add_up(demo_out):
    _, card = demo_out
    steps = {s["step"]: s for s in card["filter_steps"]}
    adm = steps["admissions → cases"]
    assert adm["input"] == 275
    assert adm["input"] == adm["kept"] + sum(adm["dropped"].values())
    assert adm["kept"] == card["cases"]
    labs = steps["labevents rows"]
    assert labs["input"] == 107727  # every row of the demo's labevents is accounted for
    for s in card["filter_steps"]:
        assert s["input"] == s["kept"] + sum(s["dropped"].values())
    assert sum(v["cases"] for v in card["splits"].values()) == card["cases"]


def test_card_counts_where_diagnosis_and_exam_came_from(demo_out):
    out, card = demo_out
    # No notes in the demo: every diagnosis is the ICD fallback and the card says so, never silently.
    assert card["provenance"] == {
        "final diagnosis": {"ICD long titles (the data has no discharge notes)": card["cases"]},
        "physical exam": {"ED triage vital signs": card["cases"]},
    }
    assert len(card["remarks"]) == 1 and "No discharge notes" in card["remarks"][0]
    md = (out / "card.md").read_text()
    assert f"| final diagnosis | ICD long titles (the data has no discharge notes) | {card['cases']} |" in md
    assert "> No discharge notes in the data" in md


def test_lab_rows_kept_equal_items_written(demo_out):
    out, card = demo_out
    cases = load_cases(out)
    n_items = sum(len(e.items) for c in cases for e in c.exams if e.items)
    kept = next(s["kept"] for s in card["filter_steps"] if s["step"] == "labevents rows")
    assert n_items == kept


def test_outputs_and_no_patient_in_two_splits(demo_out):
    out, card = demo_out
    for name in ("cases.jsonl", "cases.parquet", "card.json", "card.md", "exams_per_case.png"):
        assert (out / name).stat().st_size > 0, name
    cases = load_cases(out)
    assert load_cases(out / "cases.parquet") == cases
    split_of: dict[str, str] = {}
    for c in cases:
        assert split_of.setdefault(c.subject_key, c.split) == c.split
    assert set(split_of.values()) == {"train", "val", "test"}
    assert {i["path"] for i in card["inputs"]} >= {"hosp/labevents.csv.gz", "ed/triage.csv.gz"}
    assert all(len(i["sha256"]) == 64 for i in card["inputs"])
    assert json.loads((out / "card.json").read_text())["dataset_hash"] == card["dataset_hash"]
    assert (out / "exams_per_case.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_panels_and_ed_labs_without_admission_id(demo_result):
    names = {e.name for c in demo_result.cases for e in c.exams}
    assert "Complete Blood Count (CBC)" in names
    assert {"Basic Metabolic Panel (BMP)", "Comprehensive Metabolic Panel (CMP)"} & names
    assert "Anion Gap" in names  # an analyte in no panel is its own exam
    cbc = next(e for c in demo_result.cases for e in c.exams if e.name == "Complete Blood Count (CBC)")
    assert len(cbc.items) > 5 and any(i.ref_low is not None for i in cbc.items)
    assert any(i.flag == "abnormal" for c in demo_result.cases for e in c.exams for i in (e.items or []))
    micro = [e for c in demo_result.cases for e in c.exams if e.kind == "microbiology"]
    assert micro and all(e.result.startswith("Specimen:") for e in micro)


def test_window_rule_is_applied():
    # With a 1-hour window fewer exams survive than with 24 hours, and never more cases.
    narrow = list(build_mimic_iv_cases(DEMO, window_hours=1).cases)
    wide = list(build_mimic_iv_cases(DEMO, window_hours=24).cases)
    assert sum(len(c.exams) for c in narrow) < sum(len(c.exams) for c in wide)
    assert len(narrow) <= len(wide)


def test_deterministic(demo_result):
    again = build_mimic_iv_cases(DEMO)
    assert [c.to_dict() for c in again.cases] == [c.to_dict() for c in demo_result.cases]


# ------------------------------------------------------------------ notes (full MIMIC-IV-Note layout)
NOTE = "\n \n".join(  # MIMIC notes separate sections with a line holding one space
    [
        "Name:  ___                  Unit No:   ___",
        "Sex:   F",
        "Chief Complaint:\nabdominal pain",
        "History of Present Illness:\nPain for two days.",
        "Physical Exam:\nVS: 98.1 120/80 88 16 98%RA\nAbd: soft, tender RLQ",
        "Pertinent Results:\nnone",
        "Discharge Diagnosis:\nAcute appendicitis",
        "Discharge Condition:\ngood\n",
    ]
)


def test_parse_discharge_note_sections():
    parts = parse_discharge_note(NOTE)
    assert parts.header.endswith("Pain for two days.")
    assert parts.physical_exam == (("Vital Signs", "98.1 120/80 88 16 98%RA"), ("Abdomen", "soft, tender RLQ"))
    assert parts.discharge_diagnosis == "Acute appendicitis"


def _copy_demo(tmp_path: Path) -> Path:
    root = tmp_path / "mimic"
    shutil.copytree(DEMO, root)
    return root


def test_notes_give_header_pe_items_and_diagnosis(tmp_path, demo_result):
    root = _copy_demo(tmp_path)
    target = demo_result.cases[0]
    hadm = int(target.case_id.split(":")[1])
    (root / "note").mkdir()
    pl.DataFrame(
        {
            "note_id": ["n1"],
            "subject_id": [int(target.subject_key.split(":")[1])],
            "hadm_id": [hadm],
            "note_type": ["DS"],
            "note_seq": [1],
            "charttime": ["2100-01-01 00:00:00"],
            "storetime": [""],
            "text": [NOTE],
        }
    ).write_csv(root / "note" / "discharge.csv")
    result = build_mimic_iv_cases(root)
    cases = {c.case_id: c for c in result.cases}
    c = cases[target.case_id]
    assert c.profile.note.startswith("Name:  ___") and c.profile.note.endswith("Pain for two days.")
    assert c.final_diagnosis == "Acute appendicitis"
    # With notes, group 0 is the note's exam split into named items (the triage vitals are not used).
    assert [(e.name, e.group, e.result) for e in c.exams if e.kind == "physical"] == [
        ("PE: Vital Signs", 0, "98.1 120/80 88 16 98%RA"),
        ("PE: Abdomen", 0, "soft, tender RLQ"),
    ]
    # Every other admission has no note: dropped and counted, as the reference keeps only noted cases.
    assert list(cases) == [target.case_id]
    adm = result.log.to_list()[0]
    assert adm["dropped"]["no discharge note"] == adm["input"] - 1
    assert result.provenance["final diagnosis"] == {"the note's Discharge Diagnosis section": 1}
    assert result.remarks == []


# ------------------------------------------------------------------ bad input
def _gz_write(path: Path, text: str) -> None:
    with gzip.open(path, "wt") as fh:
        fh.write(text)


def test_missing_table(tmp_path):
    root = _copy_demo(tmp_path)
    (root / "hosp" / "labevents.csv.gz").unlink()
    with pytest.raises(InputError, match=r"missing table labevents\.csv\.gz"):
        build_mimic_iv_cases(root)


def test_wrong_column(tmp_path):
    root = _copy_demo(tmp_path)
    _gz_write(root / "hosp" / "admissions.csv.gz", "subject_id,hadm_id,admit_time\n1,2,2100-01-01 00:00:00\n")
    with pytest.raises(InputError, match=r"admissions\.csv\.gz: missing column\(s\) admittime"):
        build_mimic_iv_cases(root)


def test_unparseable_timestamp(tmp_path):
    root = _copy_demo(tmp_path)
    with gzip.open(root / "hosp" / "admissions.csv.gz", "rt") as fh:
        lines = fh.read().splitlines()
    cols = lines[3].split(",")
    cols[2] = "yesterday noon"
    lines[3] = ",".join(cols)
    _gz_write(root / "hosp" / "admissions.csv.gz", "\n".join(lines) + "\n")
    with pytest.raises(
        InputError,
        match=r"admissions\.csv\.gz: column 'admittime' has an unparseable "
        r"timestamp 'yesterday noon' at data row 3",
    ):
        build_mimic_iv_cases(root)


def test_truncated_gzip(tmp_path):
    root = _copy_demo(tmp_path)
    p = root / "hosp" / "labevents.csv.gz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(InputError, match=r"labevents\.csv\.gz: cannot decompress: .*cut off"):
        build_mimic_iv_cases(root)


def test_empty_folder_and_missing_folder(tmp_path):
    with pytest.raises(InputError, match="input folder is empty"):
        build_mimic_iv_cases(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        build_mimic_iv_cases(tmp_path / "nope")
    (tmp_path / "hosp").mkdir()
    with pytest.raises(InputError, match=r"missing folder ed/"):
        build_mimic_iv_cases(tmp_path)


def test_empty_table(tmp_path):
    root = _copy_demo(tmp_path)
    _gz_write(root / "hosp" / "admissions.csv.gz", "")
    with pytest.raises(InputError, match="file is empty"):
        build_mimic_iv_cases(root)


def test_failed_run_leaves_previous_output_untouched(tmp_path):
    root = _copy_demo(tmp_path)
    out = tmp_path / "out"
    preprocess("mimic-iv", root, out)
    before = (out / "cases.jsonl").read_bytes()
    p = root / "hosp" / "labevents.csv.gz"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(InputError):
        preprocess("mimic-iv", root, out)
    assert (out / "cases.jsonl").read_bytes() == before
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".out")] == []
