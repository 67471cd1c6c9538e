"""Autoscaling under load (issue 18): a ramp on the work-aware policy, and the same mixed workload under the request
policy and the work policy side by side, on one local Ray instance started by this script (2 CPUs, loopback).

    python benchmarks/autoscaling.py --out benchmarks/autoscaling.md --png benchmarks/autoscaling_ramp.png
    python benchmarks/autoscaling.py --only ramp --model flux        # the ramp on the tiny FLUX pipeline
    python benchmarks/autoscaling.py --only zero                     # a request to a variant at zero replicas

Ramp: one variant (policy work, min 1, max --ramp-max-replicas, default 3) under clients `--schedule` (default 0:1,15:4,55:1 for 80 s); each
request is --ramp-job. Reported: the time from the load step to Serve deciding on a second replica and to that replica
serving, p95 latency and queue wait during the scale-up, requests sent and answered, the replicas over time.

Side by side: one application per policy (requests: --target-ongoing; work: --target-wait), one after the other so
that each has the machine to itself, each with variants 'big' and 'small' of the same model; --big-clients send big
jobs (n=4, 60 steps) and --small-clients tiny ones for --seconds. Reported per policy and variant: p95 queue wait (the
replica's own wait, from Server-Timing), replica-seconds (replicas Serve started or ran, integrated over time), peak
replicas, requests answered. The p95 wait is everything before a request's generation starts: at Serve's handle
for a replica with room (--big-max-ongoing 1 moves big's queue there) and in the replica's queue for a batch.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BIG = {"prompt": "8", "size": "64x64", "steps": 60, "n": 2}
SMALL = {"prompt": "1", "size": "16x16", "steps": 2, "n": 1}
SBS_BIG = {"prompt": "8", "size": "64x64", "steps": 60, "n": 4}  # a batch of its own (max_batch_images 4)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def p95(values: list[float]) -> float | None:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 2 else (values[0] if values else None)


def variant(name: str, model: dict[str, Any], policy: str, target_wait_s: float, max_replicas: int,
            target_ongoing: float = 1, max_ongoing: int = 4) -> dict[str, Any]:
    return {"name": name, **model, "gemm_sample_every": 0, "max_ongoing_requests": max_ongoing,
            "resources": {"num_cpus": 0, "torch_threads": 1}, "batching": {"max_batch_images": 4},
            "autoscaling": {"policy": policy, "min_replicas": 1, "max_replicas": max_replicas, "upscale_delay_s": 0,
                            "downscale_delay_s": 10, "look_back_period_s": 3, "target_ongoing_requests": target_ongoing,
                            "target_wait_s": target_wait_s}}


def model_fields(model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(variant fields, the ramp's job) for the digits model or a tiny FLUX pipeline (built here, offline)."""
    if model == "digits":
        return {"quantization": "nf4"}, BIG
    from quantserve.testing.pipelines import build_pipeline

    path = build_pipeline("flux", Path(tempfile.mkdtemp(prefix="quantserve-flux-")) / "flux", seed=0)
    return ({"model": str(path), "dtype": "float32", "quantization": {"transformer": "nf4", "text_encoder_2": "int8wo"}},
            {"prompt": "a lighthouse at dusk", "size": "128x128", "steps": 20, "n": 1})


class Watcher:
    """Every half second: replicas per variant that Serve starts or runs (its decision) and that run."""

    def __init__(self, app_name: str):
        self.app_name, self.samples, self.stop = app_name, [], threading.Event()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from quantserve.serve.deploy import replica_counts

        while not self.stop.is_set():
            try:
                counts = replica_counts(self.app_name)
                self.samples.append((time.monotonic() - self.t0, {v: c["wanted"] for v, c in counts.items()},
                                     {v: c["running"] for v, c in counts.items()}))
            except Exception:  # noqa: BLE001 - the app may be starting or going
                pass
            self.stop.wait(0.5)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def drive(url: str, plan: list[tuple[float, float, dict[str, Any]]], t0: float) -> list[dict[str, Any]]:
    """One thread per (start_s, end_s, body): sends back to back between its start and end (seconds after t0).
    Every request: sent, answered, status, latency, queue wait (Server-Timing), variant."""
    import requests

    from quantserve.serve.ramp import parse_server_timing

    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(start_s: float, end_s: float, body: dict[str, Any]) -> None:
        time.sleep(max(0.0, start_s - (time.monotonic() - t0)))
        with requests.Session() as session:
            while time.monotonic() - t0 < end_s:
                sent = time.monotonic() - t0
                try:
                    r = session.post(f"{url}/v1/images/generations", json=body, timeout=180)
                    timing = parse_server_timing(r.headers.get("Server-Timing"))
                    # the wait before its generation starts, wherever it waited: at Serve's handle for a replica
                    # that admits it (part of hop-replica) and in the replica's queue for a batch
                    row = {"status": r.status_code, "variant": r.headers.get("X-Quantserve-Variant"),
                           "queue_ms": timing.get("queue"),
                           "wait_ms": (timing["queue"] + timing.get("hop-replica", 0.0)) if "queue" in timing else None}
                except Exception as exc:  # noqa: BLE001 - counted as lost
                    row = {"status": f"error:{type(exc).__name__}", "variant": None, "queue_ms": None, "wait_ms": None}
                done = time.monotonic() - t0
                with lock:
                    results.append({**row, "sent_s": sent, "done_s": done, "latency_s": done - sent,
                                    "label": body.get("model", "")})
    threads = [threading.Thread(target=client, args=p, daemon=True) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def ramp(port: int, base: str, args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from quantserve.serve.config import parse_config
    from quantserve.serve.deploy import deploy
    from quantserve.serve.ramp import Outcome, build_timeline, parse_schedule, render_png, rows_to_csv
    from ray import serve

    fields, job = model_fields(args.model)
    app = "bench-ramp"
    deploy(parse_config({"app_name": app, "variants": [variant("v", fields, "work", args.target_wait, args.ramp_max_replicas)],
                         "http": {"host": "127.0.0.1", "port": port}, "request_timeout_s": 180,
                         "limits": {"max_steps": 200, "max_n": 4, "max_size": 128}}),
           timeout_s=600, route_prefix="/ramp")
    schedule = parse_schedule(args.schedule)
    end = args.duration
    # client i sends while the schedule holds more than i clients: its spans of (start, end)
    edges = [p.at_s for p in schedule] + [end]
    plan = [(a, b, job) for i in range(max(p.clients for p in schedule))
            for p, a, b in zip(schedule, edges, edges[1:]) if p.clients > i]
    watcher = Watcher(app)
    t0 = watcher.t0
    with tqdm(total=int(end), desc=f"ramp ({args.model})", unit="s") as bar:
        runner = threading.Thread(target=lambda: results.extend(drive(f"{base}/ramp", plan, t0)), daemon=True)
        results: list[dict[str, Any]] = []
        runner.start()
        while runner.is_alive():
            time.sleep(1)
            bar.n = min(int(time.monotonic() - t0), int(end))
            bar.refresh()
    watcher.close()
    serve.delete(app)
    step = next((p.at_s for p in schedule if p.clients > schedule[0].clients), 0.0)
    # the first second replica Serve decides on and the first that serves, wherever they fall: one that came
    # before the load step would be a false start (and would flatter the figures after it), so it is reported
    decided = next((t for t, wanted, _ in watcher.samples if wanted.get("v", 0) >= 2), None)
    serving = next((t for t, _, running in watcher.samples if running.get("v", 0) >= 2), None)
    during = [r for r in results if step <= r["sent_s"] <= (serving or end) and r["status"] == 200]
    outcomes = [Outcome(start_s=r["sent_s"], end_s=r["done_s"], status=r["status"], queue_ms=r["queue_ms"],
                        variant=r["variant"]) for r in results]
    replicas_by_row = []
    for k in range(int(end // args.interval) + 1):
        t = (k + 1) * args.interval
        seen = [running for s, _, running in watcher.samples if s <= t]
        replicas_by_row.append(seen[-1] if seen else None)
    rows = build_timeline(outcomes, schedule, args.interval, max(r["done_s"] for r in results), replicas_by_row, end)
    return {"model": args.model, "max_replicas": args.ramp_max_replicas, "schedule": args.schedule, "job": job, "sent": len(results),
            "answered_200": sum(r["status"] == 200 for r in results),
            "lost": [r["status"] for r in results if r["status"] != 200],
            "step_s": step, "second_replica_decided_s": None if decided is None else round(decided - step, 1),
            "second_replica_serving_s": None if serving is None else round(serving - step, 1),
            "p95_latency_during_scale_up_s": p95([r["latency_s"] for r in during]),
            "p95_queue_during_scale_up_ms": p95([r["queue_ms"] for r in during if r["queue_ms"] is not None]),
            "peak_replicas": max((w.get("v", 0) for _, w, _ in watcher.samples), default=0),
            "samples": [(round(t, 2), wanted.get("v", 0), running.get("v", 0)) for t, wanted, running in watcher.samples],
            "rows": rows, "csv": rows_to_csv(rows),
            "png": render_png(rows, title=f"ramp {args.schedule}, {args.model}, work policy")}


def replica_seconds(samples: list[tuple[float, dict[str, int], dict[str, int]]], name: str) -> float:
    """Replicas Serve started or ran, integrated over the samples' times."""
    return sum(w.get(name, 0) * (t1 - t0) for (t0, w, _), (t1, _, _) in zip(samples, samples[1:]))


def side_by_side(port: int, base: str, args: argparse.Namespace) -> dict[str, Any]:
    """The same workload on one app per policy, one after the other: each has the machine to itself (run at once,
    the two apps' replicas would share two cores and the comparison would measure that)."""
    from tqdm import tqdm

    from quantserve.serve.config import parse_config
    from quantserve.serve.deploy import deploy
    from ray import serve

    fields, _ = model_fields("digits")
    out: dict[str, Any] = {}
    for policy in ("requests", "work"):
        app = f"bench-{policy}"
        deploy(parse_config({"app_name": app,
                             "variants": [variant(v, fields, policy, args.target_wait, args.max_replicas,
                                                  target_ongoing=args.target_ongoing,
                                                  max_ongoing=args.big_max_ongoing if v == "big" else 4)
                                          for v in ("big", "small")],
                             "experiment": {"weights": {"big": 1, "small": 1}}, "request_timeout_s": 180,
                             "http": {"host": "127.0.0.1", "port": port},
                             "limits": {"max_steps": 200, "max_n": 4, "max_size": 128}}),
               timeout_s=600, route_prefix=f"/{policy}")
        drive(f"{base}/{policy}", [(0.0, 0.1, {**SBS_BIG, "model": "big"}), (0.0, 0.1, {**SMALL, "model": "small"})],
              time.monotonic())  # one of each first: every replica has measured its rate before the clock starts
        watcher = Watcher(app)
        t0 = watcher.t0
        plan = [(0.0, args.seconds, {**SBS_BIG, "model": "big"})] * args.big_clients + \
               [(0.0, args.seconds, {**SMALL, "model": "small"})] * args.small_clients
        results: list[dict[str, Any]] = []
        runner = threading.Thread(target=lambda: results.extend(drive(f"{base}/{policy}", plan, t0)), daemon=True)
        runner.start()
        with tqdm(total=int(args.seconds), desc=f"{policy} policy", unit="s") as bar:
            while runner.is_alive():
                time.sleep(1)
                bar.n = min(int(time.monotonic() - t0), int(args.seconds))
                bar.refresh()
        watcher.close()
        serve.delete(app)
        per: dict[str, Any] = {}
        for v in ("big", "small"):
            mine = [r for r in results if r["label"] == v]
            queues = [r["queue_ms"] / 1000 for r in mine if r["status"] == 200 and r["queue_ms"] is not None]
            waits = [r["wait_ms"] / 1000 for r in mine if r["status"] == 200 and r["wait_ms"] is not None]
            settled = [r["wait_ms"] / 1000 for r in mine if r["status"] == 200 and r["wait_ms"] is not None
                       and r["sent_s"] >= args.settle_s]
            per[v] = {"answered_200": sum(r["status"] == 200 for r in mine), "sent": len(mine),
                      "p95_queue_wait_s": p95(queues), "p95_wait_s": p95(waits), "p95_wait_settled_s": p95(settled),
                      "p95_latency_s": p95([r["latency_s"] for r in mine if r["status"] == 200]),
                      "replica_seconds": round(replica_seconds(watcher.samples, v)),
                      "peak_replicas": max((w.get(v, 0) for _, w, _ in watcher.samples), default=0)}
        out[policy] = per
    return out


def from_zero(port: int, base: str, args: argparse.Namespace) -> dict[str, Any]:
    """A variant at zero replicas (min 0), one request, --zero-runs times: when Serve decides on a replica, when its
    process starts, when its constructor ends (with the replica's own cold-start phases), when Serve marks it
    RUNNING and when the request is answered, each in seconds after the request was sent."""
    import psutil
    import requests

    from quantserve.serve.config import parse_config
    from quantserve.serve.deploy import deploy, replica_counts
    from ray import serve

    fields, _ = model_fields("digits")
    app = "bench-zero"
    zero = variant("v", fields, "work", args.target_wait, 1)
    zero["autoscaling"].update(min_replicas=0, downscale_delay_s=1, downscale_to_zero_delay_s=1, look_back_period_s=2)
    deploy(parse_config({"app_name": app, "variants": [zero], "http": {"host": "127.0.0.1", "port": port},
                         "request_timeout_s": 180}), timeout_s=600, route_prefix="/zero")
    runs = []
    for _ in range(args.zero_runs):
        deadline = time.monotonic() + 120
        while replica_counts(app)["v"]["wanted"] > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        marks: dict[str, float] = {}
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                counts, now = replica_counts(app)["v"], time.time()
                if counts["wanted"]:
                    marks.setdefault("decided", now)
                if counts["running"]:
                    marks.setdefault("running", now)
                time.sleep(0.05)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        sent = time.time()
        r = requests.post(f"{base}/zero/v1/images/generations", json={"prompt": "2", "size": "16x16", "steps": 2},
                          timeout=150)
        answered = time.time()
        stop.set()
        watcher.join()
        [model] = requests.get(f"{base}/zero/v1/models", timeout=30).json()["data"]
        runs.append({"status": r.status_code, "answered_s": round(answered - sent, 2),
                     "decided_s": round(marks.get("decided", answered) - sent, 2),
                     "process_started_s": round(psutil.Process(model["pid"]).create_time() - sent, 2),
                     "constructor_done_s": round(model["started"] - sent, 2),
                     "running_s": round(marks.get("running", answered) - sent, 2),
                     "replica_start_phases_s": model["cold_start_s"]})
    serve.delete(app)
    return {"runs": runs}


def markdown(res: dict[str, Any], command: str, machine: str, png_name: str | None) -> str:
    lines = [f"Machine: {machine}, no GPU; one local Ray instance, replicas with one torch thread and no CPU "
             "reservation, autoscaling metrics pushed every second, look_back_period_s 3.", f"Command: `{command}`", ""]
    if "ramp" in res:
        r = res["ramp"]
        lines += [f"### Ramp ({r['model']}, work policy, target_wait_s {res['target_wait_s']}, min 1, max {r['max_replicas']})", "",
                  f"Schedule {r['schedule']} (clients), each sending {r['job']} back to back.", "",
                  "| figure | value |", "| --- | ---: |",
                  f"| requests sent / answered 200 | {r['sent']} / {r['answered_200']} |",
                  f"| lost (not 200) | {len(r['lost'])} {r['lost'][:5] if r['lost'] else ''} |",
                  f"| load step at | {r['step_s']:g} s |",
                  f"| Serve decides a second replica, after the step | {r['second_replica_decided_s']} s |",
                  f"| second replica serving, after the step | {r['second_replica_serving_s']} s |",
                  f"| p95 latency during the scale-up | {fmt(r['p95_latency_during_scale_up_s'], 's')} |",
                  f"| p95 queue wait during the scale-up | {fmt(r['p95_queue_during_scale_up_ms'], 'ms')} |",
                  f"| peak replicas | {r['peak_replicas']} |", ""]
        if png_name:
            lines += [f"![ramp timeline]({png_name})", ""]
        lines += ["Timeline (every interval):", "", "```", r["csv"].strip(), "```", ""]
    if "side_by_side" in res:
        s = res["side_by_side"]
        lines += [f"### The same mixed workload, request policy vs work policy, one after the other "
                  f"(target_ongoing_requests {res['target_ongoing']}, target_wait_s {res['target_wait_s']}, "
                  f"max {res['max_replicas']} replicas)", "",
                  f"Each policy's app has the machine to itself for {res['seconds']:g} s: {res['big_clients']} clients "
                  f"send big = {SBS_BIG} and {res['small_clients']} send small = {SMALL}, back to back; big's "
                  f"max_ongoing_requests {res['big_max_ongoing']}.", "",
                  "p95 wait: before its generation started, at Serve's handle and in the replica's queue "
                  "(Server-Timing hop-replica + queue); then the same for the requests sent after the first "
                  f"{res['settle_s']:g} s (both apps start at one replica per variant: the scale-up is in the first), "
                  "and the replica's queue alone.", "",
                  "| policy | variant | answered / sent | p95 wait s | after the first "
                  f"{res['settle_s']:g} s | in the replica's queue s | p95 latency s | replica-seconds | peak replicas |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for policy, per in s.items():
            for v, f in per.items():
                lines.append(f"| {policy} | {v} | {f['answered_200']} / {f['sent']} | {fmt(f['p95_wait_s'])} | "
                             f"{fmt(f['p95_wait_settled_s'])} | {fmt(f['p95_queue_wait_s'])} | "
                             f"{fmt(f['p95_latency_s'])} | {f['replica_seconds']} | {f['peak_replicas']} |")
        lines.append("")
    if "zero" in res:
        lines += ["### A request to a variant at zero replicas (digits, nf4, min 0)", "",
                  "Seconds after the request was sent; the replica's own phases from /v1/models (cold_start_s).", "",
                  "| run | status | Serve decides | process starts | constructor done | RUNNING | answered | "
                  "replica: process / imports / load / total |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for i, z in enumerate(res["zero"]["runs"]):
            ph = z["replica_start_phases_s"]
            lines.append(f"| {i} | {z['status']} | {z['decided_s']} | {z['process_started_s']} | "
                         f"{z['constructor_done_s']} | {z['running_s']} | {z['answered_s']} | {ph.get('process')} / "
                         f"{ph.get('imports')} / {ph.get('load')} / {ph.get('total')} |")
        lines.append("")
    return "\n".join(lines)


def fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.2f}{(' ' + unit) if unit else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("ramp", "side-by-side", "zero"), help="run one part (default: all)")
    parser.add_argument("--zero-runs", type=int, default=3, help="zero: requests to a variant at zero (default 3)")
    parser.add_argument("--model", choices=("digits", "flux"), default="digits", help="the ramp's model")
    parser.add_argument("--schedule", default="0:1,15:4,55:1", help="the ramp's clients over time (T:CLIENTS,...)")
    parser.add_argument("--duration", type=float, default=80.0, help="the ramp's length in seconds (default 80)")
    parser.add_argument("--interval", type=float, default=5.0, help="timeline rows every this many seconds")
    parser.add_argument("--target-wait", type=float, default=3.0, help="the work policy's target_wait_s (default 3)")
    parser.add_argument("--big-clients", type=int, default=2, help="side by side: clients sending big jobs (default 2)")
    parser.add_argument("--small-clients", type=int, default=4, help="side by side: clients sending small jobs (default 4)")
    parser.add_argument("--big-max-ongoing", type=int, default=4,
                        help="side by side: the big variant's max_ongoing_requests (default 4; 1 keeps Serve's router "
                             "from stacking big jobs on one replica)")
    parser.add_argument("--settle-s", type=float, default=15.0,
                        help="side by side: a second p95 wait over the requests sent after this many seconds")
    parser.add_argument("--target-ongoing", type=float, default=2.0,
                        help="side by side: the request policy's target_ongoing_requests (default 2)")
    parser.add_argument("--seconds", type=float, default=60.0, help="side by side: load seconds (default 60)")
    parser.add_argument("--max-replicas", type=int, default=2, help="side by side: max replicas per variant")
    parser.add_argument("--ramp-max-replicas", type=int, default=3, help="ramp: the variant's max replicas (default 3)")
    parser.add_argument("--out", type=Path, help="write the markdown here")
    parser.add_argument("--png", type=Path, help="write the ramp's timeline PNG here")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from quantserve.serve.config import LimitsConfig
    from quantserve.serve.proxy_guard import guarded_proxy

    port = free_port()
    with guarded_proxy(LimitsConfig()):  # also sets the 1 s autoscaling-metric push intervals, as `quantserve serve`
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="serve")
    res: dict[str, Any] = {"target_wait_s": args.target_wait, "max_replicas": args.max_replicas,
                           "big_clients": args.big_clients, "small_clients": args.small_clients,
                           "target_ongoing": args.target_ongoing, "big_max_ongoing": args.big_max_ongoing,
                           "settle_s": args.settle_s,
                           "seconds": args.seconds}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        if args.only in (None, "ramp"):
            res["ramp"] = ramp(port, base, args)
        if args.only in (None, "zero"):
            res["zero"] = from_zero(port, base, args)
        if args.only in (None, "side-by-side"):
            res["side_by_side"] = side_by_side(port, base, args)
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.png and "ramp" in res:
        args.png.write_bytes(res["ramp"]["png"])
    text = markdown(res, "python benchmarks/autoscaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    f"{platform.machine()}, {os.cpu_count()} cores", args.png.name if args.png else None)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        raw = {k: v for k, v in res.items()}
        if "ramp" in raw:
            raw["ramp"] = {k: v for k, v in raw["ramp"].items() if k != "png"}
        args.json.write_text(json.dumps(raw, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
