"""A/B report and progressive rollout on real runs (issue 15): the embedded digits model and a tiny random-weight
FLUX pipeline, each served as a baseline and a quantized candidate with a rollout and real guards, under steady
load, until the rollout completes or rolls back. Prints (and with --out writes) for each: the rollout's decisions,
`quantserve ab report` over the run, and the fidelity computation's cost per shadowed request.

    python benchmarks/rollout.py --out benchmarks/rollout.md
    python benchmarks/rollout.py --only digits --step-interval 10        # shorter

One local Ray instance (2 CPUs), Serve on a free loopback port, replicas with one torch thread each; the load is
`--concurrency` clients sending back to back, users cycling through 50 ids (sticky assignment).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GUARDS = {"max_error_rate": 0.01, "max_p95_latency_ratio": 1.5, "min_ssim": 0.9, "max_pixel_mae": 0.05}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digits_config(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    common = {"resources": {"num_cpus": 0, "torch_threads": 1}}
    config = {
        "app_name": "rollout-digits",
        "variants": [{"name": "bf16", "quantization": "bf16", **common}, {"name": "nf4", "quantization": "nf4", **common}],
        "experiment": {"weights": {"bf16": 1, "nf4": 1}, "shadow": {"variant": "bf16", "sample_rate": 0.5},
                       "rollout": rollout_block("nf4", "bf16", args)},
    }
    return config, {"prompt": "7", "size": "16x16", "steps": 10}


def flux_config(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    from quantserve.testing.pipelines import build_pipeline

    model = build_pipeline("flux", Path(tempfile.mkdtemp(prefix="quantserve-flux-")) / "flux", seed=0)
    common = {"model": str(model), "dtype": "float32", "resources": {"num_cpus": 0, "torch_threads": 1}}
    config = {
        "app_name": "rollout-flux",
        "variants": [{"name": "flux", "quantization": "bf16", **common},
                     {"name": "flux-nf4", "quantization": {"transformer": "nf4", "text_encoder_2": "int8wo"}, **common}],
        "experiment": {"weights": {"flux": 1, "flux-nf4": 1}, "shadow": {"variant": "flux", "sample_rate": 0.5},
                       "rollout": rollout_block("flux-nf4", "flux", args)},
        "limits": {"max_size": 128, "min_size": 16, "default_size": 32, "max_n": 2},
    }
    return config, {"prompt": "a red fox in the snow", "size": "32x32", "steps": 4}


def rollout_block(candidate: str, baseline: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"candidate": candidate, "baseline": baseline, "steps": [0.1, 0.5, 1.0],
            "step_interval_s": args.step_interval, "min_requests": args.min_requests, "min_comparisons": 10,
            "guards": GUARDS}


def drive(url: str, body: dict[str, Any], stop: threading.Event, concurrency: int) -> dict[str, int]:
    import requests

    counts: dict[str, int] = {}
    lock = threading.Lock()

    def client(k: int) -> None:
        i = 0
        with requests.Session() as session:
            while not stop.is_set():
                r = session.post(f"{url}/v1/images/generations",
                                 json={**body, "seed": 1000 * k + i, "user": f"user-{(k * 7919 + i) % 50}"}, timeout=120)
                with lock:
                    counts[str(r.status_code)] = counts.get(str(r.status_code), 0) + 1
                i += 1
    with ThreadPoolExecutor(concurrency) as pool:
        for k in range(concurrency):
            pool.submit(client, k)
    return counts


def run_one(name: str, config: dict[str, Any], body: dict[str, Any], port: int, args: argparse.Namespace
            ) -> dict[str, Any]:
    import requests
    from tqdm import tqdm

    from quantserve.serve.config import parse_config
    from quantserve.serve.deploy import deploy
    from quantserve.serve_cli import format_report, format_rollout

    cfg = parse_config({**config, "http": {"host": "127.0.0.1", "port": port}})
    prefix = f"/{name}"
    deploy(cfg, timeout_s=900, route_prefix=prefix)
    url = f"http://127.0.0.1:{port}{prefix}"
    stop = threading.Event()
    counts: dict[str, int] = {}
    loader = threading.Thread(target=lambda: counts.update(drive(url, body, stop, args.concurrency)), daemon=True)
    started = time.monotonic()
    loader.start()
    rollout: dict[str, Any] = {}
    with tqdm(total=len(config["experiment"]["rollout"]["steps"]) - 1, desc=f"{name} rollout", unit="step") as bar:
        while time.monotonic() - started < args.max_seconds:
            time.sleep(2)
            rollout = requests.get(f"{url}/v1/ab", timeout=60).json()["rollout"]
            bar.n = rollout["step"]
            bar.set_postfix(status=rollout["status"], weight=rollout["weight"])
            bar.refresh()
            if rollout["status"] != "running":
                bar.close()
                break
    time.sleep(args.after_s)  # some traffic at the final weight
    stop.set()
    loader.join()
    alone_ms = compare_alone(url, body, rollout["candidate"], rollout["baseline"])
    ab = requests.get(f"{url}/v1/ab", timeout=60).json()
    report = requests.get(f"{url}/v1/ab/report", params={"baseline": rollout["baseline"]}, timeout=120).json()
    return {"name": name, "seconds": round(time.monotonic() - started, 1), "status_counts": counts,
            "rollout": ab["rollout"], "fidelity": ab["shadow"]["fidelity"], "shadow_runs": ab["shadow"]["runs"],
            "report_text": format_report(report), "rollout_text": format_rollout(ab["rollout"]), "body": body,
            "compare_alone_ms": alone_ms}


def compare_alone(url: str, body: dict[str, Any], candidate: str, baseline: str, repeats: int = 50) -> float:
    """The fidelity computation alone, in this process with one torch thread, on a real pair of responses (same
    seed and prompt, one forced to each variant): median ms of `repeats` calls."""
    import base64
    import statistics

    import requests
    import torch

    from quantserve.serve.fidelity import compare

    pair = []
    for variant in (candidate, baseline):
        r = requests.post(f"{url}/v1/images/generations", json={**body, "seed": 4242},
                          headers={"X-Quantserve-Force-Variant": variant}, timeout=120)
        r.raise_for_status()
        pair.append([base64.b64decode(d["b64_json"]) for d in r.json()["data"]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compare(*pair)  # warm
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            compare(*pair)
            times.append((time.perf_counter() - t) * 1000)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def markdown(results: list[dict[str, Any]], command: str, machine: str) -> str:
    lines = [f"Machine: {machine}, no GPU; replicas with one torch thread, on one local Ray instance.",
             f"Command: `{command}`", ""]
    for r in results:
        lines += [f"### {r['name']}: {r['rollout']['candidate']} against {r['rollout']['baseline']}", "",
                  f"Load: {r['body']} with seeds and 50 users, {r['seconds']} s; answers by status "
                  f"{r['status_counts']}; shadow runs {r['shadow_runs']}.", "", "```", *r["report_text"], "```", ""]
        lines += ["Decisions, with each guard's figure over the step's window:", ""]
        for e in r["rollout"]["events"]:
            lines.append(f"- {e['decision']} -> step {e['step']}, weight {e['weight']:g}: {e.get('reason', '')}")
            lines += [f"  - {g['text']}" for g in e.get("results", [])]
        lines.append("")
        for f in r["fidelity"]:
            lines.append(f"Fidelity computation ({f['variant']} against {f['reference']}, {f['runs']} shadowed "
                         f"requests): {f['mean_compare_ms']:.1f} ms mean per shadowed request in the Ingress under "
                         f"the load (a thread beside the serving), {r['compare_alone_ms']:.1f} ms alone (median of "
                         f"50, one torch thread); it runs after the response, so the served request waits for none "
                         f"of it. Mean SSIM {f['mean_ssim']:.4f}, PSNR {f['mean_psnr']:.1f} dB, MAE "
                         f"{f['mean_mae']:.4f}.")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("digits", "flux"), help="run one model only (default: both)")
    parser.add_argument("--step-interval", type=float, default=20.0, help="the rollout's step_interval_s (default 20)")
    parser.add_argument("--min-requests", type=int, default=30, help="the rollout's min_requests (default 30)")
    parser.add_argument("--concurrency", type=int, default=2, help="clients sending back to back (default 2)")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="give up on a rollout after this long")
    parser.add_argument("--after-s", type=float, default=10.0, help="traffic after the rollout ends (default 10 s)")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from quantserve.serve.config import parse_config
    from quantserve.serve.proxy_guard import guarded_proxy

    port = free_port()
    runs = [(n, f) for n, f in (("digits", digits_config), ("flux", flux_config)) if args.only in (None, n)]
    with guarded_proxy(parse_config(digits_config(args)[0]).limits):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="serve")
    results = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, make in runs:
            config, body = make(args)
            results.append(run_one(name, config, body, port, args))
            serve.delete(config["app_name"])
    finally:
        serve.shutdown()
        ray.shutdown()
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    text = markdown(results, "python benchmarks/rollout.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    machine)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
