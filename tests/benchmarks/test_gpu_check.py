"""benchmarks/gpu_check.sh rehearsed on the CPU (TRITON_INTERPRET=1, tiny shapes), so its first GPU run does not die
of a typo: every step runs and the RESULTS.md rows come out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    return {**env, "PYTHON": sys.executable, **extra}


def test_rehearsal_runs_every_step(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--rehearse"], capture_output=True, text=True, timeout=300,
                          env=_env(OUT=str(tmp_path)), cwd=tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    for step in ("=== wheels", "=== device", "=== Triton kernel tests", "=== schemes whose backend runs here",
                 "=== kernel benchmark", "=== RESULTS.md rows",
                 "=== Triton cache prefilled ahead of time, then found by the GPU"):
        assert step in done.stdout, (step, log[-3000:])
    assert "GPU: CPU rehearsal (TRITON_INTERPRET=1)" in done.stdout
    assert "benchmarked: nf4,gguf-q4_k" in done.stdout
    assert "passed" in (tmp_path / "tests.log").read_text()
    rows = (tmp_path / "results_rows.md").read_text()
    assert rows.startswith("### Kernels on CPU rehearsal (TRITON_INTERPRET=1)")
    assert "| nf4 |" in rows and "| gguf-q4_k |" in rows
    # the prefill step compiles for sm_90 here (no GPU needed); the GPU launch half needs the GPU
    assert "sm_90 int8_rows_bnb:" in done.stdout and "prefill: exit 0," in done.stdout
    assert "gpu_check: OK on CPU rehearsal" in done.stdout


def test_without_a_gpu_and_without_rehearse_it_says_so():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 3
    assert "no CUDA device (run with --rehearse on a CPU)" in done.stderr


def test_unknown_argument_is_refused():
    done = subprocess.run(["bash", str(SCRIPT), "--rehersal"], capture_output=True, text=True, timeout=30, env=_env())
    assert done.returncode == 2 and "--rehersal" in done.stderr and "--rehearse" in done.stderr
