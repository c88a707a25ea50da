"""A wheel of the repository, installed into a fresh virtualenv with only the `serve` extra, serves `:predict`.

Builds the wheel, creates a venv outside the checkout, `pip install "<wheel>[serve]"` (from the configured index or
the local pip cache), checks that no torch/DeepSpeed landed in it, starts `diaggym serve --engine marginal` from that
venv (working directory outside the checkout) on demo cases, sends one `:predict`, and writes a record with the
timings to benchmarks/results/wheel-serve.json. Minutes of pip on 2 cores, so it is not part of `make test`
(tests/test_packaging.py checks the same properties fast).

    .venv/bin/python benchmarks/wheel_serve.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from diaggym.testing import ServerProcess, free_port, machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "wheel-serve.json"


def run(cmd: list[str], **kw) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, **kw)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="diaggym-wheel-"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    timings["build_wheel_s"] = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                                    "--quiet", "-w", str(work / "dist"), str(ROOT)])
    (wheel,) = (work / "dist").glob("diaggym-*.whl")
    venv = work / "venv"
    timings["venv_s"] = run([sys.executable, "-m", "venv", "--clear", str(venv)])
    py = venv / "bin" / "python"
    timings["pip_install_serve_s"] = run([str(py), "-m", "pip", "install", "--quiet", f"{wheel}[serve]"])
    installed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], check=True, capture_output=True,
                               text=True).stdout
    names = sorted(p["name"].lower() for p in json.loads(installed))
    heavy = [n for n in names if n in ("torch", "deepspeed", "triton", "mlflow", "transformers")
             or n.startswith("nvidia-")]
    if heavy:
        raise SystemExit(f"the serve extra installed {heavy}")
    # Cases for the marginal baseline, built by the checkout's environment (input data, not a package path).
    cases = work / "cases"
    if not (cases / "cases.jsonl").is_file():
        run([sys.executable, "-m", "diaggym.cli", "preprocess", "--source", "mimic-iv", "--input",
             str(ROOT / "data" / "mimic-iv-demo"), "--out", str(cases)], capture_output=True)
    case_id = json.loads((cases / "cases.jsonl").read_text().splitlines()[0])["case_id"]
    port = free_port()
    server = ServerProcess([str(venv / "bin" / "diaggym"), "serve", "--engine", "marginal", "--cases", str(cases),
                            "--host", "127.0.0.1", "--port", str(port)], work / "serve.log", cwd=work)
    t = time.perf_counter()
    with server:
        server.wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", timeout=180)
        timings["server_ready_s"] = time.perf_counter() - t
        body = {"instances": [{"case_id": case_id, "exam": "Complete Blood Count (CBC)", "seed": 1}]}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/models/diaggym:predict", json=body, timeout=60)
    if r.status_code != 200 or not r.json()["predictions"][0]["result"]:
        raise SystemExit(f":predict answered {r.status_code}: {r.text[:500]}")
    record = {
        "benchmark": "wheel_serve",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/wheel_serve.py",
        "machine": machine_info("pip"),
        "wheel": wheel.name,
        "installed_distributions": len(names),
        "heavy_distributions": heavy,
        "predict_status": r.status_code,
        "predict_exam": r.json()["predictions"][0]["exam"],
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
