"""The automatic stand-ins (``diaggym.evaluation.auto``) on tiny inputs whose scores are computed by hand."""

from __future__ import annotations

import pytest

from diaggym.cases import Exam, LabItem
from diaggym.evaluation import auto
from diaggym.exam_stats import ExamStats, TrainingStats


def _lab(name: str, x: float | None, unit: str | None = "mEq/L", value: str | None = None) -> LabItem:
    return LabItem(name=name, valuenum=x, unit=unit, value=value if x is None else None)


@pytest.fixture(scope="module")
def stats() -> TrainingStats:
    """Training: Na 138, 140, 142 (mean 140, sd 2, range 138-142); K 3.5, 4.0, 4.5 (sd 0.5)."""
    bmp = ExamStats(kind="lab")
    for na, k in ((138, 3.5), (140, 4.0), (142, 4.5)):
        bmp.add(Exam(name="BMP", kind="lab", group=0, items=[_lab("Na", na), _lab("K", k)]))
    return TrainingStats({"BMP": bmp})


def test_analyte_sd_is_the_sample_sd_of_training(stats):
    assert auto.analyte_sd(stats, "BMP", "Na") == pytest.approx(2.0)
    assert auto.analyte_sd(stats, "BMP", "K") == pytest.approx(0.5)
    assert auto.analyte_sd(stats, "BMP", "Cl") is None and auto.analyte_sd(stats, "CBC", "Na") is None


@pytest.mark.parametrize(
    ("gen", "expected"),
    [
        ([_lab("Na", 140), _lab("K", 4.0)], 5.0),  # identical
        ([_lab("Na", 143), _lab("K", 4.0)], 5 * (1 - 0.75 / 5)),  # |z| 1.5 and 0: mean 0.75 -> 4.25
        ([_lab("Na", 143)], 5 * 0.5 * (1 - 1.5 / 5)),  # K missing: coverage 1/2, err 1.5 -> 1.75
        ([_lab("Na", 160), _lab("K", 4.0)], 5 * (1 - 2.5 / 5)),  # |z| 10 capped at 5: mean 2.5 -> 2.5
        ([_lab("Na", None, value="hemolyzed"), _lab("K", 3.0)], 5 * 0.5 * (1 - 2.0 / 5)),  # no number: not covered
        ([], 0.0),  # nothing generated
    ],
)
def test_lab_similarity_by_hand(stats, gen, expected):
    real = [_lab("Na", 140), _lab("K", 4.0)]
    assert auto.lab_similarity(stats, "BMP", real, gen) == pytest.approx(expected)


def test_lab_similarity_edge_cases(stats):
    # an analyte training never saw has no sd: it counts as real but can never be covered
    real = [_lab("Na", 140), _lab("Cl", 100)]
    assert auto.lab_similarity(stats, "BMP", real, [_lab("Na", 140), _lab("Cl", 100)]) == pytest.approx(2.5)
    assert auto.lab_similarity(stats, "BMP", [_lab("Na", None, value="pending")], [_lab("Na", 140)]) is None
    errs, n_real = auto.standardized_errors(stats, "BMP", [_lab("Na", 140), _lab("K", 4.0)], [_lab("K", 5.0)])
    assert errs == [pytest.approx(2.0)] and n_real == 2


def test_text_similarity_is_five_times_the_positive_cosine():
    assert auto.text_similarity(0.8) == pytest.approx(4.0)
    assert auto.text_similarity(1.0) == 5.0 and auto.text_similarity(-0.3) == 0.0


@pytest.mark.parametrize(
    ("chain", "problems"),
    [
        # training range 138-142 widened by 3 sd (6): 132-148
        ([("BMP", [_lab("Na", 147.9)])], []),
        ([("BMP", [_lab("Na", 148.1)])], ["implausible value for Na"]),
        ([("BMP", [_lab("Na", 131.9)])], ["implausible value for Na"]),
        # a repeat may move by less than 3 sd (6)
        ([("BMP", [_lab("Na", 140)]), ("BMP", [_lab("Na", 145.9)])], []),
        ([("BMP", [_lab("Na", 140)]), ("BMP", [_lab("Na", 146.5)])], ["Na jumped by more than 3 sd"]),
        ([("BMP", [_lab("K", 4.0)]), ("BMP", [_lab("K", 4.0, unit="mmol/L")])], ["unit of K changed"]),
        # both at once, and an analyte unknown to training is never judged implausible
        (
            [("BMP", [_lab("Na", 133), _lab("Zz", 1e6)]), ("BMP", [_lab("Na", 147, unit="mmol/L")])],
            ["unit of Na changed", "Na jumped by more than 3 sd"],
        ),
    ],
)
def test_chain_consistency_by_hand(stats, chain, problems):
    ok, reasons = auto.chain_consistency(stats, chain)
    assert reasons == problems and ok is (not problems)
