"""Kubeflow Pipelines components of DiagGym: kfp lightweight Python components, each a thin call into ``diaggym``.

The function bodies are shipped as source into the component spec and run inside the project image (or, locally,
in this virtualenv through ``kfp.local.SubprocessRunner``), so each imports what it needs inside itself and holds
no logic of its own beyond moving files between kfp artifacts and the core library's calls.

``make_components(image, packages)`` decorates them for one base image and package source (compile-time choices:
kfp fixes a component's image when the pipeline is compiled).
"""

import os
from dataclasses import dataclass
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

# The project image (components/Containerfile.train); override with --image / DIAGGYM_IMAGE.
DEFAULT_IMAGE = os.environ.get("DIAGGYM_IMAGE", "ghcr.io/diaggym/diaggym-train:0.1.0")


def preprocess(source: str, data_path: str, cases: Output[Dataset], card: Output[Markdown]) -> str:
    """EHR records -> versioned cases with a patient-level split, and the dataset card (rendered in the UI)."""
    import shutil
    from pathlib import Path

    from diaggym.preprocess import preprocess as run

    result = run(source, data_path, cases.path)
    shutil.copyfile(Path(cases.path) / "card.md", card.path)
    cases.metadata.update({"dataset_hash": result["dataset_hash"], "cases": result["cases"], "source": source})
    return result["dataset_hash"]


def base(base_model: str, seed: int, cases: Input[Dataset], model: Output[Model]) -> None:
    """A local base (tiny/local/small: tokenizer trained on the train split, random Qwen2) or a path to a real one."""
    from diaggym.cases import load_cases
    from diaggym.model.base import PRESETS, init_base

    if base_model in PRESETS:
        init_base(load_cases(cases.path, split="train"), model.path, preset=base_model, seed=seed)
        model.metadata["preset"] = base_model
    else:  # e.g. /models/Qwen2.5-7B-Instruct on a shared volume: passed by reference, never copied
        model.metadata["path"] = base_model


def train(
    cases: Input[Dataset],
    base: Input[Model],
    config: str,
    max_steps: int,
    checkpoint_root: str,
    num_nodes: int,
    gpus_per_node: int,
    gpu_resource: str,
    trainer_image: str,
    mlflow_secret: str,
    mlflow_config_map: str,
    model: Output[Model],
    metrics: Output[Metrics],
) -> NamedTuple("TrainOutputs", [("mlflow_run_id", str), ("run_folder", str)]):
    """Fine-tune (or resume) in a run folder on the checkpoint volume; a finished run is reused, not repeated."""
    import hashlib
    import json
    import shutil
    from pathlib import Path

    from diaggym.training.train import TrainConfig
    from diaggym.training.train import train as run

    base_path = base.metadata.get("path") or base.path
    # The run folder is named by what the run depends on, so a re-run of the same pipeline finds it: a preempted
    # pod resumes from its last checkpoint, a finished one is reused (same MLflow run, same registry version).
    key = json.dumps([cases.metadata.get("dataset_hash"), config, base.metadata.get("preset") or base_path, max_steps])
    folder = Path(checkpoint_root) / f"{Path(config).stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    final = folder / "final"
    if (final / "diaggym_train.json").is_file() and (folder / "mlflow_run_id").is_file():
        summary = json.loads((final / "diaggym_train.json").read_text())
        print(f"reusing the finished training run in {folder}")
    elif num_nodes > 1:  # Kubeflow Trainer: every node must see the inputs, so they go onto the shared volume
        from components.trainjob import run_train_job, train_job

        inputs = folder / "inputs"
        shutil.copytree(cases.path, inputs / "cases", dirs_exist_ok=True)
        if not base.metadata.get("path"):
            shutil.copytree(base.path, inputs / "base", dirs_exist_ok=True)
            base_path = str(inputs / "base")
        args = ["--config", config, "--cases", str(inputs / "cases"), "--base", base_path, "--out", str(folder),
                "--resume", *(["--max-steps", str(max_steps)] if max_steps > 0 else [])]
        job = train_job(f"diaggym-{folder.name}".lower(), trainer_image, args, num_nodes, gpus_per_node,
                        gpu_resource, mlflow_secret=mlflow_secret, mlflow_config_map=mlflow_config_map)
        run_train_job(job, Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip())
        summary = json.loads((final / "diaggym_train.json").read_text())
    else:
        cfg = TrainConfig.from_file(config, cases=cases.path, base=base_path, out=str(folder),
                                    max_steps=max_steps if max_steps > 0 else None, resume=True)
        summary = run(cfg)
    shutil.copytree(final, model.path, dirs_exist_ok=True)
    run_id = (folder / "mlflow_run_id").read_text().strip()
    model.metadata.update({"mlflow_run_id": run_id, "config": config})
    for k in ("val_loss_before", "val_loss_after", "train_loss", "global_step"):
        if summary.get(k) is not None:
            metrics.log_metric(k, float(summary[k]))
    (Path(model.path) / "diaggym_train.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return (run_id, str(folder))


def evaluate(
    cases: Input[Dataset],
    model: Input[Model],
    base: Input[Model],
    model_name: str,
    max_cases: int,
    max_exams: int,
    exam_samples: int,
    max_tokens: int,
    top_p: float,
    exam_types: int,
    embeddings: bool,
    seed: int,
    report: Output[Markdown],
    report_html: Output[HTML],
    metrics: Output[Metrics],
    evaluation: Output[Artifact],
) -> None:
    """The candidate beside the baselines, the untuned base and the current champion, on the same split and seeds."""
    import html
    import json
    import shutil
    from pathlib import Path

    from diaggym.cases import load_cases
    from diaggym.engines import make_engine
    from diaggym.evaluation.run import EvalSettings
    from diaggym.evaluation.run import evaluate as run
    from diaggym.registry import RegistryError, download

    train_cases = load_cases(cases.path, split="train")
    engines = {"candidate": make_engine("transformers", model=model.path)}
    if base.metadata.get("preset"):  # a local base is cheap to score; a 7B base is not re-run on every pipeline
        engines["base (untuned)"] = make_engine("transformers", model=base.path)
    for b in ("normal", "marginal", "median"):
        engines[b] = make_engine(b, cases=train_cases, seed=seed)
    try:
        champion, info = download(f"models:/{model_name}@champion")
        engines["champion"] = make_engine("transformers", model=champion)
        print(f"evaluating the current champion (version {info['version']}) beside the candidate")
    except RegistryError as err:
        print(f"no champion to compare with: {err}")
    settings = EvalSettings(max_cases=max_cases or None, max_exams=max_exams, exam_samples=exam_samples,
                            max_tokens=max_tokens, top_p=top_p, exam_types=exam_types, seed=seed)
    out = Path(evaluation.path)
    doc = run(cases.path, str(out), engines, settings=settings, candidate=model.metadata.get("config"),
              use_embeddings=embeddings, mlflow_run_id=model.metadata.get("mlflow_run_id"))
    text = (out / "report.md").read_text()
    shutil.copyfile(out / "report.md", report.path)
    Path(report_html.path).write_text(f"<html><body><pre>{html.escape(text)}</pre></body></html>\n")
    for k, v in doc["engines"]["candidate"]["metrics"].items():
        if isinstance(v, int | float) and v == v:
            metrics.log_metric(k, float(v))
    evaluation.metadata["metrics_json"] = json.dumps({"split": doc["split"], "cases": doc["cases"]})


def register(
    train_run_id: str,
    evaluation: Input[Artifact],
    model: Input[Model],
    model_name: str,
    config: str,
    pipeline_run_id: str,
) -> str:
    """The trained checkpoint as a registry version with its tags and figures (idempotent per training run)."""
    import json
    from pathlib import Path

    from diaggym.registry import register as run

    doc = json.loads((Path(evaluation.path) / "metrics.json").read_text())
    summary = json.loads((Path(model.path) / "diaggym_train.json").read_text())
    mv, created = run(train_run_id, doc, name=model_name, train_summary=summary, pipeline_run_id=pipeline_run_id,
                      training_config=config)
    print(f"{'registered' if created else 'already registered:'} {model_name} version {mv.version}")
    return str(mv.version)


def gate(model_name: str, version: str, policy: str, fail_on_reject: bool) -> str:
    """Promote to @champion when the policy holds; otherwise @challenger, reasons recorded, and the task fails."""
    from diaggym.registry import GateRejected, load_policy
    from diaggym.registry import gate as run

    try:
        decision = run(version, load_policy(policy), name=model_name)
    except GateRejected as rej:
        print(f"REJECTED version {version}: " + "; ".join(rej.reasons))
        if fail_on_reject:
            raise SystemExit(f"gate refused {model_name} version {version}: " + "; ".join(rej.reasons)) from None
        return "rejected"
    print(f"PASSED: {model_name} version {version} is @champion (against {decision.against})")
    return "passed"


def deploy(
    model_name: str,
    alias: str,
    manifest_template: str,
    namespace: str,
    artifact_store: str,
    manifest: Output[Artifact],
) -> str:
    """Point the InferenceService at the champion's artifacts and apply it (or write it when there is no cluster)."""
    from pathlib import Path

    import yaml

    from diaggym.registry import find, storage_uri

    mv = find(f"models:/{model_name}@{alias}")
    doc = yaml.safe_load(Path(manifest_template).read_text())
    doc["spec"]["predictor"]["model"]["storageUri"] = storage_uri(mv.source, artifact_store)
    labels = doc["metadata"].setdefault("annotations", {})
    labels["diaggym/registry-version"] = f"{model_name}/{mv.version}"
    text = yaml.safe_dump(doc, sort_keys=False)
    Path(manifest.path).write_text(text)
    try:
        from kubernetes import config as kconfig

        try:
            kconfig.load_incluster_config()
        except kconfig.ConfigException:
            kconfig.load_kube_config()
    except Exception as err:  # no cluster configured: the manifest is the deliverable
        print(f"no Kubernetes cluster configured ({type(err).__name__}); manifest written to {manifest.path}:\n{text}")
        return "written"
    from kubernetes import client, dynamic
    from kubernetes.dynamic.exceptions import NotFoundError

    api = dynamic.DynamicClient(client.ApiClient()).resources.get(
        api_version="serving.kserve.io/v1beta1", kind="InferenceService")
    name = doc["metadata"]["name"]
    try:
        api.get(name=name, namespace=namespace)
    except NotFoundError:
        # The pipeline's RBAC allows get/patch of this one object, not create: kustomize or Helm installs it.
        raise RuntimeError(
            f"InferenceService {name} not found in namespace {namespace}: install it with kustomize or Helm "
            f"(k8s/README.md) before the deploy step points it at {model_name} version {mv.version}"
        ) from None
    # The installed InferenceService keeps its replicas, autoscaling and resources (set by the overlay or the
    # chart): this step owns only the model location and the annotation that names the version.
    body = {
        "apiVersion": doc["apiVersion"], "kind": doc["kind"],
        "metadata": {"name": name, "annotations": {"diaggym/registry-version": f"{model_name}/{mv.version}"}},
        "spec": {"predictor": {"model": {"storageUri": doc["spec"]["predictor"]["model"]["storageUri"]}}},
    }  # fmt: skip
    api.server_side_apply(body=body, namespace=namespace, field_manager="diaggym-deploy", force_conflicts=True)
    print(f"applied InferenceService {name} in {namespace}: {model_name} version {mv.version}")
    return "applied"


@dataclass(frozen=True)
class Components:
    preprocess: object
    base: object
    train: object
    evaluate: object
    register: object
    gate: object
    deploy: object


def make_components(image: str = DEFAULT_IMAGE, packages: list[str] | None = None) -> Components:
    """The components for one base image; ``packages`` (e.g. a wheel or git URL of the project) are pip-installed
    at task start when the image does not already hold the project."""

    def wrap(fn):
        return dsl.component(fn, base_image=image, packages_to_install=list(packages or []),
                             install_kfp_package=False)

    return Components(*(wrap(f) for f in (preprocess, base, train, evaluate, register, gate, deploy)))
