"""Training the world model: it learns, it resumes after a kill, it runs under DeepSpeed ZeRO-2 on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diaggym.errors import InputError
from diaggym.model.base import init_base
from diaggym.training.train import TrainConfig, train

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(demo_out, tmp_path_factory):
    cases_dir, _ = demo_out
    from diaggym.cases import load_cases

    base = tmp_path_factory.mktemp("base") / "tiny"
    init_base(load_cases(cases_dir, split="train"), base, "tiny", seed=0)
    return cases_dir, base


def _summary(stdout: str) -> dict:
    """The JSON summary `diaggym train` prints last (the Trainer prints its own log dicts before it)."""
    return json.loads(stdout[stdout.rindex('{\n  "global_step"') :])


def _config(cases, base, out, **kw) -> TrainConfig:
    defaults = dict(
        cases=str(cases),
        base=str(base),
        out=str(out),
        max_steps=30,
        lr=3e-3,
        grad_accum=2,
        max_length=768,
        save_steps=100,
        logging_steps=1,
        mlflow=False,
        warmup=0.1,
    )
    defaults.update(kw)
    return TrainConfig(**defaults)


def test_trained_model_beats_untrained_base_on_held_out_loss(setup, tmp_path):
    cases, base = setup
    summary = train(_config(cases, base, tmp_path / "run"))
    assert summary["global_step"] == 30
    assert summary["val_loss_after"] < summary["val_loss_before"] - 1.5, summary
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "final").convert_tokens_to_ids("<SEP>") is not None


def test_mlflow_run_has_params_metrics_card_and_model(setup, tmp_path, monkeypatch):
    import mlflow

    cases, base = setup
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    train(_config(cases, base, tmp_path / "run", max_steps=4, mlflow=True, experiment="t", run_name="r1"))
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["t"])
    assert len(runs) == 1
    run = runs.iloc[0]
    card = json.loads((cases / "card.json").read_text())
    assert run["tags.diaggym.dataset_hash"] == card["dataset_hash"]
    assert run["params.lr"] == "0.003"
    client = mlflow.MlflowClient()
    steps = [m.step for m in client.get_metric_history(run.run_id, "loss")]
    assert steps == [1, 2, 3, 4]
    arts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"dataset", "model", "summary.json"} <= arts
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run.run_id, "model")}


@pytest.mark.timeout(1200)  # waits up to 240 s for the kill point, then 400 s for the resumed run
def test_resume_after_kill_does_not_redo_steps(setup, tmp_path):
    cases, base = setup
    out = tmp_path / "run"
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    cmd = [
        sys.executable,
        "-m",
        "diaggym.cli",
        "train",
        "--cases",
        str(cases),
        "--base",
        str(base),
        "--out",
        str(out),
        "--max-steps",
        "12",
        "--save-steps",
        "3",
        "--grad-accum",
        "1",
        "--batch-size",
        "1",
        "--max-length",
        "512",
        "--lr",
        "0.003",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoint-6" / "trainer_state.json").is_file():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # a real, unclean kill
    proc.wait()
    done = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert done and done[-1] >= 6 and done[-1] < 12, done
    r = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _summary(r.stdout)["global_step"] == 12
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["diaggym-world-model"])
    assert len(runs) == 1  # the resumed process continued the same MLflow run
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(runs.run_id[0], "loss")]
    # The local config logs every 5 steps.  Step 5 was logged before the kill (the last checkpoint is >= 6):
    # had the resumed process redone finished steps, it would be logged twice.
    assert steps.count(5) == 1 and set(steps) == {5, 10}, steps


def test_bad_inputs_fail_before_training(setup, tmp_path):
    cases, base = setup
    with pytest.raises(InputError, match="no weights"):
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "config.json").write_text("{}")
        train(_config(cases, tmp_path / "b", tmp_path / "o"))
    with pytest.raises(InputError, match="not a model folder"):
        train(_config(cases, tmp_path, tmp_path / "o"))
    with pytest.raises(InputError, match="max_length 40 is not longer than the longest case context"):
        train(_config(cases, base, tmp_path / "o", max_length=40))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="train split is empty"):
        train(_config(empty, base, tmp_path / "o"))
    with pytest.raises(InputError, match="unknown training option"):
        bad = tmp_path / "bad.json"
        bad.write_text('{"learning_rate": 1}')
        TrainConfig.from_file(bad)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs" / "train").glob("*.json")))
def test_shipped_training_presets_load(name):
    """Every preset in configs/train/ is a valid TrainConfig (a misspelled key would fail here, not mid-demo)."""
    cfg = TrainConfig.from_file(name)
    assert cfg.lr > 0 and cfg.max_length > 0 and (cfg.epochs > 0 or cfg.max_steps > 0)
    assert cfg.extra.get("config") == name


@pytest.mark.timeout(1200)  # two ranks under torchrun, bounded by a 600 s subprocess timeout
def test_deepspeed_zero2_runs_the_same_trainer_on_cpu(setup, tmp_path):
    cases, base = setup
    out = tmp_path / "ds"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "TORCH_EXTENSIONS_DIR": str(ROOT / "work" / "torch_extensions")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "diaggym.cli",
        "train",
        "--cases",
        str(cases),
        "--base",
        str(base),
        "--out",
        str(out),
        "--max-steps",
        "4",
        "--grad-accum",
        "1",
        "--batch-size",
        "1",
        "--max-length",
        "512",
        "--deepspeed",
        str(ROOT / "configs/deepspeed/zero2.json"),
        "--no-mlflow",
        "--save-steps",
        "2",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert _summary(r.stdout)["global_step"] == 4
    assert (out / "final" / "model.safetensors").is_file()
    ckpt = out / "checkpoint-4"
    assert any(ckpt.glob("global_step*/*optim_states.pt")), list(ckpt.rglob("*"))  # DeepSpeed's ZeRO shards
