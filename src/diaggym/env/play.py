"""A page to play an episode by hand (clinicians and researchers checking the simulator), served by the
environment server at ``/play``.

Pick a case, order exams, see each simulated result beside the real one when the record has it, diagnose, see
the reward parts.  The case's diagnosis is shown only after the episode ended.  Sessions live in this process
(the most recent 64 kept); the JSON routes under ``/play/api`` are what the page calls.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from diaggym.env.core import DiagEnv
from diaggym.env.protocol import format_diagnosis, format_request

MAX_SESSIONS = 64


class ResetBody(BaseModel):
    case_id: str | None = None
    seed: int | None = None


class StepBody(BaseModel):
    session: str
    exam: str | None = None
    diagnosis: str | None = None


def mount_play(app: FastAPI, make_env: Callable[[], DiagEnv]) -> None:
    sessions: OrderedDict[str, DiagEnv] = OrderedDict()
    lock = threading.Lock()
    probe = make_env()

    def get(session: str) -> DiagEnv:
        with lock:
            env = sessions.get(session)
        if env is None:
            raise HTTPException(404, f"session {session!r} unknown or expired; start a new episode")
        return env

    @app.get("/play", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/play/api/cases")
    def cases() -> dict:
        return {"cases": [{"case_id": c.case_id, "chief_complaint": c.profile.chief_complaint} for c in probe.cases],
                "exams": probe.exam_names}

    @app.post("/play/api/reset")
    def reset(body: ResetBody) -> dict:
        env = make_env()
        try:
            obs, info = env.reset(seed=body.seed, case_id=body.case_id or None)
        except Exception as err:  # noqa: BLE001 - shown on the page
            raise HTTPException(400, str(err)) from None
        session = uuid.uuid4().hex
        with lock:
            sessions[session] = env
            while len(sessions) > MAX_SESSIONS:
                sessions.popitem(last=False)[1].close()
        assert env.case is not None
        return {"session": session, "case_id": info["case_id"], "presentation": env.presentation(env.case),
                "max_turns": env.cfg.max_turns}

    @app.post("/play/api/step")
    def step(body: StepBody) -> dict:
        env = get(body.session)
        if body.diagnosis is not None:
            r = env.step(format_diagnosis(body.diagnosis))
        else:
            r = env.step(format_request(body.exam or ""))
        entry = r.info.get("log", [{}])[-1] if r.info.get("log") else {}
        out = {"observation": r.observation, "done": r.terminated or r.truncated, "reward": r.reward,
               "end_reason": r.info.get("end_reason"), "turn": r.info.get("turn"), "source": entry.get("source"),
               "exam": entry.get("exam"), "reward_parts": r.info.get("reward_parts")}
        if body.exam is not None and entry.get("exam"):
            out["real_result"] = env.real_result(entry["exam"])
        if out["done"] and env.case is not None:
            out["final_diagnosis"] = env.case.final_diagnosis
        return out


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>DiagGym: play an episode</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:1100px}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.5rem;margin:.2rem 0;font-size:.85rem}
.row{display:grid;grid-template-columns:1fr 1fr;gap:1rem}
.turn{border-top:1px solid #ccc;padding:.4rem 0}
input[type=text]{width:28rem}
#reward{font-weight:bold}
</style></head><body>
<h1>DiagGym: play an episode</h1>
<p>Pick a case, order exams one at a time, then diagnose. Simulated results appear beside the real ones
(when the record has the exam). The diagnosis is revealed at the end.</p>
<label>Case <select id="case"></select></label> <button id="start">Start episode</button>
<div id="episode" hidden>
<h2>Presentation <small id="caseid"></small></h2><pre id="presentation"></pre>
<p><input type="text" id="exam" list="exams" placeholder="Exam, e.g. Complete Blood Count (CBC)">
<button id="order">Order exam</button></p>
<datalist id="exams"></datalist>
<p><input type="text" id="diagnosis" placeholder="Final diagnosis"> <button id="diagnose">Diagnose</button></p>
<div id="turns"></div>
<div id="result" hidden><h2>Result</h2><p id="reward"></p><pre id="parts"></pre>
<p>Recorded diagnosis:</p><pre id="truth"></pre></div>
</div>
<p id="error" style="color:#b00"></p>
<script>
let session = null;
const $ = (id) => document.getElementById(id);
async function api(path, body) {
  const r = await fetch(path, body ? {method: "POST", headers: {"content-type": "application/json"},
                                      body: JSON.stringify(body)} : {});
  const j = await r.json();
  if (!r.ok) throw new Error(j.detail || r.statusText);
  return j;
}
function esc(s) { const d = document.createElement("div"); d.textContent = s ?? ""; return d.innerHTML; }
async function load() {
  const j = await api("/play/api/cases");
  $("case").innerHTML = j.cases.map(c =>
    `<option value="${esc(c.case_id)}">${esc(c.case_id)} — ${esc(c.chief_complaint)}</option>`).join("");
  $("exams").innerHTML = j.exams.map(e => `<option value="${esc(e)}">`).join("");
}
function finish(j) {
  $("result").hidden = false;
  $("reward").textContent = `Reward ${j.reward.toFixed(3)} (${j.end_reason})`;
  $("parts").textContent = JSON.stringify(j.reward_parts, null, 1);
  $("truth").textContent = j.final_diagnosis || "";
  $("order").disabled = $("diagnose").disabled = true;
}
$("start").onclick = async () => {
  try {
    const j = await api("/play/api/reset", {case_id: $("case").value});
    session = j.session; $("episode").hidden = false; $("result").hidden = true; $("turns").innerHTML = "";
    $("caseid").textContent = j.case_id; $("presentation").textContent = j.presentation;
    $("order").disabled = $("diagnose").disabled = false; $("error").textContent = "";
  } catch (e) { $("error").textContent = e.message; }
};
$("order").onclick = async () => {
  try {
    const j = await api("/play/api/step", {session, exam: $("exam").value});
    const div = document.createElement("div"); div.className = "turn";
    div.innerHTML = `<b>Turn ${j.turn}: ${esc(j.exam)}</b> <small>(${esc(j.source)})</small><div class="row">
      <div>Simulated<pre class="sim">${esc(j.observation)}</pre></div>
      <div>Real record<pre class="real">${esc(j.real_result ?? "(not in the record)")}</pre></div></div>`;
    $("turns").appendChild(div);
    if (j.done) finish(j);
  } catch (e) { $("error").textContent = e.message; }
};
$("diagnose").onclick = async () => {
  try { finish(await api("/play/api/step", {session, diagnosis: $("diagnosis").value})); }
  catch (e) { $("error").textContent = e.message; }
};
load().catch(e => { $("error").textContent = e.message; });
</script></body></html>
"""
