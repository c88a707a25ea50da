"""Errors the server answers with: a status, a machine-readable reason, a message naming the field."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from diaggym_serving import metrics

# Engine failures that are the caller's fault (a prompt too long for the model, an empty prompt).
CLIENT_ENGINE_REASONS = {"prompt_too_long", "bad_request"}


class ServingError(Exception):
    """Raised anywhere in a request; turned into JSON by :func:`handler` and counted by reason."""

    def __init__(self, status: int, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.field = field


def from_engine_error(err: Exception) -> ServingError:
    reason = getattr(err, "reason", "engine_error")
    if reason in CLIENT_ENGINE_REASONS:
        return ServingError(400, reason, str(err), field="prompt" if reason == "prompt_too_long" else None)
    return ServingError(503, reason, f"the world-model engine failed: {err}")


async def handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServingError)
    metrics.ERRORS.labels(exc.reason).inc()
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
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(body, status_code=exc.status, headers=headers)
