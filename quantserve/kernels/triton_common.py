"""Shared pieces of quantserve's Triton kernels: whether they run interpreted, rounding and casting, byte loads.

Every other Triton module (the tile helpers of kernels/triton_tiles.py and kernels/triton_gguf.py, the skeletons of
kernels/triton_dequant.py and kernels/triton_matmul.py) builds on these.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# True when this module's kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = bool(triton.knobs.runtime.interpret)
if INTERPRETED:
    # Pin Triton's own knob (not the environment): Triton reads it again at run time (lazily imported modules,
    # constexpr functions), and the kernels built here stay interpreted even if TRITON_INTERPRET is unset later.
    triton.knobs.runtime.interpret = True

# rounding to the format's native dtype (the dtype the backend's own dequantization returns), as a constexpr code
NATIVE_CODES = {None: 0, torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# --- small shared helpers -------------------------------------------------------------------------------------

# Triton's interpreter (3.x) truncates float32 -> bfloat16 casts; a GPU rounds to nearest even. In the interpreter
# `cast_to` rounds by hand, so interpreted kernels compute what compiled ones do.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRETED)


@triton.jit
def cast_to(x, DTYPE: tl.constexpr):
    """float32 values to DTYPE, rounding to nearest even."""
    if _ROUND_BF16_BY_HAND and DTYPE == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        y = (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def round_to(x, NATIVE: tl.constexpr):
    """Round float32 values to bfloat16 (1) or float16 (2) and back; 0 leaves them."""
    if NATIVE == 1:
        x = cast_to(x, tl.bfloat16).to(tl.float32)
    elif NATIVE == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def u8_at(ptr, mask):
    """Bytes at `ptr` as int32 (0 where masked)."""
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def f16_at(ptr, mask):
    """A little-endian float16 stored in two bytes at `ptr`, as float32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)



__all__ = ["INTERPRETED", "NATIVE_CODES", "cast_to", "f16_at", "round_to", "u8_at"]
