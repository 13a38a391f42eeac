"""
The monitoring files in deploy/: the Prometheus rules (checked and unit
tested by C{promtool}) and the Grafana dashboard (a dashboard document
Grafana can import), and every metric either of them names is one a running
daemon exports on C{/metrics}.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fake_userli import FakeUserliServer
from tests.integration.harness import ROOT, Daemon, http_get

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "userli-postfix.json"

#: Metrics that the coherent-cache change adds to the daemon; they are on
#: the dashboard and in the alerts already, and leave this list once the
#: daemon exports them (the test then finds them in /metrics anyway).
ADDED_BY_THE_COHERENT_CACHE_CHANGE = frozenset(
    {
        "userli_postfix_adapter_circuit_breaker_open",
        "userli_postfix_adapter_near_cache_coherent",
    }
)

#: Series Prometheus itself makes for every target.
FROM_PROMETHEUS = frozenset({"up"})

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt: prometheus)"
)


def promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *arguments],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@needs_promtool
def test_rules_check() -> None:
    """C{promtool check rules} accepts the rules file."""
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_rules_unit_tests() -> None:
    """Every alert's C{promtool test rules} case passes."""
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_rules_unit_tests_can_fail(tmp_path: Path) -> None:
    """With one threshold changed, the rule tests fail: they pin the rules."""
    changed = RULES.read_text().replace("> 100", "> 1000", 1)
    assert changed != RULES.read_text()
    (tmp_path / "alerts.yml").write_text(changed)
    shutil.copy(RULE_TESTS, tmp_path / "alerts.test.yml")
    result = subprocess.run(
        ["promtool", "test", "rules", "alerts.test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "UserliPostfixFailedLoginSpike" in result.stdout + result.stderr


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_alert_has_a_unit_test() -> None:
    """Each alert of alerts.yml is exercised by alerts.test.yml."""
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts and alerts <= tested, alerts - tested


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def all_panels(panels: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def test_dashboard_document() -> None:
    """
    The dashboard is a document Grafana imports: title, uid, schema
    version, panels with unique ids laid out on the 24-column grid, every
    query with a refId (unique within its panel) and a datasource that is
    the dashboard's Prometheus variable, and every variable a query uses
    defined.
    """
    document = dashboard()
    assert document["title"] and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", document["uid"])
    assert isinstance(document["schemaVersion"], int) and document["schemaVersion"] >= 30
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(all_panels(document["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    queries = 0
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "gauge", "bargauge", "table"}
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            queries += 1
            for used in re.findall(r"\$(\w+)", target["expr"]):
                assert used in variables or used.startswith("__"), (used, target["expr"])
    assert queries >= 20


_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "offset", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """
    The metric names a PromQL expression reads: identifiers that are not
    functions, keywords, label names (inside braces or after by/without/on)
    or Grafana variables.
    """
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\$\w+", "", text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):
            continue
        if match.group(0).lower() in _KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def test_metric_names_parser() -> None:
    """The expression reader finds metric names and nothing else."""
    expr = (
        'histogram_quantile(0.95, sum by (le, handler) (rate(a_bucket{x="y:z", b!~"2..|404"}'
        "[$__rate_interval]))) / on (instance) group_left (job) b:c:rate5m > bool 1"
        ' or label_replace(d, "l", "v", "", "")'
    )
    assert metric_names(expr) == {"a_bucket", "b:c:rate5m", "d"}


def exported(text: str) -> set[str]:
    """
    Every sample name /metrics can show: those it shows now, and those each
    declared family will show once it has a child (a labelled counter or
    histogram is declared before its first observation).
    """
    names: set[str] = set()
    for line in text.splitlines():
        declared = re.match(r"# TYPE (\S+) (\w+)", line)
        if declared is not None:
            name, kind = declared.groups()
            if kind == "counter":
                # The text format declares a counter by its sample name.
                name = name.removesuffix("_total")
            suffixes = {
                "counter": ("_total",),
                "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count"),
            }.get(kind, ("",))
            names.update(name + suffix for suffix in suffixes)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def daemon_metrics(module_tmp: Path, module_userli: FakeUserliServer) -> set[str]:
    """The sample names on /metrics of a running daemon with every listener on."""
    daemon = Daemon({"USERLI_BASE_URL": module_userli.url}, module_tmp / "daemon", sasl=True)
    with daemon:
        status, body = http_get(daemon.metrics_url + "/metrics")
    assert status == 200
    return exported(body.decode("utf-8"))


def recorded() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


@pytest.mark.integration
def test_dashboard_metrics_exported(daemon_metrics: set[str]) -> None:
    """Every metric the dashboard queries is exported by the daemon (or recorded by the rules)."""
    named = set()
    for panel in all_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            named |= metric_names(target["expr"])
    assert any(name.startswith("userli_postfix_adapter_") for name in named)
    unknown = named - daemon_metrics - recorded() - ADDED_BY_THE_COHERENT_CACHE_CHANGE
    assert unknown == set()


@pytest.mark.integration
def test_rules_metrics_exported(daemon_metrics: set[str]) -> None:
    """Every metric the alerting and recording rules read is exported by the daemon."""
    named = set()
    for rule in rules():
        named |= metric_names(rule["expr"])
    unknown = (
        named - daemon_metrics - recorded() - FROM_PROMETHEUS - ADDED_BY_THE_COHERENT_CACHE_CHANGE
    )
    assert unknown == set()


@pytest.mark.integration
def test_metric_check_catches_a_misspelling(daemon_metrics: set[str]) -> None:
    """A metric name the daemon does not export is reported by the same check."""
    named = metric_names("sum(rate(userli_postfix_adapter_lookups_total[5m]))")
    assert named - daemon_metrics == {"userli_postfix_adapter_lookups_total"}
