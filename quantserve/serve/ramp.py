"""`quantserve loadtest --ramp`: a load that follows a concurrency schedule, with a timeline of what the server did.

Clients (threads) send generation requests back to back; how many are active follows the schedule (`--ramp
0:1,60:8,120:1`: one client from t=0, eight from t=60 s, one from t=120 s), and each request is drawn from a
weighted mix of sizes, steps and images (`--mix 256x256:4:1=3,1024x1024:28:4=1`). Every `--interval` seconds it
prints a timeline row: the clients offered, requests sent, answered and failed, p50/p95 latency, the mean queue
wait on the replica (from the Server-Timing header's `queue`), and the running replicas per variant (from GET
/readyz); at the end, the totals. The rows can be written as CSV (`--csv`) and as a PNG plot (`--png`, matplotlib).

No Ray: it talks HTTP through serve.client, like serve.loadtest, whose percentile it shares.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import math
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .client import get_json, generations_url, post_json
from .loadtest import MAX_CONCURRENCY, percentile

DEFAULT_HOLD_S = 60.0  # how long the last schedule point is held when there is no --duration
DEFAULT_INTERVAL_S = 5.0
MIN_INTERVAL_S = 0.5
MAX_DURATION_S = 24 * 3600.0
READYZ_TIMEOUT_S = 5.0
NETWORK_ERROR_PAUSE_S = 0.25
GENERATIONS_PATH = "/v1/images/generations"

RAMP_HELP = (
    "With --ramp the load follows a schedule (not --requests/--concurrency) and a timeline row is printed every "
    "--interval seconds: clients offered, requests sent/ok/failed, p50/p95 latency, the mean queue wait on the "
    "replica (Server-Timing 'queue') and the running replicas per variant (GET /readyz). "
    "SCHEDULE is T:CLIENTS,... : from T seconds on, CLIENTS clients send back to back (first point at 0, times "
    f"increasing, CLIENTS 0..{MAX_CONCURRENCY}). Example: --ramp 0:1,60:8,120:1 is one client, eight from 60 s, one "
    f"from 120 s, until 180 s (the last point is held {DEFAULT_HOLD_S:g} s unless --duration says otherwise). "
    "Requests in flight at the end are waited for. Exit status 1 when any request failed."
)
MIX_HELP = (
    "the requests, SIZE[:STEPS[:N]][=WEIGHT],... : each request is one entry, drawn with probability proportional to "
    "its WEIGHT (default 1); SIZE is WxH or auto (the variant's default), STEPS a count or auto, N images per "
    "request; an omitted STEPS or N is --steps/--n. Example: --mix 256x256:4:1=3,1024x1024:28:4=1 is three small "
    "4-step requests for each 28-step one of 4 big images (default: every request is --size/--steps/--n)"
)


class RampError(ValueError):
    """A bad --ramp, --mix, --duration or --interval; the message starts with the flag."""


# --- the schedule ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SchedulePoint:
    at_s: float
    clients: int


def _number(flag: str, what: str, text: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RampError(f"{flag}: {what} in {item!r} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise RampError(f"{flag}: {what} in {item!r} must be finite, got {text!r}")
    return value


def _count(flag: str, what: str, text: str, item: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise RampError(f"{flag}: {what} in {item!r} is not a whole number: {text!r}") from None
    if not low <= value <= high:
        raise RampError(f"{flag}: {what} in {item!r} must be between {low} and {high}, got {value}")
    return value


def parse_schedule(text: str) -> tuple[SchedulePoint, ...]:
    """'T:CLIENTS,...' (e.g. '0:1,60:8,120:1') as points; RampError naming --ramp and the accepted form."""
    form = "expected T:CLIENTS,... such as 0:1,60:8,120:1"
    items = [item.strip() for item in str(text).split(",")]
    if not text or not text.strip() or any(not item for item in items):
        raise RampError(f"--ramp: {form}, got {text!r}")
    points: list[SchedulePoint] = []
    for item in items:
        at, sep, clients = item.partition(":")
        if not sep or ":" in clients:
            raise RampError(f"--ramp: {form}; {item!r} is not T:CLIENTS")
        at_s = _number("--ramp", "the time T", at.strip(), item)
        n = _count("--ramp", "CLIENTS", clients.strip(), item, 0, MAX_CONCURRENCY)
        if at_s < 0 or at_s > MAX_DURATION_S:
            raise RampError(f"--ramp: the time T in {item!r} must be between 0 and {MAX_DURATION_S:g} s")
        if points and at_s <= points[-1].at_s:
            raise RampError(f"--ramp: times must increase; {item!r} comes after {points[-1].at_s:g} s")
        points.append(SchedulePoint(at_s, n))
    if points[0].at_s != 0:
        raise RampError(f"--ramp: the first point must be at 0 s (e.g. 0:0 for an idle start), got {items[0]!r}")
    return tuple(points)


def clients_at(schedule: Sequence[SchedulePoint], t: float) -> int:
    """The clients the schedule holds at t seconds (0 before the first point)."""
    clients = 0
    for point in schedule:
        if point.at_s > t:
            break
        clients = point.clients
    return clients


def ramp_duration(schedule: Sequence[SchedulePoint], duration_s: float | None) -> float:
    """--duration, checked against the schedule; by default the last point held DEFAULT_HOLD_S."""
    last = schedule[-1].at_s
    if duration_s is None:
        return last + DEFAULT_HOLD_S
    if not math.isfinite(duration_s) or not 0 < duration_s <= MAX_DURATION_S:
        raise RampError(f"--duration: must be between 0 and {MAX_DURATION_S:g} s, got {duration_s:g}")
    if duration_s <= last:
        raise RampError(f"--duration: {duration_s:g} s ends before the schedule's last point at {last:g} s")
    return float(duration_s)


# --- the request mix ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MixEntry:
    size: str | None = None  # 'WxH'; None: the variant's default (or --size)
    steps: int | None = None  # None: --steps or the variant's default
    n: int | None = None  # None: --n
    weight: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.size or 'auto'}:{self.steps or 'auto'}:{self.n or '-'}"

    def fields(self) -> dict[str, Any]:
        """The request fields this entry sets (over the base body)."""
        return {k: v for k, v in (("size", self.size), ("steps", self.steps), ("n", self.n)) if v is not None}


def parse_mix(text: str) -> tuple[MixEntry, ...]:
    """'SIZE[:STEPS[:N]][=WEIGHT],...' (e.g. '256x256:4:1=3,1024x1024:28:4=1'); RampError naming --mix and the
    field at fault."""
    from .config import parse_size_text

    form = "expected SIZE[:STEPS[:N]][=WEIGHT],... such as 256x256:4:1=3,1024x1024:28:4=1"
    items = [item.strip() for item in str(text).split(",")]
    if not text or not text.strip() or any(not item for item in items):
        raise RampError(f"--mix: {form}, got {text!r}")
    entries = []
    for i, item in enumerate(items, 1):
        where = f"entry {i} {item!r}"
        spec, sep, weight_text = item.partition("=")
        weight = 1.0
        if sep:
            weight = _number("--mix", "WEIGHT", weight_text.strip(), item)
            if weight <= 0:
                raise RampError(f"--mix: WEIGHT in {where} must be > 0, got {weight_text.strip()!r}")
        parts = [p.strip() for p in spec.split(":")]
        if len(parts) > 3:
            raise RampError(f"--mix: {where} has {len(parts)} fields; {form}")
        size_text = parts[0]
        if size_text.lower() == "auto":
            size = None
        else:
            try:
                w, h = parse_size_text(size_text)
            except ValueError:
                raise RampError(f"--mix: SIZE in {where} must be WxH such as 512x512, or auto; got {size_text!r}") \
                    from None
            if w < 1 or h < 1:
                raise RampError(f"--mix: SIZE in {where} must be at least 1x1, got {size_text!r}")
            size = f"{w}x{h}"
        steps = None
        if len(parts) > 1 and parts[1].lower() != "auto":
            steps = _count("--mix", "STEPS", parts[1], item, 1, 10_000)
        n = _count("--mix", "N", parts[2], item, 1, 256) if len(parts) > 2 else None
        entries.append(MixEntry(size, steps, n, weight))
    return tuple(entries)


# --- one request's outcome and the timeline -------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """One request: when it was sent and answered (seconds from the ramp's start; end None while in flight)."""

    start_s: float
    end_s: float | None = None
    status: int | str | None = None  # the HTTP status, or 'error:Name' when no answer came
    queue_ms: float | None = None  # Server-Timing queue: the wait on the replica for a batch
    variant: str | None = None
    label: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


def parse_server_timing(header: str | None) -> dict[str, float]:
    """'total;dur=12.00, queue;dur=3.5' as {'total': 12.0, 'queue': 3.5} (entries without dur are skipped)."""
    stages: dict[str, float] = {}
    for entry in (header or "").split(","):
        name, *params = [p.strip() for p in entry.split(";")]
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "dur" and name:
                try:
                    stages[name] = float(value.strip().strip('"'))
                except ValueError:
                    pass
    return stages


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def timeline_row(outcomes: Sequence[Outcome], schedule: Sequence[SchedulePoint], start_s: float, end_s: float,
                 replicas: Mapping[str, int] | None, duration_s: float | None = None) -> dict[str, Any]:
    """The row for [start_s, end_s): `clients` as the schedule held at start_s (0 from duration_s on, while the
    last requests are waited for), `in_flight` at end_s, `sent` the requests started in the interval, `ok`/`errors`
    and the latencies and queue wait of those answered in it."""
    answered = [o for o in outcomes if o.end_s is not None and start_s <= o.end_s < end_s]
    ok = [o for o in answered if o.ok]
    latencies = [o.end_s - o.start_s for o in ok]  # type: ignore[operator]
    queues = [o.queue_ms for o in ok if o.queue_ms is not None]
    failed = Counter(str(o.status) for o in answered if not o.ok)
    return {
        "t_s": round(end_s, 3),
        "clients": clients_at(schedule, start_s) if duration_s is None or start_s < duration_s else 0,
        "in_flight": sum(1 for o in outcomes if o.start_s < end_s and (o.end_s is None or o.end_s >= end_s)),
        "sent": sum(1 for o in outcomes if start_s <= o.start_s < end_s),
        "ok": len(ok),
        "errors": len(answered) - len(ok),
        "p50_ms": _ms(percentile(latencies, 50) * 1000) if latencies else None,
        "p95_ms": _ms(percentile(latencies, 95) * 1000) if latencies else None,
        "queue_ms": _ms(sum(queues) / len(queues)) if queues else None,
        "error_statuses": ", ".join(f"{status} x{count}" for status, count in sorted(failed.items())),
        "replicas": dict(sorted(replicas.items())) if replicas is not None else None,
    }


def build_timeline(outcomes: Sequence[Outcome], schedule: Sequence[SchedulePoint], interval_s: float, end_s: float,
                   replicas: Sequence[Mapping[str, int] | None] = (), duration_s: float | None = None
                   ) -> list[dict[str, Any]]:
    """Rows every interval_s up to end_s (the last one may be shorter); replicas[i] for row i when given."""
    rows, start, i = [], 0.0, 0
    while start < end_s - 1e-9:
        end = min(start + interval_s, end_s)
        rows.append(timeline_row(outcomes, schedule, start, end, replicas[i] if i < len(replicas) else None,
                                 duration_s))
        start, i = end, i + 1
    return rows


def totals(outcomes: Sequence[Outcome], duration_s: float) -> dict[str, Any]:
    """Sent, answered 200, errors by status, latency percentiles and the mean queue wait of the whole ramp."""
    done = [o for o in outcomes if o.end_s is not None]
    ok = [o for o in done if o.ok]
    latencies = [o.end_s - o.start_s for o in ok]  # type: ignore[operator]
    queues = [o.queue_ms for o in ok if o.queue_ms is not None]
    return {
        "sent": len(outcomes),
        "ok": len(ok),
        "errors": len(outcomes) - len(ok),
        "by_status": dict(sorted(Counter(str(o.status) for o in done).items())),
        "unanswered": len(outcomes) - len(done),
        "duration_s": round(duration_s, 3),
        "latency_ms": {f"p{q}": _ms(percentile(latencies, q) * 1000) if latencies else None for q in (50, 95, 99)},
        "queue_ms_mean": _ms(sum(queues) / len(queues)) if queues else None,
        "by_mix": dict(sorted(Counter(o.label for o in outcomes).items())),
        "by_variant": dict(sorted(Counter(o.variant for o in ok if o.variant).items())),
    }


# --- output ---------------------------------------------------------------------------------------------------

def variants_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({name for row in rows for name in (row.get("replicas") or {})})


CSV_COLUMNS = ("t_s", "clients", "in_flight", "sent", "ok", "errors", "p50_ms", "p95_ms", "queue_ms",
               "error_statuses")


def rows_to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV: CSV_COLUMNS, then replicas_<variant> per variant seen (empty when /readyz did not
    answer)."""
    variants = variants_of(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *(f"replicas_{v}" for v in variants)])
    for row in rows:
        replicas = row.get("replicas")
        writer.writerow([*("" if row.get(c) is None else row[c] for c in CSV_COLUMNS),
                         *("" if replicas is None or v not in replicas else replicas[v] for v in variants)])
    return out.getvalue()


def format_header() -> str:
    return (f"{'t s':>7} {'clients':>7} {'flight':>6} {'sent':>5} {'ok':>5} {'err':>4} {'p50 ms':>8} {'p95 ms':>8} "
            f"{'queue ms':>8}  replicas")


def format_row(row: Mapping[str, Any]) -> str:
    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"

    replicas = row.get("replicas")
    shown = "?" if replicas is None else " ".join(f"{k}={v}" for k, v in replicas.items()) or "-"
    line = (f"{row['t_s']:>7.1f} {row['clients']:>7} {row['in_flight']:>6} {row['sent']:>5} {row['ok']:>5} "
            f"{row['errors']:>4} {num(row['p50_ms']):>8} {num(row['p95_ms']):>8} {num(row['queue_ms']):>8}  {shown}")
    return line + (f"  errors: {row['error_statuses']}" if row.get("error_statuses") else "")


def format_totals(t: Mapping[str, Any]) -> list[str]:
    lat = t["latency_ms"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} ms"

    failed = {k: v for k, v in t["by_status"].items() if k != "200"}
    return [f"sent       {t['sent']} in {t['duration_s']:.1f} s",
            f"answered   {t['ok']} with 200",
            f"errors     {t['errors']}" + (f" (by status: {', '.join(f'{k}: {v}' for k, v in failed.items())})"
                                           if failed else "")
            + (f"; {t['unanswered']} unanswered" if t["unanswered"] else ""),
            f"latency    p50 {ms(lat['p50'])}  p95 {ms(lat['p95'])}  p99 {ms(lat['p99'])}",
            f"queue wait mean {ms(t['queue_ms_mean'])}",
            f"served by  {', '.join(f'{k}: {v}' for k, v in t['by_variant'].items()) or '-'}"]


def render_png(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any] | None = None, title: str = "") -> bytes:
    """The timeline as a PNG (matplotlib, Agg canvas; no pyplot state): offered clients, requests in flight and
    running replicas per variant above; p50/p95 latency and the mean queue wait below; failed requests marked."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency of the serve extra
        raise RuntimeError("--png needs matplotlib (pip install matplotlib)") from exc

    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    load, lat = fig.subplots(2, 1, sharex=True, height_ratios=(1, 1))
    t = [0.0] + [float(r["t_s"]) for r in rows]

    def series(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]

    def stepped(values: list[float]) -> list[float]:  # row i's value holds over (t[i], t[i+1]]
        return values[:1] + values

    clients = [float(r["clients"]) for r in rows]
    load.step(t, stepped(clients), where="pre", color="0.35", linewidth=2.5, label="offered clients")
    load.step(t, stepped(series("in_flight")), where="pre", color="0.6", linestyle=":", linewidth=1.5,
              label="requests in flight")
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
    for i, variant in enumerate(variants_of(rows)):
        values = [float("nan") if r.get("replicas") is None or variant not in r["replicas"]
                  else float(r["replicas"][variant]) for r in rows]
        load.step(t, stepped(values), where="pre", color=colors[i % len(colors)], alpha=0.85,
                  linewidth=max(1.5, 6.0 - 1.5 * i), label=f"replicas: {variant}")  # thinner on top: overlaps show
    errors = [(float(r["t_s"]), int(r["errors"])) for r in rows if r.get("errors")]
    if errors:
        top = max([*clients, 1.0])
        load.scatter([e[0] for e in errors], [top * 1.05] * len(errors), marker="x", color="red", zorder=5,
                     label="failed requests (count)")
        for x, count in errors:
            load.annotate(str(count), (x, top * 1.05), textcoords="offset points", xytext=(0, 5), ha="center",
                          color="red", fontsize=8)
    load.set_ylabel("clients / replicas")
    load.set_ylim(bottom=0)
    load.yaxis.get_major_locator().set_params(integer=True)
    load.grid(True, alpha=0.3)
    load.legend(loc="upper left", fontsize=8, ncols=2)

    mid = [(t[i] + t[i + 1]) / 2 for i in range(len(rows))]
    for key, label, style in (("p50_ms", "p50 latency", "-o"), ("p95_ms", "p95 latency", "-s"),
                              ("queue_ms", "mean queue wait", "--^")):
        lat.plot(mid, [v / 1000 for v in series(key)], style, markersize=3.5, label=label)
    lat.set_ylabel("seconds")
    lat.set_xlabel("time since the start of the ramp (s)")
    lat.set_ylim(bottom=0)
    lat.grid(True, alpha=0.3)
    lat.legend(loc="upper left", fontsize=8)
    if summary:
        title = (f"{title + ': ' if title else ''}{summary['sent']} sent, {summary['ok']} answered 200, "
                 f"{summary['errors']} failed")
    fig.suptitle(title or "quantserve load ramp")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --- the run --------------------------------------------------------------------------------------------------

def read_replicas(base_url: str, timeout: float, headers: Mapping[str, str] | None = None) -> dict[str, int] | None:
    """Running replicas per variant from GET {base}/readyz (its body answers with 200 and 503 alike); None when it
    cannot be read."""
    try:
        _, body = get_json(f"{base_url}/readyz", timeout, dict(headers or {}))
        return {name: int(v.get("running_replicas", 0)) for name, v in body["variants"].items()}
    except (OSError, http.client.HTTPException, KeyError, TypeError, AttributeError, ValueError):
        return None


def run_ramp(url: str, schedule: Sequence[SchedulePoint], mix: Sequence[MixEntry] = (MixEntry(),),
             base_body: Mapping[str, Any] | None = None, duration_s: float | None = None,
             interval_s: float = DEFAULT_INTERVAL_S, timeout: float = 120.0, users: int = 0, seed: int = 0,
             headers: Mapping[str, str] | None = None, on_row: Callable[[dict[str, Any]], None] | None = None,
             read_replicas_fn: Callable[[], dict[str, int] | None] | None = None,
             ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the ramp against quantserve at `url` (base URL or the generations endpoint): (timeline rows, totals).

    One thread per client of the schedule's peak; client i sends back to back while the schedule holds more than
    i clients. Each request is base_body with a mix entry drawn by weight (client i's own seeded generator) and,
    with `users`, a user id (sticky A/B assignment). Every interval a row is made, with the running replicas per
    variant read from /readyz, and passed to on_row as it is made. Nothing new is sent after duration_s; the
    requests in flight then are waited for, and their rows follow."""
    if not schedule:
        raise RampError("--ramp: the schedule is empty")
    if not mix:
        raise RampError("--mix: the mix is empty")
    duration = ramp_duration(schedule, duration_s)
    if not math.isfinite(interval_s) or not MIN_INTERVAL_S <= interval_s <= duration:
        raise RampError(f"--interval: must be between {MIN_INTERVAL_S:g} s and the duration ({duration:g} s), got "
                        f"{interval_s:g}")
    endpoint = generations_url(url)
    base_url = endpoint[: -len(GENERATIONS_PATH)] if endpoint.endswith(GENERATIONS_PATH) else endpoint
    body0 = {"prompt": "7", "response_format": "b64_json", **(base_body or {})}
    weights = [e.weight for e in mix]
    poll = read_replicas_fn or (lambda: read_replicas(base_url, READYZ_TIMEOUT_S, headers))

    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()

    def now() -> float:
        return time.monotonic() - t0

    def client(i: int) -> None:
        rng = random.Random(f"{seed}:{i}")
        while not stop.is_set():
            t = now()
            if t >= duration:
                return
            if i >= clients_at(schedule, t):
                stop.wait(0.05)
                continue
            entry = rng.choices(mix, weights)[0]
            body = {**body0, **entry.fields()}
            if users:
                body["user"] = f"loadtest-user-{i % users}"
            with lock:
                index = len(outcomes)
                outcomes.append(Outcome(start_s=t, label=entry.label))
            try:
                status, response_headers, _ = post_json(endpoint, body, timeout, dict(headers or {}))
                queue = parse_server_timing(response_headers.get("server-timing")).get("queue")
                done = dict(status=status, queue_ms=queue, variant=response_headers.get("x-quantserve-variant"))
            except (OSError, http.client.HTTPException) as exc:
                done = dict(status=f"error:{type(exc).__name__}", queue_ms=None, variant=None)
            with lock:
                outcomes[index] = replace(outcomes[index], end_s=now(), **done)
            if str(done["status"]).startswith("error:"):
                stop.wait(NETWORK_ERROR_PAUSE_S)  # no answer at all: do not spin against a server that is not there

    # The replicas per variant, read in the background (a busy Ingress may take seconds to answer /readyz): a row
    # shows the latest reading, or None when there has been none for 3 intervals.
    replicas_read: list[tuple[float, dict[str, int]]] = []
    polled = threading.Event()

    def poller() -> None:
        while True:
            value = poll()
            if value is not None:
                with lock:
                    replicas_read[:] = [(time.monotonic(), value)]
            polled.set()
            if stop.wait(min(max(interval_s / 2, 0.25), 2.5)):
                return

    def latest_replicas() -> dict[str, int] | None:
        with lock:
            if replicas_read and time.monotonic() - replicas_read[0][0] <= max(3 * interval_s, 15.0):
                return replicas_read[0][1]
        return None

    poll_thread = threading.Thread(target=poller, name="ramp-readyz", daemon=True)
    poll_thread.start()
    polled.wait(READYZ_TIMEOUT_S + 1)  # the replicas at the start, before any load
    t0 = time.monotonic()
    peak = max(p.clients for p in schedule)
    threads = [threading.Thread(target=client, args=(i,), name=f"ramp-client-{i}", daemon=True) for i in range(peak)]
    for thread in threads:
        thread.start()

    rows: list[dict[str, Any]] = []
    start = 0.0
    try:
        while True:
            end = start + interval_s
            while now() < end and not (now() >= duration and not any(th.is_alive() for th in threads)):
                time.sleep(min(0.05, max(0.0, end - now())))
            end = min(end, now())
            replicas = latest_replicas()
            with lock:
                snapshot = list(outcomes)
            row = timeline_row(snapshot, schedule, start, end, replicas, duration)
            rows.append(row)
            if on_row:
                on_row(row)
            start = end
            if end >= duration and not any(th.is_alive() for th in threads):
                break
    except KeyboardInterrupt:
        stop.set()  # the clients finish the request they are in (bounded by `timeout`), then stop
        for thread in threads:
            thread.join(timeout + 1)
    finally:
        stop.set()
        poll_thread.join(READYZ_TIMEOUT_S + 1)
    with lock:
        snapshot = list(outcomes)
    summary = totals(snapshot, now())
    summary["interrupted"] = now() < duration
    return rows, summary


# --- the command ----------------------------------------------------------------------------------------------

def _arg(parse: Callable[[str], Any], flag: str) -> Callable[[str], Any]:
    """An argparse type from a parser raising RampError (argparse names the flag itself)."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except RampError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag}: ")) from None
    convert.__name__ = flag.lstrip("-")
    return convert


def _seconds(flag: str, low: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise RampError(f"{flag}: expected seconds, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= MAX_DURATION_S:
            raise RampError(f"{flag}: must be between {low:g} and {MAX_DURATION_S:g} s, got {text!r}")
        return value
    return parse


def add_ramp_arguments(parser: argparse.ArgumentParser) -> None:
    """--ramp, --mix, --duration, --interval, --csv and --png, in a group of `quantserve loadtest`'s help that
    explains the syntaxes."""
    g = parser.add_argument_group("ramp (--ramp SCHEDULE)", RAMP_HELP)
    g.add_argument("--ramp", metavar="SCHEDULE", type=_arg(parse_schedule, "--ramp"),
                   help="T:CLIENTS,... e.g. 0:1,60:8,120:1: run the load ramp (see above)")
    g.add_argument("--mix", metavar="MIX", type=_arg(parse_mix, "--mix"), help=MIX_HELP)
    g.add_argument("--duration", type=_arg(_seconds("--duration", 0.001), "--duration"),
                   help=f"seconds to run (default: the last schedule point + {DEFAULT_HOLD_S:g} s)")
    g.add_argument("--interval", type=_arg(_seconds("--interval", MIN_INTERVAL_S), "--interval"),
                   default=DEFAULT_INTERVAL_S, help=f"seconds per timeline row (default {DEFAULT_INTERVAL_S:g})")
    g.add_argument("--csv", metavar="PATH", help="write the timeline rows as CSV")
    g.add_argument("--png", metavar="PATH", help="write the timeline as a PNG plot")


def cmd_ramp(args: argparse.Namespace, base_body: Mapping[str, Any]) -> int:
    """`quantserve loadtest --ramp ...`: 0 when every request was answered 200, 1 when any failed (or none was
    sent), 2 for a usage error. base_body: the request the loadtest options describe (serve_cli's
    _request_body(args); serve may not import the CLI), which each mix entry's size, steps and n override."""
    from quantserve.kernels.atomic_write import atomic_write_bytes, atomic_write_text

    prog = "quantserve loadtest"
    mix = args.mix or (MixEntry(),)
    try:
        duration = ramp_duration(args.ramp, args.duration)
        if args.interval > duration:
            raise RampError(f"--interval: {args.interval:g} s is longer than the ramp ({duration:g} s)")
        generations_url(args.url)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    body = dict(base_body)
    quiet = bool(getattr(args, "json", False))
    if not quiet:
        mix_text = ", ".join(f"{e.label} x{e.weight:g}" for e in mix)
        print(f"ramp {', '.join(f'{p.at_s:g}s:{p.clients}' for p in args.ramp)} for {duration:g} s; mix {mix_text}; "
              f"a row every {args.interval:g} s", flush=True)
        print(format_header(), flush=True)
    rows, summary = run_ramp(args.url, args.ramp, mix, body, duration, args.interval, args.timeout,
                             users=getattr(args, "users", 0) or 0,
                             on_row=None if quiet else (lambda row: print(format_row(row), flush=True)))
    if args.csv:
        atomic_write_text(args.csv, rows_to_csv(rows))
    if args.png:
        try:
            atomic_write_bytes(args.png, render_png(rows, summary, title="quantserve loadtest --ramp"))
        except RuntimeError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 1
    if quiet:
        print(json.dumps({"rows": rows, "totals": summary}, indent=2))
    else:
        print("\n".join(format_totals(summary)))
        for path in (args.csv, args.png):
            if path:
                print(f"wrote {path}")
    return 0 if summary["sent"] > 0 and summary["errors"] == 0 else 1
