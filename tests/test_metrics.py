"""Metrics on hand-computed examples and edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from diaggym.metrics import (
    frechet_distance,
    num_var,
    num_wdist,
    pairwise_diversity,
    single_unit_keys,
    text_diversity,
    text_fid,
    top_exams,
    wasserstein_1d,
)


def test_num_var_hand_computed_and_skips():
    m = num_var({"a": [1, 2, 3], "b": [2, 2], "c": [-1, 0, 1]})
    assert m.value == pytest.approx(1.0 / 4.0)  # var([1,2,3], ddof=1) = 1, mean 2
    assert m.n_groups == 1
    assert m.skipped == {"fewer than 3 values": 1, "mean is 0": 1}
    assert num_var({}).value is None


def test_wasserstein_known_values():
    assert wasserstein_1d([0, 0, 0], [1, 1, 1]) == pytest.approx(1.0)
    assert wasserstein_1d([0, 1], [0, 1]) == 0.0
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 20000), rng.normal(0.5, 1, 20000)
    assert wasserstein_1d(a, b) == pytest.approx(0.5, abs=0.03)  # shift of two equal-shape Gaussians
    from scipy.stats import wasserstein_distance

    assert wasserstein_1d(a[:500], b[:700]) == pytest.approx(wasserstein_distance(a[:500], b[:700]))


def test_num_wdist_standardizes_by_the_real_std_and_counts_skips():
    rng = np.random.default_rng(1)
    real = {"hgb": rng.normal(13, 2, 5000), "few": [1.0] * 10, "flat": [5.0] * 40}
    gen = {"hgb": rng.normal(15, 2, 5000), "few": [1.0] * 40, "flat": [5.0] * 40}
    m = num_wdist(real, gen)
    assert m.value == pytest.approx(1.0, abs=0.05)  # a 2-unit shift is one real std
    assert m.skipped == {"fewer than 30 real or generated values": 1, "real std is 0": 1}
    assert num_wdist({"x": [1.0]}, {"x": [1.0]}).value is None


def test_diversity_identical_and_orthogonal():
    assert pairwise_diversity(np.ones((4, 3))) == pytest.approx(0.0)
    assert pairwise_diversity(np.eye(3)) == pytest.approx(1.0)
    # raw (unnormalised) embeddings: cosine is scale-free, so scaling rows changes nothing
    e = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    cos = [1 / np.sqrt(2), 0.0, 1 / np.sqrt(2)]  # pairs (0,1), (0,2), (1,2)
    assert pairwise_diversity(e) == pytest.approx(1 - np.mean(cos))
    assert pairwise_diversity(e * np.array([[3.0], [0.5], [7.0]])) == pytest.approx(1 - np.mean(cos))
    m = text_diversity({"CT": np.eye(3), "XR": np.ones((3, 2)), "MR": np.eye(2)[:1]}, ["CT", "XR", "MR"])
    assert m.value == pytest.approx(0.5) and m.n_groups == 2
    assert m.skipped == {"fewer than 2 reports": 1} and m.name == "text_diversity"
    assert text_diversity({"CT": np.eye(3)}, ["CT"], name="microbiology_text_diversity").name.startswith("microbio")


def test_top_exams_are_the_most_frequent_with_enough_real_samples():
    counts = {"CT head": 9, "CXR": 30, "MR": 5, "US": 5, "rare": 4, "CT abd": 12, "PET": 6}
    assert top_exams(counts) == (["CXR", "CT abd", "CT head", "PET", "MR"], 1)  # ties by name; "rare" < 5
    assert top_exams({"a": 4}) == ([], 1)


def test_only_analytes_with_one_unit_count():
    units = {"a": ["mg/dL", "mg/dL", None], "b": ["mg/dL", "mmol/L"], "c": [None, ""], "d": ["%"]}
    assert single_unit_keys(units) == {"a", "d"}


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(2)
    a = rng.normal(0, 1, (20000, 2))
    b = rng.normal(0, 1, (20000, 2)) + np.array([3.0, 0.0])
    assert frechet_distance(a, b) == pytest.approx(9.0, rel=0.03)  # |Δμ|² with equal covariances
    c = rng.normal(0, 2, (20000, 2))  # Σ = 4I vs I: Tr(I + 4I − 2·2I) = 2
    assert frechet_distance(a, c) == pytest.approx(2.0, rel=0.05)
    m = text_fid({"CT": a[:100], "XR": a[:3]}, {"CT": b[:100], "XR": b[:1]}, ["CT", "XR"])
    assert m.n_groups == 1 and m.skipped == {"fewer than 2 real or generated reports": 1}
    assert m.value is not None and not np.isnan(m.value)
    # raw embeddings: the distance scales with them (squared), nothing is normalised away
    assert frechet_distance(2 * a, 2 * b) == pytest.approx(4 * frechet_distance(a, b), rel=1e-6)


def test_frechet_distance_is_never_negative():
    # identical few-sample sets in many dimensions: singular covariances, rounding goes below 0 unclipped
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (6, 40))
    assert frechet_distance(x, x) >= 0.0
    assert frechet_distance(x, x.copy()) == pytest.approx(0.0, abs=1e-6)
