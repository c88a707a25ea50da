"""Packaging: the extras split (each image installs only what it runs), the core without the serving stack, and a wheel
that carries its configs and catalog data instead of reading the checkout.

The full check, a wheel installed into a fresh virtualenv with only the `serve` extra answering `:predict`, takes
minutes of pip on 2 cores, so it is a script (benchmarks/wheel_serve.py, record in benchmarks/results/); these tests
check the same properties fast: the wheel's files and metadata, the dependency closure of `serve`, and imports.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "deepspeed", "triton", "ninja", "mlflow", "transformers", "kfp", "sentence-transformers"}
SERVING_STACK = ("torch", "transformers", "kserve", "fastapi", "uvicorn", "deepspeed", "mlflow", "kfp",
                 "sentence_transformers", "prometheus_client")


@cache
def _wheel(tmp: str) -> Path:
    out = Path(tmp)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("diaggym-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return _wheel(str(tmp_path_factory.mktemp("wheel")))


def _requires(extra: str | None) -> list[Requirement]:
    reqs = [Requirement(r) for r in metadata.requires("diaggym") or []]
    env = {"extra": extra or ""}
    return [r for r in reqs if (r.marker is None and extra is None) or (r.marker is not None and extra is not None
                                                                       and r.marker.evaluate(env))]


def closure(extras: tuple[str, ...]) -> set[str]:
    """Distribution names installing diaggym with these extras pulls in (from installed metadata, offline)."""
    seen: set[str] = set()
    todo = [(r, None) for r in _requires(None)] + [(r, None) for e in extras for r in _requires(e)]
    while todo:
        req, _ = todo.pop()
        name = canonicalize_name(req.name)
        if name == "diaggym":
            for e in req.extras:
                todo += [(r, None) for r in _requires(e)]
            continue
        if name in seen:
            continue
        seen.add(name)
        try:
            deps = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for dep in deps:
            r = Requirement(dep)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append((r, None))
    return seen


def test_serve_extra_pulls_in_no_deepspeed_torch_or_training_stack():
    serve = closure(("serve",))
    assert {"kserve", "prometheus-client", "fastapi", "uvicorn"} <= serve
    assert not serve & HEAVY, sorted(serve & HEAVY)
    assert not [n for n in serve if n.startswith("nvidia-")]
    # the control: the training extra does pull them in, so the walk sees transitive dependencies
    assert {"deepspeed", "torch"} <= closure(("train",))


def test_dev_is_every_extra():
    extras = set(metadata.metadata("diaggym").get_all("Provides-Extra") or [])
    assert {"hf", "serve", "train", "eval", "pipeline", "rl", "dev"} <= extras
    dev = {canonicalize_name(r.name) + str(sorted(r.extras)) for r in _requires("dev")}
    named = set().union(*(set(r.extras) for r in _requires("dev") if canonicalize_name(r.name) == "diaggym"))
    assert named == extras - {"dev"}, dev


def test_core_imports_and_runs_without_the_serving_stack():
    """A meta-path hook makes every serving/training library unimportable; the core, its CLI and the simulator API
    still import and the CLI answers --help."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVING_STACK!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import diaggym, diaggym.cli, diaggym.simulator, diaggym.catalog, diaggym.resources
from typer.testing import CliRunner
result = CliRunner().invoke(diaggym.cli.app, ["--help"])
assert result.exit_code == 0, result.output
assert diaggym.catalog.default_mapping_path().is_file()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.integration
def test_wheel_carries_configs_catalog_and_the_server(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("diaggym/_bundled/configs/train/local.json", "diaggym/_bundled/configs/deepspeed/zero2.json",
                   "diaggym/_bundled/data/mimic-cdm/mappings.json", "diaggym/_bundled/data/mimic-cdm/LICENSE.txt",
                   "diaggym/resources.py", "diaggym/py.typed", "diaggym_serving/server.py"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("tests/", "data/", "work/")) or "mimic-iv-demo" in n]
    meta = Parser().parsestr(zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    core = {canonicalize_name(Requirement(r).name) for r in meta.get_all("Requires-Dist") if "extra ==" not in r}
    assert not core & (HEAVY | {"kserve", "fastapi", "uvicorn"}), sorted(core)


@pytest.mark.integration
def test_unpacked_wheel_reads_its_bundled_files_not_the_checkout(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = """
import diaggym.resources as r, diaggym.catalog as c
from pathlib import Path
assert Path(r.__file__).is_relative_to(SITE), r.__file__
assert r.bundled("configs", "train", "local.json").is_relative_to(SITE)
assert c.default_mapping_path().is_relative_to(SITE) and c.default_mapping_path().is_file()
print("ok")
""".replace("SITE", repr(str(tmp_path / "site")))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_only_our_packages_are_installed():
    """serving/vllm is a launcher for tests, not a package: installed, it would pose as vLLM to other libraries."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    where = [] if spec is None else [spec.origin, *(spec.submodule_search_locations or [])]
    assert not [w for w in where if w and str(Path(w)).startswith(str(ROOT / "serving"))], where
