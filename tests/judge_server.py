"""A scripted OpenAI-compatible chat server for the judge tests: ``python tests/judge_server.py PORT LOG``.

Started by the tests as a process (``diaggym.testing.ServerProcess``) on 127.0.0.1 and stopped by pid.
Every request body is appended to ``LOG`` as one JSON line, so a test can read what the judge sent.
The request's ``model`` picks the answer (a consistency prompt gets ``min(N, 1)``):

===============  =============================================================
``json-N``       ``{"score": N, "explanation": ...}``
``fenced-N``     the same inside a Markdown ```json fence
``prose``        a sentence with a number in it, no JSON
``range``        ``{"score": 9}`` (out of range)
``float``        ``{"score": 4.0}`` (not an integer)
``truncated``    half a JSON object, finish reason ``length``
===============  =============================================================
"""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def answer(model: str, prompt: str) -> tuple[str, str]:
    mode, _, n = model.partition("-")
    score = int(n) if n.isdigit() else 0
    if "PREDICTED chain" in prompt:
        score = min(score, 1)
    body = json.dumps({"score": score, "explanation": "scripted"})
    if mode == "json":
        return body, "stop"
    if mode == "fenced":
        return f"```json\n{body}\n```", "stop"
    if mode == "range":
        return '{"score": 9, "explanation": "x"}', "stop"
    if mode == "float":
        return '{"score": 4.0, "explanation": "x"}', "stop"
    if mode == "truncated":
        return '{"score": 4, "explanation": "The predicted', "length"
    return "I would rate this a 4 out of 5: the values are close.", "stop"


class Handler(BaseHTTPRequestHandler):
    log_path = ""

    def _send(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._send({"object": "list", "data": []})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(body) + "\n")
        text, finish = answer(str(body.get("model", "")), str(body["messages"][-1]["content"]))
        self._send(
            {
                "id": "chat-1",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            }
        )

    def log_message(self, *args) -> None:  # quiet
        pass


if __name__ == "__main__":
    Handler.log_path = sys.argv[2]
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
