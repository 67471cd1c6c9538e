"""benchmarks/kernels_cpu.py runs end to end (tiny shapes) and writes the tables it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_both_tables(tmp_path):
    out = tmp_path / "kernels_cpu.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels_cpu.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    for scheme in ("nf4", "int8wo", "gguf-q4_k"):
        assert f"| {scheme} |" in table
    assert "router's choice" in table and "Goals:" in table
    assert "Dequantize a 64x256 weight" in table and "| nf4 | nf4 |" in table
    # every linear row names a winner that the autotuner timed
    rows = [line for line in table.splitlines() if "| 64x256 |" in line]
    assert len(rows) == 3 * 2, rows  # three schemes at M = 1 and 20
    assert all(any(c in line for c in ("| cpu_fused |", "| cpu_gemm |", "| cpu_dequant |", "| native |",
                                       "| reference |"))
               for line in rows)


def test_bad_scheme_names_the_accepted_ones():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels_cpu.py"), "--schemes", "nf5"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "nf5" in done.stderr and "nf4" in done.stderr
