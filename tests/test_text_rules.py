"""The shared text rules (diaggym.text_rules): one contract each, pinned on small inputs."""

from __future__ import annotations

import pytest

from diaggym.cases import LabItem
from diaggym.serialization import parse_item_line, render_item
from diaggym.text_rules import cut_at_stop, escape_lab_keys, item_name, norm, one_line, text_block


def test_one_line_collapses_whitespace_and_sep_and_returns_none_for_empty():
    assert one_line("  a\n b\t<SEP>c  ") == "a b c"
    assert one_line(" \n <SEP> ") is None
    assert one_line("") is None
    assert one_line(None) is None


def test_text_block_keeps_lines():
    assert text_block(" a\r\nb<SEP>c \n") == "a\nb c"
    assert text_block("  ") is None and text_block(None) is None


def test_norm_is_letters_and_digits_in_lower_case():
    assert norm("Reference_Range") == "reference range"
    assert norm("X-ray (Chest)/CT") == "x ray chest ct"
    assert norm("Café  au-lait") == "café au lait"
    assert norm("---") == ""


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("12 mg; Units: mg/dL", "12 mg, Units mg/dL"),
        ("Units: mg/dL", "Units mg/dL"),
        ("Comment: see; Value: 3", "Comment see, Value 3"),
        ("1: 2", "1: 2"),  # not a lab key: unchanged
        ("positive", "positive"),
    ],
)
def test_escape_lab_keys(raw, escaped):
    assert escape_lab_keys(raw) == escaped


def test_escaped_value_survives_the_analyte_line_round_trip():
    item = LabItem(name="Odd", value=escape_lab_keys("3; Units: mmol; Comment: x"), unit="g")
    assert parse_item_line(render_item(item), "Odd") == item


def test_item_name():
    assert item_name("Glucose: fasting\n") == "Glucose - fasting"
    assert item_name("Value") == "Value (analyte)"
    assert item_name(" ", fallback="CBC") == "CBC"
    assert item_name(None) == "Unnamed analyte"


def test_cut_at_stop_takes_the_earliest_stop_or_eos():
    assert cut_at_stop(" a <SEP> b <|im_end|>", ("<SEP>",), "<|im_end|>") == ("a", True)
    assert cut_at_stop("a<|endoftext|>b<SEP>", ("<SEP>", "<|endoftext|>")) == ("a", True)
    assert cut_at_stop(" plain ", ("<SEP>",)) == ("plain", False)
