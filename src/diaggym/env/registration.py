"""Register ``DiagGym-v0`` with Gymnasium when it is installed (called from ``import diaggym``).

Cheap on purpose: it imports only Gymnasium's registry (numpy, no torch) and the environment module is named
by string, loaded on ``gymnasium.make``.
"""

from __future__ import annotations

import importlib.util

ENV_ID = "DiagGym-v0"
ENTRY_POINT = "diaggym.env.adapters.gymnasium_env:DiagGymEnv"


def register_gymnasium() -> bool:
    """True when ``DiagGym-v0`` is (now) in Gymnasium's registry; False when Gymnasium is not installed."""
    if importlib.util.find_spec("gymnasium") is None:
        return False
    from gymnasium.envs.registration import register, registry

    if ENV_ID not in registry:
        register(id=ENV_ID, entry_point=ENTRY_POINT, disable_env_checker=False)
    return True
