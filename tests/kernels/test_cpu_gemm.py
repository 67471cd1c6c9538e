"""The fused dequantize-GEMM of the native CPU kernels (csrc/qs_gemm.c, `cpu.linear(path="gemm")`) against the torch
reference, every packed format, each matmul path forced in turn ($QUANTSERVE_CPU_GEMM: amx, avx512bf16, portable).

The bound is the one tests/kernels/test_cpu_kernels.py holds the fused GEMV to: one rounding of the output dtype plus
float32 accumulation error over K terms, against a float64 product of the reference's weights, plus one rounding of
each weight to bf16 where the bf16 paths multiply bf16 weights (or factor a row scale out of the sum). Where a bf16
path decodes with a 4-bit table, Q4_0/Q4_K or Q8_0, its weights are the reference's weights rounded to bf16 exactly,
so it is also held to the product of R.dequantize(packed, bf16) with no weight allowance at all.

Shapes: the shared ragged cases (N = 17 or 48: not a multiple of the 16-row tiles or 64-row panels; K = 45, 50, 66:
not a multiple of 32, decoded by the generic decoder with zero padding), and cases the direct chunk decoders take
(K a multiple of 64 or 256, one and two groups per 64 columns, N = 33 or 70), at M = 5, 17 (one over an AMX tile) and 64.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantserve.kernels import cpu, cpu_build
from quantserve.kernels import reference as R
from quantserve.kernels.int4 import quantize_int4_grouped

from .packed_cases import CASES, _gen, bnb, fp8, gguf_blocks, int4_blocks, int8_rows, quanto, nvfp4

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")

# cases the direct bf16 chunk decoders take, and the decoder each must get on a bf16 path
CHUNKED = {
    "nf4_k128": (lambda: bnb(70, 128, 64, False), "4-bit table"),
    "nf4_double_quant_k256": (lambda: bnb(33, 256, 32, True), "4-bit table"),
    "nf4_block256_f16": (lambda: bnb(33, 512, 256, True, dtype=torch.float16), "4-bit table"),
    "fp4_block128_f32": (lambda: bnb(33, 256, 128, False, quant_type="fp4", dtype=torch.float32), "4-bit table"),
    "int4_torchao_g32": (lambda: quantize_int4_grouped(torch.randn(33, 128, generator=_gen(1)) * 0.02, 32),
                         "4-bit table"),
    "int4_torchao_g128": (lambda: quantize_int4_grouped(torch.randn(70, 256, generator=_gen(2)) * 0.02, 128),
                          "4-bit table"),
    "int4_blocks_b32": (lambda: int4_blocks(33, 128, 32), "4-bit table"),
    "int4_blocks_b128": (lambda: int4_blocks(33, 256, 128), "4-bit table"),
    "int8_rows_bnb_k64": (lambda: int8_rows(70, 64, "bnb"), "int8 rows"),
    "int8_rows_torchao_k96": (lambda: int8_rows(33, 96, "torchao"), "int8 rows"),
    "float8_e4m3_rows_k64": (lambda: fp8(33, 64, torch.float8_e4m3fn, True), "float8"),
    "float8_e5m2_tensor_k96": (lambda: fp8(33, 96, torch.float8_e5m2, False), "float8"),
    "gguf_Q4_0_k96": (lambda: gguf_blocks(70, 96, "Q4_0"), "gguf Q4_0"),
    "gguf_Q8_0_k64": (lambda: gguf_blocks(33, 64, "Q8_0"), "gguf Q8_0"),
    "gguf_Q4_K_k512": (lambda: gguf_blocks(33, 512, "Q4_K"), "gguf Q4_K"),
    "quanto_int4_k128": (lambda: quanto(33, 128, 64, 4), "generic"),
    "nvfp4_k64": (lambda: nvfp4(33, 64), "generic"),
}
ALL = {**{name: make for name, make in CASES.items()}, **{name: make for name, (make, _) in CHUNKED.items()}}
PATHS = ("amx", "avx512bf16", "portable")
EXACT_BF16 = ("4-bit table", "gguf Q4_0", "gguf Q4_K", "gguf Q8_0", "generic")  # weights = reference bf16 weights


@pytest.fixture(scope="module")
def packed_weights():
    built = {}

    def get(name):
        if name not in built:
            with torch._dynamo.config.patch(disable=True):
                built[name] = ALL[name]()
        return built[name]

    return get


@pytest.fixture(params=PATHS)
def gemm_path(request, monkeypatch):
    """Force one matmul path; skip where this CPU or build cannot run it."""
    if not cpu.gemm_available(request.param):
        pytest.skip(f"this CPU or build cannot run the {request.param} GEMM")
    monkeypatch.setenv(cpu.GEMM_ENV, request.param)
    return request.param


def _bound_check(packed, x, bias, y, weight_rounding: bool):
    n, k = packed.shape
    w = R.dequantize(packed, torch.float32).double()
    x64 = x.reshape(-1, k).double()
    exact = x64 @ w.T + (bias.double() if bias is not None else 0.0)
    magnitude = x64.abs() @ w.abs().T
    bound = torch.finfo(x.dtype).eps * exact.abs() + 2 * k * torch.finfo(torch.float32).eps * magnitude + 1e-30
    if weight_rounding:
        bound = bound + 2 * torch.finfo(torch.bfloat16).eps * magnitude
    diff = (y.reshape(-1, n).double() - exact).abs()
    assert (diff <= bound).all(), f"max excess {float((diff - bound).max()):.3g}"
    ref = R.linear(x, packed, bias)  # and it agrees with the torch reference path
    relative = (y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
    allowed = 2 * torch.finfo(x.dtype).eps + 1e-5 + (2 * torch.finfo(torch.bfloat16).eps if weight_rounding else 0.0)
    assert float(relative) < allowed


@pytest.mark.parametrize("name", list(ALL))
def test_gemm_matches_the_reference(name, gemm_path, packed_weights):
    packed = packed_weights(name)
    n, k = packed.shape
    g = _gen(len(name) + 100)
    bf16_path = gemm_path != "portable"
    decoder = cpu.gemm_decoder(packed)
    if not bf16_path:
        assert decoder == "generic"  # float32 weights: the dequantizer's row decoders
    elif name in CHUNKED:
        assert decoder == CHUNKED[name][1], (name, decoder)
    for m in (5, 17, 64):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        bias = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16) if m != 17 else None
        y = cpu.linear(x, packed, bias, path="gemm")
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        _bound_check(packed, x, bias, y, weight_rounding=bf16_path or getattr(packed, "dtype", None) is not None)
        if bf16_path and decoder in EXACT_BF16:
            # the panel holds exactly the reference's bf16 weights: only accumulation and output rounding remain
            wb = R.dequantize(packed, torch.bfloat16).double()
            exact = x.double() @ wb.T + (bias.double() if bias is not None else 0.0)
            bound = (torch.finfo(torch.bfloat16).eps * exact.abs()
                     + 2 * k * torch.finfo(torch.float32).eps * (x.double().abs() @ wb.abs().T) + 1e-30)
            assert ((y.double() - exact).abs() <= bound).all(), name
    # float32 and float16 activations run the portable path whatever is forced (a bf16 product would lose them)
    x = torch.randn(5, k, generator=g)
    for dtype in (torch.float32, torch.float16):
        y = cpu.linear(x.to(dtype), packed, None, path="gemm")
        assert y.dtype == dtype
        _bound_check(packed, x.to(dtype), None, y, weight_rounding=False)


def test_paths_follow_the_environment(monkeypatch, packed_weights):
    monkeypatch.delenv(cpu.GEMM_ENV, raising=False)
    best = cpu.gemm_path(torch.bfloat16)
    lib = cpu_build.library()
    expected = ("amx" if cpu.gemm_available("amx") else "avx512bf16" if cpu.gemm_available("avx512bf16")
                else "portable")
    assert best == expected
    assert cpu.gemm_path(torch.float32) == "portable" and cpu.gemm_path(torch.float16) == "portable"
    assert cpu.gemm_available("portable") and cpu.gemm_available("auto")
    if lib.qs_isa().decode() != "avx512":  # pragma: no cover - the CI machines have AVX-512
        assert best == "portable"
    monkeypatch.setenv(cpu.GEMM_ENV, "portable")
    assert cpu.gemm_path(torch.bfloat16) == "portable"
    monkeypatch.setenv(cpu.GEMM_ENV, "fastest")
    with pytest.raises(ValueError, match="QUANTSERVE_CPU_GEMM.*'fastest'; accepted"):
        cpu.gemm_path()
    with pytest.raises(ValueError, match="gemm path: 'sse'"):
        cpu.gemm_available("sse")
    for name in PATHS:
        if not cpu.gemm_available(name):
            monkeypatch.setenv(cpu.GEMM_ENV, name)
            with pytest.raises(cpu.CpuKernelsUnavailable, match=f"{name}: this CPU or build cannot run"):
                cpu.linear(torch.zeros(5, 80, dtype=torch.bfloat16), packed_weights("nf4"), path="gemm")


def test_the_three_paths_agree(packed_weights, monkeypatch):
    """Forced in turn on the same inputs: the bf16 paths to float32 rounding of each other, the portable one within
    the bf16 weight rounding."""
    packed = packed_weights("nf4_k128")
    x = torch.randn(20, 128, generator=_gen(7)).to(torch.bfloat16)
    results = {}
    for name in PATHS:
        if cpu.gemm_available(name):
            monkeypatch.setenv(cpu.GEMM_ENV, name)
            results[name] = cpu.linear(x, packed, path="gemm").double()
    assert "portable" in results
    if "amx" in results and "avx512bf16" in results:
        assert float((results["amx"] - results["avx512bf16"]).abs().max()) <= 2 ** -7 * float(results["amx"].abs().max())
    for name, y in results.items():
        assert float((y - results["portable"]).norm() / results["portable"].norm()) < 2e-2, name


def test_auto_runs_the_gemm_between_the_gemv_and_the_slabs(packed_weights, monkeypatch):
    monkeypatch.delenv(cpu.GEMM_ENV, raising=False)
    amx = cpu.gemm_path() == "amx"
    g = _gen(8)
    for name, small in (("gguf_Q4_K_k512", "gemm"), ("nvfp4_k64", "gemv")):  # a chunk decoder; the generic one
        packed = packed_weights(name)
        n, k = packed.shape
        bias = torch.randn(n, generator=g).to(torch.bfloat16)
        for m, path in ((1, "gemv"), (2, small), (cpu.GEMV_MAX_M, small), (cpu.GEMV_MAX_M + 1, "gemm"),
                        (cpu.GEMM_MAX_M, "gemm"), (cpu.GEMM_MAX_M + 1, "slab")):
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            if not amx:  # without AMX, auto keeps the GEMV and the slabs
                path = "gemv" if m <= cpu.GEMV_MAX_M else "slab"
            assert torch.equal(cpu.linear(x, packed, bias), cpu.linear(x, packed, bias, path=path)), (name, m, path)
        x = torch.randn(3, 6, k, generator=g).to(torch.bfloat16)  # leading dims: 18 rows
        expected = cpu.linear(x.reshape(18, k), packed, bias, path="gemm" if amx else "slab").reshape(3, 6, n)
        assert torch.equal(cpu.linear(x, packed, bias), expected)
        # float32 activations never take the bf16 GEMM
        x = torch.randn(9, k, generator=g)
        assert torch.equal(cpu.linear(x, packed, None), cpu.linear(x, packed, None, path="slab"))
    monkeypatch.setenv(cpu.GEMM_ENV, "portable")  # a forced portable GEMM: auto as without AMX
    x = torch.randn(9, 512, generator=g).to(torch.bfloat16)
    packed = packed_weights("gguf_Q4_K_k512")
    assert torch.equal(cpu.linear(x, packed), cpu.linear(x, packed, path="slab"))


def test_more_rows_than_one_call_takes_and_strided_inputs(packed_weights):
    packed = packed_weights("nf4_k128")
    g = _gen(9)
    x = torch.randn(cpu.GEMM_LIMIT_M + 37, 128, generator=g).to(torch.bfloat16)  # two calls of the C kernel
    y = cpu.linear(x, packed, None, path="gemm")
    _bound_check(packed, x, None, y, weight_rounding=True)
    wide = torch.randn(128, 7, generator=g).to(torch.bfloat16)
    assert torch.equal(cpu.linear(wide.t(), packed, path="gemm"), cpu.linear(wide.t().contiguous(), packed, path="gemm"))
    assert cpu.linear(torch.zeros(0, 128, dtype=torch.bfloat16), packed, path="gemm").shape == (0, 70)


# --- as a router candidate --------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["nf4", "int8wo", "int4wo", "gguf-q4_k"])
def test_the_router_times_and_runs_the_gemm_candidate(scheme, tmp_path):
    from quantserve.runtime import kernel_candidates as kc
    from quantserve.runtime.autotune import tune_layer
    from quantserve.runtime.loader import load_model
    from quantserve.runtime.quant_linear import reference_kernel
    from quantserve.runtime.router import quant_layers

    from ..runtime.tiny_models import save_tiny

    if scheme.startswith("gguf-"):
        pytest.importorskip("gguf")
    model = load_model(save_tiny("dit", tmp_path / "dit"), scheme)
    layers = list(quant_layers(model))
    assert layers
    name, layer = layers[0]
    ok, why = kc.can_run_cpu(layer, torch.device("cpu"))
    assert ok, why
    result = tune_layer(layer, name, 16, torch.device("cpu"))
    assert kc.CPU_GEMM in result.timings_ms and kc.CPU_GEMM not in result.rejected, result.rejected
    with torch.no_grad():
        for _, layer in layers[:3]:
            for m in (5, 17, 64):
                x = torch.randn(m, layer.in_features, generator=_gen(m)).to(torch.bfloat16)
                expected = reference_kernel(x, layer.qweight, layer.bias).double()
                got = kc.cpu_gemm_kernel(x, layer.qweight, layer.bias).double()
                assert float((got - expected).norm() / expected.norm()) < 1e-2, (name, m)


# --- builds without AMX, without AVX-512 ------------------------------------------------------------------------

def test_a_build_without_avx512_computes_right(tmp_path):
    """The library built for an AVX2 CPU (no AVX-512, no AMX): the GEMM runs its portable path and every format
    still matches the reference."""
    if os.uname().machine != "x86_64":
        pytest.skip("x86-64 flags")  # pragma: no cover - the CI machines are x86-64
    code = (
        "import torch\n"
        "from quantserve.kernels import cpu, reference as R\n"
        "from tests.kernels.test_cpu_gemm import ALL\n"
        "assert cpu.gemm_path() == 'portable', cpu.gemm_path()\n"
        "assert not cpu.gemm_available('amx') and not cpu.gemm_available('avx512bf16')\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for name, make in ALL.items():\n"
        "    with torch._dynamo.config.patch(disable=True):\n"
        "        p = make()\n"
        "    x = torch.randn(17, p.shape[1], generator=g).to(torch.bfloat16)\n"
        "    y, ref = cpu.linear(x, p, path='gemm').double(), R.linear(x, p).double()\n"
        "    assert float((y - ref).norm() / ref.norm()) < 1e-2, name\n"
        "print('ok')\n"
    )
    env = dict(os.environ, QUANTSERVE_CPU_CFLAGS="-march=x86-64-v3", QUANTSERVE_CACHE_DIR=str(tmp_path / "c"))
    env.pop(cpu.GEMM_ENV, None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(Path(__file__).resolve().parents[2]))
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("flags", ["-mno-amx-tile -mno-amx-bf16 -mno-amx-int8",
                                   "-mno-amx-tile -mno-amx-bf16 -mno-amx-int8 -mno-avx512bf16",
                                   "-mno-avx512bf16"])
def test_qs_gemm_compiles_cleanly_for_cpus_without_amx_or_avx512_bf16(flags, tmp_path):
    """qs_gemm.c for an AVX-512 CPU without AMX (AMD Zen 4), without AMX or AVX512-BF16 (Skylake-X, Ice Lake), and
    with AMX but no AVX512-BF16: it compiles with no warning (an undeclared function would be a missing symbol at
    load). The paths themselves run on this machine, each forced in turn, in the tests above."""
    if os.uname().machine != "x86_64":
        pytest.skip("x86-64 flags")  # pragma: no cover - the CI machines are x86-64
    cmd = [cpu_build.compiler(), *cpu_build.FLAGS, *flags.split(), "-Werror", "-c", "-I", str(cpu_build.SOURCE_DIR),
           "-o", str(tmp_path / "qs_gemm.o"), str(cpu_build.SOURCE_DIR / "qs_gemm.c")]
    cmd.remove("-shared")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
