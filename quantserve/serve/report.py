"""The A/B report (issue 15): per variant over a time window, requests, error rate, latency percentiles with 95%
bootstrap confidence intervals and images/s; for each candidate against the baseline, the ratio of p95 latencies
with its interval. Plain Python and numpy, no Ray: the Ingress keeps a RequestLog and serves `build_report`.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_RECORDS = 50_000       # requests kept per Ingress replica (the oldest fall out)
BOOTSTRAP_SAMPLES = 1000
MAX_BOOTSTRAP_N = 2000  # points resampled per bootstrap (a random subset of a larger window)
WINDOW_PATTERN = re.compile(r"(\d+(?:\.\d+)?)(s|m|h)?")


@dataclass(frozen=True)
class Record:
    time: float       # when the answer left (time.time())
    variant: str
    status: int
    latency_s: float
    images: int


class RequestLog:
    """The recent generations this Ingress replica answered, bounded."""

    def __init__(self, maxlen: int = MAX_RECORDS):
        self.records: deque[Record] = deque(maxlen=maxlen)
        self.started = time.time()

    def add(self, variant: str, status: int, latency_s: float, images: int, now: float | None = None) -> None:
        self.records.append(Record(time.time() if now is None else now, variant, status, latency_s, images))

    def window(self, seconds: float | None, now: float | None = None) -> list[Record]:
        if seconds is None:
            return list(self.records)
        since = (time.time() if now is None else now) - seconds
        return [r for r in self.records if r.time >= since]


def parse_window(text: str | None) -> float | None:
    """'300s', '5m', '2h' or '300' as seconds; None or '' for since start; ValueError naming the accepted forms."""
    if text is None or text == "":
        return None
    match = WINDOW_PATTERN.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"window: expected a positive duration such as 300s, 5m or 2h (got {text!r})")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]


def _resample(data: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """`samples` bootstrap resamples of the data, each of its size (at most MAX_BOOTSTRAP_N points are resampled:
    enough for a percentile's interval, and bounded in time)."""
    if data.size > MAX_BOOTSTRAP_N:
        data = rng.choice(data, size=MAX_BOOTSTRAP_N, replace=False)
    return rng.choice(data, size=(samples, data.size), replace=True)


def bootstrap_ci(values: Sequence[float], q: float, samples: int = BOOTSTRAP_SAMPLES, alpha: float = 0.05,
                 rng: np.random.Generator | None = None) -> tuple[float, float, float] | None:
    """(estimate, low, high): the q-th percentile and its percentile-bootstrap (1 - alpha) interval; None without
    data."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return None
    rng = rng or np.random.default_rng(0)
    stats = np.percentile(_resample(data, samples, rng), q, axis=1)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(np.percentile(data, q)), float(low), float(high)


def ratio_ci(candidate: Sequence[float], baseline: Sequence[float], q: float, samples: int = BOOTSTRAP_SAMPLES,
             alpha: float = 0.05, rng: np.random.Generator | None = None) -> tuple[float, float, float] | None:
    """percentile_q(candidate) / percentile_q(baseline) with a bootstrap interval (each side resampled on its own)."""
    a, b = np.asarray(candidate, dtype=float), np.asarray(baseline, dtype=float)
    if a.size == 0 or b.size == 0 or np.percentile(b, q) <= 0:
        return None
    rng = rng or np.random.default_rng(0)
    sa = np.percentile(_resample(a, samples, rng), q, axis=1)
    sb = np.percentile(_resample(b, samples, rng), q, axis=1)
    ratios = sa / np.where(sb > 0, sb, np.nan)
    low, high = np.nanquantile(ratios, [alpha / 2, 1 - alpha / 2])
    return float(np.percentile(a, q) / np.percentile(b, q)), float(low), float(high)


def _interval(ci: tuple[float, float, float] | None, scale: float = 1.0, digits: int = 1) -> dict[str, Any] | None:
    if ci is None:
        return None
    return {"value": round(ci[0] * scale, digits), "ci95": [round(ci[1] * scale, digits), round(ci[2] * scale, digits)]}


def build_report(log: RequestLog, variants: Sequence[str], window_s: float | None, baseline: str | None,
                 extras: dict[str, dict[str, Any]] | None = None, now: float | None = None) -> dict[str, Any]:
    """The report over the window; `extras[variant]` (fidelity, feedback, model bytes ...) is merged per variant."""
    now = time.time() if now is None else now
    records = log.window(window_s, now)
    span = min(window_s or math.inf, now - log.started) if records else 0.0
    per: dict[str, Any] = {}
    latencies: dict[str, list[float]] = {}
    for name in variants:
        mine = [r for r in records if r.variant == name]
        ok = [r for r in mine if r.status == 200]
        errors = [r for r in mine if r.status >= 500]
        lat = [r.latency_s for r in ok]
        latencies[name] = lat
        per[name] = {
            "requests": len(mine), "ok": len(ok), "errors": len(errors),
            "error_rate": round(len(errors) / len(mine), 4) if mine else None,
            "p50_ms": _interval(bootstrap_ci(lat, 50), 1000), "p95_ms": _interval(bootstrap_ci(lat, 95), 1000),
            "images_per_s": round(sum(r.images for r in ok) / span, 3) if span > 0 else None,
            **(extras or {}).get(name, {}),
        }
    comparisons = []
    if baseline in per:
        for name in variants:
            if name == baseline:
                continue
            ratio = ratio_ci(latencies[name], latencies[baseline], 95)
            comparisons.append({"candidate": name, "baseline": baseline,
                                "p95_latency_ratio": _interval(ratio, 1.0, 3),
                                "text": (f"{name} p95 is {ratio[0]:.2f}x {baseline} [{ratio[1]:.2f}, {ratio[2]:.2f}]"
                                         if ratio else f"{name} or {baseline} has no successful request yet")})
    return {"window_s": window_s, "span_s": round(span, 1), "requests": len(records), "baseline": baseline,
            "variants": per, "comparisons": comparisons}
