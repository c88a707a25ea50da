"""The ``diaggym`` command line.

Each command is a thin shell over the core library; input errors print one
clear line naming the file and the problem and exit with status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from diaggym import __version__
from diaggym.errors import InputError

app = typer.Typer(
    name="diaggym",
    help="DiagGym: build EHR cases, serialize them for the world model, and (soon) train, evaluate and serve it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
