"""Drives one scale-up / scale-down cycle on a fake autoscaling cluster (tests/serve/fake_cluster.py) and prints what
happened as one JSON line (the last line of its output).

    python tests/serve/fake_cluster_driver.py --address 127.0.0.1:PORT --http-port PORT

A process of its own because the pytest process is already connected to the serve tests' Ray instance. It deploys
a trivial Serve deployment (no model: it sleeps 0.5 s and answers its node id) whose replicas need the `fake_gpu`
resource that only the autoscaler's fake GPU nodes have, with 0 to 1 replicas. Then: clients send requests, Serve
wants a replica, the replica waits for a node, the cluster autoscaler adds one, the replica starts there and answers;
the clients stop, Serve takes the replica away, and the autoscaler removes the idle node. A sampler thread watches
`ray.nodes()` and `serve.status()` the whole time; every time is in seconds from the first request (up) or from the
last answer (down).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
import traceback
from typing import Any

import ray
import requests
from ray import serve

APP = "fakegpu"
DEPLOYMENT = "FakeGpu"
ROUTE = "/fakegpu"
RESOURCE = "fake_gpu"


@serve.deployment(
    name=DEPLOYMENT,
    ray_actor_options={"num_cpus": 0, "resources": {RESOURCE: 1}},
    max_ongoing_requests=4,
    autoscaling_config={
        "min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 1,
        "upscale_delay_s": 0, "downscale_delay_s": 2, "downscale_to_zero_delay_s": 2,
        "metrics_interval_s": 0.5, "look_back_period_s": 2,
    },
    graceful_shutdown_timeout_s=2,
)
class FakeGpu:
    async def __call__(self, request: Any) -> dict[str, Any]:
        await asyncio.sleep(0.5)
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def alive_nodes() -> dict[str, dict[str, float]]:
    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}


def running_replicas() -> int:
    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT not in app.deployments:
        return 0
    return int(app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0))


class Sampler(threading.Thread):
    """Every `period` s: the alive nodes and the running replicas, with the time they were seen."""

    def __init__(self, period: float) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.samples: list[tuple[float, list[str], int]] = []
        self.stop = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                t = time.monotonic()
                nodes = sorted(alive_nodes())
                self.samples.append((t, nodes, running_replicas()))
            except Exception as e:  # noqa: BLE001 -- a failed sample is recorded, the next one tries again
                self.errors.append(repr(e))
            self.stop.wait(self.period)


def client(url: str, stop: threading.Event, results: list[dict[str, Any]], lock: threading.Lock) -> None:
    while not stop.is_set():
        sent = time.monotonic()
        rec: dict[str, Any] = {"sent": sent}
        try:
            r = requests.get(url, timeout=180)
            rec["status"] = r.status_code
            if r.status_code == 200:
                rec["node_id"] = r.json()["node_id"]
        except Exception as e:  # noqa: BLE001 -- an unanswered request is a result
            rec["error"] = repr(e)
        rec["done"] = time.monotonic()
        with lock:
            results.append(rec)


def first(samples: list[tuple[float, list[str], int]], after: float, pred: Any) -> float | None:
    for t, nodes, replicas in samples:
        if t >= after and pred(nodes, replicas):
            return t
    return None


def run(address: str, http_port: int, clients: int, load_s: float, down_timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ray.init(address=address, namespace="qsfc", log_to_driver=False)
    head = ray.get_runtime_context().get_node_id()  # the driver runs on the head (the only node yet)
    before = alive_nodes()
    out["head_node_id"] = head
    out["nodes_before"] = sorted(before)
    out["head_resources"] = before.get(head, {})

    t = time.monotonic()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port})
    serve.run(FakeGpu.bind(), name=APP, route_prefix=ROUTE)
    out["serve_deploy_s"] = round(time.monotonic() - t, 2)
    out["replicas_before"] = running_replicas()
    out["nodes_after_deploy"] = sorted(alive_nodes())

    sampler = Sampler(0.25)
    sampler.start()
    url = f"http://127.0.0.1:{http_port}{ROUTE}"
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop = threading.Event()
    t_load = time.monotonic()
    threads = [threading.Thread(target=client, args=(url, stop, results, lock), daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
        time.sleep(0.1)
    # keep the load on for load_s after the first answer (bounded: the replica must serve within 150 s)
    deadline = t_load + 150
    first_ok = None
    while time.monotonic() < deadline:
        with lock:
            oks = [r["done"] for r in results if r.get("status") == 200]
        if oks:
            first_ok = min(oks)
            break
        time.sleep(0.1)
    if first_ok is not None:
        time.sleep(max(0.0, first_ok + load_s - time.monotonic()))
    stop.set()
    for th in threads:
        th.join(timeout=200)
    t_idle = max((r["done"] for r in results), default=time.monotonic())

    # down: the replica goes, then the node
    gone = None
    end = t_idle + down_timeout
    while time.monotonic() < end:
        if sampler.samples and sampler.samples[-1][0] > t_idle and sampler.samples[-1][1] == [head] \
                and sampler.samples[-1][2] == 0:
            gone = sampler.samples[-1][0]
            break
        time.sleep(0.25)
    sampler.stop.set()
    sampler.join(timeout=30)
    samples = sampler.samples

    def r2(x: float | None, base: float) -> float | None:
        return None if x is None else round(x - base, 2)

    worker_nodes_seen = sorted({n for _, nodes, _ in samples for n in nodes if n != head})
    out.update({
        "requests_sent": len(results),
        "requests_200": sum(1 for r in results if r.get("status") == 200),
        "statuses": sorted({str(r.get("status", r.get("error"))) for r in results}),
        "errors": [r["error"] for r in results if "error" in r][:5],
        "answer_node_ids": sorted({r["node_id"] for r in results if "node_id" in r}),
        "worker_nodes_seen": worker_nodes_seen,
        "max_worker_nodes_alive": max((sum(1 for n in nodes if n != head) for _, nodes, _ in samples), default=0),
        "max_replicas_running": max((reps for _, _, reps in samples), default=0),
        "node_added_s": r2(first(samples, t_load, lambda nodes, reps: len(nodes) > 1), t_load),
        "replica_running_s": r2(first(samples, t_load, lambda nodes, reps: reps >= 1), t_load),
        "first_200_s": r2(first_ok, t_load),
        "load_s": round(t_idle - t_load, 2),
        "replica_gone_after_idle_s": r2(first(samples, t_idle, lambda nodes, reps: reps == 0), t_idle),
        "node_gone_after_idle_s": r2(first(samples, t_idle, lambda nodes, reps: nodes == [head]), t_idle),
        "back_to_head_only": gone is not None,
        "nodes_at_end": sorted(alive_nodes()),
        "samples": len(samples),
        "sampler_errors": sampler.errors[:5],
    })
    latencies = sorted(r["done"] - r["sent"] for r in results if r.get("status") == 200)
    if latencies:
        out["latency_s"] = {"min": round(latencies[0], 2), "max": round(latencies[-1], 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--load-s", type=float, default=4.0)
    ap.add_argument("--down-timeout", type=float, default=90.0)
    args = ap.parse_args()
    t = time.monotonic()
    try:
        result = run(args.address, args.http_port, args.clients, args.load_s, args.down_timeout)
    except Exception:  # noqa: BLE001 -- the test reads the failure from the JSON
        result = {"error": traceback.format_exc()}
    result["driver_s"] = round(time.monotonic() - t, 2)
    print(json.dumps(result), flush=True)
    os._exit(0)  # no ray.shutdown() wait: the cluster's owner tears it down


if __name__ == "__main__":
    main()
