"""The ``diaggym`` command end to end, as users run it."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys

import pytest

from tests.conftest import DEMO

pytestmark = pytest.mark.integration


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diaggym.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands():
    r = _run("--help")
    assert r.returncode == 0
    for cmd in ("preprocess", "validate", "show", "scale-up"):
        assert cmd in r.stdout


def test_preprocess_validate_show(tmp_path):
    out = tmp_path / "cases"
    r = _run("preprocess", "--source", "mimic-iv", "--input", str(DEMO), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "admissions → cases: 275 cases → " in r.stdout
    r = _run("validate", str(out))
    assert r.returncode == 0 and "lab exams failed the round trip" in r.stdout and "; 0 lab" in r.stdout
    r = _run("show", str(out), "--step", "1")
    assert r.returncode == 0
    assert "Final Diagnosis:\n" in r.stdout and r.stdout.rstrip("\n").endswith("Exam results:")


def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(tmp_path):
    root = tmp_path / "mimic"
    shutil.copytree(DEMO, root)
    with gzip.open(root / "hosp" / "patients.csv.gz", "wt") as fh:
        fh.write("subject_id,sex\n1,F\n")
    out = tmp_path / "out"
    r = _run("preprocess", "--source", "mimic-iv", "--input", str(root), "--out", str(out))
    assert r.returncode == 2
    assert "patients.csv.gz: missing column(s) anchor_age, anchor_year, gender" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert list(tmp_path.glob(".out*")) == []


def test_unknown_source_and_bad_ratios(tmp_path):
    r = _run("preprocess", "--source", "eicu", "--input", str(DEMO), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown source 'eicu'" in r.stderr
    r = _run(
        "preprocess", "--source", "mimic-iv", "--input", str(DEMO), "--out", str(tmp_path / "o"), "--splits", "1,2"
    )
    assert r.returncode == 2 and "three numbers" in r.stderr


def test_layers_import_downwards_only():
    """The CLI loads no server, KServe or torch until a command needs them; training's tracking needs no trainer."""
    code = (
        "import sys, diaggym.cli, diaggym.training.tracking\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('diaggym_serving', 'kserve', 'torch', 'transformers')]\n"
        "bad += [m for m in sys.modules if m == 'diaggym.training.train']\n"
        "print(bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
