"""benchmarks/cold_start.py: a real (tiny, one scheme, one run each) cold-start measurement writes the table rows and
the goal ratio it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "cold_start.py"


def test_help_explains_the_ways_and_the_goal():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for word in ("prequantized", "on-load", "diffusers", "read", "1.5x", "--cold"):
        assert word in done.stdout


def test_tiny_run_writes_rows_phases_and_the_ratio(tmp_path):
    out, raw = tmp_path / "cold.md", tmp_path / "cold.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--schemes", "int8wo", "--ways", "read,prequantized",
         "--runs", "1", "--workdir", str(tmp_path / "work"), "--out", str(out), "--json", str(raw), "--cold"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "| int8wo | prequantized |" in text and "| int8wo | read " in text
    row = next(line for line in text.splitlines() if line.startswith("| int8wo | prequantized |"))
    assert row.rstrip(" |").endswith("x"), row  # the goal ratio
    phases_header = next(line for line in text.splitlines() if line.startswith("| scheme | way | imports |"))
    assert "| read |" in phases_header and "| unpack |" in phases_header
    [run] = json.loads(raw.read_text())["int8wo"]["prequantized"]
    assert {"read", "unpack", "build"} <= set(run["phases"]) and run["health_s"] > 0
