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


@pytest.fixture(scope="session")
def trained_tiny(demo_out, tmp_path_factory) -> Path:
    """A tiny base trained for a few steps on the demo through the real trainer: a checkpoint for servers to load.

    Its outputs are not good (that is the local training preset's job); servers only need a real model.
    """
    import torch

    from diaggym.cases import load_cases
    from diaggym.model.base import init_base
    from diaggym.training.train import TrainConfig, train

    out, _card = demo_out
    root = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        init_base([c for c in load_cases(out / "cases.jsonl") if c.split == "train"], root / "base", "tiny", seed=0)
        summary = train(
            TrainConfig(
                cases=str(out), base=str(root / "base"), out=str(root / "run"), max_steps=8, lr=5e-3,
                batch_size=2, grad_accum=1, max_length=512, save_steps=1000, eval=False, mlflow=False,
            )
        )
    finally:
        torch.set_num_threads(threads)
    return Path(summary["final"])


@pytest.fixture(scope="session")
def demo_cases(demo_out) -> list:
    """Every case of the bundled demo (all splits), loaded once; tests must not modify them (copy first)."""
    from diaggym.cases import load_cases

    out, _ = demo_out
    return list(load_cases(out / "cases.jsonl"))


@pytest.fixture(scope="session")
def marginal_simulator(demo_out, tmp_path_factory):
    """``diaggym serve --engine marginal`` on the demo cases (127.0.0.1), shared by the RL adapter tests; its URL."""
    from diaggym.testing import diaggym_serve

    out, _ = demo_out
    proc, url = diaggym_serve(["--engine", "marginal", "--cases", str(out)],
                              tmp_path_factory.mktemp("serve") / "marginal.log")
    try:
        proc.wait_ready(f"{url}/v2/health/ready", timeout=120)
        yield url
    finally:
        proc.stop()
