"""Start the simulator server: ``python -m diaggym_serving`` (container) or ``diaggym serve`` (local).

It accepts KServe's own model-server options (KServe appends ``--model_name``,
``--predictor_host`` and ``--http_port`` to a transformer container), so the same entry
point runs as an InferenceService transformer in front of a vLLM predictor and as a plain
local server.  Locally it binds 127.0.0.1; in a container pass ``--host 0.0.0.0``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from diaggym.errors import InputError

log = logging.getLogger("diaggym.serving")

DISPATCH = {"transformers": "batch", "openai": "async", "normal": "inline", "marginal": "inline", "median": "inline"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diaggym serve",
        description="DiagGym simulator server (KServe model server: :predict, /openai/v1/completions, /metrics).",
    )
    p.add_argument("--model_name", "--model-name", dest="model_name", default="diaggym",
                   help="Name on the routes (/v1/models/NAME:predict) and the OpenAI 'model' field.")
    p.add_argument("--engine", choices=sorted(DISPATCH), default=None,
                   help="World-model engine (default: openai when --predictor_host/--engine-url is given, "
                   "else transformers).")
    p.add_argument("--model", "--model-dir", dest="model_dir", default=None,
                   help="Model folder for the transformers engine (default /mnt/models when it exists).")
    p.add_argument("--engine-url", default=None, help="OpenAI-compatible base URL (…/v1) of the predictor.")
    p.add_argument("--predictor_host", "--predictor-host", dest="predictor_host", default=None,
                   help="Set by KServe for a transformer: the engine URL becomes http://HOST/v1.")
    p.add_argument("--served-model", default="diaggym", help="Model name on the predictor (vLLM --served-model-name).")
    p.add_argument("--cases", default=None,
                   help="Preprocess output folder: exam kinds for metrics and parsing, the case_id form, and the "
                   "training split for the baseline engines.")
    p.add_argument("--host", default=os.environ.get("DIAGGYM_HOST", "127.0.0.1"), help="Bind address.")
    p.add_argument("--http_port", "--port", dest="http_port", type=int, default=8080, help="HTTP port.")
    p.add_argument("--model-alias", action="append", default=[], metavar="NAME",
                   help="Another name the model answers to (repeatable), e.g. EHRGenerator for the reference "
                   "rollout code, which then needs only its base URL changed.")
    p.add_argument("--context-length", type=int, default=None,
                   help="The served model's context in tokens (32768 for Qwen2.5-7B); default: what the engine "
                   "reports (vLLM's max_model_len, the model config). A request whose max_tokens exceeds it is 400.")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="Largest max_tokens a request may ask for, to lower the context bound (default: none).")
    p.add_argument("--max-instances", type=int, default=64, help="Most instances (or prompts) per request.")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="Largest request body.")
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="Seconds a request may spend waiting for and in the engine (retries included): 504 after.")
    p.add_argument("--max-concurrency", type=int, default=64,
                   help="Requests in the engine at once (also the openai engine's bound on upstream calls).")
    p.add_argument("--max-queue", type=int, default=256,
                   help="Requests waiting for an engine slot; more are answered 503 'overloaded' with Retry-After.")
    p.add_argument("--ready-recheck-s", type=float, default=10.0,
                   help="Once ready, probe the engine this often (unless a request succeeded meanwhile).")
    p.add_argument("--drain-seconds", type=float, default=0.0,
                   help="On SIGTERM: seconds of not-ready serving with 'Connection: close' before the listener "
                   "closes (in a pod: a few seconds, so kept-alive clients move to other replicas).")
    p.add_argument("--graceful-timeout", type=int, default=30,
                   help="After the drain: seconds the requests in flight get to finish before the process exits.")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="Seconds a connection may take to send a request's headers before it is closed.")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="Seconds a request body may stall before the answer is 408.")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="Run the transformers engine in its own process (default), so its decode loop and the "
                   "HTTP server do not take turns on one interpreter lock.")
    p.add_argument("--max-batch", type=int, default=32,
                   help="Most prompts decoded together (transformers engine; requests join a running batch).")
    p.add_argument("--api-token-env", default="DIAGGYM_API_TOKEN",
                   help="Environment variable holding the bearer token (unset or empty = no auth).")
    p.add_argument("--api-token-file", "--token-file", dest="api_token_file",
                   default=os.environ.get("DIAGGYM_API_TOKEN_FILE") or None,
                   help="File holding the bearer token (a mounted Secret; default $DIAGGYM_API_TOKEN_FILE). "
                   "It wins over --api-token-env.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the baseline engines.")
    p.add_argument("--dtype", default="float32", help="Weights dtype of the transformers engine.")
    p.add_argument("--device", default="cpu", help="Device of the transformers engine.")
    p.add_argument("--access-log", action="store_true",
                   help="Log every request (uvicorn access log and KServe timings); off by default, it costs "
                   "throughput at hundreds of requests per second.")
    return p


def read_token(args: argparse.Namespace) -> str | None:
    if args.api_token_file:
        path = Path(args.api_token_file)
        if not path.is_file():
            raise InputError("API token file not found", path)
        token = path.read_text().strip()
        if not token:
            raise InputError("API token file is empty", path)
        return token
    return os.environ.get(args.api_token_env, "").strip() or None


def build_model(args: argparse.Namespace):
    """Engine + catalog + cases → a :class:`DiagGymModel` (not yet warmed up)."""
    from diaggym.cases import load_cases
    from diaggym.engines import make_engine
    from diaggym.exam_stats import exam_kinds
    from diaggym_serving.model import DiagGymModel, Limits

    url = args.engine_url or (f"http://{args.predictor_host}/v1" if args.predictor_host else None)
    engine_kind = args.engine or ("openai" if url else "transformers")
    cases = list(load_cases(args.cases)) if args.cases else []
    train = [c for c in cases if c.split in (None, "train")]
    kinds = exam_kinds(train)
    model_dir = args.model_dir
    if engine_kind == "transformers" and model_dir is None and Path("/mnt/models/config.json").is_file():
        model_dir = "/mnt/models"
    registry_info = None
    if model_dir and str(model_dir).startswith("models:/"):  # a registry version, downloaded through MLflow
        from diaggym.registry import download

        model_dir, registry_info = download(model_dir)
        log.info("serving %s: version %s (%s)", args.model_dir, registry_info["version"], model_dir)
    if engine_kind == "openai":
        engine = make_engine("openai", url=url, served_model=args.served_model, timeout=args.request_timeout,
                             api_key=os.environ.get("DIAGGYM_PREDICTOR_API_KEY"), concurrency=args.max_concurrency)
    elif engine_kind == "transformers":
        if args.engine_process:
            from diaggym_serving.engine_process import EngineProcess

            engine = EngineProcess({"model_dir": model_dir, "device": args.device, "dtype": args.dtype,
                                    "max_batch_size": args.max_batch})
        else:
            engine = make_engine("transformers", model=model_dir, device=args.device, dtype=args.dtype,
                                 max_batch_size=args.max_batch)
    else:
        engine = make_engine(engine_kind, cases=train, seed=args.seed)
    limits = Limits(max_tokens=args.max_tokens_limit, max_instances=args.max_instances,
                    max_body_bytes=args.max_body_bytes, timeout_s=args.request_timeout,
                    context_length=args.context_length, max_concurrency=args.max_concurrency,
                    max_queue=args.max_queue, ready_recheck_s=args.ready_recheck_s)
    model = DiagGymModel(
        args.model_name, engine, dispatch=DISPATCH[engine_kind], limits=limits, exam_kinds=kinds,
        cases={c.case_id: c for c in cases},
        aliases=tuple(args.model_alias),
    )
    model.registry = registry_info  # named by /v1/models/NAME (None when not served from the registry)
    return model


async def run(model, host: str, port: int, token: str | None, access_log: bool = False,
              args: argparse.Namespace | None = None) -> None:
    """Serve until SIGINT/SIGTERM (drained, see :mod:`diaggym_serving.http`); readiness follows the engine."""
    from diaggym_serving import metrics
    from diaggym_serving.app import install
    from diaggym_serving.http import DrainingServer, header_timeout_protocol
    from diaggym_serving.kserve_import import ModelServer, RESTServer, app

    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=32, thread_name_prefix="diaggym"))
    metrics.init_labels()
    server = ModelServer(http_port=port, enable_grpc=False, enable_latency_logging=False)
    if not access_log:  # after ModelServer, which (re)configures logging
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("httpx", "httpx2", "httpcore", "openai"):  # one INFO line per upstream call otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    # FastAPI's warnings about KServe's routes (ORJSONResponse, a shadowed operation id) are not per request
    # and not ours to fix; they would only interleave with the request log.
    warnings.filterwarnings("ignore", module=r"fastapi\..*")
    server.register_model(model)
    opts = args or build_parser().parse_args([])
    install(app, model, token=token, body_timeout_s=opts.body_timeout,
            registered=lambda: server.dataplane.model_registry.get_model(model.name) is model)
    if getattr(model, "registry", None):  # before KServe's own /v1/models/NAME: the answer names the version

        @app.get(f"/v1/models/{model.name}")
        async def model_status() -> dict:
            from kserve.errors import ModelNotReady

            if not model.ready:
                raise ModelNotReady(model.name)
            return {"name": model.name, "ready": True, "registry": model.registry}
    rest = RESTServer(
        "kserve.model_server:app", server.dataplane, server.model_repository_extension, port,
        grace_period=opts.graceful_timeout,
    )
    rest.config.host = host  # KServe hard-codes 0.0.0.0
    rest.config.http = header_timeout_protocol(opts.header_timeout)
    # Cases, catalog and model objects live as long as the server: keep them out of the cyclic GC's
    # scans, whose full collections otherwise show up as latency spikes of hundreds of milliseconds.
    gc.collect()
    gc.freeze()
    warming = loop.create_task(model.keep_warming())
    try:
        rest.create_application()
        await DrainingServer(rest.config, model, opts.drain_seconds).serve()
    finally:
        warming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await warming
        await model.aclose()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        token = read_token(args)
        model = build_model(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("serving %r on http://%s:%d (engine %s, auth %s)", args.model_name, args.host, args.http_port,
             model.engine.name, "on" if token else "off")
    asyncio.run(run(model, args.host, args.http_port, token, access_log=args.access_log, args=args))
    return 0
