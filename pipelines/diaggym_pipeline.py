"""The ``diaggym-train-eval-promote`` pipeline: preprocess -> base -> train -> evaluate -> register -> gate -> deploy.

One pipeline function serves both routes: compiled to ``pipelines/diaggym_pipeline.yaml`` for the Kubeflow UI, and
run by ``kfp.local.SubprocessRunner`` on the bundled data (``diaggym pipeline run --local``).  The train task's
Kubernetes settings (GPUs, node pool, /dev/shm, checkpoint volume, MLflow Secret/ConfigMap) are kfp-kubernetes
platform config: the local runner ignores them, the cluster applies them.
"""

import sys
from pathlib import Path

from kfp import compiler, dsl, kubernetes

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # components/ sits beside pipelines/ in the repository (not an installed package)
    sys.path.insert(0, str(ROOT))

from components.diaggym_components import DEFAULT_IMAGE, make_components  # noqa: E402

PIPELINE_NAME = "diaggym-train-eval-promote"
YAML_PATH = ROOT / "pipelines" / "diaggym_pipeline.yaml"
CHECKPOINT_MOUNT = "/mnt/checkpoints"
# Keys the MLflow tasks read from the Secret and ConfigMap (by reference: values never enter the spec). The cluster's
# MLflow server proxies artifacts (k8s/base/mlflow), so the tasks need its URI and, when it requires auth, its
# credentials: the Secret is optional (a server without auth needs none), the ConfigMap is not.
SECRET_KEYS = {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
               "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}
CONFIG_KEYS = {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"}
# Tasks that talk to MLflow get the same references.
MLFLOW_TASKS = ("train", "evaluate", "register", "gate", "deploy")


def build(image: str = DEFAULT_IMAGE, packages: list[str] | None = None):
    """The pipeline function for one image and package source."""
    c = make_components(image, packages)

    @dsl.pipeline(name=PIPELINE_NAME, description="Train the DiagGym world model, evaluate it beside the baselines, "
                  "register it in MLflow, promote it through the gate and deploy the champion to KServe.")
    def diaggym_pipeline(
        data_source: str = "mimic-iv",
        data_path: str = "data/mimic-iv-demo",
        training_config: str = "local",
        base_model: str = "tiny",
        max_steps: int = -1,
        seed: int = 0,
        eval_max_cases: int = 4,
        eval_max_exams: int = 8,
        eval_exam_samples: int = 1,
        eval_max_tokens: int = 1024,
        eval_top_p: float = 1.0,
        eval_exam_types: int = 10,
        eval_embeddings: bool = True,
        model_name: str = "diaggym",
        gate_policy: str = "demo",
        fail_on_reject: bool = True,
        checkpoint_root: str = CHECKPOINT_MOUNT,
        checkpoint_pvc: str = "diaggym-checkpoints",
        gpu_resource: str = "nvidia.com/gpu",
        gpu_count: int = 8,
        num_nodes: int = 1,
        gpu_node_selector: dict = {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"},  # noqa: B006
        gpu_tolerations: list = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],  # noqa: B006
        mlflow_secret: str = "mlflow-credentials",
        mlflow_config_map: str = "mlflow-config",
        serving_namespace: str = "diaggym",
        artifact_store: str = "s3://mlflow-artifacts",
        inference_service: str = "k8s/base/serving/inferenceservice.yaml",
    ):
        """Parameters (shown in the Kubeflow UI's run form):

        data_source: 'mimic-iv' (MIMIC-IV layout folder) or 'agentclinic' (JSONL).
        data_path: where the records are, as the task sees it (the image's bundled demo by default).
        training_config: preset in configs/train/ (quick, local, reference) or a JSON path.
        base_model: tiny / local / small (a local base built from the cases) or a model folder path.
        max_steps: optimizer steps; -1 keeps the training config's epochs.
        seed: seed of the local base, the baselines and the evaluation sampling.
        eval_max_cases, eval_max_exams, eval_exam_samples, eval_max_tokens, eval_top_p, eval_exam_types: the
            evaluation sample and sampling (the gate compares candidate and champion on exactly this sample).
        eval_embeddings: score text results with the bundled sentence-embedding model (off: counted as skipped).
        model_name: registered model in MLflow.
        gate_policy: policy in configs/gate/ (demo, reference) or a JSON path.
        fail_on_reject: fail the run when the gate refuses the candidate (it is then @challenger).
        checkpoint_root, checkpoint_pvc: where the train task keeps its run folder (a PVC, so a preempted pod
            resumes from the last checkpoint).
        gpu_resource, gpu_count, gpu_node_selector, gpu_tolerations: the train task's accelerators and node pool.
        num_nodes: more than 1 runs training as a Kubeflow Trainer TrainJob (runtime torch-distributed) of that
            many nodes with gpu_count GPUs each; the runtime must mount checkpoint_pvc at the same path.
        mlflow_secret, mlflow_config_map: names of the Secret (credentials) and ConfigMap (tracking URI, S3
            endpoint) the MLflow tasks read, by reference.
        serving_namespace, artifact_store, inference_service: where deploy applies the InferenceService, the
            object store behind the MLflow server's proxied artifacts, and the manifest template.
        """
        pre = c.preprocess(source=data_source, data_path=data_path).set_display_name("preprocess")
        base = c.base(base_model=base_model, seed=seed, cases=pre.outputs["cases"]).set_display_name("base")
        train = c.train(cases=pre.outputs["cases"], base=base.outputs["model"], config=training_config,
                        max_steps=max_steps, checkpoint_root=checkpoint_root, num_nodes=num_nodes,
                        gpus_per_node=gpu_count, gpu_resource=gpu_resource, trainer_image=image,
                        mlflow_secret=mlflow_secret, mlflow_config_map=mlflow_config_map).set_display_name("train")
        train.set_accelerator_type(gpu_resource).set_accelerator_limit(gpu_count)
        train.set_cpu_request("8").set_memory_request("64Gi")
        kubernetes.add_node_selector_json(train, gpu_node_selector)
        kubernetes.add_toleration_json(train, gpu_tolerations)
        kubernetes.empty_dir_mount(train, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
        kubernetes.mount_pvc(train, pvc_name=checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
        ev = c.evaluate(
            cases=pre.outputs["cases"], model=train.outputs["model"], base=base.outputs["model"],
            model_name=model_name, max_cases=eval_max_cases, max_exams=eval_max_exams,
            exam_samples=eval_exam_samples, max_tokens=eval_max_tokens, top_p=eval_top_p,
            exam_types=eval_exam_types, embeddings=eval_embeddings, seed=seed,
        ).set_display_name("evaluate")
        reg = c.register(
            train_run_id=train.outputs["mlflow_run_id"], evaluation=ev.outputs["evaluation"],
            model=train.outputs["model"], model_name=model_name, config=training_config,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).set_display_name("register")
        gate = c.gate(model_name=model_name, version=reg.output, policy=gate_policy,
                      fail_on_reject=fail_on_reject).set_display_name("gate")
        # preprocess, base, train and evaluate are cached on their inputs (a re-run reuses them); these read and
        # write the registry's current state, so they always run (and are idempotent).
        for task in (reg, gate):
            task.set_caching_options(False)
        with dsl.If(gate.output == "passed", name="gate-passed"):
            deploy = c.deploy(model_name=model_name, alias="champion", manifest_template=inference_service,
                              namespace=serving_namespace, artifact_store=artifact_store).set_display_name("deploy")
            deploy.set_caching_options(False)
        for task in (train, ev, reg, gate, deploy):
            kubernetes.use_secret_as_env(task, secret_name=mlflow_secret, secret_key_to_env=SECRET_KEYS, optional=True)
            kubernetes.use_config_map_as_env(task, config_map_name=mlflow_config_map,
                                             config_map_key_to_env=CONFIG_KEYS)

    return diaggym_pipeline


def compile_pipeline(
    path: str | Path = YAML_PATH, image: str = DEFAULT_IMAGE, packages: list[str] | None = None
) -> Path:
    """Write the compiled pipeline spec (IR YAML) that the Kubeflow UI uploads."""
    compiler.Compiler().compile(build(image, packages), package_path=str(path))
    return Path(path)


if __name__ == "__main__":
    print(compile_pipeline())
