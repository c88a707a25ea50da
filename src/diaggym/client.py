"""Client of the simulator API (contract 3), sync and async, for the local server and a KServe URL alike.

``SimulatorClient(url).simulate(profile, final_diagnosis, history, exam)`` → :class:`ClientResult`.
Two routes: ``predict`` (``POST /v1/models/{model}:predict``, parsed analytes back) and ``completions``
(``POST /openai/v1/completions`` with the diaggym-v1 prompt rendered here and ``stop=["<SEP>"]``, the
reference rollout's call).  Pooled connections, a timeout per request, bounded retries with exponential
backoff on connection errors, timeouts and 429/502/503/504; every failure is a :class:`ClientError` with a
``reason`` (``connect``, ``timeout``, ``http_503``, ``bad_response`` ...) and whether it was retryable.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from diaggym.cases import SEP, Profile
from diaggym.serialization import render_context, render_prompt

RETRY_STATUS = {429, 502, 503, 504}


class ClientError(RuntimeError):
    def __init__(self, reason: str, message: str, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.status = status
        self.retryable = retryable


@dataclass
class ClientResult:
    exam: str
    result: str
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    items: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    attempts: int = 1


@dataclass
class _Call:
    path: str
    body: dict
    exams: list[str]


def _profile_json(profile: Profile | str) -> dict | str:
    return profile if isinstance(profile, str) else profile.model_dump(exclude_none=True)


class _Base:
    def __init__(
        self,
        base_url: str,
        model: str = "diaggym",
        route: str = "predict",
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.25,
        max_connections: int = 64,
    ) -> None:
        if route not in ("predict", "completions"):
            raise ValueError(f"route must be 'predict' or 'completions', got {route!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.route = route
        self.retries = max(0, retries)
        self.backoff = backoff
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)

    def _call(self, requests: Sequence[dict]) -> _Call:
        """``requests``: dicts with profile, final_diagnosis, history [(name, result)], exam, seed, temperature,
        max_tokens."""
        exams = [r["exam"] for r in requests]
        if self.route == "predict":
            instances = [
                {
                    "profile": _profile_json(r["profile"]),
                    "final_diagnosis": r["final_diagnosis"],
                    "history": [{"name": n, "result": res} for n, res in r.get("history", ())],
                    "exam": r["exam"],
                    "temperature": r.get("temperature", 1.0),
                    "max_tokens": r.get("max_tokens", 512),
                    **({"seed": r["seed"]} if r.get("seed") is not None else {}),
                }
                for r in requests
            ]
            return _Call(f"/v1/models/{self.model}:predict", {"instances": instances}, exams)
        if len(requests) != 1:
            raise ValueError("the completions route takes one request per call")
        r = requests[0]
        profile = Profile(note=r["profile"]) if isinstance(r["profile"], str) else r["profile"]
        prompt = render_prompt(render_context(profile, r["final_diagnosis"]), list(r.get("history", ())), r["exam"])
        body = {
            "model": self.model, "prompt": prompt, "max_tokens": r.get("max_tokens", 512),
            "temperature": r.get("temperature", 1.0), "stop": [SEP],
            **({"seed": r["seed"]} if r.get("seed") is not None else {}),
        }
        return _Call("/openai/v1/completions", body, exams)

    @staticmethod
    def _parse(call: _Call, response: httpx.Response, seconds: float, attempts: int) -> list[ClientResult]:
        try:
            payload = response.json()
            if "predictions" in payload:
                preds = payload["predictions"]
                if len(preds) != len(call.exams):
                    raise ValueError(f"{len(preds)} predictions for {len(call.exams)} instances")
                return [
                    ClientResult(
                        exam=p.get("exam", e), result=str(p["result"]).strip(),
                        finish_reason=p.get("finish_reason", "stop"), prompt_tokens=int(p.get("prompt_tokens", 0)),
                        completion_tokens=int(p.get("completion_tokens", 0)), items=p.get("items") or [],
                        seconds=seconds, attempts=attempts,
                    )
                    for p, e in zip(preds, call.exams, strict=True)
                ]
            choice = payload["choices"][0]
            text = str(choice["text"]).split(SEP, 1)[0].strip()
            usage = payload.get("usage") or {}
            return [ClientResult(
                exam=call.exams[0], result=text, finish_reason=choice.get("finish_reason") or "stop",
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)), seconds=seconds, attempts=attempts,
            )]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise ClientError("bad_response", f"{type(err).__name__}: {err}; body {response.text[:200]!r}",
                              response.status_code) from None

    @staticmethod
    def _classify(response: httpx.Response) -> ClientError:
        try:
            msg = response.json().get("error", response.text)
        except ValueError:
            msg = response.text
        status = response.status_code
        return ClientError(f"http_{status}", str(msg)[:500], status, status in RETRY_STATUS)

    @staticmethod
    def _transport(err: httpx.HTTPError) -> ClientError:
        reason = "timeout" if isinstance(err, httpx.TimeoutException) else "connect"
        return ClientError(reason, f"{type(err).__name__}: {err}", None, True)

    def _delay(self, attempt: int) -> float:
        return self.backoff * (2**attempt) * (0.5 + random.random() / 2)

    def _outcome(self, call: _Call, start: float, attempt: int, answer: httpx.Response | httpx.HTTPError
                 ) -> list[ClientResult] | float:
        """One attempt (0-based) judged: its results, or the seconds to wait before the next attempt; raises the
        typed error when it cannot be retried or no attempt is left.  Shared by the sync and async clients."""
        if isinstance(answer, httpx.Response) and answer.status_code == 200:
            return self._parse(call, answer, time.perf_counter() - start, attempt + 1)
        err = self._classify(answer) if isinstance(answer, httpx.Response) else self._transport(answer)
        if not err.retryable or attempt == self.retries:
            raise err
        return self._delay(attempt)


class SimulatorClient(_Base):
    """Synchronous client (one pooled ``httpx.Client``)."""

    def __init__(self, base_url: str, **kwargs) -> None:
        super().__init__(base_url, **kwargs)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout,
                                  limits=self.limits)

    def simulate_many(self, requests: Sequence[dict]) -> list[ClientResult]:
        if self.route == "completions":
            return [r for req in requests for r in self._send(self._call([req]))]
        return self._send(self._call(requests))

    def simulate(self, profile: Profile | str, final_diagnosis: str, history: Sequence[tuple[str, str]], exam: str,
                 seed: int | None = None, temperature: float = 1.0, max_tokens: int = 512) -> ClientResult:
        return self.simulate_many([{"profile": profile, "final_diagnosis": final_diagnosis, "history": history,
                                    "exam": exam, "seed": seed, "temperature": temperature,
                                    "max_tokens": max_tokens}])[0]

    def _send(self, call: _Call) -> list[ClientResult]:
        start = time.perf_counter()
        for attempt in range(self.retries + 1):
            try:
                answer: httpx.Response | httpx.HTTPError = self._http.post(call.path, json=call.body)
            except httpx.HTTPError as e:
                answer = e
            out = self._outcome(call, start, attempt, answer)
            if isinstance(out, list):
                return out
            time.sleep(out)
        raise AssertionError("unreachable")

    def ready(self) -> bool:
        try:
            return self._http.get("/v2/health/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SimulatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSimulatorClient(_Base):
    """Asynchronous client (one pooled ``httpx.AsyncClient``); same arguments and errors as the sync one."""

    def __init__(self, base_url: str, **kwargs) -> None:
        super().__init__(base_url, **kwargs)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout,
                                       limits=self.limits)

    async def simulate_many(self, requests: Sequence[dict]) -> list[ClientResult]:
        if self.route == "completions":
            out = await asyncio.gather(*(self._send(self._call([req])) for req in requests))
            return [r for rs in out for r in rs]
        return await self._send(self._call(requests))

    async def simulate(self, profile: Profile | str, final_diagnosis: str, history: Sequence[tuple[str, str]],
                       exam: str, seed: int | None = None, temperature: float = 1.0,
                       max_tokens: int = 512) -> ClientResult:
        return (await self.simulate_many([{"profile": profile, "final_diagnosis": final_diagnosis,
                                           "history": history, "exam": exam, "seed": seed,
                                           "temperature": temperature, "max_tokens": max_tokens}]))[0]

    async def _send(self, call: _Call) -> list[ClientResult]:
        start = time.perf_counter()
        for attempt in range(self.retries + 1):
            try:
                answer: httpx.Response | httpx.HTTPError = await self._http.post(call.path, json=call.body)
            except httpx.HTTPError as e:
                answer = e
            out = self._outcome(call, start, attempt, answer)
            if isinstance(out, list):
                return out
            await asyncio.sleep(out)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSimulatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
