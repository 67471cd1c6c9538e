"""Autoscaling end to end with Ray (issue 18), on a small application of its own beside the shared test app: one
digits variant under the work-aware policy (serve/autoscaling.py) with min_replicas 0. It starts with one replica
(the deploy proves the model loads), idles down to zero, answers its next request with a 200 after a cold start,
grows under a ramp of clients to its maximum with every request answered, and goes back to zero."""

from __future__ import annotations

import time
from typing import Any

import requests

from .conftest import RunningApp
from .helpers import MODEL_DIR, wait_for

APP = "autoscale-test"
PREFIX = "/autoscale"


def zero_config(port: int) -> dict[str, Any]:
    return {
        "app_name": APP,
        "variants": [{
            "name": "idle-nf4", "model": MODEL_DIR, "quantization": "nf4", "gemm_sample_every": 0,
            "resources": {"num_cpus": 0, "torch_threads": 1}, "max_ongoing_requests": 2,
            "batching": {"max_batch_images": 4},
            "autoscaling": {"policy": "work", "target_wait_s": 0.2, "min_replicas": 0, "max_replicas": 2,
                            "upscale_delay_s": 0, "downscale_delay_s": 2, "downscale_to_zero_delay_s": 2,
                            "look_back_period_s": 3},
        }],
        "http": {"host": "127.0.0.1", "port": port},
        "limits": {"max_steps": 200, "max_n": 4},
        "request_timeout_s": 120,
    }


HEAVY = {"prompt": "5", "size": "32x32", "steps": 60, "n": 2}


def running_replicas(url: str) -> dict[str, int]:
    """Running replicas per variant, as /readyz reports them."""
    return {name: v["running_replicas"] for name, v in requests.get(f"{url}/readyz", timeout=30).json()["variants"].items()}


def wanted_replicas(app_name: str) -> dict[str, int]:
    """Replicas per variant that Serve is starting or running: the autoscaler's decision, before a slow start ends."""
    from quantserve.serve.deploy import replica_counts

    return {variant: counts["wanted"] for variant, counts in replica_counts(app_name).items()}


def load_until(url: str, bodies: list[dict[str, Any]], done: Any, timeout_s: float, min_s: float = 0.0,
               replicas: Any = None, current: bool = False) -> tuple[dict[str, int], list[Any]]:
    """One client per body, sending back to back, until `done(peak replicas per variant)` (and at least `min_s`)
    or `timeout_s`; then every client finishes its request. (peak replicas per variant: `replicas()`, by default
    the running ones; with `current`, the latest reading instead of the peak; every answer: 200, or (status, the
    start of its body))."""
    replicas = replicas or (lambda: running_replicas(url))
    import threading
    from concurrent.futures import ThreadPoolExecutor

    stop, peak, statuses = threading.Event(), {}, []

    def client(body: dict[str, Any]) -> None:
        while not stop.is_set():
            r = requests.post(f"{url}/v1/images/generations", json=body, timeout=180)
            statuses.append(r.status_code if r.status_code == 200 else (r.status_code, r.text[:300]))
    with ThreadPoolExecutor(len(bodies)) as pool:
        for body in bodies:
            pool.submit(client, body)
        started = time.monotonic()
        try:
            while time.monotonic() - started < timeout_s:
                for name, n in replicas().items():
                    peak[name] = n if current else max(peak.get(name, 0), n)
                if time.monotonic() - started >= min_s and done(peak):
                    break
                time.sleep(1)
        finally:
            stop.set()
    return peak, statuses


def running(url: str) -> int:
    return requests.get(f"{url}/readyz", timeout=30).json()["variants"]["idle-nf4"]["running_replicas"]


def test_a_variant_at_zero_answers_then_scales_up_under_a_ramp_and_back(app: RunningApp) -> None:
    from ray import serve

    from quantserve.serve.config import parse_config
    from quantserve.serve.deploy import deploy

    deploy(parse_config(zero_config(app.port)), timeout_s=300, route_prefix=PREFIX)
    url = f"{app.url}{PREFIX}"
    try:
        wait_for(lambda: running(url) == 0, 90, "the idle variant to scale to zero")
        ready = requests.get(f"{url}/readyz", timeout=30)
        assert ready.status_code == 200 and ready.json()["variants"]["idle-nf4"]["scaled_to_zero"] is True
        [model] = requests.get(f"{url}/v1/models", timeout=30).json()["data"]
        assert model["scaled_to_zero"] is True and model["running_replicas"] == 0  # listing did not wake it
        assert running(url) == 0

        started = time.monotonic()
        r = requests.post(f"{url}/v1/images/generations", json={"prompt": "2", "size": "16x16", "steps": 2},
                          timeout=150)
        cold_s = time.monotonic() - started
        assert r.status_code == 200, r.text[:500]
        assert running(url) >= 1
        [model] = requests.get(f"{url}/v1/models", timeout=30).json()["data"]
        phases = model["cold_start_s"]
        assert {"process", "imports", "autotune", "health", "total"} <= set(phases) and phases["total"] > 0
        assert "pending_work_s" in model["work"]
        print(f"first request at zero answered in {cold_s:.1f} s; replica start {phases}")

        # heavy jobs from four clients: the replicas report seconds of pending work, and the policy asks for more
        peak, statuses = load_until(url, [HEAVY] * 4, lambda replicas: replicas.get("idle-nf4", 0) >= 2, 180)
        assert statuses and set(statuses) == {200}, statuses  # nothing lost while scaling
        assert peak["idle-nf4"] == 2, peak
        # scale-down under a steady load: one client keeps sending while a replica is chosen for removal; it
        # finishes what it accepted (Serve's graceful shutdown), so nothing is lost
        low, statuses = load_until(url, [HEAVY], lambda now: now.get("idle-nf4", 2) <= 1, 120, current=True)
        assert low["idle-nf4"] == 1, low
        assert statuses and set(statuses) == {200}, statuses
        wait_for(lambda: running(url) == 0, 120, "the variant to go back to zero once idle")
    finally:
        serve.delete(APP)


def mixed_config(port: int, policy: str) -> dict[str, Any]:
    """Two variants of the same model, one for big jobs and one for small ones, under one policy."""
    scaling = {"policy": policy, "min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0, "downscale_delay_s": 600,
               "target_ongoing_requests": 1, "target_wait_s": 3.0, "look_back_period_s": 3}
    common = {"model": MODEL_DIR, "quantization": "nf4", "gemm_sample_every": 0, "max_ongoing_requests": 4,
              "resources": {"num_cpus": 0, "torch_threads": 1}, "batching": {"max_batch_images": 4},
              "autoscaling": scaling}
    return {"app_name": f"mixed-{policy}", "variants": [{"name": "big", **common}, {"name": "small", **common}],
            "experiment": {"weights": {"big": 1, "small": 1}},
            "http": {"host": "127.0.0.1", "port": port}, "limits": {"max_steps": 200, "max_n": 4},
            "request_timeout_s": 120}


BIG = {"model": "big", "prompt": "8", "size": "64x64", "steps": 60, "n": 2}
SMALL = {"model": "small", "prompt": "1", "size": "16x16", "steps": 2, "n": 1}


def test_the_work_policy_gives_big_jobs_more_replicas_than_the_request_policy_does(app: RunningApp) -> None:
    """The same mixed load on two apps side by side, one per policy: two clients each on 'big' and 'small' hold
    two requests at a time in each variant, so counting requests sizes them alike; counting seconds of work gives
    the variant whose jobs are ~100x bigger the replicas. Peaks are Serve's decisions (replicas starting or
    running), whatever a replica's start takes on a busy machine; every request must be answered 200."""
    import threading

    from ray import serve

    from quantserve.serve.config import parse_config
    from quantserve.serve.deploy import submit, wait_running

    policies = ("work", "requests")
    for policy in policies:
        submit(parse_config(mixed_config(app.port, policy)), route_prefix=f"/mixed-{policy}")
    try:
        for policy in policies:
            wait_running(f"mixed-{policy}", 300)
        results: dict[str, tuple[dict[str, int], list[int]]] = {}

        def run(policy: str) -> None:
            results[policy] = load_until(f"{app.url}/mixed-{policy}", [BIG] * 2 + [SMALL] * 2, lambda p: False, 30,
                                         replicas=lambda: wanted_replicas(f"mixed-{policy}"))
        threads = [threading.Thread(target=run, args=(p,)) for p in policies]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        (work, work_statuses), (by_requests, req_statuses) = results["work"], results["requests"]
        print(f"peak replicas: work policy {work}, request policy {by_requests}")
        assert work_statuses and set(work_statuses) == {200}, [s for s in work_statuses if s != 200]
        assert req_statuses and set(req_statuses) == {200}, [s for s in req_statuses if s != 200]
        assert work["big"] > work["small"], work
        assert work["big"] - work["small"] > by_requests["big"] - by_requests["small"], (work, by_requests)
    finally:
        for policy in policies:
            serve.delete(f"mixed-{policy}")
