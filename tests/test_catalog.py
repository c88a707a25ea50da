"""PanelCatalog.cover: which panel names the analytes measured on one specimen (it names every lab exam)."""

from __future__ import annotations

import json

import pytest

from diaggym.catalog import PanelCatalog
from diaggym.errors import InputError

TOY = PanelCatalog(
    {
        "Big": (1, 2, 3, 4),
        "SmallA": (1, 2, 9),
        "SmallB": (2, 1, 8),
        "Other": (5,),
        "Shuffled": (30, 10, 20),
        "Dup": (40, 40, 41),
    }
)


@pytest.mark.parametrize(
    ("itemids", "expected"),
    [
        # most analytes covered wins, whatever the panel size
        ([1, 2, 3], [("Big", (1, 2, 3))]),
        # equal coverage: the smaller (more specific) panel; equal size too: the first in mapping order
        ([1, 2], [("SmallA", (1, 2))]),
        # ids come back in the panel's display order, not the input's
        ([20, 30, 10], [("Shuffled", (30, 10, 20))]),
        # leftovers go to the next best panel, then unpaneled ids one by one in id order under ""
        ([2, 1, 5, 77, 7], [("SmallA", (1, 2)), ("Other", (5,)), ("", (7,)), ("", (77,))]),
        # a panel listing an id twice yields it once
        ([41, 40], [("Dup", (40, 41))]),
        ([], []),
    ],
)
def test_cover_tie_breaks(itemids, expected):
    assert TOY.cover(itemids) == expected


def test_cover_greedy_takes_the_panel_with_most_first():
    # Big covers 4 of {1, 2, 3, 4, 8}; SmallB (3 of them) is left with 8 only.
    assert TOY.cover([1, 2, 3, 4, 8]) == [("Big", (1, 2, 3, 4)), ("SmallB", (8,))]
    # SmallB covers 3 of {1, 2, 3, 8}, as many as Big, and is smaller: it goes first.
    assert TOY.cover([1, 2, 3, 8]) == [("SmallB", (2, 1, 8)), ("Big", (3,))]


def test_cover_is_cached_per_id_set():
    cat = PanelCatalog({"P": (1, 2)})
    first = cat.cover([2, 1])
    assert cat.cover((1, 2)) is first


# Itemids of the bundled MIMIC-CDM mapping: glucose 50931, sodium 50983, potassium 50971, chloride 50902,
# bicarbonate 50882, urea nitrogen 51006, creatinine 50912; ALT 50861 and AST 50878 are CMP/LFP only.
BMP7 = [50912, 51006, 50882, 50902, 50971, 50983, 50931]


def test_bundled_mapping_names_a_bmp_and_a_cmp():
    cat = PanelCatalog.from_mapping()
    assert cat.cover(BMP7) == [("Basic Metabolic Panel (BMP)", (50931, 50983, 50971, 50902, 50882, 51006, 50912))]
    assert cat.cover([*BMP7, 50861, 50878]) == [
        ("Comprehensive Metabolic Panel (CMP)", (50931, 50983, 50971, 50902, 50882, 51006, 50912, 50861, 50878))
    ]
    assert cat.cover([1]) == [("", (1,))]


def test_bad_mapping_files_are_refused_with_the_reason(tmp_path):
    with pytest.raises(InputError, match="mapping not found"):
        PanelCatalog.from_mapping(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"OTHER": {}}))
    with pytest.raises(InputError, match="ADDITIONAL_LAB_TEST_MAPPING"):
        PanelCatalog.from_mapping(bad)
    notnum = tmp_path / "notnum.json"
    notnum.write_text(json.dumps({"ADDITIONAL_LAB_TEST_MAPPING": {"P": ["x"]}}))
    with pytest.raises(InputError, match="itemid lists"):
        PanelCatalog.from_mapping(notnum)
