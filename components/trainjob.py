"""Multi-node training through Kubeflow Trainer: the train task submits a ``TrainJob`` and waits for it.

With ``num_nodes`` > 1 the train task does not train itself: it creates a ``trainer.kubeflow.org/v1alpha1``
``TrainJob`` on the ``torch-distributed`` runtime that runs the same ``diaggym train`` on every node (torchrun
started by the runtime, ``num_proc_per_node`` GPUs each), writing the same run folder on the shared checkpoint PVC,
then continues as in the single-node case from that folder.  The manifest is validated offline against the
Trainer CRD schema (tests/test_pipeline.py).
"""

import time

API_GROUP, API_VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"


def train_job(
    name: str,
    image: str,
    train_args: list[str],
    num_nodes: int,
    gpus_per_node: int,
    gpu_resource: str = "nvidia.com/gpu",
    runtime: str = "torch-distributed",
    mlflow_secret: str = "mlflow-credentials",
    mlflow_config_map: str = "mlflow-config",
) -> dict:
    """The TrainJob manifest: ``diaggym train ARGS`` on ``num_nodes`` nodes of ``gpus_per_node`` GPUs."""
    env = [
        {"name": "MLFLOW_TRACKING_URI",
         "valueFrom": {"configMapKeyRef": {"name": mlflow_config_map, "key": "MLFLOW_TRACKING_URI"}}},
        *({"name": key, "valueFrom": {"secretKeyRef": {"name": mlflow_secret, "key": key, "optional": True}}}
          for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")),
    ]
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "diaggym"}},
        "spec": {
            "runtimeRef": {"apiGroup": API_GROUP, "kind": "ClusterTrainingRuntime", "name": runtime},
            "trainer": {
                "image": image,
                # The runtime wraps the command in torchrun with the node rank and master address.
                "command": ["python", "-m", "diaggym.cli", "train", *train_args],
                "numNodes": num_nodes,
                "numProcPerNode": gpus_per_node,
                "resourcesPerNode": {
                    "limits": {gpu_resource: gpus_per_node}, "requests": {gpu_resource: gpus_per_node}
                },
                "env": env,
            },
        },
    }


def run_train_job(manifest: dict, namespace: str, timeout_s: float = 7 * 24 * 3600, poll_s: float = 30.0) -> None:
    """Create the TrainJob (or find it from an earlier attempt of this task) and wait until it completes or fails."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.CustomObjectsApi()
    name = manifest["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, manifest)
    except ApiException as err:
        if err.status != 409:  # 409: this task was retried and the job already exists; wait for it
            raise
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = api.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
        for cond in job.get("status", {}).get("conditions", []):
            if cond.get("status") == "True" and cond.get("type") == "Complete":
                return
            if cond.get("status") == "True" and cond.get("type") == "Failed":
                raise RuntimeError(f"TrainJob {namespace}/{name} failed: {cond.get('message', '')}")
        time.sleep(poll_s)
    raise TimeoutError(f"TrainJob {namespace}/{name} did not finish in {timeout_s:.0f} s")
