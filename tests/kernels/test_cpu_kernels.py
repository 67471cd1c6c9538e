"""The native CPU kernels (kernels/csrc, through quantserve.kernels.cpu) against the torch reference, every format.

Dequantization must equal the reference bit for bit in float32, bfloat16 and float16 (the C decoders do the
reference's float32 operations in its order, with no fused multiply-add). The GEMV and the slab path are held to
the same bound as the Triton kernels: one rounding of the output dtype plus float32 accumulation error over K terms,
against a float64 product of the reference's rounded operands. Shapes are ragged: N = 17 is not a multiple of the
GEMV's 4-row tile, K = 45 and 66 leave SIMD tails, M = 5 leaves a short activation tile; M = 1 runs the
fused row dots, which factor each block's scale out of its sum.
"""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import pytest
import torch

from quantserve.kernels import api, cpu, cpu_build
from quantserve.kernels import reference as R
from quantserve.kernels.formats import FormatError

from .packed_cases import CASES, _gen, build

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def packed_weights():
    built = {}

    def get(name):
        if name not in built:
            built[name] = build(name)
        return built[name]

    return get


def test_the_library_builds_for_this_machine():
    lib = cpu_build.library()
    assert lib.qs_isa().decode() in ("avx512", "avx2", "scalar")
    assert cpu.problem() is None


@pytest.mark.parametrize("name", list(CASES))
def test_dequantize_is_bit_exact(name, packed_weights):
    packed = packed_weights(name)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = cpu.dequantize(packed, dtype)
        ref = R.dequantize(packed, dtype)
        assert got.dtype == dtype and got.shape == ref.shape
        assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           ref.view(torch.int16 if dtype != torch.float32 else torch.int32)), \
            f"{dtype}: {int((got != ref).sum())} values differ"
    assert torch.equal(api.dequantize(packed, torch.float32, impl="cpu"), R.dequantize(packed, torch.float32))
    out = torch.full(packed.shape, float("nan"), dtype=torch.bfloat16)
    assert cpu.dequantize(packed, torch.bfloat16, out=out) is out and torch.equal(out, R.dequantize(packed, torch.bfloat16))


def test_subnormal_weights_stay_subnormal():
    """Tiny scales make subnormal weights: kept exactly in float32, bf16 and fp16 as torch rounds them (a hardware
    convert that flushes them to zero would differ)."""
    g = _gen(13)
    cases = [api.pack_fp8((torch.randn(4, 64, generator=g) * 8).to(torch.float8_e4m3fn), torch.full((4,), 1e-41)),
             api.pack_int8_rows(torch.randint(-127, 128, (4, 64), dtype=torch.int8, generator=g),
                                torch.full((4,), 1e-40), divisor=127.0)]
    for packed in cases:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ref = R.dequantize(packed, dtype)
            assert (ref != 0).any() or dtype == torch.float16
            assert torch.equal(cpu.dequantize(packed, dtype), ref), dtype


def _check(packed, x, bias, path):
    n, k = packed.shape
    y = cpu.linear(x, packed, bias, path=path)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], n)
    # the GEMV multiplies the format's own values in float32; slabs are dequantized to x's dtype (as the reference)
    gemv = path == "gemv" or (path == "auto" and x.reshape(-1, k).shape[0] <= cpu.GEMV_MAX_M)
    w = R.dequantize(packed, torch.float32 if gemv else x.dtype).double()
    x64 = x.reshape(-1, k).double()
    exact = x64 @ w.T + (bias.double() if bias is not None else 0.0)
    accumulation = k * torch.finfo(torch.float32).eps * (x64.abs() @ w.abs().T)
    bound = torch.finfo(x.dtype).eps * exact.abs() + 2 * accumulation + 1e-30
    native = getattr(packed, "dtype", None)
    if gemv and native in (torch.bfloat16, torch.float16):
        # the M = 1 GEMV factors scales out of its sums: codes times x, exact, without rounding each weight to the
        # backend's dtype first (quanto rounds twice); allow those roundings
        bound = bound + 2 * torch.finfo(native).eps * (x64.abs() @ w.abs().T)
    diff = (y.reshape(-1, n).double() - exact).abs()
    assert (diff <= bound).all(), f"max excess {float((diff - bound).max()):.3g}"
    ref = R.linear(x, packed, bias)  # and it agrees with the torch reference path (to the bf16/fp16 rounding)
    relative = (y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
    allowed = 2 * torch.finfo(x.dtype).eps + 1e-5  # (float32 x: two summation orders over K)
    if gemv and native in (torch.bfloat16, torch.float16):
        allowed += 2 * torch.finfo(native).eps  # the reference rounds each weight to the backend's dtype
    assert float(relative) < allowed
    return y


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("path", ["gemv", "slab"])
def test_linear_matches_the_reference(name, path, packed_weights):
    packed = packed_weights(name)
    n, k = packed.shape
    g = _gen(len(name))
    x_dtype = (torch.bfloat16, torch.float16, torch.float32)[len(name) % 3]
    for m in (1, 5, 20):
        x = torch.randn(m, k, generator=g).to(x_dtype)
        bias = (torch.randn(n, generator=g) * 0.1).to(x_dtype) if (m + len(name)) % 2 else None
        _check(packed, x, bias, path)


def test_auto_path_leading_dims_and_strided_inputs(packed_weights):
    packed = packed_weights("nf4")
    n, k = packed.shape
    g = _gen(3)
    x = torch.randn(2, 9, k, generator=g).to(torch.bfloat16)  # 18 rows: the fused GEMM on AMX, else slabs
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    many = "gemm" if cpu.gemm_path() == "amx" else "slab"
    assert torch.equal(cpu.linear(x, packed, bias), cpu.linear(x, packed, bias, path=many))
    _check(packed, x, bias, "slab")  # (the GEMM is held to the reference in tests/kernels/test_cpu_gemm.py)
    wide = torch.randn(k, 3, generator=g).to(torch.float16)
    y = _check(packed, wide.t(), None, "auto")  # a transposed view, 3 rows: the GEMV
    assert torch.equal(y, cpu.linear(wide.t(), packed, None, path="gemv"))
    assert torch.equal(api.linear(wide.t(), packed, impl="cpu"), y)


def test_many_slabs_with_a_ragged_last_one(packed_weights, monkeypatch):
    packed = packed_weights("gguf_Q4_K")
    k = packed.shape[1]
    x = torch.randn(33, k, generator=_gen(4)).to(torch.bfloat16)
    one_slab = cpu.linear(x, packed, None, path="slab")
    monkeypatch.setattr(cpu, "SLAB_BYTES", 1)  # the smallest slab: 64 rows
    assert cpu.slab_rows(k, torch.bfloat16) == 64
    assert torch.equal(cpu.linear(x, packed, None, path="slab"), one_slab)
    w = torch.randn(150, 64, generator=_gen(5)) * 0.05  # 150 rows: slabs of 64, 64 and 22
    packed_big = api.pack_int8_rows((w / w.abs().amax(1, keepdim=True) * 127).round().to(torch.int8),
                                    w.abs().amax(1), divisor=127.0)
    xb = torch.randn(40, 64, generator=_gen(6)).to(torch.bfloat16)
    _check(packed_big, xb, torch.randn(150, generator=_gen(7)).to(torch.bfloat16), "slab")


def test_bad_arguments_say_what_is_wrong(packed_weights):
    packed = packed_weights("nf4")
    n, k = packed.shape
    with pytest.raises(ValueError, match=f"x has {k + 1} features; the weight takes {k}"):
        cpu.linear(torch.zeros(1, k + 1), packed)
    with pytest.raises(ValueError, match="path: 'fast'; accepted"):
        cpu.linear(torch.zeros(1, k), packed, path="fast")
    with pytest.raises(ValueError, match=r"out: expected a contiguous \(17, 80\) torch.bfloat16 CPU tensor"):
        cpu.dequantize(packed, torch.bfloat16, out=torch.empty(17, 80))
    with pytest.raises(FormatError, match="not a packed format"):
        cpu.dequantize(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="impl: 'cuda'; accepted: 'reference', 'triton', 'cpu'"):
        api.dequantize(packed, impl="cuda")
    assert cpu.linear(torch.zeros(0, k, dtype=torch.bfloat16), packed).shape == (0, n)


def test_threads_follow_torch():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu_build.library().qs_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert cpu_build.library().qs_threads() == before


def test_build_is_cached_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    path = cpu_build.build()
    assert path.is_file() and path.parent.parent == tmp_path / "cache" / "cpu-kernels"
    stamp = path.stat().st_mtime_ns
    assert cpu_build.build() == path and path.stat().st_mtime_ns == stamp, "a cached build is not rebuilt"
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken-cc 1.0 && exit 0\necho 'cc: error: no' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with pytest.raises(cpu_build.CpuKernelsUnavailable, match=r"(?s)compiling quantserve.s CPU kernels failed.*cc: error: no"):
        cpu_build.build()
    leftovers = [p for p in (tmp_path / "cache" / "cpu-kernels").rglob("*") if p.is_file() and p != path]
    assert leftovers == [], "a failed build leaves no file behind"
    monkeypatch.setenv("CC", str(tmp_path / "missing-cc"))
    with pytest.raises(cpu_build.CpuKernelsUnavailable, match="does not run"):
        cpu_build.build()


def test_without_a_compiler_the_kernels_say_why_and_the_router_falls_back(tmp_path):
    code = (
        "import torch\n"
        "from quantserve.kernels import cpu\n"
        "reason = cpu.problem()\n"
        "assert reason and 'does not run' in reason, reason\n"
        "print('ok')\n"
    )
    env = dict(os.environ, CC=str(tmp_path / "no-such-compiler"), QUANTSERVE_CACHE_DIR=str(tmp_path / "c"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_the_command_builds_and_reports(tmp_path):
    env = dict(os.environ, QUANTSERVE_CACHE_DIR=str(tmp_path / "c"))
    done = subprocess.run([sys.executable, "-m", "quantserve.kernels.cpu_build"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "libquantserve_cpu.so" in done.stdout and "OpenMP threads" in done.stdout


# --- as router candidates ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["nf4", "llm-int8", "int4wo", "quanto-int4", "gguf-q8_0", "modelopt-nvfp4",
                                    "modelopt-int4"])
def test_the_router_runs_every_backend_through_the_cpu_kernels(scheme, tmp_path):
    from quantserve.runtime import kernel_candidates as kc
    from quantserve.runtime.loader import load_model
    from quantserve.runtime.quant_linear import reference_kernel
    from quantserve.runtime.router import quant_layers

    from ..runtime.tiny_models import save_tiny

    model = load_model(save_tiny("dit", tmp_path / "dit"), scheme)
    layers = list(quant_layers(model))
    if scheme == "modelopt-int4":  # blocks of 128 inputs: narrower layers' blocks span rows, which no kernel takes
        narrow = [(n, layer) for n, layer in layers if layer.in_features % 128]
        # modelopt has no kernel of its own: these run the reference (modelopt's dequantize, then a matmul)
        assert narrow and all(layer.kernel_name == "reference" for _, layer in narrow)
        assert "does not divide in_features" in kc.can_run_cpu(narrow[0][1], torch.device("cpu"))[1]
        layers = [(n, layer) for n, layer in layers if not layer.in_features % 128]
    assert layers and all(layer.kernel_name == kc.CPU_FUSED for _, layer in layers), \
        {name: (layer.kernel_name, layer.kernel_reason) for name, layer in layers}
    with torch.no_grad():
        for name, layer in layers[:4]:
            for m in (1, 24):
                x = torch.randn(m, layer.in_features, generator=_gen(m)).to(torch.bfloat16)
                expected = reference_kernel(x, layer.qweight, layer.bias).double()
                for kernel in (kc.cpu_fused_kernel, kc.cpu_dequant_kernel):
                    got = kernel(x, layer.qweight, layer.bias).double()
                    assert float((got - expected).norm() / expected.norm()) < 1e-2, (name, kernel.__name__, m)


def test_formats_without_a_cpu_kernel_say_why(tmp_path):
    from quantserve.runtime import kernel_candidates as kc
    from quantserve.runtime.loader import load_model
    from quantserve.runtime.router import quant_layers

    from ..runtime.tiny_models import save_tiny

    model = load_model(save_tiny("dit", tmp_path / "dit"), "int8dq")  # torchao quantizes activations too
    name, layer = next(iter(quant_layers(model)))
    ok, why = kc.can_run_cpu(layer, torch.device("cpu"))
    assert not ok and "activations are quantized dynamically" in why
    assert layer.kernel_name == "native"
    ok, why = kc.can_run_cpu(layer, torch.device("cuda"))
    assert not ok and why == "the CPU kernels run on the CPU, not cuda"


@pytest.mark.parametrize("march, isa", [("x86-64-v3", "avx2"), ("x86-64-v2", "scalar")])
def test_the_avx2_and_portable_builds_give_the_same_numbers(march, isa, tmp_path):
    """The kernels built without AVX-512 (as on an older CPU): every format still bit-exact, the GEMV within bounds."""
    if os.uname().machine != "x86_64":
        pytest.skip("x86-64 -march levels")  # pragma: no cover - the CI machines are x86-64
    code = (
        "import torch\n"
        "from quantserve.kernels import cpu, cpu_build, reference as R\n"
        "from tests.kernels.packed_cases import CASES\n"
        f"assert cpu_build.library().qs_isa().decode() == {isa!r}, cpu_build.library().qs_isa()\n"
        "for name, make in CASES.items():\n"
        "    with torch._dynamo.config.patch(disable=True):\n"
        "        p = make()\n"
        "    for dt in (torch.float32, torch.bfloat16, torch.float16):\n"
        "        assert torch.equal(cpu.dequantize(p, dt), R.dequantize(p, dt)), (name, dt)\n"
        "    x = torch.randn(3, p.shape[1], generator=torch.Generator().manual_seed(0))\n"
        "    for m in (1, 3):\n"
        "        y, ref = cpu.linear(x[:m], p, path='gemv').double(), R.linear(x[:m], p).double()\n"
        "        assert float((y - ref).norm() / ref.norm()) < 1e-2, name\n"
        "print('ok')\n"
    )
    env = dict(os.environ, QUANTSERVE_CPU_CFLAGS=f"-march={march}", QUANTSERVE_CACHE_DIR=str(tmp_path / "c"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(Path(__file__).resolve().parents[2]))
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


# --- quantizers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_absmax_quantizer_is_quantos_bit_for_bit(dtype):
    import optimum.quanto as quanto
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer

    w = (torch.randn(300, 517, generator=_gen(8)) * 0.02).to(dtype)
    w[3] = 0  # a zero row: 0 / 0, cast to 0
    w[4, :5] = 1e-30  # subnormal in float32, zero in half
    w[5, 7] = 100
    w[6] = (torch.randn(517, generator=_gen(9)) * 1e-6).to(dtype)
    scale = AbsmaxOptimizer()(w, qtype=quanto.qint8, axis=0)
    data = torch.ops.quanto.quantize_symmetric(w, dtype=torch.int8, axis=0, scale=scale)
    q, s = cpu.quantize_int8_absmax(w)
    assert torch.equal(q, data)
    assert s.dtype == scale.dtype and torch.equal(s.view(torch.uint8), scale.contiguous().view(torch.uint8))
    with pytest.raises(ValueError, match="expected a 2-D float32/bfloat16/float16 CPU tensor"):
        cpu.quantize_int8_absmax(w.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_symmetric_quantizer_is_torchaos_bit_for_bit(dtype):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    w = (torch.randn(300, 517, generator=_gen(10)) * 0.02).to(dtype)
    w[3] = 0  # the eps clamp
    w[4, :5] = 1e-30
    w[5, 7] = 100
    w[6] = (torch.randn(517, generator=_gen(11)) * 1e-6).to(dtype)
    w[7] = w[7].abs()  # min above zero
    layer = torch.nn.Linear(517, 300, bias=False, dtype=dtype)
    layer.weight.data.copy_(w)
    quantize_(layer, Int8WeightOnlyConfig())
    q, s = cpu.quantize_int8_symmetric(w, torch.finfo(torch.float32).eps)
    assert torch.equal(q, layer.weight.qdata) and torch.equal(s, layer.weight.scale)


def test_torchao_int8wo_quantizes_through_c_with_torchaos_bytes():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from quantserve.runtime.backends import backend_for
    from quantserve.runtime.config import TorchAoConfig

    w = (torch.randn(1000, 768, generator=_gen(12)) * 0.02).to(torch.bfloat16)
    ours = backend_for(TorchAoConfig("int8wo"), torch.bfloat16).quantize("blocks.0.attn.to_q", w)
    layer = torch.nn.Linear(768, 1000, bias=False, dtype=torch.bfloat16)
    layer.weight.data.copy_(w)
    quantize_(layer, Int8WeightOnlyConfig())
    tensors = ours.packed_tensors()
    for name in ("qdata", "scale", "zero_point"):
        got = next(t for key, t in tensors.items() if key.split(".")[-1] == name)
        assert torch.equal(got, getattr(layer.weight, name)), name
