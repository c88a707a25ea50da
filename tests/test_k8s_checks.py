"""The offline checks in tests/k8s_checks.py reject what they should (each on a broken copy of a real manifest)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s_checks import (
    crd_validator,
    image_pinned,
    load_yaml_documents,
    pod_security_errors,
    render_kustomize,
    structural_errors,
    validation_errors,
)

BASE = Path(__file__).resolve().parents[1] / "k8s" / "base"
MONITORING = Path(__file__).resolve().parents[1] / "k8s" / "components" / "monitoring"


@cache
def _docs() -> tuple[dict, ...]:
    docs = list(render_kustomize(BASE))
    docs += [d for d in load_yaml_documents((MONITORING / "podmonitor.yaml").read_text())]
    return tuple(docs)


def the(kind: str, name: str | None = None) -> dict:
    found = [d for d in _docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return copy.deepcopy(found[0])


def _get(doc: dict, path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _parent(doc: dict, path: str) -> tuple[Any, str | int]:
    head, _, last = path.rpartition(".")
    node = _get(doc, head) if head else doc
    return node, int(last) if isinstance(node, list) else last


def set_(path: str, value: Any) -> Callable[[dict], None]:
    def apply(doc: dict) -> None:
        node, key = _parent(doc, path)
        node[key] = value

    return apply


def delete(path: str) -> Callable[[dict], None]:
    def apply(doc: dict) -> None:
        node, key = _parent(doc, path)
        del node[key]

    return apply


def rename(path: str, new: str) -> Callable[[dict], None]:
    def apply(doc: dict) -> None:
        node, key = _parent(doc, path)
        node[new] = node.pop(key)

    return apply


def append(path: str, item: Any) -> Callable[[dict], None]:
    def apply(doc: dict) -> None:
        _get(doc, path).append(copy.deepcopy(item))

    return apply


ISVC_T = "spec.transformer.containers.0"
BROKEN = [
    # (id, kind, mutation, text the error must contain)
    ("isvc-typo-storageURI", "InferenceService", rename("spec.predictor.model.storageUri", "storageURI"), "storageURI"),
    (
        "isvc-typo-container-field",
        "InferenceService",
        rename(f"{ISVC_T}.readinessProbe", "readinesProbe"),
        "readinesProbe",
    ),
    ("isvc-typo-top-level", "InferenceService", rename("spec.transformer", "transfomer"), "transfomer"),
    ("isvc-minReplicas-string", "InferenceService", set_("spec.predictor.minReplicas", "one"), "minReplicas"),
    ("isvc-port-string", "InferenceService", set_(f"{ISVC_T}.ports.0.containerPort", "8080"), "containerPort"),
    ("isvc-args-not-a-list", "InferenceService", set_(f"{ISVC_T}.args", "--engine openai"), "args"),
    ("isvc-missing-predictor", "InferenceService", delete("spec.predictor"), "'predictor' is a required"),
    (
        "isvc-missing-modelFormat-name",
        "InferenceService",
        delete("spec.predictor.model.modelFormat.name"),
        "'name' is a required",
    ),
    (
        "isvc-missing-secret-item-key",
        "InferenceService",
        delete("spec.transformer.volumes.1.secret.items.0.key"),
        "'key' is a required",
    ),
    (
        "isvc-duplicate-mount-path",
        "InferenceService",
        append(f"{ISVC_T}.volumeMounts", {"name": "other", "mountPath": "/tmp"}),
        "duplicate",
    ),
    (
        "isvc-duplicate-port",
        "InferenceService",
        append(f"{ISVC_T}.ports", {"containerPort": 8080, "name": "other"}),
        "duplicate",
    ),
    ("isvc-metadata-typo", "InferenceService", rename("metadata.labels", "lables"), "lables"),
    (
        "isvc-annotation-not-string",
        "InferenceService",
        set_("metadata.annotations.serving\x00kserve\x00io/enable-prometheus-scraping", False),
        "annotations",
    ),
    ("isvc-name-not-dns", "InferenceService", set_("metadata.name", "DiagGym"), "DNS-1123"),
    ("runtime-missing-containers", "ServingRuntime", delete("spec.containers"), "'containers' is a required"),
    (
        "runtime-typo",
        "ServingRuntime",
        rename("spec.supportedModelFormats", "supportedModelFormat"),
        "supportedModelFormat",
    ),
    (
        "runtime-autoSelect-string",
        "ServingRuntime",
        set_("spec.supportedModelFormats.0.autoSelect", "no"),
        "autoSelect",
    ),
    (
        "runtime-gpu-limit-object",
        "ServingRuntime",
        set_("spec.containers.0.resources.limits.nvidia\x00com/gpu", {"count": 1}),
        "limits",
    ),
    ("podmonitor-bad-scheme", "PodMonitor", set_("spec.podMetricsEndpoints.0.scheme", "ftp"), "ftp"),
    ("podmonitor-missing-selector", "PodMonitor", delete("spec.selector"), "'selector' is a required"),
    ("netpol-typo", "NetworkPolicy", rename("spec.policyTypes", "policyType"), "policyType"),
    ("netpol-missing-podSelector", "NetworkPolicy", delete("spec.podSelector"), "'podSelector' is a required"),
    ("netpol-policyTypes-string", "NetworkPolicy", set_("spec.policyTypes", "Ingress"), "Ingress"),
    (
        "serviceaccount-typo",
        "ServiceAccount",
        rename("automountServiceAccountToken", "automountToken"),
        "automountToken",
    ),
]


def _map_keys(node: Any, old: str, new: str) -> Any:
    if isinstance(node, dict):
        return {k.replace(old, new): _map_keys(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_map_keys(v, old, new) for v in node]
    return node


def _mutate(mutation: Callable[[dict], None], doc: dict) -> dict:
    """Apply a mutation whose dotted path writes a dot inside a key as \\x00 (annotation and resource names)."""
    escaped = _map_keys(doc, ".", "\x00")
    mutation(escaped)
    return _map_keys(escaped, "\x00", ".")


@pytest.mark.parametrize(("kind", "mutation", "expected"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_validation_rejects(kind, mutation, expected):
    name = {"NetworkPolicy": "diaggym-transformer", "ServiceAccount": "diaggym-model-reader"}.get(kind)
    doc = _mutate(mutation, the(kind, name))
    errors = validation_errors(doc)
    assert errors, "the broken manifest passed validation"
    assert any(expected in e for e in errors), errors


def test_jsonschema_alone_would_accept_a_typo():
    """Why the structural walker exists: the CRD schemas do not set additionalProperties: false."""
    doc = _mutate(rename("spec.predictor.model.storageUri", "storageURI"), the("InferenceService"))
    assert list(crd_validator("serving.kserve.io", "v1beta1", "InferenceService").iter_errors(doc)) == []
    assert validation_errors(doc)


def test_unknown_kind_is_an_error_not_a_pass():
    doc = {"apiVersion": "example.org/v1", "kind": "Gizmo", "metadata": {"name": "g"}}
    assert validation_errors(doc)


def test_structural_walker_honours_preserve_unknown_fields_and_additional_properties():
    schema = {
        "type": "object",
        "properties": {
            "open": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"n": {"type": "object", "properties": {}}},
            },
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "nested": {"type": "object", "additionalProperties": {"type": "object", "properties": {"a": {}}}},
            "free": {"type": "object", "additionalProperties": True},
            "embedded": {"type": "object", "x-kubernetes-embedded-resource": True, "properties": {"spec": {}}},
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "ports": {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["port", "protocol"],
                "items": {"type": "object", "properties": {"port": {}, "protocol": {"default": "TCP"}}},
            },
            "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
            "count": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
        },
    }
    good = {
        "open": {"anything": {"goes": 1}},
        "labels": {"a": "b"},
        "nested": {"x": {"a": 1}},
        "free": {"whatever": [1]},
        "embedded": {"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {}},
        "closed": {"a": "x"},
        "ports": [{"port": 1}, {"port": 1, "protocol": "UDP"}],
        "tags": ["a", "b"],
        "count": "50%",
    }
    assert structural_errors(good, schema) == []
    assert structural_errors({"closed": {"b": 1}}, schema) == ["closed.b: unknown field 'b' (declared here: a)"]
    assert structural_errors({"nested": {"x": {"b": 1}}}, schema)  # additionalProperties schemas are walked
    assert structural_errors({"open": {"n": {"typo": 1}}}, schema)  # declared children of an open node are not
    assert structural_errors({"embedded": {"status": {}}}, schema)
    assert structural_errors({"ports": [{"port": 1}, {"port": 1, "protocol": "TCP"}]}, schema)  # default applied
    assert structural_errors({"tags": ["a", "a"]}, schema)
    assert structural_errors({"surprise": 1}, schema)




def test_duplicate_yaml_keys_are_rejected():
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key"):
        load_yaml_documents("a: 1\nb: 2\na: 3\n")


C0 = "spec.template.spec.containers.0"


def both(*mutations: Callable[[dict], None]) -> Callable[[dict], None]:
    def apply(doc: dict) -> None:
        for m in mutations:
            m(doc)

    return apply


RESTRICTED_BREAKS = [
    # (id, kind, name, mutation, text the error must contain)
    ("root-user", "Deployment", "mlflow", set_(f"{C0}.securityContext.runAsUser", 0), "runAsUser 0"),
    ("escalation", "StatefulSet", None, delete(f"{C0}.securityContext.allowPrivilegeEscalation"),
     "allowPrivilegeEscalation"),
    ("caps", "Deployment", "mlflow", set_(f"{C0}.securityContext.capabilities.drop", []), "drop"),
    ("caps-add", "Deployment", "mlflow", set_(f"{C0}.securityContext.capabilities.add",
                                              ["SYS_ADMIN"]), "capabilities.add"),
    # pod level alone is enough when the container sets it too: remove both
    ("seccomp", "InferenceService", None, both(delete("spec.transformer.securityContext.seccompProfile"),
                                               delete(f"{ISVC_T}.securityContext.seccompProfile")), "seccompProfile"),
    ("non-root", "InferenceService", None, both(delete("spec.transformer.securityContext.runAsNonRoot"),
                                                delete(f"{ISVC_T}.securityContext.runAsNonRoot")), "runAsNonRoot"),
    ("rw-root", "ServingRuntime", None, set_("spec.containers.0.securityContext.readOnlyRootFilesystem", False),
     "readOnlyRootFilesystem"),
    ("host-network", "Deployment", "mlflow", set_("spec.template.spec.hostNetwork", True), "hostNetwork"),
    ("hostpath", "Deployment", "mlflow", append("spec.template.spec.volumes", {"name": "h", "hostPath": {"path": "/"}}),
     "hostPath"),
    ("no-limits", "Deployment", "mlflow", delete(f"{C0}.resources.limits"), "limits"),
    ("no-memory-request", "StatefulSet", None, delete(f"{C0}.resources.requests.memory"),
     "requests"),
    ("no-readiness", "InferenceService", None, delete(f"{ISVC_T}.readinessProbe"), "readinessProbe"),
    ("no-liveness", "ServingRuntime", None, delete("spec.containers.0.livenessProbe"), "livenessProbe"),
    ("latest", "Deployment", "mlflow", set_(f"{C0}.image", "mlflow:latest"), "not pinned"),
    ("untagged", "ServingRuntime", None, set_("spec.containers.0.image", "vllm/vllm-openai"), "not pinned"),
]


@pytest.mark.parametrize(("kind", "name", "mutation", "expected"), [b[1:] for b in RESTRICTED_BREAKS],
                         ids=[b[0] for b in RESTRICTED_BREAKS])
def test_pod_security_rejects(kind, name, mutation, expected):
    original = the(kind, name)
    assert pod_security_errors(original) == []
    errors = pod_security_errors(_mutate(mutation, original))
    assert any(expected in e for e in errors), errors


def test_image_pinned():
    assert image_pinned("vllm/vllm-openai:v0.33.0")
    assert image_pinned("registry.example.org:5000/a/b:1.2.3")
    assert image_pinned("a/b@sha256:" + "0" * 64)
    for bad in ("a/b", "a/b:latest", "registry.example.org:5000/a/b", ""):
        assert not image_pinned(bad), bad


def test_kubeflow_trainer_kinds_are_checked_against_their_crd():
    job = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": {"name": "diaggym-train"},
           "spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": 2}}}
    assert validation_errors(job) == []
    job["spec"]["trainer"]["numNode"] = job["spec"]["trainer"].pop("numNodes")
    assert any("numNode" in e for e in validation_errors(job))
