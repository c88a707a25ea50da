"""Offline validation of the serving manifests: serving/Containerfile, serving/runtime/ and k8s/serving/.

No cluster is needed. Custom resources (KServe, Prometheus operator) are checked against the openAPIV3Schema of their
CRD version, copied upstream into schemas/, in two passes:

* jsonschema (Draft 7) for types, enums, patterns and required fields;
* a structural walker for what the API server would do beyond that: a field not declared in the schema is an error
  (the server would prune it silently, so a typo such as ``storageURI`` would deploy a model-less service) unless the
  node sets ``x-kubernetes-preserve-unknown-fields`` or ``additionalProperties``; list-type ``map``/``set`` lists must
  not repeat keys (two env vars with one name).

Object metadata of custom resources is checked with the built-in ObjectMeta schema; built-in kinds (NetworkPolicy,
ServiceAccount, ...) with ``kubernetes_validate`` in strict mode. Negative tests prove each pass rejects what it
should. Where a kustomize (or ``kubectl kustomize``) binary is on PATH, the base and a deploy-style overlay are also
rendered and validated.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "schemas"
RUNTIME_DIR = ROOT / "serving" / "runtime"
SERVING_K8S = ROOT / "k8s" / "serving"
MANIFEST_DIRS = (RUNTIME_DIR, SERVING_K8S)
CONTAINERFILE = ROOT / "serving" / "Containerfile"
CONTAINERIGNORE = ROOT / "serving" / ".containerignore"
K8S_VERSION = "1.31"

# (group, kind) -> CRD file under schemas/
CRDS: dict[tuple[str, str], str] = {
    ("serving.kserve.io", "InferenceService"): "kserve/serving.kserve.io_inferenceservices.yaml",
    ("serving.kserve.io", "ServingRuntime"): "kserve/serving.kserve.io_servingruntimes.yaml",
    ("serving.kserve.io", "ClusterServingRuntime"): "kserve/serving.kserve.io_clusterservingruntimes.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "prometheus-operator/monitoring.coreos.com_podmonitors.yaml",
}
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "namespace",
    "images",
    "patches",
    "labels",
    "commonAnnotations",
    "replacements",
    "configMapGenerator",
    "generatorOptions",
    "namePrefix",
    "nameSuffix",
}
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|ACCESS_KEY|API_KEY|CREDENTIAL", re.IGNORECASE)
# What KServe appends to a custom transformer's args (pkg/apis/serving/v1beta1/transformer_custom.go).
KSERVE_TRANSFORMER_FLAGS = ("--model_name", "--predictor_host", "--http_port", "--workers")


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
        assert isinstance(d, dict), f"a YAML document is not a mapping: {d!r}"
    return docs


def manifest_files() -> list[Path]:
    files = []
    for base in MANIFEST_DIRS:
        files += [p for p in base.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()]
    return sorted(files)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _documents() -> list[tuple[str, dict]]:
    """(id, document) for every Kubernetes object under the manifest folders (kustomize files excluded)."""
    out = []
    for path in manifest_files():
        for i, doc in enumerate(load_yaml_documents(path.read_text())):
            if doc.get("kind") in KUSTOMIZE_KINDS:
                continue
            out.append((f"{_rel(path)}#{i}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc))
    return out


def _kustomizations() -> list[Path]:
    return sorted(p for p in manifest_files() if p.name in ("kustomization.yaml", "kustomization.yml"))


DOCUMENTS = _documents()


def the(kind: str, name: str | None = None) -> dict:
    """A deep copy of the one committed document of this kind (and name)."""
    found = [d for _, d in DOCUMENTS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return copy.deepcopy(found[0])


# ---------------------------------------------------------------------------------------------------------------------
# validation


@cache
def _crd(path: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the InferenceService CRD is 2 MB
    with open(SCHEMAS / path) as f:
        return yaml.load(f, Loader=loader)


@cache
def crd_schema(group: str, version: str, kind: str) -> dict:
    crd = _crd(CRDS[(group, kind)])
    assert crd["kind"] == "CustomResourceDefinition"
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (group, kind), "CRD table points at the wrong file"
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            assert v.get("served", False), f"{kind} {group}/{version} is not served"
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"CRD {kind} has no version {version}")


@cache
def _validator(group: str, version: str, kind: str) -> jsonschema.Draft7Validator:
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
    if not (isinstance(name, str) and DNS1123_LABEL.match(name) and len(name) <= 63):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 label")
    group, _, version = doc["apiVersion"].rpartition("/")
    if (group, doc["kind"]) not in CRDS:
        return errors + _kv_errors(doc)
    schema = crd_schema(group, version, doc["kind"])
    for e in _validator(group, version, doc["kind"]).iter_errors(doc):
        errors.append(f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}")
    body = {k: v for k, v in doc.items() if k != "metadata"}  # the root metadata node is just {type: object}
    errors += structural_errors(body, schema)
    # ObjectMeta is validated by the API server itself, not by the CRD: check it with the built-in schema.
    as_configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
    errors += _kv_errors(as_configmap)
    return errors


# ---------------------------------------------------------------------------------------------------------------------
# schema copies and file layout


def _sources_table(folder: Path) -> dict[str, str]:
    rows = {}
    for line in (folder / "SOURCES.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"[0-9a-f]{64}", cells[2]):
            rows[cells[0]] = cells[2]
    return rows


@pytest.mark.parametrize("folder", ["kserve", "prometheus-operator"])
def test_schema_copies_match_their_sources(folder):
    base = SCHEMAS / folder
    table = _sources_table(base)
    present = {p.name for p in base.iterdir() if p.name != "SOURCES.md"}
    assert "LICENSE" in present, "the upstream licence travels with the copies"
    assert set(table) == present, "every schema file is listed in SOURCES.md, and only those"
    for name, digest in table.items():
        actual = hashlib.sha256((base / name).read_bytes()).hexdigest()
        assert actual == digest, f"{folder}/{name} differs from the upstream file SOURCES.md names"


def test_every_crd_in_the_table_exists():
    for path in CRDS.values():
        assert (SCHEMAS / path).is_file(), path


def test_kustomizations_reference_existing_files_and_every_manifest():
    referenced: set[Path] = set()
    for kfile in _kustomizations():
        (k,) = load_yaml_documents(kfile.read_text())
        assert k["kind"] in KUSTOMIZE_KINDS and k["apiVersion"].startswith("kustomize.config.k8s.io/")
        assert set(k) <= KUSTOMIZATION_KEYS, f"{_rel(kfile)}: unexpected keys {set(k) - KUSTOMIZATION_KEYS}"
        assert "secretGenerator" not in k, "credentials are never generated from committed files"
        for entry in k.get("resources", []) + k.get("components", []):
            target = (kfile.parent / entry).resolve()
            assert target.exists(), f"{_rel(kfile)}: {entry} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{_rel(kfile)}: {entry} has no kustomization.yaml"
            else:
                assert kfile.parent in target.parents, f"{_rel(kfile)}: {entry} is outside the kustomization root"
                referenced.add(target)
    orphans = [_rel(p) for p in manifest_files() if p not in referenced and p not in _kustomizations()]
    assert not orphans, f"manifests no kustomization includes: {orphans}"


def test_the_expected_objects_are_there():
    kinds = sorted((d["kind"], d["metadata"]["name"]) for _, d in DOCUMENTS)
    assert kinds == [
        ("InferenceService", "diaggym"),
        ("NetworkPolicy", "diaggym-predictor-ingress"),
        ("NetworkPolicy", "diaggym-transformer-ingress"),
        ("PodMonitor", "diaggym"),
        ("ServiceAccount", "diaggym-model-reader"),
        ("ServingRuntime", "diaggym-vllm"),
    ]


@pytest.mark.parametrize(("doc_id", "doc"), DOCUMENTS, ids=[i for i, _ in DOCUMENTS])
def test_manifest_is_valid(doc_id, doc):
    assert validation_errors(doc) == []


# ---------------------------------------------------------------------------------------------------------------------
# the validation catches errors


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
        "isvc-missing-env-secret-key",
        "InferenceService",
        delete(f"{ISVC_T}.env.0.valueFrom.secretKeyRef.key"),
        "'key' is a required",
    ),
    (
        "isvc-duplicate-env",
        "InferenceService",
        append(f"{ISVC_T}.env", {"name": "DIAGGYM_API_TOKEN", "value": "x"}),
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
    name = "diaggym-transformer-ingress" if kind == "NetworkPolicy" else None
    doc = _mutate(mutation, the(kind, name))
    errors = validation_errors(doc)
    assert errors, "the broken manifest passed validation"
    assert any(expected in e for e in errors), errors


def test_jsonschema_alone_would_accept_a_typo():
    """Why the structural walker exists: the CRD schemas do not set additionalProperties: false."""
    doc = _mutate(rename("spec.predictor.model.storageUri", "storageURI"), the("InferenceService"))
    assert list(_validator("serving.kserve.io", "v1beta1", "InferenceService").iter_errors(doc)) == []
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


# ---------------------------------------------------------------------------------------------------------------------
# the Containerfile


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
    assert not pending, "the Containerfile ends inside a continued line"
    return out


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[last_from:]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for ins, args in stage:
        if ins == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


INSTRUCTIONS = containerfile_instructions(CONTAINERFILE.read_text())
FINAL = _final_stage(INSTRUCTIONS)
ALLOWED_COPY_SOURCES = {"pyproject.toml", "README.md", "src", "serving/diaggym_serving"}


def test_containerfile_base_image_is_python_311_slim():
    args = {k: v for k, _, v in (a.partition("=") for ins, a in INSTRUCTIONS if ins == "ARG")}
    bases = [a.split()[0] for ins, a in INSTRUCTIONS if ins == "FROM"]
    resolved = [args.get(b[2:-1], b) if b.startswith("${") else b for b in bases]
    assert resolved and all(b.startswith("python:3.11") and "slim" in b for b in resolved), resolved


def test_containerfile_runs_as_a_numeric_non_root_user():
    users = [a for ins, a in FINAL if ins == "USER"]
    assert users, "the final stage sets no USER (it would run as root)"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root UID so runAsNonRoot can verify it: {uid}"
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_containerfile_copies_only_the_package_sources():
    for ins, args in INSTRUCTIONS:
        assert ins != "ADD", "ADD fetches URLs and unpacks archives; COPY only"
        if ins != "COPY":
            continue
        tokens = shlex.split(args)
        if any(t.startswith("--from=") for t in tokens):
            continue
        sources = [t for t in tokens if not t.startswith("--")][:-1]
        for src in sources:
            norm = src.rstrip("/")
            assert norm in ALLOWED_COPY_SOURCES, f"COPY {src}: only {sorted(ALLOWED_COPY_SOURCES)} may enter the image"
            assert not re.match(r"^(data|work|\.venv|tests)(/|$)", norm)


def test_containerfile_entrypoint_port_and_environment():
    entrypoints = [a for ins, a in FINAL if ins == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["python", "-m", "diaggym_serving"]
    assert not [a for ins, a in FINAL if ins == "CMD"], "arguments come from the InferenceService and KServe"
    assert [a for ins, a in FINAL if ins == "EXPOSE"] == ["8080"]
    env = _env(FINAL)
    assert env["DIAGGYM_HOST"] == "0.0.0.0", "the server binds 127.0.0.1 unless told otherwise"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1", "read-only root filesystem"
    assert env["HOME"].startswith("/tmp")


def test_containerignore_keeps_data_out_of_the_build_context():
    lines = {line.strip() for line in CONTAINERIGNORE.read_text().splitlines() if line.strip()}
    for pattern in ("data/", "work/", ".venv*", "tests/", ".git/"):
        assert pattern in lines, pattern


# ---------------------------------------------------------------------------------------------------------------------
# the serving contract (docs/architecture.md, contract 3)


def _runtime_container() -> dict:
    (c,) = the("ServingRuntime")["spec"]["containers"]
    return c


def _transformer_container() -> dict:
    (c,) = the("InferenceService")["spec"]["transformer"]["containers"]
    return c


def _flag(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} must appear once in {args}"
    return args[args.index(flag) + 1]


def _probe_ports(container: dict) -> set:
    probes = ("startupProbe", "readinessProbe", "livenessProbe")
    return {container[p]["httpGet"]["port"] for p in probes if p in container}


def test_inferenceservice_uses_the_runtime():
    isvc, runtime = the("InferenceService"), the("ServingRuntime")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"]: f for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert formats[model["modelFormat"]["name"]]["autoSelect"] is False
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"


def test_runtime_runs_vllm_openai_server():
    c = _runtime_container()
    assert c["name"] == "kserve-container", "KServe merges predictor.model into the container of this name"
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", c["image"]), f"pin a release tag: {c['image']}"
    assert c["command"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    args = c["args"]
    assert _flag(args, "--model") == "/mnt/models"
    assert _flag(args, "--served-model-name") == "diaggym"
    assert _flag(args, "--max-model-len") == "8192"
    assert _flag(args, "--dtype") == "bfloat16"
    assert "--enable-prefix-caching" in args
    port = int(_flag(args, "--port"))
    assert [p["containerPort"] for p in c["ports"]] == [port]
    assert _probe_ports(c) == {port}
    assert {c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {"/health"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    volumes = {v["name"]: v for v in the("ServingRuntime")["spec"]["volumes"]}
    shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
    assert {e["name"]: e["value"] for e in c["env"]}["HF_HUB_OFFLINE"] == "1", "weights come from /mnt/models only"


def test_transformer_runs_the_simulator_image_entrypoint():
    c = _transformer_container()
    assert c["name"] == "kserve-container"
    assert "command" not in c, "the image ENTRYPOINT (python -m diaggym_serving) must run"
    assert c["args"] == ["--engine", "openai"]
    assert not set(c["args"]) & set(KSERVE_TRANSFORMER_FLAGS), "KServe appends these; duplicates would conflict"
    assert "containerConcurrency" not in the("InferenceService")["spec"]["transformer"], "KServe would add --workers"
    assert not c["image"].endswith(":latest") and ":" in c["image"]
    exposed = int(next(a for ins, a in FINAL if ins == "EXPOSE"))
    assert [p["containerPort"] for p in c["ports"]] == [exposed] == [8080], "KServe passes --http_port 8080"
    assert _probe_ports(c) == {exposed}
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    (token,) = [e for e in c["env"] if e["name"] == "DIAGGYM_API_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "diaggym-api-token", "key": "token", "optional": True}


def test_transformer_arguments_parse_with_the_server_cli(monkeypatch):
    """The container's args plus what KServe appends must parse with the server's own parser, to the right values."""
    server = pytest.importorskip("diaggym_serving.server")
    isvc = the("InferenceService")
    name = isvc["metadata"]["name"]
    monkeypatch.setenv("DIAGGYM_HOST", _env(FINAL)["DIAGGYM_HOST"])
    argv = [
        *_transformer_container()["args"],
        "--model_name",
        name,
        "--predictor_host",
        f"{name}-predictor.diaggym",
        "--http_port",
        "8080",
    ]
    args = server.build_parser().parse_args(argv)
    assert args.engine == "openai"
    assert args.model_name == "diaggym"
    assert args.http_port == 8080
    assert args.host == "0.0.0.0"
    assert args.served_model == _flag(_runtime_container()["args"], "--served-model-name")
    assert args.api_token_env == "DIAGGYM_API_TOKEN"


def test_transformer_user_matches_the_image():
    uid, _, gid = next(a for ins, a in reversed(FINAL) if ins == "USER").partition(":")
    spec = the("InferenceService")["spec"]["transformer"]
    for ctx in (spec["securityContext"], _transformer_container()["securityContext"]):
        assert ctx["runAsUser"] == int(uid)
        assert ctx.get("runAsGroup", int(gid or uid)) == int(gid or uid)


def _all_containers() -> Iterator[tuple[str, dict]]:
    yield "runtime", _runtime_container()
    yield "transformer", _transformer_container()


@pytest.mark.parametrize("which", ["runtime", "transformer"])
def test_containers_are_locked_down(which):
    c = dict(_all_containers())[which]
    ctx = c["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] > 0
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"]["drop"] == ["ALL"] and "add" not in ctx["capabilities"]
    assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, "writable /tmp on a read-only root filesystem"
    assert "limits" in c["resources"] and "requests" in c["resources"]


def test_no_credentials_are_committed():
    for doc_id, doc in DOCUMENTS:
        assert doc["kind"] != "Secret", f"{doc_id}: secrets are created at deploy time, never committed"
    for which, c in _all_containers():
        for e in c.get("env", []):
            if SECRET_ENV.search(e["name"]):
                assert "value" not in e and "valueFrom" in e, f"{which}: {e['name']} must come from a secret"


def test_storage_uri_is_a_placeholder_for_the_deploy_step():
    uri = the("InferenceService")["spec"]["predictor"]["model"]["storageUri"]
    assert uri.startswith("s3://"), "KServe's storage initializer cannot resolve models:/ URIs"
    assert "REPLACE" in uri, "the base carries a placeholder; the deploy step patches in the resolved version"


def test_networkpolicies_admit_only_rl_jobs_and_monitoring():
    isvc = the("InferenceService")["metadata"]["name"]
    pods = {"serving.kserve.io/inferenceservice": isvc}
    rl = {"namespaceSelector": {"matchLabels": {"diaggym.io/rl-consumer": "true"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    port = [{"protocol": "TCP", "port": 8080}]

    transformer = the("NetworkPolicy", "diaggym-transformer-ingress")["spec"]
    assert transformer["podSelector"]["matchLabels"] == {**pods, "component": "transformer"}
    assert transformer["policyTypes"] == ["Ingress"]
    assert transformer["ingress"] == [{"from": [rl, monitoring], "ports": port}]

    predictor = the("NetworkPolicy", "diaggym-predictor-ingress")["spec"]
    assert predictor["podSelector"]["matchLabels"] == {**pods, "component": "predictor"}
    assert predictor["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": {**pods, "component": "transformer"}}}, monitoring], "ports": port}
    ]


def test_prometheus_scraping_points_at_both_metrics_endpoints():
    isvc, runtime = the("InferenceService"), the("ServingRuntime")
    # "true" would make KServe's webhook point prometheus.io/port at the Knative queue-proxy port.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "false"
    rt_port = str(_runtime_container()["ports"][0]["containerPort"])
    annotations = runtime["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == annotations["prometheus.io/port"] == rt_port
    assert annotations["prometheus.kserve.io/path"] == annotations["prometheus.io/path"] == "/metrics"
    for component, container in (("predictor", _runtime_container()), ("transformer", _transformer_container())):
        pod = isvc["spec"][component]["annotations"]
        assert pod["prometheus.io/scrape"] == "true"
        assert pod["prometheus.io/port"] == str(container["ports"][0]["containerPort"])
        assert pod["prometheus.io/path"] == "/metrics"
    monitor = the("PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    for _, c in _all_containers():
        assert endpoint["port"] in {p.get("name") for p in c["ports"]}


# ---------------------------------------------------------------------------------------------------------------------
# rendered with kustomize, where a binary is available


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _render(directory: Path) -> list[dict]:
    cmd = _kustomize_command()
    if cmd is None:
        pytest.skip("no kustomize or kubectl on PATH")
    done = subprocess.run([*cmd, str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return load_yaml_documents(done.stdout)


def test_base_renders_and_validates():
    docs = _render(SERVING_K8S)
    assert {d["kind"] for d in docs} == {"ServingRuntime", "InferenceService", "NetworkPolicy", "ServiceAccount"}
    for d in docs:
        assert d["metadata"]["namespace"] == "diaggym"
        assert validation_errors(d) == [], d["kind"]


def test_deploy_overlay_sets_storage_uri_images_and_podmonitor(tmp_path):
    """The overlay the deploy step writes (k8s/serving/README.md) renders to valid objects with its values in."""
    uri = "s3://mlflow-artifacts/3/models/m-0123456789abcdef/artifacts"
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "diaggym",
        "resources": [os.path.relpath(SERVING_K8S, tmp_path)],
        "components": [os.path.relpath(SERVING_K8S / "components" / "podmonitor", tmp_path)],
        "images": [
            {"name": "diaggym-simulator", "newName": "registry.example.org/diaggym/simulator", "newTag": "1.2.3"},
            {"name": "vllm/vllm-openai", "newTag": "v0.33.1"},
        ],
        "patches": [
            {
                "target": {"group": "serving.kserve.io", "kind": "InferenceService", "name": "diaggym"},
                "patch": json.dumps([{"op": "replace", "path": "/spec/predictor/model/storageUri", "value": uri}]),
            }
        ],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    docs = {d["kind"]: d for d in _render(tmp_path)}
    assert set(docs) == {"ServingRuntime", "InferenceService", "NetworkPolicy", "ServiceAccount", "PodMonitor"}
    for d in docs.values():
        assert d["metadata"]["namespace"] == "diaggym"
        assert validation_errors(d) == [], d["kind"]
    isvc = docs["InferenceService"]["spec"]
    assert isvc["predictor"]["model"]["storageUri"] == uri
    assert isvc["transformer"]["containers"][0]["image"] == "registry.example.org/diaggym/simulator:1.2.3"
    assert docs["ServingRuntime"]["spec"]["containers"][0]["image"] == "vllm/vllm-openai:v0.33.1"
