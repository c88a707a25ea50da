"""Engines: prompts → exam results.  See :mod:`diaggym.engines.base` for the interface."""

from __future__ import annotations

from pathlib import Path

from diaggym.engines.base import Completion, Engine, EngineError, Feed, FeedItem, SamplingParams, cut_at_stop
from diaggym.errors import InputError

ENGINES = ("transformers", "openai", "normal", "marginal", "median")

__all__ = [
    "ENGINES", "Completion", "Engine", "EngineError", "Feed", "FeedItem", "SamplingParams", "cut_at_stop", "make_engine"
]


def make_engine(
    kind: str,
    model: str | Path | None = None,
    url: str | None = None,
    served_model: str | None = None,
    cases=None,
    seed: int = 0,
    **kwargs,
) -> Engine:
    """Build an engine by name.

    ``transformers`` needs ``model`` (a local folder); ``openai`` needs ``url`` (``.../v1``) and the served
    model name; the baselines (``normal``, ``marginal``, ``median``) need training ``cases``.
    """
    if kind == "transformers":
        if model is None:
            raise InputError("the transformers engine needs --model DIR")
        from diaggym.engines.hf import TransformersEngine

        return TransformersEngine(model, **kwargs)
    if kind == "openai":
        if not url:
            raise InputError("the openai engine needs --url (an OpenAI-compatible base URL ending in /v1)")
        from diaggym.engines.openai_compat import OpenAIEngine

        return OpenAIEngine(url, served_model or "diaggym", **kwargs)
    if kind in ("normal", "marginal", "median"):
        if not cases:
            raise InputError(f"the {kind} baseline needs training cases (--cases DIR)")
        from diaggym.engines.baselines import MarginalEngine, MedianEngine, NormalEngine
        from diaggym.exam_stats import TrainingStats

        stats = TrainingStats.from_cases(cases)
        if kind == "median":
            return MedianEngine(stats)
        return (NormalEngine if kind == "normal" else MarginalEngine)(stats, seed=seed)
    raise InputError(f"unknown engine {kind!r}; choose one of: {', '.join(ENGINES)}")
