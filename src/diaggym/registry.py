"""The MLflow model registry: register a trained checkpoint, gate it, move aliases, resolve ``models:/`` URIs.

A registered model (``diaggym`` by default) has one version per training run.  A version carries tags that make
it traceable (dataset hash, git commit, training config, pipeline run id, the MLflow training run) and the
figures the gate decides on: ``metric.<name>`` for the candidate's own figures and, in ``diaggym.eval.others``,
the figures of everything evaluated beside it on the same split and seeds (the baselines, and the champion
re-evaluated when there was one).  Aliases replace the deprecated stages:

* ``champion``: what is served (``models:/diaggym@champion``);
* ``previous``: the champion before the last promotion (``rollback`` moves ``champion`` back to it);
* ``challenger``: the latest version the gate refused.

The gate policy is a JSON file (``configs/gate/*.json``): absolute floors (``always``), rules against the
champion (``vs_champion``) and, for the first model, rules against the baselines (``first_model``).  Every
decision and each of its reasons is written to the version (tags and description) before anything else
happens, so a refused version says why in the registry UI.

This module never imports kfp, kserve or kubernetes: the pipeline components and the server call into it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diaggym.errors import InputError
from diaggym.resources import load_config

MODEL_NAME = "diaggym"
CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
# Figures of the training run the gate may use besides the evaluation table's (report.TABLE keys).
TRAIN_METRICS = ("val_loss_after", "val_loss_before", "train_loss")
OTHERS_TAG = "diaggym.eval.others"
FINGERPRINT_TAG = "diaggym.eval.fingerprint"


class RegistryError(InputError):
    """The registry cannot do what was asked (server down, no such version, no champion...): one clear line."""


class GateRejected(Exception):
    """The gate refused the candidate; ``reasons`` are the failed rules, already recorded on the version."""

    def __init__(self, version: str, reasons: list[str]) -> None:
        self.version = version
        self.reasons = reasons
        super().__init__(f"gate refused version {version}: " + "; ".join(reasons))


# ------------------------------------------------------------------------------------------------ connection


def tracking_uri() -> str:
    from diaggym.training.tracking import tracking_uri as uri

    return uri()


def connect(uri: str | None = None, attempts: int = 3, wait_s: float = 1.0):
    """An ``MlflowClient`` for ``uri`` (default: ``MLFLOW_TRACKING_URI`` or ``work/mlflow.db``), checked reachable.

    MLflow's own HTTP retries back off for minutes before failing; for a server that is down we want one clear
    line naming the URI after a few seconds, so the client's retries are bounded and the server is probed first.
    """
    import mlflow
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        import httpx

        last = ""
        for i in range(attempts):
            try:
                r = httpx.get(uri.rstrip("/") + "/health", timeout=5)
                if r.status_code == 200:
                    break
                last = f"HTTP {r.status_code} from /health"
            except httpx.HTTPError as err:
                last = f"{type(err).__name__}: {err}"
            if i + 1 < attempts:
                time.sleep(wait_s * 2**i)
        else:
            raise RegistryError(f"MLflow tracking server {uri} is not reachable after {attempts} attempts ({last})")
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _versions(client, name: str, filter_extra: str = "") -> list:
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{name}'" + filter_extra)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code):
            return []
        raise
    return sorted(found, key=lambda v: int(v.version))


def version_by_alias(client, name: str, alias: str):
    """The version an alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def get_version(client, name: str, version: str | int):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"registered model {name!r} has no version {version}") from None


# ------------------------------------------------------------------------------------------------ registering


def eval_fingerprint(doc: dict, dataset_hash: str | None) -> str:
    """What must be equal for two evaluations' figures to be compared: data, split and sampling settings."""
    import hashlib

    key = json.dumps({"data": dataset_hash, "split": doc.get("split"), "settings": doc.get("settings")},
                     sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _gate_metrics() -> set[str]:
    from diaggym.evaluation.report import TABLE

    return {k for k, _, _ in TABLE} | set(TRAIN_METRICS) | {"num_var_real", "text_diversity_real"}


def figures(eval_doc: dict | None, train_summary: dict | None) -> tuple[dict, dict]:
    """(candidate figures, {other engine: figures}) from an evaluation's metrics.json and a training summary."""
    keep = _gate_metrics()

    def clean(m: dict) -> dict:
        return {k: round(float(v), 6) for k, v in m.items() if k in keep and isinstance(v, int | float) and v == v}

    own: dict = {}
    others: dict = {}
    for engine, rep in ((eval_doc or {}).get("engines") or {}).items():
        if engine == "candidate":
            own.update(clean(rep.get("metrics", {})))
        else:
            others[engine] = clean(rep.get("metrics", {}))
    own.update(clean({k: (train_summary or {}).get(k) for k in TRAIN_METRICS}))
    return own, others


def register(
    run_id: str,
    eval_doc: dict | None,
    *,
    name: str = MODEL_NAME,
    train_summary: dict | None = None,
    pipeline_run_id: str = "",
    training_config: str = "",
    client=None,
) -> tuple[Any, bool]:
    """Register the ``model`` artifact of training run ``run_id`` as a version; returns (version, created).

    Idempotent: a second call for the same training run returns the version already registered for it (a
    re-run pipeline does not add a version).  Nothing is registered when the run has no model artifact or there
    are no figures to gate on.
    """
    from mlflow.exceptions import MlflowException

    client = client or connect()
    existing = _versions(client, name, f" and run_id='{run_id}'")
    if existing:
        return existing[0], False
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RegistryError(f"no MLflow run {run_id} in {client.tracking_uri}") from None
    names = {Path(f.path).name for f in client.list_artifacts(run_id, "model")}
    if "config.json" not in names:
        raise RegistryError(f"training run {run_id} has no model artifact (model/config.json): nothing registered")
    own, others = figures(eval_doc, train_summary)
    if not own:
        raise RegistryError(f"training run {run_id}: no evaluation or training figures to register: nothing registered")
    t = run.data.tags
    dataset_hash = t.get("diaggym.dataset_hash", "")
    tags = {
        "diaggym.dataset_hash": dataset_hash,
        "diaggym.git_commit": t.get("diaggym.git_commit", "unknown"),
        "diaggym.training_config": training_config or t.get("diaggym.config", ""),
        "diaggym.pipeline_run_id": pipeline_run_id,
        "diaggym.training_run": run_id,
        **{f"metric.{k}": str(v) for k, v in sorted(own.items())},
    }
    if eval_doc:
        tags[OTHERS_TAG] = json.dumps(others, sort_keys=True)
        tags[FINGERPRINT_TAG] = eval_fingerprint(eval_doc, dataset_hash)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="DiagGym world model (EHR exam-result simulator)")
    mv = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/model", run_id=run_id, tags=tags,
        description=f"training run {run_id}; config {tags['diaggym.training_config'] or '?'}; data {dataset_hash[:12]}",
    )
    return mv, True


def version_figures(mv) -> dict:
    """The ``metric.*`` tags of a version as floats (empty when it was registered without figures)."""
    out = {}
    for k, v in mv.tags.items():
        if k.startswith("metric."):
            try:
                out[k.removeprefix("metric.")] = float(v)
            except ValueError:
                continue
    return out


# ------------------------------------------------------------------------------------------------ the policy


@dataclass
class Rule:
    metric: str
    vs: str | None = None  # "champion", a baseline's engine name, or None (an absolute floor/ceiling)
    direction: str = "higher"  # higher, lower, closer_to_real
    margin: float = 0.0  # how much better than ``vs`` (negative: how much worse is tolerated)
    at_least: float | None = None
    at_most: float | None = None

    def describe(self) -> str:
        if self.vs is None:
            bound = f">= {self.at_least}" if self.at_least is not None else f"<= {self.at_most}"
            return f"{self.metric} {bound}"
        return f"{self.metric} {self.direction} than {self.vs} by {self.margin:+g}"


@dataclass
class Policy:
    name: str
    description: str = ""
    always: list[Rule] = field(default_factory=list)
    vs_champion: list[Rule] = field(default_factory=list)
    first_model: list[Rule] = field(default_factory=list)


def load_policy(path_or_name: str | Path) -> Policy:
    """A gate policy from a JSON file or a name in ``configs/gate/``; unknown metrics or keys are input errors."""
    p, data = load_config("gate", path_or_name, "gate policy")
    unknown = set(data) - {"description", "always", "vs_champion", "first_model"}
    if unknown:
        raise InputError(f"unknown gate policy section(s) {', '.join(sorted(unknown))}", p)
    known = _gate_metrics()
    policy = Policy(name=p.stem, description=data.get("description", ""))
    for section in ("always", "vs_champion", "first_model"):
        for i, raw in enumerate(data.get(section, [])):
            where = f"{section}[{i}]"
            try:
                rule = Rule(**raw)
            except TypeError as err:
                raise InputError(f"{where}: {err}", p) from None
            if rule.metric not in known:
                raise InputError(f"{where}: unknown metric {rule.metric!r} (known: {', '.join(sorted(known))})", p)
            if rule.direction not in ("higher", "lower", "closer_to_real"):
                raise InputError(f"{where}: direction must be higher, lower or closer_to_real", p)
            if section == "vs_champion":
                if rule.vs not in (None, CHAMPION):
                    raise InputError(f"{where}: a vs_champion rule compares with the champion (leave out 'vs')", p)
                rule.vs = CHAMPION
            if section == "always" and (rule.vs is not None or (rule.at_least is None and rule.at_most is None)):
                raise InputError(f"{where}: an 'always' rule is a floor or ceiling (at_least / at_most, no vs)", p)
            if section != "always" and rule.vs is None:
                raise InputError(f"{where}: a comparison rule needs 'vs'", p)
            getattr(policy, section).append(rule)
    return policy


def _check(rule: Rule, own: dict, other: dict | None, real: float | None) -> str | None:
    """None when the rule holds, else the reason (with both figures)."""
    mine = own.get(rule.metric)
    if mine is None:
        return f"{rule.describe()}: the candidate has no {rule.metric}"
    if rule.vs is None:
        if rule.at_least is not None and mine < rule.at_least:
            return f"{rule.metric} {mine:.4g} < {rule.at_least:g}"
        if rule.at_most is not None and mine > rule.at_most:
            return f"{rule.metric} {mine:.4g} > {rule.at_most:g}"
        return None
    theirs = (other or {}).get(rule.metric)
    if theirs is None:
        return f"{rule.describe()}: {rule.vs} has no {rule.metric} in the same evaluation"
    if rule.direction == "higher":
        ok, a, b = mine >= theirs + rule.margin, mine, theirs
    elif rule.direction == "lower":
        ok, a, b = mine <= theirs - rule.margin, mine, theirs
    else:
        if real is None:
            return f"{rule.describe()}: no real-data figure to compare with"
        a, b = abs(mine - real), abs(theirs - real)
        ok = a <= b - rule.margin
    return None if ok else f"{rule.describe()}: {a:.4g} vs {b:.4g}"


@dataclass
class Decision:
    passed: bool
    reasons: list[str]  # failed rules (empty when passed)
    checked: list[str]  # every rule applied, for the record
    against: str  # "champion vN" or "baselines (first model)"


def decide(policy: Policy, own: dict, others: dict, champion: dict | None, champion_label: str = CHAMPION) -> Decision:
    """Apply ``policy`` to the candidate's figures ``own``; ``champion`` None means there is no champion yet."""
    reasons: list[str] = []
    checked: list[str] = []
    comparisons = policy.vs_champion if champion is not None else policy.first_model
    for rule in policy.always + comparisons:
        other = champion if rule.vs == CHAMPION else others.get(rule.vs) if rule.vs else None
        if rule.vs and rule.vs != CHAMPION and rule.vs not in others:
            reason = f"{rule.describe()}: baseline {rule.vs!r} was not evaluated beside the candidate"
        else:
            real_key = {"num_var": "num_var_real", "text_diversity": "text_diversity_real"}.get(rule.metric, "")
            reason = _check(rule, own, other, own.get(real_key))
        checked.append(rule.describe())
        if reason:
            reasons.append(reason)
    against = champion_label if champion is not None else "baselines (first model)"
    return Decision(not reasons, reasons, checked, against)


# ------------------------------------------------------------------------------------------------ gate and aliases


def _record(client, name: str, version: str, decision: Decision, policy: str) -> None:
    """Write the decision onto the version before any alias moves (so every outcome is explained)."""
    client.set_model_version_tag(name, version, "diaggym.gate.decision", "passed" if decision.passed else "rejected")
    client.set_model_version_tag(name, version, "diaggym.gate.policy", policy)
    client.set_model_version_tag(name, version, "diaggym.gate.against", decision.against)
    client.set_model_version_tag(name, version, "diaggym.gate.reasons", json.dumps(decision.reasons)[:4900])
    client.set_model_version_tag(name, version, "diaggym.gate.time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    text = (f"Gate ({policy}) against {decision.against}: " + ("PASSED" if decision.passed else "REJECTED")
            + "".join(f"\n- {r}" for r in decision.reasons or ["all rules hold: " + "; ".join(decision.checked)]))
    client.update_model_version(name, version, description=text)


def gate(version: str | int, policy: Policy, *, name: str = MODEL_NAME, client=None) -> Decision:
    """Decide on ``version`` against the current champion (or the baselines for the first model) and move aliases.

    Pass: ``champion`` moves to it (the old champion becomes ``previous``).  Reject: it becomes ``challenger`` and
    :class:`GateRejected` is raised with the reasons, already recorded on the version.
    """
    client = client or connect()
    mv = get_version(client, name, version)
    own = version_figures(mv)
    if not own:
        raise RegistryError(f"version {mv.version} of {name!r} has no metric.* figures: register it with its "
                            "evaluation before gating")
    others = json.loads(mv.tags.get(OTHERS_TAG, "{}"))
    current = version_by_alias(client, name, CHAMPION)
    champion = label = None
    if current is not None and current.version == mv.version:  # a re-run after the promotion: nothing to move
        return Decision(True, [], ["already the champion"], f"champion v{current.version} (itself)")
    if current is not None:
        label = f"champion v{current.version}"
        registered = version_figures(current)
        # Held-out losses compare when both models were trained on the same dataset (same val split).
        same_data = current.tags.get("diaggym.dataset_hash") == mv.tags.get("diaggym.dataset_hash")
        champion = {k: v for k, v in registered.items() if same_data and k in TRAIN_METRICS}
        if CHAMPION in others:  # re-evaluated beside the candidate: same split, seeds and settings
            champion.update(others[CHAMPION])
        elif current.tags.get(FINGERPRINT_TAG) and current.tags.get(FINGERPRINT_TAG) == mv.tags.get(FINGERPRINT_TAG):
            champion.update(registered)
        else:
            label += " (registered figures only: not evaluated beside the candidate)"
    decision = decide(policy, own, others, champion, label or CHAMPION)
    _record(client, name, mv.version, decision, policy.name)
    if not decision.passed:
        client.set_registered_model_alias(name, CHALLENGER, mv.version)
        raise GateRejected(str(mv.version), decision.reasons)
    _move_champion(client, name, mv.version, current)
    return decision


def _move_champion(client, name: str, version: str, current) -> None:
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    challenger = version_by_alias(client, name, CHALLENGER)
    if challenger is not None and challenger.version == version:
        client.delete_registered_model_alias(name, CHALLENGER)


def promote(version: str | int, *, name: str = MODEL_NAME, policy: Policy | None = None, client=None) -> Decision:
    """By hand: with a policy, the same gate as the pipeline's; without one, an unconditional move (recorded)."""
    client = client or connect()
    if policy is not None:
        return gate(version, policy, name=name, client=client)
    mv = get_version(client, name, version)
    current = version_by_alias(client, name, CHAMPION)
    if current is not None and current.version == mv.version:
        return Decision(True, [], ["already the champion"], f"champion v{current.version} (itself)")
    decision = Decision(True, [], ["promoted by hand without a policy"], f"champion v{current.version}" if current
                        else "nothing (first champion)")
    _record(client, name, mv.version, decision, "manual")
    _move_champion(client, name, mv.version, current)
    return decision


def rollback(*, name: str = MODEL_NAME, client=None) -> tuple[str, str]:
    """Move ``champion`` back to ``previous``; returns (from version, to version)."""
    client = client or connect()
    current = version_by_alias(client, name, CHAMPION)
    prev = version_by_alias(client, name, PREVIOUS)
    if current is None:
        raise RegistryError(f"registered model {name!r} has no champion to roll back")
    if prev is None:
        raise RegistryError(f"registered model {name!r} has no previous champion (alias @{PREVIOUS}) to roll back to")
    client.set_registered_model_alias(name, CHAMPION, prev.version)
    client.delete_registered_model_alias(name, PREVIOUS)
    client.set_model_version_tag(name, current.version, "diaggym.rolled_back",
                                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return str(current.version), str(prev.version)


# ------------------------------------------------------------------------------------------------ resolving


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` → (name, alias, version)."""
    if not uri.startswith("models:/"):
        raise InputError(f"not a registry URI: {uri!r} (expected models:/NAME@ALIAS or models:/NAME/VERSION)")
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.split("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise InputError(f"not a registry URI: {uri!r} (expected models:/NAME@ALIAS or models:/NAME/VERSION)")


def find(uri: str, client=None):
    """The model version a ``models:/`` URI names (one clear error when the alias or version does not exist)."""
    name, alias, version = parse_models_uri(uri)
    client = client or connect()
    if alias:
        mv = version_by_alias(client, name, alias)
        if mv is None:
            what = "no champion yet (run the pipeline or `diaggym promote`)" if alias == CHAMPION else "no such alias"
            raise RegistryError(f"{uri}: registered model {name!r} has {what}")
        return mv
    return get_version(client, name, version)  # type: ignore[arg-type]


def describe(mv, alias: str | None = None) -> dict:
    """What a server reports about the registry version it serves."""
    return {
        "name": mv.name,
        "version": str(mv.version),
        "alias": alias,
        "run_id": mv.run_id,
        "source": mv.source,
        "dataset_hash": mv.tags.get("diaggym.dataset_hash"),
        "git_commit": mv.tags.get("diaggym.git_commit"),
    }


def download(uri: str, cache: str | Path | None = None, client=None) -> tuple[Path, dict]:
    """Fetch the version a ``models:/`` URI names into ``cache/NAME/vN`` (reused when complete); (folder, info)."""
    import mlflow

    from diaggym.atomic import atomic_dir

    client = client or connect()
    mv = find(uri, client)
    _, alias, _ = parse_models_uri(uri)
    from diaggym.training.tracking import WORK_DIR

    dest = Path(cache or WORK_DIR / "models") / mv.name / f"v{mv.version}"
    info = describe(mv, alias)
    if not (dest / "config.json").is_file():
        with atomic_dir(dest) as tmp:
            mlflow.artifacts.download_artifacts(
                artifact_uri=mv.source, dst_path=str(tmp), tracking_uri=client.tracking_uri
            )
            inner = tmp / Path(mv.source.rstrip("/")).name
            if (inner / "config.json").is_file():  # download_artifacts keeps the source folder's name
                for p in inner.iterdir():
                    p.rename(tmp / p.name)
                inner.rmdir()
            if not (tmp / "config.json").is_file():
                raise RegistryError(f"{uri} (version {mv.version}, {mv.source}) holds no model (config.json)")
    (dest / "registry.json").write_text(json.dumps(info, indent=2) + "\n")
    return dest, info


def storage_uri(source: str, artifact_store: str) -> str:
    """The object-store URI KServe's storage initializer can read for a version's ``source``.

    A server that proxies artifacts (``mlflow server --artifacts-destination s3://B``) records sources as
    ``mlflow-artifacts:/PATH``, which only MLflow understands; they live at ``s3://B/PATH``.
    """
    if source.startswith("mlflow-artifacts:"):
        if not artifact_store:
            raise InputError(f"version source {source} is proxied by the MLflow server: pass the artifact store "
                             "(the server's --artifacts-destination, e.g. s3://mlflow-artifacts)")
        return artifact_store.rstrip("/") + "/" + source.removeprefix("mlflow-artifacts:").lstrip("/")
    return source
