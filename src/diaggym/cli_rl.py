"""``diaggym rl ...``: the RL environment from the command line (the demo policy that learns, one episode)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from diaggym.errors import InputError

rl_app = typer.Typer(help="RL environment: train the demo policy, play episodes.", no_args_is_help=True)


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


@rl_app.command()
def demo(
    cases: Annotated[Path | None, typer.Option(help="Preprocess output folder (default: the bundled demo cases).")]
    = None,
    simulator_url: Annotated[str | None, typer.Option(
        help="A served simulator (diaggym serve). Default: start one with the marginal engine on 127.0.0.1.")] = None,
    in_process: Annotated[bool, typer.Option(help="Run the marginal engine in this process instead of a server.")]
    = False,
    seeds: Annotated[int, typer.Option(help="Independent training runs (the CI is over these).")] = 3,
    iterations: Annotated[int, typer.Option(help="Policy updates per seed.")] = 30,
    cases_per_iteration: Annotated[int, typer.Option(help="Training cases per update.")] = 8,
    group: Annotated[int, typer.Option(help="Episodes per case (GRPO group).")] = 8,
    lr: Annotated[float, typer.Option(help="Adam step size.")] = 0.3,
    eval_episodes: Annotated[int, typer.Option(help="Evaluation episodes per held-out case.")] = 4,
    workers: Annotated[int, typer.Option(help="Concurrent episodes.")] = 4,
    out: Annotated[Path, typer.Option(help="Folder for result.json and learning.png.")] = Path("work/rl-demo"),
    mlflow: Annotated[bool, typer.Option(help="Log the run to MLflow.")] = True,
) -> None:
    """Train a small softmax policy (which exam next, when to stop, which diagnosis) with GRPO-style group
    advantages against the simulator; report held-out mean reward before/after with a 95% CI over seeds."""
    from diaggym.cases import load_cases
    from diaggym.env.core import DiagEnv, demo_cases_path
    from diaggym.rl.demo import DemoConfig, plot, run_demo

    try:
        case_dir = cases or demo_cases_path()
        all_cases = load_cases(case_dir)
    except InputError as err:
        _fail(err)
    cfg = DemoConfig(seeds=tuple(range(seeds)), iterations=iterations, cases_per_iteration=cases_per_iteration,
                     group=group, lr=lr, eval_episodes_per_case=eval_episodes, workers=workers)
    server = None
    url = simulator_url
    if url is None and not in_process:
        from diaggym.testing import diaggym_serve

        out.mkdir(parents=True, exist_ok=True)
        server, url = diaggym_serve(["--engine", "marginal", "--cases", str(case_dir)], out / "simulator.log")
        server.wait_ready(f"{url}/v2/health/ready", timeout=180)
        typer.echo(f"simulator: marginal engine served at {url} (pid {server.proc.pid})")
    run = None
    try:
        log_metric = None
        if mlflow:
            import mlflow as mlf

            from diaggym.training.tracking import ensure_experiment, git_commit, tracking_uri

            mlf.set_tracking_uri(tracking_uri())
            run = mlf.start_run(experiment_id=ensure_experiment("diaggym-rl-demo"))
            mlf.log_params({k: v for k, v in vars(cfg).items() if k != "extra"} | {
                "simulator": url or "in-process marginal", "cases": str(case_dir)})
            mlf.set_tag("git_commit", git_commit() or "unknown")

            def log_metric(name: str, value: float, step: int) -> None:
                mlf.log_metric(name.replace("/", "_"), value, step=step)

        started = time.perf_counter()
        result = run_demo(cfg, all_cases, lambda: DiagEnv(cases=all_cases, split=None, simulator_url=url),
                          log_metric)
        result["simulator"] = url or "in-process marginal engine"
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=1))
        plot(result, out / "learning.png")
        if run is not None:
            import mlflow as mlf

            d = result["delta"]
            mlf.log_metrics({"heldout_before": result["before_mean"], "heldout_after": result["after_mean"],
                             "heldout_delta": d["mean"], "heldout_delta_ci_low": d["ci95"][0],
                             "heldout_delta_ci_high": d["ci95"][1],
                             "random_agent": result["random_agent"]["mean_reward"],
                             "rule_agent": result["rule_agent"]["mean_reward"]})
            mlf.log_artifact(str(out / "result.json"))
            mlf.log_artifact(str(out / "learning.png"))
            result["mlflow_run_id"] = run.info.run_id
            (out / "result.json").write_text(json.dumps(result, indent=1))
    finally:
        if run is not None:
            import mlflow as mlf

            mlf.end_run()
        if server is not None:
            server.stop()
    d = result["delta"]
    typer.echo(f"held-out mean reward: before {result['before_mean']:.3f}, after {result['after_mean']:.3f}; "
               f"rise {d['mean']:.3f} (95% CI {d['ci95'][0]:.3f} .. {d['ci95'][1]:.3f}) over {len(cfg.seeds)} seeds")
    typer.echo(f"baselines: random {result['random_agent']['mean_reward']:.3f}, "
               f"rule-based {result['rule_agent']['mean_reward']:.3f}")
    typer.echo(f"wrote {out / 'result.json'} and {out / 'learning.png'}"
               + (f"; MLflow run {result.get('mlflow_run_id')}" if mlflow else ""))
    if os.environ.get("DIAGGYM_RL_DEMO_REQUIRE_RISE") and not d["excludes_zero"]:
        raise typer.Exit(1)


@rl_app.command("env-server")
def env_server(
    cases: Annotated[Path | None, typer.Option(help="Preprocess output folder (default: the bundled demo cases).")]
    = None,
    split: Annotated[str | None, typer.Option(help="Split episodes are drawn from ('' = all).")] = "test",
    simulator_url: Annotated[str | None, typer.Option(
        help="A served simulator (diaggym serve); default: the marginal engine in-process.")] = None,
    max_turns: Annotated[int, typer.Option(help="Turn limit per episode.")] = 12,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    max_sessions: Annotated[int, typer.Option(help="Most concurrent WebSocket sessions.")] = 64,
) -> None:
    """Serve episodes over OpenEnv (WebSocket sessions at /ws; client: diaggym.env.adapters.openenv)."""
    import uvicorn

    from diaggym.env.adapters.openenv import create_app
    from diaggym.env.core import EnvConfig

    try:
        app = create_app(EnvConfig(cases=str(cases) if cases else None, split=split or None,
                                   simulator_url=simulator_url, max_turns=max_turns), max_sessions)
    except InputError as err:
        _fail(err)
    uvicorn.run(app, host=host, port=port, log_level="warning")
