"""Autoscaling end to end with Ray (issue 18), on a small application of its own beside the shared test app: one
digits variant under the work-aware policy (serve/autoscaling.py) with min_replicas 0. It starts with one replica
(the deploy proves the model loads), idles down to zero, answers its next request with a 200 after a cold start,
grows under a ramp of clients to its maximum with every request answered, and goes back to zero."""

from __future__ import annotations

import time
from typing import Any

import requests

from quantserve.serve.ramp import MixEntry, parse_schedule, run_ramp

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
                            "upscale_delay_s": 0, "downscale_delay_s": 2, "downscale_to_zero_delay_s": 2},
        }],
        "http": {"host": "127.0.0.1", "port": port},
        "limits": {"max_steps": 200, "max_n": 4},
        "request_timeout_s": 120,
    }


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
        assert set(phases) == {"process", "load", "autotune", "health", "total"} and phases["total"] > 0
        assert "pending_work_s" in model["work"]
        print(f"first request at zero answered in {cold_s:.1f} s; replica start {phases}")

        # heavy jobs from four clients: the replicas report seconds of pending work, and the policy asks for more
        rows, totals = run_ramp(url, parse_schedule("0:4"), (MixEntry(),),
                                {"prompt": "5", "size": "32x32", "steps": 60, "n": 2}, duration_s=40, interval_s=5)
        assert totals["sent"] == totals["ok"] and totals["sent"] > 0, totals  # nothing lost while scaling
        peak = max(row["replicas"].get("idle-nf4", 0) for row in rows if row.get("replicas"))
        assert peak == 2, rows
        wait_for(lambda: running(url) == 0, 120, "the variant to go back to zero once idle")
    finally:
        serve.delete(APP)
