"""The progressive rollout end to end, with Ray and short intervals: the test app's experiment gains a rollout
(nf4 the candidate, bf16 the baseline, shadowed), its rollout keeper (a detached actor) judges the steps on the
traffic the router sends, and the router splits by the keeper's weight."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from quantserve.cli import main

from .conftest import RunningApp
from .helpers import wait_for

BODY = {"prompt": "3", "size": "16x16", "steps": 3}
SHADOW = {"variant": "bf16", "sample_rate": 1.0}
PERMISSIVE = {"max_error_rate": 0.5, "max_p95_latency_ratio": 100.0, "min_ssim": -1.0, "max_pixel_mae": 1.0}


def rollout(**changes: Any) -> dict[str, Any]:
    base = {"candidate": "nf4", "baseline": "bf16", "steps": [0.3, 0.6, 1.0], "step_interval_s": 1.0,
            "min_requests": 4, "min_comparisons": 2, "guards": PERMISSIVE}
    return {**base, **changes}


def state(app: RunningApp) -> dict[str, Any]:
    return app.get("/v1/ab").json()


def send(app: RunningApp, count: int) -> Counter[str]:
    """`count` generations, two at a time; the variants that answered (every one must be a 200)."""
    def one(i: int) -> str:
        r = app.post({**BODY, "seed": i})
        assert r.status_code == 200, r.text
        return r.headers["X-Quantserve-Variant"]
    with ThreadPoolExecutor(2) as pool:
        return Counter(pool.map(one, range(count)))


def drive_until(app: RunningApp, done: Any, what: str, timeout_s: float = 150) -> dict[str, Any]:
    """Send traffic in small rounds until `done(rollout state)`; that state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        send(app, 6)
        r = state(app)["rollout"]
        if done(r):
            return r
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; rollout: {state(app)['rollout']}")


def test_a_permissive_rollout_reaches_weight_one_through_every_step(app: RunningApp) -> None:
    with app.experiment(shadow=SHADOW, rollout=rollout()) as exp:
        assert exp["rollout"]["status"] == "running" and exp["rollout"]["weight"] == 0.3
        assert exp["experiment"]["weights"] == pytest.approx({"bf16": 0.7, "nf4": 0.3, "tight": 0.0})
        final = drive_until(app, lambda r: r["status"] == "complete", "the rollout to complete")
        assert final["weight"] == 1.0 and final["step"] == 2
        decisions = [(e["decision"], e["weight"]) for e in final["events"]]
        assert decisions == [("start", 0.3), ("advance", 0.6), ("complete", 1.0)]
        assert all(g["holds"] for e in final["events"][1:] for g in e["results"])
        assert {g["guard"] for g in final["events"][1]["results"]} == set(PERMISSIVE)
        assert state(app)["experiment"]["weights"] == pytest.approx({"bf16": 0.0, "nf4": 1.0, "tight": 0.0})
        assert send(app, 8) == Counter({"nf4": 8})  # the candidate has all of the pair's traffic
        report = app.get("/v1/ab/report?baseline=bf16").json()
        assert report["rollout"]["status"] == "complete"
        [nf4] = [c for c in report["comparisons"] if c["candidate"] == "nf4"]
        assert {g["guard"] for g in nf4["guards"] if "guard" in g} >= {"max_error_rate", "min_ssim"}
        def scraped() -> bool:  # Ray's agent exports every 10 s; each series shows up at its first export after set
            text = requests.get(app.metrics_url, timeout=10).text
            return all(s in text for s in ('ray_quantserve_ab_rollout_decisions_total{', 'decision="complete"',
                                           'ray_quantserve_ab_rollout_weight{', 'guard="min_ssim"'))
        wait_for(scraped, 120, "the rollout metrics (weight, decisions, guard figures) at Ray's metrics port")
    assert state(app)["rollout"] is None  # the experiment back without a rollout: it is over


def test_an_unreachable_fidelity_guard_rolls_back_and_names_the_guard(app: RunningApp, capsys) -> None:
    guards = {**PERMISSIVE, "min_ssim": 1.0}  # nf4 never draws exactly what bf16 draws
    with app.experiment(shadow=SHADOW, rollout=rollout(guards=guards)):
        final = drive_until(app, lambda r: r["status"] != "running", "the rollout to stop")
        assert final["status"] == "rolled_back" and final["weight"] == 0.0 and final["step"] == 0
        assert final["failed"]["guard"] == "min_ssim" and final["failed"]["value"] < 1.0
        assert "FAILS (min_ssim >= 1)" in final["failed"]["text"]
        assert final["events"][-1]["decision"] == "rollback" and final["events"][-1]["guard"] == "min_ssim"
        assert "nf4" not in send(app, 8)  # the baseline has the pair's traffic again
        assert main(["ab", "report", "--url", app.url]) == 0
        out = capsys.readouterr().out
        assert "rollout nf4 vs bf16: rolled_back, weight 0" in out and "stopped by min_ssim" in out


def test_a_router_replica_killed_mid_rollout_resumes_at_the_same_step(app: RunningApp) -> None:
    with app.experiment(shadow=SHADOW, rollout=rollout(steps=[0.3, 0.5, 0.8, 1.0])):
        at = drive_until(app, lambda r: r["step"] == 1, "the rollout's first step up")
        before = state(app)
        pid = before["router"]["pid"]
        os.kill(pid, signal.SIGKILL)
        after = wait_for(lambda: (s := state(app))["router"]["pid"] != pid and s, 120, "a new Ingress replica")
        r = after["rollout"]
        assert (r["status"], r["step"], r["weight"], r["version"]) == ("running", 1, 0.5, at["version"])
        assert after["experiment"]["weights"] == pytest.approx({"bf16": 0.5, "nf4": 0.5, "tight": 0.0})
        final = drive_until(app, lambda r: r["status"] == "complete", "the resumed rollout to complete")
        assert [e["decision"] for e in final["events"]] == ["start", "advance", "advance", "complete"]


def test_manual_control_through_the_cli(app: RunningApp, capsys) -> None:
    assert main(["ab", "pause", "--url", app.url]) == 1  # no rollout configured yet
    assert "409: no rollout in the experiment" in capsys.readouterr().err
    with app.experiment(shadow=SHADOW, rollout=rollout(step_interval_s=3600)):
        assert main(["ab", "pause", "--url", app.url]) == 0
        assert "rollout nf4 vs bf16: paused, weight 0.3" in capsys.readouterr().out
        assert main(["ab", "pause", "--url", app.url]) == 1
        assert "only a running rollout pauses" in capsys.readouterr().err
        assert main(["ab", "resume", "--url", app.url, "--json"]) == 0
        assert '"status": "running"' in capsys.readouterr().out
        assert main(["ab", "promote", "--url", app.url]) == 0
        assert state(app)["experiment"]["weights"]["bf16"] == 0.0
        assert main(["ab", "rollback", "--url", app.url]) == 0
        r = state(app)["rollout"]
        assert (r["status"], r["weight"], r["failed"]["guard"]) == ("rolled_back", 0.0, "manual")
        assert [e["decision"] for e in r["events"]] == ["start", "pause", "resume", "promote", "rollback"]
        bad = requests.post(f"{app.url}/v1/ab/rollout", json={"action": "restart"}, timeout=30)
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "action"
        # the same config deployed again keeps the finished rollout where it is
        from quantserve.serve.config import parse_config
        from quantserve.serve.deploy import submit

        from .helpers import make_test_config
        generation = state(app)["generation"]
        submit(parse_config(make_test_config(app.port, salt="another-salt", shadow=SHADOW,
                                             rollout=rollout(step_interval_s=3600))))  # a SIGHUP reload does this
        wait_for(lambda: state(app)["generation"] > generation, 60, "the redeploy")
        assert state(app)["rollout"]["status"] == "rolled_back"
        # a changed config starts it again
        submit(parse_config(make_test_config(app.port, shadow=SHADOW, rollout=rollout(step_interval_s=3000))))
        wait_for(lambda: state(app)["rollout"]["status"] == "running", 60, "the changed rollout to start")
        assert state(app)["rollout"]["events"][0]["reason"] == "the rollout config changed: started again"
