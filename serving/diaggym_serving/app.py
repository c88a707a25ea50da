"""Our routes and guards on KServe's FastAPI app.

KServe 0.21 registers its own OpenAI routes only for models built on vLLM's types, so the
OpenAI-compatible ``/openai/v1/completions`` is mounted here, and so is ``:predict`` (strict
JSON parsing, the body schema in the OpenAPI document, errors in our shape).  Routes
registered here come before KServe's, so ours win where paths coincide.

One ASGI guard runs first for every request and decides what KServe ever sees:

* only the routes in :data:`EXPOSED` are reachable; the model-repository routes
  (``/v2/repository/...``: load/unload) are 403 and everything else is 404, with or
  without a token, so no client can take the model down;
* bearer-token auth, the body-size limit and a body read timeout (a client that stalls
  mid-body gets 408);
* a client that disconnects cancels its request (and the upstream call under it); it is
  counted as ``client_closed``, not as an engine error;
* in-flight and per-route request metrics, and at most one log line per request:
  4xx at INFO, 5xx at WARNING, control characters in paths escaped;
* while the server drains (SIGTERM), every response says ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from diaggym.engines import SamplingParams
from diaggym_serving import metrics
from diaggym_serving.errors import ServingError, handler
from diaggym_serving.model import DiagGymModel, escape_line
from diaggym_serving.protocol import (
    BodyError,
    CompletionRequest,
    PredictRequest,
    check_prompt,
    describe,
    first_field,
    inline_schema,
    parse_body,
    validate,
)

log = logging.getLogger("diaggym.serving")

ASGIApp = Callable[..., Awaitable[None]]
OPEN_PATHS = {"/", "/metrics", "/v2/health/live", "/v2/health/ready"}
_NAME = r"(?P<name>[^/]+)"
# (method, path pattern, metrics route or None).  Anything not listed never reaches KServe.
EXPOSED: tuple[tuple[str, re.Pattern[str], str | None], ...] = tuple(
    (method, re.compile(pattern), route)
    for method, pattern, route in (
        ("GET", r"/", None),
        ("GET", r"/metrics", None),
        ("GET", r"/openapi\.json", None),
        ("GET", r"/v2/health/live", None),
        ("GET", r"/v2/health/ready", None),
        ("GET", r"/v1/models", None),
        ("GET", rf"/v1/models/{_NAME}", None),
        ("POST", rf"/v1/models/{_NAME}:predict", "predict"),
        ("GET", r"/v2", None),
        ("GET", r"/v2/models", None),
        ("GET", rf"/v2/models/{_NAME}", None),
        ("GET", rf"/v2/models/{_NAME}/ready", None),
        ("GET", r"/openai/v1/models", None),
        ("POST", r"/openai/v1/completions", "completions"),
    )
)
REFUSED_PREFIXES = ("/v2/repository", "/v1/repository")


def route_of(path: str) -> str | None:
    """The metrics label of a simulator route, or None for everything else (health, metrics)."""
    if path.endswith(":predict"):
        return "predict"
    if path == "/openai/v1/completions":
        return "completions"
    return None


class _TooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class Guard:
    """Pure ASGI middleware; see the module docstring."""

    def __init__(self, app: ASGIApp, model: DiagGymModel, token: str | None, max_body_bytes: int,
                 body_timeout_s: float = 30.0) -> None:
        self.app = app
        self.model = model
        self.token = token.encode() if token else None
        self.max_body = max_body_bytes
        self.body_timeout = body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":  # no route of this API is a websocket
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        route = route_of(path)
        start = time.perf_counter()
        state = {"code": 500, "started": False, "reason": None}
        draining = self.model.draining

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                state["code"] = message["status"]
                state["started"] = True
                if draining or self.model.draining:
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        if route:
            metrics.IN_FLIGHT.inc()
        closed = False
        try:
            refusal = self._refuse(scope, method, path)
            if refusal is not None:
                state["reason"] = refusal[1]
                metrics.ERRORS.labels(refusal[1]).inc()
                await _send_json(send_wrapper, *refusal)
                return
            try:
                closed = await self._run(scope, receive, send_wrapper, state)
            except _TooLarge:
                if state["started"]:
                    raise
                state["reason"] = "body_too_large"
                metrics.ERRORS.labels("body_too_large").inc()
                await _send_json(send_wrapper, 413, "body_too_large", f"the body is over {self.max_body} bytes")
            except _BodyTimeout:
                if state["started"]:
                    raise
                state["reason"] = "body_timeout"
                metrics.ERRORS.labels("body_timeout").inc()
                await _send_json(send_wrapper, 408, "body_timeout",
                                 f"the body did not arrive within {self.body_timeout:g} s", close=True)
        finally:
            outcome = "client_closed" if closed else _outcome(state["code"], state["reason"])
            if route:
                metrics.IN_FLIGHT.dec()
                metrics.REQUESTS.labels(route, outcome).inc()
                metrics.REQUEST_LATENCY.labels(route, outcome).observe(time.perf_counter() - start)
            self._log(method, path, state, outcome, time.perf_counter() - start)

    async def _run(self, scope, receive, send, state: dict) -> bool:
        """Run the app; True when the client disconnected first (the app is cancelled then)."""
        body_done = asyncio.Event()
        gone = asyncio.Event()
        received = 0
        scope["diaggym.state"] = state  # the error handler writes the reason here, the log line reads it

        async def app_receive():
            nonlocal received
            if body_done.is_set():  # after the body, the only message left is the disconnect
                await gone.wait()
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                raise _BodyTimeout from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _TooLarge
                if not message.get("more_body", False):
                    body_done.set()
            elif message["type"] == "http.disconnect":
                gone.set()
                body_done.set()
            return message

        app_task = asyncio.ensure_future(self.app(scope, app_receive, send))

        async def watch() -> None:
            await body_done.wait()
            if not gone.is_set():
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({app_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not app_task.done():
                # The client left before its answer: stop the work (and the engine call under it).
                app_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await app_task
                return True
            if gone.is_set() and not state["started"]:
                return True  # it left while its body was being read
            app_task.result()  # re-raise what the app raised
            return False
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if not app_task.done():  # the guard itself is cancelled (shutdown): take the app with it
                app_task.cancel()

    def _refuse(self, scope, method: str, path: str) -> tuple[int, str, str] | None:
        if path.startswith(REFUSED_PREFIXES):
            return 403, "forbidden", "the model repository (load/unload) is not exposed by this server"
        allowed = [m for m, pattern, _ in EXPOSED if (match := pattern.fullmatch(path))]
        if not allowed:
            return 404, "not_found", "no such route (see /openapi.json)"
        if method not in allowed and not (method == "HEAD" and "GET" in allowed):
            return 405, "method_not_allowed", f"use {' or '.join(sorted(set(allowed)))} here"
        headers = dict(scope.get("headers") or [])
        if self.token is not None and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                return 401, "unauthorized", "missing or wrong bearer token (header Authorization: Bearer TOKEN)"
        entry = next((match for m, p, _ in EXPOSED
                      if (m == method or (method == "HEAD" and m == "GET")) and (match := p.fullmatch(path))), None)
        if entry is not None and "name" in entry.re.groupindex:
            name = entry.group("name")
            canonical = self.model.canonical_name(name)
            if canonical is None:
                return 404, "model_not_found", (f"model {json.dumps(name[:100])} is not served here; "
                                                f"use {json.dumps(self.model.name)}")
            if canonical != name:  # an alias: KServe's own routes know only the canonical name
                scope["path"] = path[: entry.start("name")] + canonical + path[entry.end("name") :]
                scope["raw_path"] = scope["path"].encode()
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return 400, "invalid_request", "Content-Length is not a number"
            if n > self.max_body:
                return 413, "body_too_large", f"the body has {n} bytes, over this server's limit of {self.max_body}"
        return None

    @staticmethod
    def _log(method: str, path: str, state: dict, outcome: str, seconds: float) -> None:
        code = state["code"]
        if outcome == "client_closed":
            log.info("%s %s: client closed the connection after %.3f s", method, escape_line(path, 200), seconds)
        elif code >= 500:
            log.warning("%s %s -> %d %s (%.3f s)", method, escape_line(path, 200), code, state["reason"] or "", seconds)
        elif code >= 400:
            log.info("%s %s -> %d %s", method, escape_line(path, 200), code, state["reason"] or "")


def _outcome(status: int, reason: str | None) -> str:
    if status < 400:
        return "ok"
    if reason in ("overloaded", "not_ready"):
        return "unavailable"  # refused before the engine was asked: not an engine failure
    if status < 500:
        return "client_error"
    return "timeout" if status == 504 else "engine_error"


async def _send_json(send, status: int, reason: str, message: str, close: bool = False) -> None:
    body = json.dumps({"error": message, "reason": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _body_schema(model: type) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(model)}}}}


def install(app: FastAPI, model: DiagGymModel, token: str | None = None, body_timeout_s: float = 30.0,
            registered: Callable[[], bool] | None = None) -> None:
    """Mount our routes, error handler and guard on ``app`` (KServe's, before it adds its own).

    ``registered`` tells liveness whether the model is still in KServe's registry.
    """
    app.add_exception_handler(ServingError, handler)
    app.add_middleware(Guard, model=model, token=token, max_body_bytes=model.limits.max_body_bytes,
                       body_timeout_s=body_timeout_s)
    _publish_only_exposed(app)

    async def live() -> JSONResponse:
        why = model.not_alive()
        if why is None and registered is not None and not registered():
            why = "the model is no longer registered"
        return JSONResponse({"live": why is None, **({"reason": why} if why else {})},
                            status_code=200 if why is None else 503)

    app.add_api_route("/v2/health/live", live, methods=["GET"], include_in_schema=False)
    app.add_api_route("/", live, methods=["GET"], include_in_schema=False)

    @app.get("/v2/health/ready", include_in_schema=False)
    async def ready() -> JSONResponse:
        body = {"ready": model.is_ready()}
        if not body["ready"]:
            body["reason"] = model.not_ready_reason()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/openai/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "diaggym"}
                                           for n in model.served_names()]}

    @app.post("/v1/models/{model_name}:predict", openapi_extra=_body_schema(PredictRequest))
    async def predict(model_name: str, request: Request):
        return await model.predict(await _json_body(request))

    @app.post("/openai/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request):
        req = await _completion_request(request)
        if model.canonical_name(req.model) is None:
            raise ServingError(404, "model_not_found",
                               f"model: {json.dumps(req.model[:100])} is not served here; use {model.name!r}", "model")
        model.check_max_tokens(req.max_tokens, "max_tokens")
        prompts = req.prompts()
        if not prompts or len(prompts) > model.limits.max_instances:
            raise ServingError(400, "invalid_request",
                               f"prompt: give 1 to {model.limits.max_instances} prompts, got {len(prompts)}", "prompt")
        for i, p in enumerate(prompts):
            where = "prompt" if isinstance(req.prompt, str) else f"prompt[{i}]"
            if (why := check_prompt(p, where)) is not None:
                raise ServingError(400, "bad_prompt", why, where)
        params = SamplingParams(
            max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stops()
        )
        out = await model.complete(prompts, [params] * len(prompts), ["unknown"] * len(prompts), "completions")
        created = int(time.time())
        cid = f"cmpl-{uuid.uuid4().hex}"
        choices = [
            {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(out)
        ]
        usage = {
            "prompt_tokens": sum(c.prompt_tokens for c in out),
            "completion_tokens": sum(c.completion_tokens for c in out),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        body = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, "usage": usage}
        if not req.stream:
            return body

        async def events():
            # The engine returns whole completions, so a stream is one chunk per choice, then [DONE].
            for choice in choices:
                chunk = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                         "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def _publish_only_exposed(app: FastAPI) -> None:
    """``/openapi.json`` lists only what the guard lets through, each path by the route that serves it.

    KServe's own ``:predict`` (shadowed by ours) and its repository routes are left out.
    """

    def openapi() -> dict:
        if app.openapi_schema is None:
            seen: set[tuple[str, str]] = set()
            routes = []
            for route in app.routes:
                path, methods = getattr(route, "path", None), getattr(route, "methods", None) or set()
                if not isinstance(route, APIRoute) or not route.include_in_schema:
                    continue
                concrete = path.replace("{model_name}", "m")
                keep = {m for m in methods if (m, path) not in seen
                        and any(e == m and p.fullmatch(concrete) for e, p, _ in EXPOSED)}
                seen.update((m, path) for m in methods)
                if keep == methods:
                    routes.append(route)
            app.openapi_schema = get_openapi(title="DiagGym simulator", version="1", routes=routes,
                                             description="The simulator API: :predict and OpenAI completions.")
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _json_body(request: Request):
    try:
        return parse_body(await request.body())
    except BodyError as err:
        raise ServingError(400, "invalid_json", str(err), "body") from None


async def _completion_request(request: Request) -> CompletionRequest:
    payload = await _json_body(request)
    if not isinstance(payload, dict):
        raise ServingError(400, "invalid_request", "the body must be a JSON object", "body")
    try:
        return validate(CompletionRequest, payload)  # type: ignore[return-value]
    except ValidationError as err:
        raise ServingError(400, "invalid_request", describe(err), first_field(err)) from None
