"""Gymnasium adapter: ``gymnasium.make("DiagGym-v0", ...)``.

Observations and actions are text (:class:`gymnasium.spaces.Text` over a charset that covers clinical text:
printable ASCII, Latin-1 (°, µ, ±), Greek, dashes, quotes, ≤ ≥ ↑ ↓ and friends).  A character outside it is first
NFKC-normalised, then replaced by ``?`` (counted in ``info["replaced_chars"]``), so every observation is in the
space.  With no arguments the environment runs the bundled demo cases (test split) against the marginal
baseline engine in-process and judges with exact/alias + fuzzy matching — no server, no model.
``simulator_url=`` points it at a served simulator, ``cases=`` / ``split=`` at other cases.  The reward comes
at the last step; ``info["reward_parts"]`` splits it; timings are in ``env.unwrapped.core.log``.
"""

from __future__ import annotations

import string
import unicodedata
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from diaggym.env.core import DiagEnv, EnvConfig
from diaggym.env.protocol import MAX_TURN_CHARS

MAX_OBSERVATION_CHARS = 100_000

CHARSET = frozenset(
    string.printable
    + "".join(chr(c) for c in range(0xA0, 0x180))  # Latin-1 supplement and Latin Extended-A
    + "".join(chr(c) for c in range(0x391, 0x3CA))  # Greek (β-hCG, α1-antitrypsin)
    + "‐‑‒–—―‘’‚“”„†‡•…‰′″‹›€™←↑→↓↔≈≠≤≥±×÷µ°·√∞∆"
)


def to_charset(text: str) -> tuple[str, int]:
    """``text`` with every character in :data:`CHARSET` (NFKC first, then ``?``); and how many were replaced."""
    if all(ch in CHARSET for ch in text):
        return text, 0
    out, n = [], 0
    for ch in text:
        if ch not in CHARSET:
            # per character, so that characters already in the set (µ) are not turned into others (Greek mu)
            folded = unicodedata.normalize("NFKC", ch)
            if folded and all(c in CHARSET for c in folded):
                ch = folded
            else:
                ch, n = "?", n + 1
        out.append(ch)
    return "".join(out), n


class DiagGymEnv(gym.Env):
    """A Gymnasium view of :class:`DiagEnv`; keyword arguments are :class:`EnvConfig` fields."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, **kwargs: Any) -> None:
        self.core = DiagEnv(EnvConfig(**kwargs))
        self.render_mode = render_mode
        self.observation_space = spaces.Text(max_length=MAX_OBSERVATION_CHARS, min_length=0, charset=CHARSET)
        self.action_space = spaces.Text(max_length=MAX_TURN_CHARS, min_length=0, charset=CHARSET)
        self._last = ""

    def _obs(self, text: str, info: dict) -> str:
        text, n = to_charset(text)
        if len(text) > MAX_OBSERVATION_CHARS:
            info["truncated_chars"] = len(text) - MAX_OBSERVATION_CHARS
            text = text[:MAX_OBSERVATION_CHARS]
        if n:
            info["replaced_chars"] = n
        self._last = text
        return text

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        case_id = (options or {}).get("case_id")
        obs, info = self.core.reset(seed=seed, case_id=case_id)
        return self._obs(obs, info), info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        r = self.core.step(action)
        # Timings vary run to run; Gymnasium wants the same info for the same seed and action, so they stay in
        # the core's log (``env.unwrapped.core.log``) and the info's copy of the log drops them.
        info = {**r.info, "log": [{k: v for k, v in e.items() if k != "seconds"} for e in r.info.get("log", [])]}
        return self._obs(r.observation, info), float(r.reward), r.terminated, r.truncated, info

    def render(self) -> str | None:
        return self._last if self.render_mode == "ansi" else None

    def close(self) -> None:
        self.core.close()
        super().close()
