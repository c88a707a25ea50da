"""The DiagGym simulator as a KServe model: instances in, parsed exam results out.

Like KServe's ``huggingfaceserver``, the server is one small ``kserve.Model`` subclass;
everything clinical (prompt rendering, parsing) comes from :mod:`diaggym.simulator`, and
everything about the world model from an :class:`~diaggym.engines.Engine`, in process or
remote (a vLLM predictor).  KServe's default transformer behaviour (forwarding v1/v2
payloads to ``--predictor_host``) is replaced: vLLM speaks the OpenAI API, so the engine
talks to it directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from diaggym.cases import Case, Profile
from diaggym.engines import Completion, Engine, EngineError, SamplingParams
from diaggym.simulator import SimRequest, Simulator
from diaggym_serving import metrics
from diaggym_serving.batcher import EngineRunner
from diaggym_serving.errors import ServingError, from_engine_error
from diaggym_serving.kserve_import import kserve
from diaggym_serving.protocol import Instance, PredictRequest, describe, first_field, validate

log = logging.getLogger("diaggym.serving")

WARMUP_EXAM = "Complete Blood Count (CBC)"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it the answer is a 4xx naming the field."""

    max_tokens: int | None = None  # None: only the model's context bounds max_tokens
    max_instances: int = 64
    max_body_bytes: int = 4 * 1024 * 1024
    timeout_s: float = 120.0
    context_length: int | None = None  # None: what the engine reports (vLLM's max_model_len, the config's)
    max_concurrency: int = 64  # requests in the engine at once
    max_queue: int = 256  # requests waiting for a slot; beyond it, 503 overloaded with Retry-After
    ready_recheck_s: float = 10.0  # how often readiness is re-checked once ready (when no request succeeded)


class DiagGymModel(kserve.Model):
    """``:predict`` per contract 3, plus the engine behind ``/openai/v1/completions``."""

    def __init__(
        self,
        name: str,
        engine: Engine,
        dispatch: str = "batch",
        limits: Limits | None = None,
        exam_kinds: dict[str, str] | None = None,
        cases: dict[str, Case] | None = None,
        aliases: tuple[str, ...] = (),
    ) -> None:
        super().__init__(name)
        self.engine = engine
        self.runner = EngineRunner(engine, dispatch)
        self.limits = limits or Limits()
        self.simulator = Simulator(engine, exam_kinds)
        self.cases = cases or {}
        self.warmup_error: str | None = "warming up: the engine has not answered yet"
        self.ready = False
        self.aliases = tuple(a for a in dict.fromkeys(aliases) if a and a != name)
        self.draining = False  # SIGTERM received: not ready, finishing what is in flight
        self.closed = False
        self.context_length = self.limits.context_length
        self._slots = asyncio.Semaphore(self.limits.max_concurrency)
        self._admitted = 0
        self._last_ok = 0.0  # monotonic time of the last engine success (readiness needs no probe then)

    # ------------------------------------------------------------------ names, health
    def served_names(self) -> list[str]:
        return [self.name, *self.aliases]

    def canonical_name(self, name: str) -> str | None:
        """The served name for ``name`` (itself or a configured alias, e.g. the reference's ``EHRGenerator``)."""
        return self.name if name == self.name or name in self.aliases else None

    def is_ready(self) -> bool:
        return self.ready and not self.draining and not self.closed

    def not_ready_reason(self) -> str:
        if self.draining:
            return "shutting down: finishing the requests in flight"
        if self.closed:
            return "the engine is closed"
        return self.warmup_error or "not ready"

    def not_alive(self) -> str | None:
        """Why the process can no longer serve (liveness fails, Kubernetes restarts it), or None."""
        if self.closed:
            return "the engine was closed"
        return self.runner.broken()

    def check_max_tokens(self, max_tokens: int, field: str) -> None:
        """400 when ``max_tokens`` alone exceeds what this server allows (the prompt must fit too)."""
        limits = [(n, what) for n, what in ((self.limits.max_tokens, "this server's --max-tokens-limit"),
                                            (self.context_length, "the model's context length")) if n]
        for limit, what in sorted(limits):
            if max_tokens > limit:
                raise ServingError(400, "max_tokens_over_limit",
                                   f"{field}: {max_tokens} is over the limit of {limit} tokens ({what}; "
                                   "prompt + max_tokens must fit in the context)", field)

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> bool:
        """The engine is built by the caller; readiness waits for :meth:`warm_up`."""
        return self.ready

    async def warm_up(self) -> bool:
        """One tiny generation; the model is ready only once the engine has answered it."""
        prompt = SimRequest(Profile(sex="F", age=50), "Warm-up request", [], WARMUP_EXAM).prompt()
        try:
            # The deadline lets a remote engine give up by itself, so the reason is its last error, not ours.
            deadline = time.monotonic() + self.limits.timeout_s
            await asyncio.wait_for(
                self.runner.generate([prompt], [SamplingParams(max_tokens=1, temperature=0.0)], deadline=deadline),
                self.limits.timeout_s + 1.0,
            )
        except Exception as err:  # noqa: BLE001 - reported by the readiness route and retried
            self.warmup_error = f"{type(err).__name__}: {err}"
            self.ready = False
        else:
            self.warmup_error = None
            self.ready = True
            self._last_ok = time.monotonic()
            if self.context_length is None:
                loop = asyncio.get_running_loop()
                self.context_length = await loop.run_in_executor(None, _engine_context, self.engine)
        metrics.READY.set(1 if self.is_ready() else 0)
        return self.ready

    async def keep_warming(self, interval_s: float = 2.0, max_interval_s: float = 30.0) -> None:
        """Warm up until the engine answers, then keep checking it: readiness follows the engine.

        Once ready, the engine is probed again every ``ready_recheck_s`` unless a request succeeded in that
        time; a failed probe turns the server not-ready until a later probe (with backoff) succeeds.
        """
        delay = interval_s
        was_ready = False
        while not self.draining:
            recent = self.ready and time.monotonic() - self._last_ok < self.limits.ready_recheck_s
            if recent or await self.warm_up():
                if not was_ready:
                    log.info("engine ready")
                was_ready, delay = True, interval_s
                await asyncio.sleep(self.limits.ready_recheck_s)
                continue
            log.warning("engine not ready (%s); retrying in %.0f s", escape_line(self.warmup_error or ""), delay)
            was_ready = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_interval_s)
        metrics.READY.set(0)

    async def aclose(self) -> None:
        self.closed = True
        metrics.READY.set(0)
        await self.runner.close()

    # ------------------------------------------------------------------ requests
    def parse_request(self, payload: Any) -> PredictRequest:
        if not isinstance(payload, dict):
            raise ServingError(400, "invalid_request", "the body must be a JSON object with 'instances'", "body")
        try:
            req = validate(PredictRequest, payload)
        except ValidationError as err:
            raise ServingError(400, "invalid_request", describe(err), first_field(err)) from None
        if len(req.instances) > self.limits.max_instances:
            raise ServingError(
                400,
                "too_many_instances",
                f"instances: {len(req.instances)} given, at most {self.limits.max_instances} per request",
                "instances",
            )
        for i, inst in enumerate(req.instances):
            self.check_max_tokens(inst.max_tokens, f"instances[{i}].max_tokens")
            if inst.case_id is not None and inst.case_id not in self.cases:
                held = f"{len(self.cases)} cases" if self.cases else "no cases (start it with --cases DIR)"
                raise ServingError(
                    400,
                    "unknown_case",
                    f"instances[{i}].case_id: {json.dumps(inst.case_id[:100])} is not a case this server holds "
                    f"({held})",
                    f"instances[{i}].case_id",
                )
        return req

    def sim_request(self, inst: Instance) -> SimRequest:
        history = [(h.name, h.result) for h in inst.history]
        if inst.case_id is not None:
            return SimRequest.for_case(self.cases[inst.case_id], inst.exam, history)
        assert inst.final_diagnosis is not None
        return SimRequest(inst.profile_object(), inst.final_diagnosis, history, inst.exam)

    async def complete(
        self, prompts: list[str], params: list[SamplingParams], kinds: list[str], route: str
    ) -> list[Completion]:
        """Prompts through the engine within the request deadline; metrics per exam; typed errors.

        At most ``max_concurrency`` requests are in the engine and ``max_queue`` wait for a slot; more is a 503
        ``overloaded`` with ``Retry-After``.  The deadline (``timeout_s`` from arrival, waiting included) goes
        down to the engine, so a remote call is cancelled at the deadline and never retried past it.
        """
        retry = {"Retry-After": "1"}
        if not self.ready:  # while draining it still serves: routing away is the readiness route's job
            raise ServingError(503, "not_ready", f"the engine is not ready ({self.not_ready_reason()})",
                               headers={"Retry-After": "2"})
        if self._admitted >= self.limits.max_concurrency + self.limits.max_queue:
            raise ServingError(503, "overloaded", f"the server is saturated ({self._admitted} requests admitted); "
                               "retry after the Retry-After delay", headers=retry)
        deadline = time.monotonic() + self.limits.timeout_s  # asyncio's loop clock is time.monotonic too
        start = time.perf_counter()
        self._admitted += 1
        try:
            async with asyncio.timeout(self.limits.timeout_s):
                async with self._slots:
                    out = await self.runner.generate(prompts, params, deadline=deadline)
        except TimeoutError:
            self._count_exams(kinds, "timeout", time.perf_counter() - start)
            raise ServingError(
                504, "timeout", f"the engine did not answer within {self.limits.timeout_s:g} s"
            ) from None
        except EngineError as err:
            self._count_exams(kinds, "timeout" if err.reason == "timeout" else "engine_error",
                              time.perf_counter() - start)
            if err.reason == "timeout":
                raise ServingError(504, "timeout", f"the engine did not answer in time: {err}") from None
            raise from_engine_error(err) from None
        except asyncio.CancelledError:
            self._count_exams(kinds, "client_closed", time.perf_counter() - start)
            raise
        finally:
            self._admitted -= 1
        self._last_ok = time.monotonic()
        self._count_exams(kinds, "ok", time.perf_counter() - start)
        metrics.PROMPT_TOKENS.labels(route).inc(sum(c.prompt_tokens for c in out))
        metrics.COMPLETION_TOKENS.labels(route).inc(sum(c.completion_tokens for c in out))
        return out

    @staticmethod
    def _count_exams(kinds: list[str], outcome: str, seconds: float) -> None:
        for kind in kinds:
            metrics.EXAMS.labels(kind, outcome).inc()
            metrics.EXAM_LATENCY.labels(kind, outcome).observe(seconds)

    def kind_of(self, exam: str) -> str:
        return self.simulator.exam_kinds.get(exam, "unknown")

    async def predict(self, payload: Any, headers: dict[str, str] | None = None, response_headers=None) -> dict:
        req = self.parse_request(payload)
        sims = [self.sim_request(inst) for inst in req.instances]
        params = [
            SamplingParams(max_tokens=i.max_tokens, temperature=i.temperature, top_p=i.top_p, seed=i.seed)
            for i in req.instances
        ]
        kinds = [self.kind_of(i.exam) for i in req.instances]

        async def generate(prompts: list[str], plist: list[SamplingParams]) -> list[Completion]:
            return await self.complete(prompts, plist, kinds, "predict")

        results = await self.simulator.asimulate_many(sims, params, generate)
        return {"predictions": [{**res.to_dict(), "unparsed_lines": res.unparsed_lines} for res in results]}


def _engine_context(engine: Engine) -> int | None:
    """The context length the engine knows (vLLM's ``max_model_len``, a model config's positions), or None."""
    probe = getattr(engine, "context_length", None)
    if callable(probe):
        try:
            probe = probe()
        except Exception as err:  # noqa: BLE001 - optional information
            log.info("could not read the engine's context length: %s", escape_line(str(err)))
            return None
    if probe is None:
        probe = getattr(engine, "max_positions", None)
    return probe if isinstance(probe, int) and probe > 0 else None


def escape_line(text: str, limit: int = 300) -> str:
    """One log line's worth of ``text``: control characters escaped, length bounded."""
    out = text.encode("unicode_escape").decode("ascii")
    return out if len(out) <= limit else out[:limit] + "..."
