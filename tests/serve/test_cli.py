"""The serving commands: `serve` in a subprocess (start, serve, SIGINT, nothing left), `generate`, `loadtest`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from PIL import Image

from quantserve.cli import main
from quantserve.serve.client import generations_url
from quantserve.serve.loadtest import percentile, summarize
from quantserve.serve_cli import add_serve_commands

from .conftest import RunningApp
from .helpers import MODEL_DIR, free_port, wait_for


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_serve_starts_serves_and_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    """`quantserve serve` with no config: the embedded model as bf16 and nf4; Ctrl-C leaves no Ray process behind."""
    port, metrics_port = free_port(), free_port()
    args = []
    if MODEL_DIR is not None:  # the same two variants, on the model the tests were pointed at
        config = tmp_path / "serve.yaml"
        config.write_text(json.dumps({"variants": [{"name": "bf16", "model": MODEL_DIR},
                                                   {"name": "nf4", "model": MODEL_DIR, "quantization": "nf4"}]}))
        args = [str(config)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    stderr = (tmp_path / "stderr.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "quantserve", "serve", *args, "--port", str(port),
                             "--metrics-port", str(metrics_port)],
                            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    children: list[psutil.Process] = []
    try:
        def ready() -> bool:
            assert proc.poll() is None, f"serve exited early ({proc.returncode}): {''.join(lines)}"
            return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200

        wait_for(ready, 240, "quantserve serve to be ready", poll_s=1)
        models = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
        assert {m["id"]: m["scheme"] for m in models["data"]} == {"bf16": "bf16", "nf4": "nf4"}
        r = requests.post(f"http://127.0.0.1:{port}/v1/images/generations", json={"prompt": "7", "steps": 2},
                          timeout=60)
        assert r.status_code == 200 and r.headers["X-Quantserve-Variant"] in ("bf16", "nf4")
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(c.name() for c in children)
        assert "raylet" in names and "gcs_server" in names

        # SIGINT with requests in flight drains: every accepted request is answered before Serve stops
        answers: list[tuple[int, float]] = []

        def send() -> None:
            got = requests.post(f"http://127.0.0.1:{port}/v1/images/generations", timeout=60,
                                json={"prompt": "7", "steps": 100, "size": "64x64", "seed": 1})
            answers.append((got.status_code, time.monotonic()))

        senders = [threading.Thread(target=send) for _ in range(3)]
        for t in senders:
            t.start()
        time.sleep(0.3)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        for t in senders:
            t.join(90)
        assert [status for status, _ in answers] == [200, 200, 200], answers
        assert max(at for _, at in answers) > signalled, "a request was still in flight at the signal"
        assert proc.wait(timeout=120) == 0
        reader.join(timeout=10)
        out = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1/images/generations" in out
        assert f"http://127.0.0.1:{metrics_port}/metrics" in out
        assert "quantserve serve: stopped" in out
        wait_for(lambda: not any(_alive(c) for c in children), 30, "every Ray process serve started to exit")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for child in children:  # only processes this test's serve started
            if _alive(child):
                child.kill()
        stderr.close()


def test_commands_register_on_a_parser() -> None:
    parser = argparse.ArgumentParser()
    add_serve_commands(parser.add_subparsers())
    args = parser.parse_args(["serve", "my.yaml", "--host", "0.0.0.0", "--port", "9000", "--metrics-port", "9100"])
    assert (args.config, args.host, args.port, args.metrics_port) == ("my.yaml", "0.0.0.0", 9000, 9100)
    assert parser.parse_args(["serve"]).config is None
    args = parser.parse_args(["generate", "--url", "http://127.0.0.1:1", "--prompt", "7", "--n", "4", "--out", "d"])
    assert (args.prompt, args.n, args.out) == ("7", 4, "d")
    args = parser.parse_args(["loadtest", "--url", "http://127.0.0.1:1", "--concurrency", "3", "--requests", "9"])
    assert (args.concurrency, args.requests) == (3, 9)
    for bad in (["serve", "--port", "0"], ["loadtest", "--requests", "0"], ["loadtest", "--concurrency", "100000"],
                ["generate", "--prompt", "7"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_serve_rejects_a_bad_config_before_starting_ray(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants:\n  - name: a\n    quantization: nf5\n")
    assert main(["serve", str(bad)]) == 2
    assert "variants.0.quantization: unknown scheme 'nf5'" in capsys.readouterr().err


def test_serve_prints_the_equivalent_ray_serve_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps({"variants": [{"name": "only", "model": MODEL_DIR}]}))
    assert main(["serve", str(config), "--port", "9123", "--print-ray-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["http_options"]["port"] == 9123
    app = printed["applications"][0]
    assert app["import_path"] == "quantserve.serve.app:build_app"
    assert [v["name"] for v in app["args"]["variants"]] == ["only"]


def test_generations_url_forms() -> None:
    assert generations_url("http://h:1") == "http://h:1/v1/images/generations"
    assert generations_url("http://h:1/v1/") == "http://h:1/v1/images/generations"
    assert generations_url("http://h:1/v1/images/generations") == "http://h:1/v1/images/generations"
    with pytest.raises(ValueError, match="--url"):
        generations_url("h:1")


def test_generate_writes_pngs(app: RunningApp, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pngs"
    assert main(["generate", "--url", app.url, "--prompt", "7", "--n", "4", "--steps", "3", "--size", "32x32",
                 "--seed", "4", "--out", str(out)]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 4
    for f in files:
        with Image.open(f) as image:
            assert image.size == (32, 32)
    assert all("seed4" in f.name for f in files)
    assert "wrote" in capsys.readouterr().out


def test_generate_reports_the_server_error(app: RunningApp, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--url", app.url, "--prompt", "7", "--n", "9", "--out", str(tmp_path)]) == 1
    assert "HTTP 422: n: must be between 1 and 4" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_loadtest_prints_throughput_percentiles_and_the_split(app: RunningApp, capsys: pytest.CaptureFixture) -> None:
    assert main(["loadtest", "--url", app.url, "--concurrency", "3", "--requests", "12", "--steps", "2",
                 "--size", "8x8", "--users", "12", "--max-seconds", "120"]) == 0
    out = capsys.readouterr().out
    for word in ("requests   12 (12 ok", "throughput", "p50", "p95", "p99", "variants", "bf16", "nf4"):
        assert word in out, out
    assert main(["loadtest", "--url", app.url + "/v1", "--concurrency", "2", "--requests", "4", "--steps", "1",
                 "--model", "nf4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] == 4 and summary["variants"]["nf4"]["share"] == 1.0
    assert summary["latency"]["p50_ms"] <= summary["latency"]["p99_ms"]


def test_percentiles_and_summary() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50.0, 95.0, 99.0)
    assert percentile([3.0], 99) == 3.0
    results = [{"status": 200, "latency_s": 0.1, "variant": "a"}, {"status": 200, "latency_s": 0.3, "variant": "b"},
               {"status": 503, "latency_s": 0.01, "variant": "a"}]
    s = summarize(results, 2.0, images_per_request=2)
    assert (s["requests"], s["ok"], s["errors"], s["by_status"]) == (3, 2, 1, {"200": 2, "503": 1})
    assert s["throughput_rps"] == 1.0 and s["images_per_s"] == 2.0
    assert s["variants"]["a"]["share"] == 0.5
