"""The MLflow registry and the promotion gate against a real MLflow server on a PostgreSQL backend store (as on the
cluster; the local pipeline test covers the SQLite file store).

Two real checkpoints of the tiny base are trained through the real trainer, logging to the server: a better one
(more steps, lower held-out loss) and a worse one (two steps).  The gate must promote the better, refuse the
worse with its reasons on the version, and rollback must restore the previous champion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from diaggym.testing import ServerProcess, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _mlflow_server(backend: str, root: Path) -> tuple[ServerProcess, str]:
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination",
           str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}
    srv = ServerProcess(cmd, root / "mlflow.log", env=env).start()
    url = f"http://127.0.0.1:{port}"
    try:
        srv.wait_ready(url + "/health", timeout=180)
    except BaseException:
        srv.stop()
        raise
    return srv, url


class Postgres:
    """A throwaway PostgreSQL cluster (initdb on a temporary folder, a free port), stopped by pid."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="diaggym-pg-"))
        self.port = free_port()
        as_root = os.geteuid() == 0  # initdb and postgres refuse to run as root: use the postgres account
        self.prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
        if as_root:
            shutil.chown(self.dir, "postgres")
        subprocess.run([*self.prefix, "initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True, timeout=120)
        cmd = [*self.prefix, "postgres", "-D", str(self.dir / "data"), "-p", str(self.port), "-k", str(self.dir),
               "-c", "listen_addresses=127.0.0.1"]
        self.proc = ServerProcess(cmd, Path(tempfile.gettempdir()) / f"diaggym-pg-{self.port}.log").start()
        self.uri = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"
        import psycopg2

        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg2.connect(self.uri.replace("+psycopg2", "")).close()
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline or self.proc.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"PostgreSQL did not start:\n{self.proc.log_tail()}") from None
                time.sleep(0.3)

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_mlflow(tmp_path_factory):
    """``mlflow server`` on a PostgreSQL backend store, as in the cluster."""
    pg = Postgres()
    try:
        srv, url = _mlflow_server(pg.uri, tmp_path_factory.mktemp("mlflow-pg"))
    except BaseException:
        pg.stop()
        raise
    yield url
    srv.stop()
    pg.stop()


def train_run(demo_out, root: Path, uri: str, steps: int) -> tuple[str, dict]:
    """A real tiny training run logged to ``uri``; returns (MLflow run id, training summary)."""
    import torch

    from diaggym.cases import load_cases
    from diaggym.model.base import init_base
    from diaggym.training.train import TrainConfig, train

    cases, _ = demo_out
    base = root / "base"
    if not (base / "config.json").is_file():
        init_base([c for c in load_cases(cases / "cases.jsonl") if c.split == "train"], base, "tiny", seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        try:
            summary = train(TrainConfig(
                cases=str(cases), base=str(base), out=str(root / f"run-{steps}"), max_steps=steps, lr=5e-3,
                batch_size=2, grad_accum=1, max_length=512, save_steps=1000, logging_steps=1,
                extra={"config": f"test-{steps}"},
            ))
        finally:
            torch.set_num_threads(threads)
    run_id = (root / f"run-{steps}" / "mlflow_run_id").read_text().strip()
    return run_id, summary


POLICY = {
    "description": "test policy: held-out loss and a floor",
    "always": [{"metric": "val_loss_after", "at_most": 50.0}],
    "vs_champion": [{"metric": "val_loss_after", "direction": "lower", "margin": 0.0}],
    "first_model": [{"metric": "val_loss_after", "direction": "lower", "vs": "untrained", "margin": 0.0}],
}


def _eval_doc(summary: dict) -> dict:
    """The evaluation beside the candidate: its held-out loss before training stands in for the untrained base."""
    return {"split": "val", "settings": {"seed": 0}, "engines": {
        "candidate": {"metrics": {"val_loss_after": summary["val_loss_after"]}},
        "untrained": {"metrics": {"val_loss_after": summary["val_loss_before"]}},
    }}


def test_gate_promotes_better_refuses_worse_and_rolls_back_on_postgres(pg_mlflow, demo_out, tmp_path):
    from diaggym import registry

    client = registry.connect(pg_mlflow)
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(POLICY))
    policy = registry.load_policy(policy_file)
    with pytest.raises(registry.RegistryError, match="no champion yet"):
        registry.find("models:/diaggym@champion", client)

    worse_id, worse = train_run(demo_out, tmp_path, pg_mlflow, steps=2)
    better_id, better = train_run(demo_out, tmp_path, pg_mlflow, steps=30)
    assert better["val_loss_after"] < worse["val_loss_after"] - 0.5  # the two checkpoints really differ

    v1, created = registry.register(worse_id, _eval_doc(worse), train_summary=worse, pipeline_run_id="p1",
                                    training_config="test-2", client=client)
    assert created and v1.version == "1"
    again, created = registry.register(worse_id, _eval_doc(worse), train_summary=worse, client=client)
    assert not created and again.version == "1"  # a re-run does not add a version
    # First model: it beats the untrained weights, so it becomes champion.
    assert registry.gate("1", policy, client=client).passed
    v2, _ = registry.register(better_id, _eval_doc(better), train_summary=better, pipeline_run_id="p2",
                              training_config="test-30", client=client)
    d = registry.gate(v2.version, policy, client=client)
    assert d.passed and d.against.startswith("champion v1")
    assert registry.version_by_alias(client, "diaggym", "champion").version == "2"
    assert registry.version_by_alias(client, "diaggym", "previous").version == "1"

    # The worse checkpoint again, as a third version (another training run of 2 steps): refused.
    worse2_id, worse2 = train_run(demo_out, tmp_path / "again", pg_mlflow, steps=2)
    v3, _ = registry.register(worse2_id, _eval_doc(worse2), train_summary=worse2, client=client)
    with pytest.raises(registry.GateRejected) as rej:
        registry.gate(v3.version, policy, client=client)
    assert "val_loss_after lower than champion" in rej.value.reasons[0]
    mv3 = client.get_model_version("diaggym", v3.version)
    assert mv3.tags["diaggym.gate.decision"] == "rejected"
    assert json.loads(mv3.tags["diaggym.gate.reasons"]) == rej.value.reasons
    assert "REJECTED" in mv3.description
    assert registry.version_by_alias(client, "diaggym", "challenger").version == v3.version
    assert registry.version_by_alias(client, "diaggym", "champion").version == "2"
    tags = client.get_model_version("diaggym", "2").tags
    assert tags["diaggym.pipeline_run_id"] == "p2" and tags["diaggym.training_config"] == "test-30"
    assert tags["diaggym.dataset_hash"] and tags["diaggym.git_commit"]

    assert registry.rollback(client=client) == ("2", "1")
    assert registry.version_by_alias(client, "diaggym", "champion").version == "1"
    with pytest.raises(registry.RegistryError, match="no previous champion"):
        registry.rollback(client=client)

    # What the server downloads for models:/diaggym@champion is version 1's checkpoint.
    folder, info = registry.download("models:/diaggym@champion", tmp_path / "cache", client=client)
    assert info["version"] == "1" and info["alias"] == "champion"
    assert (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def test_faults_one_clear_line(pg_mlflow, tmp_path):
    """Server down, unknown metric, version without figures, no champion: each one line and exit status 2."""
    from diaggym import registry

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    cli = [sys.executable, "-m", "diaggym.cli"]
    r = subprocess.run([*cli, "promote", "--rollback"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "not reachable after 3 attempts" in r.stderr and env["MLFLOW_TRACKING_URI"] in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"always": [{"metric": "accuracy", "at_least": 0.5}]}))
    with pytest.raises(registry.InputError, match="unknown metric 'accuracy'"):
        registry.load_policy(bad)
    for name in ("demo", "reference"):  # the shipped policies load
        assert registry.load_policy(name).always

    env["MLFLOW_TRACKING_URI"] = pg_mlflow
    client = registry.connect(pg_mlflow)
    import mlflow

    with mlflow.start_run(experiment_id=client.create_experiment("t")) as run:
        mlflow.log_text("{}", "model/config.json")
    client.create_registered_model("bare")
    client.create_model_version("bare", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    r = subprocess.run([*cli, "promote", "--name", "bare", "--version", "1", "--policy", "demo"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "has no metric.* figures" in r.stderr, r.stderr
    r = subprocess.run([*cli, "promote", "--name", "bare", "--rollback"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2 and "has no champion" in r.stderr
    with pytest.raises(registry.RegistryError, match="no model artifact"):
        with mlflow.start_run(experiment_id=client.get_experiment_by_name("t").experiment_id) as empty:
            pass
        registry.register(empty.info.run_id, {"engines": {"candidate": {"metrics": {"format_valid_rate": 1.0}}}},
                          name="empty", client=client)
    assert not registry._versions(client, "empty")  # nothing half-written was registered
