"""The HTTP server under KServe's app: drain on SIGTERM, and no connection held open by a stalled client.

KServe's ``RESTServer`` builds the app and a uvicorn config; we run that config with two changes:

* :class:`DrainingServer`: SIGTERM first turns the model not-ready (``/v2/health/ready`` 503)
  and, for ``drain_s`` seconds, keeps serving with ``Connection: close`` on every response, so
  clients and the Kubernetes endpoints move away; then uvicorn's graceful shutdown stops
  accepting, lets the requests in flight finish (up to ``timeout_graceful_shutdown``) and
  exits.  A second signal exits at once.  SIGINT (Ctrl-C) skips the drain.
* :class:`HeaderTimeoutProtocol`: a connection must deliver a request's headers within
  ``header_timeout`` seconds of opening (or of its first byte on a kept-alive connection),
  else it is closed; a stalled body is the guard's business (408, see :mod:`diaggym_serving.app`).
  At shutdown an idle connection gets half a second for a request already on its way before
  it is closed, so a request sent just as the server stops is answered, not cut off.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from diaggym_serving import metrics

log = logging.getLogger("diaggym.serving")

IDLE_CLOSE_GRACE_S = 0.5


def header_timeout_protocol(header_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a header timeout (a class per value: uvicorn takes a class)."""

    class Protocol(HeaderTimeoutProtocol):
        header_timeout = header_timeout_s

    return Protocol


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._idle_close: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            metrics.ERRORS.labels("header_timeout").inc()
            log.info("closed a connection that sent no complete request headers within %g s", self.header_timeout)
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # a request started arriving (a kept-alive connection's next one too)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._idle_close is not None:
            self._idle_close.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            # Idle now, but its client may have sent a request that is not read yet: give it a moment.
            self._idle_close = self.loop.call_later(IDLE_CLOSE_GRACE_S, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()
        else:
            self.cycle.keep_alive = False  # a request arrived: it is answered, then the connection closes


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain phase on SIGTERM (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, model, drain_s: float) -> None:
        super().__init__(config)
        self.model = model
        self.drain_s = drain_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or sig != signal.SIGTERM or self.drain_s <= 0:
            self.model.draining = True
            metrics.READY.set(0)
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self.model.draining = True
        metrics.READY.set(0)
        log.info("SIGTERM: not ready; draining for %g s, then finishing the requests in flight", self.drain_s)
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(loop.call_later, self.drain_s, super().handle_exit, sig, frame)
