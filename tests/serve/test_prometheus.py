"""A real Prometheus server scrapes the running app, and every PromQL expression of the Grafana dashboard
(helm/quantserve/dashboards/quantserve.json) returns data through Prometheus's HTTP query API.

The server is Debian's `prometheus` package (.ci/run installs it when absent). The test starts its own process on a
free loopback port, with a 1 s scrape of Ray's metrics agent and its TSDB in a temporary directory, and ends it by
its pid. Traffic runs twice: the first round creates every series, and once Prometheus holds them the second round
makes each counter and histogram grow between two samples, which rate() (and the ratios and quantiles built on it)
needs to give a finite value rather than none or NaN.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import RunningApp
from .helpers import FAIL_SEED, free_port, wait_for

DASHBOARD = Path(__file__).resolve().parents[2] / "helm" / "quantserve" / "dashboards" / "quantserve.json"
FORCE = "X-Quantserve-Force-Variant"
SCRAPE_INTERVAL = "1s"  # Ray's agent already delays its export by several seconds; scrape it as often as it changes
# Grafana's $__rate_interval is at least four scrape intervals and grows with the panel's time range. Here the range
# must cover every sample of this test (Prometheus starts with it, and the test stays well under two minutes), so
# rate() always sees the first round's samples beside the second's, however late Ray's agent exports them.
RATE_INTERVAL = "2m"
# target labels the Prometheus Operator gives the PodMonitors' targets in Kubernetes (templates/podmonitors.yaml),
# absent from this local scrape
KUBERNETES_LABELS = {"namespace", "pod", "container", "endpoint"}
GRAFANA_VARIABLE = re.compile(r"\$(\{\w+\}|__rate_interval|__interval|__range|[A-Za-z_]\w*)")
METRIC_NAME = re.compile(r"\bray_quantserve_\w+")
# Ray's agent exports what the replicas report every 10 s (metrics_report_interval_ms); Prometheus scrapes it every 1 s
SCRAPED_WAIT_S = 40  # the first round's series reaching Prometheus
ANSWER_WAIT_S = 40  # the second round's growth reaching every panel
INSTALL_HINT = ("Debian's prometheus package: apt-get install prometheus "
                "(.ci/run installs it when `command -v prometheus` fails)")


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, refId, expression) of every target of every panel, rows' nested panels included."""
    dash = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for panel in dash["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return [(p["title"], t.get("refId", "?"), t["expr"]) for p in panels for t in p.get("targets", [])]


def variable_queries() -> list[tuple[str, str, str]]:
    """(variable, selector, label) of every label_values(SELECTOR, LABEL) template variable."""
    out = []
    for var in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if var["type"] == "query":
            text = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", text)
            assert match, f"variable {var['name']}: expected label_values(SELECTOR, LABEL), got {text}"
            out.append((var["name"], match.group(1), match.group(2)))
    return out


def as_promql(expr: str) -> str:
    """Template variables ($namespace, $application, $variant: Grafana's 'All', whose allValue is .*) become .*,
    interval variables RATE_INTERVAL."""
    def sub(m: re.Match[str]) -> str:
        name = m.group(1).strip("{}")
        return RATE_INTERVAL if name.startswith("__") else ".*"
    return GRAFANA_VARIABLE.sub(sub, expr)


@contextmanager
def prometheus_server(target: str) -> Iterator[str]:
    """A Prometheus process scraping `target` (host:port) every second; yields its base URL, then ends it."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(f"no `prometheus` on PATH: this test needs {INSTALL_HINT}", pytrace=False)
    workdir = Path(tempfile.mkdtemp(prefix="quantserve-prometheus-"))
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                   "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [{"job_name": "quantserve", "static_configs": [{"targets": [target]}]}],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode}: "
                                 f"{(workdir / 'prometheus.log').read_text()[-3000:]}")
        try:
            return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        deadline = time.monotonic() + 30
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus was not ready after 30 s: "
                                     f"{(workdir / 'prometheus.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()  # this process only, by its pid
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def query(prometheus: str, promql: str) -> dict[str, Any]:
    """Prometheus's answer to an instant query, as JSON (status, data or error)."""
    return requests.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()


def finite_values(answer: dict[str, Any]) -> list[float]:
    """The finite values of an instant query's vector or scalar result."""
    if answer.get("status") != "success":
        return []
    data = answer["data"]
    if data["resultType"] == "vector":
        values = [float(s["value"][1]) for s in data["result"]]
    elif data["resultType"] == "scalar":
        values = [float(data["result"][1])]
    else:
        values = []
    return [v for v in values if math.isfinite(v)]


def _ok(response: requests.Response, what: str) -> requests.Response:
    assert response.status_code == 200, f"{what}: {response.status_code} {response.text[:500]}"
    return response


def _shadow_runs(app: RunningApp) -> int:
    return sum(app.get("/v1/ab").json()["shadow"]["runs"].values())


# a quick, permissive rollout of nf4 over bf16 (the rollout panels): the forced requests below feed its guards
ROLLOUT = {"candidate": "nf4", "baseline": "bf16", "steps": [0.5, 1.0], "step_interval_s": 1.0, "min_requests": 1,
           "min_comparisons": 1, "guards": {"max_error_rate": 1.0, "max_p95_latency_ratio": 1000.0, "min_ssim": -1.0,
                                            "max_pixel_mae": 1.0}}


def drive_dashboard_traffic(app: RunningApp) -> None:
    """Traffic that gives every panel of the dashboard data; run under a shadow experiment (bf16 shadows the
    other variants) with ROLLOUT. Add here what a new panel needs."""
    shadows_before = _shadow_runs(app)
    # generations on both variants (requests, images, steps, latencies, images/s, GEMM samples: both variants have
    # gemm_sample_every 1), forced and assigned (A/B assignments by reason); nf4's response is shadowed by bf16
    # (shadow difference, shadow runs, fidelity)
    served = {variant: _ok(app.post({"prompt": "3", "steps": 3, "n": 2}, headers={FORCE: variant}), variant)
              for variant in ("bf16", "nf4")}
    _ok(app.post({"prompt": "4", "steps": 2, "user": "prometheus-user"}), "an assigned request")
    # user feedback on a served response
    _ok(requests.post(f"{app.url}/v1/feedback", json={"id": served["nf4"].json()["id"], "score": 1}, timeout=30),
        "feedback")
    # a 500 from a replica ('tight' fails its FAIL_SEED): Errors per variant
    failed = app.post({"prompt": "5", "steps": 2, "seed": FAIL_SEED}, headers={FORCE: "tight"})
    assert failed.status_code == 500, failed.text[:500]
    # a 503: 'tight' runs one request and queues one, so a burst is turned away (Errors per variant: rejections)
    for _ in range(3):
        with ThreadPoolExecutor(6) as pool:
            burst = pool.map(lambda i: app.post({"prompt": "6", "steps": 30, "n": 2, "seed": i},
                                                headers={FORCE: "tight"}), range(6))
            statuses = [r.status_code for r in burst]
        assert set(statuses) <= {200, 503}, statuses
        if 503 in statuses:
            break
    else:
        raise AssertionError(f"three bursts on 'tight' got no 503: {statuses}")
    wait_for(lambda: _shadow_runs(app) > shadows_before, 60, "nf4's shadow run")


def test_every_dashboard_panel_returns_data_from_a_real_prometheus(app: RunningApp,
                                                                  ray_cluster: dict[str, int]) -> None:
    """Each expression must give a finite value at some poll, not all at the same instant: Ray's agent drops a gauge
    that has not been set for two export intervals (20 s), while a counter's growth can take an interval to show."""
    checks: dict[str, tuple[str, Callable[[dict[str, Any]], bool]]] = {}  # where -> (PromQL, does the answer do)
    for title, ref, expr in dashboard_targets():
        checks[f"panel {title!r} target {ref}"] = (as_promql(expr), lambda answer: bool(finite_values(answer)))
    for name, selector, label in variable_queries():  # label_values(): series, and (outside Kubernetes) the label
        checks[f"variable {name!r} (label_values of {label})"] = (as_promql(selector), lambda answer, label=label: bool(
            (result := answer.get("data", {}).get("result")) and
            (label in KUBERNETES_LABELS or any(s["metric"].get(label) for s in result))))
    assert any(where.startswith("panel") for where in checks), f"no panel targets in {DASHBOARD}"
    names = {name for promql, _ in checks.values() for name in METRIC_NAME.findall(promql)}
    scraped: set[str] = set()

    def all_scraped() -> bool:
        scraped.update(n for n in names - scraped if query(prometheus, f"count({n})").get("data", {}).get("result"))
        return scraped == names

    pending = dict(checks)
    answers: dict[str, dict[str, Any]] = {}
    with prometheus_server(f"127.0.0.1:{ray_cluster['metrics_port']}") as prometheus, \
            app.experiment(shadow={"variant": "bf16", "sample_rate": 1.0}, rollout=ROLLOUT):
        drive_dashboard_traffic(app)
        try:
            wait_for(all_scraped, SCRAPED_WAIT_S, "Prometheus to scrape every metric of the dashboard", poll_s=1)
        except AssertionError:
            pass  # go on: the report below names the panels, and the metrics never scraped
        drive_dashboard_traffic(app)  # the counters and histograms grow between two samples
        deadline = time.monotonic() + ANSWER_WAIT_S
        while pending:
            for where, (promql, answered) in list(pending.items()):
                answers[where] = query(prometheus, promql)
                if answered(answers[where]):
                    del pending[where]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(1)
    report = [f"{where}:\n  expr: {promql}\n  answer: {json.dumps(answers[where])[:1000]}"
              for where, (promql, _) in pending.items()]
    if pending:
        pytest.fail(f"{len(pending)} of {len(checks)} dashboard expressions returned no finite value within "
                    f"{ANSWER_WAIT_S} s of the second round of traffic (metrics Prometheus never scraped: "
                    f"{sorted(names - scraped) or 'none'}):\n" + "\n".join(report))
