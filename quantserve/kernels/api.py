"""The public functional API of quantserve.kernels: pack a backend's tensors, dequantize, run a linear layer.

`pack_*` build the packed formats of kernels/formats.py from the tensors a library hands over, as views (no copy)
wherever the library's layout is the format's. `dequantize` and `linear` run the torch reference, the
Triton kernels (`impl="triton"`; on a CPU only with TRITON_INTERPRET=1, Triton's interpreter) or the native CPU
kernels (`impl="cpu"`: C with OpenMP and AVX-512 intrinsics where the CPU has them, portable C auto-vectorized by
the compiler elsewhere, compiled for this machine on first use).

Triton is imported only when a Triton kernel is asked for, so the reference works where Triton does not, and the
interpreter flag is read when the kernels are first imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from . import reference
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
    device_of,
    is_packed,
)
from .gguf import qtype_name, row_bytes

IMPLS = ("reference", "triton", "cpu")


# --- packing --------------------------------------------------------------------------------------------------

def pack_gguf(raw: torch.Tensor, qtype: Any, shape: Sequence[int]) -> GGUFBlocks:
    """Raw ggml bytes (uint8, whole blocks, any shape) of a (N, K) weight of ggml type `qtype`."""
    n, k = (int(s) for s in shape)
    name = qtype_name(qtype)
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raise FormatError(f"GGUFBlocks.data: expected a uint8 tensor of raw ggml blocks, got "
                          f"{getattr(raw, 'dtype', type(raw).__name__)}")
    try:
        per_row = row_bytes(name, k)
    except ValueError as exc:
        raise FormatError(f"GGUFBlocks.shape: {exc}") from None
    if raw.numel() != n * per_row:
        raise FormatError(f"GGUFBlocks.data: {raw.numel()} bytes; a ({n}, {k}) {name} weight has {n * per_row}")
    return GGUFBlocks(raw.reshape(n, per_row), name, (n, k))


def pack_bnb_4bit(data: torch.Tensor, quant_state: Any) -> BnB4bit:
    """bitsandbytes' packed 4-bit data (any storage dtype, viewed as bytes) and its QuantState."""
    qs = quant_state
    shape = tuple(int(s) for s in qs.shape)
    if len(shape) != 2:
        raise FormatError(f"BnB4bit.shape: quant_state.shape {shape}; expected a 2-D (out, in) weight")
    codes = data.reshape(-1).view(torch.uint8) if data.dtype != torch.uint8 else data.reshape(-1)
    common = dict(shape=shape, blocksize=int(qs.blocksize), quant_type=qs.quant_type, dtype=qs.dtype,
                  quant_map=qs.code.reshape(-1))
    if getattr(qs, "nested", False):
        offset = qs.offset
        return BnB4bit(codes, qs.absmax.reshape(-1), nested_absmax=qs.state2.absmax.reshape(-1),
                       nested_quant_map=qs.state2.code.reshape(-1), nested_blocksize=int(qs.state2.blocksize),
                       offset=float(offset.item() if isinstance(offset, torch.Tensor) else offset), **common)
    return BnB4bit(codes, qs.absmax.reshape(-1), **common)


def pack_int8_rows(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
                   divisor: float = 1.0, dtype: torch.dtype | None = None) -> Int8Rows:
    """int8 (N, K) with a scale (and optionally an int zero point) per row: w = (q - zero) * (scale / divisor).
    bitsandbytes LLM.int8: pack_int8_rows(CB, SCB, divisor=127.0)."""
    return Int8Rows(qdata, scale.reshape(-1), None if zero_point is None else zero_point.reshape(-1),
                    float(divisor), dtype)


def pack_fp8(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> Float8:
    """float8 (e4m3fn or e5m2) (N, K) with a scale per row (N values) or per tensor (1 value): w = q * scale."""
    return Float8(qdata, scale.reshape(-1), dtype)


def pack_int4_grouped(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      group_size: int) -> Int4Grouped:
    """torchao's int4 layout: int8 (N, K/2) two signed codes per byte (low nibble first), scale and zero point
    (K/group_size, N); w = q * scale + zero."""
    return Int4Grouped(qdata, scale, zero_point, int(group_size))


def pack_quanto_grouped(data: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, shape: Sequence[int],
                        group_size: int | None, bits: int = 4) -> QuantoGrouped:
    """optimum-quanto's int4/int2 weight (axis 0): packed uint8 data, scale and shift per group (group_size None:
    one group per row)."""
    n, k = (int(s) for s in shape)
    return QuantoGrouped(data, scale.reshape(-1), shift.reshape(-1), (n, k), int(group_size or k), int(bits))


def pack_nvfp4(qdata: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor | float,
               block_size: int = 16) -> NVFP4:
    """NVFP4: uint8 (N, K/2) e2m1 codes (even column low nibble), float8 e4m3 scales (N, K/block_size), a float32
    global scale multiplying every block scale."""
    if not isinstance(global_scale, torch.Tensor):
        global_scale = torch.tensor([float(global_scale)], dtype=torch.float32, device=qdata.device)
    n = qdata.shape[0]
    return NVFP4(qdata, block_scale.reshape(n, -1), global_scale.reshape(1), int(block_size))


def pack_int4_blocks(qdata: torch.Tensor, scale: torch.Tensor, block_size: int = 128) -> Int4Blocks:
    """ModelOpt's INT4: uint8 (N, K/2) codes offset by 8 (even column in the high nibble), a float32 divisor per
    block of `block_size` columns; w = (q - 8) / scale."""
    n = qdata.shape[0]
    return Int4Blocks(qdata.reshape(n, -1), scale.reshape(-1), int(block_size))


# --- running --------------------------------------------------------------------------------------------------

def _check_impl(impl: str, packed: Any) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl: {impl!r}; accepted: {', '.join(map(repr, IMPLS))}")
    if not is_packed(packed):
        raise FormatError(f"packed: a {type(packed).__name__} is not a packed format (build one with the pack_* "
                          "functions of quantserve.kernels)")


def dequantize(packed: PackedWeight, dtype: torch.dtype = torch.bfloat16, impl: str = "reference") -> torch.Tensor:
    """The dense (N, K) weight in `dtype`, by the torch reference or the Triton kernel."""
    _check_impl(impl, packed)
    if impl == "reference":
        return reference.dequantize(packed, dtype)
    if impl == "cpu":
        from . import cpu

        return cpu.dequantize(packed, dtype)
    from . import triton_dequant

    return triton_dequant.dequantize(packed, dtype)


def linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
           impl: str = "reference") -> torch.Tensor:
    """y = x @ dequant(W).T + bias in x's dtype: the reference, Triton's fused dequantize-matmul, or the CPU
    kernels' fused GEMV (slab dequantize + GEMM for many rows)."""
    _check_impl(impl, packed)
    if impl == "reference":
        return reference.linear(x, packed, bias)
    if impl == "cpu":
        from . import cpu

        return cpu.linear(x, packed, bias)
    from . import triton_matmul

    return triton_matmul.linear(x, packed, bias)


MIN_CAPABILITY = (8, 0)  # bf16 tensor-core dots; float8 codes are decoded by integer arithmetic below 8.9


def triton_problem(device: torch.device | str, packed: PackedWeight | None = None) -> str | None:
    """None when quantserve's Triton kernels can run on `device`, else why not. Every packed format runs wherever
    the kernels do (float8 codes are decoded by integer arithmetic below 8.9); `packed` is accepted for callers that
    ask per weight."""
    problem = _device_problem(device)
    if problem is None and torch.device(device).type == "cuda":
        capability = torch.cuda.get_device_capability(torch.device(device))
        if capability < MIN_CAPABILITY:
            problem = (f"the Triton kernels need compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}; "
                       f"this GPU has {capability[0]}.{capability[1]}")
    return problem


def _device_problem(device: torch.device | str) -> str | None:
    device = torch.device(device)
    interpret = os.environ.get("TRITON_INTERPRET", "") == "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    tiles = sys.modules.get(f"{__package__}.triton_common")
    if device.type == "cuda":
        if tiles is not None and tiles.INTERPRETED:
            return "quantserve's Triton kernels were imported with TRITON_INTERPRET=1 (CPU interpreter)"
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu" and interpret and (tiles is None or tiles.INTERPRETED):
        return None
    return "triton needs a CUDA device (TRITON_INTERPRET=1 runs it on the CPU for tests)"


__all__ = ["IMPLS", "dequantize", "device_of", "linear", "pack_bnb_4bit", "pack_fp8", "pack_gguf",
           "pack_int4_blocks", "pack_int4_grouped", "pack_int8_rows", "pack_nvfp4", "pack_quanto_grouped", "triton_problem"]
