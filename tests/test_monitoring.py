"""Alerts and dashboard (k8s/components/monitoring/): promtool unit tests, every PromQL expression parsed by promtool,
and every metric name they use checked against what the real server exports (and what vLLM declares)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import httpx
import pytest
import yaml

from diaggym.testing import diaggym_serve

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "k8s" / "components" / "monitoring"
ALERT_TESTS = ROOT / "tests" / "data" / "monitoring" / "alerts_test.yaml"
VLLM_LOGGERS = ROOT / ".venv-vllm" / "lib" / "python3.11" / "site-packages" / "vllm" / "v1" / "metrics" / "loggers.py"
# PromQL functions, aggregations and keywords: identifiers in an expression that are not metric names.
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "vector", "absent", "and",
    "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "topk", "bottomk",
    "clamp_min", "clamp_max", "time", "offset",
}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not on PATH (make system-deps installs Debian's prometheus)")
    return path


def rule_groups() -> list[dict]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return rule["spec"]["groups"]


def alerts() -> list[dict]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def dashboard() -> dict:
    return json.loads((MONITORING / "dashboard.json").read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, grouping labels, durations, strings removed)."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"\d+(\.\d+)?[smhdwy]?", w)}


def _run_promtool(tmp_path: Path, groups: list[dict]) -> subprocess.CompletedProcess:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / "alerts_test.yaml")
    return subprocess.run([_promtool(), "test", "rules", "alerts_test.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


# ---------------------------------------------------------------------------------------------------------------------


def test_every_alert_the_consumers_feel_is_there_with_severity_and_runbook():
    names = {a["alert"] for a in alerts()}
    assert names == {
        "DiagGymErrorRatioHigh",
        "DiagGymLatencyP99High",
        "DiagGymNoReadyReplicas",
        "DiagGymQueueSaturated",
        "VLLMKVCacheNearlyFull",
        "VLLMPrefixCacheHitRatioCollapsed",
    }
    for a in alerts():
        assert a["labels"]["severity"] in ("page", "warn"), a["alert"]
        assert len(a["annotations"]["runbook"]) > 40 and "#runbooks" in a["annotations"]["runbook"], a["alert"]
        assert a["annotations"]["summary"], a["alert"]
        assert re.fullmatch(r"\d+m", a["for"]), "every alert waits before it fires (no flapping pages)"
    readme = (ROOT / "k8s" / "README.md").read_text()
    assert "## Runbooks" in readme
    for a in alerts():
        assert f"`{a['alert']}`" in readme, f"k8s/README.md#runbooks has no entry for {a['alert']}"


@pytest.mark.integration
def test_alert_rules_pass_their_promtool_unit_tests(tmp_path):
    done = _run_promtool(tmp_path, rule_groups())
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested == {a["alert"] for a in alerts()}, "every alert has a unit test"


@pytest.mark.integration
def test_a_loosened_alert_fails_its_unit_tests(tmp_path):
    """The unit tests pin the thresholds: an error-ratio alert at 50 % would not page on 6 % errors."""
    groups = rule_groups()
    rule = next(r for g in groups for r in g["rules"] if r.get("alert") == "DiagGymErrorRatioHigh")
    rule["expr"] = rule["expr"].replace("> 0.05", "> 0.5")
    done = _run_promtool(tmp_path, groups)
    assert done.returncode != 0 and "DiagGymErrorRatioHigh" in done.stdout + done.stderr


@pytest.mark.integration
def test_every_dashboard_and_rule_expression_parses_with_promtool(tmp_path):
    exprs = dashboard_exprs()
    assert len(exprs) >= 12
    # Grafana's $__rate_interval is not PromQL; it is a duration when Grafana sends the query.
    records = [{"record": f"dashboard:panel_{i}", "expr": e.replace("$__rate_interval", "5m")}
               for i, (_, e) in enumerate(exprs)]
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump({"groups": [*rule_groups(), {"name": "dashboard", "rules": records}]}))
    done = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(records) + len(alerts())} rules found" in done.stdout
    # and a broken expression is caught the same way
    broken = {"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(a[5m])"}]}
    path.write_text(yaml.safe_dump({"groups": [broken]}))
    bad = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0


def test_dashboard_has_the_panels_and_ships_as_a_sidecar_configmap():
    titles = " | ".join(p["title"].lower() for p in dashboard()["panels"])
    for wanted in ("request rate", "latency quantiles", "tokens per second", "prefix-cache hit ratio", "batch size",
                   "errors by reason"):
        assert wanted in titles, wanted
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    (gen,) = kustomization["configMapGenerator"]
    assert gen["options"]["labels"] == {"grafana_dashboard": "1"}
    assert gen["files"] == ["diaggym.json=dashboard.json"]


def test_metric_name_extraction():
    assert metric_names('sum by (le, route) (rate(x_bucket{outcome="ok"}[5m])) / y:z > 0.5') == {"x_bucket", "y:z"}
    assert metric_names("(sum(diaggym_engine_ready) or vector(0)) < 1") == {"diaggym_engine_ready"}


# ---------------------------------------------------------------------------------------------------------------------
# the names exist where they are scraped


def _all_used_names() -> set[str]:
    names = set()
    for a in alerts():
        names |= metric_names(a["expr"])
    for _, e in dashboard_exprs():
        names |= metric_names(e)
    return names


def _exposed_names(exposition: str) -> set[str]:
    """Sample names a /metrics page can carry, from its # TYPE lines (a labelled series with no sample yet still has
    one) and its samples."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                        "summary": ["_sum", "_count", "_created"]}.get(kind, [""])
            names |= {name + s for s in suffixes} | {name}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@cache
def _vllm_declared() -> set[str]:
    if not VLLM_LOGGERS.is_file():
        pytest.fail(f"{VLLM_LOGGERS} missing: `make vllm-venv` installs vLLM's CPU build")
    return set(re.findall(r'"(vllm:[a-z_]+)"', VLLM_LOGGERS.read_text()))


def test_every_name_is_a_diaggym_or_vllm_metric():
    names = _all_used_names()
    assert names and all(n.startswith(("diaggym_", "vllm:")) for n in names), names


def test_vllm_names_are_declared_by_the_installed_vllm():
    """vLLM's Prometheus logger declares these (counters get _total on the wire). tests/test_vllm.py scrapes a real
    vLLM server for the prefix-cache pair."""
    declared = _vllm_declared()
    for name in sorted(n for n in _all_used_names() if n.startswith("vllm:")):
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert name in declared or base in declared, f"{name} is not a vLLM metric"
    test_vllm = (ROOT / "tests" / "test_vllm.py").read_text()
    assert "vllm:prefix_cache_hits_total" in test_vllm and "vllm:prefix_cache_queries_total" in test_vllm


@pytest.mark.integration
def test_diaggym_names_exist_on_the_real_metrics_page(tmp_path, demo_out):
    cases, _ = demo_out
    proc, url = diaggym_serve(["--engine", "marginal", "--cases", str(cases)], tmp_path / "serve.log")
    try:
        proc.wait_ready(f"{url}/v2/health/ready", timeout=120)
        page = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        proc.stop()
    exposed = _exposed_names(page)
    used = {n for n in _all_used_names() if n.startswith("diaggym_")}
    assert len(used) >= 10
    missing = sorted(used - exposed)
    assert not missing, f"not on the server's /metrics: {missing}"
    assert "diaggym_not_a_metric_total" not in exposed


@pytest.mark.integration
def test_vllm_names_exist_on_a_real_vllm_metrics_page(trained_tiny, tmp_path):
    """vLLM's CPU build serving the tiny checkpoint: its /metrics page before any request carries every vllm:* name
    the alerts and the dashboard use (labelled counters and gauges are created at start)."""
    from tests.vllm_server import VLLMServer, vllm_available

    if not vllm_available():
        pytest.fail("vLLM's CPU build is missing: `make vllm-venv` (serving/vllm/install.sh)")
    with VLLMServer(trained_tiny, log_path=tmp_path / "vllm.log") as server:
        page = httpx.get(f"{server.url}/metrics", timeout=10).text
    exposed = _exposed_names(page)
    used = {n for n in _all_used_names() if n.startswith("vllm:")}
    assert len(used) >= 6
    missing = sorted(used - exposed)
    assert not missing, f"not on vLLM's /metrics: {missing}"
