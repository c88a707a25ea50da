"""Request and response types of the simulator API (contract 3), apart from any engine.

``:predict`` follows KServe's v1 protocol (``{"instances": [...]}`` → ``{"predictions": [...]}``);
``/openai/v1/completions`` follows OpenAI's completions API closely enough that the official
``openai`` client and the reference rollout code (raw prompt, ``stop=["<SEP>"]``) work unchanged.
Every model forbids unknown fields, so a typo is a 400 that names it instead of a silently
ignored option, and types are strict (``"max_tokens": "12"``, ``true`` or ``"stream": "yes"``
are 400s, not coerced).  The JSON schemas of both bodies are published in the server's
OpenAPI document (``/openapi.json``), which the fuzz suite generates requests from.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from diaggym.cases import SEP, Profile
from diaggym.engines.base import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, MAX_TEMPERATURE
from diaggym.serialization import parse_prompt

MAX_SEED = 2**63 - 1  # vLLM and torch take 64-bit seeds; a bigger integer is refused, not wrapped
MAX_JSON_DEPTH = 32  # the deepest body a valid request needs is 5 levels
OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) documented default for /completions, kept for its clients


# The schema states the text rules the validators enforce, so clients (and the fuzz suite) can see them.
ONE_LINE = {"pattern": r"^(?![\s\S]*<SEP>)[^\r\n]+$"}
NO_SEP = {"pattern": r"^(?![\s\S]*<SEP>)[\s\S]*$"}
PATIENT = {"oneOf": [
    {"required": ["case_id"],
     "properties": {"case_id": {"type": "string"}, "profile": {"type": "null"}, "final_diagnosis": {"type": "null"}}},
    {"required": ["profile", "final_diagnosis"],
     "properties": {"case_id": {"type": "null"}, "profile": {"not": {"type": "null"}},
                    "final_diagnosis": {"type": "string"}}},
]}


def _integral(value: Any) -> Any:
    """JSON has one number type: 12.0 is the integer 12 (12.5, "12" and true stay errors)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(_integral)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_integral)]  # this order: the schema keeps the bounds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _one_line(value: str, field: str) -> str:
    """Exam names become ``Exam name:\\n{name}\\n`` in the prompt: a newline or <SEP> would change the history."""
    if "\n" in value or "\r" in value or SEP in value:
        raise ValueError(f"{field} must be one line without {SEP}")
    return value


def _no_sep(value: str | None, field: str) -> str | None:
    if value is not None and SEP in value:
        raise ValueError(f"{field} must not contain {SEP} (it separates the exams of the prompt)")
    return value


class HistoryItem(_Strict):
    """One exam already done: its name and result text, as the world model wrote or the record holds."""

    name: str = Field(min_length=1, json_schema_extra=ONE_LINE)
    result: str = Field(json_schema_extra=NO_SEP)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _one_line(v, "an exam name")

    @field_validator("result")
    @classmethod
    def _result(cls, v: str) -> str:
        return _no_sep(v, "a result") or ""


class Instance(_Strict):
    """One exam to simulate: a patient (inline or a ``case_id`` the server holds), a history, the next exam."""

    model_config = ConfigDict(json_schema_extra=PATIENT)

    profile: Profile | str | None = None
    final_diagnosis: str | None = Field(default=None, json_schema_extra=NO_SEP)
    case_id: str | None = None
    history: list[HistoryItem] = Field(default_factory=list)
    exam: str = Field(min_length=1, json_schema_extra=ONE_LINE)
    seed: Seed | None = None
    temperature: float = Field(default=DEFAULT_TEMPERATURE, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)  # None: unset, the whole distribution
    max_tokens: JsonInt = Field(default=DEFAULT_MAX_TOKENS, ge=1)

    @field_validator("exam")
    @classmethod
    def _exam(cls, v: str) -> str:
        return _one_line(v, "the exam name")

    @field_validator("final_diagnosis")
    @classmethod
    def _diagnosis(cls, v: str | None) -> str | None:
        return _no_sep(v, "the final diagnosis")

    @model_validator(mode="after")
    def _patient(self) -> Instance:
        if self.case_id is not None:
            if self.profile is not None or self.final_diagnosis is not None:
                raise ValueError("give either case_id or profile + final_diagnosis, not both")
        elif self.profile is None or self.final_diagnosis is None:
            missing = [f for f in ("profile", "final_diagnosis") if getattr(self, f) is None]
            raise ValueError(f"missing {' and '.join(missing)} (or give case_id)")
        profile = self.profile
        texts = [profile] if isinstance(profile, str) else list((profile or Profile()).model_dump().values())
        if any(isinstance(t, str) and SEP in t for t in texts):
            raise ValueError(f"the profile must not contain {SEP} (it separates the exams of the prompt)")
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
    max_tokens: JsonInt = Field(default=OPENAI_DEFAULT_MAX_TOKENS, ge=1)
    temperature: float = Field(default=DEFAULT_TEMPERATURE, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    n: JsonInt = Field(default=1, ge=1, le=1)
    stream: bool = False
    user: str | None = None
    # Accepted only at their neutral values (clients often send them explicitly).
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Annotated[int, Field(ge=1, le=1), BeforeValidator(_integral)] | None = None
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    logit_bias: dict[str, float] | None = None
    suffix: None = None

    @field_validator("logit_bias")
    @classmethod
    def _neutral_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v and any(b != 0 for b in v.values()):
            raise ValueError("unsupported: this server does not apply logit_bias (send none, {} or zero biases)")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def check_prompt(prompt: str, field: str) -> str | None:
    """Why ``prompt`` is not a diaggym-v1 prompt (the world model reads nothing else), or None.

    The reason never quotes the prompt: prompts hold patient text, and error bodies end up in logs.
    """
    if not prompt:
        return f"{field}: empty; send a diaggym-v1 prompt (profile, diagnosis, exams so far, 'Exam name:')"
    try:
        parse_prompt(prompt)
    except ValueError:
        return (f"{field}: not a diaggym-v1 prompt ({len(prompt)} characters; it must end with "
                "'Exam name:\\n<exam>\\nExam results:\\n' after the exam-history header)")
    return None


# ------------------------------------------------------------------------------------------ parsing bodies
class BodyError(ValueError):
    """The body is not JSON this API reads; the message says why without quoting it."""


def _refuse_constant(name: str) -> Any:
    raise BodyError(f"the body is not standard JSON ({name} is not a JSON number)")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion to run out of), stopping past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def parse_body(raw: bytes) -> Any:
    """JSON bytes → Python, or :class:`BodyError` (bad UTF-8, syntax, NaN/Infinity, nesting deeper than 32)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("the body is not UTF-8 text") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise BodyError(f"the body is not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise BodyError(f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise BodyError(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def validate(model: type[BaseModel], payload: Any) -> BaseModel:
    """Strict validation (python mode: nested objects as dicts, numbers as numbers, nothing coerced)."""
    return model.model_validate(payload, strict=True)


# ------------------------------------------------------------------------------------------ error text
_UNION_TAGS = {"str", "Profile", "list[str]", "function-after[_patient(), Instance]", "int", "float", "bool",
               "dict[str,float]", "none", "literal[False]"}


def loc_path(loc: tuple, prefix: str = "") -> str:
    """``("instances", 0, "history")`` → ``instances[0].history`` (union-member tags dropped)."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in _UNION_TAGS and not str(part).startswith("function-"):
            path += f".{part}" if path else str(part)
    return path or "body"


def first_field(err: ValidationError) -> str | None:
    """The path of the first invalid field (the ``field`` of a 400 answer)."""
    errors = err.errors()
    return loc_path(errors[0]["loc"]) if errors else None


def describe(err: ValidationError, prefix: str = "") -> str:
    """One clause per problem, each naming the field by its path (``instances[0].history``); values never quoted."""
    errors = err.errors(include_input=False, include_url=False)
    lines = [f"{loc_path(e['loc'], prefix)}: {e['msg']}" for e in errors[:10]]
    if len(errors) > 10:
        lines.append(f"... and {len(errors) - 10} more")
    return "; ".join(lines)


def inline_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with every ``$ref`` resolved in place (for an OpenAPI request body)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)
