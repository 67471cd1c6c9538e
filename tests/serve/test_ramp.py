"""`quantserve loadtest --ramp` (quantserve.serve.ramp): the schedule and mix syntaxes, the timeline, its CSV and
PNG, the run against a stub HTTP server (fast, no Ray), and one short ramp against the real test server."""

from __future__ import annotations

import argparse
import csv
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from quantserve.serve.ramp import (
    CSV_COLUMNS, DEFAULT_HOLD_S, MixEntry, Outcome, RampError, SchedulePoint, add_ramp_arguments, build_timeline,
    clients_at, cmd_ramp, format_row, parse_mix, parse_schedule, parse_server_timing, ramp_duration, render_png,
    rows_to_csv, run_ramp, totals,
)


def _request_body(args: argparse.Namespace) -> dict[str, Any]:
    from quantserve.serve_cli import _request_body as body

    return body(args)


def ramp_parser() -> argparse.ArgumentParser:
    """The loadtest parser's request options plus the ramp's, as `quantserve loadtest` has them."""
    from quantserve.serve_cli import _add_request_options

    p = argparse.ArgumentParser(prog="quantserve loadtest")
    _add_request_options(p, prompt_required=False)
    p.add_argument("--users", type=int, default=0)
    p.add_argument("--json", action="store_true")
    add_ramp_arguments(p)
    return p


# --- the schedule ---------------------------------------------------------------------------------------------

def test_a_schedule_parses_into_points_and_holds_each_until_the_next():
    schedule = parse_schedule("0:1, 60:8 ,120:1")
    assert schedule == (SchedulePoint(0, 1), SchedulePoint(60, 8), SchedulePoint(120, 1))
    assert [clients_at(schedule, t) for t in (0, 59.9, 60, 119, 120, 500)] == [1, 1, 8, 8, 1, 1]
    assert parse_schedule("0:0,0.5:3") == (SchedulePoint(0, 0), SchedulePoint(0.5, 3))
    assert ramp_duration(schedule, None) == 120 + DEFAULT_HOLD_S
    assert ramp_duration(schedule, 150) == 150


@pytest.mark.parametrize("text, reason", [
    ("", "expected T:CLIENTS"),
    ("5:1", "first point must be at 0"),
    ("0:1,0:2", "times must increase"),
    ("0:1,30:4,20:2", "times must increase"),
    ("0:1,,4:2", "expected T:CLIENTS"),
    ("0-1", "is not T:CLIENTS"),
    ("0:1:2", "is not T:CLIENTS"),
    ("0:x", "CLIENTS in '0:x' is not a whole number"),
    ("0:-1", "CLIENTS in '0:-1' must be between 0 and 256"),
    ("0:1,10:999", "must be between 0 and 256"),
    ("a:1", "the time T in 'a:1' is not a number"),
    ("0:1,inf:2", "must be finite"),
])
def test_a_bad_schedule_is_refused_naming_the_flag_and_the_form(text: str, reason: str):
    with pytest.raises(RampError) as err:
        parse_schedule(text)
    assert str(err.value).startswith("--ramp: ")
    assert reason in str(err.value)


def test_a_duration_before_the_last_point_is_refused_naming_the_flag():
    with pytest.raises(RampError, match=r"^--duration: 50 s ends before the schedule's last point at 60 s"):
        ramp_duration(parse_schedule("0:1,60:2"), 50)


# --- the mix --------------------------------------------------------------------------------------------------

def test_a_mix_parses_sizes_steps_images_and_weights():
    mix = parse_mix("256x256:4:1=3, 1024x1024:28:4=1")
    assert mix == (MixEntry("256x256", 4, 1, 3.0), MixEntry("1024x1024", 28, 4, 1.0))
    assert mix[1].fields() == {"size": "1024x1024", "steps": 28, "n": 4}
    assert parse_mix("auto:4") == (MixEntry(None, 4, None, 1.0),)
    assert parse_mix("512x768:auto:2=0.5") == (MixEntry("512x768", None, 2, 0.5),)
    assert parse_mix("64x64")[0].fields() == {"size": "64x64"}  # steps and n from --steps/--n


@pytest.mark.parametrize("text, reason", [
    ("", "expected SIZE[:STEPS[:N]][=WEIGHT]"),
    ("1024x:28", "SIZE in entry 1 '1024x:28' must be WxH"),
    ("64x64,big:4", "SIZE in entry 2 'big:4'"),
    ("64x64:0", "STEPS in '64x64:0' must be between 1 and 10000"),
    ("64x64:four", "STEPS in '64x64:four' is not a whole number"),
    ("64x64:4:0", "N in '64x64:4:0' must be between 1 and 256"),
    ("64x64=0", "WEIGHT in entry 1 '64x64=0' must be > 0"),
    ("64x64=lots", "WEIGHT in '64x64=lots' is not a number"),
    ("64x64:4:1:1", "entry 1 '64x64:4:1:1' has 4 fields"),
])
def test_a_bad_mix_is_refused_naming_the_flag_and_the_field(text: str, reason: str):
    with pytest.raises(RampError) as err:
        parse_mix(text)
    assert str(err.value).startswith("--mix: ")
    assert reason in str(err.value)


def test_the_command_line_refuses_bad_values_naming_the_flag(capsys: pytest.CaptureFixture[str]):
    p = ramp_parser()
    for argv, expected in ((["--ramp", "5:1"], "argument --ramp: the first point must be at 0 s"),
                           (["--ramp", "0:1", "--mix", "64:4"], "argument --mix: SIZE in entry 1 '64:4'"),
                           (["--ramp", "0:1", "--interval", "0.1"], "argument --interval: must be between 0.5")):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
        assert expected in capsys.readouterr().err
    args = p.parse_args(["--ramp", "0:1,4:2", "--mix", "16x16:2=3,32x32:4:2", "--duration", "8", "--interval", "2"])
    assert args.ramp == parse_schedule("0:1,4:2") and len(args.mix) == 2 and args.duration == 8.0
    help_text = " ".join(p.format_help().split())  # as read, whatever the terminal width
    for example in ("--ramp 0:1,60:8,120:1", "--mix 256x256:4:1=3,1024x1024:28:4=1", "SIZE[:STEPS[:N]][=WEIGHT]",
                    "T:CLIENTS,..."):
        assert example in help_text


# --- the timeline ---------------------------------------------------------------------------------------------

def test_server_timing_is_read_per_stage():
    header = "total;dur=812.40, ingress;dur=3.10, queue;dur=120.50, generate;dur=650.00, odd, x;desc=y"
    assert parse_server_timing(header) == {"total": 812.4, "ingress": 3.1, "queue": 120.5, "generate": 650.0}
    assert parse_server_timing(None) == {}


def synthetic() -> list[Outcome]:
    return [
        Outcome(0.0, 1.0, 200, 10.0, "bf16", "a"),  # row 0: latency 1 s
        Outcome(0.5, 1.5, 200, 30.0, "nf4", "a"),  # row 0: 1 s
        Outcome(1.0, 3.9, 200, 50.0, "bf16", "b"),  # sent in row 0, answered in row 1: 2.9 s
        Outcome(2.2, 2.6, 503, None, None, "a"),  # row 1: an error
        Outcome(2.3, 3.5, 200, None, "nf4", "a"),  # row 1: 1.2 s, no Server-Timing
        Outcome(3.0, 5.5, "error:ConnectionResetError", None, None, "b"),  # row 2: an error; in flight at 4
        Outcome(5.0, None, None, None, None, "a"),  # still in flight at the end
    ]


def test_the_timeline_aggregates_each_interval():
    schedule = parse_schedule("0:2,2:4")
    rows = build_timeline(synthetic(), schedule, 2.0, 6.0, [{"bf16": 1, "nf4": 1}, {"bf16": 2, "nf4": 1}, None],
                          duration_s=4.0)
    assert [r["t_s"] for r in rows] == [2.0, 4.0, 6.0]
    assert [r["clients"] for r in rows] == [2, 4, 0]  # after the duration: the last answers are waited for
    assert [r["sent"] for r in rows] == [3, 3, 1]
    assert [r["ok"] for r in rows] == [2, 2, 0]
    assert [r["errors"] for r in rows] == [0, 1, 1]
    assert [r["in_flight"] for r in rows] == [1, 1, 1]
    assert rows[0]["p50_ms"] == 1000.0 and rows[0]["p95_ms"] == 1000.0
    assert rows[1]["p50_ms"] == 1200.0 and rows[1]["p95_ms"] == 2900.0
    assert rows[0]["queue_ms"] == 20.0 and rows[1]["queue_ms"] == 50.0  # only the answers that carried it
    assert rows[2]["p50_ms"] is None and rows[2]["queue_ms"] is None
    assert rows[1]["error_statuses"] == "503 x1" and rows[2]["error_statuses"] == "error:ConnectionResetError x1"
    assert rows[1]["replicas"] == {"bf16": 2, "nf4": 1} and rows[2]["replicas"] is None
    line = format_row(rows[1])
    assert "bf16=2 nf4=1" in line and "errors: 503 x1" in line
    assert "?" in format_row(rows[2])  # /readyz did not answer

    t = totals(synthetic(), 6.0)
    assert (t["sent"], t["ok"], t["errors"], t["unanswered"]) == (7, 4, 3, 1)
    assert t["by_status"] == {"200": 4, "503": 1, "error:ConnectionResetError": 1}
    assert t["by_variant"] == {"bf16": 2, "nf4": 2} and t["by_mix"] == {"a": 5, "b": 2}
    assert t["latency_ms"]["p50"] == 1000.0 and t["queue_ms_mean"] == 30.0


def test_the_csv_has_the_columns_and_one_replica_column_per_variant():
    rows = build_timeline(synthetic(), parse_schedule("0:2,2:4"), 2.0, 6.0,
                          [{"bf16": 1, "nf4": 1}, {"bf16": 2, "nf4": 1, "tight": 1}, None])
    table = list(csv.DictReader(io.StringIO(rows_to_csv(rows))))
    assert list(table[0]) == [*CSV_COLUMNS, "replicas_bf16", "replicas_nf4", "replicas_tight"]
    assert len(table) == 3
    assert table[0]["replicas_tight"] == "" and table[1]["replicas_tight"] == "1" and table[2]["replicas_bf16"] == ""
    assert table[1]["p95_ms"] == "2900.0" and table[1]["errors"] == "1" and table[1]["error_statuses"] == "503 x1"


def test_the_png_is_a_real_plot(tmp_path: Path):
    rows = build_timeline(synthetic(), parse_schedule("0:2,2:4"), 2.0, 6.0, [{"bf16": 1, "nf4": 1}] * 3)
    path = tmp_path / "ramp.png"
    path.write_bytes(render_png(rows, totals(synthetic(), 6.0), title="test"))
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (1100, 750)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # lines, text and legends, not a blank canvas


# --- the run, against a stub server ---------------------------------------------------------------------------

class Stub:
    """A tiny stand-in for quantserve's HTTP API: POST answers after `delay_s` with a Server-Timing queue of 7 ms
    (503 for size 99x99), /readyz answers 503 with replicas per variant; it records bodies and concurrency."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.peak = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                             **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                assert self.path == "/readyz"
                variants = {"a": {"running_replicas": 2}, "b": {"running_replicas": 0}}
                self._send(503, {"ready": False, "variants": variants})

            def do_POST(self) -> None:
                assert self.path == "/v1/images/generations"
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.bodies.append(body)
                    stub.in_flight += 1
                    stub.peak = max(stub.peak, stub.in_flight)
                time.sleep(0.05)
                with stub.lock:
                    stub.in_flight -= 1
                if body.get("size") == "99x99":
                    self._send(503, {"error": {"message": "busy"}}, {"X-Quantserve-Variant": "none"})
                else:
                    self._send(200, {"data": []}, {"Server-Timing": "total;dur=50.00, queue;dur=7.00",
                                                   "X-Quantserve-Variant": "a"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def stub() -> Iterator[Stub]:
    s = Stub()
    thread = threading.Thread(target=s.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield s
    finally:
        s.server.shutdown()
        s.server.server_close()


def test_a_ramp_follows_the_schedule_and_reports_every_interval(stub: Stub):
    seen: list[dict[str, Any]] = []
    rows, t = run_ramp(stub.url, parse_schedule("0:1,1:3"), parse_mix("16x16:2:1=3,32x32:4:2=1"),
                       base_body={"prompt": "3"}, duration_s=2.0, interval_s=0.5, timeout=10, users=2,
                       on_row=seen.append)
    assert seen == rows
    assert t["sent"] == t["ok"] == len(stub.bodies) > 10 and t["errors"] == 0 and not t["interrupted"]
    assert stub.peak == 3
    assert [r["clients"] for r in rows[:4]] == [1, 1, 3, 3]
    assert all(r["replicas"] == {"a": 2, "b": 0} for r in rows)
    assert all(r["queue_ms"] == 7.0 for r in rows if r["ok"])
    assert sum(r["sent"] for r in rows) == t["sent"] and sum(r["ok"] for r in rows) == t["ok"]
    assert rows[-1]["t_s"] >= 2.0 and rows[-1]["in_flight"] == 0
    assert {b["prompt"] for b in stub.bodies} == {"3"}
    assert {(b["size"], b["steps"], b["n"]) for b in stub.bodies} == {("16x16", 2, 1), ("32x32", 4, 2)}
    assert {b["user"] for b in stub.bodies} == {"loadtest-user-0", "loadtest-user-1"}
    assert t["by_variant"] == {"a": t["ok"]}


def test_the_command_writes_csv_and_png_and_fails_when_a_request_fails(stub: Stub, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]):
    p = ramp_parser()
    csv_path, png_path = tmp_path / "t.csv", tmp_path / "t.png"
    args = p.parse_args(["--url", stub.url, "--ramp", "0:2", "--duration", "1.5", "--interval", "0.5",
                         "--size", "16x16", "--csv", str(csv_path), "--png", str(png_path)])
    assert cmd_ramp(args, _request_body(args)) == 0
    out = capsys.readouterr().out
    assert "clients" in out and "a=2 b=0" in out and "answered" in out and f"wrote {png_path}" in out
    table = list(csv.DictReader(csv_path.open()))
    assert len(table) >= 3 and table[0]["replicas_a"] == "2"
    with Image.open(png_path) as image:
        assert image.size == (1100, 750)
    assert {b["size"] for b in stub.bodies} == {"16x16"}  # no --mix: every request is --size

    args = p.parse_args(["--url", stub.url, "--ramp", "0:1", "--duration", "1", "--interval", "0.5",
                         "--mix", "16x16=1,99x99=1", "--json"])
    assert cmd_ramp(args, _request_body(args)) == 1
    report = json.loads(capsys.readouterr().out)
    failed = report["totals"]["by_status"]["503"]
    assert failed > 0 and report["totals"]["errors"] == failed


def test_an_unreachable_server_fails_every_request_and_the_command(capsys: pytest.CaptureFixture[str]):
    from .helpers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    rows, t = run_ramp(url, parse_schedule("0:1"), duration_s=0.6, interval_s=0.5, timeout=2)
    assert t["sent"] > 0 and t["ok"] == 0 and t["errors"] == t["sent"]
    assert all(k.startswith("error:") for k in t["by_status"])
    assert all(r["replicas"] is None for r in rows)
    args = ramp_parser().parse_args(["--url", url, "--ramp", "0:1", "--duration", "0.6", "--interval", "0.5"])
    assert cmd_ramp(args, _request_body(args)) == 1
    assert "errors" in capsys.readouterr().out
    with pytest.raises(RampError, match="^--interval: "):
        run_ramp(url, parse_schedule("0:1"), duration_s=2, interval_s=5)


# --- end to end, against the real test server -----------------------------------------------------------------

def test_a_short_ramp_against_the_server_answers_every_request(app: Any):
    rows, t = run_ramp(app.url, parse_schedule("0:1,4:2"), parse_mix("16x16:2:1=3,32x32:4:2=1"),
                       base_body={"prompt": "7"}, duration_s=8.0, interval_s=2.0, timeout=60)
    assert t["sent"] > 0 and t["sent"] == t["ok"] == t["by_status"].get("200"), t
    assert len(rows) >= 4
    variants = {"bf16", "nf4", "tight"}
    for row in rows:
        assert row["replicas"] is not None and set(row["replicas"]) == variants, row
        assert all(n >= 1 for n in row["replicas"].values()), row
    assert [r["clients"] for r in rows[:4]] == [1, 1, 2, 2]
    assert any(r["queue_ms"] is not None for r in rows)  # read from the server's Server-Timing
    assert set(t["by_variant"]) <= {"bf16", "nf4"} and sum(t["by_variant"].values()) == t["ok"]
