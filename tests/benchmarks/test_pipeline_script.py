"""benchmarks/pipeline.py runs end to end on the tiny FLUX pipeline and writes the table and goals it promises."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.pipelines_fixtures import tiny_pipeline_dir

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "pipeline.py"
ROWS = [("bf16", "quantserve"), ("bf16", "diffusers"), ("quanto-int8", "quantserve"), ("quanto-int8", "diffusers")]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_tiny_run_writes_the_table_rows_and_goals(tmp_path):
    out = tmp_path / "pipeline.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_pipeline_dir("flux")), "--schemes", "bf16,quanto-int8",
         "--size", "32", "--steps", "1", "--repeats", "1", "--max-sequence-length", "16", "--out", str(out),
         "--json"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[pipeline] [4/4] quanto-int8 via diffusers" in done.stderr  # progress lines

    doc = json.loads(done.stdout)
    rows = {(r["scheme"], r["via"]): r for r in doc["rows"]}
    assert list(rows) == ROWS
    for key, row in rows.items():
        assert "error" not in row, (key, row.get("error"))
        assert row["latency_s"] > 0 and row["load_s"] > 0 and len(row["latencies_s"]) == 1
        assert row["gen_peak_over_baseline_mib"] >= 0 and row["process_peak_rss_mib"] > row["baseline_rss_mib"]
        assert set(row["components"]) == {"transformer", "text_encoder_2", "text_encoder", "vae"}
    # quanto int8 really shrinks transformer + T5, through both loaders
    for via in ("quantserve", "diffusers"):
        assert rows[("quanto-int8", via)]["quantized_ratio"] < 0.8 < rows[("bf16", via)]["quantized_ratio"]
    assert rows[("bf16", "diffusers")]["image_diff_vs_ref"] == 0.0  # the reference image is diffusers' bf16 one
    assert rows[("quanto-int8", "quantserve")]["latency_vs_diffusers"] > 0

    text = out.read_text()
    assert "32x32, 1 step, max_sequence_length 16 (lowered from FLUX's 512)" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| scheme | via | load s"))
    columns = _cells(lines[header])
    assert columns[:7] == ["scheme", "via", "load s", "load peak MiB", "gen peak MiB", "RSS bound MiB", "latency s"]
    table = [_cells(line) for line in lines[header + 2: header + 2 + len(ROWS)]]
    assert [(c[0], c[1]) for c in table] == ROWS
    for cells in table:
        assert len(cells) == len(columns)
        for name, cell in zip(columns[2:], cells[2:]):
            if cell == "-":  # only diffusers' rows lack a 'vs diffusers' figure
                assert name == "vs diffusers" and cells[1] == "diffusers"
                continue
            assert re.fullmatch(r"\d+(\.\d+)?x?", cell), (name, cell)

    assert "Where the time goes" in text and "| bf16 | quantserve |" in text
    goals = text.split("Goals:")[1]
    assert "bf16: quantserve no slower than diffusers" in goals
    assert "quanto-int8: quantserve no slower than diffusers" in goals
    assert "quanto-int8: peak RSS during load within the bound" in goals
    assert "quanto-int8: peak RSS during generation within the bound" in goals
    assert goals.count("**met**") + goals.count("**NOT met**") == 6  # 2 latency + 2 load RSS + 2 generation RSS

    # the report renders again from the JSON alone, measuring nothing
    (tmp_path / "run.json").write_text(done.stdout)
    again = tmp_path / "again.md"
    redone = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(tmp_path / "run.json"),
                             "--out", str(again)], capture_output=True, text=True, timeout=120)
    assert redone.returncode == 0, redone.stderr[-3000:]
    assert "fresh process" not in redone.stderr
    assert again.read_text().split("| scheme | via | load s")[1] == text.split("| scheme | via | load s")[1]


def test_bad_scheme_names_the_accepted_ones(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--schemes", "nf5", "--out", str(tmp_path / "x.md")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "nf5" in done.stderr and "nf4" in done.stderr
    assert not (tmp_path / "x.md").exists()
