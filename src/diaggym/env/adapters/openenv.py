"""OpenEnv adapter (``openenv-core``): the environment server and its client class.

Server: :func:`create_app` → OpenEnv's FastAPI app (``/ws`` WebSocket sessions, ``/health``, ``/schema``, the
stateless HTTP ``/reset``/``/step``) plus the hand-play page ``/play``; each WebSocket session gets its own
:class:`DiagEnv` (cases loaded once and shared), so concurrent episodes stay apart.
``diaggym rl env-server`` runs it on 127.0.0.1.
Client: :class:`DiagGymEnvClient` (async; ``.sync()`` for a blocking one), actions are turn text in the
protocol, observations carry the text plus ``case_id``, ``turn``, ``end_reason`` and, at the end,
``reward_parts`` (OpenEnv drops an observation's ``metadata`` on the wire, so these are fields).
"""

from __future__ import annotations

from typing import Any

from openenv.core.client_types import StepResult
from openenv.core.env_client import EnvClient
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State
from pydantic import Field

from diaggym.cases import load_cases
from diaggym.env.core import DiagEnv, EnvConfig, demo_cases_path


class DiagAction(Action):
    text: str = Field(description="One agent turn in the protocol (an exam request or a final diagnosis).")


class DiagObservation(Observation):
    text: str = ""
    case_id: str | None = None
    turn: int = 0
    end_reason: str | None = None
    reward_parts: dict | None = None
    error: str | None = None


class DiagState(State):
    case_id: str | None = None
    done: bool = True
    end_reason: str | None = None


class DiagOpenEnv(Environment[DiagAction, DiagObservation, DiagState]):
    """One session's environment."""

    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self, core: DiagEnv) -> None:
        super().__init__()
        self.core = core
        self._episode_id: str | None = None

    def reset(self, seed: int | None = None, episode_id: str | None = None, case_id: str | None = None,
              **kwargs: Any) -> DiagObservation:
        try:
            text, info = self.core.reset(seed=seed, case_id=case_id)
        except Exception as err:  # noqa: BLE001 - an unknown case id is an answer, not a dropped connection
            return DiagObservation(text=f"reset failed: {err}", error=str(err), done=True, reward=0.0)
        self._episode_id = episode_id
        return DiagObservation(text=text, case_id=info["case_id"], turn=0, done=False, reward=0.0)

    def step(self, action: DiagAction, timeout_s: float | None = None, **kwargs: Any) -> DiagObservation:
        r = self.core.step(action.text)
        return DiagObservation(
            text=r.observation, case_id=r.info.get("case_id"), turn=r.info.get("turn", 0),
            end_reason=r.info.get("end_reason"), reward_parts=r.info.get("reward_parts"), error=r.info.get("error"),
            done=r.terminated or r.truncated, reward=r.reward,
        )

    @property
    def state(self) -> DiagState:
        case = self.core.case
        return DiagState(episode_id=self._episode_id, step_count=getattr(self.core, "turns", 0),
                         case_id=case.case_id if case else None, done=self.core.done,
                         end_reason=getattr(self.core, "end_reason", None))

    def close(self) -> None:
        self.core.close()


def create_app(config: EnvConfig | None = None, max_sessions: int = 64):
    """OpenEnv's FastAPI app serving DiagGym episodes (one DiagEnv per session)."""
    from openenv.core.env_server.http_server import create_fastapi_app

    cfg = config or EnvConfig()
    cases = load_cases(cfg.cases or demo_cases_path())
    app = create_fastapi_app(lambda: DiagOpenEnv(DiagEnv(cfg, cases=cases)), DiagAction, DiagObservation,
                             max_concurrent_envs=max_sessions)
    from diaggym.env.play import mount_play

    mount_play(app, lambda: DiagEnv(cfg, cases=cases))  # the hand-play page at /play
    return app


class DiagGymEnvClient(EnvClient[DiagAction, DiagObservation, DiagState]):
    """Client of the OpenEnv server: ``async with DiagGymEnvClient(url) as env: await env.reset(case_id=...)``."""

    def _step_payload(self, action: DiagAction) -> dict[str, Any]:
        return {"text": action.text}

    def _parse_result(self, payload: dict[str, Any]) -> StepResult[DiagObservation]:
        obs = DiagObservation(**payload.get("observation", {}), reward=payload.get("reward"),
                              done=payload.get("done", False))
        return StepResult(observation=obs, reward=payload.get("reward"), done=payload.get("done", False))

    def _parse_state(self, payload: dict[str, Any]) -> DiagState:
        return DiagState(**payload)
