"""Drives a quantserve variant through Serve's autoscaler and Ray's cluster autoscaler on a fake autoscaling cluster
(tests/serve/fake_cluster.py), and prints what happened as one JSON line (the last line of its output).

    python tests/serve/fake_cluster_driver.py --address 127.0.0.1:PORT --http-port PORT

A process of its own because the pytest process is already connected to the serve tests' Ray instance. It starts
Serve on the head (HeadOnly proxy on --http-port) and deploys, through quantserve's own path (parse_config -> deploy,
which hands Serve the Ray Serve config of `ray_serve_config`), an app of one digits variant (nf4) whose replica
reserves `resources.custom: {fake_gpu: 1}`, a resource only the autoscaler's fake GPU nodes have, scaling 0..1
under --policy (work or requests). Four phases, each bounded by --bound-s, with the times seen (seconds from the
phase's start):

  deploy   the deploy starts one replica even at min 0 (it proves the variant loads) -> it waits for a fake_gpu
           -> the cluster autoscaler adds a node -> the replica runs there -> the deploy returns;
  idle     no request: Serve takes the variant to zero (/readyz: scaled_to_zero) -> the node idles -> removed;
  request  a request at zero -> Serve wants a replica -> a node is added -> the replica starts there -> 200;
           then two clients for a few seconds, every request answered 200;
  idle     again: the replica goes, the node is removed, the head is alone.

A sampler thread reads `ray.nodes()` and Serve's replica details (state, node) every SAMPLE_S the whole time.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import ray
import requests
from ray import serve

APP = "qsfc-digits"
VARIANT = "v"
RESOURCE = "fake_gpu"
SAMPLE_S = 0.25
PROMPT = {"prompt": "3", "size": "16x16", "steps": 2}


def app_config(http_port: int, policy: str) -> dict[str, Any]:
    """The serve config: the embedded digits model (no `model`) in nf4, 0..1 replicas, each needing one fake_gpu."""
    return {
        "app_name": APP,
        "variants": [{
            "name": VARIANT, "quantization": "nf4", "gemm_sample_every": 0, "autotune": {"on_start": False},
            "resources": {"num_cpus": 0, "torch_threads": 1, "custom": {RESOURCE: 1}},
            "max_ongoing_requests": 4,
            "autoscaling": {"policy": policy, "min_replicas": 0, "max_replicas": 1, "target_wait_s": 1,
                            "target_ongoing_requests": 1,
                            "upscale_delay_s": 0, "downscale_delay_s": 2, "downscale_to_zero_delay_s": 2,
                            "look_back_period_s": 2, "metrics_interval_s": 0.5},
        }],
        "ingress": {"num_cpus": 0},
        "http": {"host": "127.0.0.1", "port": http_port},
        "request_timeout_s": 150,
        "graceful_shutdown_timeout_s": 1,
    }


def alive_nodes() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])


def replicas(client: Any) -> dict[str, list[tuple[str, str | None]]]:
    """(state, node id) of every replica of each of the app's deployments, from Serve's controller."""
    app = ((client.get_serve_details() or {}).get("applications") or {}).get(APP) or {}
    return {name: [(str(r.get("state")).rsplit(".", 1)[-1], r.get("node_id")) for r in d.get("replicas") or []]
            for name, d in (app.get("deployments") or {}).items()}


class Sampler(threading.Thread):
    """Every `period` s: (time, alive nodes, the variant's replicas as (state, node id), the Ingress's node ids)."""

    def __init__(self, client: Any, deployment: str, period: float) -> None:
        super().__init__(daemon=True)
        self.client, self.deployment, self.period = client, deployment, period
        self.samples: list[tuple[float, list[str], list[tuple[str, str | None]], list[str | None]]] = []
        self.stop = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                t = time.monotonic()
                nodes = alive_nodes()
                reps = replicas(self.client)
                self.samples.append((t, nodes, reps.get(self.deployment, []),
                                     [node for _, node in reps.get("Ingress", [])]))
            except Exception as e:  # noqa: BLE001 -- a failed sample is recorded, the next one tries again
                self.errors.append(repr(e))
            self.stop.wait(self.period)

    def first(self, after: float, pred: Callable[[list[str], list[tuple[str, str | None]]], bool]) -> float | None:
        for t, nodes, reps, _ in list(self.samples):
            if t >= after and pred(nodes, reps):
                return t
        return None

    def wait(self, after: float, pred: Callable[[list[str], list[tuple[str, str | None]]], bool],
             timeout: float) -> float | None:
        """The time of the first sample after `after` where pred holds, waiting for it up to `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            t = self.first(after, pred)
            if t is not None or time.monotonic() > deadline:
                return t
            time.sleep(self.period / 2)


def running(reps: list[tuple[str, str | None]]) -> list[str | None]:
    return [node for state, node in reps if state == "RUNNING"]


def post(url: str, timeout: float) -> dict[str, Any]:
    rec: dict[str, Any] = {"sent": time.monotonic()}
    try:
        r = requests.post(f"{url}/v1/images/generations", json=PROMPT, timeout=timeout)
        rec["status"] = r.status_code
        if r.status_code != 200:
            rec["body"] = r.text[:300]
    except Exception as e:  # noqa: BLE001 -- an unanswered request is a result
        rec["error"] = repr(e)
    rec["done"] = time.monotonic()
    return rec


def clients(url: str, n: int, seconds: float) -> list[dict[str, Any]]:
    """n clients sending back to back for `seconds`; each finishes its last request."""
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def loop() -> None:
        while time.monotonic() < end:
            rec = post(url, 60)
            with lock:
                results.append(rec)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=seconds + 90)
    return results


def readyz(url: str) -> dict[str, Any]:
    try:
        return requests.get(f"{url}/readyz", timeout=15).json()
    except Exception as e:  # noqa: BLE001
        return {"error": repr(e)}


def wait_until(pred: Callable[[], Any], timeout: float, period: float = 0.25) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() <= deadline:
        if pred():
            return time.monotonic()
        time.sleep(period)
    return None


def run(address: str, http_port: int, out: dict[str, Any], policy: str, n_clients: int, load_s: float,
        bound_s: float) -> None:
    from ray.serve.context import _get_global_client

    from quantserve.serve.config import parse_config
    from quantserve.serve.deploy import deploy

    ray.init(address=address, namespace="qsfc", log_to_driver=False)
    head = ray.get_runtime_context().get_node_id()  # the driver runs on the head (the only node yet)
    out["head_node_id"] = head
    out["nodes_before"] = alive_nodes()
    out["head_resources"] = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}.get(head, {})

    # Serve on the head, HeadOnly proxy on our port: deploy() finds it running and keeps it (serve.start is a no-op
    # then, and a Ray Serve config's proxy_location applies only when Serve starts)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port})
    client = _get_global_client()
    cfg = parse_config(app_config(http_port, policy), "fake cluster app")
    deployment = cfg.variants[0].deployment_name
    out["ray_actor_options"] = cfg.variants[0].ray_actor_options()
    sampler = Sampler(client, deployment, SAMPLE_S)
    sampler.start()
    url = f"http://127.0.0.1:{http_port}"
    phases: dict[str, dict[str, Any]] = {}
    out["phases"] = phases

    def r2(x: float | None, base: float) -> float | None:
        return None if x is None else round(x - base, 2)

    def worker(nodes: list[str], _: Any) -> bool:
        return any(n != head for n in nodes)

    def head_only(nodes: list[str], _: Any) -> bool:
        return nodes == [head]

    def replica_running(_: Any, reps: list[tuple[str, str | None]]) -> bool:
        return bool(running(reps))

    def no_replica(_: Any, reps: list[tuple[str, str | None]]) -> bool:
        return not reps

    # a. deploy: one replica even at min 0 -> a node for it -> it runs there -> deploy returns
    t0 = time.monotonic()
    deploy(cfg, timeout_s=bound_s)
    t1 = time.monotonic()
    out["deploy_returned_with"] = {"nodes": alive_nodes(), "replicas": replicas(client).get(deployment, [])}
    # deploy returns as the replica turns RUNNING; the sampler (every 0.25 s) may not have seen it yet
    running_at = sampler.wait(t0, replica_running, bound_s)
    phases["deploy"] = {"deploy_s": round(t1 - t0, 2), "node_added_s": r2(sampler.first(t0, worker), t0),
                        "replica_running_s": r2(running_at, t0),
                        "replica_nodes": sorted({n for _, _, reps, _ in sampler.samples for n in running(reps)
                                                 if n is not None})}
    out["ingress_nodes"] = sorted({n for *_, ing in sampler.samples for n in ing if n is not None})

    # b. idle: the variant goes to zero (as /readyz says), the node idles and the autoscaler removes it
    zero = wait_until(lambda: readyz(url).get("variants", {}).get(VARIANT, {}).get("scaled_to_zero") is True, bound_s)
    out["readyz_at_zero"] = readyz(url)
    gone = sampler.wait(t1, no_replica, bound_s)
    removed = sampler.wait(t1, head_only, bound_s)
    phases["idle"] = {"scaled_to_zero_s": r2(zero, t1), "replica_gone_s": r2(gone, t1),
                      "node_removed_s": r2(removed, t1),
                      "node_removed_after_replica_gone_s": r2(removed, gone) if gone and removed else None}
    out["nodes_at_zero"] = alive_nodes()
    if removed is None:
        raise TimeoutError(f"the idle node was not removed within {bound_s} s")

    # c. a request at zero: Serve wants a replica -> a node is added -> the replica starts there -> 200
    t2 = time.monotonic()
    cold = post(url, 150 + 30)
    first_200 = cold["done"] if cold.get("status") == 200 else None
    models = {}
    try:
        models = requests.get(f"{url}/v1/models", timeout=15).json()["data"][0]
    except Exception as e:  # noqa: BLE001
        models = {"error": repr(e)}
    load = clients(url, n_clients, load_s)
    results = [cold, *load]
    t3 = max(r["done"] for r in results)
    phases["request"] = {"node_added_s": r2(sampler.first(t2, worker), t2),
                         "replica_running_s": r2(sampler.first(t2, replica_running), t2),
                         "first_200_s": r2(first_200, t2), "cold_status": cold.get("status", cold.get("error")),
                         "replica_start_phases_s": models.get("cold_start_s"), "load_s": round(t3 - t2, 2)}
    out.update({
        "requests_sent": len(results),
        "requests_200": sum(1 for r in results if r.get("status") == 200),
        "failures": [{k: v for k, v in r.items() if k in ("status", "body", "error")}
                     for r in results if r.get("status") != 200][:5],
    })
    latencies = sorted(r["done"] - r["sent"] for r in load if r.get("status") == 200)
    if latencies:
        out["load_latency_s"] = {"min": round(latencies[0], 2), "max": round(latencies[-1], 2)}

    # d. idle again: the replica goes, then the node
    gone = sampler.wait(t3, no_replica, bound_s)
    removed = sampler.wait(t3, head_only, bound_s)
    phases["idle_again"] = {"replica_gone_s": r2(gone, t3), "node_removed_s": r2(removed, t3),
                            "node_removed_after_replica_gone_s": r2(removed, gone) if gone and removed else None}
    out["readyz_at_end"] = readyz(url)
    sampler.stop.set()
    sampler.join(timeout=30)

    samples = sampler.samples
    # the worker nodes in the order they appeared, and on which node each RUNNING replica was seen
    seen: list[str] = []
    for _, nodes, _, _ in samples:
        seen += [n for n in nodes if n != head and n not in seen]
    out.update({
        "worker_nodes_seen": seen,
        "max_worker_nodes_alive": max((sum(1 for n in nodes if n != head) for _, nodes, _, _ in samples), default=0),
        "max_replicas": max((len(reps) for _, _, reps, _ in samples), default=0),
        "replica_nodes": sorted({n for _, _, reps, _ in samples for n in running(reps) if n is not None}),
        "replica_nodes_by_phase": [phases["deploy"]["replica_nodes"],
                                   sorted({n for t, _, reps, _ in samples if t >= t2 for n in running(reps)
                                           if n is not None})],
        "ingress_nodes": sorted({n for *_, ing in samples for n in ing if n is not None}),
        "nodes_at_end": alive_nodes(),
        "proxy_nodes": sorted((client.get_serve_details() or {}).get("proxies") or {}),
        "samples": len(samples),
        "sampler_errors": sampler.errors[:5],
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--policy", choices=("work", "requests"), default="work")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--load-s", type=float, default=3.0)
    ap.add_argument("--bound-s", type=float, default=120.0, help="the most any one wait may take")
    args = ap.parse_args()
    t = time.monotonic()
    out: dict[str, Any] = {}
    try:
        run(args.address, args.http_port, out, args.policy, args.clients, args.load_s, args.bound_s)
    except Exception:  # noqa: BLE001 -- the test reads the failure from the JSON, with what was seen so far
        out["error"] = traceback.format_exc()
    out["driver_s"] = round(time.monotonic() - t, 2)
    print(json.dumps(out, default=str), flush=True)
    os._exit(0)  # no ray.shutdown() wait: the cluster's owner tears it down


if __name__ == "__main__":
    main()
