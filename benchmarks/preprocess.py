"""Benchmark ``diaggym preprocess`` on a scaled-up MIMIC-IV demo against plain ``zcat``.

Why: preprocessing must keep up with simply decompressing its input (target:
wall time at most 3x ``zcat`` of the same files) and stay memory-light (peak
RSS at most 2 GiB) at the scale of the real MIMIC-IV, which cannot be used in
CI.  The open demo is scaled up with :func:`diaggym.synthetic.scale_up` (default
100x, ~10.7 M lab rows) into ``benchmarks/.work/`` (git-ignored, reused across
runs), ``zcat`` gives the I/O + decompression floor on the same machine in the
same run, and the preprocess CLI is timed as a child process with its peak RSS
(``wait4`` rusage of the child, and psutil polling of its whole process tree
when psutil is installed).  Results go to ``benchmarks/results/preprocess-{factor}x.json``
as one JSON line, with pass/fail per target and machine info.

Usage::

    .venv/bin/python benchmarks/preprocess.py                 # 100x
    .venv/bin/python benchmarks/preprocess.py --factor 3 --skip-preprocess
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from diaggym.synthetic import scale_up
from diaggym.testing import machine_info

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = ROOT / "data" / "mimic-iv-demo"
DEFAULT_WORK = ROOT / "benchmarks" / ".work"
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
TARGET_WALL_RATIO = 3.0  # preprocess wall <= 3x zcat wall
TARGET_PEAK_RSS = 2 * 1024**3  # bytes (2 GiB)



def ensure_work_dir(work: Path) -> None:
    """Create the work folder, git-ignored by a ``.gitignore`` inside it (it holds GBs of data)."""
    work.mkdir(parents=True, exist_ok=True)
    ignore = work / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# generated benchmark data; never commit\n*\n", encoding="utf-8")


def build_or_reuse(input_dir: Path, data_dir: Path, factor: int, seed: int, rebuild: bool) -> dict:
    """Scale the demo up into ``data_dir`` unless a complete folder of the same factor/seed is there."""
    manifest = data_dir / "SYNTHETIC.json"
    if not rebuild and manifest.is_file():
        info = json.loads(manifest.read_text(encoding="utf-8"))
        if info.get("factor") == factor and info.get("seed") == seed:
            print(f"reusing {data_dir} (factor {factor}, seed {seed})")
            return {"reused": True, "seconds": None, "rows": info.get("rows", {})}
    print(f"building {data_dir} (factor {factor}, seed {seed}) ...")
    summary = scale_up(input_dir, data_dir, factor, seed=seed, progress=True)
    print(f"built in {summary['seconds']:.1f} s")
    return {"reused": False, "seconds": summary["seconds"], "rows": summary["rows"]}


def input_files(data_dir: Path) -> list[Path]:
    files = sorted(data_dir.glob("*/*.csv.gz"))
    if not files:
        raise SystemExit(f"error: no */*.csv.gz files under {data_dir}")
    return files


def time_zcat(files: list[Path], runs: int) -> dict:
    """Wall time of ``zcat f1 f2 ... > /dev/null``; best of ``runs`` (the first also warms the page cache)."""
    zcat = shutil.which("zcat")
    if zcat is None:
        raise SystemExit("error: zcat not found on PATH")
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run([zcat, *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace")
            raise SystemExit(f"error: zcat failed ({proc.returncode}): {msg}")
    return {"seconds": min(times), "runs": [round(t, 3) for t in times]}


def preprocess_command(data_dir: Path, out_dir: Path) -> list[str]:
    """The CLI entry point beside this interpreter, else ``python -m diaggym.cli``."""
    exe = Path(sys.executable).parent / "diaggym"
    base = [str(exe)] if exe.is_file() else [sys.executable, "-m", "diaggym.cli"]
    return [*base, "preprocess", "--source", "mimic-iv", "--input", str(data_dir), "--out", str(out_dir)]


class TreeRssSampler:
    """Poll the summed RSS of a process and its descendants (psutil), keeping the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.peak = 0
        self.available = False
        self._stop = threading.Event()
        try:
            import psutil
        except ImportError:
            self._thread = None
            return
        self.available = True
        self._psutil = psutil
        self._pid = pid
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        psutil = self._psutil
        try:
            proc = psutil.Process(self._pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            total = 0
            try:
                procs = [proc, *proc.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def run_preprocess(cmd: list[str], timeout: float | None) -> dict:
    """Run the preprocess CLI; wall time, exit status, peak RSS (bytes) and the tail of its output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        sampler = TreeRssSampler(proc.pid)
        deadline = None if timeout is None else t0 + timeout
        timed_out = False
        while True:
            # wait4 on this exact child: its own rusage (max RSS of it and its waited-for descendants).
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if deadline is not None and time.perf_counter() > deadline and not timed_out:
                proc.kill()
                timed_out = True
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    ru_maxrss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # KiB on Linux
    return {
        "command": cmd,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "seconds": wall,
        "peak_rss_bytes": max(ru_maxrss, sampler.peak),
        "ru_maxrss_bytes": ru_maxrss,
        "tree_rss_peak_bytes": sampler.peak if sampler.available else None,
        "stdout_tail": stdout[-2000:],
        "stderr_tail": stderr[-4000:],
    }


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024**3:.2f} GiB"


def print_table(result: dict) -> None:
    zc = result["zcat"]
    pp = result.get("preprocess")
    rows = [
        ("input", f"{result['input']['files']} files, {result['input']['gz_bytes'] / 1e6:.0f} MB gz"),
        ("zcat wall", f"{zc['seconds']:.2f} s (runs {zc['runs']})"),
    ]
    if pp is not None:
        t = result["targets"]
        rows += [
            ("preprocess wall", f"{pp['seconds']:.2f} s (exit {pp['returncode']})"),
            (
                "wall / zcat",
                f"{t['wall_ratio']['value']:.2f}x  target <= {TARGET_WALL_RATIO:g}x  "
                f"{'PASS' if t['wall_ratio']['pass'] else 'FAIL'}",
            ),
            (
                "peak RSS",
                f"{gib(pp['peak_rss_bytes'])}  target <= {gib(TARGET_PEAK_RSS)}  "
                f"{'PASS' if t['peak_rss']['pass'] else 'FAIL'}",
            ),
        ]
    else:
        rows.append(("preprocess", "skipped"))
    width = max(len(k) for k, _ in rows)
    print()
    print(f"preprocess benchmark, factor {result['factor']}x")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factor", type=int, default=100, help="scale-up factor (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="MIMIC-IV-layout demo folder")
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="scaled data + preprocess output")
    ap.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--rebuild", action="store_true", help="regenerate the scaled folder even if present")
    ap.add_argument("--zcat-runs", type=int, default=2, help="zcat repetitions; the best is used")
    ap.add_argument("--timeout", type=float, default=None, help="kill preprocess after this many seconds")
    ap.add_argument("--skip-preprocess", action="store_true", help="only build the data and time zcat")
    args = ap.parse_args(argv)
    if args.factor < 1:
        ap.error("--factor must be >= 1")

    ensure_work_dir(args.work_dir)
    data_dir = args.work_dir / f"mimic-iv-{args.factor}x"
    out_dir = args.work_dir / f"preprocessed-{args.factor}x"
    build = build_or_reuse(args.input, data_dir, args.factor, args.seed, args.rebuild)

    files = input_files(data_dir)
    result: dict = {
        "benchmark": "preprocess",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "factor": args.factor,
        "seed": args.seed,
        "data_dir": str(data_dir),
        "build": {"reused": build["reused"], "seconds": build["seconds"]},
        "input": {
            "files": len(files),
            "gz_bytes": sum(f.stat().st_size for f in files),
            "rows": build["rows"],
        },
        "machine": machine_info("polars"),
    }
    print(f"timing zcat of {len(files)} files ...")
    result["zcat"] = time_zcat(files, max(1, args.zcat_runs))

    ok = True
    if not args.skip_preprocess:
        shutil.rmtree(out_dir, ignore_errors=True)  # time a fresh run, not an overwrite
        cmd = preprocess_command(data_dir, out_dir)
        print("running", " ".join(cmd), "...")
        pp = run_preprocess(cmd, args.timeout)
        result["preprocess"] = pp
        ratio = pp["seconds"] / result["zcat"]["seconds"]
        succeeded = pp["returncode"] == 0
        result["targets"] = {
            "wall_ratio": {
                "value": round(ratio, 3),
                "max": TARGET_WALL_RATIO,
                "pass": succeeded and ratio <= TARGET_WALL_RATIO,
            },
            "peak_rss": {
                "value": pp["peak_rss_bytes"],
                "max": TARGET_PEAK_RSS,
                "pass": succeeded and pp["peak_rss_bytes"] <= TARGET_PEAK_RSS,
            },
        }
        result["pass"] = all(t["pass"] for t in result["targets"].values())
        if not succeeded:
            ok = False
            why = "timed out" if pp["timed_out"] else f"exited with {pp['returncode']}"
            print(f"\nerror: preprocess {why}: {' '.join(cmd)}", file=sys.stderr)
            print("---- stderr (tail) ----", file=sys.stderr)
            print(pp["stderr_tail"] or "(empty)", file=sys.stderr)
        elif not result["pass"]:
            ok = False

    print_table(result)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    dest = args.results_dir / f"preprocess-{args.factor}x.json"
    dest.write_text(json.dumps(result, sort_keys=True) + "\n", encoding="utf-8")
    print(f"\nwrote {dest}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
