"""Fidelity and diversity metrics, defined as in the reference work (ARCHITECTURE.md, "Metrics").

Each function returns a :class:`Metric`: the value (``None`` when nothing
qualified, never NaN), how many groups it averaged over, and how many were
skipped and why, so a report can say what a number rests on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
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

    Both samples are standardized with the *real* mean and std, so the distance is in real standard
    deviations.  An analyte needs ``min_values`` real and generated values and a real std > 0.
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


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1, norms)


def pairwise_diversity(embeddings: np.ndarray) -> float:
    """1 − mean cosine similarity over all distinct pairs (the paper's text "LPIPS")."""
    e = _unit(np.asarray(embeddings, float))
    n = len(e)
    sims = e @ e.T
    return float(1 - (sims.sum() - np.trace(sims)) / (n * (n - 1)))


def text_diversity(
    embeddings_by_exam: Mapping[str, np.ndarray], real_counts: Mapping[str, int], top_k: int = 5, min_real: int = 5
) -> Metric:
    """Diversity averaged over the ``top_k`` free-text exam types with the most real samples (≥ ``min_real``).

    ``embeddings_by_exam``: generated-report embeddings per exam type (at least 2 reports needed).
    """
    eligible = [e for e, n in sorted(real_counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_real]
    chosen = eligible[:top_k]
    per: dict[str, float] = {}
    skipped: Counter = Counter({f"fewer than {min_real} real samples": len(real_counts) - len(eligible)})
    for exam in chosen:
        emb = embeddings_by_exam.get(exam)
        if emb is None or len(emb) < 2:
            skipped["fewer than 2 generated reports"] += 1
            continue
        per[exam] = pairwise_diversity(emb)
    return Metric("text_diversity", _mean(list(per.values())), len(per), per, {k: v for k, v in skipped.items() if v})


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits: ‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½)."""
    from scipy import linalg

    a, b = np.asarray(a, float), np.asarray(b, float)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # near-singular product: regularize as the FID reference code does
        eps = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def text_fid(
    real_by_exam: Mapping[str, np.ndarray], generated_by_exam: Mapping[str, np.ndarray], min_samples: int = 5
) -> Metric:
    """Text FID per exam type (real vs generated embeddings), averaged; types need ``min_samples`` of each."""
    per: dict[str, float] = {}
    skipped: Counter = Counter()
    for exam in sorted(set(real_by_exam) | set(generated_by_exam)):
        r, g = real_by_exam.get(exam), generated_by_exam.get(exam)
        if r is None or g is None or len(r) < min_samples or len(g) < min_samples:
            skipped[f"fewer than {min_samples} real or generated reports"] += 1
            continue
        per[exam] = frechet_distance(r, g)
    return Metric("text_fid", _mean(list(per.values())), len(per), per, dict(skipped))
