"""The kustomize manifests (k8s/) and the serving image (serving/Containerfile), checked offline.

The base and both overlays are rendered with kubectl's built-in kustomize; every object must validate (built-in kinds
against the Kubernetes 1.31 schemas, custom resources against the CRDs in schemas/), every pod spec must pass Pod
Security "restricted" with requests, limits, probes and pinned tags, and checkov must find nothing. The checks
themselves live in tests/k8s_checks.py (tested in tests/test_k8s_checks.py); here they are applied and the contract
between the pieces is checked: what the server's CLI parses, who may talk to whom, what the pipeline may touch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.k8s_checks import (
    CRDS,
    SCHEMAS,
    checkov_everything,
    containerfile_instructions,
    load_yaml_documents,
    node_pool_errors,
    object_id,
    pod_security_errors,
    pod_specs,
    render_kustomize,
    validation_errors,
)

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BASE = K8S / "base"
OVERLAYS = {"dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod"}
CONTAINERFILE = ROOT / "serving" / "Containerfile"
CONTAINERIGNORE = ROOT / "serving" / ".containerignore"
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|ACCESS_KEY|API_KEY|CREDENTIAL|DSN", re.IGNORECASE)
# What KServe appends to a custom transformer's args (pkg/apis/serving/v1beta1/transformer_custom.go).
KSERVE_TRANSFORMER_FLAGS = ("--model_name", "--predictor_host", "--http_port", "--workers")
TOKEN_FILE = "/var/run/secrets/diaggym/token"


@cache
def rendered(name: str) -> tuple[dict, ...]:
    return tuple(render_kustomize(BASE if name == "base" else OVERLAYS[name]))


def the(kind: str, name: str | None = None, where: str = "base") -> dict:
    found = [d for d in rendered(where) if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {where}, found {len(found)}"
    return json.loads(json.dumps(found[0]))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


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


def test_every_manifest_file_is_in_a_kustomization():
    yamls = {p for p in K8S.rglob("*.y*ml") if p.is_file()}
    kfiles = {p for p in yamls if p.name in ("kustomization.yaml", "kustomization.yml")}
    referenced: set[Path] = set()
    for kfile in kfiles:
        (k,) = load_yaml_documents(kfile.read_text())
        assert k["kind"] in KUSTOMIZE_KINDS and k["apiVersion"].startswith("kustomize.config.k8s.io/")
        assert "secretGenerator" not in k, f"{_rel(kfile)}: credentials are never generated from committed files"
        for entry in k.get("resources", []) + k.get("components", []):
            target = (kfile.parent / entry).resolve()
            assert target.exists(), f"{_rel(kfile)}: {entry} does not exist"
            if target.is_file():
                referenced.add(target)
    orphans = sorted(_rel(p) for p in yamls - kfiles - referenced)
    assert not orphans, f"manifests no kustomization includes: {orphans}"


# ---------------------------------------------------------------------------------------------------------------------
# every rendered object: valid, restricted, checkov-clean


def test_base_renders_the_expected_objects():
    objects = sorted((d["kind"], d["metadata"]["name"]) for d in rendered("base"))
    assert objects == [
        ("Deployment", "mlflow"),
        ("InferenceService", "diaggym"),
        ("Namespace", "diaggym"),
        ("NetworkPolicy", "allow-dns"),
        ("NetworkPolicy", "default-deny"),
        ("NetworkPolicy", "diaggym-predictor"),
        ("NetworkPolicy", "diaggym-transformer"),
        ("NetworkPolicy", "mlflow"),
        ("NetworkPolicy", "postgres"),
        ("Role", "diaggym-pipeline"),
        ("RoleBinding", "diaggym-pipeline"),
        ("Service", "diaggym-postgres"),
        ("Service", "mlflow"),
        ("ServiceAccount", "diaggym-model-reader"),
        ("ServiceAccount", "diaggym-pipeline"),
        ("ServiceAccount", "mlflow"),
        ("ServiceAccount", "postgres"),
        ("ServingRuntime", "diaggym-vllm"),
        ("StatefulSet", "diaggym-postgres"),
    ]
    for d in rendered("base"):
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "diaggym", object_id(d)


@pytest.mark.parametrize("where", ["base", "dev", "prod"])
def test_rendered_objects_validate(where):
    errors = {object_id(d): e for d in rendered(where) if (e := validation_errors(d))}
    assert errors == {}


@pytest.mark.parametrize("where", ["base", "dev", "prod"])
def test_every_pod_spec_is_restricted_with_limits_probes_and_pinned_images(where):
    docs = rendered(where)
    assert sum(1 for d in docs for _ in pod_specs(d)) >= 5, "predictor, transformer, runtime, mlflow, postgres"
    errors = [e for d in docs for e in pod_security_errors(d)]
    assert errors == []


@pytest.mark.integration
@pytest.mark.parametrize("where", ["dev", "prod"])
def test_checkov_finds_nothing_and_every_skip_is_explained(where):
    docs = list(rendered(where))
    failed, skipped, passed = checkov_everything()[f"kustomize-{where}"]
    assert failed == []
    assert passed > 150, "checkov ran its Kubernetes checks"
    # A skip is written on the resource as checkov.io/skipN: CHECK_ID=reason; the reason must be there.
    for d in docs:
        for key, value in (d["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                assert re.fullmatch(r"CKV2?_K8S_\d+", check) and len(reason) > 20, f"{object_id(d)}: {value}"
    assert len(skipped) == sum(
        1 for d in docs for k in (d["metadata"].get("annotations") or {}) if k.startswith("checkov.io/skip")
    )


def test_namespace_enforces_restricted_pod_security():
    labels = the("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# ---------------------------------------------------------------------------------------------------------------------
# overlays: node pools, autoscaling, disruption budgets


def _gpu_requested(docs) -> bool:
    runtime = next(d for d in docs if d["kind"] == "ServingRuntime")
    return any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in runtime["spec"]["containers"])


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_puts_every_pod_on_a_node_pool(overlay):
    assert node_pool_errors(rendered(overlay)) == []


def test_an_overlay_without_node_pools_fails_the_check():
    errors = node_pool_errors(rendered("base"))
    assert any("InferenceService/diaggym spec.predictor" in e for e in errors), errors
    assert any("Deployment/mlflow" in e for e in errors), errors


def test_prod_runs_vllm_on_the_a100_pool_with_autoscaling_and_pdbs():
    docs = rendered("prod")
    isvc = the("InferenceService", where="prod")["spec"]
    predictor, transformer = isvc["predictor"], isvc["transformer"]
    assert predictor["nodeSelector"] == {"diaggym.io/node-pool": "a100"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in predictor["tolerations"]
    assert _gpu_requested(docs)
    for component in (predictor, transformer):
        assert 2 <= component["minReplicas"] < component["maxReplicas"]
        assert component["scaleMetric"] == "cpu" and 0 < component["scaleTarget"] <= 100
    pdbs = {
        d["spec"]["selector"]["matchLabels"]["component"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"
    }
    assert set(pdbs) == {"predictor", "transformer"}
    for pdb in pdbs.values():
        assert pdb["maxUnavailable"] == 1  # with minReplicas 2, one replica always stays


def test_dev_is_cpu_only_with_one_replica():
    docs = rendered("dev")
    assert not _gpu_requested(docs)
    isvc = the("InferenceService", where="dev")["spec"]
    assert isvc["predictor"]["maxReplicas"] == isvc["transformer"]["maxReplicas"] == 1
    assert "tolerations" not in isvc["predictor"]
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    runtime = the("ServingRuntime", where="dev")["spec"]["containers"][0]
    assert "cpu" in runtime["image"] and runtime["args"][runtime["args"].index("--dtype") + 1] == "float32"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_ships_monitoring_and_sets_the_model(overlay):
    kinds = {d["kind"] for d in rendered(overlay)}
    assert {"PodMonitor", "PrometheusRule", "ConfigMap"} <= kinds
    uri = the("InferenceService", where=overlay)["spec"]["predictor"]["model"]["storageUri"]
    assert uri.startswith("s3://")


# ---------------------------------------------------------------------------------------------------------------------
# RBAC, NetworkPolicies, secrets


def test_pipeline_may_read_the_registry_secret_and_patch_only_the_inferenceservice():
    docs = rendered("base")
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")], "no cluster-wide rights"
    role = the("Role", "diaggym-pipeline")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["diaggym-registry"], "verbs": ["get"]},
        {
            "apiGroups": ["serving.kserve.io"],
            "resources": ["inferenceservices"],
            "resourceNames": [the("InferenceService")["metadata"]["name"]],
            "verbs": ["get", "patch"],
        },
    ]
    binding = the("RoleBinding", "diaggym-pipeline")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "diaggym-pipeline"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "diaggym-pipeline", "namespace": "diaggym"}]


def _policies() -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"] for d in rendered("base") if d["kind"] == "NetworkPolicy"}


def _selects(policy: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in policy["podSelector"].get("matchLabels", {}).items())


def test_networkpolicies_deny_by_default_and_cover_every_pod():
    policies = _policies()
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for name, spec in policies.items():
        if name in ("default-deny", "allow-dns"):
            continue
        for rule in spec.get("ingress", []) + spec.get("egress", []):
            assert rule.get("ports"), f"{name}: every admitted flow names its ports"
    pods = {
        "transformer": {"serving.kserve.io/inferenceservice": "diaggym", "component": "transformer"},
        "predictor": {"serving.kserve.io/inferenceservice": "diaggym", "component": "predictor"},
        "mlflow": the("Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"],
        "postgres": the("StatefulSet", "diaggym-postgres")["spec"]["template"]["metadata"]["labels"],
    }
    for pod, labels in pods.items():
        own = [n for n, p in policies.items() if p["podSelector"] and _selects(p, labels)]
        assert own == [pod if pod not in ("transformer", "predictor") else f"diaggym-{pod}"], (pod, own)


def test_networkpolicies_admit_only_what_each_pod_needs():
    p = _policies()
    rl = {"namespaceSelector": {"matchLabels": {"diaggym.io/rl-consumer": "true"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    pipeline = {"namespaceSelector": {"matchLabels": {"diaggym.io/pipeline": "true"}}}
    transformer = {"podSelector": {"matchLabels": {"serving.kserve.io/inferenceservice": "diaggym",
                                                   "component": "transformer"}}}
    predictor = {"podSelector": {"matchLabels": {"serving.kserve.io/inferenceservice": "diaggym",
                                                 "component": "predictor"}}}
    port = [{"protocol": "TCP", "port": 8080}]
    assert p["diaggym-transformer"]["ingress"] == [{"from": [rl, monitoring], "ports": port}]
    assert p["diaggym-transformer"]["egress"] == [{"to": [predictor], "ports": port}]
    assert p["diaggym-predictor"]["ingress"] == [{"from": [transformer, monitoring], "ports": port}]
    assert p["mlflow"]["ingress"] == [{"from": [pipeline, monitoring], "ports": [{"protocol": "TCP", "port": 5000}]}]
    assert p["mlflow"]["egress"][0] == {
        "to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "postgres"}}}],
        "ports": [{"protocol": "TCP", "port": 5432}],
    }
    assert p["postgres"] == {
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "postgres"}},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}],
                     "ports": [{"protocol": "TCP", "port": 5432}]}],
    }


def _containers(docs) -> list[tuple[str, dict]]:
    return [(object_id(d), c) for d in docs for _, pod in pod_specs(d) for c in pod.get("containers") or []]


def test_secrets_are_only_referenced_never_committed():
    for where in ("base", "dev", "prod"):
        docs = rendered(where)
        assert not [d for d in docs if d["kind"] == "Secret"], "secrets are created at deploy time"
        for oid, c in _containers(docs):
            for e in c.get("env", []):
                if SECRET_ENV.search(e["name"]) and not e["name"].endswith("_FILE"):
                    assert "value" not in e and "valueFrom" in e, f"{oid}: {e['name']} must come from a secret"


def test_simulator_answers_to_the_reference_model_name():
    (c,) = the("InferenceService")["spec"]["transformer"]["containers"]
    assert _flag(c["args"], "--model-alias") == "EHRGenerator", "the reference rollout asks for model EHRGenerator"


def test_api_token_is_a_required_secret_mounted_as_a_file():
    spec = the("InferenceService")["spec"]["transformer"]
    (c,) = spec["containers"]
    assert not [e for e in c.get("env", []) if "TOKEN" in e["name"]], "the token is not an environment variable"
    assert _flag(c["args"], "--token-file") == TOKEN_FILE
    (mount,) = [m for m in c["volumeMounts"] if TOKEN_FILE.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    assert secret["secretName"] == "diaggym-api-token" and "optional" not in secret, "required: no pod without it"
    assert secret["items"] == [{"key": "token", "path": Path(TOKEN_FILE).name}]
    assert secret["defaultMode"] == 0o400


# ---------------------------------------------------------------------------------------------------------------------
# the Containerfile


INSTRUCTIONS = containerfile_instructions(CONTAINERFILE.read_text())
FINAL = INSTRUCTIONS[max(i for i, (ins, _) in enumerate(INSTRUCTIONS) if ins == "FROM"):]
ALLOWED_COPY_SOURCES = {"pyproject.toml", "setup.py", "README.md", "src", "serving/diaggym_serving", "configs",
                        "data/mimic-cdm"}


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for ins, args in stage:
        if ins == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def test_containerfile_base_image_is_a_pinned_python_311_slim():
    args = {k: v for k, _, v in (a.partition("=") for ins, a in INSTRUCTIONS if ins == "ARG")}
    bases = [a.split()[0] for ins, a in INSTRUCTIONS if ins == "FROM"]
    resolved = [args.get(b[2:-1], b) if b.startswith("${") else b for b in bases]
    for b in resolved:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", b), f"pin patch release + distro: {b}"


def test_containerfile_runs_as_a_numeric_non_root_user():
    users = [a for ins, a in FINAL if ins == "USER"]
    assert users, "the final stage sets no USER (it would run as root)"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root UID so runAsNonRoot can verify it: {uid}"
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_containerfile_installs_only_the_serve_extra_without_deepspeed_or_a_compiler():
    runs = " ".join(a for ins, a in INSTRUCTIONS if ins == "RUN")
    assert re.findall(r"\[([a-z,]+)\]", runs) == ["serve"], "the serving image installs the serve extra, nothing else"
    installs = " ".join(seg for seg in re.split(r"&&|;", runs) if "install" in seg)
    assert "pip install" in installs
    for banned in ("build-essential", "gcc", "g++", "deepspeed", "torch"):
        assert banned not in installs, banned
    assert "--only-binary=:all:" in installs, "no source builds, so no compiler is needed"


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


def _runtime_container(where: str = "base") -> dict:
    (c,) = the("ServingRuntime", where=where)["spec"]["containers"]
    return c


def _transformer_container(where: str = "base") -> dict:
    (c,) = the("InferenceService", where=where)["spec"]["transformer"]["containers"]
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
    assert _flag(args, "--max-model-len") == "32768"  # Qwen2.5-7B: reference evaluations ask for 8192 new tokens
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
    assert c["args"][:2] == ["--engine", "openai"]
    assert not set(c["args"]) & set(KSERVE_TRANSFORMER_FLAGS), "KServe appends these; duplicates would conflict"
    assert "containerConcurrency" not in the("InferenceService")["spec"]["transformer"], "KServe would add --workers"
    exposed = int(next(a for ins, a in FINAL if ins == "EXPOSE"))
    assert [p["containerPort"] for p in c["ports"]] == [exposed] == [8080], "KServe passes --http_port 8080"
    assert _probe_ports(c) == {exposed}
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_transformer_arguments_parse_with_the_server_cli(monkeypatch):
    """The container's args plus what KServe appends must parse with the server's own parser, to the right values."""
    server = pytest.importorskip("diaggym_serving.server")
    name = the("InferenceService")["metadata"]["name"]
    monkeypatch.setenv("DIAGGYM_HOST", _env(FINAL)["DIAGGYM_HOST"])
    argv = [*_transformer_container()["args"], "--model_name", name, "--predictor_host", f"{name}-predictor.diaggym",
            "--http_port", "8080"]
    args = server.build_parser().parse_args(argv)
    assert args.engine == "openai"
    assert args.model_name == "diaggym"
    assert args.http_port == 8080
    assert args.host == "0.0.0.0"
    assert args.served_model == _flag(_runtime_container()["args"], "--served-model-name")
    assert args.api_token_file == TOKEN_FILE


def test_drain_fits_the_termination_grace_period():
    """preStop pause + the server's drain + its graceful timeout must end before the kubelet's SIGKILL."""
    spec = the("InferenceService")["spec"]
    c = _transformer_container()
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(_flag(c["args"], "--drain-seconds"))
    graceful = float(_flag(c["args"], "--graceful-timeout"))
    assert pause >= 3, "endpoint removal needs a few seconds to reach every kube-proxy"
    assert pause + drain + graceful + 5 <= spec["transformer"]["terminationGracePeriodSeconds"]
    runtime = _runtime_container()
    assert int(runtime["lifecycle"]["preStop"]["exec"]["command"][-1]) + 30 <= spec["predictor"][
        "terminationGracePeriodSeconds"
    ]
    assert c["readinessProbe"]["periodSeconds"] * c["readinessProbe"]["failureThreshold"] <= pause + drain + graceful


def test_transformer_user_matches_the_image():
    uid, _, gid = next(a for ins, a in reversed(FINAL) if ins == "USER").partition(":")
    spec = the("InferenceService")["spec"]["transformer"]
    for ctx in (spec["securityContext"], _transformer_container()["securityContext"]):
        assert ctx["runAsUser"] == int(uid)
        assert ctx.get("runAsGroup", int(gid or uid)) == int(gid or uid)


def test_writable_paths_are_emptydirs_on_a_read_only_root():
    for oid, c in _containers(rendered("base")):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}, f"{oid}: writable /tmp"


def test_storage_uri_is_a_placeholder_for_the_deploy_step():
    uri = the("InferenceService")["spec"]["predictor"]["model"]["storageUri"]
    assert uri.startswith("s3://"), "KServe's storage initializer cannot resolve models:/ URIs"
    assert "REPLACE" in uri, "the base carries a placeholder; the deploy step patches in the resolved version"


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
    monitor = the("PodMonitor", where="prod")["spec"]
    assert monitor["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    for c in (_runtime_container(), _transformer_container()):
        assert endpoint["port"] in {p.get("name") for p in c["ports"]}


def test_deploy_overlay_sets_storage_uri_and_images(tmp_path):
    """The overlay the deploy step writes (k8s/README.md) on top of prod renders to valid objects with its values."""
    uri = "s3://mlflow-artifacts/3/models/m-0123456789abcdef/artifacts"
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(OVERLAYS["prod"], tmp_path)],
        "images": [
            {"name": "registry.example.org/diaggym/simulator", "newTag": "1.2.3"},
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
    docs = render_kustomize(tmp_path)
    for d in docs:
        assert validation_errors(d) == [], object_id(d)
    isvc = next(d for d in docs if d["kind"] == "InferenceService")["spec"]
    assert isvc["predictor"]["model"]["storageUri"] == uri
    assert isvc["transformer"]["containers"][0]["image"] == "registry.example.org/diaggym/simulator:1.2.3"
    runtime = next(d for d in docs if d["kind"] == "ServingRuntime")
    assert runtime["spec"]["containers"][0]["image"] == "vllm/vllm-openai:v0.33.1"
