"""An engine that asks a remote OpenAI-compatible *completions* server (vLLM, KServe pass-through).

On the cluster the world model runs in vLLM's OpenAI server behind KServe; the simulator
reaches it through this engine.  The raw diaggym-v1 prompt goes out unchanged (no chat
template), with ``<SEP>`` as a stop string, so the server's prefix cache sees the same
append-only prompts that the in-process engine would.

Why the retries are ours and not the client's: the official client retries with its own
policy and hides what happened.  Here the policy is explicit and bounded (exponential backoff
with jitter on connection errors, timeouts, 429 and 5xx; never on other 4xx), and every
failure ends in an :class:`~diaggym.engines.base.EngineError` whose ``reason`` callers can
count (``connection``, ``timeout``, ``server_error``, ``rate_limited``, ``bad_request``,
``bad_response``) and whose message names the URL and the HTTP status.  A reply is never
turned into ``None`` or an empty completion silently.

One HTTP request per prompt, issued concurrently from a thread pool bounded by
``concurrency``: a batch of 32 prompts costs about one round trip, not 32, and the server's
continuous batching does the rest.  :meth:`OpenAIEngine.agenerate` is the same on an event
loop (the simulator server uses it): at most ``concurrency`` upstream calls at once, and a
cancelled caller closes its upstream connection at once.

A caller's ``deadline`` bounds everything: each attempt's timeout is cut to the time left,
and no retry starts (nor backoff sleeps) past it, so a request the caller gave up on never
turns into more load on an already slow server.

Only what the caller chose is sent: ``top_p`` and ``seed`` when set, ``stop`` when not
empty; otherwise the served model's own generation defaults apply, as with the reference
client (it never sends ``top_p``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import openai

from diaggym.engines.base import Completion, Engine, EngineError, FinishReason, SamplingParams, cut_at_stop
from diaggym.serialization import END_OF_TEXT

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
_STOP_REASONS = {"stop", "eos", "eos_token", "stop_sequence", "end_turn", "content_filter"}
_LENGTH_REASONS = {"length", "max_tokens"}


class RemoteEngineError(EngineError):
    """An :class:`EngineError` from a remote server, with the URL, the HTTP status and the attempts made."""

    def __init__(
        self, message: str, reason: str, retryable: bool, url: str, status: int | None = None, attempts: int = 1
    ) -> None:
        super().__init__(message, reason=reason, retryable=retryable)
        self.url = url
        self.status = status
        self.attempts = attempts


def classify(err: openai.OpenAIError) -> tuple[str, bool, int | None]:
    """(reason, retryable, HTTP status) of an error raised by the ``openai`` client."""
    if isinstance(err, openai.APITimeoutError):  # a subclass of APIConnectionError: test it first
        return "timeout", True, None
    if isinstance(err, openai.APIConnectionError):
        return "connection", True, None
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        if status == 429:
            return "rate_limited", True, status
        if status >= 500:
            return "server_error", True, status
        return "bad_request", False, status
    if isinstance(err, openai.APIResponseValidationError):
        return "bad_response", False, err.status_code
    return "engine_error", False, None


def map_finish_reason(raw: object, completion_tokens: int, max_tokens: int, found_stop: bool) -> FinishReason:
    """Map a server's finish reason onto ``stop``/``length``.

    A stop string or EOS found in the text means the result is complete (``stop``), even from a server
    that ignored ``stop`` and ran on; unknown reasons (vLLM's ``abort``, ``None``) are ``length`` only
    when the token budget ran out.
    """
    if found_stop:
        return "stop"
    if raw in _LENGTH_REASONS:
        return "length"
    if raw in _STOP_REASONS:
        return "stop"
    return "length" if completion_tokens >= max_tokens else "stop"


def _usage_int(obj: object, name: str) -> int:
    value = getattr(obj, name, None) if obj is not None else None
    return value if isinstance(value, int) and value >= 0 else 0


class OpenAIEngine(Engine):
    """Completions from any OpenAI-compatible ``/v1/completions`` endpoint.

    ``base_url`` is the API root (``http://host:8000/v1``).  ``max_retries`` retries follow the
    first attempt, so a request is tried at most ``max_retries + 1`` times; the wait before retry
    *k* (0-based) is about ``backoff * 2**k`` seconds, with jitter, capped at 30 s.
    ``tokenizer_eos`` is cut from the text too, for servers that do not strip it.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 16,
        tokenizer_eos: str | None = END_OF_TEXT,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.concurrency = concurrency
        self.tokenizer_eos = tokenizer_eos
        self.url = f"{self.base_url}/completions"
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0)
        self._api_key = api_key or "EMPTY"
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._jitter = random.Random()
        self._aclient: openai.AsyncOpenAI | None = None
        self._slots: asyncio.Semaphore | None = None

    # ----------------------------------------------------------------- batching
    def _generate(self, prompts: list[str], params: list[SamplingParams]) -> list[Completion]:
        return self.generate_until(prompts, params, None)

    def generate_until(
        self, prompts: list[str], params: list[SamplingParams], deadline: float | None
    ) -> list[Completion]:
        """:meth:`generate` that gives up at ``deadline`` (``time.monotonic()``), retries included."""
        if len(prompts) == 1:
            return [self._complete(prompts[0], params[0], deadline)]
        pool = self._get_pool()
        futures = [pool.submit(self._complete, p, sp, deadline) for p, sp in zip(prompts, params, strict=True)]
        return _results_in_order(futures)

    async def agenerate(
        self, prompts: list[str], params: list[SamplingParams], deadline: float | None = None
    ) -> list[Completion]:
        """The async form (one event loop: the server's): cancellation closes the upstream connections."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        if self._aclient is None:
            self._aclient = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self._api_key, timeout=self.timeout, max_retries=0
            )
            self._slots = asyncio.Semaphore(self.concurrency)
        try:
            async with asyncio.TaskGroup() as group:  # the first failure cancels the others
                tasks = [group.create_task(self._acomplete(p, sp, deadline))
                         for p, sp in zip(prompts, params, strict=True)]
        except BaseExceptionGroup as group_err:  # callers expect the engine's own error, not a group
            raise group_err.exceptions[0] from None
        return [t.result() for t in tasks]

    def context_length(self) -> int | None:
        """The served model's context as the server reports it (vLLM's ``max_model_len`` in ``/models``)."""
        for m in self._client.models.list().data:
            if m.id == self.model:
                value = getattr(m, "max_model_len", None) or (m.model_extra or {}).get("max_model_len")
                return value if isinstance(value, int) and value > 0 else None
        return None

    def _get_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai-engine")
            return self._pool

    # ----------------------------------------------------------------- one request
    def _complete(self, prompt: str, params: SamplingParams, deadline: float | None = None) -> Completion:
        attempt = 0
        while True:
            attempt += 1
            timeout = self._attempt_timeout(deadline, attempt)
            try:
                response = self._client.completions.create(**self._request(prompt, params), timeout=timeout)
            except openai.OpenAIError as err:
                reason, retryable, status = classify(err)
                delay = self._retry_delay(retryable, attempt, deadline)
                if delay is not None:
                    time.sleep(delay)
                    continue
                raise self._error(err, reason, retryable, status, attempt) from err
            except json.JSONDecodeError as err:  # a 200 whose JSON body is cut or corrupt
                raise self._bad_response(f"body is not valid JSON ({err})", attempt) from err
            return self._to_completion(response, params, attempt)

    async def _acomplete(self, prompt: str, params: SamplingParams, deadline: float | None) -> Completion:
        assert self._aclient is not None and self._slots is not None
        attempt = 0
        while True:
            attempt += 1
            async with self._slots:  # at most `concurrency` upstream calls at once
                timeout = self._attempt_timeout(deadline, attempt)
                try:
                    response = await self._aclient.completions.create(
                        **self._request(prompt, params), timeout=timeout
                    )
                except openai.OpenAIError as err:
                    reason, retryable, status = classify(err)
                    delay = self._retry_delay(retryable, attempt, deadline)
                    if delay is None:
                        raise self._error(err, reason, retryable, status, attempt) from err
                except json.JSONDecodeError as err:
                    raise self._bad_response(f"body is not valid JSON ({err})", attempt) from err
                else:
                    return self._to_completion(response, params, attempt)
            await asyncio.sleep(delay)

    def _attempt_timeout(self, deadline: float | None, attempt: int) -> float:
        if deadline is None:
            return self.timeout
        left = deadline - time.monotonic()
        if left <= 0:
            msg = f"POST {self.url}: the caller's deadline passed before attempt {attempt}"
            raise RemoteEngineError(msg, reason="timeout", retryable=True, url=self.url, attempts=attempt - 1)
        return min(self.timeout, left)

    def _retry_delay(self, retryable: bool, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before the next attempt, or None: no retry (not retryable, out of tries, or of time)."""
        if not retryable or attempt > self.max_retries:
            return None
        delay = self._delay(attempt - 1)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay

    def _request(self, prompt: str, params: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
        }
        if params.stop:
            kwargs["stop"] = list(params.stop)
        if params.top_p is not None:  # unset: the server's own default (the reference sends none)
            kwargs["top_p"] = params.top_p
        if params.seed is not None:
            kwargs["seed"] = params.seed
        return kwargs

    def _delay(self, retry: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, so clients spread out."""
        base = min(MAX_BACKOFF_S, self.backoff * 2**retry)
        return base / 2 + self._jitter.uniform(0, base / 2)

    def _error(
        self, err: openai.OpenAIError, reason: str, retryable: bool, status: int | None, attempts: int
    ) -> RemoteEngineError:
        what = f"HTTP {status}" if status is not None else reason.replace("_", " ")
        detail = str(err).strip() or type(err).__name__
        msg = f"POST {self.url} failed ({what}) after {attempts} attempt(s): {detail[:300]}"
        return RemoteEngineError(
            msg, reason=reason, retryable=retryable, url=self.url, status=status, attempts=attempts
        )

    def _bad_response(self, why: str, attempts: int) -> RemoteEngineError:
        msg = f"POST {self.url} returned a malformed reply (HTTP 200) after {attempts} attempt(s): {why}"
        return RemoteEngineError(
            msg, reason="bad_response", retryable=False, url=self.url, status=200, attempts=attempts
        )

    def _to_completion(self, response: object, params: SamplingParams, attempts: int) -> Completion:
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise self._bad_response(f"no choices in {type(response).__name__} {str(response)[:200]!r}", attempts)
        choice = choices[0]
        raw_text = getattr(choice, "text", None)
        if not isinstance(raw_text, str):
            raise self._bad_response(f"choices[0].text is {type(raw_text).__name__}, not a string", attempts)
        text, found_stop = cut_at_stop(raw_text, params.stop, self.tokenizer_eos)
        usage = getattr(response, "usage", None)
        completion_tokens = _usage_int(usage, "completion_tokens")
        raw_reason = getattr(choice, "finish_reason", None)
        meta = {"attempts": attempts, "raw_finish_reason": raw_reason, "model": getattr(response, "model", None)}
        if not text:  # a model may stop at once; pass that on, but visibly
            meta["empty"] = True
            log.warning("POST %s returned an empty completion (finish_reason %r)", self.url, raw_reason)
        return Completion(
            text=text,
            finish_reason=map_finish_reason(raw_reason, completion_tokens, params.max_tokens, found_stop),
            prompt_tokens=_usage_int(usage, "prompt_tokens"),
            completion_tokens=completion_tokens,
            cached_prompt_tokens=_usage_int(getattr(usage, "prompt_tokens_details", None), "cached_tokens"),
            meta=meta,
        )

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    async def aclose(self) -> None:
        """Close the async client (on the loop that used it)."""
        client, self._aclient = self._aclient, None
        if client is not None:
            await client.close()


def _results_in_order(futures: list[Future[Completion]]) -> list[Completion]:
    """Results in submission order; on the first failure, cancel what has not started and re-raise."""
    out = []
    for i, fut in enumerate(futures):
        try:
            out.append(fut.result())
        except BaseException:
            for rest in futures[i + 1 :]:
                rest.cancel()
            raise
    return out
