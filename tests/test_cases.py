"""Contract 1: the case schema, its validation errors and its file formats."""

from __future__ import annotations

import json

import pytest

from diaggym.cases import SCHEMA, Case, Exam, LabItem, load_cases, read_parquet, write_jsonl, write_parquet
from diaggym.errors import InputError


def _case(**over) -> dict:
    base = {
        "schema": SCHEMA,
        "case_id": "t:1",
        "source": "test",
        "split": "train",
        "subject_key": "p1",
        "profile": {"sex": "F", "age": 67, "chief_complaint": "dyspnea"},
        "final_diagnosis": "Pneumonia",
        "exams": [
            {"name": "PE: Vital Signs", "kind": "physical", "group": 0, "result": "Heart Rate: 90 bpm"},
            {
                "name": "Anion Gap",
                "kind": "lab",
                "group": 1,
                "time": "2180-05-06T22:23:00",
                "items": [
                    {
                        "name": "Anion Gap",
                        "value": "16",
                        "valuenum": 16.0,
                        "unit": "mEq/L",
                        "ref_low": 8.0,
                        "ref_high": 20.0,
                    }
                ],
            },
        ],
    }
    base.update(over)
    return base


def test_valid_case_round_trips_through_jsonl_and_parquet(tmp_path):
    case = Case.model_validate(_case())
    assert case.to_dict()["schema"] == SCHEMA
    write_jsonl([case], tmp_path / "c.jsonl")
    write_parquet([case], tmp_path / "c.parquet")
    assert load_cases(tmp_path / "c.jsonl") == [case]
    assert read_parquet(tmp_path / "c.parquet") == [case]
    assert load_cases(tmp_path / "c.jsonl", split="test") == []


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.update(schema="diaggym.case/0"), "field 'schema'"),
        (lambda d: d.pop("final_diagnosis"), "field 'final_diagnosis'"),
        (lambda d: d["exams"][1].pop("items"), "exactly one of 'items' or 'result'"),
        (lambda d: d["exams"][1]["items"][0].update(valuenum="high"), "field 'exams.1.items.0.valuenum'"),
        (lambda d: d["exams"][0].update(result="a<SEP>b"), "<SEP>"),
        (lambda d: d["exams"][0].update(result="a<|endoftext|>b"), "result must not contain <|endoftext|>"),
        (lambda d: d["exams"][0].update(name="CBC<|endoftext|>"), "<|endoftext|>"),
        (lambda d: d["exams"][1]["items"][0].update(value="7<|endoftext|>"), "value must not contain <|endoftext|>"),
        (lambda d: d.update(final_diagnosis="Sepsis<|endoftext|>"), "final_diagnosis must not contain <|endoftext|>"),
        (lambda d: d["profile"].update(chief_complaint="fever <SEP> cough"), "chief_complaint must not contain <SEP>"),
        (lambda d: d["profile"].update(note="Note<|endoftext|>"), "note must not contain <|endoftext|>"),
        (lambda d: d["exams"].reverse(), "ordered by group"),
        (lambda d: d["exams"].append(dict(d["exams"][1])), "occurs twice"),
        (lambda d: d.update(split="holdout"), "field 'split'"),
        (lambda d: d.update(extra=1), "field 'extra'"),
        (lambda d: d["exams"][1]["items"][0].update(unit="mEq/L; Units: g"), "lab key"),
    ],
)
def test_invalid_cases_name_line_and_field(tmp_path, mutate, needle):
    good, bad = _case(), _case(case_id="t:2")
    mutate(bad)
    path = tmp_path / "cases.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(InputError) as err:
        load_cases(path)
    msg = str(err.value)
    assert f"{path}:2" in msg
    assert needle in msg


def test_broken_json_names_the_line(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text(json.dumps(_case()) + "\n{not json\n")
    with pytest.raises(InputError, match=r"cases\.jsonl:2: not valid JSON"):
        load_cases(path)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such case file"):
        load_cases(tmp_path / "nope.jsonl")


def test_lab_item_needs_content_and_finite_numbers():
    with pytest.raises(ValueError, match="no value"):
        LabItem(name="X")
    with pytest.raises(ValueError, match="finite"):
        LabItem(name="X", valuenum=float("nan"))
    with pytest.raises(ValueError, match="exactly one"):
        Exam(name="X", kind="lab", group=1, items=[LabItem(name="X", value="1")], result="1")
