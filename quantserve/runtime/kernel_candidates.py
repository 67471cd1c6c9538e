"""quantserve's own kernels as router candidates, and the adapters that hand each backend's weight to them.

Importing this module registers four candidates with the router (idempotent):
- "triton_fused" (preference 10): Triton's fused dequantize-matmul (split-K for M <= 16, tiled above);
- "cpu_fused" (preference 15): the native CPU kernels' fused dequantize-GEMV (M <= 4), slabs above;
- "triton_dequant" (preference 30): Triton dequantizes the weight to the activation dtype, torch runs the matmul;
- "cpu_dequant" (preference 35): the CPU kernels dequantize slabs of rows, torch's GEMM multiplies each.

The Triton ones run a layer when its format has an adapter here and the device is CUDA, or the CPU while
TRITON_INTERPRET=1 is set (Triton's interpreter, for tests); the CPU ones on the CPU wherever a C compiler built
kernels/csrc (kernels/cpu_build.py). An adapter reads a backend's QuantizedWeight (its buffers and meta, by `fmt`)
into a `quantserve.kernels.formats` object, viewing the backend's tensors without copying; the result is cached on
the weight and rebuilt when its buffers change (e.g. after `.to()`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels import api as kernels_api
from ..kernels.formats import (
    NVFP4,
    BnB4bit,
    Float8,
    FormatError,
    GGUFBlocks,
    Int4Blocks,
    Int8Rows,
    PackedWeight,
    QuantoGrouped,
)
from .backends.base import QuantizedWeight
from .quant_linear import QuantLinear
from .router import Candidate, register_candidate

FUSED, DEQUANT = "triton_fused", "triton_dequant"
CPU_FUSED, CPU_DEQUANT = "cpu_fused", "cpu_dequant"
_CACHE_ATTR = "_quantserve_packed_format"

Adapter = Callable[[QuantizedWeight], PackedWeight]
_ADAPTERS: dict[str, Adapter] = {}


def adapter(*fmts: str) -> Callable[[Adapter], Adapter]:
    """Register the adapter of one or more `QuantizedWeight.fmt` names."""
    def register(fn: Adapter) -> Adapter:
        for fmt in fmts:
            _ADAPTERS[fmt] = fn
        return fn

    return register


def adapted_formats() -> tuple[str, ...]:
    """The fmt names (exact, plus 'gguf:*') that have an adapter."""
    return tuple(sorted(_ADAPTERS))


def _dtype(name: Any) -> torch.dtype | None:
    """A dtype from a JSON name ("bfloat16", "torch.bfloat16") or a torchao description."""
    if isinstance(name, dict):
        name = name.get("_data")
    if name is None:
        return None
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise FormatError(f"adapter: {name!r} is not a torch dtype")
    return value


# --- bitsandbytes ---------------------------------------------------------------------------------------------

@adapter("nf4", "fp4")
def _bnb_4bit(w: QuantizedWeight) -> BnB4bit:
    qs = w.meta["quant_state"]
    data = w.data if w.data.dtype == torch.uint8 else w.data.view(torch.uint8)
    nested = getattr(w, "nested_absmax", None)
    extra: dict[str, Any] = {}
    if nested is not None:
        extra = dict(nested_absmax=nested.reshape(-1), nested_quant_map=w.nested_quant_map.reshape(-1),
                     nested_blocksize=int(qs.get("nested_blocksize", 256)), offset=float(qs.get("nested_offset", 0.0)))
    return BnB4bit(data.reshape(-1), w.absmax.reshape(-1), w.quant_map.reshape(-1), tuple(qs["shape"]),
                   blocksize=int(qs["blocksize"]), quant_type=qs["quant_type"], dtype=_dtype(qs["dtype"]), **extra)


@adapter("int8_rows")
def _bnb_int8(w: QuantizedWeight) -> Int8Rows:
    return Int8Rows(w.CB, w.SCB.reshape(-1), divisor=127.0)


# --- torchao --------------------------------------------------------------------------------------------------

def _torchao_dtype(w: QuantizedWeight) -> torch.dtype | None:
    return _dtype((w.meta.get("torchao", {}).get("_data") or {}).get("dtype"))


@adapter("torchao:int8_rows")
def _torchao_int8(w: QuantizedWeight) -> Int8Rows:
    zero = getattr(w, "zero_point", None)
    return Int8Rows(w.qdata, w.scale.reshape(-1), None if zero is None else zero.reshape(-1),
                    dtype=_torchao_dtype(w))


@adapter("torchao:float8_e4m3_rows", "torchao:float8_e5m2_rows", "torchao:float8_e4m3_tensor",
         "torchao:float8_e5m2_tensor")
def _torchao_float8(w: QuantizedWeight) -> Float8:
    return Float8(w.qdata, w.scale.reshape(-1), dtype=_torchao_dtype(w))


@adapter("int4_grouped")
def _int4_grouped(w: QuantizedWeight) -> PackedWeight:
    return w.packed()


# --- optimum-quanto -------------------------------------------------------------------------------------------

def _quanto_axis0(w: QuantizedWeight) -> None:
    axis = w.meta.get("axis", 0)
    if axis not in (0, None):
        raise FormatError(f"quanto weight axis {axis}: the Triton kernels take axis 0 (per output row) only")


@adapter("quanto:int8")
def _quanto_int8(w: QuantizedWeight) -> Int8Rows:
    _quanto_axis0(w)
    return Int8Rows(w.data, w.scale.reshape(-1), dtype=w.scale.dtype)


@adapter("quanto:float8")
def _quanto_float8(w: QuantizedWeight) -> Float8:
    _quanto_axis0(w)
    return Float8(w.data, w.scale.reshape(-1), dtype=w.scale.dtype)


@adapter("quanto:int4_grouped", "quanto:int2_grouped")
def _quanto_grouped(w: QuantizedWeight) -> QuantoGrouped:
    if w.meta.get("axis", 0) != 0:
        raise FormatError(f"quanto weight axis {w.meta.get('axis')}: the Triton kernels take axis 0 only")
    bits = 4 if w.fmt == "quanto:int4_grouped" else 2
    return QuantoGrouped(w.data, w.scale.reshape(-1), w.shift.reshape(-1), (w.out_features, w.in_features),
                         int(w.meta.get("block") or w.meta.get("group_size") or w.in_features), bits)


# --- NVIDIA ModelOpt ------------------------------------------------------------------------------------------

@adapter("modelopt:nvfp4")
def _modelopt_nvfp4(w: QuantizedWeight) -> NVFP4:
    n = w.out_features
    return NVFP4(w.weight.reshape(n, -1), w.scale.reshape(n, -1), w.double_scale.reshape(1).float(), 16)


def _modelopt_int4_blocks(w: QuantizedWeight) -> Int4Blocks:
    block = int(w.fmt.removeprefix("modelopt:int4_block"))
    return Int4Blocks(w.weight.reshape(w.out_features, -1), w.scale.reshape(-1), block)


@adapter("modelopt:fp8", "modelopt:fp8_axis0")
def _modelopt_fp8(w: QuantizedWeight) -> Float8:
    return Float8(w.weight.reshape(w.out_features, w.in_features), w.scale.reshape(-1))


@adapter("modelopt:int8_axis0")
def _modelopt_int8(w: QuantizedWeight) -> Int8Rows:
    return Int8Rows(w.weight.reshape(w.out_features, w.in_features), w.scale.reshape(-1))


# --- GGUF -----------------------------------------------------------------------------------------------------

def _gguf(w: QuantizedWeight) -> GGUFBlocks:
    return GGUFBlocks(w.data, w.qtype, (w.out_features, w.in_features))


def _find_adapter(fmt: str) -> Adapter | None:
    if fmt.startswith("gguf:"):
        return _gguf
    if fmt.startswith("modelopt:int4_block") and fmt.removeprefix("modelopt:int4_block").isdigit():
        return _modelopt_int4_blocks  # ModelOpt INT4, blocks along the input features
    return _ADAPTERS.get(fmt)


# --- the adapted format, cached on the weight -----------------------------------------------------------------

def _buffers_key(w: QuantizedWeight) -> tuple:
    return tuple((name, t.data_ptr(), t.dtype, tuple(t.shape), t.device)
                 for name, t in w.named_buffers(recurse=False) if t is not None)


def no_adapter_reason(fmt: str) -> str:
    if "+dyn_" in fmt:
        return (f"no Triton kernel for format {fmt}: its activations are quantized dynamically by torchao, and the "
                "Triton kernels are weight-only")
    return f"no Triton kernel for format {fmt}"


def packed_format(weight: QuantizedWeight) -> PackedWeight:
    """`weight` as a quantserve.kernels packed format (views of its buffers), cached on the weight."""
    fn = _find_adapter(weight.fmt)
    if fn is None:
        raise FormatError(no_adapter_reason(weight.fmt))
    key = _buffers_key(weight)
    cached = weight.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    packed = fn(weight)
    shape = tuple(int(s) for s in packed.shape)
    if shape != (weight.out_features, weight.in_features):
        raise FormatError(f"{weight.fmt}: the adapted weight is {shape}, the layer "
                          f"{(weight.out_features, weight.in_features)}")
    weight.__dict__[_CACHE_ATTR] = (key, packed)
    return packed


# --- the candidates -------------------------------------------------------------------------------------------

def triton_fused_kernel(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Triton's fused dequantize-matmul."""
    from ..kernels import triton_matmul

    return triton_matmul.linear(x, packed_format(weight), bias)


def triton_dequant_kernel(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Triton dequantizes the weight to x's dtype; torch (cuBLAS on a GPU) multiplies."""
    from ..kernels import triton_dequant

    w = triton_dequant.dequantize(packed_format(weight), x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def can_run_triton(layer: QuantLinear, device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels run this layer on `device`, and why not when they do not."""
    problem = kernels_api.triton_problem(device)
    if problem is not None:
        return False, problem
    fmt = layer.qweight.fmt
    if _find_adapter(fmt) is None:
        return False, no_adapter_reason(fmt)
    try:
        packed = packed_format(layer.qweight)
    except (FormatError, AttributeError, KeyError, TypeError, ValueError) as exc:
        return False, f"format {fmt} cannot be handed to the Triton kernels: {exc}"
    problem = kernels_api.triton_problem(device, packed)
    return (False, problem) if problem else (True, "")


def cpu_fused_kernel(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The CPU kernels' fused dequantize-GEMV (slab dequantize + GEMM above GEMV_MAX_M rows)."""
    from ..kernels import cpu

    return cpu.linear(x, packed_format(weight), bias)


def cpu_dequant_kernel(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The CPU kernels dequantize cache-sized slabs of rows; torch's GEMM multiplies each."""
    from ..kernels import cpu

    return cpu.linear(x, packed_format(weight), bias, path="slab")


def can_run_cpu(layer: QuantLinear, device: torch.device) -> tuple[bool, str]:
    """Whether the native CPU kernels run this layer on `device`, and why not when they do not."""
    if device.type != "cpu":
        return False, f"the CPU kernels run on the CPU, not {device.type}"
    from ..kernels import cpu

    fmt = layer.qweight.fmt
    if _find_adapter(fmt) is None:
        return False, no_adapter_reason(fmt).replace("Triton kernel", "quantserve kernel")
    try:
        packed = packed_format(layer.qweight)
    except (FormatError, AttributeError, KeyError, TypeError, ValueError) as exc:
        return False, f"format {fmt} cannot be handed to the CPU kernels: {exc}"
    problem = cpu.problem(packed)
    return (False, problem) if problem else (True, "")


def register() -> None:
    """Register quantserve's kernels with the router (again: the same objects replace the old ones)."""
    register_candidate(Candidate(FUSED, triton_fused_kernel, can_run_triton, 10,
                                 "Triton fused dequantize-matmul (split-K for M <= 16, tiled above)"))
    register_candidate(Candidate(CPU_FUSED, cpu_fused_kernel, can_run_cpu, 15,
                                 "CPU fused dequantize-GEMV (C, SIMD, OpenMP; slabs above 4 rows)"))
    register_candidate(Candidate(DEQUANT, triton_dequant_kernel, can_run_triton, 30,
                                 "Triton dequantize, then a dense matmul"))
    register_candidate(Candidate(CPU_DEQUANT, cpu_dequant_kernel, can_run_cpu, 35,
                                 "CPU dequantize in cache-sized slabs, each then a dense matmul"))


register()
