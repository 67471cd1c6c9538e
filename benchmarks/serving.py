"""Serving overhead and load (issue 13): quantserve's HTTP path against the same call in process, and against a bare
Ray Serve app of the same shape (proxy -> FastAPI ingress -> router -> model, the model a no-op), all started by
this script on one local Ray instance, measured in one run.

    python benchmarks/serving.py --out benchmarks/serving.md            # the tables, also printed
    python benchmarks/serving.py --quick                                # fewer requests (a smoke run)

Overhead: sequential 1-step requests for the embedded digits model over one keep-alive HTTP connection, p50 over
`--requests`; in process: the same job through BatchGenerator.run (decode, denoise, PNG encode) with the replicas'
torch threads. Serving overhead = HTTP p50 - in-process p50. The server's own Server-Timing header breaks each
request down (ingress, router, queue, generate, encode); "proxy + client" is what remains of the client's time.

Load: `--load-requests` requests at each concurrency of `--concurrency` for each variant (forced by header).
"""


import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("bf16", "nf4")
FORCE = "X-Quantserve-Force-Variant"
JOB = {"prompt": "7", "n": 1, "size": "16x16", "steps": 1, "seed": 1, "guidance": 1.0}


def p50(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_timing(header: str | None) -> dict[str, float]:
    """`Server-Timing: ingress;dur=1.2, router;dur=0.8` -> {"ingress": 1.2, "router": 0.8} (ms)."""
    out: dict[str, float] = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:])
    return out


def bare_app() -> Any:
    """proxy -> FastAPI ingress -> router -> no-op model: Ray Serve's own cost for quantserve's shape."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class BareModel:
        async def generate(self, job: dict[str, Any]) -> dict[str, Any]:
            return {"status": 200, "images": [b""], "seed": job.get("seed", 0)}

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class BareRouter:
        def __init__(self, model: Any):
            self.model = model

        async def generate(self, job: dict[str, Any]) -> dict[str, Any]:
            return await self.model.generate.remote(job)

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class BareIngress:
        def __init__(self, router: Any):
            self.router = router

        @api.post("/v1/images/generations")
        async def generations(self, request: Request) -> JSONResponse:
            job = await request.json()
            outcome = await self.router.generate.remote(job)
            return JSONResponse({"created": int(time.time()), "data": [{"b64_json": ""}], "seed": outcome["seed"]})

    return BareIngress.bind(BareRouter.bind(BareModel.bind()))


def quantserve_config(port: int, threads: int, autotune: bool) -> dict[str, Any]:
    common = {"model": None, "gemm_sample_every": 0, "resources": {"num_cpus": 0, "torch_threads": threads},
              "autotune": {"on_start": autotune, "budget_s": 300}}
    variants = [{"name": name, "quantization": name, **common} for name in VARIANTS]
    return {"app_name": "bench", "variants": variants, "experiment": {"weights": {"bf16": 1.0, "nf4": 0.0}},
            "http": {"host": "127.0.0.1", "port": port}, "limits": {"max_n": 4, "max_steps": 50},
            "request_timeout_s": 120}


def sequential(url: str, n: int, headers: dict[str, str] | None = None, body: dict[str, Any] | None = None
               ) -> tuple[list[float], list[dict[str, float]]]:
    import requests

    times, timings = [], []
    with requests.Session() as s:
        for _ in range(n):
            start = time.perf_counter()
            r = s.post(url, json=body or JOB, headers=headers, timeout=120)
            times.append((time.perf_counter() - start) * 1000)
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
            timings.append(server_timing(r.headers.get("server-timing")))
    return times, timings


def in_process(threads: int, n: int) -> dict[str, float]:
    import torch

    from quantserve.serve.config import VariantConfig
    from quantserve.serve.generation import BatchGenerator, load_variant

    torch.set_num_threads(threads)
    out = {}
    for name in VARIANTS:
        generator = BatchGenerator(load_variant(VariantConfig(name=name, quantization=name)))
        for _ in range(5):
            generator.run([dict(JOB)])
        times = []
        for _ in range(n):
            start = time.perf_counter()
            outcomes, _ = generator.run([dict(JOB)])
            times.append((time.perf_counter() - start) * 1000)
            assert outcomes[0]["status"] == 200
        out[name] = p50(times)
    return out


def load(url: str, variant: str, concurrency: int, requests_n: int, steps: int) -> dict[str, Any]:
    import requests

    body = {**JOB, "steps": steps, "size": "64x64"}
    sessions = [requests.Session() for _ in range(concurrency)]

    def one(i: int) -> float:
        start = time.perf_counter()
        r = sessions[i % concurrency].post(url, json={**body, "seed": i}, headers={FORCE: variant}, timeout=300)
        if r.status_code != 200:
            raise RuntimeError(f"{variant} c={concurrency}: {r.status_code} {r.text[:200]}")
        return (time.perf_counter() - start) * 1000

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(requests_n)))
    wall = time.perf_counter() - start
    for s in sessions:
        s.close()
    return {"variant": variant, "concurrency": concurrency, "requests": requests_n, "rps": requests_n / wall,
            "p50_ms": p50(latencies), "p95_ms": percentile(latencies, 95)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import requests
    from ray import serve
    from tqdm import tqdm

    from quantserve.serve.config import parse_config
    from quantserve.serve.deploy import deploy
    from quantserve.serve.proxy_guard import guarded_proxy

    port = free_port()
    cfg = parse_config(quantserve_config(port, args.threads, autotune=True))
    cache_dir = Path(tempfile.mkdtemp(prefix="quantserve-bench-cache-"))  # the replicas' autotune cache, fresh
    os.environ["QUANTSERVE_CACHE_DIR"] = str(cache_dir)
    with guarded_proxy(cfg.limits):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="serve")
    results: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "requests": args.requests,
                               "threads": args.threads, "load_steps": args.load_steps}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(bare_app(), name="bare", route_prefix="/bare")
        deploy(cfg, timeout_s=600)
        base = f"http://127.0.0.1:{port}"
        urls = {"bare": f"{base}/bare/v1/images/generations", "quantserve": f"{base}/v1/images/generations"}
        overhead: dict[str, Any] = {}
        steps = tqdm(total=3, desc="overhead", unit="path")
        for label, url, headers in (("bare", urls["bare"], None),
                                    ("bf16", urls["quantserve"], {FORCE: "bf16"}),
                                    ("nf4", urls["quantserve"], {FORCE: "nf4"})):
            sequential(url, args.warmup, headers)
            times, timings = sequential(url, args.requests, headers)
            stages: dict[str, list[float]] = defaultdict(list)
            for t, timing in zip(times, timings):
                for k, v in timing.items():
                    stages[k].append(v)
                if "total" in timing:
                    stages["proxy + client"].append(t - timing["total"])
            overhead[label] = {"p50_ms": p50(times), "stages_p50_ms": {k: p50(v) for k, v in stages.items()}}
            steps.update()
        steps.close()
        local = in_process(args.threads, args.requests)
        for name in VARIANTS:
            overhead[name]["in_process_p50_ms"] = local[name]
            overhead[name]["overhead_ms"] = overhead[name]["p50_ms"] - local[name]
        results["overhead"] = overhead
        rows = []
        results["autotune"] = {}
        if args.load_requests:
            for tuned in (False, True):  # the same app without, then with deploy-time autotune, from an empty cache
                (cache_dir / "autotune.json").unlink(missing_ok=True)
                deploy(parse_config(quantserve_config(port, args.threads, autotune=tuned)), timeout_s=900)
                models = requests.get(f"{base}/v1/models", timeout=60).json()["data"]
                results["autotune"][str(tuned)] = {m["id"]: {k: m["autotune"].get(k) for k in
                                                             ("problems", "tuned", "cached", "seconds")}
                                                   | {"routing": m["routing"]["kernels"]} for m in models}
                levels = [(v, c) for v in VARIANTS for c in args.concurrency]
                for variant, c in tqdm(levels, desc=f"load, autotune {'on' if tuned else 'off'}", unit="level"):
                    load(urls["quantserve"], variant, c, max(c, args.load_requests // 4), args.load_steps)  # warm
                    rows.append({**load(urls["quantserve"], variant, c, args.load_requests, args.load_steps),
                                 "autotune": tuned})
        results["load"] = rows
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def markdown(results: dict[str, Any], command: str) -> str:
    o = results["overhead"]
    lines = [f"Machine: {results['machine']}, replicas with {results['threads']} torch thread(s), no GPU.",
             f"Command: `{command}`", "",
             f"Sequential 1-step requests (digits model, 16x16, n 1) over one keep-alive connection, p50 of "
             f"{results['requests']}:", "",
             "| path | HTTP p50 ms | in-process p50 ms | serving overhead ms | overhead / bare |",
             "| --- | ---: | ---: | ---: | ---: |",
             f"| bare Ray Serve (proxy -> ingress -> router -> no-op model) | {o['bare']['p50_ms']:.1f} | - | "
             f"{o['bare']['p50_ms']:.1f} | 1.00x |"]
    for name in VARIANTS:
        r = o[name]
        lines.append(f"| quantserve {name} | {r['p50_ms']:.1f} | {r['in_process_p50_ms']:.1f} | {r['overhead_ms']:.1f} | "
                     f"{r['overhead_ms'] / o['bare']['p50_ms']:.2f}x |")
    stages = sorted({k for name in VARIANTS for k in o[name]["stages_p50_ms"]})
    if stages:
        lines += ["", "Where a quantserve request's time goes (p50 of each stage, ms; from the Server-Timing header):", "",
                  "| stage | " + " | ".join(VARIANTS) + " |", "| --- |" + " ---: |" * len(VARIANTS)]
        for stage in stages:
            lines.append(f"| {stage} | " + " | ".join(f"{o[n]['stages_p50_ms'].get(stage, float('nan')):.2f}"
                                                   for n in VARIANTS) + " |")
    if results.get("load"):
        lines += ["", f"Load (64x64, {results['load_steps']} steps, n 1, each request forced to its variant; the app "
                      "deployed without, then with deploy-time autotune, from an empty autotune cache):", "",
                  "| autotune | variant | concurrency | requests | req/s | p50 ms | p95 ms |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in results["load"]:
            lines.append(f"| {'on' if r['autotune'] else 'off'} | {r['variant']} | {r['concurrency']} | "
                         f"{r['requests']} | {r['rps']:.2f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} |")
        lines += ["", "What each deploy's replicas tuned at start, and the kernels their quantized layers then ran:", "",
                  "| autotune | variant | problems | tuned | from cache | seconds | layers per kernel |",
                  "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
        for tuned, per in results["autotune"].items():
            for name, a in per.items():
                def cell(value: Any) -> str:
                    return "-" if value is None else str(value)

                lines.append(f"| {'on' if tuned == 'True' else 'off'} | {name} | {cell(a['problems'])} | "
                             f"{cell(a['tuned'])} | {cell(a['cached'])} | {cell(a['seconds'])} | "
                             f"{', '.join(f'{k} {v}' for k, v in sorted(a['routing'].items())) or 'none'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="sequential requests per path for the overhead")
    parser.add_argument("--warmup", type=int, default=20, help="requests per path before timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the replicas and the in-process run")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16],
                        help="load levels (comma-separated)")
    parser.add_argument("--load-requests", type=int, default=48, help="requests per load level (0: skip the load)")
    parser.add_argument("--load-steps", type=int, default=10, help="denoising steps of a load request")
    parser.add_argument("--quick", action="store_true", help="40 requests, 8 per load level")
    parser.add_argument("--out", type=Path, help="write the markdown tables here")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.warmup, args.load_requests = 40, 5, 8
    results = run(args)
    text = markdown(results, "python benchmarks/serving.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
