"""Shutdown and slow clients, with real processes and sockets: SIGTERM under load cuts nothing off, and a
connection that stalls before its headers (or in its body) is closed instead of held open forever.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import httpx
import pytest

from diaggym.cases import load_cases
from diaggym.engines.baselines import MarginalEngine
from diaggym.exam_stats import TrainingStats
from diaggym.testing import diaggym_serve
from tests.openai_server import CompletionsServer

pytestmark = pytest.mark.integration

CBC = "Complete Blood Count (CBC)"
BODY = {"instances": [{"profile": "Sex: F", "final_diagnosis": "Anemia", "exam": CBC, "seed": 1, "max_tokens": 256}]}
HEADER_TIMEOUT_S = BODY_TIMEOUT_S = 1.0
DRAIN_S = 1.0


@pytest.fixture(scope="module")
def upstream(demo_out):
    out, _ = demo_out
    cases = [c for c in load_cases(out / "cases.jsonl") if c.split == "train"]
    with CompletionsServer(MarginalEngine(TrainingStats.from_cases(cases), seed=0)) as server:
        yield server


def _front(upstream: CompletionsServer, log):
    proc, url = diaggym_serve(
        ["--engine", "openai", "--engine-url", upstream.base_url, "--served-model", "marginal",
         "--drain-seconds", str(DRAIN_S), "--graceful-timeout", "10",
         "--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S)],
        log,
    )
    proc.wait_ready(f"{url}/v2/health/ready", timeout=120)
    return proc, url


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes ``sock`` within ``seconds`` (what it sent before closing is read and dropped)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def _read_until_closed(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes ``sock``; fails if it is still open after ``seconds``."""
    sock.settimeout(seconds)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_stalled_headers_and_bodies_are_closed(upstream, tmp_path):
    proc, url = _front(upstream, tmp_path / "serve.log")
    port = int(url.rsplit(":", 1)[1])
    try:
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        half = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        for s in half:
            s.sendall(b"POST /v1/models/diaggym:predict HTTP/1.1\r\nHost: x\r\nContent-Le")
        kept = socket.create_connection(("127.0.0.1", port))  # a kept-alive connection's second request stalls
        kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        kept.settimeout(5)
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHo")
        body = socket.create_connection(("127.0.0.1", port))  # headers complete, body stalls
        body.sendall(b"POST /v1/models/diaggym:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"instances\"")
        start = time.monotonic()
        # the server still answers others meanwhile
        assert httpx.post(f"{url}/v1/models/diaggym:predict", json=BODY, timeout=30).status_code == 200
        assert all(_closed_within(s, HEADER_TIMEOUT_S + 3) for s in [*silent, *half, kept])
        assert time.monotonic() - start < HEADER_TIMEOUT_S + 3
        answer = _read_until_closed(body, BODY_TIMEOUT_S + 3)  # the answer may come in several segments
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer, answer
        for s in [*silent, *half, kept, body]:
            s.close()
        assert httpx.get(f"{url}/v2/health/live", timeout=10).status_code == 200
    finally:
        proc.stop()


def test_sigterm_under_load_finishes_in_flight_and_cuts_nothing_off(upstream, tmp_path):
    upstream.reset()
    upstream.delay_s = 0.3  # requests are in flight when the signal comes
    proc, url = _front(upstream, tmp_path / "drain.log")
    results: dict[str, list[float]] = {"ok": [], "refused": [], "cut_off": [], "other": []}
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + 30

    def client() -> None:
        with httpx.Client(timeout=20) as c:
            while time.monotonic() < stop:
                try:
                    r = c.post(f"{url}/v1/models/diaggym:predict", json=BODY)
                except httpx.ConnectError:
                    with lock:
                        results["refused"].append(time.monotonic())
                    return  # nothing listens any more: a client would go to another replica
                except httpx.HTTPError as err:
                    with lock:
                        results["cut_off"].append(time.monotonic())
                        errors.append(repr(err))
                    continue
                with lock:
                    results["ok" if r.status_code == 200 else "other"].append(time.monotonic())
                    if r.status_code != 200:
                        errors.append(r.text)

    threads = [threading.Thread(target=client) for _ in range(16)]
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)
        sent_at = time.monotonic()
        assert proc.proc is not None
        os.kill(proc.proc.pid, signal.SIGTERM)
        ready = httpx.get(f"{url}/v2/health/ready", timeout=10)  # during the drain: still serving, not ready
        assert ready.status_code == 503 and "shutting down" in ready.json()["reason"]
        for t in threads:
            t.join(timeout=40)
        proc.proc.wait(timeout=30)
    finally:
        upstream.delay_s = 0.0
        proc.stop()
    assert not results["cut_off"] and not results["other"], errors[:5]
    assert len(results["refused"]) == 16  # every client ended on a closed listener, none on a dropped request
    closed_at = min(results["refused"])
    assert closed_at - sent_at >= DRAIN_S * 0.9  # served through the drain
    assert [t for t in results["ok"] if t > sent_at]  # answered after the signal
    assert [t for t in results["ok"] if t > closed_at]  # in flight when the listener closed, finished
    assert len(results["ok"]) > 32
