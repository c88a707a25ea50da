"""One small interface for everything that writes exam results.

An engine turns prompts (diaggym-v1 text, see :mod:`diaggym.serialization`)
into completions.  The world model behind it may be an in-process
transformers model, a remote OpenAI-compatible server (vLLM, KServe), or a
baseline that never looks at the prompt's history (normal readings, marginal
sampling).  The simulator, the evaluator and the server only ever talk to this
interface, so any engine can stand in for any other.

Contract:

* ``generate`` takes a list of prompts and either one :class:`SamplingParams`
  for all of them or one per prompt, and returns one :class:`Completion` per
  prompt, in order;
* generation stops at ``<SEP>`` (a stop string) or the tokenizer's EOS; the
  returned text is cut there and stripped; ``finish_reason`` is ``"stop"`` then,
  ``"length"`` when ``max_tokens`` ran out first;
* the same prompt with the same ``seed`` gives the same text, whatever else is
  in the batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from diaggym.cases import SEP

FinishReason = Literal["stop", "length"]


class EngineError(RuntimeError):
    """An engine could not produce a completion (connection, timeout, server error, bad reply)."""

    def __init__(self, message: str, reason: str = "engine_error", retryable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion.  ``temperature == 0`` means greedy."""

    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = (SEP,)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    """One generated result."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # prompt tokens served from a prefix cache (engines that have one)
    meta: dict = field(default_factory=dict)


class Engine(ABC):
    """Prompts + sampling params → completions.  Subclasses implement :meth:`_generate`."""

    name: str = "engine"

    def generate(
        self, prompts: Sequence[str], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[Completion]:
        prompts = list(prompts)
        if params is None:
            params = SamplingParams()
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        if not prompts:
            return []
        out = self._generate(prompts, plist)
        if len(out) != len(prompts):
            raise EngineError(f"{self.name} returned {len(out)} completions for {len(prompts)} prompts")
        return out

    @abstractmethod
    def _generate(self, prompts: list[str], params: list[SamplingParams]) -> list[Completion]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (connections, caches)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cut_at_stop(text: str, stops: Sequence[str], eos: str | None = None) -> tuple[str, bool]:
    """(text before the first stop string or EOS, stripped; whether one was found)."""
    cut = len(text)
    for s in (*stops, *((eos,) if eos else ())):
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip(), cut < len(text)
