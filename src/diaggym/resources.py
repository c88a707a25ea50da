"""Files the package reads that live at the repository root in a checkout (configs/, data/mimic-cdm/).

A wheel carries them as diaggym/_bundled/ (setup.py copies them at build time); a checkout or an editable install
reads the repository. One place decides, so no module computes paths into the checkout itself.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent / "_bundled"
_CHECKOUT = Path(__file__).resolve().parents[2]


def bundled(*parts: str) -> Path:
    """The path of a shipped file or folder, e.g. ``bundled("configs", "gate")``."""
    base = _PACKAGED if _PACKAGED.is_dir() else _CHECKOUT
    return base.joinpath(*parts)
