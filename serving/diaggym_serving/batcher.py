"""Getting concurrent requests into the engine without blocking the event loop.

RL jobs send many small requests at once (one per live episode).  How they should reach
the engine depends on the engine:

* ``batch`` (the in-process transformers engine): concurrent requests are merged into one
  ``generate`` call, run on one worker thread (the model is not thread-safe and one batched
  call is far cheaper than many single ones); see :meth:`EngineRunner._loop` for how long it
  waits to gather them;
* ``async`` (the openai engine): each request is one coroutine of the engine's async client
  on the event loop; the remote server (vLLM) batches by itself, and a cancelled request
  (deadline, client gone) closes its upstream connection at once;
* ``thread``: each request runs on the default thread pool (engines without an async path);
* ``inline`` (baselines): answered on the event loop, they cost microseconds.

An engine failure in a merged batch is retried prompt by prompt, so one bad prompt (e.g.
too long for the model) fails alone instead of failing its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from diaggym.engines import Completion, Engine, EngineError, SamplingParams
from diaggym_serving import metrics

MODES = ("batch", "async", "thread", "inline")


@dataclass
class _Job:
    prompts: list[str]
    params: list[SamplingParams]
    future: asyncio.Future = field(repr=False)


class EngineRunner:
    """``await runner.generate(prompts, params)`` from any number of concurrent requests."""

    def __init__(self, engine: Engine, mode: str = "batch", max_batch: int = 32, max_wait_ms: float = 200.0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown dispatch mode {mode!r}; choose one of: {', '.join(MODES)}")
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.engine = engine
        self.mode = mode
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine") if mode == "batch" else None
        self._queued = 0

    def broken(self) -> str | None:
        """Why this runner can no longer run anything (its micro-batching loop died), or None."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            err = self._task.exception()
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
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        assert self._queue is not None
        job = _Job(prompts, params, asyncio.get_running_loop().create_future())
        self._queued += len(prompts)
        metrics.QUEUE_DEPTH.set(self._queued)
        await self._queue.put(job)
        return await job.future

    def _observe(self, out: list[Completion]) -> list[Completion]:
        metrics.BATCH_SIZE.observe(len(out))
        for c in out:
            metrics.PREFIX_QUERY_TOKENS.inc(c.prompt_tokens)
            metrics.PREFIX_HIT_TOKENS.inc(c.cached_prompt_tokens)
        return out

    async def _loop(self) -> None:
        """Gather a batch: wait (at most ``max_wait``) for as many prompts as the previous batch had, then take
        whatever else is already queued (up to ``max_batch``).

        RL clients move in lockstep: every live episode sends its next request once the previous batch has
        answered, but they arrive spread over tens of milliseconds.  A fixed window either splits them (the
        stragglers then wait a whole batch and the episodes drift apart for good) or makes a lone client wait
        for nothing; expecting the previous batch's size does neither.  A lone client's request runs at once.
        """
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        expect = 1
        while True:
            jobs = [await self._queue.get()]
            size = len(jobs[0].prompts)
            deadline = loop.time() + self.max_wait
            while size < min(expect, self.max_batch):
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout)
                except TimeoutError:
                    break
                jobs.append(job)
                size += len(job.prompts)
            while size < self.max_batch and not self._queue.empty():
                job = self._queue.get_nowait()
                jobs.append(job)
                size += len(job.prompts)
            self._queued -= size
            metrics.QUEUE_DEPTH.set(self._queued)
            jobs = [j for j in jobs if not j.future.cancelled()]  # their clients gave up (timeout, disconnect)
            expect = max(1, sum(len(j.prompts) for j in jobs))
            if jobs:
                await self._run(jobs)

    async def _run(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        prompts = [p for j in jobs for p in j.prompts]
        params = [p for j in jobs for p in j.params]
        try:
            out = await loop.run_in_executor(self._worker, self.engine.generate, prompts, params)
        except Exception as err:  # noqa: BLE001 - isolated below, then delivered to the callers
            if len(jobs) == 1:
                _settle(jobs[0].future, error=err)
                return
            for job in jobs:  # isolate the bad prompt(s): each job again, alone
                try:
                    res = await loop.run_in_executor(self._worker, self.engine.generate, job.prompts, job.params)
                except Exception as one_err:  # noqa: BLE001
                    _settle(job.future, error=one_err)
                else:
                    _settle(job.future, result=self._observe(res))
            return
        self._observe(out)
        k = 0
        for job in jobs:
            _settle(job.future, result=out[k : k + len(job.prompts)])
            k += len(job.prompts)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
        aclose = getattr(self.engine, "aclose", None)
        if aclose is not None:
            await aclose()
        self.engine.close()


def _settle(future: asyncio.Future, result: list[Completion] | None = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        if not isinstance(error, EngineError):
            error = EngineError(f"engine failed: {type(error).__name__}: {error}", reason="engine_crash")
        future.set_exception(error)
    else:
        future.set_result(result)
