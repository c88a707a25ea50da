"""Request and response types of the simulator API (contract 3), apart from any engine.

``:predict`` follows KServe's v1 protocol (``{"instances": [...]}`` → ``{"predictions": [...]}``);
``/openai/v1/completions`` follows OpenAI's completions API closely enough that the official
``openai`` client and the reference rollout code (raw prompt, ``stop=["<SEP>"]``) work unchanged.
Every model forbids unknown fields, so a typo is a 400 that names it instead of a silently
ignored option.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from diaggym.cases import Profile
from diaggym.engines.base import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, MAX_TEMPERATURE

OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) documented default for /completions, kept for its clients


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HistoryItem(_Strict):
    """One exam already done: its name and result text, as the world model wrote or the record holds."""

    name: str = Field(min_length=1)
    result: str


class Instance(_Strict):
    """One exam to simulate: a patient (inline or a ``case_id`` the server holds), a history, the next exam."""

    profile: Profile | str | None = None
    final_diagnosis: str | None = None
    case_id: str | None = None
    history: list[HistoryItem] = Field(default_factory=list)
    exam: str = Field(min_length=1)
    seed: int | None = None
    temperature: float = Field(default=DEFAULT_TEMPERATURE, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)  # None: unset, the whole distribution
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1)

    @model_validator(mode="after")
    def _patient(self) -> Instance:
        if self.case_id is not None:
            if self.profile is not None or self.final_diagnosis is not None:
                raise ValueError("give either case_id or profile + final_diagnosis, not both")
        elif self.profile is None or self.final_diagnosis is None:
            missing = [f for f in ("profile", "final_diagnosis") if getattr(self, f) is None]
            raise ValueError(f"missing {' and '.join(missing)} (or give case_id)")
        return self

    def profile_object(self) -> Profile:
        """A profile string is the verbatim note header (rendered as it is)."""
        assert self.profile is not None
        return Profile(note=self.profile) if isinstance(self.profile, str) else self.profile


class PredictRequest(_Strict):
    instances: list[Instance] = Field(min_length=1)


class CompletionRequest(_Strict):
    """The subset of OpenAI's ``/v1/completions`` the world model supports; the rest is refused by name."""

    model: str
    prompt: str | list[str]
    max_tokens: int = Field(default=OPENAI_DEFAULT_MAX_TOKENS, ge=1)
    temperature: float = Field(default=DEFAULT_TEMPERATURE, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    user: str | None = None
    # Accepted only at their neutral values (clients often send them explicitly).
    echo: Literal[False] = False
    logprobs: None = None
    best_of: int | None = Field(default=None, ge=1, le=1)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    logit_bias: dict[str, float] | None = None
    suffix: None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


_UNION_TAGS = {"str", "Profile", "list[str]", "function-after[_patient(), Instance]"}


def loc_path(loc: tuple, prefix: str = "") -> str:
    """``("instances", 0, "history")`` → ``instances[0].history`` (union-member tags dropped)."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in _UNION_TAGS:
            path += f".{part}" if path else str(part)
    return path or "body"


def first_field(err: ValidationError) -> str | None:
    """The path of the first invalid field (the ``field`` of a 400 answer)."""
    errors = err.errors()
    return loc_path(errors[0]["loc"]) if errors else None


def describe(err: ValidationError, prefix: str = "") -> str:
    """One clause per problem, each naming the field by its path (``instances[0].history``)."""
    errors = err.errors()
    lines = [f"{loc_path(e['loc'], prefix)}: {e['msg']}" for e in errors[:10]]
    if len(errors) > 10:
        lines.append(f"... and {len(errors) - 10} more")
    return "; ".join(lines)
