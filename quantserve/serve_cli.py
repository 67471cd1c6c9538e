"""The serving subcommands of `quantserve`: serve, generate, loadtest.

`add_serve_commands(subparsers)` registers them on the main parser (quantserve/cli.py); this module also runs on its
own: `python -m quantserve.serve_cli serve ...`. Nothing here imports Ray until `serve` runs.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 256
SHUTDOWN_GRACE_S = 30.0


# --- shared HTTP helpers ----------------------------------------------------------------------------------------

def generations_url(url: str) -> str:
    """The generations endpoint under a base URL given as http://host:port, .../v1 or the endpoint itself."""
    url = url.rstrip("/")
    if url.endswith("/images/generations"):
        return url
    if not re.match(r"^https?://", url):
        raise ValueError(f"--url: expected http://HOST:PORT, got {url!r}")
    return url + ("/images/generations" if url.endswith("/v1") else "/v1/images/generations")


def post_json(url: str, body: dict[str, Any], timeout: float, headers: dict[str, str] | None = None
              ) -> tuple[int, dict[str, str], bytes]:
    """POST a JSON body; (status, headers, body) for any HTTP status, OSError for network failures."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:300].decode("utf-8", "replace")


def _positive(name: str, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer, got {text!r}") from None
        if not 1 <= value <= high:
            raise argparse.ArgumentTypeError(f"{name}: must be between 1 and {high}, got {value}")
        return value
    return parse


def _port(text: str) -> int:
    return _positive("port", 65535)(text)


# --- serve --------------------------------------------------------------------------------------------------------

class _Signals:
    """SIGINT/SIGTERM ask to stop, SIGHUP asks to reload the config; the main loop acts on them."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGTERM, self._on_stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: self.reload.set())

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stop.set()


def _load_serve_config(args: argparse.Namespace) -> Any:
    from quantserve.serve.config import ServeConfig, default_config, load_config

    cfg = load_config(args.config) if args.config else default_config()
    data = cfg.model_dump(mode="json")
    if args.host is not None:
        data["http"]["host"] = args.host
    if args.port is not None:
        data["http"]["port"] = args.port
    if args.metrics_port is not None:
        data["metrics"]["port"] = args.metrics_port
    return ServeConfig.model_validate(data)


def _check_models(cfg: Any) -> list[str]:
    from quantserve.serve.generation import model_dir_for

    problems = []
    for v in cfg.variants:
        folder = model_dir_for(v)
        if not (folder / "transformer").is_dir():
            problems.append(f"variants[{v.name}].model: {folder} has no transformer/ directory")
    return problems


def _describe(cfg: Any) -> str:
    weights = cfg.experiment.resolved_weights(cfg.variant_names)
    total = sum(weights.values())
    split = ", ".join(f"{name} {100 * w / total:.0f}%" for name, w in weights.items())
    variants = ", ".join(f"{v.name} ({v.scheme_label})" for v in cfg.variants)
    return f"variants {variants}; split {split}"


def _process_tree() -> list[Any]:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _reap(processes: list[Any], timeout_s: float) -> list[int]:
    """Wait for the processes this command started to exit; kill (by pid) any still there after the timeout."""
    import psutil

    def alive(p: Any) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in processes):
        time.sleep(0.2)
    killed = []
    for p in processes:
        if alive(p):
            try:
                p.kill()
                killed.append(p.pid)
            except psutil.Error:
                pass
    return killed


def _shutdown(started: list[Any]) -> None:
    import ray
    from ray import serve

    started = started + [p for p in _process_tree() if p.pid not in {q.pid for q in started}]
    done = threading.Event()

    def stop_serve() -> None:
        try:
            serve.shutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down regardless
            print(f"quantserve serve: serve.shutdown: {exc}", file=sys.stderr)
        done.set()

    threading.Thread(target=stop_serve, daemon=True).start()
    if not done.wait(SHUTDOWN_GRACE_S):
        print("quantserve serve: Serve did not shut down in time; stopping Ray", file=sys.stderr)
    ray.shutdown()
    killed = _reap(started, 20.0)
    if killed:
        print(f"quantserve serve: killed {len(killed)} leftover Ray process(es): {killed}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    from quantserve.serve.config import ConfigError

    try:
        cfg = _load_serve_config(args)
    except (ConfigError, ValueError) as exc:
        print(f"quantserve serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    problems = _check_models(cfg)
    if problems:
        print("quantserve serve: " + "\n  ".join(problems), file=sys.stderr)
        return EXIT_FAILED
    if args.print_ray_config:
        import yaml

        from quantserve.serve.app import ray_serve_config

        print(yaml.safe_dump(ray_serve_config(cfg), sort_keys=False), end="")
        return EXIT_OK

    signals = _Signals()
    signals.install()
    import ray

    from quantserve.serve.deploy import DeployError, deploy, submit

    print(f"quantserve serve: starting Ray and {_describe(cfg)}", flush=True)
    init_kwargs: dict[str, Any] = {"address": "local", "include_dashboard": False, "namespace": "serve",
                                   "_metrics_export_port": cfg.metrics.port}
    if args.num_cpus is not None:
        init_kwargs["num_cpus"] = args.num_cpus
    ray.init(**init_kwargs)
    signals.install()  # ray.init sets its own SIGTERM handler; ours stops cleanly instead
    started = _process_tree()
    code = EXIT_OK
    try:
        deploy(cfg, timeout_s=args.startup_timeout, stop=signals.stop.is_set)
        base = f"http://{cfg.http.host}:{cfg.http.port}"
        print(f"quantserve serve: ready\n"
              f"  API      {base}/v1/images/generations  (OpenAI base_url: {base}/v1)\n"
              f"  models   {base}/v1/models   experiment {base}/v1/ab   health {base}/healthz {base}/readyz\n"
              f"  metrics  http://127.0.0.1:{cfg.metrics.port}/metrics  (Prometheus)\n"
              f"  Ctrl-C stops" + ("; SIGHUP reloads the config file" if args.config else ""), flush=True)
        while not signals.stop.wait(0.5):
            if signals.reload.is_set():
                signals.reload.clear()
                try:
                    new = _load_serve_config(args)
                    submit(new)
                    print(f"quantserve serve: reloaded {args.config}: {_describe(new)}", flush=True)
                except (ConfigError, ValueError, DeployError) as exc:
                    print(f"quantserve serve: reload failed, still serving the previous config: {exc}", file=sys.stderr)
    except DeployError as exc:
        if not signals.stop.is_set():
            print(f"quantserve serve: {exc}", file=sys.stderr)
            code = EXIT_FAILED
    finally:
        print("quantserve serve: stopping", flush=True)
        _shutdown(started)
        print("quantserve serve: stopped", flush=True)
    return code


# --- generate -------------------------------------------------------------------------------------------------

def _request_body(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": args.prompt, "n": args.n, "response_format": "b64_json"}
    for name in ("size", "steps", "guidance", "seed", "model", "user"):
        value = getattr(args, name, None)
        if value is not None:
            body[name] = value
    body.update(extra)
    return body


def cmd_generate(args: argparse.Namespace) -> int:
    try:
        url = generations_url(args.url)
    except ValueError as exc:
        print(f"quantserve generate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    headers = {"X-Quantserve-Force-Variant": args.force_variant} if args.force_variant else None
    try:
        status, resp_headers, body = post_json(url, _request_body(args), args.timeout, headers)
    except OSError as exc:
        print(f"quantserve generate: {url}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if status != 200:
        print(f"quantserve generate: HTTP {status}: {error_message(body)}", file=sys.stderr)
        return EXIT_FAILED
    payload = json.loads(body)
    variant = resp_headers.get("x-quantserve-variant", "unknown")
    seed = payload.get("quantserve", {}).get("seed", resp_headers.get("x-quantserve-seed", "x"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", str(args.prompt))[:32] or "image"
    for i, item in enumerate(payload["data"]):
        path = out / f"{stem}-{variant}-seed{seed}-{i}.png"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(base64.b64decode(item["b64_json"]))
        os.replace(tmp, path)
        print(f"wrote {path}")
    print(f"variant {variant}, seed {seed}, {len(payload['data'])} image(s)")
    return EXIT_OK


# --- loadtest -------------------------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(results: list[dict[str, Any]], wall_s: float, images_per_request: int) -> dict[str, Any]:
    """Throughput, latency percentiles and the split per variant of a load test's results."""
    ok = [r for r in results if r["status"] == 200]
    latencies = [r["latency_s"] for r in ok]
    per_variant: dict[str, list[float]] = defaultdict(list)
    for r in ok:
        per_variant[r["variant"]].append(r["latency_s"])

    def stats(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
        return {f"p{q}_ms": round(percentile(values, q) * 1000, 1) for q in (50, 95, 99)}

    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "by_status": dict(sorted(Counter(str(r["status"]) for r in results).items())),
        "wall_s": round(wall_s, 3),
        "throughput_rps": round(len(ok) / wall_s, 3) if wall_s > 0 else 0.0,
        "images_per_s": round(len(ok) * images_per_request / wall_s, 3) if wall_s > 0 else 0.0,
        "latency": stats(latencies),
        "variants": {name: {"requests": len(v), "share": round(len(v) / len(ok), 4), **stats(v)}
                     for name, v in sorted(per_variant.items())},
    }


def _print_summary(s: dict[str, Any]) -> None:
    lat = s["latency"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} ms"

    print(f"requests   {s['requests']} ({s['ok']} ok, {s['errors']} failed; by status {s['by_status']})")
    print(f"wall       {s['wall_s']:.2f} s")
    print(f"throughput {s['throughput_rps']:.2f} req/s, {s['images_per_s']:.2f} images/s")
    print(f"latency    p50 {ms(lat['p50_ms'])}  p95 {ms(lat['p95_ms'])}  p99 {ms(lat['p99_ms'])}")
    print("variants")
    for name, v in s["variants"].items():
        print(f"  {name:<16} {v['requests']:>6} ({100 * v['share']:.1f}%)  p50 {ms(v['p50_ms'])}  "
              f"p95 {ms(v['p95_ms'])}  p99 {ms(v['p99_ms'])}")


def cmd_loadtest(args: argparse.Namespace) -> int:
    try:
        url = generations_url(args.url)
    except ValueError as exc:
        print(f"quantserve loadtest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    deadline = time.monotonic() + args.max_seconds

    def one(i: int) -> dict[str, Any]:
        if time.monotonic() > deadline:
            return {"status": "skipped", "latency_s": 0.0, "variant": None}
        user = f"loadtest-user-{i % args.users}" if args.users else None
        body = _request_body(args, **({"user": user} if user else {}))
        start = time.perf_counter()
        try:
            status, headers, _ = post_json(url, body, args.timeout)
        except OSError as exc:
            return {"status": f"error:{type(exc).__name__}", "latency_s": time.perf_counter() - start, "variant": None}
        return {"status": status, "latency_s": time.perf_counter() - start, "variant": headers.get("x-quantserve-variant")}

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        results = [f.result() for f in as_completed([pool.submit(one, i) for i in range(args.requests)])]
    wall = time.perf_counter() - start
    results = [r for r in results if r["status"] != "skipped"] or results
    summary = summarize(results, wall, args.n)
    summary["skipped_after_max_seconds"] = args.requests - len(results)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
        if summary["skipped_after_max_seconds"]:
            print(f"stopped after --max-seconds {args.max_seconds}: {summary['skipped_after_max_seconds']} not sent")
    return EXIT_OK if summary["ok"] > 0 else EXIT_FAILED


# --- registration -----------------------------------------------------------------------------------------------

def _add_request_options(p: argparse.ArgumentParser, prompt_required: bool) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="quantserve's base URL (default http://127.0.0.1:8000)")
    p.add_argument("--prompt", required=prompt_required, default=None if prompt_required else "7",
                   help="what to draw: a digit 0-9 or its word for the embedded model")
    p.add_argument("--n", type=_positive("--n", 256), default=1, help="images per request (default 1)")
    p.add_argument("--size", help="WxH, e.g. 64x64 (default: the server's)")
    p.add_argument("--steps", type=_positive("--steps", 10_000), help="denoising steps (default: the server's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 1.0)")
    p.add_argument("--model", help="a variant name (default: the A/B router assigns one)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one response (default 120)")


def add_serve_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `serve`, `generate` and `loadtest` on the `quantserve` parser's subparsers."""
    p = subparsers.add_parser(
        "serve", help="serve models over HTTP with Ray Serve: A/B router, autoscaling, Prometheus metrics",
        description="Start a local Ray instance and serve the variants of CONFIG.yaml (with no file: the embedded "
                    "digits model in two variants, bf16 and nf4, split 50/50) behind an OpenAI-style images API. "
                    "Prints the URLs of the API and of the Prometheus metrics; Ctrl-C (or SIGTERM) stops it and "
                    "every Ray process it started; SIGHUP re-reads CONFIG.yaml (a change of the experiment alone "
                    "reconfigures the router live).")
    p.add_argument("config", nargs="?", help="serve config YAML (see examples/serve.yaml)")
    p.add_argument("--host", help="HTTP host (default: the config's, else 127.0.0.1)")
    p.add_argument("--port", type=_port, help="HTTP port (default: the config's, else 8000)")
    p.add_argument("--metrics-port", type=_port, help="Prometheus metrics port of Ray's metrics agent (default 8080)")
    p.add_argument("--num-cpus", type=int, help="CPUs the local Ray instance offers (default: all)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for every variant to load")
    p.add_argument("--print-ray-config", action="store_true",
                   help="print the equivalent Ray Serve config (for `serve deploy` or KubeRay) and exit")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("generate", help="ask a running quantserve for images and write them as PNG files",
                              description="POST one request to /v1/images/generations and write each image as "
                                          "OUT/<prompt>-<variant>-seed<seed>-<i>.png.")
    _add_request_options(p, prompt_required=True)
    p.add_argument("--seed", type=int, help="seed of the first image (image i uses seed + i)")
    p.add_argument("--user", help="user id for sticky A/B assignment")
    p.add_argument("--force-variant", help="force a variant with the X-Quantserve-Force-Variant header")
    p.add_argument("--out", required=True, help="directory to write the PNGs to (created if missing)")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("loadtest", help="send concurrent requests; print throughput, latency percentiles, A/B split",
                              description="Send REQUESTS generation requests, CONCURRENCY at a time, and print the "
                                          "throughput, p50/p95/p99 latency and the split per variant. Bounded: at "
                                          f"most {MAX_REQUESTS} requests, and nothing new is sent after --max-seconds.")
    _add_request_options(p, prompt_required=False)
    p.add_argument("--concurrency", type=_positive("--concurrency", MAX_CONCURRENCY), default=4,
                   help="requests in flight at once (default 4)")
    p.add_argument("--requests", type=_positive("--requests", MAX_REQUESTS), default=20, help="requests in all (default 20)")
    p.add_argument("--users", type=int, default=0,
                   help="cycle through this many user ids (sticky assignment); 0 sends none (default)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="send nothing new after this many seconds (default 300)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_loadtest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantserve", description="quantserve's serving commands")
    add_serve_commands(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
