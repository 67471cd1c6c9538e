"""quantserve's native CPU kernels for every packed format: dequantize, a fused dequantize-GEMV and a fused
dequantize-GEMM.

The C library (kernels/csrc, built for this CPU on first use by kernels/cpu_build.py) decodes the packed weight
with exactly the torch reference's values, then either
- multiplies each row with every activation row while it is still in the L1/L2 cache (path "gemv", `linear`'s
  choice for M <= GEMV_MAX_M: a weight-bandwidth-bound GEMV that reads each packed byte once per activation row),
- decodes a panel of rows once, a chunk of K at a time, into an L1/L2-sized bf16 buffer and multiplies it against all
  activation rows with AMX tiles, AVX512-BF16 dot products or portable float32 code (path "gemm", csrc/qs_gemm.c;
  `linear`'s choice for bf16 activations from 2 to GEMM_MAX_M rows where AMX runs: `_auto_path`), or
- writes a slab of rows in the activation dtype into a small reused buffer that torch's GEMM (oneDNN/MKL) consumes
  while it is cache-hot (path "slab", `linear`'s choice for larger M: the dense weight never exists whole).

The GEMM's matmul is the best this CPU and process can run; `$QUANTSERVE_CPU_GEMM` (amx, avx512bf16, portable)
forces one, e.g. to test the fallbacks on a machine that has AMX (`gemm_path()` says which runs).

A packed weight is described to C by a `qs_weight` struct (kernels/cpu_abi.py, the ctypes mirror of csrc/qs_cpu.h)
that points into its tensors (no copy); the struct is built once per (frozen) packed object and cached on it. Each
format's builder is registered as its `cpu` entry in kernels/format_ops.py.
"""

from __future__ import annotations

import ctypes
import os

import torch

from . import cpu_build
from .cpu_abi import (
    BF16,
    GEMM_AMX,
    GEMM_AUTO,
    GEMM_DPBF16,
    GEMM_PORTABLE,
    F16,
    F32,
    FMT_BNB4,
    FMT_FLOAT8,
    FMT_GGUF,
    FMT_INT4_BLOCKS,
    FMT_INT4_GROUPED,
    FMT_INT8_ROWS,
    FMT_NVFP4,
    FMT_QUANTO,
    I8,
    I16,
    I32,
    U8,
    QsWeight,
)
from .cpu_build import CpuKernelsUnavailable
from .format_ops import implementation, registers
from .formats import (
    NVFP4,
    BnB4bit,
    Float8,
    FormatError,
    GGUFBlocks,
    Int4Blocks,
    Int4Grouped,
    Int8Rows,
    PackedWeight,
    QuantoGrouped,
)

GEMV_MAX_M = 4           # activation rows up to which the fused GEMV runs; above, the GEMM or slabs
GEMM_MAX_M = 256         # bf16 activation rows up to which "auto" runs the fused GEMM on AMX; above, slabs
GEMM_LIMIT_M = 256       # the most rows qs_gemm takes in one call ("gemm" splits larger inputs)
GEMM_ENV = "QUANTSERVE_CPU_GEMM"
GEMM_PATHS = {"auto": GEMM_AUTO, "amx": GEMM_AMX, "avx512bf16": GEMM_DPBF16, "portable": GEMM_PORTABLE}
SLAB_BYTES = 4 << 20     # bytes of one dequantized slab (L2 to L3 sized: fewer slabs, each still cache-hot)

_DTYPES = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16, torch.int8: I8, torch.uint8: U8,
           torch.int16: I16, torch.int32: I32, None: F32}
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# ggml type ids (gguf.GGMLQuantizationType)
GGML_TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
                 "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ4_NL": 20, "IQ4_XS": 23, "BF16": 30}
_CACHE_ATTR = "_quantserve_cpu_descriptor"


class Descriptor:
    """A `qs_weight` for one packed weight, and the tensors it points into (kept alive with it)."""

    def __init__(self, struct: QsWeight, keep: tuple[torch.Tensor, ...]):
        self.struct, self.keep = struct, keep
        self.shape = (int(struct.n), int(struct.k))
        self.ref = ctypes.byref(struct)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _dtype(t: torch.Tensor | None, cls: str, field: str) -> int:
    if t is None:
        return F32
    if t.dtype not in _DTYPES:
        raise FormatError(f"{cls}.{field}: dtype {t.dtype} is not one the CPU kernels read; accepted: "
                          f"{', '.join(str(d) for d in _DTYPES if d is not None)}")
    return _DTYPES[t.dtype]


def _round(dtype: torch.dtype | None) -> int:
    return {None: F32, torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}[dtype]


@registers(BnB4bit, "cpu")
def _bnb4(p: BnB4bit) -> tuple[QsWeight, tuple[torch.Tensor, ...]]:
    n, k = p.shape
    lut = p.quant_map.reshape(-1).contiguous()
    s = QsWeight(fmt=FMT_BNB4, n=n, k=k, data=_ptr(p.data), scale=_ptr(p.absmax), group=p.blocksize,
                 lut=_ptr(lut), round_dtype=_round(p.dtype))
    keep: tuple[torch.Tensor, ...] = (p.data, p.absmax, lut)
    if p.nested:
        s.nested_map, s.nested_absmax = _ptr(p.nested_quant_map), _ptr(p.nested_absmax)
        s.nested_blocksize, s.offset = p.nested_blocksize, float(p.offset)
        keep += (p.nested_quant_map, p.nested_absmax)
    return s, keep


@registers(Int8Rows, "cpu")
def _int8_rows(p: Int8Rows) -> tuple[QsWeight, tuple[torch.Tensor, ...]]:
    n, k = p.shape
    s = QsWeight(fmt=FMT_INT8_ROWS, n=n, k=k, data=_ptr(p.qdata), data_stride=p.qdata.stride(0),
                 scale=_ptr(p.scale), scale_dtype=_dtype(p.scale, "Int8Rows", "scale"), scale_stride_n=1,
                 zero=_ptr(p.zero_point), zero_dtype=_dtype(p.zero_point, "Int8Rows", "zero_point"),
                 divisor=float(p.divisor), round_dtype=_round(p.dtype))
    if float(s.divisor) != float(p.divisor):
        raise FormatError(f"Int8Rows.divisor: {p.divisor!r} is not a float32 value; the CPU kernels divide in float32")
    return s, tuple(t for t in (p.qdata, p.scale, p.zero_point) if t is not None)


@registers(Float8, "cpu")
def _float8(p: Float8) -> tuple[QsWeight, tuple[torch.Tensor, ...]]:
    n, k = p.shape
    data = p.qdata.view(torch.uint8)
    s = QsWeight(fmt=FMT_FLOAT8, kind=int(p.e5m2), n=n, k=k, data=_ptr(data), data_stride=data.stride(0),
                 scale=_ptr(p.scale), scale_dtype=_dtype(p.scale, "Float8", "scale"),
                 scale_stride_n=1 if p.per_row else 0, round_dtype=_round(p.dtype))
    return s, (data, p.scale)


@registers(Int4Grouped, "cpu")
def _int4_grouped(p: Int4Grouped) -> tuple[QsWeight, tuple[torch.Tensor, ...]]:
    n, k = p.shape
    scale, zero = p.scale, p.zero_point
    if scale.stride() != zero.stride():
        scale, zero = scale.contiguous(), zero.contiguous()
    if p.qdata.stride(-1) != 1:
        raise FormatError(f"Int4Grouped.qdata: strides {p.qdata.stride()}; the CPU kernels need unit column stride")
    s = QsWeight(fmt=FMT_INT4_GROUPED, n=n, k=k, data=_ptr(p.qdata), data_stride=p.qdata.stride(0),
                 scale=_ptr(scale), scale_dtype=_dtype(scale, "Int4Grouped", "scale"),
                 scale_stride_n=scale.stride(1), scale_stride_g=scale.stride(0), zero=_ptr(zero),
                 zero_dtype=_dtype(zero, "Int4Grouped", "zero_point"), group=p.group_size)
    return s, (p.qdata, scale, zero)


@registers(QuantoGrouped, "cpu")
def _quanto(p: QuantoGrouped) -> tuple[QsWeight, tuple[torch.Tensor, ...]]:
    n, k = p.shape
    s = QsWeight(fmt=FMT_QUANTO, kind=p.bits, n=n, k=k, data=_ptr(p.data), data_stride=p.data.stride(0),
                 scale=_ptr(p.scale), scale_dtype=_dtype(p.scale, "QuantoGrouped", "scale"), zero=_ptr(p.shift),
                 zero_dtype=_dtype(p.shift, "QuantoGrouped", "shift"), group=p.group_size,
                 packed_rows=p.packed_rows, round_dtype=_round(p.scale.dtype))
    return s, (p.data, p.scale, p.shift)


@registers(NVFP4, "cpu")
def _nvfp4(p: NVFP4) -> tuple[QsWeight, tuple[torch.Tensor, ...]]:
    n, k = p.shape
    scales = p.block_scale.view(torch.uint8)
    s = QsWeight(fmt=FMT_NVFP4, n=n, k=k, data=_ptr(p.qdata), data_stride=p.qdata.stride(0), scale=_ptr(scales),
                 scale_dtype=U8, scale_stride_n=scales.stride(0), group=p.block_size,
                 global_scale=float(p.global_scale.reshape(()).item()))
    return s, (p.qdata, scales)


@registers(Int4Blocks, "cpu")
def _int4_blocks(p: Int4Blocks) -> tuple[QsWeight, tuple[torch.Tensor, ...]]:
    n, k = p.shape
    s = QsWeight(fmt=FMT_INT4_BLOCKS, n=n, k=k, data=_ptr(p.qdata), data_stride=p.qdata.stride(0),
                 scale=_ptr(p.scale), scale_dtype=F32, group=p.block_size)
    return s, (p.qdata, p.scale)


@registers(GGUFBlocks, "cpu")
def _gguf(p: GGUFBlocks) -> tuple[QsWeight, tuple[torch.Tensor, ...]]:
    n, k = p.shape
    if p.qtype not in GGML_TYPE_IDS:
        raise FormatError(f"GGUFBlocks.qtype: {p.qtype!r} has no CPU kernel; accepted: {', '.join(GGML_TYPE_IDS)}")
    s = QsWeight(fmt=FMT_GGUF, kind=GGML_TYPE_IDS[p.qtype], n=n, k=k, data=_ptr(p.data),
                 data_stride=p.data.stride(0))
    return s, (p.data,)


def descriptor(packed: PackedWeight) -> Descriptor:
    """The C descriptor of `packed`, built once and cached on it (a packed format is frozen: its tensors stay; the
    router's adapter makes a new packed object when a backend's buffers change)."""
    cached = packed.__dict__.get(_CACHE_ATTR)
    if cached is not None:
        return cached
    struct, keep = implementation(packed, "cpu", "cpu kernels")(packed)
    for t in keep:
        if t.device.type != "cpu":
            raise FormatError(f"cpu kernels: {type(packed).__name__} tensors are on {t.device}; move the weight "
                              "to the CPU or use the Triton kernels")
    if cpu_build.library().qs_supported(struct.fmt, struct.kind) != 0:
        raise FormatError(f"cpu kernels: this build has no decoder for {type(packed).__name__} "
                          f"(format {struct.fmt}, kind {struct.kind})")
    desc = Descriptor(struct, keep)
    object.__setattr__(packed, _CACHE_ATTR, desc)
    return desc


def problem(packed: PackedWeight | None = None) -> str | None:
    """None when the CPU kernels run here (for `packed`, when given), else why not."""
    reason = cpu_build.problem()
    if reason is None and packed is not None:
        try:
            descriptor(packed)
        except (FormatError, CpuKernelsUnavailable) as exc:
            return str(exc)
    return reason


def dequantize(packed: PackedWeight, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense (N, K) weight in `dtype`; equal to reference.dequantize(packed, dtype) bit for bit. `out`: a
    contiguous (N, K) CPU tensor of that dtype to write into (a reused buffer spares a fresh allocation's page
    faults, which cost more than the decoding itself on a big weight)."""
    desc = descriptor(packed)
    n, k = desc.shape
    if out is not None:
        if (tuple(out.shape) != (n, k) or out.dtype != dtype or dtype not in _OUT_DTYPES or not out.is_contiguous()
                or out.device.type != "cpu"):
            raise ValueError(f"out: expected a contiguous ({n}, {k}) {dtype} CPU tensor, got {tuple(out.shape)} "
                             f"{out.dtype} on {out.device}")
        _dequantize_rows(desc, 0, n, out)
        return out
    out_dtype = dtype if dtype in _OUT_DTYPES else torch.float32
    result = torch.empty(n, k, dtype=out_dtype)
    _dequantize_rows(desc, 0, n, result)
    return result if out_dtype == dtype else result.to(dtype)


def _dequantize_rows(desc: Descriptor, n0: int, n1: int, out: torch.Tensor) -> None:
    rc = cpu_build.library().qs_dequantize(desc.ref, n0, n1, out.data_ptr(), _DTYPES[out.dtype])
    if rc != 0:
        raise RuntimeError(f"cpu kernels: dequantizing rows {n0}..{n1} of a {desc.shape} weight failed")


PATHS = ("auto", "gemv", "gemm", "slab")


def gemm_available(name: str) -> bool:
    """Whether this build and process can run the GEMM's matmul path `name` (a key of GEMM_PATHS)."""
    if name not in GEMM_PATHS:
        raise ValueError(f"gemm path: {name!r}; accepted: {', '.join(map(repr, GEMM_PATHS))}")
    return cpu_build.library().qs_gemm_available(GEMM_PATHS[name]) == 0


def gemm_path(dtype: torch.dtype = torch.bfloat16) -> str:
    """The matmul path the GEMM runs for activations of `dtype`: `$QUANTSERVE_CPU_GEMM` when set (a bf16 path, amx
    or avx512bf16, takes bf16 activations only: others run the portable path), else the best available ("amx",
    "avx512bf16", or "portable", which is also the path of float32 and float16 activations)."""
    forced = os.environ.get(GEMM_ENV, "").strip().lower() or "auto"
    if forced not in GEMM_PATHS:
        raise ValueError(f"${GEMM_ENV}: {forced!r}; accepted: {', '.join(map(repr, GEMM_PATHS))}")
    if forced != "auto":
        if not gemm_available(forced):
            raise CpuKernelsUnavailable(f"${GEMM_ENV}={forced}: this CPU or build cannot run that GEMM path")
        return forced if dtype == torch.bfloat16 or forced == "portable" else "portable"
    best = cpu_build.library().qs_gemm_best_path(_DTYPES.get(dtype, F32))
    return next(name for name, value in GEMM_PATHS.items() if value == best)


GEMM_DECODERS = ("generic", "4-bit table", "int8 rows", "float8", "gguf Q4_0", "gguf Q8_0", "gguf Q4_K")


def gemm_decoder(packed: PackedWeight, dtype: torch.dtype = torch.bfloat16) -> str:
    """Which decoder the GEMM uses for `packed` with activations of `dtype`: "generic" (whole rows through the
    dequantizer's row decoders, then bf16 or float32) or the name of a direct bf16 chunk decoder."""
    return GEMM_DECODERS[cpu_build.library().qs_gemm_decoder(descriptor(packed).ref, GEMM_PATHS[gemm_path(dtype)])]


def linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None, path: str = "auto") -> torch.Tensor:
    """y = x @ dequant(W).T + bias in x's dtype. path "gemv": the fused GEMV; "gemm": the fused GEMM (`gemm_path`);
    "slab": slab dequantize plus torch's GEMM; "auto": the fastest of them for this M as measured (`_auto_path`)."""
    if path not in PATHS:
        raise ValueError(f"path: {path!r}; accepted: {', '.join(map(repr, PATHS))}")
    desc = descriptor(packed)
    n, k = desc.shape
    if x.shape[-1] != k:
        raise ValueError(f"cpu kernels: x has {x.shape[-1]} features; the weight takes {k}")
    if x.device.type != "cpu":
        raise ValueError(f"cpu kernels: x is on {x.device}; they run on the CPU")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if path == "auto":
        path = _auto_path(packed, m, x2.dtype)
    if path == "gemv":
        y = _gemv(desc, x2, bias)
    elif path == "gemm":
        y = _gemm(desc, x2, bias)
    else:
        y = _slab_matmul(desc, x2, bias)
    return y.reshape(*lead, n)


def _auto_path(packed: PackedWeight, m: int, dtype: torch.dtype) -> str:
    """`linear`'s path "auto", from measurements on a 2-core Xeon with AMX (benchmarks/kernels_cpu.md): with bf16
    activations where the GEMM runs on AMX, the GEMM from 5 rows to GEMM_MAX_M (and from 2 rows where the weight has
    a direct chunk decoder; the GEMV wins at 1 row, and at 2 to 4 over the generic decoder), slabs above; elsewhere
    (float32/float16 activations; AVX512-BF16 or no bf16 matmul, where the GEMM lost to torch's GEMM as measured)
    the GEMV up to GEMV_MAX_M rows, slabs above."""
    if m > 1 and m <= GEMM_MAX_M and dtype == torch.bfloat16 and gemm_path(dtype) == "amx":
        if m > GEMV_MAX_M or gemm_decoder(packed) != "generic":
            return "gemm"
    return "gemv" if m <= GEMV_MAX_M else "slab"


def _gemm(desc: Descriptor, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, _ = desc.shape
    chosen = gemm_path(x2.dtype)
    dtype = x2.dtype if x2.dtype in _OUT_DTYPES else torch.float32
    xc = x2.to(torch.bfloat16 if chosen != "portable" else dtype).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=dtype)
    bf = None if bias is None else bias.to(torch.float32).contiguous()
    lib = cpu_build.library()
    for r0 in range(0, x2.shape[0], GEMM_LIMIT_M):
        part, out = xc[r0:r0 + GEMM_LIMIT_M], y[r0:r0 + GEMM_LIMIT_M]
        rc = lib.qs_gemm(desc.ref, part.data_ptr(), _DTYPES[xc.dtype], part.shape[0], out.data_ptr(),
                         _DTYPES[dtype], None if bf is None else bf.data_ptr(), GEMM_PATHS[chosen])
        if rc != 0:
            raise RuntimeError(f"cpu kernels: the GEMM ({chosen}) of a {desc.shape} weight failed")
    return y if dtype == x2.dtype else y.to(x2.dtype)


def _gemv(desc: Descriptor, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, _ = desc.shape
    xf = x2.to(torch.float32).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    bf = None if bias is None else bias.to(torch.float32).contiguous()
    rc = cpu_build.library().qs_gemv(desc.ref, xf.data_ptr(), x2.shape[0], y.data_ptr(),
                                     None if bf is None else bf.data_ptr())
    if rc != 0:
        raise RuntimeError(f"cpu kernels: the GEMV of a {desc.shape} weight failed")
    return y if x2.dtype == torch.float32 else y.to(x2.dtype)


def slab_rows(k: int, dtype: torch.dtype) -> int:
    """Rows of one dequantized slab: about SLAB_BYTES, a multiple of 64."""
    rows = SLAB_BYTES // (k * torch.empty((), dtype=dtype).element_size())
    return max(64, rows // 64 * 64)


def _slab_matmul(desc: Descriptor, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = desc.shape
    dtype = x2.dtype if x2.dtype in _OUT_DTYPES else torch.float32
    xc = x2.to(dtype)
    rows = min(n, slab_rows(k, dtype))
    slab = torch.empty(rows, k, dtype=dtype)
    y = torch.empty(x2.shape[0], n, dtype=dtype)
    b = None if bias is None else bias.to(dtype)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = slab[: n1 - n0]
        _dequantize_rows(desc, n0, n1, w)
        if b is None:
            torch.mm(xc, w.t(), out=y[:, n0:n1])
        else:
            torch.addmm(b[n0:n1], xc, w.t(), out=y[:, n0:n1])
    return y if dtype == x2.dtype else y.to(x2.dtype)


def _quantizer_input(weight: torch.Tensor, what: str) -> torch.Tensor:
    if weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype not in _OUT_DTYPES:
        raise ValueError(f"{what}: expected a 2-D float32/bfloat16/float16 CPU tensor, got "
                         f"{tuple(weight.shape)} {weight.dtype} on {weight.device}")
    return weight.contiguous()


def quantize_int8_absmax(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and a scale per row by absmax, in one pass with no temporaries, as optimum-quanto computes them
    (AbsmaxOptimizer on axis 0, then quantize_symmetric): scale = dtype(max|w| / 127),
    q = clamp(round(dtype(w / scale)), -128, 127), `dtype` the weight's (float32, bfloat16 or float16).
    Returns (q (N, K) int8, scale (N, 1) in the weight's dtype)."""
    w = _quantizer_input(weight, "quantize_int8_absmax")
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, 1, dtype=w.dtype)
    rc = cpu_build.library().qs_quantize_int8_absmax(w.data_ptr(), _DTYPES[w.dtype], n, k, q.data_ptr(),
                                                    scale.data_ptr())
    if rc != 0:
        raise RuntimeError(f"quantize_int8_absmax: the kernel refused a {tuple(w.shape)} {w.dtype} weight")
    return q, scale


def quantize_int8_symmetric(weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and a float32 scale per row, symmetric from each row's range, as torchao computes them
    (choose_qparams_affine SYMMETRIC with int8 bounds, then quantize_affine): s = max(dtype(max(-min, max) / 127.5),
    eps), q = clamp(round(w * (1 / s)), -128, 127). Returns (q (N, K) int8, scale (N, 1) float32)."""
    w = _quantizer_input(weight, "quantize_int8_symmetric")
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, 1, dtype=torch.float32)
    rc = cpu_build.library().qs_quantize_int8_symmetric(w.data_ptr(), _DTYPES[w.dtype], n, k, float(eps),
                                                       q.data_ptr(), scale.data_ptr())
    if rc != 0:
        raise RuntimeError(f"quantize_int8_symmetric: the kernel refused a {tuple(w.shape)} {w.dtype} weight")
    return q, scale


__all__ = ["CpuKernelsUnavailable", "GEMM_MAX_M", "GEMV_MAX_M", "dequantize", "descriptor", "gemm_available",
           "gemm_decoder", "gemm_path", "linear", "problem",
           "quantize_int8_absmax", "quantize_int8_symmetric"]
