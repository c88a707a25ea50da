"""The end of ``make demo``: serve the registry's champion on 127.0.0.1, run a short exam chain through the endpoint
(the official ``openai`` client for the first exam, KServe's ``:predict`` for the rest, each exam seeing the results
generated before it), stop the server, and print where to look.

    python pipelines/demo_serve.py --work work/pipeline [--model models:/diaggym@champion] [--exams 3]
"""

import argparse
import json
import sys
from pathlib import Path

import httpx

from diaggym.cases import load_cases
from diaggym.simulator import SimRequest
from diaggym.testing import diaggym_serve


def newest(pattern: str, root: Path) -> Path | None:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("work/pipeline"), help="The local pipeline's work folder.")
    ap.add_argument("--model", default="models:/diaggym@champion", help="Registry URI to serve.")
    ap.add_argument("--exams", type=int, default=3, help="Exams in the chain.")
    ap.add_argument("--top-p", type=float, default=0.95, help="Nucleus sampling of the chain (the demo's setting).")
    args = ap.parse_args(argv)

    outputs = args.work.resolve() / "outputs"
    cases_dir = newest("*/preprocess/cases", outputs)
    if cases_dir is None:
        print(f"error: no pipeline outputs under {outputs}: run `diaggym pipeline run --local` first", file=sys.stderr)
        return 2
    case = next(c for c in load_cases(cases_dir) if c.split == "test")
    exams = [e.name for e in case.exams[: args.exams]]
    log = args.work / "serve.log"
    server, url = diaggym_serve(["--model", args.model, "--cases", str(cases_dir)], log)
    try:
        server.wait_ready(f"{url}/v2/health/ready", timeout=600)
        status = httpx.get(f"{url}/v1/models/diaggym", timeout=10).json()
        reg = status.get("registry") or {}
        print(f"serving {args.model} = {reg.get('name')} version {reg.get('version')} on {url}")
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/openai/v1", api_key="unused")
        history: list[tuple[str, str]] = []
        for k, exam in enumerate(exams):
            if k == 0:  # the raw-prompt route the RL rollouts use
                prompt = SimRequest.for_case(case, exam, history).prompt()
                c = client.completions.create(model="diaggym", prompt=prompt, max_tokens=1024, temperature=1.0,
                                              top_p=args.top_p, seed=k, stop=["<SEP>"])
                result, route = c.choices[0].text.strip(), "openai client, /openai/v1/completions"
            else:
                body = {"instances": [{"case_id": case.case_id, "exam": exam, "seed": k, "top_p": args.top_p,
                                       "temperature": 1.0, "max_tokens": 1024,
                                       "history": [{"name": n, "result": r} for n, r in history]}]}
                r = httpx.post(f"{url}/v1/models/diaggym:predict", json=body, timeout=300)
                r.raise_for_status()
                result, route = r.json()["predictions"][0]["result"], ":predict"
            history.append((exam, result))
            print(f"\n[{k + 1}/{len(exams)}] {exam}  ({route}, case {case.case_id})\n{result[:600]}")
    finally:
        server.stop()
    report = newest("*/evaluate/report", outputs)
    manifest = newest("*/deploy/manifest", outputs)
    print("\nServer stopped. Where to look:")
    print(f"  evaluation report:   {report}")
    print(f"  InferenceService:    {manifest}  (storageUri = the champion's artifacts)")
    print(f"  served:              {url} ({args.model}, version {reg.get('version')}); log {log}")
    print(f"  registry version:    {json.dumps(reg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
