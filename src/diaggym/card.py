"""The dataset card: what went in, what was dropped and why, what came out.

``card.json`` is machine-readable (training logs it to MLflow and tags the run
with its ``dataset_hash``); ``card.md`` is for people, with a histogram of
exams per case.  Counts at every filter step satisfy ``input = kept + each
exclusion``; :func:`check_counts` verifies it before the card is written.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter
from pathlib import Path

from diaggym import __version__
from diaggym.cases import SCHEMA, Case
from diaggym.serialization import FORMAT
from diaggym.sources import SourceResult
from diaggym.splits import SPLITS

CARD_VERSION = "diaggym.card/1"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stats(values: list[int]) -> dict:
    if not values:
        return {"mean": 0.0, "median": 0.0, "min": 0, "max": 0}
    return {
        "mean": round(statistics.fmean(values), 3),
        "median": float(statistics.median(values)),
        "min": min(values),
        "max": max(values),
    }


def check_counts(steps: list[dict]) -> None:
    for s in steps:
        if s["input"] != s["kept"] + sum(s["dropped"].values()):
            raise AssertionError(f"card step {s['step']!r} does not add up: {s}")


class CardStats:
    """Running counts over a stream of cases, so the card never needs them all in memory."""

    def __init__(self) -> None:
        self.exams_per_case: list[int] = []
        self.per_kind: dict[str, list[int]] = {}
        self.exam_counts: Counter = Counter()
        self.exam_kind: dict[str, str] = {}
        self.split_cases: Counter = Counter()
        self.split_subjects: dict[str, set[str]] = {s: set() for s in SPLITS}
        self.subjects: set[str] = set()

    def add(self, case: Case) -> None:
        n = len(self.exams_per_case)
        self.exams_per_case.append(len(case.exams))
        kinds = Counter(e.kind for e in case.exams)
        for k in kinds.keys() - self.per_kind.keys():
            self.per_kind[k] = [0] * n  # earlier cases had none of this kind
        for k, counts in self.per_kind.items():
            counts.append(kinds.get(k, 0))
        for e in case.exams:
            self.exam_counts[e.name] += 1
            self.exam_kind.setdefault(e.name, e.kind)
        if case.split is not None:
            self.split_cases[case.split] += 1
            self.split_subjects[case.split].add(case.subject_key)
        self.subjects.add(case.subject_key)


def build_card(
    result: SourceResult, stats: CardStats, cases_file: Path, input_root: Path, params: dict, top_n: int = 25
) -> dict:
    """Assemble the card dictionary (no I/O except hashing the inputs and ``cases_file``)."""
    inputs = []
    for p in result.inputs:
        try:
            rel = str(p.relative_to(input_root))
        except ValueError:
            rel = p.name
        inputs.append({"path": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    steps = result.log.to_list()
    check_counts(steps)
    splits = {s: {"cases": stats.split_cases[s], "subjects": len(stats.split_subjects[s])} for s in SPLITS}
    return {
        "card": CARD_VERSION,
        "schema": SCHEMA,
        "format": FORMAT,
        "diaggym_version": __version__,
        "source": result.source,
        "params": params,
        "inputs": inputs,
        "filter_steps": steps,
        "cases": len(stats.exams_per_case),
        "subjects": len(stats.subjects),
        "exams": sum(stats.exams_per_case),
        "exams_per_case": _stats(stats.exams_per_case),
        "exams_per_case_by_kind": {k: _stats(v) for k, v in sorted(stats.per_kind.items())},
        "distinct_exam_names": len(stats.exam_counts),
        "top_exams": [
            {"name": n, "kind": stats.exam_kind[n], "cases": k} for n, k in stats.exam_counts.most_common(top_n)
        ],
        "splits": splits,
        # Where each kept case's parts came from (e.g. how many diagnoses fell back to ICD titles).
        "provenance": {k: dict(sorted(v.items())) for k, v in result.provenance.items()},
        "remarks": list(result.remarks),
        "dataset_hash": sha256_file(cases_file),
    }


def plot_exams_per_case(counts: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    if counts:
        ax.hist(counts, bins=min(40, max(5, len(set(counts)))), color="#3b75af", edgecolor="white")
    ax.set_xlabel("exams per case")
    ax.set_ylabel("cases")
    ax.set_title(f"Exams per case (n = {len(counts)} cases)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_markdown(card: dict, plot_name: str | None) -> str:
    lines = [
        f"# Dataset card — {card['source']}",
        "",
        f"Schema `{card['schema']}`, format `{card['format']}`, DiagGym {card['diaggym_version']}. "
        f"Dataset hash `{card['dataset_hash'][:16]}…`.",
        "",
        f"**{card['cases']} cases** from {card['subjects']} patients, {card['exams']} exams "
        f"({card['exams_per_case']['mean']} per case, median {card['exams_per_case']['median']}).",
        "",
        "## Filter steps (input = kept + each exclusion)",
        "",
        "| step | unit | input | kept | dropped (reason: count) |",
        "|---|---|---:|---:|---|",
    ]
    for s in card["filter_steps"]:
        dropped = "; ".join(f"{k}: {v}" for k, v in s["dropped"].items()) or "—"
        lines.append(f"| {s['step']} | {s['unit']} | {s['input']} | {s['kept']} | {dropped} |")
    if card.get("provenance"):
        lines += ["", "## Where each case's parts come from", "", "| part | from | cases |", "|---|---|---:|"]
        for part, origins in card["provenance"].items():
            lines += [f"| {part} | {origin} | {n} |" for origin, n in origins.items()]
    for remark in card.get("remarks", []):
        lines += ["", f"> {remark}"]
    lines += ["", "## Splits (by patient)", "", "| split | cases | patients |", "|---|---:|---:|"]
    for name, v in card["splits"].items():
        lines.append(f"| {name} | {v['cases']} | {v['subjects']} |")
    lines += ["", "## Exams per case by kind", "", "| kind | mean | median | min | max |", "|---|---:|---:|---:|---:|"]
    for k, v in card["exams_per_case_by_kind"].items():
        lines.append(f"| {k} | {v['mean']} | {v['median']} | {v['min']} | {v['max']} |")
    if plot_name:
        lines += ["", f"![exams per case]({plot_name})"]
    lines += [
        "",
        f"## Top exams ({card['distinct_exam_names']} distinct names)",
        "",
        "| exam | kind | cases |",
        "|---|---|---:|",
    ]
    lines += [f"| {e['name']} | {e['kind']} | {e['cases']} |" for e in card["top_exams"]]
    lines += ["", "## Inputs", "", "| file | bytes | sha256 |", "|---|---:|---|"]
    lines += [f"| {i['path']} | {i['bytes']} | `{i['sha256']}` |" for i in card["inputs"]]
    return "\n".join(lines) + "\n"


def write_card(card: dict, stats: CardStats, out: Path) -> None:
    plot = "exams_per_case.png"
    plot_exams_per_case(stats.exams_per_case, out / plot)
    (out / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "card.md").write_text(render_markdown(card, plot), encoding="utf-8")


def summary_lines(card: dict) -> list[str]:
    """A short text summary for the terminal."""
    s = card["splits"]
    out = [
        f"{card['cases']} cases, {card['subjects']} patients, {card['exams']} exams "
        f"(mean {card['exams_per_case']['mean']} per case); splits: "
        + ", ".join(f"{k} {v['cases']}" for k, v in s.items())
    ]
    for st in card["filter_steps"]:
        dropped = ", ".join(f"{k} {v}" for k, v in st["dropped"].items()) or "none dropped"
        out.append(f"  {st['step']}: {st['input']} {st['unit']}s → {st['kept']} kept ({dropped})")
    for part, origins in card.get("provenance", {}).items():
        out.append(f"  {part} from: " + ", ".join(f"{k} {v}" for k, v in origins.items()))
    return out
