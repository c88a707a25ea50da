"""The hand-play page (`/play` on `diaggym rl env-server`) end to end in headless Chromium (Debian's `chromium`,
driven over the DevTools protocol): pick a case, order an exam, see the simulated and the real result, diagnose,
see the reward parts; a screenshot is kept (``play.png`` in the test's tmp folder, and in
``$DIAGGYM_TEST_ARTIFACTS`` when that is set)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

from diaggym.cases import load_cases
from diaggym.testing import ServerProcess, free_port

pytestmark = pytest.mark.integration
CBC = "Complete Blood Count (CBC)"


class Browser:
    """Headless Chromium with one page, driven by DevTools commands over its WebSocket."""

    def __init__(self, tmp):
        import websocket  # websocket-client

        self.profile = tmp / "chromium-profile"
        self.proc = ServerProcess(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
                                   "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1",
                                   "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                                   "--window-size=1200,1400", "about:blank"], tmp / "chromium.log").start()
        try:  # a browser that fails to come up is stopped here (the caller has no object to close)
            port_file = self.profile / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not port_file.is_file() or not port_file.read_text().strip():
                if time.monotonic() > deadline or self.proc.proc.poll() is not None:
                    raise RuntimeError(f"chromium did not start:\n{self.proc.log_tail()}")
                time.sleep(0.2)
            port = int(port_file.read_text().split()[0])
            pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                     if t["type"] == "page"]
            self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        except BaseException:
            self.proc.stop()
            raise
        self.n = 0

    def cmd(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    def js(self, expr):
        r = self.cmd("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def wait(self, expr, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expr)
            if value:
                return value
            time.sleep(0.2)
        page_error = self.js("document.getElementById('error').textContent")
        raise TimeoutError(f"{expr} stayed false; page error: {page_error}")

    def close(self):
        self.ws.close()
        self.proc.stop()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_play_page_in_headless_chromium(demo_out, tmp_path):
    out, _ = demo_out
    case = next(c for c in load_cases(out / "cases.jsonl", split="test") if any(e.name == CBC for e in c.exams))
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "diaggym.cli", "rl", "env-server", "--cases", str(out),
                            "--host", "127.0.0.1", "--port", str(port)], tmp_path / "env.log").start()
    browser = None
    try:
        server.wait_ready(f"http://127.0.0.1:{port}/health", timeout=120)
        browser = Browser(tmp_path)
        browser.cmd("Page.navigate", url=f"http://127.0.0.1:{port}/play")
        browser.wait("document.querySelectorAll('#case option').length > 0")
        browser.js(f"document.getElementById('case').value = {json.dumps(case.case_id)}; "
                   "document.getElementById('start').click(); true")
        browser.wait("document.getElementById('presentation').textContent.length > 0")
        assert case.final_diagnosis.splitlines()[0] not in browser.js("document.body.innerText")
        browser.js(f"document.getElementById('exam').value = {json.dumps(CBC)}; "
                   "document.getElementById('order').click(); true")
        browser.wait("document.querySelectorAll('.turn').length == 1")
        sim = browser.js("document.querySelector('.turn .sim').textContent")
        real = browser.js("document.querySelector('.turn .real').textContent")
        assert sim.startswith("Here is the test result:") and "Hemoglobin" in sim
        assert "Hemoglobin" in real and real != "(not in the record)"
        browser.js(f"document.getElementById('diagnosis').value = {json.dumps(case.final_diagnosis.splitlines()[0])}; "
                   "document.getElementById('diagnose').click(); true")
        browser.wait("!document.getElementById('result').hidden")
        assert browser.js("document.getElementById('reward').textContent").startswith("Reward 1.")
        parts = json.loads(browser.js("document.getElementById('parts').textContent"))
        assert parts["correct"] == 1.0 and parts["complete"] == 1.0
        assert case.final_diagnosis.splitlines()[0] in browser.js("document.getElementById('truth').textContent")
        shot = tmp_path / "play.png"
        shot.write_bytes(base64.b64decode(browser.cmd("Page.captureScreenshot", format="png")["data"]))
        assert shot.stat().st_size > 20_000
        if os.environ.get("DIAGGYM_TEST_ARTIFACTS"):  # CI keeps the folder as a build artifact
            keep = Path(os.environ["DIAGGYM_TEST_ARTIFACTS"])
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, keep / "play.png")
    finally:
        if browser is not None:
            browser.close()
        server.stop()
