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


def load_config(kind: str, path_or_name: str | Path, what: str) -> tuple[Path, dict]:
    """A JSON config given as a file path or as a name in ``configs/{kind}/``: (its path, its object).

    ``what`` names the config in errors ("training config", "gate policy", ...): a missing file or
    invalid JSON is an :class:`~diaggym.errors.InputError` that says which and where to look.
    """
    import json

    from diaggym.errors import InputError

    folder = bundled("configs", kind)
    p = Path(path_or_name)
    if not p.is_file():
        p = folder / f"{path_or_name}.json"
        if not p.is_file():
            raise InputError(f"no {what} {str(path_or_name)!r} (a JSON file, or a name in {folder})")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"not valid JSON ({err})", p) from None
    if not isinstance(data, dict):
        raise InputError(f"a {what} must be a JSON object", p)
    return p, data
