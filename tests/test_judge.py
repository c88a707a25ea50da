"""The judge against a scripted OpenAI-compatible chat server (a real process on 127.0.0.1, stopped by pid)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diaggym.evaluation.judge import Judge, parse_score
from diaggym.testing import ServerProcess, free_port

pytestmark = pytest.mark.integration

SERVER = Path(__file__).with_name("judge_server.py")


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    """(base URL, request log): every request body the judge sent, one JSON line each."""
    root = tmp_path_factory.mktemp("judge")
    port = free_port()
    log = root / "requests.jsonl"
    with ServerProcess([sys.executable, str(SERVER), str(port), str(log)], root / "server.log") as proc:
        proc.wait_ready(f"http://127.0.0.1:{port}/v1/models", timeout=30)
        yield f"http://127.0.0.1:{port}/v1", log


def _requests(log: Path, model: str) -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["model"] == model]


def test_parse_score_accepts_only_an_integer_score_in_range():
    assert parse_score('{"score": 4, "explanation": "close"}', 5) == 4
    assert parse_score('```json\n{"score": 0, "explanation": "x"}\n```', 1) == 0
    for bad in ('{"score": 6}', '{"score": 2}', '{"score": 4.0}', '{"score": true}', '{"score": "4"}',
                "Score: 4", '{"explanation": "no score"}', "[4]", "", None):
        assert parse_score(bad, 5 if bad != '{"score": 2}' else 1) is None, bad


def test_similarity_in_format_is_scored_at_temperature_0(judge_server):
    url, log = judge_server
    judge = Judge(url, "json-4", attempts=2)
    assert judge.similarity("Lactate", "Lactate: Value: 1.1", "Lactate: Value: 1.3") == 4
    assert Judge(url, "fenced-2").similarity("Lactate", "a", "b") == 2
    assert Judge(url, "json-0").similarity("Lactate", "a", "b") == 0  # a real 0 is a score, not a failure
    assert judge.failures == {} and judge.calls == 1
    (req,) = _requests(log, "json-4")
    assert req["temperature"] == 0
    prompt = req["messages"][-1]["content"]
    assert "Lactate: Value: 1.1" in prompt and "Lactate: Value: 1.3" in prompt and '"score"' in prompt


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("prose", "answer not in the JSON format"),
        ("range", "answer not in the JSON format"),
        ("float", "answer not in the JSON format"),
        ("truncated", "answer cut at max_tokens"),
    ],
)
def test_out_of_format_answers_are_counted_failures_never_scores(judge_server, model, reason):
    url, _ = judge_server
    judge = Judge(url, model, attempts=3)
    assert judge.similarity("CBC", "a", "b") is None
    assert judge.consistency("case", [("CBC", "a")], [("CBC", "b")]) is None
    assert judge.failures == {reason: 6, "gave up after retries": 2} and judge.calls == 6


def test_consistency_sees_the_case_the_predicted_and_the_real_chain(judge_server):
    url, log = judge_server
    case = "Sex: F\nAge: 61\n\nFinal Diagnosis:\nAcute kidney injury"
    predicted = [("BMP", "Creatinine: Value: 2.9"), ("Urinalysis", "Protein: Value: 30")]
    real = [("BMP", "Creatinine: Value: 3.4"), ("Urinalysis", "Protein: Value: 100")]
    assert Judge(url, "json-1").consistency(case, predicted, real) is True
    assert Judge(url, "json-0").consistency(case, predicted, real) is False
    prompt = _requests(log, "json-1")[-1]["messages"][-1]["content"]
    assert "Acute kidney injury" in prompt and "Age: 61" in prompt
    assert prompt.index("PREDICTED chain:") < prompt.index("Creatinine: Value: 2.9") < prompt.index("REAL chain:")
    assert prompt.index("REAL chain:") < prompt.index("Creatinine: Value: 3.4")
    assert "lenient" in prompt


def test_evaluate_command_wires_the_judge(judge_server, demo_out, tmp_path):
    url, log = judge_server
    cases_dir, _ = demo_out
    common = [sys.executable, "-m", "diaggym.cli", "evaluate", "--cases", str(cases_dir), "--engine", "median",
              "--baselines", "", "--max-cases", "2", "--max-exams", "3", "--exam-samples", "1", "--no-mlflow",
              "--no-embeddings",
              "--judge-samples", "3"]
    r = subprocess.run([*common, "--out", str(tmp_path / "a"), "--judge-url", url, "--judge-model", "json-3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "a" / "metrics.json").read_text())
    m = doc["engines"]["candidate"]["metrics"]
    assert m["similarity"] == 3.0 and m["similarity_judged"] == 3
    assert m["consistency"] == 1.0 and m["consistency_judged"] == 2
    assert doc["judge"] == {"model": "json-3", "calls": 5, "failures": {}}
    chain_req = [q for q in _requests(log, "json-3") if "PREDICTED chain" in q["messages"][-1]["content"]]
    assert len(chain_req) == 2 and all("Final Diagnosis:" in q["messages"][-1]["content"] for q in chain_req)
    r = subprocess.run([*common, "--out", str(tmp_path / "c"), "--judge-url", url], capture_output=True, text=True)
    assert r.returncode == 2 and "--judge-url and --judge-model go together" in r.stderr


def test_evaluation_counts_judge_failures_and_scores_none(judge_server, demo_out, tmp_path):
    from diaggym.cases import load_cases
    from diaggym.engines import make_engine
    from diaggym.evaluation.run import EvalSettings, evaluate

    url, _ = judge_server
    cases_dir, _ = demo_out
    judge = Judge(url, "prose", attempts=2)
    doc = evaluate(
        str(cases_dir),
        str(tmp_path / "rep"),
        {"median": make_engine("median", cases=load_cases(cases_dir, split="train"))},
        settings=EvalSettings(max_cases=2, max_exams=3, exam_samples=1, judge_samples=4),
        use_embeddings=False,
        mlflow=False,
        judge=judge,
    )
    rep = doc["engines"]["median"]
    assert rep["metrics"]["similarity"] is None and rep["metrics"]["consistency"] is None  # never a 0 or a 1
    assert rep["metrics"]["similarity_judged"] == 0 and rep["metrics"]["consistency_judged"] == 0
    assert rep["skipped"]["judge: similarity not judged (judge failed)"] == 4
    assert rep["skipped"]["judge: consistency not judged (judge failed)"] == 2
    assert judge.failures["answer not in the JSON format"] == 2 * (4 + 2)  # 2 attempts, 4 steps + 2 chains
    assert "Judge `prose`" in (tmp_path / "rep" / "report.md").read_text()
