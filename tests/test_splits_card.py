"""Patient-level splits, hashed seeds and the dataset card."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from diaggym.card import check_counts, render_markdown
from diaggym.cases import Case, Exam, Profile
from diaggym.engines.baselines import request_seed
from diaggym.serialization import shuffled_order
from diaggym.splits import parse_ratios, split_of

# Pinned once from real MIMIC-IV demo patient ids.  A change here moves patients between splits (a test
# patient seen in training) or changes published runs: it must be a deliberate, documented format change.
PINNED_SPLITS = {
    "mimic-iv:10014729": "train",
    "mimic-iv:10000032": "train",
    "mimic-iv:10001725": "val",
    "mimic-iv:10008454": "val",
    "mimic-iv:10014078": "test",
    "mimic-iv:10039997": "test",
    "mimic-iv:10029291": "test",
}


def test_split_of_known_patients_is_pinned():
    assert {k: split_of(k) for k in PINNED_SPLITS} == PINNED_SPLITS
    # the salt and the ratios take part in the draw
    assert split_of("mimic-iv:10003400", salt="x") == "val" and split_of("mimic-iv:10003400") == "train"
    assert split_of("mimic-iv:10037928", (0.5, 0.25, 0.25)) == "val"


def test_hashed_seeds_are_pinned():
    """Seeds derived from strings (sha256 or random's string seeding), never from hash(): fixed across runs."""
    assert request_seed(0, 1, "Anion Gap") == 7425964579544702038
    assert request_seed(7, 0, "Complete Blood Count (CBC)") == 11579150051535057735
    # the training dataset's per-epoch order of same-time exams: Random(f"{seed}:{epoch}:{case_id}")
    case = Case(
        case_id="t:1", source="t", subject_key="p", profile=Profile(sex="M"), final_diagnosis="D",
        exams=[Exam(name=f"E{i}", kind="physical", group=0 if i < 5 else 1, result="r") for i in range(7)],
    )
    orders = [shuffled_order(case, random.Random(f"0:{epoch}:t:1")) for epoch in range(3)]
    assert orders == [[2, 3, 1, 0, 4, 6, 5], [1, 0, 3, 2, 4, 5, 6], [4, 0, 1, 2, 3, 6, 5]]


def test_split_is_a_pure_function_of_the_patient_and_follows_ratios():
    keys = [f"mimic-iv:{i}" for i in range(20000)]
    counts = Counter(split_of(k) for k in keys)
    assert abs(counts["train"] / 20000 - 0.8) < 0.015
    assert abs(counts["val"] / 20000 - 0.1) < 0.01
    assert [split_of(k) for k in keys[:50]] == [split_of(k) for k in keys[:50]]
    assert {split_of(k, (0, 0, 1)) for k in keys[:200]} == {"test"}
    assert [split_of(k, salt="a") for k in keys[:200]] != [split_of(k, salt="b") for k in keys[:200]]


def test_parse_ratios():
    assert parse_ratios("80/10/10") == pytest.approx((0.8, 0.1, 0.1))
    assert parse_ratios("1,1,2") == pytest.approx((0.25, 0.25, 0.5))
    for bad in ("0.5,0.5", "a,b,c", "-1,1,1", "0,0,0"):
        with pytest.raises(ValueError):
            parse_ratios(bad)


def test_check_counts_refuses_a_card_that_does_not_add_up():
    check_counts([{"step": "s", "input": 10, "kept": 7, "dropped": {"a": 2, "b": 1}}])
    with pytest.raises(AssertionError, match="does not add up"):
        check_counts([{"step": "s", "input": 10, "kept": 8, "dropped": {"a": 1}}])


def test_card_content(demo_out):
    _, card = demo_out
    assert card["schema"] == "diaggym.case/1" and card["format"] == "diaggym-v1"
    assert card["exams_per_case_by_kind"]["lab"]["mean"] > 1
    assert card["top_exams"][0]["cases"] >= card["top_exams"][-1]["cases"]
    assert card["top_exams"][0]["name"] == "PE: Vital Signs"
    md = render_markdown(card, "exams_per_case.png")
    assert "| admissions → cases | case | 275 |" in md
    assert "![exams per case](exams_per_case.png)" in md
