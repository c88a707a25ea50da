"""Draw the pipeline graph from the compiled spec (not by hand): tasks, their artifacts and the gate condition.

    python pipelines/render_graph.py [pipelines/diaggym_pipeline.yaml] [--out pipelines/diaggym_pipeline.svg]

Writes Graphviz DOT beside the output and renders it with Graphviz's ``dot`` (Debian package ``graphviz``).
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def to_dot(spec: dict) -> str:
    """DOT for the root DAG and its condition sub-DAGs; edges are labelled with the artifacts they carry."""
    comps = spec["components"]
    lines = ["digraph pipeline {", '  rankdir=LR; node [shape=box, style="rounded,filled", fillcolor="#eef3fb", '
             'fontname="Helvetica", fontsize=11]; edge [fontname="Helvetica", fontsize=9, color="#555555"];',
             f'  label="{spec["pipelineInfo"]["name"]} (compiled spec)"; labelloc=t; fontname="Helvetica";']

    def add(dag: dict, prefix: str = "") -> None:
        for name, task in dag["tasks"].items():
            comp = comps[task["componentRef"]["name"]]
            if "dag" in comp:  # a dsl.If group: a cluster holding its tasks
                cond = task.get("triggerPolicy", {}).get("condition", "")
                shown = cond.replace("inputs.parameter_values['pipelinechannel--", "").replace("']", "")
                lines.append(f'  subgraph cluster_{name.replace("-", "_")} {{ label="if {shown}"; style=dashed;')
                add(comp["dag"], prefix)
                lines.append("  }")
                for up in task.get("dependentTasks", []):
                    for inner in comp["dag"]["tasks"]:
                        lines.append(f'  "{up}" -> "{inner}" [style=dashed, label="decision"];')
                continue
            outs = comp.get("outputDefinitions", {}).get("artifacts", {})
            kinds = ", ".join(f"{k}: {v['artifactType']['schemaTitle'].split('.')[-1]}" for k, v in outs.items())
            label = name + (f"\\n[{kinds}]" if kinds else "")
            lines.append(f'  "{name}" [label="{label}"];')
            carried: dict[str, list[str]] = {}
            for arg in task.get("inputs", {}).get("artifacts", {}).values():
                src = arg.get("taskOutputArtifact")
                if src:
                    carried.setdefault(src["producerTask"], []).append(src["outputArtifactKey"])
            for arg in task.get("inputs", {}).get("parameters", {}).values():
                src = arg.get("taskOutputParameter")
                if src:
                    carried.setdefault(src["producerTask"], []).append(src["outputParameterKey"])
            for up in task.get("dependentTasks", []):
                label = ", ".join(sorted(set(carried.get(up, []))))
                lines.append(f'  "{up}" -> "{name}" [label="{label}"];')

    add(spec["root"]["dag"])
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", type=Path, default=HERE / "diaggym_pipeline.yaml")
    ap.add_argument("--out", type=Path, default=HERE / "diaggym_pipeline.svg")
    args = ap.parse_args(argv)
    dot_text = to_dot(next(yaml.safe_load_all(args.spec.read_text())))  # doc 2: platform config
    dot_file = args.out.with_suffix(".dot")
    dot_file.write_text(dot_text)
    if shutil.which("dot") is None:
        print(f"wrote {dot_file}; Graphviz's dot is not installed (apt-get install graphviz) to render it")
        return 1
    fmt = args.out.suffix.lstrip(".") or "svg"
    subprocess.run(["dot", f"-T{fmt}", str(dot_file), "-o", str(args.out)], check=True)
    print(f"wrote {dot_file} and {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
