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

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from diaggym.cases import SEP
from diaggym.text_rules import cut_at_stop  # noqa: F401 - re-exported: the engines cut their text with it

FinishReason = Literal["stop", "length"]


@dataclass
class FeedItem:
    """One prompt waiting for an engine that batches continuously (see :class:`Feed`).

    ``deliver`` receives the completion, or the exception that failed this prompt alone; it is called
    from the engine's thread.  ``cancelled`` says the caller gave up (the item is then dropped untaken).
    """

    prompt: str
    params: SamplingParams
    deliver: Callable[[Completion | BaseException], None]
    cancelled: Callable[[], bool] = lambda: False


class Feed(Protocol):
    """Where an engine that batches continuously (``run_feed``) takes its prompts from."""

    def take(self, n: int, block: bool) -> list[FeedItem]:
        """Up to ``n`` items; with ``block``, wait for at least one (an empty list then means: closed)."""
        ...

    def waiting(self) -> int:
        """How many items are queued now."""
        ...


class EngineError(RuntimeError):
    """An engine could not produce a completion (connection, timeout, server error, bad reply)."""

    def __init__(self, message: str, reason: str = "engine_error", retryable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


# The one definition of the sampling defaults and bounds: the CLI, the evaluator, the engines and the
# server (its request models) all read these.
DEFAULT_MAX_TOKENS = 1024  # a full CBC with reference ranges is ~770 tokens of the local tokenizer
DEFAULT_TEMPERATURE = 1.0  # the world model's own distribution, as in the reference
MAX_TEMPERATURE = 5.0  # beyond it a sample is noise; a request asking for more is a mistake


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion.  ``temperature == 0`` means greedy.

    ``top_p=None`` means "unset": the whole distribution, and no ``top_p`` sent to a remote server
    (the reference sends none, so the server's own default applies).
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = (SEP,)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def params_for(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    """One :class:`SamplingParams` per prompt: the defaults, one for all, or a list of exactly ``n``."""
    if params is None:
        params = SamplingParams()
    plist = [params] * n if isinstance(params, SamplingParams) else list(params)
    if len(plist) != n:
        raise ValueError(f"{n} prompts but {len(plist)} sampling params")
    return plist


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
        plist = params_for(params, len(prompts))
        if not prompts:
            return []
        out = self._generate(prompts, plist)
        if len(out) != len(prompts):
            raise EngineError(f"{self.name} returned {len(out)} completions for {len(prompts)} prompts")
        return out

    async def agenerate(
        self, prompts: Sequence[str], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[Completion]:
        """:meth:`generate` for async callers: in a worker thread, so the event loop stays free.

        Engines with a native async client override it (same arguments, same contract).
        """
        return await asyncio.to_thread(self.generate, prompts, params)

    @abstractmethod
    def _generate(self, prompts: list[str], params: list[SamplingParams]) -> list[Completion]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (connections, caches)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
