"""The Helm chart (helm/diaggym), rendered and linted offline by Helm's own library (helm-python-sdk), checked like the
kustomize output: schemas, Pod Security "restricted", node pools, checkov; and its values.schema.json rejects a wrong
type or an unknown key with the key named."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import helm_python as helm  # helm-python-sdk (dev extra): Helm's library, no binary, no network
import pytest
import yaml

from tests.k8s_checks import (
    checkov_everything,
    node_pool_errors,
    object_id,
    pod_security_errors,
    render_helm,
    render_kustomize,
    validation_errors,
)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "diaggym"
VALUES = {
    "default": {},
    "prod": yaml.safe_load((CHART / "values-prod.yaml").read_text()),
    "dev": yaml.safe_load((CHART / "values-dev.yaml").read_text()),
}


def render(values: dict | None = None) -> list[dict]:
    return render_helm(values)


@cache
def rendered(which: str) -> tuple[dict, ...]:
    return tuple(render(VALUES[which]))


def the(docs, kind: str, name: str | None = None) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found


def test_chart_lints_clean_with_default_and_prod_values():
    for which in ("default", "prod"):
        report = helm.lint(str(CHART), VALUES[which], strict=True, namespace="diaggym")
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


@pytest.mark.parametrize("which", ["default", "prod", "dev"])
def test_rendered_objects_validate_and_are_restricted(which):
    docs = rendered(which)
    assert {object_id(d): e for d in docs if (e := validation_errors(d))} == {}
    assert [e for d in docs for e in pod_security_errors(d)] == []
    assert node_pool_errors(docs) == []


def test_chart_installs_what_the_kustomize_prod_overlay_installs():
    """Same objects (the namespace excepted: Helm installs into one, `--create-namespace`)."""
    def names(docs):
        return sorted((d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] != "Namespace")

    assert names(rendered("prod")) == names(render_kustomize(ROOT / "k8s" / "overlays" / "prod"))
    # and the alert rules are the very ones promtool tests
    kustomize_rule = yaml.safe_load((ROOT / "k8s" / "components" / "monitoring" / "prometheusrule.yaml").read_text())
    assert the(rendered("default"), "PrometheusRule")["spec"] == kustomize_rule["spec"]


def test_values_reach_the_objects():
    docs = rendered("prod")
    isvc = the(docs, "InferenceService")["spec"]
    assert isvc["predictor"]["model"]["storageUri"] == VALUES["prod"]["model"]["storageUri"]
    assert (isvc["predictor"]["minReplicas"], isvc["predictor"]["maxReplicas"]) == (2, 4)
    assert isvc["predictor"]["scaleMetric"] == "cpu" and isvc["predictor"]["nodeSelector"] == {
        "diaggym.io/node-pool": "a100"}
    assert isvc["transformer"]["containers"][0]["image"] == "registry.example.org/diaggym/simulator:0.1.0"
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"} == {
        "diaggym-transformer", "diaggym-predictor"}
    dev = rendered("dev")
    runtime = the(dev, "ServingRuntime")["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in runtime["resources"]["limits"] and "cpu-release" in runtime["image"]
    assert "scaleMetric" not in the(dev, "InferenceService")["spec"]["transformer"], "one replica: no HPA"
    binding = the(render({"pipeline": {"namespace": "kubeflow-user"}}), "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "diaggym-pipeline", "namespace": "kubeflow-user"}]
    assert the(dev, "RoleBinding")["subjects"][0]["namespace"] == "diaggym"


def test_switches_drop_monitoring_and_the_in_cluster_database():
    docs = render({"monitoring": {"enabled": False}, "postgresql": {"enabled": False}})
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert not {k for k, _ in kinds} & {"PodMonitor", "PrometheusRule", "ConfigMap", "StatefulSet"}
    assert ("NetworkPolicy", "postgres") not in kinds and ("Deployment", "mlflow") in kinds


BAD_VALUES = [
    # (id, values, text the error must contain)
    ("wrong-type", {"simulator": {"maxReplicas": "two"}}, "/simulator/maxReplicas"),
    ("unknown-key", {"simulator": {"replicas": 3}}, "'replicas' not allowed"),
    ("unknown-top-level", {"monitoriing": {"enabled": True}}, "'monitoriing' not allowed"),
    ("latest-tag", {"images": {"vllm": {"tag": "latest"}}}, "/images/vllm/tag"),
    ("no-gpu-pool", {"nodePools": {"gpu": {"nodeSelector": None}}}, "nodeSelector"),
    ("bad-storage-uri", {"model": {"storageUri": "models:/diaggym@champion"}}, "/model/storageUri"),
    ("bool-as-string", {"monitoring": {"enabled": "yes"}}, "/monitoring/enabled"),
]


@pytest.mark.parametrize(("values", "expected"), [b[1:] for b in BAD_VALUES], ids=[b[0] for b in BAD_VALUES])
def test_schema_rejects_bad_values_naming_the_key(values, expected):
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert expected in str(err.value), str(err.value)


def test_every_value_is_documented_in_the_readme():
    readme = (ROOT / "helm" / "README.md").read_text()

    def leaves(node, prefix=""):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and value and key not in ("nodeSelector", "requests", "limits"):
                yield from leaves(value, path + ".")
            else:
                yield path

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [p for p in leaves(defaults) if f"`{re.sub(r'.(requests|limits)$', '', p)}`" not in readme
               and f"`{p}`" not in readme]
    assert not missing, f"helm/README.md does not describe: {missing}"


@pytest.mark.integration
@pytest.mark.parametrize("which", ["default", "prod"])
def test_checkov_finds_nothing_in_the_rendered_chart(which):
    failed, skipped, passed = checkov_everything()[f"helm-{which}"]
    assert failed == []
    assert passed > 150
    assert len(skipped) == 3, skipped  # the annotated image-digest and MLflow-environment skips
