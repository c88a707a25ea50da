"""A tiny OpenAI-compatible completions server for tests: a real engine behind real HTTP, with fault modes.

The :class:`~diaggym.engines.openai_compat.OpenAIEngine` is tested against this server rather than a
mock, so the official ``openai`` client, httpx, the sockets and uvicorn are all in the loop.
``POST /v1/completions`` answers with whatever :class:`~diaggym.engines.base.Engine` it is given
(the tests use a ``MarginalEngine``), and the request's ``model`` selects a fault mode:

=================  ==========================================================================
model              behaviour
=================  ==========================================================================
anything else      a normal completion from the engine (seed, max_tokens, stop honoured)
``flaky:N``        the first N requests with this exact model name get 503, then normal
``ratelimit:N``    the first N requests with this exact model name get 429, then normal
``down``           always 503
``slow:S``         sleeps S seconds (without blocking other requests), then normal; a client that
                   disconnects meanwhile is logged with status 499 (nginx's "client closed request")
``junk``           200 with a JSON body that has no ``choices``
``junk-text``      200 with ``choices[0].text`` a number
``html``           200 with an HTML page (what a misrouted proxy answers)
``broken-json``    200 with a truncated JSON body
``raw``            200, text = the completion + ``<SEP>`` + trailing junk, no ``usage``, no finish reason
``empty``          200 whose text is only ``<SEP>`` (a model that stops at once)
``bad``            400 with an OpenAI-style error body
=================  ==========================================================================

A normal completion reports ``usage.prompt_tokens_details.cached_tokens`` as the word count of the
longest earlier prompt that is a prefix of this one: a toy prefix cache.  Tokens are words
(``len(text.split())``); ``max_tokens`` cuts the completion to that many words (finish ``length``).

Whatever the model name, two attributes change every request's behaviour at run time (a slow or
failing predictor behind a server under test, whose own warm-up probe must still pass):
``delay_s`` delays each request that asks for more than one token (disconnects noticed as for
``slow:S``), and ``fail_status`` answers every request (probes too) with that HTTP status.
``max_model_len`` is reported in ``/v1/models`` as vLLM does, when set.  ``cycle`` (a list) gives
requests that ask for more than one token a fault each, in turn: ``"ok"``, ``"slow"`` (sleeps
``cycle_delay_s``), ``"junk"`` (200 without choices) or an HTTP status such as ``"503"``.

The server runs uvicorn in a background thread on 127.0.0.1 (a free port, bound before the thread
starts, so there is no race) and records every request in :attr:`CompletionsServer.log`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from diaggym.cases import SEP
from diaggym.engines.base import Engine, EngineError, SamplingParams, cut_at_stop


@dataclass
class Logged:
    """One request as the server saw it."""

    model: str
    status: int
    time: float  # when the answer (or the client's disconnect) was seen
    start: float = 0.0  # when the request arrived
    body: dict | None = None


class CompletionsServer:
    """Serve ``engine`` at ``http://127.0.0.1:{port}/v1``; use as a context manager or call start/stop."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.log: list[Logged] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay_s = 0.0
        self.fail_status: int | None = None
        self.max_model_len: int | None = None
        self.cycle: list[str] = []
        self.cycle_delay_s = 1.0
        self._cycled = 0
        self._seen_by_model: Counter[str] = Counter()
        self._prompts: list[str] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            self._app(), log_level="warning", timeout_graceful_shutdown=1, lifespan="off", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ----------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 10.0) -> CompletionsServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"test completions server did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> CompletionsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget requests, fault counters and cached prompts (between tests)."""
        with self._lock:
            self.log.clear()
            self._seen_by_model.clear()
            self._prompts.clear()
            self.max_in_flight = 0
        self.delay_s = 0.0
        self.fail_status = None
        self.cycle = []
        self._cycled = 0

    def requests_for(self, model: str) -> list[Logged]:
        with self._lock:
            return [r for r in self.log if r.model == model]

    # ----------------------------------------------------------------- app
    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict:
            entry: dict = {"id": "marginal", "object": "model", "owned_by": "diaggym-tests"}
            if self.max_model_len:
                entry["max_model_len"] = self.max_model_len
            return {"object": "list", "data": [entry]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> JSONResponse:
            # A scripted judge: model "judge-N" answers "Score: N" / "Verdict: PASS"; "judge-garbage" rambles.
            body = await request.json()
            model = str(body.get("model", ""))
            prompt = str(body.get("messages", [{}])[-1].get("content", ""))
            if model == "judge-garbage":
                content = "Well, it depends on many factors; I'd say fairly similar overall."
            elif "Verdict:" in prompt:
                content = "Verdict: PASS\nReason: coherent."
            else:
                content = f"Score: {model.removeprefix('judge-')}\nReason: scripted."
            with self._lock:
                self.log.append(Logged(model=model, status=200, time=time.monotonic()))
            message = {"role": "assistant", "content": content}
            return JSONResponse(
                {
                    "id": "chat-1",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                }
            )

        @app.post("/v1/completions")
        async def completions(request: Request) -> JSONResponse:
            start = time.monotonic()
            body = await request.json()
            model = str(body.get("model", ""))
            counted = body.get("max_tokens") != 1  # in-flight counts leave out servers' one-token probes
            with self._lock:
                self.in_flight += counted
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                response = await self._respond(model, body, request)
            finally:
                with self._lock:
                    self.in_flight -= counted
            with self._lock:
                self.log.append(Logged(model, response.status_code, time.monotonic(), start, body))
            return response

        return app

    async def _respond(self, model: str, body: dict, request: Request) -> JSONResponse:
        mode, _, arg = model.partition(":")
        probe = body.get("max_tokens") == 1  # a server's warm-up / readiness probe
        if self.fail_status:
            return _error(self.fail_status, "server_error", f"failing on purpose with {self.fail_status}")
        if self.delay_s and not probe and not await _sleep_unless_gone(self.delay_s, request):
            return _error(499, "client_closed_request", "the client went away while the server was slow")
        if self.cycle and not probe:
            with self._lock:
                fault = self.cycle[self._cycled % len(self.cycle)]
                self._cycled += 1
            if fault == "slow" and not await _sleep_unless_gone(self.cycle_delay_s, request):
                return _error(499, "client_closed_request", "the client went away while the server was slow")
            if fault == "junk":
                return JSONResponse({"id": "cmpl-junk", "object": "text_completion", "model": model})
            if fault.isdigit():
                return _error(int(fault), "server_error", f"failing on purpose with {fault}")
        with self._lock:
            self._seen_by_model[model] += 1
            nth = self._seen_by_model[model]
        if mode == "flaky" and nth <= int(arg or 1):
            return _error(503, "server_error", f"flaky: failing request {nth} of {arg}")
        if mode == "ratelimit" and nth <= int(arg or 1):
            return _error(429, "rate_limit_exceeded", "too many requests")
        if mode == "down":
            return _error(503, "server_error", "the engine is down")
        if mode == "bad":
            return _error(400, "invalid_request_error", "bad request (fault mode)")
        if mode == "junk":
            return JSONResponse({"id": "cmpl-junk", "object": "text_completion", "model": model})
        if mode == "html":
            return HTMLResponse("<html><body>502 Bad Gateway? No: 200 OK from a proxy</body></html>")
        if mode == "broken-json":
            return Response('{"choices": [', media_type="application/json")
        if mode == "slow" and not await _sleep_unless_gone(float(arg or 1), request):
            return _error(499, "client_closed_request", "the client went away while the server was slow")
        return self._complete(model, mode, body)

    def _complete(self, model: str, mode: str, body: dict) -> JSONResponse:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return _error(400, "invalid_request_error", "'prompt' must be one string in this test server")
        try:
            params = _sampling_params(body)
            completion = self.engine.generate([prompt], params)[0]
        except (ValueError, TypeError) as err:
            return _error(400, "invalid_request_error", str(err))
        except EngineError as err:
            return _error(400 if err.reason == "bad_prompt" else 500, err.reason, str(err))
        text, _ = cut_at_stop(completion.text, params.stop)
        words = text.split()
        finish = completion.finish_reason  # a baseline engine cuts at max_tokens words itself
        if len(words) > params.max_tokens:
            text, finish = " ".join(words[: params.max_tokens]), "length"
        prompt_tokens, cached = len(prompt.split()), self._cached_words(prompt)
        choice: dict = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        out: dict = {"id": f"cmpl-{id(completion)}", "object": "text_completion", "created": int(time.time())}
        out.update(model=model, choices=[choice])
        out["usage"] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(text.split()),
            "total_tokens": prompt_tokens + len(text.split()),
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        if mode == "junk-text":
            choice["text"] = 42
        elif mode == "empty":
            choice["text"] = SEP
        elif mode == "raw":
            choice.update(text=f"  {text}{SEP}Exam name:\nmore<|endoftext|>", finish_reason=None)
            del out["usage"]
        return JSONResponse(out)

    def _cached_words(self, prompt: str) -> int:
        with self._lock:
            hit = max((len(p.split()) for p in self._prompts if prompt.startswith(p)), default=0)
            self._prompts.append(prompt)
        return hit


async def _sleep_unless_gone(seconds: float, request: Request) -> bool:
    """Sleep without blocking other requests; False as soon as the client disconnects (it timed out)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await request.is_disconnected():
            return False
        await asyncio.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
    return True


def _sampling_params(body: dict) -> SamplingParams:
    stop = body.get("stop") or []
    return SamplingParams(
        max_tokens=int(body.get("max_tokens") or 16),
        temperature=float(body.get("temperature", 1.0)),
        top_p=float(body.get("top_p", 1.0)),
        seed=body.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
    )


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "code": code, "param": None}}, status_code=status)
