"""Fidelity and diversity metrics, defined as in the reference work (docs/architecture.md, "Metrics").

Each function returns a :class:`Metric`: the value (``None`` when nothing
qualified, never NaN), how many groups it averaged over, and how many were
skipped and why, so a report can say what a number rests on.  Which data go in
(the training split's real values, analytes with one unit, the five most
frequent radiology exams) is chosen by the caller, :mod:`diaggym.evaluation.run`;
the helpers for those choices (:func:`single_unit_keys`, :func:`top_exams`) live here.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Metric:
    """An averaged metric with its support."""

    name: str
    value: float | None
    n_groups: int
    per_group: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "value": self.value,
            "n_groups": self.n_groups,
            "per_group": self.per_group,
            "skipped": self.skipped,
        }


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def num_var(values_by_analyte: Mapping[str, Sequence[float]], min_values: int = 3) -> Metric:
    """Num. Var: mean over analytes of ``var(x, ddof=1) / mean(x)**2``.

    Groups (one per (exam, analyte) key) need at least ``min_values`` values and a non-zero mean;
    the others are skipped and counted.  Computed on generated values; report the real data's
    value beside it (closer is better: too low means mode collapse, too high noise).
    """
    per: dict[str, float] = {}
    skipped: Counter = Counter()
    for key, xs in values_by_analyte.items():
        x = np.asarray(xs, dtype=float)
        x = x[np.isfinite(x)]
        if len(x) < min_values:
            skipped[f"fewer than {min_values} values"] += 1
            continue
        m = x.mean()
        if m == 0:
            skipped["mean is 0"] += 1
            continue
        per[key] = float(x.var(ddof=1) / m**2)
    return Metric("num_var", _mean(list(per.values())), len(per), per, dict(skipped))


def single_unit_keys(units_by_key: Mapping[str, Iterable[str | None]]) -> set[str]:
    """The (exam, analyte) keys written with exactly one non-empty unit (in the training split).

    As in the reference, an analyte whose unit changes, or that never states one, is left out of the
    numeric metrics: values in mg/dL and mmol/L in one distribution would measure the unit, not the model.
    """
    return {k for k, units in units_by_key.items() if len({u for u in units if u}) == 1}


def wasserstein_1d(a: Sequence[float], b: Sequence[float]) -> float:
    """W1 between two empirical 1-D distributions: the area between their CDFs."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.sort(np.concatenate([a, b]))
    deltas = np.diff(grid)
    cdf_a = np.searchsorted(a, grid[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(b, grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * deltas))


def num_wdist(
    real: Mapping[str, Sequence[float]], generated: Mapping[str, Sequence[float]], min_values: int = 30
) -> Metric:
    """Num. WDist: mean over analytes of W1 between standardized real and generated values.

    ``real`` are the training split's values (the reference compares with its training data, which
    is large; a test split is usually too small for 30 values).  Both samples are standardized with
    the *real* mean and std, so the distance is in real standard deviations.  An analyte needs
    ``min_values`` real and generated values and a real std > 0.
    """
    per: dict[str, float] = {}
    skipped: Counter = Counter()
    for key in sorted(set(real) | set(generated)):
        r = np.asarray(real.get(key, ()), float)
        g = np.asarray(generated.get(key, ()), float)
        r, g = r[np.isfinite(r)], g[np.isfinite(g)]
        if len(r) < min_values or len(g) < min_values:
            skipped[f"fewer than {min_values} real or generated values"] += 1
            continue
        sd = r.std(ddof=1)
        if sd == 0:
            skipped["real std is 0"] += 1
            continue
        mu = r.mean()
        per[key] = wasserstein_1d((r - mu) / sd, (g - mu) / sd)
    return Metric("num_wdist", _mean(list(per.values())), len(per), per, dict(skipped))


def pairwise_diversity(embeddings: np.ndarray) -> float:
    """1 − mean cosine similarity over all distinct pairs (the paper's text "LPIPS").

    Cosine similarity normalises each pair itself, so raw embeddings go in; nothing is normalised here.
    """
    e = np.asarray(embeddings, float)
    norms = np.linalg.norm(e, axis=1)
    norms = np.where(norms == 0, 1.0, norms)
    sims = (e @ e.T) / np.outer(norms, norms)
    n = len(e)
    return float(1 - (sims.sum() - np.trace(sims)) / (n * (n - 1)))


def top_exams(real_counts: Mapping[str, int], top_k: int = 5, min_real: int = 5) -> tuple[list[str], int]:
    """(the ``top_k`` exam types with the most real samples, ties by name; how many had fewer than ``min_real``).

    The reference picks its free-text exams this way: the five most frequent radiology exams with
    at least five real reports.
    """
    eligible = [e for e, n in sorted(real_counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_real]
    return eligible[:top_k], len(real_counts) - len(eligible)


def text_diversity(
    embeddings_by_exam: Mapping[str, np.ndarray], exams: Sequence[str], name: str = "text_diversity"
) -> Metric:
    """Diversity of the generated reports of each exam in ``exams`` (chosen by :func:`top_exams`), averaged.

    ``embeddings_by_exam``: raw report embeddings per exam type (at least 2 reports needed).
    """
    per: dict[str, float] = {}
    skipped: Counter = Counter()
    for exam in exams:
        emb = embeddings_by_exam.get(exam)
        if emb is None or len(emb) < 2:
            skipped["fewer than 2 reports"] += 1
            continue
        per[exam] = pairwise_diversity(emb)
    return Metric(name, _mean(list(per.values())), len(per), per, dict(skipped))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits: max(0, ‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½)).

    With few samples in many dimensions the covariances are singular and rounding can push the
    value below 0; it is clipped at 0, as the reference does.
    """
    from scipy import linalg

    a, b = np.asarray(a, float), np.asarray(b, float)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # few samples in many dimensions: singular by construction, not news
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():  # near-singular product: regularize as the FID reference code does
            eps = np.eye(len(cov_a)) * 1e-6
            covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)
    fid = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
    return max(0.0, fid)


def text_fid(
    real_by_exam: Mapping[str, np.ndarray],
    generated_by_exam: Mapping[str, np.ndarray],
    exams: Sequence[str],
    name: str = "text_fid",
) -> Metric:
    """Text FID of each exam in ``exams`` (real vs generated raw embeddings), averaged; each side needs 2 reports."""
    per: dict[str, float] = {}
    skipped: Counter = Counter()
    for exam in exams:
        r, g = real_by_exam.get(exam), generated_by_exam.get(exam)
        if r is None or g is None or len(r) < 2 or len(g) < 2:
            skipped["fewer than 2 real or generated reports"] += 1
            continue
        per[exam] = frechet_distance(r, g)
    return Metric(name, _mean(list(per.values())), len(per), per, dict(skipped))
