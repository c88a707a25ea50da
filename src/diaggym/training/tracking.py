"""MLflow tracking for training runs.

Locally the store is a SQLite file in the project's working folder
(``work/mlflow.db``, artifacts in ``work/mlartifacts``); ``MLFLOW_TRACKING_URI``
points runs at a server instead.  A run logs its config as params, the loss
per step, the dataset card, tags that make it traceable (dataset hash, git
commit, base model) and the final checkpoint as an artifact.  A resumed run
continues the same MLflow run (its id is kept in the run folder).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

WORK_DIR = Path(os.environ.get("DIAGGYM_WORK", "work"))


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or the local SQLite store (created on first use)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(WORK_DIR / 'mlflow.db').resolve()}"


def ensure_experiment(name: str) -> str:
    """Experiment id, creating it (with a local artifact folder when the store is local)."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        # A file store: keep artifacts beside the database, not in ./mlruns of whatever the cwd is.
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def git_commit() -> str | None:
    """The commit of the checkout this package runs from (None outside a git checkout): a run's code version."""
    import subprocess

    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class MlflowTracker:
    """Owns one MLflow run for one training run folder."""

    def __init__(self, config, card: dict | None, out: Path) -> None:
        self.config = config
        self.card = card
        self.out = Path(out)
        self.run_id: str | None = None

    def start(self) -> None:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        exp_id = ensure_experiment(self.config.experiment)
        id_file = self.out / "mlflow_run_id"
        resume_id = id_file.read_text().strip() if (self.config.resume and id_file.is_file()) else None
        run = mlflow.start_run(
            run_id=resume_id, experiment_id=None if resume_id else exp_id, run_name=self.config.run_name
        )
        self.run_id = run.info.run_id
        self.out.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run_id + "\n")
        if resume_id is None:
            params = {k: v for k, v in asdict(self.config).items() if k != "extra"}
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            tags = {"diaggym.base": str(self.config.base), "diaggym.git_commit": git_commit() or "unknown"}
            tags.update({f"diaggym.{k}": str(v) for k, v in self.config.extra.items()})
            if self.card:
                tags["diaggym.dataset_hash"] = self.card.get("dataset_hash", "")
                tags["diaggym.dataset_source"] = self.card.get("source", "")
                mlflow.log_dict(self.card, "dataset/card.json")
            mlflow.set_tags(tags)
        else:
            mlflow.set_tag("diaggym.resumed", "true")

    def log_metrics(self, metrics: dict, step: int) -> None:
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and v == v}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def finish(self, summary: dict, final: Path) -> None:
        import mlflow

        for key in ("val_loss_before", "val_loss_after", "train_loss"):
            if key in summary:
                mlflow.log_metric(key, float(summary[key]))
        mlflow.log_dict({k: v for k, v in summary.items() if k != "config"}, "summary.json")
        mlflow.log_artifacts(str(final), artifact_path="model")
        mlflow.end_run()

    def callback(self):
        from transformers import TrainerCallback

        tracker = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                if state.is_world_process_zero and tracker.run_id is None:
                    tracker.start()

            def on_log(self, args, state, control, logs=None, **kw):
                if state.is_world_process_zero and logs:
                    if tracker.run_id is None:
                        tracker.start()
                    tracker.log_metrics(logs, state.global_step)

        return _Callback()
