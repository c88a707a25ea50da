"""The in-process transformers engine, run in its own process.

The engine's decode loop is Python between small tensor operations, and so is the server's event loop
(HTTP, JSON, validation, parsing results): in one process they take turns on one GIL, and each steals
the other's time (and, on a small machine, the second core stays idle).  :class:`EngineProcess` starts
a child process that loads :class:`~diaggym.engines.hf.TransformersEngine` and serves it with
continuous batching (``run_feed``); the server talks to it over two multiprocessing queues.  It is an
:class:`~diaggym.engines.Engine` (``generate`` works) and has ``run_feed``, so the server's runner
treats it like the engine itself.

Prompts whose caller gave up before they were forwarded are dropped; once in the child they run to
the end.  If the child dies, every prompt in flight fails with ``engine_crash`` and the runner
reports itself broken (readiness turns 503).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import queue
import threading
from collections import deque
from typing import Any

from diaggym.engines import Completion, Engine, EngineError, Feed, FeedItem, SamplingParams
from diaggym.errors import InputError

log = logging.getLogger(__name__)

_POLL_S = 0.5  # how often the result reader checks that the child is alive


def _child(options: dict, requests: mp.Queue, results: mp.Queue) -> None:
    """The child: load the engine, say so, then serve the request queue until it closes (a ``None``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from diaggym.engines.hf import TransformersEngine

    try:
        engine = TransformersEngine(**options)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
        results.put(("failed", f"{type(err).__name__}: {err}"))
        return
    results.put(("ready", engine.max_positions))
    engine.run_feed(_QueueFeed(requests, results))


class _QueueFeed:
    """The child's side of the request queue, as the engine's :class:`~diaggym.engines.Feed`."""

    def __init__(self, requests: mp.Queue, results: mp.Queue) -> None:
        self.requests, self.results = requests, results
        self.local: deque[FeedItem] = deque()
        self.closed = False

    def _item(self, message: tuple) -> FeedItem | None:
        if message is None:
            self.closed = True
            return None
        key, prompt, params = message

        def deliver(outcome: Completion | BaseException) -> None:
            if isinstance(outcome, BaseException):
                reason = outcome.reason if isinstance(outcome, EngineError) else "engine_crash"
                self.results.put((key, ("error", str(outcome), reason)))
            else:
                self.results.put((key, outcome))

        return FeedItem(prompt, params, deliver)

    def _pull(self) -> None:
        while not self.closed:
            try:
                message = self.requests.get_nowait()
            except queue.Empty:
                return
            if (item := self._item(message)) is not None:
                self.local.append(item)

    def take(self, n: int, block: bool) -> list[FeedItem]:
        self._pull()
        if block and not self.local and not self.closed:
            if (item := self._item(self.requests.get())) is not None:
                self.local.append(item)
            self._pull()
        out = []
        while self.local and len(out) < n:
            out.append(self.local.popleft())
        return out

    def waiting(self) -> int:
        self._pull()
        return len(self.local)


class EngineProcess(Engine):
    """A :class:`~diaggym.engines.hf.TransformersEngine` (built from ``options``) in a child process."""

    name = "transformers"

    def __init__(self, options: dict[str, Any], start_timeout: float = 600.0) -> None:
        ctx = mp.get_context("spawn")  # no fork of a process that already runs threads
        self._requests: mp.Queue = ctx.Queue()
        self._results: mp.Queue = ctx.Queue()
        self._child = ctx.Process(target=_child, args=(options, self._requests, self._results),
                                  name="diaggym-engine", daemon=True)
        self._child.start()
        try:
            kind, info = self._results.get(timeout=start_timeout)
        except queue.Empty:
            self._child.kill()
            raise EngineError(f"the engine process did not load its model in {start_timeout:.0f} s",
                              reason="engine_crash") from None
        if kind != "ready":
            self._child.join(timeout=5)
            raise InputError(f"the engine process could not load the model: {info}")
        self.max_positions: int | None = info
        self._keys = itertools.count()
        self._pending: dict[int, FeedItem] = {}
        self._lock = threading.Lock()
        self._dead: str | None = None
        self._reader = threading.Thread(target=self._read, name="engine-results", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ the two directions
    def _send(self, items: list[FeedItem]) -> None:
        if self._dead is not None:
            for item in items:
                item.deliver(EngineError(self._dead, reason="engine_crash"))
            return
        for item in items:
            key = next(self._keys)
            with self._lock:
                self._pending[key] = item
            self._requests.put((key, item.prompt, item.params))

    def _read(self) -> None:
        """Deliver the child's results; when it dies, fail what is in flight."""
        while True:
            try:
                key, outcome = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                if self._child.is_alive():
                    continue
                self._dead = f"the engine process exited with code {self._child.exitcode}"
                with self._lock:
                    lost, self._pending = list(self._pending.values()), {}
                for item in lost:
                    item.deliver(EngineError(self._dead, reason="engine_crash"))
                return
            with self._lock:
                item = self._pending.pop(key, None)
            if item is None:
                continue
            if isinstance(outcome, tuple):  # ("error", message, reason)
                outcome = EngineError(outcome[1], reason=outcome[2])
            item.deliver(outcome)

    def run_feed(self, feed: Feed) -> None:
        """Forward ``feed`` to the child until the feed closes (the server runner's engine thread)."""
        while True:
            items = feed.take(64, block=True)
            if not items:
                return
            self._send([it for it in items if not it.cancelled()])
            if self._dead is not None:  # the runner then reports itself broken
                raise EngineError(self._dead, reason="engine_crash")

    def _generate(self, prompts: list[str], params: list[SamplingParams]) -> list[Completion]:
        done = threading.Event()
        out: list[Completion | BaseException | None] = [None] * len(prompts)
        left = [len(prompts)]

        def deliver(i: int, outcome: Completion | BaseException) -> None:
            out[i] = outcome
            with self._lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

        self._send([FeedItem(p, sp, deliver=lambda o, i=i: deliver(i, o)) for i, (p, sp) in
                    enumerate(zip(prompts, params, strict=True))])
        done.wait()
        for o in out:
            if isinstance(o, BaseException):
                raise o
        return out  # type: ignore[return-value]

    def close(self) -> None:
        if self._child.is_alive():
            self._requests.put(None)
            self._child.join(timeout=10)
            if self._child.is_alive():
                self._child.kill()
                self._child.join(timeout=5)
