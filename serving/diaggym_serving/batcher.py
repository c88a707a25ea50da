"""Getting concurrent requests into the engine without blocking the event loop.

RL jobs send many small requests at once (one per live episode).  How they should reach
the engine depends on the engine:

* ``batch`` (the in-process transformers engine): requests go to a thread-safe queue that the
  engine's own thread serves with continuous batching (``run_feed``): a request joins the batch
  being decoded instead of waiting for it to finish, and is answered the moment its own rows are
  done (the model is not thread-safe, and one batched forward is far cheaper than many single ones);
* ``async`` (the openai engine): each request is one coroutine of the engine's async client
  on the event loop; the remote server (vLLM) batches by itself, and a cancelled request
  (deadline, client gone) closes its upstream connection at once;
* ``thread``: each request runs on the default thread pool (engines without an async path);
* ``inline`` (baselines): answered on the event loop, they cost microseconds.

A prompt the engine cannot run (e.g. too long for the model) fails alone; its neighbours in
the batch are answered.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from diaggym.engines import Completion, Engine, EngineError, FeedItem, SamplingParams
from diaggym_serving import metrics

MODES = ("batch", "async", "thread", "inline")


class _Feed:
    """The queue between the event loop and the engine thread (an :class:`~diaggym.engines.Feed`)."""

    def __init__(self) -> None:
        self._items: deque[FeedItem] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, items: list[FeedItem]) -> None:
        with self._cond:
            self._items.extend(items)
            self._cond.notify()

    def take(self, n: int, block: bool) -> list[FeedItem]:
        with self._cond:
            while block and not self._items and not self._closed:
                self._cond.wait()
            out = []
            while self._items and len(out) < n:
                out.append(self._items.popleft())
            metrics.QUEUE_DEPTH.set(len(self._items))
            if out:
                metrics.BATCH_SIZE.observe(len(out))
            return out

    def waiting(self) -> int:
        return len(self._items)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class EngineRunner:
    """``await runner.generate(prompts, params)`` from any number of concurrent requests."""

    def __init__(self, engine: Engine, mode: str = "batch") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown dispatch mode {mode!r}; choose one of: {', '.join(MODES)}")
        if mode == "batch" and not hasattr(engine, "run_feed"):
            raise ValueError(f"the {engine.name} engine cannot batch continuously; use dispatch 'thread'")
        self.engine = engine
        self.mode = mode
        self._feed = _Feed() if mode == "batch" else None
        # a daemon thread: a runner nobody closed must not keep the interpreter from exiting
        self._serving: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._closed = False

    def broken(self) -> str | None:
        """Why this runner can no longer run anything (its engine thread died), or None."""
        if self._serving is not None and not self._serving.is_alive() and not self._closed:
            err = self._failure
            return f"the engine loop stopped: {type(err).__name__}" if err else "the engine loop stopped"
        return None

    async def generate(
        self, prompts: list[str], params: list[SamplingParams], deadline: float | None = None
    ) -> list[Completion]:
        """``deadline`` (``time.monotonic()``) reaches engines that can honour it (the openai engine)."""
        if self.mode == "async":
            agenerate = getattr(self.engine, "agenerate", None)
            if agenerate is None:
                raise ValueError(f"the {self.engine.name} engine has no async path; use dispatch 'thread'")
            return self._observe(await agenerate(prompts, params, deadline=deadline))
        if self.mode == "inline":
            return self._observe(self.engine.generate(prompts, params))
        if self.mode == "thread":
            out = await asyncio.get_running_loop().run_in_executor(None, self.engine.generate, prompts, params)
            return self._observe(out)
        return await self._enqueue(prompts, params)

    async def _enqueue(self, prompts: list[str], params: list[SamplingParams]) -> list[Completion]:
        assert self._feed is not None
        if self._serving is None:
            self._serving = threading.Thread(target=self._serve, name="engine", daemon=True)
            self._serving.start()
        elif (why := self.broken()) is not None:
            raise EngineError(why, reason="engine_crash")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        results: list[Completion | None] = [None] * len(prompts)
        left = [len(prompts)]

        def deliver(i: int, outcome: Completion | BaseException) -> None:  # on the engine thread
            loop.call_soon_threadsafe(_collect, future, results, left, i, outcome)

        self._feed.put([
            FeedItem(p, sp, deliver=lambda o, i=i: deliver(i, o), cancelled=future.cancelled)
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ])
        return self._observe(await future)

    def _serve(self) -> None:
        assert self._feed is not None
        try:
            self.engine.run_feed(self._feed)  # type: ignore[attr-defined]
        except BaseException as err:  # noqa: BLE001 - kept for broken() (readiness, the next request)
            self._failure = err

    def _observe(self, out: list[Completion]) -> list[Completion]:
        if self.mode != "batch":
            metrics.BATCH_SIZE.observe(len(out))
        for c in out:
            metrics.PREFIX_QUERY_TOKENS.inc(c.prompt_tokens)
            metrics.PREFIX_HIT_TOKENS.inc(c.cached_prompt_tokens)
        return out

    async def close(self) -> None:
        self._closed = True
        if self._feed is not None:
            self._feed.close()
        aclose = getattr(self.engine, "aclose", None)
        if aclose is not None:
            await aclose()
        self.engine.close()


def _collect(future: asyncio.Future, results: list, left: list[int], i: int,
             outcome: Completion | BaseException) -> None:
    """One prompt of a request is done (on the event loop); the request is answered when all are, or at the
    first failure."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        if not isinstance(outcome, EngineError):
            outcome = EngineError(f"engine failed: {type(outcome).__name__}: {outcome}", reason="engine_crash")
        future.set_exception(outcome)
        return
    results[i] = outcome
    left[0] -= 1
    if left[0] == 0:
        future.set_result(results)
