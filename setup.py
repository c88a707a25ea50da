"""Build hook only (metadata lives in pyproject.toml): a wheel carries the configs and the catalog data it reads.

The configs (configs/: training presets, DeepSpeed, gate policies, pipeline parameters) and the exam catalog
(data/mimic-cdm/) live at the repository root, where a checkout reads them. A wheel has no checkout, so build_py copies
them into the package as diaggym/_bundled/; diaggym.resources.bundled() looks there first. Editable installs do not
run this step and read the checkout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = {"configs": ROOT / "configs", "data/mimic-cdm": ROOT / "data" / "mimic-cdm"}


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "diaggym" / "_bundled"
        for name, source in BUNDLED.items():
            if not source.is_dir():
                raise SystemExit(f"cannot bundle {source}: not found (build from a full checkout)")
            shutil.copytree(source, target / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithData})
