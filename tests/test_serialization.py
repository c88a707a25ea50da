"""Contract 2: format diaggym-v1 (golden strings, round trips, append-only prompts)."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from diaggym.cases import Case, Exam, LabItem, Profile
from diaggym.serialization import (
    EXAMS_HEADER,
    case_prompts,
    clean_completion,
    format_number,
    parse_result,
    render_context,
    render_event,
    render_prompt,
    render_result,
    shuffled_order,
    training_text,
)

ANION_GAP = LabItem(name="Anion Gap", value="16", valuenum=16.0, unit="mEq/L", ref_low=8.0, ref_high=20.0)


# ------------------------------------------------------------------ golden strings
def test_single_analyte_matches_the_reference_string():
    exam = Exam(name="Anion Gap", kind="lab", group=1, items=[ANION_GAP])
    assert render_result(exam) == "Value: 16; Numeric Value: 16.0; Units: mEq/L; Reference Range: 8.0 - 20.0"


def test_panel_prefixes_each_analyte_and_omits_missing_parts():
    items = [
        ANION_GAP,
        LabItem(name="Glucose", value="NEG"),
        LabItem(name="pH", valuenum=7.4, ref_low=7.35, ref_high=7.45),
    ]
    exam = Exam(name="Basic Metabolic Panel (BMP)", kind="lab", group=1, items=items)
    assert render_result(exam) == (
        "Anion Gap: Value: 16; Numeric Value: 16.0; Units: mEq/L; Reference Range: 8.0 - 20.0\n"
        "Glucose: Value: NEG\n"
        "pH: Numeric Value: 7.4; Reference Range: 7.35 - 7.45"
    )


def test_prompt_matches_the_reference_client_construction():
    """The released weights' client: context + SEP.join(events) + SEP + 'Exam name:...'."""
    profile = Profile(sex="F", service="OBSTETRICS/GYNECOLOGY", chief_complaint="right lower quadrant pain")
    context = render_context(profile, "Appendicitis")
    assert context == (
        "Sex: F\nService: OBSTETRICS/GYNECOLOGY\nChief Complaint: right lower quadrant pain\n\n"
        "Final Diagnosis:\nAppendicitis\n" + EXAMS_HEADER
    )
    past = [
        ("Anion Gap", "Value: 16; Numeric Value: 16.0; Units: mEq/L; Reference Range: 8.0 - 20.0"),
        ("PE: Vital Signs", "Heart Rate: 90 bpm"),
    ]
    reference = (
        context
        + "<SEP>".join(f"Exam name:\n{n}\nExam results:\n{r}" for n, r in past)
        + "<SEP>"
        + "Exam name:\nCHEST (PORTABLE AP)\nExam results:\n"
    )
    assert render_prompt(context, past, "CHEST (PORTABLE AP)") == reference
    assert render_prompt(context, [], "X") == context + "Exam name:\nX\nExam results:\n"


def test_verbatim_note_header_wins_over_fields():
    profile = Profile(note="Name:  ___\n \nSex:   F\n", sex="M")
    assert render_context(profile, "Dx").startswith("Name:  ___\n \nSex:   F\n\nFinal Diagnosis:\nDx\n")


def test_training_text_ends_with_eos_and_loss_part_starts_after_context():
    case = _toy_case()
    context, target = training_text(case, "<|endoftext|>")
    assert context.endswith(EXAMS_HEADER)
    assert target.startswith("Exam name:\nPE: Vital Signs\nExam results:\n")
    assert target.endswith("<SEP><|endoftext|>")
    assert target.count("<SEP>") == len(case.exams)


def test_clean_completion_cuts_at_sep_and_eos():
    assert clean_completion("  Value: 1 <SEP>Exam name:\nX") == "Value: 1"
    assert clean_completion("text<|endoftext|>junk", "<|endoftext|>") == "text"
    assert clean_completion("text<|im_end|>junk", "<|im_end|>") == "text"


# ------------------------------------------------------------------ parsing generated text
def test_parse_reports_malformed_lines_instead_of_hiding_them():
    parsed = parse_result("Hemoglobin: Value: 10.1; Numeric Value: 10.1\nthis is not an analyte\n<SEP>", "CBC")
    assert [i.name for i in parsed.items] == ["Hemoglobin"]
    assert parsed.unparsed_lines == ["this is not an analyte"]
    assert not parsed.complete


def test_parse_free_text_and_kind_hint():
    assert parse_result("No acute cardiopulmonary process.", "CHEST").items == []
    assert parse_result("No acute process.", "CHEST").complete
    text = "Specimen: BLOOD\nComment: Value: 3"
    assert parse_result(text, "Blood Culture", kind="microbiology").items == []


def test_parse_bad_numeric_value_is_unparsed():
    parsed = parse_result("Value: 5; Numeric Value: five", "X")
    assert parsed.items == [] and parsed.text == "Value: 5; Numeric Value: five"


# ------------------------------------------------------------------ property-based round trip
_chars = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp"))
_text = st.text(_chars, min_size=1, max_size=20).map(str.strip).filter(bool)
_num = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def lab_items(draw):
    fields = dict(
        name=draw(_text),
        value=draw(st.none() | _text | st.sampled_from(["16", "___", "NEG", "<0.1", "1.2; 3"])),
        valuenum=draw(st.none() | _num),
        unit=draw(st.none() | _text | st.sampled_from(["mEq/L", "%", "K/uL"])),
        ref_low=draw(st.none() | _num),
        ref_high=draw(st.none() | _num),
        comment=draw(st.none() | _text | st.just("NEG; Units: see note")),
    )
    try:
        return LabItem(**fields)
    except ValidationError:
        assume(False)


@settings(max_examples=400, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(items=st.lists(lab_items(), min_size=1, max_size=6), exam_name=_text, same_name=st.booleans())
def test_render_parse_round_trip(items, exam_name, same_name):
    if same_name and len(items) == 1:
        exam_name = items[0].name
    try:
        exam = Exam(name=exam_name, kind="lab", group=1, items=items)
    except ValidationError:
        assume(False)
    parsed = parse_result(render_result(exam), exam.name)
    assert parsed.items == exam.items
    assert parsed.complete


# ------------------------------------------------------------------ numbers
@pytest.mark.parametrize(
    ("x", "text"),
    [
        (16, "16.0"),
        (0.1, "0.1"),
        (1e-05, "0.00001"),
        (-2.5e-07, "-0.00000025"),
        (1e16, "10000000000000000.0"),
        (1.5e22, "15000000000000000000000.0"),
        (123456.789, "123456.789"),
        (-0.0, "-0.0"),
    ],
)
def test_format_number_golden(x, text):
    assert format_number(x) == text


def test_format_number_refuses_non_finite():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="not finite"):
            format_number(bad)


def test_tiny_value_is_written_in_plain_decimals_as_the_reference_parsers_need():
    item = LabItem(name="Troponin T", value="<0.01", valuenum=1e-05, unit="ng/mL", ref_low=0.0, ref_high=1e-02)
    text = render_result(Exam(name="Troponin T", kind="lab", group=1, items=[item]))
    assert text == "Value: <0.01; Numeric Value: 0.00001; Units: ng/mL; Reference Range: 0.0 - 0.01"


_tiny_or_huge = st.one_of(
    st.floats(min_value=-1e-4, max_value=1e-4, allow_nan=False),  # subnormals included
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: abs(v) >= 1e15),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
)


@settings(max_examples=500)
@given(x=_tiny_or_huge)
def test_every_number_is_plain_decimal_and_reads_back_exactly(x):
    text = format_number(x)
    assert "e" not in text and "E" not in text
    assert "." in text and float(text) == x
    assert text == text.strip() and not text.startswith("+")
    item = LabItem(name="A", valuenum=x, ref_low=x, ref_high=x)
    rendered = render_result(Exam(name="A", kind="lab", group=1, items=[item]))
    assert not re.search(r"\d[eE]", rendered), rendered
    assert parse_result(rendered, "A").items == [item]


# ------------------------------------------------------------------ bundled data
def test_every_bundled_case_round_trips_and_prompts_are_append_only(demo_result):
    from diaggym.sources.agentclinic import build_agentclinic_cases
    from tests.conftest import AGENTCLINIC

    cases = demo_result.cases + build_agentclinic_cases(AGENTCLINIC).cases
    assert len(cases) > 200
    n_prompts = 0
    for case in cases:
        for exam in case.exams:
            if exam.items is not None:
                expected = [it.model_copy(update={"flag": None}) for it in exam.items]
                assert parse_result(render_result(exam), exam.name).items == expected, case.case_id
        prompts = case_prompts(case)
        for k in range(len(prompts) - 1):
            assert prompts[k + 1].startswith(prompts[k]), (case.case_id, k)
        context, target = training_text(case, "<EOS>")
        assert all((context + target).startswith(p) for p in prompts)
        n_prompts += len(prompts)
    assert n_prompts > 3000


def test_group_shuffle_keeps_groups_in_order_and_is_seeded(demo_result):
    case = max(demo_result.cases, key=lambda c: len(c.exams))
    a = shuffled_order(case, random.Random(1))
    b = shuffled_order(case, random.Random(1))
    assert a == b and sorted(a) == list(range(len(case.exams)))
    groups = [case.exams[i].group for i in a]
    assert groups == sorted(groups)
    assert any(shuffled_order(case, random.Random(s)) != list(range(len(case.exams))) for s in range(5))


def _toy_case() -> Case:
    return Case(
        case_id="t:1",
        source="test",
        subject_key="p",
        profile=Profile(sex="M"),
        final_diagnosis="Sepsis",
        exams=[
            Exam(name="PE: Vital Signs", kind="physical", group=0, result="HR 120"),
            Exam(name="Anion Gap", kind="lab", group=1, items=[ANION_GAP]),
        ],
    )


def test_render_event_ends_with_sep():
    assert render_event("X", " r \n") == "Exam name:\nX\nExam results:\nr<SEP>"


@pytest.mark.parametrize("text", ["Value: 1; Numeric Value: 1.0", "A: Value: x\nB: Units: mg; Comment: see note"])
def test_complete_when_all_lines_parse(text):
    assert parse_result(text, "X").complete
