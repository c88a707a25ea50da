"""The simulator: "what would this exam show for this patient, given what we know so far?"

It is the only place that combines the text format and an engine: render the
diaggym-v1 prompt (profile, final diagnosis, history, next exam), ask the
engine, and parse the answer back into analytes.  Two modes:

* **step**: the caller gives the history (e.g. the real exams so far);
* **chain**: a list of exams is simulated in order and each generated result
  becomes history for the next one, as an RL episode does.  Many chains are
  advanced together, one batched engine call per step, so an engine with
  batching and prefix caching serves them efficiently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from diaggym.cases import Case, LabItem, Profile
from diaggym.engines.base import Completion, Engine, SamplingParams
from diaggym.serialization import parse_result, render_context, render_prompt


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


class Simulator:
    """Renders prompts, calls an engine, parses results.  ``exam_kinds`` (name → kind) sharpens parsing."""

    def __init__(self, engine: Engine, exam_kinds: dict[str, str] | None = None) -> None:
        self.engine = engine
        self.exam_kinds = exam_kinds or {}

    def simulate_many(
        self, requests: Sequence[SimRequest], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[SimResult]:
        completions = self.engine.generate([r.prompt() for r in requests], params)
        return [
            SimResult.from_completion(r.exam, c, self.exam_kinds.get(r.exam))
            for r, c in zip(requests, completions, strict=True)
        ]

    def simulate(self, request: SimRequest, params: SamplingParams | None = None) -> SimResult:
        return self.simulate_many([request], params)[0]

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
            step_params = (
                params
                if params.seed is None
                else SamplingParams(
                    params.max_tokens, params.temperature, params.top_p, params.seed + step, params.stop
                )
            )
            for i, res in zip(live, self.simulate_many(reqs, step_params), strict=True):
                out[i].append(res)
                histories[i] = histories[i] + [(res.exam, res.result)]
        return out
