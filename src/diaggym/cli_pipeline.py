"""``diaggym pipeline`` (run --local, compile, submit) and ``diaggym promote``.

The pipeline itself lives at the edge (``pipelines/``, ``components/``: they import kfp); these commands load it
lazily from the repository, as ``diaggym serve`` loads the server, so the core library never imports kfp.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from diaggym.errors import InputError
from diaggym.resources import load_config

ROOT = Path(__file__).resolve().parents[2]  # a checkout: pipelines/ and components/ are not part of the package
# Parameters that name cluster objects the tasks read by reference; empty means a pod that cannot start.
REQUIRED_NAMES = ("mlflow_secret", "mlflow_config_map", "checkpoint_pvc")

pipeline_app = typer.Typer(help="The Kubeflow pipeline: run it locally, compile it, submit it.", no_args_is_help=True)


def _fail(err: Exception | str, code: int = 2) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code)


def _pipeline_module():
    if not (ROOT / "pipelines" / "diaggym_pipeline.py").is_file():
        raise InputError("the pipeline sources (pipelines/, components/) are not beside this installation; "
                         "run from a clone of the repository", ROOT)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import pipelines.diaggym_pipeline as module

    return module


def _params(config: str | None, sets: list[str]) -> dict:
    """Pipeline parameters from a configs/pipeline/*.json file (or path) and KEY=VALUE overrides (JSON values)."""
    params: dict = {}
    if config:
        _, params = load_config("pipeline", config, "pipeline config")
        params.pop("description", None)
    for s in sets:
        key, sep, value = s.partition("=")
        if not sep:
            raise InputError(f"--set expects KEY=VALUE, got {s!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def check_params(pipeline_fn, params: dict) -> dict:
    """Known parameter names only, and no empty Secret/ConfigMap/PVC name; returns the full set with defaults."""
    import inspect

    sig = inspect.signature(pipeline_fn.pipeline_func)
    unknown = set(params) - set(sig.parameters)
    if unknown:
        raise InputError(f"unknown pipeline parameter(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sig.parameters)})")
    full = {k: p.default for k, p in sig.parameters.items()} | params
    for name in REQUIRED_NAMES:
        if not str(full.get(name) or "").strip():
            raise InputError(f"pipeline parameter {name} is empty: the tasks read the cluster object it names "
                             "(by reference), so the run would not start")
    return full


@pipeline_app.command("run")
def run(
    local: Annotated[bool, typer.Option("--local", help="Run with kfp.local.SubprocessRunner in this virtualenv.")],
    config: Annotated[str, typer.Option(help="configs/pipeline/NAME.json (demo, ci) or a JSON file.")] = "demo",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a parameter: KEY=VALUE (JSON).")] = None,
    work: Annotated[Path, typer.Option(help="Folder for task outputs, the checkpoint root and the cache.")] = Path(
        "work/pipeline"
    ),
    cache: Annotated[bool, typer.Option(help="Reuse finished task outputs (kfp's local cache).")] = True,
) -> None:
    """Run the pipeline on this machine: preprocess, base, train, evaluate, register, gate (deploy writes YAML)."""
    if not local:
        _fail("only --local runs here; use `diaggym pipeline submit --host URL` for a Kubeflow cluster")
    from diaggym.training.tracking import tracking_uri

    try:
        module = _pipeline_module()
        fn = module.build()
        params = _params(config, set_ or [])
        work = work.resolve()
        params.setdefault("checkpoint_root", str(work / "checkpoints"))
        full = check_params(fn, params)
        for key in ("data_path", "inference_service"):  # repository paths, whatever the caller's cwd
            if not Path(full[key]).is_absolute() and (ROOT / full[key]).exists():
                params[key] = str(ROOT / full[key])
    except InputError as err:
        _fail(err)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()  # the tasks (subprocesses) inherit it
    import warnings

    from kfp import local as kfp_local

    warnings.filterwarnings("ignore", message=".*non-Python base image.*")  # the project image is a Python image
    kfp_local.init(runner=kfp_local.SubprocessRunner(use_venv=False), pipeline_root=str(work / "outputs"),
                   enable_caching=cache, cache_root=str(work / "cache"))
    typer.echo(f"pipeline {module.PIPELINE_NAME} (local), MLflow {os.environ['MLFLOW_TRACKING_URI']}")
    typer.echo(f"task cache {'on: ' + str(work / 'cache') if cache else 'off (--no-cache)'}; a task runs again when "
               "its inputs or code changed; register, gate and deploy always run (they read the registry's state)")
    t0 = time.time()
    try:
        fn(**params)
    except RuntimeError as err:  # kfp names the failed task; its log is above
        line = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "'gate'" in line:  # the gate's reasons are on the version it refused
            line += f" {_gate_reasons(params.get('model_name', 'diaggym'))}"
        _fail(f"the pipeline failed: {line}", 1)
    typer.echo(f"pipeline finished in {time.time() - t0:.0f} s")
    reports = sorted((work / "outputs").glob("*/evaluate/report"), key=lambda p: p.stat().st_mtime)
    if reports:
        typer.echo(f"Evaluation report: {reports[-1]}")
    uri = os.environ["MLFLOW_TRACKING_URI"]
    typer.echo(f"MLflow UI:         {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {uri}  "
               f"(registry: http://127.0.0.1:5000/#/models/{params.get('model_name', 'diaggym')})")


def _gate_reasons(name: str) -> str:
    from diaggym import registry

    try:
        mv = registry.version_by_alias(registry.connect(), name, registry.CHALLENGER)
    except InputError:
        return ""
    if mv is None:
        return ""
    return f"Version {mv.version} refused: " + "; ".join(json.loads(mv.tags.get("diaggym.gate.reasons", "[]")))


@pipeline_app.command("compile")
def compile_(
    out: Annotated[Path | None, typer.Option(help="Output YAML (default: pipelines/diaggym_pipeline.yaml).")] = None,
    image: Annotated[str | None, typer.Option(help="Base image of every task (default: the project image).")] = None,
    package: Annotated[
        list[str] | None, typer.Option(help="pip requirement installed at task start (e.g. the project's wheel).")
    ] = None,
) -> None:
    """Compile the pipeline to the IR YAML the Kubeflow UI uploads."""
    try:
        module = _pipeline_module()
        check_params(module.build(), {})
        path = module.compile_pipeline(out or module.YAML_PATH, image or module.DEFAULT_IMAGE, package)
    except InputError as err:
        _fail(err)
    typer.echo(f"wrote {path}")


@pipeline_app.command("submit")
def submit(
    host: Annotated[str, typer.Option(help="Kubeflow Pipelines API endpoint, e.g. https://kubeflow.example/pipeline.")],
    config: Annotated[str | None, typer.Option(help="configs/pipeline/NAME.json or a JSON file.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a parameter: KEY=VALUE (JSON).")] = None,
    experiment: Annotated[str, typer.Option(help="Kubeflow experiment.")] = "diaggym",
    version: Annotated[str | None, typer.Option(help="Pipeline version name (default: a timestamp).")] = None,
    service_account: Annotated[
        str, typer.Option(help="Service account of the run's pods (k8s/base/rbac.yaml: deploy may apply the ISVC).")
    ] = "diaggym-pipeline",
) -> None:
    """Upload the compiled pipeline as a new version and start a run with the given parameters."""
    import tempfile

    try:
        module = _pipeline_module()
        params = _params(config, set_ or [])
        check_params(module.build(), params)
    except InputError as err:
        _fail(err)
    import kfp

    client = kfp.Client(host=host)
    with tempfile.TemporaryDirectory() as tmp:
        package = module.compile_pipeline(Path(tmp) / "pipeline.yaml")
        name = version or time.strftime("v%Y%m%d-%H%M%S")
        try:
            pid = client.get_pipeline_id(module.PIPELINE_NAME)
            if pid is None:
                pipeline = client.upload_pipeline(str(package), pipeline_name=module.PIPELINE_NAME)
                pid = pipeline.pipeline_id
            pv = client.upload_pipeline_version(str(package), pipeline_version_name=name, pipeline_id=pid)
            exp = client.create_experiment(experiment)
            run_ = client.run_pipeline(experiment_id=exp.experiment_id, job_name=f"{module.PIPELINE_NAME}-{name}",
                                       params=params, pipeline_id=pid, version_id=pv.pipeline_version_id,
                                       service_account=service_account)
        except Exception as err:  # the kfp client raises many types; one line with the host
            _fail(f"Kubeflow Pipelines at {host}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    typer.echo(f"started run {run_.run_id} of {module.PIPELINE_NAME} version {name} on {host}")


def promote(
    version: Annotated[str | None, typer.Option(help="Registry version to promote.")] = None,
    name: Annotated[str, typer.Option(help="Registered model.")] = "diaggym",
    policy: Annotated[
        str, typer.Option(help="Gate policy (configs/gate/NAME.json or a file); 'none': no gate.")
    ] = "demo",
    rollback: Annotated[bool, typer.Option("--rollback", help="Move @champion back to @previous.")] = False,
) -> None:
    """Promote a registry version to @champion through the gate (as the pipeline does), or roll back."""
    from diaggym import registry

    try:
        if rollback:
            frm, to = registry.rollback(name=name)
            typer.echo(f"{name}: @champion moved back from version {frm} to version {to}")
            return
        if version is None:
            raise InputError("--version is required (or --rollback)")
        pol = None if policy == "none" else registry.load_policy(policy)
        decision = registry.promote(version, name=name, policy=pol)
    except registry.GateRejected as rej:
        _fail(f"{rej} (version {rej.version} is now @challenger)", 1)
    except InputError as err:
        _fail(err)
    typer.echo(f"{name} version {version} is @champion (against {decision.against}; "
               f"{'; '.join(decision.checked)})")
