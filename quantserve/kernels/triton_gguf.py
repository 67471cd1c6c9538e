"""The GGUF tile helper in Triton: raw ggml blocks of any supported type to float32 tiles.

One small @triton.jit decoder per ggml type, on (byte offset of the block, index inside the block), each computing
what kernels/gguf.py computes; `tile_gguf` picks one by the constexpr QTYPE and follows the tile helpers' signature
(kernels/triton_tiles.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gguf import BLOCK_SIZES as GGUF_BLOCK_SIZES
from .triton_common import f16_at, lookup16, u8_at

# ggml types the GGUF tile helper decodes, by constexpr code
GGUF_CODES = {"Q4_0": 0, "Q4_1": 1, "Q5_0": 2, "Q5_1": 3, "Q8_0": 4, "Q2_K": 5, "Q3_K": 6, "Q4_K": 7, "Q5_K": 8,
              "Q6_K": 9, "IQ4_NL": 10, "IQ4_XS": 11, "BF16": 12, "F16": 13, "F32": 14}
assert set(GGUF_CODES) == set(GGUF_BLOCK_SIZES), "every ggml type of kernels/gguf.py has a Triton decoder"


# --- GGUF: one decoder per ggml type, on (byte offset of the block, index inside the block) ---------------------

@triton.jit
def _q4_0(p, base, j, mask):
    q = ((u8_at(p + base + 2 + j % 16, mask) >> ((j // 16) * 4)) & 15) - 8
    return f16_at(p + base, mask) * q.to(tl.float32)


@triton.jit
def _q4_1(p, base, j, mask):
    q = (u8_at(p + base + 4 + j % 16, mask) >> ((j // 16) * 4)) & 15
    return f16_at(p + base, mask) * q.to(tl.float32) + f16_at(p + base + 2, mask)


@triton.jit
def _q5_bits(p, qh_at, qs_at, j, mask):
    high = (u8_at(p + qh_at + j // 8, mask) >> (j % 8)) & 1
    low = (u8_at(p + qs_at + j % 16, mask) >> ((j // 16) * 4)) & 15
    return low | (high << 4)


@triton.jit
def _q5_0(p, base, j, mask):
    q = _q5_bits(p, base + 2, base + 6, j, mask) - 16
    return f16_at(p + base, mask) * q.to(tl.float32)


@triton.jit
def _q5_1(p, base, j, mask):
    q = _q5_bits(p, base + 4, base + 8, j, mask)
    return f16_at(p + base, mask) * q.to(tl.float32) + f16_at(p + base + 2, mask)


@triton.jit
def _q8_0(p, base, j, mask):
    x = tl.load(p + base + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return x * f16_at(p + base, mask)


@triton.jit
def _q2_k(p, base, j, mask):
    sc = u8_at(p + base + j // 16, mask)
    t = j % 128
    q = (u8_at(p + base + 16 + (j // 128) * 32 + t % 32, mask) >> ((t // 32) * 2)) & 3
    dl = f16_at(p + base + 80, mask) * (sc & 15).to(tl.float32)
    ml = f16_at(p + base + 82, mask) * (sc >> 4).to(tl.float32)
    return dl * q.to(tl.float32) - ml


@triton.jit
def _q3_k(p, base, j, mask):
    sb = j // 16
    low = (u8_at(p + base + 96 + sb % 8, mask) >> ((sb // 8) * 4)) & 15
    high = (u8_at(p + base + 104 + sb % 4, mask) >> ((sb // 4) * 2)) & 3
    sc = (low | (high << 4)) - 32
    t = j % 128
    ql = (u8_at(p + base + 32 + (j // 128) * 32 + t % 32, mask) >> ((t // 32) * 2)) & 3
    hm = (u8_at(p + base + j % 32, mask) >> (j // 32)) & 1
    q = ql - ((hm ^ 1) << 2)
    return (f16_at(p + base + 108, mask) * sc.to(tl.float32)) * q.to(tl.float32)


@triton.jit
def _k_scale_min(p, at, sub, mask):
    """Q4_K/Q5_K: the 6-bit scale and min of sub-block `sub` (0..7) from the 12 bytes at `at`."""
    i = sub % 4
    a = u8_at(p + at + i, mask)
    b = u8_at(p + at + 4 + i, mask)
    c = u8_at(p + at + 8 + i, mask)
    hi = sub >= 4
    sc = tl.where(hi, (c & 15) | ((a >> 2) & 0x30), a & 63)
    mn = tl.where(hi, (c >> 4) | ((b >> 2) & 0x30), b & 63)
    return sc, mn


@triton.jit
def _q4_k_low(p, qs_at, j, mask):
    t = j % 64
    return (u8_at(p + qs_at + (j // 64) * 32 + t % 32, mask) >> ((t // 32) * 4)) & 15


@triton.jit
def _q4_k(p, base, j, mask):
    sc, mn = _k_scale_min(p, base + 4, j // 32, mask)
    q = _q4_k_low(p, base + 16, j, mask)
    d = f16_at(p + base, mask) * sc.to(tl.float32)
    dm = f16_at(p + base + 2, mask) * mn.to(tl.float32)
    return d * q.to(tl.float32) - dm


@triton.jit
def _q5_k(p, base, j, mask):
    sc, mn = _k_scale_min(p, base + 4, j // 32, mask)
    high = (u8_at(p + base + 16 + j % 32, mask) >> (j // 32)) & 1
    q = _q4_k_low(p, base + 48, j, mask) | (high << 4)
    d = f16_at(p + base, mask) * sc.to(tl.float32)
    dm = f16_at(p + base + 2, mask) * mn.to(tl.float32)
    return d * q.to(tl.float32) - dm


@triton.jit
def _q6_k(p, base, j, mask):
    h = j // 128
    t = j % 128
    low = (u8_at(p + base + h * 64 + t % 64, mask) >> ((t // 64) * 4)) & 15
    high = (u8_at(p + base + 128 + h * 32 + t % 32, mask) >> ((t // 32) * 2)) & 3
    q = (low | (high << 4)) - 32
    sc = tl.load(p + base + 192 + j // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return (f16_at(p + base + 208, mask) * sc) * q.to(tl.float32)


@triton.jit
def _iq4_nl(p, levels, base, j, mask):
    idx = (u8_at(p + base + 2 + j % 16, mask) >> ((j // 16) * 4)) & 15
    return f16_at(p + base, mask) * lookup16(levels, idx)


@triton.jit
def _iq4_xs(p, levels, base, j, mask):
    sub = j // 32
    high = (u8_at(p + base + 2 + sub // 4, mask) >> ((sub % 4) * 2)) & 3
    low = (u8_at(p + base + 4 + sub // 2, mask) >> ((sub % 2) * 4)) & 15
    sc = (low | (high << 4)) - 32
    t = j % 32
    idx = (u8_at(p + base + 8 + sub * 16 + t % 16, mask) >> ((t // 16) * 4)) & 15
    return (f16_at(p + base, mask) * sc.to(tl.float32)) * lookup16(levels, idx)


@triton.jit
def _bf16(p, base, mask):
    lo = tl.load(p + base, mask=mask, other=0).to(tl.uint32)
    hi = tl.load(p + base + 1, mask=mask, other=0).to(tl.uint32)
    return ((lo | (hi << 8)) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32(p, base, mask):
    b0 = tl.load(p + base, mask=mask, other=0).to(tl.uint32)
    b1 = tl.load(p + base + 1, mask=mask, other=0).to(tl.uint32)
    b2 = tl.load(p + base + 2, mask=mask, other=0).to(tl.uint32)
    b3 = tl.load(p + base + 3, mask=mask, other=0).to(tl.uint32)
    return (b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)).to(tl.float32, bitcast=True)


@triton.jit
def tile_gguf(blocks_ptr, levels_ptr, unused_ptr2, unused_ptr3, unused_ptr4, stride_n, unused_arg1, unused_arg2,
              rn, rk, k0, mask, N, K, QTYPE: tl.constexpr, BLOCK_WEIGHTS: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """blocks_ptr raw ggml blocks (N, bytes per row), levels_ptr the IQ4 levels (16 float32); stride_n its row
    stride; QTYPE the ggml type's code (GGUF_CODES), BLOCK_WEIGHTS weights and BLOCK_BYTES bytes per block."""
    j = rk % BLOCK_WEIGHTS
    base = rn * stride_n + (rk // BLOCK_WEIGHTS) * BLOCK_BYTES
    if QTYPE == 0:
        w = _q4_0(blocks_ptr, base, j, mask)
    elif QTYPE == 1:
        w = _q4_1(blocks_ptr, base, j, mask)
    elif QTYPE == 2:
        w = _q5_0(blocks_ptr, base, j, mask)
    elif QTYPE == 3:
        w = _q5_1(blocks_ptr, base, j, mask)
    elif QTYPE == 4:
        w = _q8_0(blocks_ptr, base, j, mask)
    elif QTYPE == 5:
        w = _q2_k(blocks_ptr, base, j, mask)
    elif QTYPE == 6:
        w = _q3_k(blocks_ptr, base, j, mask)
    elif QTYPE == 7:
        w = _q4_k(blocks_ptr, base, j, mask)
    elif QTYPE == 8:
        w = _q5_k(blocks_ptr, base, j, mask)
    elif QTYPE == 9:
        w = _q6_k(blocks_ptr, base, j, mask)
    elif QTYPE == 10:
        w = _iq4_nl(blocks_ptr, levels_ptr, base, j, mask)
    elif QTYPE == 11:
        w = _iq4_xs(blocks_ptr, levels_ptr, base, j, mask)
    elif QTYPE == 12:
        w = _bf16(blocks_ptr, base, mask)
    elif QTYPE == 13:
        w = f16_at(blocks_ptr + base, mask)
    else:
        w = _f32(blocks_ptr, base, mask)
    return w


__all__ = ["GGUF_CODES", "tile_gguf"]
