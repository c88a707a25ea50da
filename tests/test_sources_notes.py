"""Discharge notes -> profile, final diagnosis and physical-exam items (sources/discharge_notes.py)."""

from __future__ import annotations

from diaggym.sources.discharge_notes import (
    PE_NAMES,
    discharge_diagnosis,
    parse_discharge_note,
    physical_exam_items,
    profile_header,
)
from diaggym.sources.mimic_assembly import primary_diagnosis

# A MIMIC-IV-Note layout: sections separated by a line holding one space, a sub-headed diagnosis,
# an HPI that mentions "physical exam:" and a past history with a "Physical Examination:" heading.
NOTE = "\n \n".join(
    [
        "Name:  ___                  Unit No:   ___",
        "Chief Complaint:\nshortness of breath",
        "History of Present Illness:\nSeen by PCP; physical exam: notable for crackles.\n"
        "Physical Examination: at clinic was otherwise normal.",
        "Physical Exam:\nADMISSION PHYSICAL EXAM:\nVS: 98.1 124/78 82 18 94% RA\nGEN: NAD, alert\n"
        "HEENT: NCAT, MMM\nEyes: anicteric\nNECK: supple, JVP not elevated\nCV: RRR, no m/r/g\n"
        "LUNGS: crackles at bases\n  bilaterally\nABD: soft, NTND\nAccess: PIV\n"
        "EXT: no edema\nNEURO: A&Ox3\nSKIN: no rash\n \nDISCHARGE PHYSICAL EXAM:\nVS: 98.0 118/70 76 16 97% RA\n"
        "LUNGS: clear",
        "Pertinent Results:\n___ 07:10AM BLOOD WBC-12.1",
        "Brief Hospital Course:\nTreated with antibiotics.",
        "Discharge Diagnosis:\nPrimary:\n- Community-acquired pneumonia\n\nSecondary:\n- Hypertension",
        "Discharge Condition:\nMental Status: Clear and coherent.",
        "Followup Instructions:\n___\n",
    ]
)


def test_profile_cut_is_the_reference_split_with_both_traps():
    header = profile_header(NOTE)
    assert header == NOTE.split("Physical Exam:")[0].strip()  # the reference's rule, byte for byte
    assert "physical exam: notable for crackles" in header  # lower case does not cut
    assert "Physical Examination: at clinic" in header  # nor does the longer heading
    assert not header.endswith("Physical Exam:")
    assert profile_header("no exam here\n") == "no exam here"  # split()[0] keeps the whole note


def test_discharge_diagnosis_keeps_sub_headers():
    assert discharge_diagnosis(NOTE) == "Primary:\n- Community-acquired pneumonia\n\nSecondary:\n- Hypertension"
    assert discharge_diagnosis("Discharge Diagnoses: sepsis\nDischarge Condition:\ngood") == "sepsis"
    assert discharge_diagnosis("History of Present Illness:\nnone") is None


def test_primary_diagnosis_skips_sub_headers_and_bullets():
    assert primary_diagnosis("Primary:\n- Community-acquired pneumonia\nSecondary:\n- HTN") == (
        "Community-acquired pneumonia"
    )
    assert primary_diagnosis("PRIMARY DIAGNOSIS: Sepsis") == "Sepsis"
    assert primary_diagnosis("Acute kidney injury\nHypertension") == "Acute kidney injury"


def test_physical_exam_items_are_named_and_stop_before_the_discharge_exam():
    items = parse_discharge_note(NOTE).physical_exam
    assert items == (
        ("Vital Signs", "98.1 124/78 82 18 94% RA"),
        ("General", "NAD, alert"),
        ("HEENT", "NCAT, MMM\nEyes: anicteric"),
        ("Neck", "supple, JVP not elevated"),
        ("Cardiovascular", "RRR, no m/r/g"),
        ("Lungs", "crackles at bases\nbilaterally"),
        ("Abdomen", "soft, NTND\nAccess: PIV"),  # an unknown heading continues the item above
        ("Extremities", "no edema"),
        ("Neurological", "A&Ox3"),
        ("Skin", "no rash"),
    )
    assert {name for name, _ in items} <= set(PE_NAMES)


def test_physical_exam_other_and_measurement_headings():
    items = physical_exam_items("Patient comfortable.\nT: 98.6 BP: 120/80\nHR: 88\nGen: well")
    assert items == [
        ("Other", "Patient comfortable."),
        ("Vital Signs", "T: 98.6 BP: 120/80\nHR: 88"),
        ("General", "well"),
    ]
    assert physical_exam_items("") == [] and physical_exam_items(None) == []


def test_note_without_physical_exam_heading_has_no_items():
    parsed = parse_discharge_note("Chief Complaint:\ncough\nPhysical Examination:\nLungs: clear\n")
    assert parsed.physical_exam == ()
