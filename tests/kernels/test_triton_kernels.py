"""quantserve's Triton kernels against the torch reference: dequantization and fused dequantize-matmul, every format.

Without a GPU the kernels run in Triton's interpreter (tests/kernels/conftest.py imports them with
TRITON_INTERPRET=1); with CUDA the same tests run compiled. Shapes are small and ragged (odd N, K not a multiple
of the tile where the format allows); outputs are poisoned with NaN first, so an element a kernel leaves unwritten
fails. Tolerances follow the arithmetic: a dequantized value may differ from the reference by one rounding of the
output dtype (a GPU may fuse a multiply-add); a matmul output by one rounding of the output dtype plus float32
accumulation error over K terms, measured against a float64 product of the same rounded operands.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from quantserve.kernels import api
from quantserve.kernels import reference as R
from quantserve.kernels.gguf import BLOCK_SIZES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")


from .packed_cases import CASES, _gen, build

FUSED = ["nf4", "nf4_double_quant", "nf4_odd_k", "fp4_block128", "int8_rows_bnb", "int8_rows_torchao",
         "float8_e4m3_rows", "float8_e5m2_tensor", "int4_torchao", "quanto_int4", "quanto_int2", "nvfp4",
         "int4_blocks",
         "gguf_Q4_0", "gguf_Q8_0", "gguf_Q4_K", "gguf_Q6_K"]


@pytest.fixture(scope="module")
def packed_weights():
    built = {}

    def get(name):
        if name not in built:
            built[name] = _to_device(build(name))
        return built[name]

    return get


def _to_device(packed):
    if DEVICE.type == "cpu":
        return packed
    import dataclasses

    fields = {f.name: getattr(packed, f.name) for f in dataclasses.fields(packed)}
    return type(packed)(**{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in fields.items()})


def _ulp_bound(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One rounding step of `dtype` at each value, plus float32 rounding of the largest value (a fused multiply-add
    on a GPU may round a product once less than torch does)."""
    return torch.finfo(dtype).eps * ref.abs() + 4 * torch.finfo(torch.float32).eps * ref.abs().max()


def _poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


# --- where the kernels run -------------------------------------------------------------------------------------

def test_kernels_are_interpreted_without_a_gpu_and_the_flag_does_not_leak():
    from quantserve.kernels import triton_tiles

    assert triton_tiles.INTERPRETED == (not torch.cuda.is_available())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter")
def test_triton_problem_reads_the_interpreter_flag_at_call_time(monkeypatch):
    """Without a GPU the Triton kernels run on the CPU only while TRITON_INTERPRET=1 is set; each answer names why."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert api.triton_problem("cpu") == "triton needs a CUDA device (TRITON_INTERPRET=1 runs it on the CPU for tests)"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert api.triton_problem("cpu") == "triton needs a CUDA device (TRITON_INTERPRET=1 runs it on the CPU for tests)"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert api.triton_problem("cpu") is None
    assert api.triton_problem("cpu", _int8_rows()) is None
    # the kernels were imported interpreted (tests/kernels/conftest.py): they do not run compiled on a GPU
    assert api.triton_problem("cuda") == ("quantserve's Triton kernels were imported with TRITON_INTERPRET=1 "
                                          "(CPU interpreter)")


def _int8_rows():
    return api.pack_int8_rows(torch.randint(-127, 128, (3, 8), dtype=torch.int8), torch.rand(3) + 0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter")
def test_kernels_run_interpreted_when_triton_was_imported_first():
    """Other libraries often import Triton before the flag is set (so Triton's own @jit functions are compiled-only);
    the kernels must not depend on those."""
    code = (
        "import triton, triton.language, os, torch\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from quantserve.kernels import api, reference, triton_dequant, triton_matmul\n"
        "del os.environ['TRITON_INTERPRET']\n"
        "p = api.pack_int8_rows(torch.randint(-127, 128, (17, 40), dtype=torch.int8), torch.rand(17) + 0.1, "
        "divisor=127.0)\n"
        "for m in (1, 3, 20):\n"
        "    x = torch.randn(m, 40).bfloat16()\n"
        "    y = triton_matmul.linear(x, p, split_k=2).float()\n"
        "    assert torch.allclose(y, reference.linear(x, p).float(), rtol=2e-2, atol=1e-2), m\n"
        "assert torch.equal(triton_dequant.dequantize(p, torch.float32), reference.dequantize(p))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env=env)


# --- dequantization --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_dequantize_matches_the_reference(name, packed_weights):
    from quantserve.kernels import triton_dequant

    packed = packed_weights(name)
    n, k = packed.shape
    # every format in bf16; fp16 and fp32 in turn, so each output cast is covered across formats
    for dtype in (torch.bfloat16, (torch.float16, torch.float32)[len(name) % 2]):
        out = _poisoned((n, k), dtype)
        got = triton_dequant.dequantize(packed, dtype, out=out)
        assert got is out and not got.isnan().any(), "every element written"
        ref = R.dequantize(packed, dtype)
        diff = (got.float() - ref.float()).abs()
        assert (diff <= _ulp_bound(ref.float(), dtype)).all(), f"{dtype}: max difference {float(diff.max()):.3g}"


@pytest.mark.parametrize("name", ["nf4_double_quant", "fp4_block128", "nvfp4", "int4_blocks", "int4_torchao",
                                  "quanto_int4", "gguf_Q4_0", "gguf_Q2_K", "gguf_Q3_K", "gguf_Q4_K",
                                  "gguf_Q5_K", "gguf_Q6_K", "gguf_IQ4_XS"])
@pytest.mark.parametrize("block_k", [64, 128])
def test_wide_tiles_spread_per_group_scales(name, block_k, packed_weights):
    """The GPU's tiles are wider than the interpreter's one config (BLOCK_K 32): a tile then covers several scale
    groups, loaded once per group and spread (triton_common.spread). Launch the dequantize skeleton directly with
    wider tiles and check every element against the reference."""
    import triton

    from quantserve.kernels import triton_dequant
    from quantserve.kernels.triton_args import tile_args

    packed = packed_weights(name)
    n, k = packed.shape
    args = tile_args(packed)
    out = _poisoned((n, k), torch.float32)
    grid = (triton.cdiv(n, 16), triton.cdiv(k, block_k))
    triton_dequant._dequant_kernel.fn[grid](out, out.stride(0), N=n, K=k, BLOCK_N=16, BLOCK_K=block_k,
                                            **args.kwargs())
    ref = R.dequantize(packed, torch.float32)
    assert not out.isnan().any()
    assert (out - ref).abs().max() <= _ulp_bound(ref, torch.float32).max(), name


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_codes_decode_by_integer_arithmetic_as_on_sm_80(dtype):
    """Below compute capability 8.9 there is no float8 conversion: the kernels read the codes as bytes and decode
    them by bit arithmetic. All 256 codes (NaN and inf included) against torch's conversion, bit for bit, and a
    matmul through the same path."""
    from quantserve.kernels import triton_dequant, triton_matmul
    from quantserve.kernels.triton_args import float8_by_bits, tile_args

    assert float8_by_bits((8, 0)) and float8_by_bits((8, 6)) and not float8_by_bits((8, 9))
    assert not float8_by_bits((9, 0)) and not float8_by_bits(None)
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).reshape(8, 32)
    packed = api.pack_fp8(codes.to(DEVICE), torch.ones(8, device=DEVICE))
    args = tile_args(packed, capability=(8, 0))
    assert args.consts[1] == (1 if dtype == torch.float8_e4m3fn else 2) and args.ptrs[0].dtype == torch.uint8
    assert tile_args(packed, capability=(9, 0)).consts[1] == 0
    out = _poisoned((8, 32), torch.float32)
    triton_dequant._dequant_kernel.fn[(1, 1)](out, out.stride(0), N=8, K=32, BLOCK_N=8, BLOCK_K=32,
                                              **args.kwargs())
    want = codes.float()
    assert torch.equal(out.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(out[finite].view(torch.int32), want[finite].to(DEVICE).view(torch.int32))


def test_nvfp4_block_scales_decode_by_integer_arithmetic_as_on_sm_80(packed_weights):
    from quantserve.kernels import triton_dequant
    from quantserve.kernels.triton_args import tile_args

    packed = packed_weights("nvfp4")
    n, k = packed.shape
    args = tile_args(packed, capability=(8, 0))
    assert args.consts[1] == 1 and args.ptrs[1].dtype == torch.uint8
    out = _poisoned((n, k), torch.float32)
    triton_dequant._dequant_kernel.fn[(2, 2)](out, out.stride(0), N=n, K=k, BLOCK_N=16, BLOCK_K=32,
                                              **args.kwargs())
    assert torch.equal(out, R.dequantize(packed, torch.float32).to(DEVICE))


# --- fused dequantize-matmul -----------------------------------------------------------------------------------

def _check_linear(packed, m, x_dtype, bias, split_k=None, seed=0, x=None):
    from quantserve.kernels import triton_matmul

    n, k = packed.shape
    g = _gen(seed)
    if x is None:
        x = torch.randn(m, k, generator=g).to(x_dtype).to(DEVICE)
    b = (torch.randn(n, generator=g) * 0.1).to(x_dtype).to(DEVICE) if bias else None
    out = _poisoned((x.reshape(-1, k).shape[0], n), x_dtype)
    y = triton_matmul.linear(x, packed, b, out=out, split_k=split_k)
    assert y.dtype == x_dtype and y.shape == (*x.shape[:-1], n)
    assert not out.isnan().any(), "every element written"
    # the yardstick: the same rounded operands, multiplied in float64
    w = R.dequantize(packed, x_dtype).double()
    x64 = x.reshape(-1, k).double()
    exact = x64 @ w.T + (b.double() if b is not None else 0.0)
    accumulation = k * torch.finfo(torch.float32).eps * (x64.abs() @ w.abs().T)
    bound = torch.finfo(x_dtype).eps * exact.abs() + 2 * accumulation + 1e-30
    diff = (y.reshape(-1, n).double() - exact).abs()
    assert (diff <= bound).all(), f"max excess {float((diff - bound).max()):.3g}"
    ref = R.linear(x, packed, b)  # and it agrees with the torch reference path (to the bf16/fp16 rounding)
    relative = (y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
    assert float(relative) < 2 * torch.finfo(x_dtype).eps
    return y


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("path", ["splitk", "splitk_partials", "tiled"])
def test_fused_linear_matches_the_reference(name, path, packed_weights):
    packed = packed_weights(name)
    x_dtype = (torch.bfloat16, torch.float16)[(len(name) + len(path)) % 2]
    if path == "splitk":  # one K split: bias and cast in the same kernel
        _check_linear(packed, 1, x_dtype, bias=True, split_k=1)
    elif path == "splitk_partials":  # several K splits: float32 partials, then the reduction kernel
        _check_linear(packed, 5, x_dtype, bias=len(name) % 2 == 0, split_k=3)
    else:  # M > 16: the tiled kernel, ragged M
        _check_linear(packed, 20, x_dtype, bias=len(name) % 2 == 1)


def test_every_ggml_type_runs_fused(packed_weights):
    for qtype in BLOCK_SIZES:
        if f"gguf_{qtype}" not in FUSED:
            _check_linear(packed_weights(f"gguf_{qtype}"), 2, torch.bfloat16, bias=False, split_k=2)


def test_float32_activations_leading_dims_and_strided_inputs(packed_weights):
    packed = packed_weights("nf4")
    n, k = packed.shape
    _check_linear(packed, 3, torch.float32, bias=True)
    x = torch.randn(2, 9, k, generator=_gen(1)).to(torch.bfloat16).to(DEVICE)  # tiled, (B, T, K)
    _check_linear(packed, None, torch.bfloat16, bias=True, x=x)
    wide = torch.randn(k, 6, generator=_gen(2)).to(torch.float16).to(DEVICE)
    _check_linear(packed, None, torch.float16, bias=False, x=wide.t())  # a transposed view: x's K stride is 6


def test_the_public_api_runs_triton(packed_weights):
    packed = packed_weights("gguf_Q4_K")
    x = torch.randn(3, packed.shape[1], generator=_gen(3)).to(torch.bfloat16).to(DEVICE)
    y = api.linear(x, packed, impl="triton")
    torch.testing.assert_close(y, api.linear(x, packed), rtol=1e-2, atol=1e-2 * float(y.float().abs().max()))
    w = api.dequantize(packed, torch.float16, impl="triton")
    assert torch.equal(w, api.dequantize(packed, torch.float16)) or torch.cuda.is_available()


def test_empty_input_and_bad_arguments(packed_weights):
    from quantserve.kernels import triton_dequant, triton_matmul

    packed = packed_weights("int8_rows_bnb")
    n, k = packed.shape
    assert triton_matmul.linear(torch.zeros(0, k, dtype=torch.bfloat16, device=DEVICE), packed).shape == (0, n)
    with pytest.raises(ValueError, match=f"x has {k + 1} features .* the weight takes {k}"):
        triton_matmul.linear(torch.zeros(1, k + 1, dtype=torch.bfloat16, device=DEVICE), packed)
    with pytest.raises(ValueError, match="x dtype torch.int32"):
        triton_matmul.linear(torch.zeros(1, k, dtype=torch.int32, device=DEVICE), packed)
    with pytest.raises(ValueError, match=f"bias must hold {n} values"):
        triton_matmul.linear(torch.zeros(1, k, dtype=torch.bfloat16, device=DEVICE), packed,
                             torch.zeros(n + 1, device=DEVICE))
    with pytest.raises(ValueError, match=r"out must be a \(17, 50\) torch.float16"):
        triton_dequant.dequantize(packed, torch.float16, out=torch.empty(17, 49, dtype=torch.float16))
    with pytest.raises(ValueError, match="dtype torch.int8; accepted"):
        triton_dequant.dequantize(packed, torch.int8)


def test_split_k_choice_fills_the_device():
    from quantserve.kernels.triton_matmul import SPLITK_K_UNIT, pick_split_k

    assert pick_split_k(1, 64, 64, torch.device("cpu")) == min(2, -(-64 // SPLITK_K_UNIT))
    assert pick_split_k(1, 3072, 3072, torch.device("cpu")) == 1  # plenty of N tiles already
    assert 1 <= pick_split_k(1, 64, 10**6, torch.device("cpu")) <= 64


# --- the router ------------------------------------------------------------------------------------------------

@pytest.fixture
def router_state():
    """The router's candidates as they were before the test (this module registers the Triton ones)."""
    from quantserve.runtime import router
    from quantserve.runtime.candidates import scoped_candidate

    with scoped_candidate():
        yield router


@pytest.fixture(scope="module")
def nf4_model(tmp_path_factory):
    from quantserve.runtime.loader import load_model

    from ..runtime.tiny_models import save_tiny

    folder = save_tiny("dit", tmp_path_factory.mktemp("k") / "dit")
    return load_model(folder, "nf4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter's routing")
def test_router_offers_the_triton_kernels_where_triton_runs(nf4_model, router_state, monkeypatch, tmp_path):
    from quantserve.runtime import autotune as autotune_module
    from quantserve.runtime import kernel_candidates as kc
    from quantserve.runtime.autotune import TuneCache, autotune
    from quantserve.runtime.quant_linear import reference_kernel
    from quantserve.runtime.router import quant_layers, route

    kc.register()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    decisions = route(nf4_model, "cpu", m=4)
    assert all(d.kernel == kc.CPU_FUSED for d in decisions)
    assert decisions[0].rejected[kc.FUSED] == ("triton needs a CUDA device "
                                               "(TRITON_INTERPRET=1 runs it on the CPU for tests)")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    decisions = route(nf4_model, "cpu", m=4)
    assert decisions and all(d.runnable == [kc.FUSED, kc.CPU_FUSED, "native", kc.DEQUANT, kc.CPU_DEQUANT, kc.CPU_GEMM,
                                                 "reference"]
                             for d in decisions)
    assert all(d.kernel == kc.FUSED and "fixed preference" in d.reason for d in decisions)
    name, layer = next(iter(quant_layers(nf4_model)))
    with torch.no_grad():
        for m in (3, 20):  # split-K and tiled
            x = torch.randn(m, layer.in_features, generator=_gen(m)).to(torch.bfloat16)
            expected = reference_kernel(x, layer.qweight, layer.bias).float()
            for kernel in (kc.triton_fused_kernel, kc.triton_dequant_kernel):
                got = kernel(x, layer.qweight, layer.bias).float()
                assert float((got - expected).norm() / expected.norm()) < 1e-2, (name, kernel.__name__, m)
        # one timed run per candidate: this checks the machinery (the interpreter's timings mean nothing)
        real_time_kernel = autotune_module.time_kernel
        monkeypatch.setattr(autotune_module, "time_kernel",
                            lambda fn, device: real_time_kernel(fn, device, warmup=0, repeats=1))
        results = autotune(nf4_model, [2], device="cpu", cache=TuneCache(tmp_path / "autotune.json"))
    assert results and all({kc.FUSED, kc.DEQUANT} <= set(r.timings_ms) for r in results), \
        [(r.key, r.timings_ms, r.rejected) for r in results]
    with torch.no_grad():  # the model runs end to end on whatever the autotuner picked
        out = nf4_model(torch.randn(1, 1, 8, 8).to(torch.bfloat16), timestep=torch.tensor([1]),
                        class_labels=torch.tensor([3])).sample
    assert torch.isfinite(out.float()).all()


def test_formats_without_a_triton_kernel_say_so(router_state, monkeypatch):
    from quantserve.runtime import kernel_candidates as kc
    from quantserve.runtime.backends.base import QuantizedWeight
    from quantserve.runtime.backends.torchao import TorchAoWeight
    from quantserve.runtime.quant_linear import QuantLinear

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = QuantLinear(QuantizedWeight(4, 8, "torchao:int3_grouped_bitplanes"), None)
    ok, why = kc.can_run_triton(layer, DEVICE)
    assert not ok and why == "no Triton kernel for format torchao:int3_grouped_bitplanes"
    dynamic = QuantLinear(TorchAoWeight("torchao:float8_e4m3_tensor+dyn_float8", {"shape": [4, 8]}, {}), None)
    ok, why = kc.can_run_triton(dynamic, DEVICE)
    assert not ok and "weight-only" in why
    # every backend's weight class hands its own formats over (nf4/fp4, int8_rows, int4_grouped, quanto, torchao, ...)
    from quantserve.runtime.backends import bnb, gguf, modelopt, quanto, torchao
    assert all(cls._packed is not QuantizedWeight._packed
               for cls in (bnb.BnB4bitWeight, bnb.BnBInt8Weight, torchao.Int4GroupedWeight, torchao.TorchAoWeight,
                           quanto.QuantoWeight, modelopt.ModelOptWeight, gguf.GGUFWeight))
