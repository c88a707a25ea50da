"""The RL environment: episodes against the simulator in the reference DiagAgent turn protocol.

``DiagEnv`` is the core (no RL library needed); adapters for Gymnasium, TRL, OpenEnv and verl live in
``diaggym.env.adapters`` and import their library only when used.  Names load lazily so that
``import diaggym`` (which registers ``DiagGym-v0``) stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DiagEnv": "core", "EnvConfig": "core", "StepResult": "core",
    "ExactJudge": "judges", "FuzzyJudge": "judges", "LLMJudge": "judges", "make_judge": "judges",
    "INSTRUCTION": "protocol", "format_diagnosis": "protocol", "format_request": "protocol", "parse_turn": "protocol",
    "RewardParts": "reward", "RewardWeights": "reward",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"diaggym.env.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'diaggym.env' has no attribute {name!r}")
