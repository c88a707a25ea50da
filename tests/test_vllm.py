"""Real vLLM (the CPU build, in ``.venv-vllm``) behind the DiagGym server, as on the cluster.

vLLM's OpenAI server loads the locally trained checkpoint; ``diaggym serve --engine openai`` sits in
front of it; a full 30-exam chain goes through ``:predict`` (the generated results become the
history) and the same prompt goes through ``/openai/v1/completions`` with the official client.
vLLM's own prefix-cache counters show the append-only prompts being reused (P3).
"""

from __future__ import annotations

import subprocess

import httpx
import openai
import pytest

from diaggym.cases import SEP, load_cases
from diaggym.serialization import render_context, render_prompt
from diaggym.testing import diaggym_serve
from tests.conftest import ROOT
from tests.vllm_server import VLLMServer, vllm_available

pytestmark = pytest.mark.integration

HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"


@pytest.fixture(scope="module")
def vllm(trained_tiny, tmp_path_factory):
    if not vllm_available():  # the test command installs it; a bare `pytest` run does it here
        subprocess.run(["bash", str(ROOT / "serving" / "vllm" / "install.sh")], check=True, timeout=1800)
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with VLLMServer(trained_tiny, log_path=log) as server:
        yield server


@pytest.fixture(scope="module")
def front(vllm, demo_out, tmp_path_factory):
    out, _ = demo_out
    proc, url = diaggym_serve(
        ["--engine", "openai", "--engine-url", vllm.base_url, "--served-model", vllm.served_model_name,
         "--cases", str(out)],
        tmp_path_factory.mktemp("front") / "serve.log",
    )
    try:
        proc.wait_ready(f"{url}/v2/health/ready", timeout=120)
        yield url
    finally:
        proc.stop()


def test_chain_through_predict_reuses_vllm_prefix_cache(vllm, front, demo_out):
    out, _ = demo_out
    case = max((c for c in load_cases(out / "cases.jsonl") if c.split == "test"), key=lambda c: len(c.exams))
    exams = [case.exams[k % len(case.exams)].name for k in range(30)]
    before = vllm.metrics()
    history: list[dict] = []
    prompt_tokens = []
    for step, exam in enumerate(exams):
        inst = {
            "profile": case.profile.model_dump(exclude_none=True),
            "final_diagnosis": case.final_diagnosis,
            "history": history,
            "exam": exam,
            "temperature": 0.0,
            "max_tokens": 16,
            "seed": step,
        }
        r = httpx.post(f"{front}/v1/models/diaggym:predict", json={"instances": [inst]}, timeout=120)
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        assert pred["exam"] == exam and 0 < pred["completion_tokens"] <= 16
        prompt_tokens.append(pred["prompt_tokens"])
        if step > 0:
            assert pred["cached_prompt_tokens"] > 0, pred  # vLLM reports the reused prefix
        history.append({"name": exam, "result": pred["result"]})
    assert prompt_tokens == sorted(prompt_tokens)  # append-only prompts grow every step
    after = vllm.metrics()
    hits, queries = after[HITS] - before.get(HITS, 0), after[QUERIES] - before.get(QUERIES, 0)
    assert queries >= sum(prompt_tokens) * 0.99
    assert hits / queries >= 0.9, (hits, queries)  # P3: >= 90 % of prompt tokens from the prefix cache


def test_openai_client_through_the_front_matches_vllm(vllm, front, demo_out):
    out, _ = demo_out
    case = next(c for c in load_cases(out / "cases.jsonl") if c.split == "test")
    prompt = render_prompt(render_context(case.profile, case.final_diagnosis), [], "Complete Blood Count (CBC)")
    kw = {"model": "diaggym", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [SEP]}
    via_front = openai.OpenAI(base_url=f"{front}/openai/v1", api_key="x").completions.create(**kw)
    direct = openai.OpenAI(base_url=vllm.base_url, api_key="x").completions.create(**kw)
    assert via_front.choices[0].text == direct.choices[0].text.strip()
    assert via_front.usage.prompt_tokens == direct.usage.prompt_tokens
    assert via_front.choices[0].finish_reason == direct.choices[0].finish_reason
    text = httpx.get(f"{front}/metrics", timeout=10).text
    assert 'diaggym_requests_total{outcome="ok",route="completions"} 1.0' in text
