"""Our routes and guards on KServe's FastAPI app.

KServe 0.21 registers its own OpenAI routes only for models built on vLLM's types, so the
OpenAI-compatible ``/openai/v1/completions`` is mounted here, next to a stricter
readiness route (ready = the engine answered its warm-up) and one ASGI guard that does,
for every request: bearer-token auth, the body-size limit, in-flight and per-route
request metrics.  Routes registered here come before KServe's, so ours win where paths
coincide (``/v2/health/ready``).
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from diaggym.engines import SamplingParams
from diaggym_serving import metrics
from diaggym_serving.errors import ServingError, handler
from diaggym_serving.model import DiagGymModel
from diaggym_serving.protocol import CompletionRequest, describe, first_field

OPEN_PATHS = {"/", "/metrics", "/v2/health/live", "/v2/health/ready"}
ASGIApp = Callable[..., Awaitable[None]]


def route_of(path: str) -> str | None:
    """The metrics label of a simulator route, or None for everything else (health, metrics)."""
    if path.endswith(":predict"):
        return "predict"
    if path == "/openai/v1/completions":
        return "completions"
    return None


class _TooLarge(Exception):
    pass


class Guard:
    """Pure ASGI middleware: auth, body limit, in-flight gauge, request count/latency by route and outcome."""

    def __init__(self, app: ASGIApp, token: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = route_of(path)
        start = time.perf_counter()
        status = {"code": 500, "started": False}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
            await send(message)

        if route:
            metrics.IN_FLIGHT.inc()
        try:
            refusal = self._refuse(scope, path)
            if refusal is not None:
                await _send_json(send_wrapper, *refusal)
                return
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise _TooLarge
                return message

            try:
                await self.app(scope, limited_receive, send_wrapper)
            except _TooLarge:
                if status["started"]:
                    raise
                metrics.ERRORS.labels("body_too_large").inc()
                await _send_json(send_wrapper, 413, "body_too_large", f"the body is over {self.max_body} bytes")
        finally:
            if route:
                metrics.IN_FLIGHT.dec()
                outcome = _outcome(status["code"])
                metrics.REQUESTS.labels(route, outcome).inc()
                metrics.REQUEST_LATENCY.labels(route, outcome).observe(time.perf_counter() - start)

    def _refuse(self, scope, path: str) -> tuple[int, str, str] | None:
        headers = dict(scope.get("headers") or [])
        if self.token is not None and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                metrics.ERRORS.labels("unauthorized").inc()
                return 401, "unauthorized", "missing or wrong bearer token (header Authorization: Bearer TOKEN)"
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return 400, "invalid_request", "Content-Length is not a number"
            if n > self.max_body:
                metrics.ERRORS.labels("body_too_large").inc()
                return 413, "body_too_large", f"the body has {n} bytes, over this server's limit of {self.max_body}"
        return None


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status < 500:
        return "client_error"
    return "timeout" if status == 504 else "engine_error"


async def _send_json(send, status: int, reason: str, message: str) -> None:
    body = json.dumps({"error": message, "reason": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install(app: FastAPI, model: DiagGymModel, token: str | None = None) -> None:
    """Mount our routes, error handler and guard on ``app`` (KServe's, before it adds its own)."""
    app.add_exception_handler(ServingError, handler)
    app.add_middleware(Guard, token=token, max_body_bytes=model.limits.max_body_bytes)

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        body = {"ready": model.ready}
        if not model.ready and model.warmup_error:
            body["reason"] = model.warmup_error
        return JSONResponse(body, status_code=200 if model.ready else 503)

    @app.get("/openai/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model.name, "object": "model", "owned_by": "diaggym"}]}

    @app.post("/openai/v1/completions")
    async def completions(request: Request):
        req = await _completion_request(request)
        if req.model != model.name:
            raise ServingError(404, "model_not_found", f"model: {req.model!r} is not served here; use {model.name!r}",
                               "model")
        if req.max_tokens > model.limits.max_tokens:
            raise ServingError(400, "max_tokens_over_limit",
                               f"max_tokens: {req.max_tokens} is over this server's limit of {model.limits.max_tokens}",
                               "max_tokens")
        prompts = req.prompts()
        if not prompts or len(prompts) > model.limits.max_instances:
            raise ServingError(400, "invalid_request",
                               f"prompt: give 1 to {model.limits.max_instances} prompts, got {len(prompts)}", "prompt")
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
        body = {"id": cid, "object": "text_completion", "created": created, "model": model.name,
                "choices": choices, "usage": usage}
        if not req.stream:
            return body

        async def events():
            # The engine returns whole completions, so a stream is one chunk per choice, then [DONE].
            for choice in choices:
                chunk = {"id": cid, "object": "text_completion", "created": created, "model": model.name,
                         "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


async def _completion_request(request: Request) -> CompletionRequest:
    try:
        payload = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ServingError(400, "invalid_json", f"the body is not JSON: {err}", "body") from None
    if not isinstance(payload, dict):
        raise ServingError(400, "invalid_request", "the body must be a JSON object", "body")
    try:
        return CompletionRequest.model_validate(payload)
    except ValidationError as err:
        raise ServingError(400, "invalid_request", describe(err), first_field(err)) from None
