"""Triton dequantization: any packed format to a dense bf16/fp16/fp32 (N, K) weight, one tile per program.

The kernel is a skeleton: the format's tile helper (kernels/triton_tiles.py) decodes a (BLOCK_N, BLOCK_K) tile in
float32; the skeleton rounds it to the format's native dtype, casts to the output dtype and stores it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .formats import FormatError, PackedWeight, device_of
from .triton_args import tile_args
from .triton_common import INTERPRETED, cast_to, prune_for_device, round_to

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _configs() -> list[triton.Config]:
    if INTERPRETED:  # the interpreter runs each program in Python: one small tile keeps tests fast
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
            for bn, bk, w in ((16, 256, 4), (32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8))]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles far larger than the weight (they only add masked work), and those whose shared memory the device
    lacks."""
    args = {**named_args, **kwargs}
    n_cap = max(16, triton.next_power_of_2(int(args["N"])))
    k_cap = max(32, triton.next_power_of_2(int(args["K"])))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= k_cap]
    kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    return prune_for_device(_dequant_kernel.fn, kept, named_args, kwargs)


@triton.autotune(configs=_configs(), key=["N", "K", "TILE", "W_META0", "W_META1", "W_META2",
                                             "NATIVE"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _dequant_kernel(out_ptr, stride_on, w_ptr0, w_ptr1, w_ptr2, w_ptr3, w_ptr4, w_arg0, w_arg1, w_arg2, N, K,
                    TILE: tl.constexpr, W_META0: tl.constexpr, W_META1: tl.constexpr, W_META2: tl.constexpr,
                    NATIVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]
    k0 = pid_k * BLOCK_K
    rk = (k0 + tl.arange(0, BLOCK_K))[None, :]
    mask = (rn < N) & (rk < K)
    w = TILE(w_ptr0, w_ptr1, w_ptr2, w_ptr3, w_ptr4, w_arg0, w_arg1, w_arg2, rn, rk, k0, mask, N, K,
             W_META0, W_META1, W_META2)
    w = round_to(w, NATIVE)
    tl.store(out_ptr + rn * stride_on + rk, cast_to(w, out_ptr.dtype.element_ty), mask=mask)


def dequantize(packed: PackedWeight, dtype: torch.dtype = torch.bfloat16,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense (N, K) weight of `packed` in `dtype`, computed by Triton (into `out` when given)."""
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dequantize: dtype {dtype}; accepted: {', '.join(map(str, OUT_DTYPES))}")
    args = tile_args(packed)
    n, k = args.shape
    device = device_of(packed)
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=device)
    elif tuple(out.shape) != (n, k) or out.dtype != dtype or out.device != device or out.stride(1) != 1:
        raise ValueError(f"dequantize: out must be a ({n}, {k}) {dtype} tensor on {device} with unit column stride, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device} strides {out.stride()}")
    if device.type != "cuda" and not INTERPRETED:
        raise FormatError(f"dequantize: Triton kernels run on a CUDA device (TRITON_INTERPRET=1 runs them on the "
                          f"CPU for tests); the weight is on {device}")

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"])

    _dequant_kernel[grid](out, out.stride(0), N=n, K=k, **args.kwargs())
    return out
