"""Offline checks of Kubernetes objects, used by the manifest, Helm and monitoring tests (no cluster needed).

* ``validation_errors``: built-in kinds with ``kubernetes_validate`` (strict); custom resources (KServe, Prometheus
  operator, Kubeflow Trainer) against the openAPIV3Schema of their CRD version copied into ``schemas/``, in two passes:
  jsonschema (Draft 7) for types, enums, patterns and required fields, and ``structural_errors`` for what the API server
  would do beyond that: a field not declared in the schema is an error (the server would prune it silently, so a typo
  such as ``storageURI`` would deploy a model-less service) unless the node sets
  ``x-kubernetes-preserve-unknown-fields`` or ``additionalProperties``; list-type ``map``/``set`` lists must not
  repeat keys (two env vars with one name).
  Object metadata of custom resources is checked with the built-in ObjectMeta schema.
* ``pod_security_errors``: Pod Security "restricted" plus the house rules (read-only root filesystem, requests and
  limits, probes, pinned image tags) on every pod spec an object carries, InferenceService components included.
* ``render_kustomize`` / ``render_helm`` / ``checkov_everything``: the rendered output of an overlay or the chart, and
  checkov's verdict on all of them (one run).
* ``containerfile_instructions``: a Containerfile as (INSTRUCTION, args) pairs.

tests/test_k8s_checks.py proves each check rejects what it should.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "schemas"
CHART = ROOT / "helm" / "diaggym"
K8S_VERSION = "1.31"

# (group, kind) -> CRD file under schemas/
CRDS: dict[tuple[str, str], str] = {
    ("serving.kserve.io", "InferenceService"): "kserve/serving.kserve.io_inferenceservices.yaml",
    ("serving.kserve.io", "ServingRuntime"): "kserve/serving.kserve.io_servingruntimes.yaml",
    ("serving.kserve.io", "ClusterServingRuntime"): "kserve/serving.kserve.io_clusterservingruntimes.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "prometheus-operator/monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "prometheus-operator/monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): "prometheus-operator/monitoring.coreos.com_prometheusrules.yaml",
    ("trainer.kubeflow.org", "TrainJob"): "kubeflow-trainer/trainer.kubeflow.org_trainjobs.yaml",
}
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Kinds whose names may be subdomains (dots allowed); everything else here must be a DNS-1123 label.
SUBDOMAIN_NAMED = {"ConfigMap", "Secret", "ServiceAccount", "Role", "RoleBinding", "PrometheusRule", "Namespace"}


# ---------------------------------------------------------------------------------------------------------------------
# loading


class _ManifestLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last one silently; kubectl refuses them)."""


def _construct_mapping(loader: _ManifestLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_ManifestLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_documents(text: str) -> list[dict]:
    docs = [d for d in yaml.load_all(text, Loader=_ManifestLoader) if d is not None]
    for d in docs:
        if not isinstance(d, dict):
            raise ValueError(f"a YAML document is not a mapping: {d!r}")
    return docs


def object_id(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# ---------------------------------------------------------------------------------------------------------------------
# schema validation


@cache
def _crd(path: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the InferenceService CRD is 2 MB
    with open(SCHEMAS / path) as f:
        return yaml.load(f, Loader=loader)


@cache
def crd_schema(group: str, version: str, kind: str) -> dict:
    crd = _crd(CRDS[(group, kind)])
    if crd["kind"] != "CustomResourceDefinition":
        raise ValueError(f"{CRDS[(group, kind)]} is not a CRD")
    if (crd["spec"]["group"], crd["spec"]["names"]["kind"]) != (group, kind):
        raise ValueError(f"the CRD table points {group}/{kind} at the wrong file")
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            if not v.get("served", False):
                raise ValueError(f"{kind} {group}/{version} is not served")
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"CRD {kind} has no version {version}")


@cache
def crd_validator(group: str, version: str, kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(crd_schema(group, version, kind))


def _is_object_schema(schema: dict) -> bool:
    return schema.get("type") == "object" or "properties" in schema


def structural_errors(instance: Any, schema: dict, path: str = "") -> list[str]:
    """What the API server's structural-schema handling would reject or silently drop, which jsonschema does not see.

    * unknown fields: a key not in ``properties`` of an object node, unless the node has
      ``x-kubernetes-preserve-unknown-fields: true`` or ``additionalProperties`` (then the value is checked against
      that schema); ``apiVersion``/``kind``/``metadata`` are allowed in ``x-kubernetes-embedded-resource`` nodes;
    * ``x-kubernetes-list-type: map`` lists with two items of the same ``x-kubernetes-list-map-keys`` (key defaults
      applied), and ``set`` lists with repeated items.
    """
    errors: list[str] = []
    if not isinstance(schema, dict):
        return errors
    for sub in schema.get("allOf", []):
        errors += structural_errors(instance, sub, path)
    for key in ("anyOf", "oneOf"):
        branches = [b for b in schema.get(key, []) if not isinstance(instance, dict) or _is_object_schema(b)]
        if branches:
            results = [structural_errors(instance, b, path) for b in branches]
            if all(results):
                errors += results[0]
    if isinstance(instance, dict) and _is_object_schema(schema):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
        embedded = schema.get("x-kubernetes-embedded-resource") is True
        for key, value in instance.items():
            where = f"{path}.{key}" if path else str(key)
            if key in props:
                errors += structural_errors(value, props[key], where)
            elif isinstance(extra, dict):
                errors += structural_errors(value, extra, where)
            elif extra is True or preserve or (embedded and key in ("apiVersion", "kind", "metadata")):
                continue
            else:
                known = ", ".join(sorted(props)) or "none"
                errors.append(f"{where}: unknown field {key!r} (declared here: {known})")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        items = schema["items"]
        for i, item in enumerate(instance):
            errors += structural_errors(item, items, f"{path}[{i}]")
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            defaults = {k: items.get("properties", {}).get(k, {}).get("default") for k in keys}
            seen: dict[tuple, int] = {}
            for i, item in enumerate(instance):
                if not isinstance(item, dict):
                    continue
                ident = tuple(json.dumps(item.get(k, defaults[k]), sort_keys=True) for k in keys)
                if ident in seen:
                    shown = dict(zip(keys, (item.get(k, defaults[k]) for k in keys), strict=True))
                    errors.append(f"{path}[{i}]: duplicate entry {shown} (same keys as {path}[{seen[ident]}])")
                seen.setdefault(ident, i)
        elif list_type == "set":
            seen_items: dict[str, int] = {}
            for i, item in enumerate(instance):
                ident = json.dumps(item, sort_keys=True)
                if ident in seen_items:
                    first = seen_items[ident]
                    errors.append(f"{path}[{i}]: duplicate item {item!r} in a set (same as {path}[{first}])")
                seen_items.setdefault(ident, i)
    return errors


def _kv_errors(doc: dict, strict: bool = True) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=strict)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path) or "<root>"
        return [f"{where}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def validation_errors(doc: dict) -> list[str]:
    """Every problem found in one Kubernetes object; empty when it is valid."""
    errors: list[str] = []
    for field in ("apiVersion", "kind", "metadata"):
        if field not in doc:
            errors.append(f"missing {field}")
    if errors:
        return errors
    name = doc["metadata"].get("name", "")
    pattern = DNS1123_SUBDOMAIN if doc["kind"] in SUBDOMAIN_NAMED else DNS1123_LABEL
    if not (isinstance(name, str) and pattern.match(name) and len(name) <= 63):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 name")
    group, _, version = doc["apiVersion"].rpartition("/")
    if (group, doc["kind"]) not in CRDS:
        return errors + _kv_errors(doc)
    schema = crd_schema(group, version, doc["kind"])
    for e in crd_validator(group, version, doc["kind"]).iter_errors(doc):
        errors.append(f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}")
    body = {k: v for k, v in doc.items() if k != "metadata"}  # the root metadata node is just {type: object}
    errors += structural_errors(body, schema)
    # ObjectMeta is validated by the API server itself, not by the CRD: check it with the built-in schema.
    as_configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
    errors += _kv_errors(as_configmap)
    return errors


# ---------------------------------------------------------------------------------------------------------------------
# pod security ("restricted") and the house rules for containers

_WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                      "secret"}
_POD_FIELDS = {"containers", "initContainers", "volumes", "securityContext", "hostNetwork", "hostPID", "hostIPC"}


def pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) for every pod template an object carries. An InferenceService component is an inline pod
    spec; a ServingRuntime's spec holds the containers KServe merges into the predictor pod."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "Pod":
        yield "spec", spec
    elif kind in _WORKLOADS:
        yield "spec.template.spec", spec["template"]["spec"]
    elif kind == "CronJob":
        yield "spec.jobTemplate.spec.template.spec", spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind in ("ServingRuntime", "ClusterServingRuntime"):
        yield "spec", {k: v for k, v in spec.items() if k in _POD_FIELDS}
    elif kind == "InferenceService":
        for component in ("predictor", "transformer", "explainer"):
            if component in spec:
                yield f"spec.{component}", spec[component]


def image_pinned(image: str) -> bool:
    """A release tag or a digest; never ``latest`` or an untagged name (which means latest)."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def container_errors(c: dict, pod_ctx: dict, where: str) -> list[str]:
    """Restricted profile + house rules for one container; ``pod_ctx`` is the pod-level securityContext."""
    errors: list[str] = []
    w = f"{where}.containers[{c.get('name')}]"
    ctx = c.get("securityContext") or {}
    if ctx.get("privileged"):
        errors.append(f"{w}: privileged")
    if ctx.get("allowPrivilegeEscalation") is not False:
        errors.append(f"{w}: allowPrivilegeEscalation must be false")
    caps = ctx.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        errors.append(f"{w}: capabilities.drop must include ALL")
    if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
        errors.append(f"{w}: capabilities.add beyond NET_BIND_SERVICE: {caps['add']}")
    if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
        errors.append(f"{w}: runAsNonRoot must be true (container or pod)")
    if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
        errors.append(f"{w}: runAsUser 0")
    seccomp = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        errors.append(f"{w}: seccompProfile must be RuntimeDefault or Localhost (container or pod)")
    if ctx.get("readOnlyRootFilesystem") is not True:
        errors.append(f"{w}: readOnlyRootFilesystem must be true (mount emptyDirs where it writes)")
    resources = c.get("resources") or {}
    for part in ("requests", "limits"):
        missing = {"cpu", "memory"} - set(resources.get(part) or {})
        if missing:
            errors.append(f"{w}: resources.{part} lacks {sorted(missing)}")
    for probe in ("readinessProbe", "livenessProbe"):
        if probe not in c:
            errors.append(f"{w}: no {probe}")
    image = c.get("image", "")
    if not image_pinned(image):
        errors.append(f"{w}: image {image!r} is not pinned to a release tag or digest")
    return errors


def pod_security_errors(doc: dict) -> list[str]:
    """Pod Security "restricted" (pod and containers) plus read-only root, requests/limits, probes, pinned tags."""
    errors: list[str] = []
    for where, pod in pod_specs(doc):
        w = f"{object_id(doc)} {where}"
        ctx = pod.get("securityContext") or {}
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(host):
                errors.append(f"{w}: {host} is not allowed")
        for v in pod.get("volumes") or []:
            kinds = set(v) - {"name"}
            if not kinds <= RESTRICTED_VOLUMES:
                errors.append(f"{w}: volume {v.get('name')} of type {sorted(kinds)} is not allowed")
        if ctx.get("runAsUser") == 0:
            errors.append(f"{w}: runAsUser 0")
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            errors += container_errors(c, ctx, w)
    return errors


def node_pool_errors(docs: list[dict] | tuple[dict, ...]) -> list[str]:
    """Every pod must land on a named node pool; a GPU predictor must also tolerate the GPU taint."""
    errors = []
    for d in docs:
        if d["kind"] in ("ServingRuntime", "ClusterServingRuntime"):
            continue  # its containers run in the InferenceService predictor's pod
        for where, pod in pod_specs(d):
            if not (pod.get("nodeSelector") or pod.get("affinity", {}).get("nodeAffinity")):
                errors.append(f"{object_id(d)} {where}: no node pool (nodeSelector or nodeAffinity)")
    return errors


# ---------------------------------------------------------------------------------------------------------------------
# rendering and checkov


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render_kustomize(directory: Path) -> list[dict]:
    cmd = kustomize_command()
    if cmd is None:
        raise RuntimeError("no kustomize or kubectl on PATH (make system-deps installs kubernetes-client)")
    done = subprocess.run([*cmd, str(directory)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"kustomize build {directory} failed:\n{done.stderr}")
    return load_yaml_documents(done.stdout)


def checkov_binary() -> str | None:
    """checkov lives in its own virtualenv (.venv-checkov, `make checkov-venv`): it pins older networkx/packaging than
    the project's environment allows."""
    local = ROOT / ".venv-checkov" / "bin" / "checkov"
    if local.is_file():
        return str(local)
    return shutil.which("checkov")


def checkov_results(sets: dict[str, list[dict]]) -> dict[str, tuple[list[str], list[str], int]]:
    """checkov's Kubernetes framework over several rendered sets in one run (its start-up is most of its time):
    name -> (failed checks, skipped checks, passed count). Offline: no download, no platform mapping."""
    binary = checkov_binary()
    if binary is None:
        raise RuntimeError("checkov not found: run `make checkov-venv`")
    with tempfile.TemporaryDirectory() as tmp:
        for name, docs in sets.items():
            (Path(tmp) / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
        done = subprocess.run(
            [binary, "-d", tmp, "--framework", "kubernetes", "--skip-download", "-o", "json"],
            capture_output=True, text=True, timeout=300, env=env,
        )
    out = done.stdout.strip()
    if not out.startswith(("{", "[")):
        raise RuntimeError(f"checkov gave no JSON (rc {done.returncode}):\n{done.stderr[-3000:]}")
    reports = json.loads(out)
    reports = reports if isinstance(reports, list) else [reports]
    results: dict[str, tuple[list[str], list[str], int]] = {name: ([], [], 0) for name in sets}
    for r in reports:
        res = r.get("results", {})
        for key, index in (("failed_checks", 0), ("skipped_checks", 1), ("passed_checks", 2)):
            for c in res.get(key, []):
                name = Path(c["file_path"]).stem
                failed, skipped, passed = results[name]
                if index == 0:
                    failed.append(f"{c['check_id']} {c['resource']}: {c['check_name']}")
                elif index == 1:
                    skipped.append(f"{c['check_id']} {c['resource']}")
                else:
                    results[name] = (failed, skipped, passed + 1)
    return results


def render_helm(values: dict | None = None) -> list[dict]:
    """helm/diaggym rendered offline by Helm's library (helm-python-sdk), release `diaggym` in namespace `diaggym`."""
    import helm_python

    out = helm_python.Chart.load(str(CHART)).render(values or {}, name="diaggym", namespace="diaggym")
    return [d for text in out.values() for d in yaml.safe_load_all(text) if d]


@cache
def checkov_everything() -> dict[str, tuple[list[str], list[str], int]]:
    """One checkov run over every install path: kustomize dev and prod, the chart with default and prod values."""
    return checkov_results({
        "kustomize-dev": render_kustomize(ROOT / "k8s" / "overlays" / "dev"),
        "kustomize-prod": render_kustomize(ROOT / "k8s" / "overlays" / "prod"),
        "helm-default": render_helm(),
        "helm-prod": render_helm(yaml.safe_load((CHART / "values-prod.yaml").read_text())),
    })


# ---------------------------------------------------------------------------------------------------------------------
# Containerfiles


def containerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    if pending:
        raise ValueError("the Containerfile ends inside a continued line")
    return out
