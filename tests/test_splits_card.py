"""Patient-level splits and the dataset card."""

from __future__ import annotations

from collections import Counter

import pytest

from diaggym.card import check_counts, render_markdown
from diaggym.splits import parse_ratios, split_of


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
