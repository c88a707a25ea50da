"""Deterministic train/val/test splits by patient.

The split of a case is a pure function of its ``subject_key`` (and a salt), so
all encounters of one patient land in the same split and re-running
preprocessing on more data never moves an existing patient to another split.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = (0.8, 0.1, 0.1)


def parse_ratios(text: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` (or ``"80/10/10"``) → normalised (train, val, test) ratios."""
    parts = [p for p in text.replace("/", ",").split(",") if p.strip()]
    if len(parts) != 3:
        raise ValueError(f"split ratios need three numbers (train,val,test), got {text!r}")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"split ratios must be numbers, got {text!r}") from None
    if any(v < 0 for v in vals) or sum(vals) <= 0:
        raise ValueError(f"split ratios must be non-negative and not all zero, got {text!r}")
    total = sum(vals)
    return vals[0] / total, vals[1] / total, vals[2] / total


def split_of(subject_key: str, ratios: tuple[float, float, float] = DEFAULT_RATIOS, salt: str = "") -> str:
    """The split of one patient: a uniform number from sha256(salt + key), cut at the ratios."""
    digest = hashlib.sha256(f"{salt}{subject_key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < ratios[0]:
        return "train"
    if u < ratios[0] + ratios[1]:
        return "val"
    return "test"
