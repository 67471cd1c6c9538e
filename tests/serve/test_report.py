"""The A/B report (issue 15): bootstrap intervals against known distributions, windows, error rates and the p95
ratio as plain Python; then GET /v1/ab/report and `quantserve ab report` against the running app."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from quantserve.serve.report import RequestLog, bootstrap_ci, build_report, parse_window, ratio_ci

from .conftest import RunningApp
from .helpers import wait_for

FORCE = "X-Quantserve-Force-Variant"


def test_bootstrap_interval_covers_a_known_p95_about_95_percent_of_the_time() -> None:
    scale, runs = 0.1, 200
    true_p95 = -np.log(0.05) * scale  # exponential latencies
    rng = np.random.default_rng(7)
    hits = 0
    for i in range(runs):
        est, low, high = bootstrap_ci(rng.exponential(scale, 400), 95, samples=400, rng=np.random.default_rng(i))
        assert low <= est <= high
        hits += low <= true_p95 <= high
    assert 0.85 <= hits / runs <= 0.99, hits / runs  # the percentile bootstrap runs a little under 95% at p95
    assert bootstrap_ci([], 50) is None


def test_ratio_interval_holds_the_true_ratio_and_separates_different_variants() -> None:
    rng = np.random.default_rng(3)
    fast, slow = rng.exponential(0.07, 2000), rng.exponential(0.1, 2000)
    ratio, low, high = ratio_ci(fast, slow, 95)
    assert low < 0.7 < high and high < 1.0  # true p95 ratio 0.7; clearly faster
    same = ratio_ci(rng.exponential(0.1, 2000), rng.exponential(0.1, 2000), 95)
    assert same[1] < 1.0 < same[2]
    assert ratio_ci([], slow, 95) is None and ratio_ci(fast, [0.0, 0.0], 95) is None


def test_report_counts_errors_windows_and_compares_against_the_baseline() -> None:
    log = RequestLog()
    log.started = 0.0
    rng = np.random.default_rng(1)
    for i in range(200):
        log.add("bf16", 200, float(rng.exponential(0.1)), 2, now=1000.0 + i)
        log.add("nf4", 500 if i % 20 == 0 else 200, float(rng.exponential(0.05)), 2, now=1000.0 + i)
    report = build_report(log, ["bf16", "nf4"], None, "bf16", {"nf4": {"scheme": "nf4"}}, now=1200.0)
    nf4 = report["variants"]["nf4"]
    assert (nf4["requests"], nf4["errors"], nf4["error_rate"], nf4["scheme"]) == (200, 10, 0.05, "nf4")
    assert nf4["p95_ms"]["ci95"][0] <= nf4["p95_ms"]["value"] <= nf4["p95_ms"]["ci95"][1]
    assert report["variants"]["bf16"]["images_per_s"] == pytest.approx(400 / 1200, rel=1e-3)
    [cmp] = report["comparisons"]
    assert cmp["candidate"] == "nf4" and cmp["p95_latency_ratio"]["value"] < 1.0
    assert cmp["text"].startswith("nf4 p95 is 0.") and "x bf16 [" in cmp["text"]
    recent = build_report(log, ["bf16", "nf4"], 50.0, "bf16", now=1200.0)
    assert recent["requests"] == 2 * 50 and recent["span_s"] == 50.0
    empty = build_report(RequestLog(), ["bf16", "nf4"], None, "bf16")
    assert empty["variants"]["nf4"]["p95_ms"] is None and "no successful request" in empty["comparisons"][0]["text"]


@pytest.mark.parametrize("text,seconds", [("300s", 300.0), ("5m", 300.0), ("2h", 7200.0), ("90", 90.0),
                                          (None, None), ("", None)])
def test_windows(text: str | None, seconds: float | None) -> None:
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["0s", "-5m", "5d", "five", "5 m"])
def test_bad_windows_name_the_field(text: str) -> None:
    with pytest.raises(ValueError, match="window: expected a positive duration"):
        parse_window(text)


def test_report_over_http_and_the_cli(app: RunningApp) -> None:
    import requests

    from quantserve.cli import main

    with app.experiment(weights={"bf16": 0.5, "nf4": 0.5}, shadow={"variant": "bf16", "sample_rate": 1.0}):
        before = app.get("/v1/ab").json()["shadow"]["runs"].get("ok", 0)
        for seed in range(4):
            for variant in ("bf16", "nf4"):
                assert app.post({"prompt": "4", "steps": 2, "seed": seed}, headers={FORCE: variant}).status_code == 200
        wait_for(lambda: app.get("/v1/ab").json()["shadow"]["runs"].get("ok", 0) >= before + 4, 60, "shadow runs")
        r = requests.get(f"{app.url}/v1/ab/report", params={"window": "10m"}, timeout=60)
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["baseline"] == "bf16" and report["window_s"] == 600.0
        nf4 = report["variants"]["nf4"]
        assert nf4["ok"] >= 4 and nf4["p50_ms"]["value"] > 0 and nf4["model_bytes"] > 0
        assert 0 < nf4["fidelity"]["bf16"]["ssim_mean"] <= 1 and nf4["fidelity"]["bf16"]["runs"] >= 4
        assert report["comparisons"][0]["candidate"] == "nf4" and report["comparisons"][0]["p95_latency_ratio"]
        # a streamed generation counts too, once it has ended
        streamed = requests.post(f"{app.url}/v1/images/generations", headers={FORCE: "nf4"}, timeout=120, stream=True,
                                 json={"prompt": "4", "steps": 2, "stream": True})
        assert streamed.status_code == 200 and b"image_generation.completed" in streamed.content
        again = requests.get(f"{app.url}/v1/ab/report", params={"window": "10m"}, timeout=60).json()
        assert again["variants"]["nf4"]["ok"] == nf4["ok"] + 1
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["ab", "report", "--url", app.url, "--window", "10m"]) == 0
        text = out.getvalue()
        assert "baseline bf16" in text and "nf4 p95 is" in text and "tight" in text
        with contextlib.redirect_stdout(io.StringIO()) as raw:
            assert main(["ab", "report", "--url", app.url, "--json"]) == 0
        assert json.loads(raw.getvalue())["baseline"] == "bf16"
    bad = requests.get(f"{app.url}/v1/ab/report", params={"window": "forever"}, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "window"
    unknown = requests.get(f"{app.url}/v1/ab/report", params={"baseline": "nope"}, timeout=30)
    assert unknown.status_code == 422 and unknown.json()["error"]["param"] == "baseline"
