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
from diaggym_serving.protocol import Instance, PredictRequest, describe, first_field

log = logging.getLogger("diaggym.serving")

WARMUP_EXAM = "Complete Blood Count (CBC)"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it the answer is a 4xx naming the field."""

    max_tokens: int = 2048
    max_instances: int = 64
    max_body_bytes: int = 4 * 1024 * 1024
    timeout_s: float = 120.0


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
        max_batch: int = 32,
        batch_wait_ms: float = 5.0,
    ) -> None:
        super().__init__(name)
        self.engine = engine
        self.runner = EngineRunner(engine, dispatch, max_batch=max_batch, max_wait_ms=batch_wait_ms)
        self.limits = limits or Limits()
        self.simulator = Simulator(engine, exam_kinds)
        self.cases = cases or {}
        self.warmup_error: str | None = "warming up: the engine has not answered yet"
        self.ready = False

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> bool:
        """The engine is built by the caller; readiness waits for :meth:`warm_up`."""
        return self.ready

    async def warm_up(self) -> bool:
        """One tiny generation; the model is ready only once the engine has answered it."""
        prompt = SimRequest(Profile(sex="F", age=50), "Warm-up request", [], WARMUP_EXAM).prompt()
        try:
            await asyncio.wait_for(
                self.runner.generate([prompt], [SamplingParams(max_tokens=1, temperature=0.0)]),
                self.limits.timeout_s,
            )
        except Exception as err:  # noqa: BLE001 - reported by the readiness route and retried
            self.warmup_error = f"{type(err).__name__}: {err}"
            self.ready = False
        else:
            self.warmup_error = None
            self.ready = True
        metrics.READY.set(1 if self.ready else 0)
        return self.ready

    async def keep_warming(self, interval_s: float = 2.0, max_interval_s: float = 30.0) -> None:
        """Retry the warm-up until it succeeds (a vLLM predictor may need minutes to start)."""
        delay = interval_s
        while not await self.warm_up():
            log.warning("engine not ready yet (%s); retrying in %.0f s", self.warmup_error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_interval_s)
        log.info("engine ready")

    async def aclose(self) -> None:
        await self.runner.close()

    # ------------------------------------------------------------------ requests
    def parse_request(self, payload: Any) -> PredictRequest:
        if not isinstance(payload, dict):
            raise ServingError(400, "invalid_request", "the body must be a JSON object with 'instances'", "body")
        try:
            req = PredictRequest.model_validate(payload)
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
            if inst.max_tokens > self.limits.max_tokens:
                raise ServingError(
                    400,
                    "max_tokens_over_limit",
                    f"instances[{i}].max_tokens: {inst.max_tokens} is over this server's limit "
                    f"of {self.limits.max_tokens}",
                    f"instances[{i}].max_tokens",
                )
            if inst.case_id is not None and inst.case_id not in self.cases:
                held = f"{len(self.cases)} cases" if self.cases else "no cases (start it with --cases DIR)"
                raise ServingError(
                    400,
                    "unknown_case",
                    f"instances[{i}].case_id: {inst.case_id!r} is not a case this server holds ({held})",
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
        """Prompts through the engine with the request timeout; metrics per exam; typed errors."""
        if not self.ready:
            reason = f" ({self.warmup_error})" if self.warmup_error else ""
            raise ServingError(503, "not_ready", f"the engine has not answered its warm-up yet{reason}")
        start = time.perf_counter()
        try:
            out = await asyncio.wait_for(self.runner.generate(prompts, params), self.limits.timeout_s)
        except TimeoutError:
            self._count_exams(kinds, "timeout", time.perf_counter() - start)
            raise ServingError(
                504, "timeout", f"the engine did not answer within {self.limits.timeout_s:g} s"
            ) from None
        except EngineError as err:
            self._count_exams(kinds, "engine_error", time.perf_counter() - start)
            raise from_engine_error(err) from None
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
