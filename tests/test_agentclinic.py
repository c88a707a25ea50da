"""AgentClinic OSCE JSONL -> DiagGym cases (sources/agentclinic/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diaggym.cases import parse_case
from diaggym.errors import InputError
from diaggym.serialization import parse_result, render_result
from diaggym.sources.agentclinic import build_agentclinic_cases, classify, parse_age, parse_sex

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "agentclinic" / "agentclinic_medqa.jsonl"


@pytest.fixture(scope="module")
def bundled():
    return build_agentclinic_cases(BUNDLED)


def _steps(result) -> dict[str, dict]:
    return {s["step"]: s for s in result.log.to_list()}


# --------------------------------------------------------------------------- bundled file


def test_bundled_all_cases_convert(bundled):
    assert len(bundled.cases) == 107
    assert bundled.source == "agentclinic"
    assert bundled.inputs == [BUNDLED]
    steps = _steps(bundled)
    assert steps["parse"]["input"] == 107 and steps["parse"]["kept"] == 107
    assert steps["build"]["input"] == 107 and steps["build"]["dropped"] == {}
    assert steps["exams"]["kept"] == sum(len(c.exams) for c in bundled.cases)
    assert [c.case_id for c in bundled.cases] == [f"agentclinic:{i}" for i in range(1, 108)]
    assert len({c.subject_key for c in bundled.cases}) == 107


def test_bundled_cases_are_valid_and_complete(bundled):
    for case in bundled.cases:
        assert case.final_diagnosis.strip()
        assert case.exams
        assert case.split is None
        # the dumped row passes the strict reader used for cases.jsonl
        again = parse_case(case.to_dict(), case.case_id)
        assert again == case
        for exam in case.exams:
            if exam.kind == "physical":
                assert exam.group == 0 and exam.name.startswith("PE: ") and exam.result
            else:
                assert exam.group == 1


def test_bundled_first_case_profile(bundled):
    first = bundled.cases[0]
    assert first.profile.age == 35
    assert first.profile.sex == "F"
    assert first.profile.chief_complaint == "Double vision"
    assert "Difficulty climbing stairs" in first.profile.history_of_present_illness
    assert "Review of Systems: Patient denies" in first.profile.history_of_present_illness
    assert first.final_diagnosis == "Myasthenia gravis"
    names = [e.name for e in first.exams]
    assert names[:2] == ["PE: Vital Signs", "PE: Neurological Examination"]
    assert "Blood Pressure: 125/80 mmHg" in first.exams[0].result


def test_bundled_unmapped_patient_fields_are_kept(bundled):
    # case 18 lists current medications, which have no profile slot
    hpi = bundled.cases[17].profile.history_of_present_illness
    assert "Current Medications: Insulin; Mesalamine" in hpi
    # an infant: age in months is not an age in years, but the text survives
    infant = bundled.cases[2]
    assert infant.profile.age is None and infant.profile.sex == "M"
    assert "Demographics: 8-month-old boy" in infant.profile.history_of_present_illness


def test_bundled_lab_items_and_round_trip(bundled):
    lab_exams = [e for c in bundled.cases for e in c.exams if e.items is not None]
    assert len(lab_exams) > 50
    numeric = [it for e in lab_exams for it in e.items if it.valuenum is not None]
    assert len(numeric) > 200
    for exam in lab_exams:
        assert exam.kind == "lab"
        assert parse_result(render_result(exam), exam.name).items == exam.items, exam.name
        for item in exam.items:
            assert item.flag is None
    cbc = next(e for e in bundled.cases[11].exams if e.name == "Complete Blood Count")
    wbc = cbc.items[0]
    assert (wbc.name, wbc.value, wbc.valuenum, wbc.unit) == ("WBC", "6,200", 6200.0, "/μL")
    retic = next(e for e in bundled.cases[66].exams if e.name == "Reticulocyte Count").items[0]
    assert (retic.valuenum, retic.unit, retic.ref_low, retic.ref_high) == (0.8, "%", 2.0, 6.0)


def test_bundled_free_text_kinds(bundled):
    kinds = {(e.name, e.kind) for c in bundled.cases for e in c.exams if e.result is not None and e.group == 1}
    assert ("Chest X-ray", "radiology") in kinds
    assert ("Blood Cultures", "microbiology") in kinds
    assert ("Electrocardiogram", "other") in kinds
    assert ("Complete Blood Count", "lab") in kinds  # qualitative "Normal" results stay text


# --------------------------------------------------------------------------- other files of the format


def _write(tmp_path: Path, records: list) -> Path:
    path = tmp_path / "osce.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


VARIANT = {
    "OSCE_Examination": {
        "Objective_for_Doctor": "Diagnose the infant.",
        "Patient_Actor": {
            "Demographics": "6-month-old boy",
            "History": "Fever for 2 days.",
            "Symptoms": {"Primary_Symptom": "Fever", "Secondary_Symptoms": ["Irritability", "Cough"]},
            "Allergies": "Penicillin",
            "Family_History": ["Asthma in mother"],
            "Current_Medications": ["Paracetamol"],
        },
        "Test_Results": [
            {
                "Test": "Complete Blood Count",
                "Results": [
                    {"Name": "WBC", "Value": 15.2, "Units": "x10^9/L", "Reference_Range": "4.5-11"},
                    {"Name": "Hemoglobin", "Value": "11 g/dL (normal 10.5-13.5)"},
                    {"Name": "Ratio: A/G", "Value": "1.2"},
                ],
            },
            {"Test": "Chest X-ray", "Findings": "Right lower lobe consolidation"},
            {"Blood_Culture": {"Gram_Stain": "Gram-positive cocci in pairs", "Growth": "S. pneumoniae"}},
            {"Test": "Deep Panel", "Results": {"A": {"B": {"C": {"Sodium": 135, "Note": "line one\nline two"}}}}},
            {"Test": "Urinalysis", "Results": {"pH": 6}},
            {"Test": "Urinalysis", "Results": {"Protein": "Negative"}},
            {"Test": "Empty", "Results": {}},
        ],
        "Correct_Diagnosis": ["Pneumococcal pneumonia", "Bacteremia"],
    }
}


def test_variant_file_converts(tmp_path):
    result = build_agentclinic_cases(_write(tmp_path, [VARIANT]))
    assert len(result.cases) == 1
    case = result.cases[0]
    assert case.final_diagnosis == "Pneumococcal pneumonia\nBacteremia"
    assert not [e for e in case.exams if e.kind == "physical"]  # no Physical_Examination_Findings
    by_name = {e.name: e for e in case.exams}
    assert list(by_name) == [
        "Complete Blood Count",
        "Chest X-ray",
        "Blood Culture",
        "Deep Panel",
        "Urinalysis",
        "Urinalysis (2)",
    ]
    assert _steps(result)["exams"]["dropped"] == {"empty section": 1}

    cbc = by_name["Complete Blood Count"]
    assert cbc.kind == "lab"
    wbc, hgb, ratio = cbc.items
    assert (wbc.name, wbc.value, wbc.valuenum, wbc.unit, wbc.ref_low, wbc.ref_high) == (
        "WBC",
        "15.2",
        15.2,
        "x10^9/L",
        4.5,
        11.0,
    )
    assert (hgb.value, hgb.valuenum, hgb.unit, hgb.ref_low, hgb.ref_high) == ("11", 11.0, "g/dL", 10.5, 13.5)
    assert ratio.name == "Ratio - A/G" and ratio.valuenum == 1.2

    assert by_name["Chest X-ray"].kind == "radiology"
    assert by_name["Chest X-ray"].result == "Findings: Right lower lobe consolidation"
    culture = by_name["Blood Culture"]
    assert culture.kind == "microbiology" and "Growth: S. pneumoniae" in culture.result

    deep = by_name["Deep Panel"]
    sodium, note = deep.items
    assert (sodium.name, sodium.value, sodium.valuenum) == ("A, B, C, Sodium", "135", 135.0)
    assert note.value == "line one line two"
    assert by_name["Urinalysis"].items[0].valuenum == 6.0
    assert by_name["Urinalysis (2)"].result == "Protein: Negative"

    for exam in case.exams:
        if exam.items is not None:
            assert parse_result(render_result(exam), exam.name).items == exam.items

    profile = case.profile
    assert (profile.age, profile.sex) == (None, "M")
    assert profile.chief_complaint == "Fever"
    assert profile.allergies == "Penicillin"
    assert profile.family_history == "Asthma in mother"
    hpi = profile.history_of_present_illness
    assert "Demographics: 6-month-old boy" in hpi
    assert "Secondary Symptoms: Irritability; Cough" in hpi
    assert "Current Medications: Paracetamol" in hpi
    assert "Diagnose the infant" not in hpi


def test_drops_are_counted(tmp_path):
    no_dx = json.loads(json.dumps(VARIANT))
    del no_dx["OSCE_Examination"]["Correct_Diagnosis"]
    empty_dx = json.loads(json.dumps(VARIANT))
    empty_dx["OSCE_Examination"]["Correct_Diagnosis"] = "  "
    no_exams = json.loads(json.dumps(VARIANT))
    no_exams["OSCE_Examination"]["Test_Results"] = {}
    no_exams["OSCE_Examination"]["Physical_Examination_Findings"] = {"Vital_Signs": {}}
    pe_only = {
        "OSCE_Examination": {
            "Patient_Actor": {"Demographics": "40-year-old woman"},
            "Physical_Examination_Findings": {"General": {"Heart_Rate": 88}},
            "Correct_Diagnosis": "Anxiety",
        }
    }
    path = _write(tmp_path, [VARIANT, no_dx, empty_dx, no_exams, pe_only])
    result = build_agentclinic_cases(path)
    assert [c.case_id for c in result.cases] == ["agentclinic:1", "agentclinic:5"]
    steps = _steps(result)
    assert steps["build"]["input"] == 5
    assert steps["build"]["dropped"] == {"no diagnosis": 2, "no exams": 1}
    pe_case = result.cases[1]
    assert pe_case.exams[0].name == "PE: General" and pe_case.exams[0].result == "Heart Rate: 88"
    assert (pe_case.profile.age, pe_case.profile.sex) == (40, "F")


def test_malformed_line_raises_with_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(VARIANT) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"jsonl:3: not valid JSON") as err:
        build_agentclinic_cases(path)
    assert str(path) in str(err.value)


def test_non_osce_record_and_missing_file_raise(tmp_path):
    path = _write(tmp_path, [VARIANT, [1, 2]])
    with pytest.raises(InputError, match="jsonl:2: not an AgentClinic OSCE record"):
        build_agentclinic_cases(path)
    with pytest.raises(InputError, match="no such AgentClinic file"):
        build_agentclinic_cases(tmp_path / "missing.jsonl")


def test_source_name_namespaces_ids(tmp_path):
    result = build_agentclinic_cases(_write(tmp_path, [VARIANT]), source="agentclinic-mimiciv")
    case = result.cases[0]
    assert case.case_id == "agentclinic-mimiciv:1" and case.source == "agentclinic-mimiciv"
    assert case.subject_key.startswith("agentclinic-mimiciv:")


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("text", "age", "sex"),
    [
        ("35-year-old female", 35, "F"),
        ("70-year-old man accompanied by his wife", 70, "M"),
        ("32-year-old woman, gravida 2, para 1", 32, "F"),
        ("Newborn, 3050-g (6-lb 12-oz) male, six hours post delivery", None, "M"),
        ("3-year-old child", 3, None),
        ("10-month-old boy", None, "M"),
        ("Age: 61; Sex: F", 61, "F"),
    ],
)
def test_parse_age_and_sex(text, age, sex):
    assert parse_age(text) == age
    assert parse_sex(text) == sex


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("Chest_X-Ray", "radiology"),
        ("MRI Brain", "radiology"),
        ("Sputum Culture", "microbiology"),
        ("Electrocardiogram", "other"),
        ("Skin Biopsy", "other"),
        ("Liver Function Tests", "lab"),
    ],
)
def test_classify(name, kind):
    assert classify(name) == kind


def test_wrapper_sections_become_the_tests_they_hold(tmp_path):
    record = {
        "OSCE_Examination": {
            "Patient_Actor": {"Demographics": "40-year-old man", "History": "Cough."},
            "Test_Results": {
                "Imaging": {"Chest_CT": {"Findings": "No mass."}, "Brain_MRI": {"Findings": "Normal."}},
                "Blood_Tests": {"Sodium": "135 mEq/L", "Potassium": "4.1 mEq/L"},
            },
            "Correct_Diagnosis": "Bronchitis",
        }
    }
    case = build_agentclinic_cases(_write(tmp_path, [record])).cases[0]
    by_name = {e.name: e for e in case.exams}
    assert set(by_name) == {"Chest CT", "Brain MRI", "Blood Tests"}
    assert by_name["Chest CT"].kind == "radiology" and by_name["Chest CT"].result == "Findings: No mass."
    assert [i.name for i in by_name["Blood Tests"].items] == ["Sodium", "Potassium"]


def test_unit_words_are_data_and_drive_value_parsing():
    from diaggym.sources.agentclinic.values import _UNIT_WORDS, parse_value

    assert len(_UNIT_WORDS) == 71 and {"mmhg", "mg", "titer"} <= _UNIT_WORDS
    assert parse_value("120 mmHg (normal range: 90-140)") == {
        "value": "120", "valuenum": 120.0, "unit": "mmHg", "comment": None, "ref_low": 90.0, "ref_high": 140.0,
    }  # fmt: skip
    assert parse_value("3 apples") is None  # "apples" is no unit word: not a numeric result


def test_json_floats_never_become_exponent_text():
    from diaggym.sources.agentclinic.tree import scalar_text

    assert scalar_text(1e-05) == "0.00001"
    assert scalar_text(2.5e16) == "25000000000000000.0"
    assert scalar_text(13.5) == "13.5"
    assert scalar_text(7) == "7"  # integers stay as written
    assert scalar_text(float("nan")) is None
