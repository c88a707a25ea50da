"""The Kubeflow pipeline: the committed YAML is current, the train task's cluster settings are in the spec, and the
same pipeline runs end to end with kfp's local runner (CI preset), registering and promoting a model in MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "diaggym.cli"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    from pipelines.diaggym_pipeline import compile_pipeline

    path = compile_pipeline(tmp_path_factory.mktemp("compiled") / "pipeline.yaml")
    spec, platform = yaml.safe_load_all(path.read_text())  # the pipeline spec, then the Kubernetes platform config
    return {**spec, "platforms": platform["platforms"]}


def test_committed_yaml_is_current(compiled):
    spec, platform = yaml.safe_load_all((ROOT / "pipelines" / "diaggym_pipeline.yaml").read_text())
    stale = "pipelines/diaggym_pipeline.yaml is stale: run `diaggym pipeline compile`"
    assert {**spec, "platforms": platform["platforms"]} == compiled, stale


def test_train_task_cluster_settings(compiled):
    spec = compiled["deploymentSpec"]["executors"]["exec-train"]["container"]
    acc = spec["resources"]["accelerator"]
    assert "gpu_resource" in acc["resourceType"] and "gpu_count" in acc["resourceCount"]
    params = compiled["root"]["inputDefinitions"]["parameters"]
    assert params["gpu_count"]["defaultValue"] == 8
    assert params["gpu_resource"]["defaultValue"] == "nvidia.com/gpu"
    assert params["gpu_node_selector"]["defaultValue"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert params["gpu_tolerations"]["defaultValue"][0]["effect"] == "NoSchedule"
    k8s = compiled["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert k8s["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] == "gpu_node_selector"
    assert k8s["tolerations"][0]["tolerationJson"]["componentInputParameter"] == "gpu_tolerations"
    assert k8s["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm"}]
    assert k8s["pvcMount"][0]["mountPath"] == "/mnt/checkpoints"
    assert k8s["pvcMount"][0]["pvcNameParameter"]["componentInputParameter"] == "checkpoint_pvc"
    assert k8s["secretAsEnv"][0]["secretNameParameter"]["componentInputParameter"] == "mlflow_secret"
    assert k8s["configMapAsEnv"][0]["configMapNameParameter"]["componentInputParameter"] == "mlflow_config_map"
    # Values never enter the spec: only names of keys.
    assert {e["envVar"] for e in k8s["configMapAsEnv"][0]["keyToEnv"]} >= {"MLFLOW_TRACKING_URI"}
    for name in ("mlflow_secret", "mlflow_config_map", "checkpoint_pvc"):
        assert params[name]["defaultValue"]
    # Every parameter is typed, has a default and is described in the pipeline's docstring.
    doc = compiled["pipelineInfo"]["description"] + json.dumps(compiled.get("root", {}))
    assert all("defaultValue" in p or p.get("isOptional") for p in params.values())
    from pipelines.diaggym_pipeline import build

    described = build().pipeline_func.__doc__
    assert all(name in described for name in params), [n for n in params if n not in described]
    assert doc


def test_deploy_runs_only_when_the_gate_passes(compiled):
    tasks = compiled["root"]["dag"]["tasks"]
    cond = tasks["condition-1"]
    assert "gate" in cond["triggerPolicy"]["condition"] and "'passed'" in cond["triggerPolicy"]["condition"]
    inner = compiled["components"]["comp-condition-1"]["dag"]["tasks"]
    assert list(inner) == ["deploy"]


def test_trainjob_manifest_matches_the_trainer_crd():
    """The multi-node option's TrainJob validates against Kubeflow Trainer's CRD schema (the structural part)."""
    import jsonschema
    from components.trainjob import train_job

    crd = yaml.safe_load((ROOT / "schemas" / "kubeflow-trainer" / "trainer.kubeflow.org_trainjobs.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    schema = version["schema"]["openAPIV3Schema"]
    job = train_job("diaggym-local-abc", "img:1", ["--config", "reference"], num_nodes=2, gpus_per_node=8)
    jsonschema.validate(job, schema)
    assert job["spec"]["trainer"]["numNodes"] == 2
    bad = {**job, "spec": {**job["spec"], "trainer": {**job["spec"]["trainer"], "numNodes": "two"}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_empty_secret_name_is_refused():
    r = subprocess.run([*CLI, "pipeline", "submit", "--host", "http://127.0.0.1:9", "--set", "mlflow_secret="],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: pipeline parameter mlflow_secret is empty: the tasks read the cluster object "
                                "it names (by reference), so the run would not start")
    r = subprocess.run([*CLI, "pipeline", "run", "--local", "--set", "gpu_count_typo=2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown pipeline parameter(s) gpu_count_typo" in r.stderr


def test_core_does_not_import_kfp():
    r = subprocess.run([sys.executable, "-c", "import sys, diaggym.cli, diaggym.registry; "
                        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kfp', 'kserve', 'kubernetes')))"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.integration
def test_local_run_registers_and_promotes_then_reruns_idempotently(tmp_path):
    """The CI preset through kfp.local: version 1 becomes champion; a re-run reuses outputs and adds no version."""
    env = {**os.environ, "DIAGGYM_WORK": str(tmp_path), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [*CLI, "pipeline", "run", "--local", "--config", "ci", "--work", str(tmp_path / "pipeline")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    out = r.stdout + r.stderr
    assert "registered diaggym version 1" in out and "PASSED" in out
    assert "manifest written" in out  # no cluster here: deploy writes the InferenceService
    manifests = list((tmp_path / "pipeline" / "outputs").glob("*/deploy/manifest"))
    assert manifests
    isvc = yaml.safe_load(manifests[0].read_text())
    assert isvc["metadata"]["annotations"]["diaggym/registry-version"] == "diaggym/1"
    assert "REPLACE" not in isvc["spec"]["predictor"]["model"]["storageUri"]
    from diaggym import registry

    client = registry.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mv = registry.version_by_alias(client, "diaggym", "champion")
    assert str(mv.version) == "1" and mv.tags["diaggym.gate.decision"] == "passed"
    assert mv.tags["diaggym.training_config"] == "quick" and mv.tags["diaggym.pipeline_run_id"]
    assert float(mv.tags["metric.val_loss_after"]) < 8.0 and "metric.format_stop_rate" in mv.tags

    # The champion served from the registry: the server downloads it through MLflow and names its version.
    from diaggym.testing import diaggym_serve

    serve_env = {"DIAGGYM_WORK": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    server, url = diaggym_serve(["--model", "models:/diaggym@champion"], tmp_path / "serve.log", env=serve_env)
    try:
        server.wait_ready(f"{url}/v2/health/ready", timeout=300)
        status = httpx.get(f"{url}/v1/models/diaggym", timeout=10).json()
    finally:
        server.stop()
    assert status["ready"] and status["registry"]["version"] == "1" and status["registry"]["alias"] == "champion"
    assert (tmp_path / "models" / "diaggym" / "v1" / "config.json").is_file()

    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    out = r.stdout + r.stderr
    assert "already registered: diaggym version 1" in out and "(itself)" in out
    assert [str(v.version) for v in registry._versions(client, "diaggym")] == ["1"]
