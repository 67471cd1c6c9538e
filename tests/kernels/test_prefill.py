"""Triton's cache filled ahead of time for a GPU target, on this machine without one (quantserve.kernels.prefill).

The compiles run in fresh interpreters (the kernels compiled, not interpreted) into a private TRITON_CACHE_DIR, through
Triton's own launcher in warm-up mode: a second prefill of the same launches finds every compile in the cache and
adds nothing. (That a GPU's launch finds them too is what benchmarks/gpu_check.sh checks on a GPU.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from quantserve.kernels import prefill

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(code: str, cache) -> dict:
    out = subprocess.run([sys.executable, "-c", code], env={**ENV, "TRITON_CACHE_DIR": str(cache)}, check=True,
                         capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


WARM = """
import json, time
from quantserve.kernels import aot, prefill
packed = aot.packed_format("int8_rows_bnb", 256)
start = time.perf_counter()
n = prefill.warm_packed(packed, "sm_90", ms=(1, 16, 64))
print(json.dumps({"compiles": n, "seconds": time.perf_counter() - start}))
"""


def test_prefill_compiles_each_launch_once_and_a_second_run_finds_them_all(tmp_path):
    cache = tmp_path / "triton"
    first = _run(WARM, cache)
    entries = sorted(p.name for p in cache.iterdir())
    # M = 1 and 16 take split-K (+ reduce), 64 the tiled kernel; every config within the budget, plus dequantize
    assert first["compiles"] >= 10 and len(entries) >= 10
    second = _run(WARM, cache)
    assert second["compiles"] == first["compiles"]
    assert sorted(p.name for p in cache.iterdir()) == entries, "nothing new compiled: every launch hit the cache"
    assert second["seconds"] < first["seconds"]


def test_model_layers_prefill_for_a_target(tmp_path):
    """`quantserve autotune --triton-targets` prefills the formats of a model's own layers."""
    code = """
import json, torch
from quantserve.runtime.config import GGUFQuantizationConfig
from quantserve.runtime.backends.base import backend_for
from quantserve.runtime.quant_linear import QuantLinear
from quantserve.runtime.autotune import prefill_triton
backend = backend_for(GGUFQuantizationConfig(compute_dtype=torch.bfloat16), torch.bfloat16, gguf_type="Q8_0")
w = torch.randn(64, 256)
model = torch.nn.Sequential(QuantLinear(backend.quantize("0", w), torch.zeros(64, dtype=torch.bfloat16),
                                        torch.bfloat16))
print(json.dumps(prefill_triton(model, [1], ["sm_80"])))
"""
    made = _run(code, tmp_path / "triton")
    assert made["sm_80"] >= 3  # split-K configs kept for N = 64, K = 256, the reduce kernel, dequantize
    assert len(list((tmp_path / "triton").iterdir())) >= 3


def test_prefill_rejects_unknown_targets_and_formats():
    with pytest.raises(ValueError, match="targets: unknown sm_70; accepted: sm_80"):
        prefill.prefill(["sm_70"], ["nf4"], progress=False)
    with pytest.raises(ValueError, match="formats: unknown nf5; accepted: nf4"):
        prefill.prefill(["sm_90"], ["nf5"], progress=False)


def test_prefill_refuses_interpreted_kernels():
    """Kernels imported under the interpreter (TRITON_INTERPRET=1) have nothing to compile: a clear error."""
    code = ("import os\nos.environ['TRITON_INTERPRET'] = '1'\nfrom quantserve.kernels import aot, prefill\n"
            "prefill.warm_packed(aot.packed_format('nf4', 64), 'sm_90')\n")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "TRITON_INTERPRET=1; prefill compiles them for a GPU, so run it without TRITON_INTERPRET" in out.stderr
