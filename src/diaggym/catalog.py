"""Exam-name catalogue: MIMIC-CDM lab panels and where the bundled data lives.

MIMIC-IV records lab *analytes* (itemids); clinicians order *panels* (a CBC,
a BMP).  The MIMIC-CDM mapping lists each panel's itemids.  Panels overlap
(every BMP analyte is also in the CMP), so the analytes measured on one
specimen are covered greedily: the panel covering most of them first, ties
broken towards the smaller (more specific) panel, then mapping order.  An
analyte in no panel is its own exam, named by its label.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from diaggym.errors import InputError
from diaggym.resources import bundled

PANEL_KEY = "ADDITIONAL_LAB_TEST_MAPPING"


def data_dir() -> Path:
    """The bundled data folder (``DIAGGYM_DATA_DIR`` overrides it; a wheel carries data/mimic-cdm only)."""
    env = os.environ.get("DIAGGYM_DATA_DIR")
    return Path(env) if env else bundled("data")


def default_mapping_path() -> Path:
    return data_dir() / "mimic-cdm" / "mappings.json"


@dataclass
class PanelCatalog:
    """Panels (name → itemids in display order) with a cached greedy cover per itemid set."""

    panels: dict[str, tuple[int, ...]]
    _cache: dict[frozenset[int], list[tuple[str, tuple[int, ...]]]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_mapping(cls, path: str | Path | None = None) -> PanelCatalog:
        path = Path(path) if path else default_mapping_path()
        return _load_catalog(str(path))

    def cover(self, itemids: Iterable[int]) -> list[tuple[str, tuple[int, ...]]]:
        """Group ``itemids`` into (panel name, itemids) pairs; unpaneled ids come back under name ``""``."""
        key = frozenset(itemids)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        left = set(key)
        out: list[tuple[str, tuple[int, ...]]] = []
        while left:
            best = None
            for order, (name, ids) in enumerate(self.panels.items()):
                n = sum(1 for i in ids if i in left)
                if n and (best is None or (-n, len(ids), order) < best[0]):
                    best = ((-n, len(ids), order), name, ids)
            if best is None:
                break
            _, name, ids = best
            chosen = tuple(i for i in dict.fromkeys(ids) if i in left)
            out.append((name, chosen))
            left.difference_update(chosen)
        out.extend(("", (i,)) for i in sorted(left))
        self._cache[key] = out
        return out


@lru_cache(maxsize=4)
def _load_catalog(path: str) -> PanelCatalog:
    p = Path(path)
    if not p.is_file():
        raise InputError("MIMIC-CDM mapping not found (bundled as data/mimic-cdm/mappings.json)", p)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
        panels = raw[PANEL_KEY]
        parsed = {str(name): tuple(int(i) for i in ids) for name, ids in panels.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"not a MIMIC-CDM mapping with a '{PANEL_KEY}' object of itemid lists ({err})", p) from None
    return PanelCatalog(parsed)
