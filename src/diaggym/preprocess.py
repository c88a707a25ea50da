"""Tables → cases: run a source, assign splits, write cases and the dataset card.

Output folder layout (written under a temporary name and renamed into place,
so a failed run never leaves a folder that looks valid)::

    OUT/cases.jsonl          one validated case per line (contract 1)
    OUT/cases.parquet        the same cases (optional)
    OUT/card.json, card.md   the dataset card, with exams_per_case.png
"""

from __future__ import annotations

from pathlib import Path

from diaggym.atomic import atomic_dir, atomic_file
from diaggym.card import CardStats, build_card, write_card
from diaggym.cases import iter_jsonl, write_parquet
from diaggym.errors import InputError
from diaggym.sources import SourceResult
from diaggym.splits import DEFAULT_RATIOS, split_of

SOURCES = ("mimic-iv", "agentclinic")


def run_source(
    source: str, input_path: Path, mapping: Path | None = None, window_hours: float = 24.0, progress: bool = False
) -> SourceResult:
    if source == "mimic-iv":
        from diaggym.sources.mimic_iv import build_mimic_iv_cases

        return build_mimic_iv_cases(input_path, mapping=mapping, window_hours=window_hours, progress=progress)
    if source == "agentclinic":
        from diaggym.sources.agentclinic import build_agentclinic_cases

        return build_agentclinic_cases(input_path)
    raise InputError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")


def preprocess(
    source: str,
    input_path: str | Path,
    out: str | Path,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    salt: str = "",
    parquet: bool = False,
    mapping: str | Path | None = None,
    window_hours: float = 24.0,
    progress: bool = False,
) -> dict:
    """Build, split and write cases (streamed: one case in memory at a time); returns the dataset card."""
    input_path, out = Path(input_path), Path(out)
    result = run_source(source, input_path, Path(mapping) if mapping else None, window_hours, progress)
    params = {
        "source": source,
        "input": str(input_path),
        "ratios": list(ratios),
        "salt": salt,
        "window_hours": window_hours,
        "mapping": str(mapping) if mapping else "bundled",
    }
    stats = CardStats()
    with atomic_dir(out) as tmp:
        with atomic_file(tmp / "cases.jsonl") as fh:
            for case in result.cases:
                case.split = split_of(case.subject_key, ratios, salt)  # type: ignore[assignment]
                fh.write(case.model_dump_json(by_alias=True) + "\n")
                stats.add(case)
        if not stats.exams_per_case:
            raise InputError("no case survived the filters; nothing written", input_path)
        if parquet:
            write_parquet(iter_jsonl(tmp / "cases.jsonl"), tmp / "cases.parquet")
        root = input_path if input_path.is_dir() else input_path.parent
        card = build_card(result, stats, tmp / "cases.jsonl", root, params)
        write_card(card, stats, tmp)
    return card
