"""The simulator: "what would this exam show for this patient, given what we know so far?"

It is the only place that combines the text format and an engine: render the
diaggym-v1 prompt (profile, final diagnosis, history, next exam), ask the
engine, and parse the answer back into analytes.  The CLI, the evaluator, the
server and the RL environment all go through it.  Its whole public surface::

    sim = Simulator(engine, exam_kinds(train_cases))   # exam_kinds: diaggym.exam_stats
    req = SimRequest.for_case(case, exam, history)     # or SimRequest(profile, diagnosis, history, exam)
    res = sim.simulate(req, params)                    # -> SimResult (text, parsed items, token counts)
    out = sim.simulate_many(reqs, params)              # one batched engine call
    out = await sim.asimulate_many(reqs, params)       # the same from async code (server, environment);
    res = await sim.asimulate(req, params)             # by default through engine.agenerate
    chains = sim.run_chains(starts, exam_lists, params)

* **step**: the caller gives the history (the real exams so far: :func:`history_before`);
* **chain**: a list of exams is simulated in order and each generated result
  becomes history for the next one, as an RL episode does.  Many chains are
  advanced together, one batched engine call per step, so an engine with
  batching and prefix caching serves them efficiently.

``params`` is a :class:`~diaggym.engines.base.SamplingParams` for all requests, one per
request, or ``None`` for the defaults defined there.  Engine failures raise
:class:`~diaggym.engines.base.EngineError`; the simulator adds no retries or timeouts
of its own (the engines and the server own those).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from diaggym.cases import Case, LabItem, Profile
from diaggym.engines.base import Completion, Engine, SamplingParams, params_for
from diaggym.errors import InputError
from diaggym.serialization import case_events, parse_result, render_context, render_prompt

# An async engine call: prompts and one SamplingParams per prompt -> one Completion per prompt.
AsyncGenerate = Callable[[list[str], list[SamplingParams]], Awaitable[list[Completion]]]


@dataclass
class SimRequest:
    """One exam to simulate for one patient."""

    profile: Profile
    final_diagnosis: str
    history: list[tuple[str, str]]
    exam: str

    @classmethod
    def for_case(cls, case: Case, exam: str, history: Sequence[tuple[str, str]] = ()) -> SimRequest:
        return cls(case.profile, case.final_diagnosis, list(history), exam)

    def prompt(self) -> str:
        return render_prompt(render_context(self.profile, self.final_diagnosis), self.history, self.exam)


@dataclass
class SimResult:
    """A generated result, parsed."""

    exam: str
    result: str
    items: list[LabItem]
    complete: bool  # every line of a lab-shaped result parsed
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    unparsed_lines: list[str] = field(default_factory=list)

    @classmethod
    def from_completion(cls, exam: str, c: Completion, kind: str | None = None) -> SimResult:
        parsed = parse_result(c.text, exam, kind)
        return cls(
            exam=exam,
            result=parsed.text,
            items=parsed.items,
            complete=parsed.complete,
            finish_reason=c.finish_reason,
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            cached_prompt_tokens=c.cached_prompt_tokens,
            unparsed_lines=parsed.unparsed_lines,
        )

    def to_dict(self) -> dict:
        return {
            "exam": self.exam,
            "result": self.result,
            "items": [i.model_dump(exclude_none=True) for i in self.items],
            "complete": self.complete,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
        }


def history_before(case: Case, exam: str) -> list[tuple[str, str]]:
    """The case's real (name, result) events before its first ``exam``; all of them when it has none."""
    past: list[tuple[str, str]] = []
    for name, result in case_events(case):
        if name == exam:
            break
        past.append((name, result))
    return past


def pick_case(
    cases: Sequence[Case], case_id: str | None = None, split: str = "test", source: str | Path | None = None
) -> Case:
    """The case with ``case_id``, or the first case of ``split``; :class:`InputError` (naming ``source``) if none."""
    if case_id is None:
        case = next((c for c in cases if c.split == split), None)
        if case is None:
            raise InputError(f"no {split}-split case; pass a case id", source)
        return case
    case = next((c for c in cases if c.case_id == case_id), None)
    if case is None:
        raise InputError(f"no case with id {case_id!r}", source)
    return case


class Simulator:
    """Renders prompts, calls an engine, parses results.  ``exam_kinds`` (name → kind) sharpens parsing."""

    def __init__(self, engine: Engine, exam_kinds: dict[str, str] | None = None) -> None:
        self.engine = engine
        self.exam_kinds = exam_kinds or {}

    def _parse(self, requests: Sequence[SimRequest], completions: Sequence[Completion]) -> list[SimResult]:
        return [
            SimResult.from_completion(r.exam, c, self.exam_kinds.get(r.exam))
            for r, c in zip(requests, completions, strict=True)
        ]

    def simulate_many(
        self, requests: Sequence[SimRequest], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[SimResult]:
        return self._parse(requests, self.engine.generate([r.prompt() for r in requests], params))

    def simulate(self, request: SimRequest, params: SamplingParams | None = None) -> SimResult:
        return self.simulate_many([request], params)[0]

    async def asimulate_many(
        self,
        requests: Sequence[SimRequest],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        generate: AsyncGenerate | None = None,
    ) -> list[SimResult]:
        """:meth:`simulate_many` for async callers.

        ``generate`` is the async engine call (the server passes its micro-batcher with timeout and
        metrics); by default it is the engine's :meth:`~diaggym.engines.base.Engine.agenerate`.
        """
        prompts = [r.prompt() for r in requests]
        plist = params_for(params, len(prompts))
        completions = await (generate or self.engine.agenerate)(prompts, plist)
        return self._parse(requests, completions)

    async def asimulate(self, request: SimRequest, params: SamplingParams | None = None) -> SimResult:
        return (await self.asimulate_many([request], params))[0]

    def run_chains(
        self, starts: Sequence[SimRequest], exams: Sequence[Sequence[str]], params: SamplingParams | None = None
    ) -> list[list[SimResult]]:
        """Simulate ``exams[i]`` in order for patient ``starts[i]``; generated results become history.

        ``starts[i].history`` is the history before the first simulated exam (often empty).
        Chains of different lengths are fine: finished chains drop out of later batches.
        """
        if len(starts) != len(exams):
            raise ValueError(f"{len(starts)} chains but {len(exams)} exam lists")
        params = params or SamplingParams()
        histories = [list(s.history) for s in starts]
        out: list[list[SimResult]] = [[] for _ in starts]
        for step in range(max((len(e) for e in exams), default=0)):
            live = [i for i, e in enumerate(exams) if step < len(e)]
            reqs = [
                SimRequest(starts[i].profile, starts[i].final_diagnosis, histories[i], exams[i][step]) for i in live
            ]
            # A different seed per step keeps sampled chains reproducible without repeating draws.
            step_params = params if params.seed is None else replace(params, seed=params.seed + step)
            for i, res in zip(live, self.simulate_many(reqs, step_params), strict=True):
                out[i].append(res)
                histories[i] = histories[i] + [(res.exam, res.result)]
        return out
