"""A real vLLM OpenAI server (CPU build, ``.venv-vllm``) for tests: re-exports ``serving/vllm/server.py``.

The class lives in ``serving/vllm/server.py`` so that benchmarks use the same start-up logic without
importing from ``tests/``; that folder is not a package, so it is loaded by path here::

    from tests.vllm_server import VLLMServer, vllm_available

    with VLLMServer("work/runs/local-accept/final") as server:
        engine = OpenAIEngine(server.base_url, server.served_model_name)

Tests that need it should skip unless :func:`vllm_available` (``serving/vllm/install.sh`` was run).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "serving" / "vllm" / "server.py"
_NAME = "diaggym_vllm_server"


def _load():
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    if spec is None or spec.loader is None:  # pragma: no cover - the file is in the repository
        raise ImportError(f"cannot load {_PATH}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)
    return module


_server = _load()
VLLMServer = _server.VLLMServer
VLLMServerError = _server.VLLMServerError
parse_prometheus = _server.parse_prometheus
free_port = _server.free_port


def vllm_available(venv: str = ".venv-vllm") -> bool:
    """Whether ``serving/vllm/install.sh`` has completed for ``venv`` (relative to the repository root)."""
    root = Path(__file__).resolve().parents[1]
    path = Path(venv) if Path(venv).is_absolute() else root / venv
    return (path / ".vllm-installed").is_file() and (path / "bin" / "python").exists()


__all__ = ["VLLMServer", "VLLMServerError", "free_port", "parse_prometheus", "vllm_available"]
