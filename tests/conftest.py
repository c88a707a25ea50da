"""Shared fixtures: the bundled demo built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "mimic-iv-demo"
AGENTCLINIC = ROOT / "data" / "agentclinic" / "agentclinic_medqa.jsonl"


@pytest.fixture(scope="session")
def demo_result():
    from diaggym.sources.mimic_iv import build_mimic_iv_cases

    result = build_mimic_iv_cases(DEMO)
    result.cases = list(result.cases)  # the source streams; tests look at the cases more than once
    return result


@pytest.fixture(scope="session")
def demo_out(tmp_path_factory):
    """The demo preprocessed through the same function the CLI calls."""
    from diaggym.preprocess import preprocess

    out = tmp_path_factory.mktemp("demo") / "cases"
    card = preprocess("mimic-iv", DEMO, out, parquet=True)
    return out, card
