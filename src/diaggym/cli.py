"""The ``diaggym`` command line.

Each command is a thin shell over the core library; input errors print one
clear line naming the file and the problem and exit with status 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from diaggym import __version__
from diaggym.engines.base import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE
from diaggym.errors import InputError

app = typer.Typer(
    name="diaggym",
    help="DiagGym: build EHR cases, train the world model on them, evaluate it and serve it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _sampling(max_tokens: int, temperature: float, top_p: float | None, seed: int):
    """Sampling options checked before any model is loaded (a bad --top-p is an input error, not a traceback)."""
    from diaggym.engines import SamplingParams

    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    except ValueError as err:
        raise InputError(f"bad sampling option: {err}") from None


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)  # one unwrapped line, so it can be grepped
    raise typer.Exit(2)


@app.callback(invoke_without_command=True)
def _main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit(0)


@app.command()
def preprocess(
    source: Annotated[str, typer.Option(help="Where the records come from: 'mimic-iv' or 'agentclinic'.")],
    input: Annotated[
        Path,
        typer.Option(
            "--input", help="MIMIC-IV layout folder (hosp/, ed/, optional note/), or an AgentClinic JSONL file."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output folder: cases.jsonl, card.json, card.md, plot.")],
    splits: Annotated[str, typer.Option(help="train,val,test ratios (by patient).")] = "0.8,0.1,0.1",
    salt: Annotated[str, typer.Option(help="Salt for the patient hash that picks the split.")] = "",
    parquet: Annotated[bool, typer.Option(help="Also write cases.parquet.")] = False,
    mapping: Annotated[Path | None, typer.Option(help="MIMIC-CDM mappings.json (default: the bundled copy).")] = None,
    window_hours: Annotated[float, typer.Option(help="Keep exams charted this many hours before admission.")] = 24.0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Turn EHR records into versioned cases, a patient-level split and a dataset card."""
    from diaggym.card import summary_lines
    from diaggym.preprocess import preprocess as run
    from diaggym.splits import parse_ratios

    try:
        ratios = parse_ratios(splits)
    except ValueError as err:
        _fail(err)
    try:
        card = run(
            source,
            input,
            out,
            ratios=ratios,
            salt=salt,
            parquet=parquet,
            mapping=mapping,
            window_hours=window_hours,
            progress=progress and sys.stderr.isatty(),
        )
    except InputError as err:
        _fail(err)
    for line in summary_lines(card):
        typer.echo(line)
    typer.echo(f"wrote {out}/cases.jsonl, card.json, card.md (dataset hash {card['dataset_hash'][:12]})")


@app.command()
def validate(
    path: Annotated[Path, typer.Argument(help="cases.jsonl, cases.parquet or a preprocess output folder.")],
) -> None:
    """Check every case against the schema and the diaggym-v1 round trip."""
    from diaggym.cases import load_cases
    from diaggym.serialization import parse_result, render_result

    try:
        cases = load_cases(path)
    except InputError as err:
        _fail(err)
    bad = 0
    for c in cases:
        for e in c.exams:
            if e.items is not None and parse_result(render_result(e), e.name).items != [
                it.model_copy(update={"flag": None}) for it in e.items
            ]:
                bad += 1
                typer.echo(f"round trip differs: {c.case_id} / {e.name}", err=True)
    typer.echo(f"{len(cases)} cases valid; {bad} lab exams failed the round trip")
    raise typer.Exit(1 if bad else 0)


@app.command()
def show(
    path: Annotated[Path, typer.Argument(help="cases.jsonl or a preprocess output folder.")],
    case_id: Annotated[str | None, typer.Option(help="Case to show (default: the first).")] = None,
    step: Annotated[
        int | None, typer.Option(help="Print the prompt of this step instead of the training text.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the case as JSON.")] = False,
) -> None:
    """Print a case as the world model sees it (diaggym-v1 text)."""
    from diaggym.cases import load_cases
    from diaggym.serialization import case_prompts, training_text

    try:
        cases = load_cases(path)
    except InputError as err:
        _fail(err)
    chosen = next((c for c in cases if case_id is None or c.case_id == case_id), None)
    if chosen is None:
        _fail(InputError(f"no case with id {case_id!r}", path))
    assert chosen is not None
    if as_json:
        typer.echo(json.dumps(chosen.to_dict(), indent=2, ensure_ascii=False))
    elif step is not None:
        prompts = case_prompts(chosen)
        if not 0 <= step < len(prompts):
            _fail(InputError(f"step must be in 0..{len(prompts) - 1}", path))
        typer.echo(prompts[step])
    else:
        context, target = training_text(chosen, "<|endoftext|>")
        typer.echo(context + target)


@app.command("scale-up")
def scale_up(
    input: Annotated[Path, typer.Option("--input", help="MIMIC-IV layout folder to copy (e.g. the demo).")],
    out: Annotated[Path, typer.Option(help="Output folder (same layout).")],
    factor: Annotated[int, typer.Option(min=1, help="How many copies of every patient.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed for the per-copy time shifts.")] = 0,
) -> None:
    """Write a synthetic MIMIC-IV layout folder FACTOR times the input (benchmarks)."""
    from diaggym.synthetic import scale_up as run

    try:
        summary = run(input, out, factor=factor, seed=seed, progress=sys.stderr.isatty())
    except InputError as err:
        _fail(err)
    typer.echo(json.dumps(summary, indent=2, default=str))


base_app = typer.Typer(
    help="Local base models (tokenizer + randomly initialised Qwen2), built from the cases.", no_args_is_help=True
)
app.add_typer(base_app, name="base")


@base_app.command("init")
def base_init(
    cases: Annotated[Path, typer.Option(help="Preprocess output folder (its train split trains the tokenizer).")],
    out: Annotated[Path, typer.Option(help="Folder for the base model (save_pretrained layout).")],
    preset: Annotated[str, typer.Option(help="Model size: tiny (1.5 M params), local (4.2 M), small (28 M).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed for the tokenizer's case order and the initial weights.")] = 0,
) -> None:
    """Train a byte-level BPE tokenizer (single-digit numbers, <SEP> added) and write a random Qwen2 base."""
    from diaggym.cases import load_cases
    from diaggym.model.base import init_base

    try:
        info = init_base(load_cases(cases, split="train"), out, preset=preset, seed=seed)
    except InputError as err:
        _fail(err)
    typer.echo(f"wrote {out}: {info['parameters']:,} parameters, vocabulary {info['vocab']} (preset {preset})")


@app.command()
def train(
    cases: Annotated[Path | None, typer.Option(help="Preprocess output folder (train/val splits, card.json).")] = None,
    base: Annotated[
        Path | None, typer.Option(help="Base model folder (a local base or e.g. Qwen2.5-7B-Instruct).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder: checkpoints and final/.")] = None,
    config: Annotated[
        str | None, typer.Option(help="JSON config file or preset name in configs/train/ (local, reference).")
    ] = "local",
    epochs: Annotated[float | None, typer.Option(help="Epochs.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides epochs when > 0).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    schedule: Annotated[str | None, typer.Option(help="LR schedule (cosine, linear, constant...).")] = None,
    warmup: Annotated[float | None, typer.Option(help="Warmup: ratio of steps if < 1, else steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Per-device batch size.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Gradient accumulation steps.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Max tokens per case (keeps the last tokens).")] = None,
    bf16: Annotated[bool | None, typer.Option(help="bf16 mixed precision.")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(help="Gradient checkpointing.")] = None,
    deepspeed: Annotated[
        str | None, typer.Option(help="DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json).")
    ] = None,
    save_steps: Annotated[int | None, typer.Option(help="Checkpoint every N optimizer steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in --out.")] = False,
    mlflow: Annotated[
        bool, typer.Option(help="Track the run in MLflow (MLFLOW_TRACKING_URI or work/mlflow.db).")
    ] = True,
    run_name: Annotated[str | None, typer.Option(help="MLflow run name.")] = None,
) -> None:
    """Fine-tune the world model on serialized cases (HF Trainer; DeepSpeed with --deepspeed)."""
    from diaggym.training.train import TrainConfig
    from diaggym.training.train import train as run

    overrides = dict(
        cases=str(cases) if cases else None,
        base=str(base) if base else None,
        out=str(out) if out else None,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        schedule=schedule,
        warmup=warmup,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_length=max_length,
        bf16=bf16,
        gradient_checkpointing=gradient_checkpointing,
        deepspeed=deepspeed,
        save_steps=save_steps,
        seed=seed,
        resume=resume,
        mlflow=mlflow,
        run_name=run_name,
    )
    try:
        cfg = (
            TrainConfig.from_file(config, **overrides)
            if config
            else TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
        )
        for name in ("cases", "base", "out"):
            if not getattr(cfg, name):
                raise InputError(f"--{name} is required (or set it in the config)")
        summary = run(cfg)
    except InputError as err:
        _fail(err)
    if os.environ.get("RANK", "0") != "0":  # under torchrun/deepspeed only rank 0 reports
        return
    shown = {
        k: summary[k]
        for k in ("global_step", "train_loss", "val_loss_before", "val_loss_after", "final")
        if k in summary
    }
    typer.echo(json.dumps(shown, indent=2, default=str))


@app.command()
def simulate(
    exam: Annotated[str, typer.Option(help="Exam to simulate, e.g. 'Complete Blood Count (CBC)'.")],
    case_id: Annotated[
        str | None,
        typer.Option(
            help="Case whose profile and diagnosis condition the result (default: the first test-split case)."
        ),
    ] = None,
    cases: Annotated[Path, typer.Option(help="Preprocess output folder holding the case.")] = Path(
        "work/demo/mimic-iv"
    ),
    model: Annotated[Path | None, typer.Option(help="Model folder (transformers engine).")] = None,
    engine: Annotated[str, typer.Option(help="transformers, openai, normal, marginal or median.")] = "transformers",
    url: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL (openai engine).")] = None,
    served_model: Annotated[str, typer.Option(help="Model name on the OpenAI-compatible server.")] = "diaggym",
    history: Annotated[str, typer.Option(help="'real': the case's exams before this one; 'none'.")] = "real",
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = DEFAULT_TEMPERATURE,
    top_p: Annotated[
        float | None, typer.Option(help="Nucleus sampling: keep the smallest token set with this mass (default: off).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Generation limit in tokens (a full CBC is ~770).")] = (
        DEFAULT_MAX_TOKENS
    ),
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the parsed result as JSON.")] = False,
) -> None:
    """Generate one exam result for a case with the world model (or a baseline)."""
    from diaggym.cases import load_cases
    from diaggym.engines import EngineError, make_engine
    from diaggym.exam_stats import exam_kinds
    from diaggym.simulator import SimRequest, Simulator, history_before, pick_case

    try:
        sampling = _sampling(max_tokens, temperature, top_p, seed)
        if history not in ("real", "none"):
            raise InputError(f"--history must be 'real' or 'none', got {history!r}")
        all_cases = load_cases(cases)
        case = pick_case(all_cases, case_id, source=cases)
        past = history_before(case, exam) if history == "real" else []
        train_cases = [c for c in all_cases if c.split == "train"]
        eng = make_engine(engine, model=model, url=url, served_model=served_model, cases=train_cases, seed=seed)
        res = Simulator(eng, exam_kinds(all_cases)).simulate(SimRequest.for_case(case, exam, past), sampling)
    except (InputError, EngineError) as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps({"case_id": case.case_id, **res.to_dict()}, indent=2, ensure_ascii=False))
        return
    typer.echo(f"[{case.case_id}, {len(past)} exams of history]", err=True)
    typer.echo(f"Exam name:\n{res.exam}\nExam results:\n{res.result}")
    typer.echo(
        f"\n[{res.finish_reason}; {res.completion_tokens} tokens; {len(res.items)} analytes parsed"
        f"{'' if res.complete else f'; {len(res.unparsed_lines)} lines did not parse'}]",
        err=True,
    )


@app.command()
def evaluate(
    cases: Annotated[Path, typer.Option(help="Preprocess output folder (train split feeds the baselines).")],
    out: Annotated[Path, typer.Option(help="Report folder: metrics.json, report.md, plots.")],
    engine: Annotated[
        str, typer.Option(help="Candidate engine: transformers, openai, normal, marginal, median.")
    ] = "transformers",
    model: Annotated[Path | None, typer.Option(help="Candidate model folder (transformers engine).")] = None,
    url: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL (openai engine).")] = None,
    served_model: Annotated[str, typer.Option(help="Model name on the OpenAI-compatible server.")] = "diaggym",
    base_model: Annotated[
        Path | None, typer.Option(help="Un-tuned base model folder, evaluated as a baseline.")
    ] = None,
    baselines: Annotated[
        str, typer.Option(help="Comma-separated baselines (normal, marginal, median) or ''.")
    ] = "normal,marginal,median",
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    max_cases: Annotated[int | None, typer.Option(help="Evaluate at most this many cases.")] = None,
    max_exams: Annotated[int, typer.Option(help="Exams per case (step and chain level).")] = 30,
    exam_samples: Annotated[
        int, typer.Option(help="Samples per (case, exam type) at exam level (Num. WDist needs 30 per analyte).")
    ] = 5,
    max_tokens: Annotated[int, typer.Option(help="Generation limit (a full CBC is ~770 tokens).")] = DEFAULT_MAX_TOKENS,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = DEFAULT_TEMPERATURE,
    top_p: Annotated[
        float | None, typer.Option(help="Nucleus sampling mass (default: off, the model's whole distribution).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    embedding_model: Annotated[
        str | None, typer.Option(help="sentence-transformers model path (default: the bundled all-MiniLM-L6-v2).")
    ] = None,
    embeddings: Annotated[
        bool, typer.Option(help="Embed free text (text similarity, diversity, FID); off: those are counted as skipped.")
    ] = True,
    mlflow: Annotated[bool, typer.Option(help="Log the report to MLflow.")] = True,
    mlflow_run_id: Annotated[
        str | None, typer.Option(help="Log under this (training) run instead of a new one.")
    ] = None,
    judge_url: Annotated[
        str | None,
        typer.Option(help="OpenAI-compatible base URL of a judge model: adds Similarity and Consistency."),
    ] = None,
    judge_model: Annotated[
        str | None, typer.Option(help="Judge model name (key: $DIAGGYM_JUDGE_API_KEY or $OPENAI_API_KEY).")
    ] = None,
    judge_samples: Annotated[int, typer.Option(help="Step results and chains per engine sent to the judge.")] = 50,
) -> None:
    """Score a world model against the baselines: format, fidelity, diversity, consistency, cost."""
    from diaggym.cases import load_cases
    from diaggym.engines import EngineError, make_engine
    from diaggym.evaluation.run import EvalSettings
    from diaggym.evaluation.run import evaluate as run

    try:
        if (judge_url is None) != (judge_model is None):
            raise InputError("--judge-url and --judge-model go together: give both or neither")
        if judge_samples < 1:
            raise InputError(f"--judge-samples must be >= 1, got {judge_samples}")
        _sampling(max_tokens, temperature, top_p, seed)
        train_cases = load_cases(cases, split="train")
        engines = {
            "candidate": make_engine(
                engine, model=model, url=url, served_model=served_model, cases=train_cases, seed=seed
            )
        }
        if base_model is not None:
            engines["base (untuned)"] = make_engine("transformers", model=base_model)
        for b in [x.strip() for x in baselines.split(",") if x.strip()]:
            engines[b] = make_engine(b, cases=train_cases, seed=seed)
        settings = EvalSettings(
            max_cases=max_cases,
            max_exams=max_exams,
            exam_samples=exam_samples,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            judge_samples=judge_samples,
        )
        judge = None
        if judge_url is not None and judge_model is not None:
            from diaggym.evaluation.judge import Judge

            judge = Judge(judge_url, judge_model)
        doc = run(
            str(cases),
            str(out),
            engines,
            split=split,
            settings=settings,
            embedding_model=embedding_model,
            use_embeddings=embeddings,
            candidate=str(model or url or engine),
            mlflow=mlflow,
            mlflow_run_id=mlflow_run_id,
            judge=judge,
        )
    except (InputError, EngineError) as err:
        _fail(err)
    typer.echo((out / "report.md").read_text())
    if doc.get("mlflow_run_id"):
        typer.echo(f"MLflow run {doc['mlflow_run_id']}")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Run the simulator server (KServe: :predict, /openai/v1/completions, /metrics); --help lists its options."""
    # The server lives at the edge (serving/diaggym_serving) because it imports KServe; the core never does.
    from diaggym_serving.server import main as serve_main

    raise typer.Exit(serve_main(list(ctx.args)))


from diaggym.cli_pipeline import pipeline_app, promote  # noqa: E402 - the pipeline and registry commands

app.add_typer(pipeline_app, name="pipeline")
app.command()(promote)

from diaggym.cli_rl import rl_app  # noqa: E402 - the RL environment commands

app.add_typer(rl_app, name="rl")


if __name__ == "__main__":  # pragma: no cover
    app()
