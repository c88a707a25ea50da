"""Errors the server answers with: a status, a machine-readable reason, a message naming the field.

Error classes (``reason`` → status): ``invalid_json``, ``invalid_request``, ``bad_prompt``,
``max_tokens_over_limit``, ``too_many_instances``, ``unknown_case``, ``prompt_too_long``,
``bad_request`` → 400; ``unauthorized`` → 401; ``forbidden`` → 403; ``not_found``,
``model_not_found`` → 404; ``method_not_allowed`` → 405; ``body_timeout`` → 408;
``body_too_large`` → 413; ``overloaded``, ``not_ready`` and engine failures
(``connection``, ``server_error``, ``rate_limited``, ``bad_response``, ``engine_crash``) → 503,
with ``Retry-After`` where waiting helps; ``timeout`` → 504.  No message quotes a prompt.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from diaggym_serving import metrics

# Engine failures that are the caller's fault (a prompt too long for the model, one that is not diaggym-v1).
CLIENT_ENGINE_REASONS = {"prompt_too_long", "bad_request", "bad_prompt"}


class ServingError(Exception):
    """Raised anywhere in a request; turned into JSON by :func:`handler` and counted by reason."""

    def __init__(
        self, status: int, reason: str, message: str, field: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.field = field
        self.headers = headers or {}


def from_engine_error(err: Exception) -> ServingError:
    reason = getattr(err, "reason", "engine_error")
    if reason == "bad_prompt":  # the engine's own message may quote the prompt: say it in our words
        return ServingError(400, reason, "prompt: not a diaggym-v1 prompt (the engine could not read it)", "prompt")
    if reason in CLIENT_ENGINE_REASONS:
        return ServingError(400, reason, str(err), field="prompt" if reason == "prompt_too_long" else None)
    retry = {"Retry-After": "1"} if getattr(err, "retryable", False) else None
    return ServingError(503, reason, f"the world-model engine failed: {err}", headers=retry)


async def handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServingError)
    metrics.ERRORS.labels(exc.reason).inc()
    state = request.scope.get("diaggym.state")
    if isinstance(state, dict):  # the guard's one log line names the reason
        state["reason"] = exc.reason
    if request.url.path.startswith("/openai/"):
        # OpenAI's error shape, so the official client raises its typed errors with our message.
        body = {
            "error": {
                "message": exc.message,
                "type": "invalid_request_error" if exc.status < 500 else "server_error",
                "param": exc.field,
                "code": exc.reason,
            }
        }
    else:
        body = {"error": exc.message, "reason": exc.reason}
        if exc.field:
            body["field"] = exc.field
    headers = dict(exc.headers)
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=exc.status, headers=headers or None)
