"""A bounded load test of the images API: concurrent requests, then throughput, latency percentiles and the A/B split.

No Ray: it talks HTTP through serve.client, so it runs against any quantserve (local, in a cluster, behind a proxy).
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from .client import post_json

MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 256


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


def run_loadtest(url: str, body_for: Callable[[int], dict[str, Any]], requests: int, concurrency: int,
                 timeout: float, max_seconds: float, images_per_request: int) -> dict[str, Any]:
    """Send `requests` POSTs (body_for(i) for the i-th), `concurrency` at a time, nothing new after `max_seconds`;
    the summary, with `skipped_after_max_seconds` counting those not sent."""
    deadline = time.monotonic() + max_seconds

    def one(i: int) -> dict[str, Any]:
        if time.monotonic() > deadline:
            return {"status": "skipped", "latency_s": 0.0, "variant": None}
        body = body_for(i)
        start = time.perf_counter()
        try:
            status, headers, _ = post_json(url, body, timeout)
        except OSError as exc:
            return {"status": f"error:{type(exc).__name__}", "latency_s": time.perf_counter() - start, "variant": None}
        return {"status": status, "latency_s": time.perf_counter() - start, "variant": headers.get("x-quantserve-variant")}

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = [f.result() for f in as_completed([pool.submit(one, i) for i in range(requests)])]
    wall = time.perf_counter() - start
    results = [r for r in results if r["status"] != "skipped"] or results
    summary = summarize(results, wall, images_per_request)
    summary["skipped_after_max_seconds"] = requests - len(results)
    return summary


def format_summary(s: dict[str, Any]) -> list[str]:
    """The summary as the lines `quantserve loadtest` prints."""
    lat = s["latency"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} ms"

    lines = [f"requests   {s['requests']} ({s['ok']} ok, {s['errors']} failed; by status {s['by_status']})",
             f"wall       {s['wall_s']:.2f} s",
             f"throughput {s['throughput_rps']:.2f} req/s, {s['images_per_s']:.2f} images/s",
             f"latency    p50 {ms(lat['p50_ms'])}  p95 {ms(lat['p95_ms'])}  p99 {ms(lat['p99_ms'])}",
             "variants"]
    for name, v in s["variants"].items():
        lines.append(f"  {name:<16} {v['requests']:>6} ({100 * v['share']:.1f}%)  p50 {ms(v['p50_ms'])}  "
                     f"p95 {ms(v['p95_ms'])}  p99 {ms(v['p99_ms'])}")
    return lines
