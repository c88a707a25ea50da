"""The conditioning probe: the cohort carries its planted dependencies, baselines cannot use them, a trained model can."""

from __future__ import annotations

from statistics import fmean

import pytest

from diaggym.engines import make_engine
from diaggym.evaluation.probe import DX_SHIFT, make_probe_cohort, probe_errors, run_probe


def _value(case, exam: str, analyte: str) -> float:
    ex = next(e for e in case.exams if e.name == exam)
    return next(it.valuenum for it in ex.items if it.name == analyte)


def test_cohort_is_deterministic_and_split():
    a, b = make_probe_cohort(200, seed=3), make_probe_cohort(200, seed=3)
    assert [c.model_dump() for c in a] == [c.model_dump() for c in b]
    assert [c.model_dump() for c in a] != [c.model_dump() for c in make_probe_cohort(200, seed=4)]
    splits = {s: sum(c.split == s for c in a) for s in ("train", "val", "test")}
    assert splits["train"] > 120 and splits["val"] > 5 and splits["test"] > 5


def test_planted_dependencies_are_in_the_data():
    cohort = make_probe_cohort(600)
    aki = [_value(c, "Basic Metabolic Panel (BMP)", "Creatinine") for c in cohort if c.final_diagnosis == DX_SHIFT]
    other = [_value(c, "Basic Metabolic Panel (BMP)", "Creatinine") for c in cohort if c.final_diagnosis != DX_SHIFT]
    assert fmean(aki) - fmean(other) == pytest.approx(0.6, abs=0.05)  # +3 sd of 0.2
    diffs = [_value(c, "Lactate, repeat", "Lactate, repeat") - _value(c, "Lactate", "Lactate") for c in cohort]
    assert fmean(diffs) == pytest.approx(0.1, abs=0.02) and max(abs(d - 0.1) for d in diffs) < 0.35


def test_unconditional_baselines_cannot_use_the_plants():
    cohort = make_probe_cohort(600)
    train = [c for c in cohort if c.split == "train"]
    test = [c for c in cohort if c.split == "test"]
    median = probe_errors(make_engine("median", cases=train), test)
    marginal = probe_errors(make_engine("marginal", cases=train, seed=0), test)
    # Conditioning on the diagnosis reaches ~0.16 (the noise); no constant can go below ~0.28 on a 50/50 mixture.
    assert median["Creatinine MAE"] > 0.25 and marginal["Creatinine MAE"] > 0.4
    # Copying the first Lactate reaches ~0.1; the spread of Lactate itself is 0.8.
    assert median["Lactate, repeat MAE"] > 0.45 and marginal["Lactate, repeat MAE"] > 0.6
    assert median["Creatinine unparsed"] == 0 and marginal["Lactate, repeat unparsed"] == 0


@pytest.mark.integration
def test_trained_tiny_model_learns_the_planted_conditioning(tmp_path):
    """The normal trainer on the probe cohort: the model beats both baselines on both planted analytes."""
    res = run_probe(tmp_path, n_cases=600, steps=PROBE_STEPS, preset="tiny", lr=PROBE_LR, batch_size=PROBE_BATCH)
    model, median, marginal = (res["errors"][k] for k in ("model (greedy)", "median", "marginal"))
    assert res["val_loss_after"] < res["val_loss_before"] / 10
    for analyte in ("Creatinine", "Lactate, repeat"):
        assert model[f"{analyte} unparsed"] <= 2, res
        best_baseline = min(median[f"{analyte} MAE"], marginal[f"{analyte} MAE"])
        assert model[f"{analyte} MAE"] < 0.8 * best_baseline, res  # a clear margin, not a tie


PROBE_STEPS, PROBE_LR, PROBE_BATCH = 400, 5e-3, 8
