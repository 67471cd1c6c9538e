"""The GGUF tile helper in Triton: raw ggml blocks of any supported type to float32 tiles.

Each ggml type is decoded in two parts, computing what kernels/gguf.py computes in the same float32 order:
- its scales, once per (row, sub-block) of SUB weights (the run of weights sharing one scale and one offset:
  32 for the legacy types, IQ4_NL, Q4_K, Q5_K and IQ4_XS; 16 for Q2_K, Q3_K and Q6_K), as `mul` and `add`
  (BLOCK_N, groups) tensors, spread over the tile (triton_common.spread);
- its code per element, from (byte offset of the block, index inside the block).
w = mul * q + add. Loading scales per element made the split-K builds spill up to 7 KB per thread
(benchmarks/triton_aot.md). `tile_gguf` picks the type by the constexpr QTYPE and follows the tile helpers'
signature (kernels/triton_tiles.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gguf import BLOCK_SIZES as GGUF_BLOCK_SIZES
from .triton_common import f16_at, group_cols, lookup16, spread, u8_at

# ggml types the GGUF tile helper decodes, by constexpr code
GGUF_CODES = {"Q4_0": 0, "Q4_1": 1, "Q5_0": 2, "Q5_1": 3, "Q8_0": 4, "Q2_K": 5, "Q3_K": 6, "Q4_K": 7, "Q5_K": 8,
              "Q6_K": 9, "IQ4_NL": 10, "IQ4_XS": 11, "BF16": 12, "F16": 13, "F32": 14}
assert set(GGUF_CODES) == set(GGUF_BLOCK_SIZES), "every ggml type of kernels/gguf.py has a Triton decoder"


# --- per-element codes, on (byte offset of the block, index j inside the block) ---------------------------------

@triton.jit
def _code_q4_0(p, base, j, mask):
    return ((u8_at(p + base + 2 + j % 16, mask) >> ((j // 16) * 4)) & 15) - 8


@triton.jit
def _code_q4_1(p, base, j, mask):
    return (u8_at(p + base + 4 + j % 16, mask) >> ((j // 16) * 4)) & 15


@triton.jit
def _q5_bits(p, qh_at, qs_at, j, mask):
    high = (u8_at(p + qh_at + j // 8, mask) >> (j % 8)) & 1
    low = (u8_at(p + qs_at + j % 16, mask) >> ((j // 16) * 4)) & 15
    return low | (high << 4)


@triton.jit
def _code_q8_0(p, base, j, mask):
    return tl.load(p + base + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.int32)


@triton.jit
def _code_q2_k(p, base, j, mask):
    t = j % 128
    return (u8_at(p + base + 16 + (j // 128) * 32 + t % 32, mask) >> ((t // 32) * 2)) & 3


@triton.jit
def _code_q3_k(p, base, j, mask):
    t = j % 128
    ql = (u8_at(p + base + 32 + (j // 128) * 32 + t % 32, mask) >> ((t // 32) * 2)) & 3
    hm = (u8_at(p + base + j % 32, mask) >> (j // 32)) & 1
    return ql - ((hm ^ 1) << 2)


@triton.jit
def _q4_k_low(p, qs_at, j, mask):
    t = j % 64
    return (u8_at(p + qs_at + (j // 64) * 32 + t % 32, mask) >> ((t // 32) * 4)) & 15


@triton.jit
def _code_q5_k(p, base, j, mask):
    high = (u8_at(p + base + 16 + j % 32, mask) >> (j // 32)) & 1
    return _q4_k_low(p, base + 48, j, mask) | (high << 4)


@triton.jit
def _code_q6_k(p, base, j, mask):
    h = j // 128
    t = j % 128
    low = (u8_at(p + base + h * 64 + t % 64, mask) >> ((t // 64) * 4)) & 15
    high = (u8_at(p + base + 128 + h * 32 + t % 32, mask) >> ((t // 32) * 2)) & 3
    return (low | (high << 4)) - 32


@triton.jit
def _code_iq4_xs(p, base, j, mask):
    t = j % 32
    return (u8_at(p + base + 8 + (j // 32) * 16 + t % 16, mask) >> ((t // 16) * 4)) & 15


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


# --- per-sub-block scales, on (byte offset of the block, sub-block index s inside it) --------------------------

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
def _scales(p, base, s, mask, QTYPE: tl.constexpr):
    """(mul, add) of sub-block s of the block at byte `base`: w = mul * code + add."""
    zero = tl.full(base.shape, 0.0, tl.float32)
    if QTYPE == 0 or QTYPE == 2 or QTYPE == 4 or QTYPE == 10:  # Q4_0, Q5_0, Q8_0, IQ4_NL: d
        mul = f16_at(p + base, mask)
        add = zero
    elif QTYPE == 1 or QTYPE == 3:  # Q4_1, Q5_1: d, m
        mul = f16_at(p + base, mask)
        add = f16_at(p + base + 2, mask)
    elif QTYPE == 5:  # Q2_K
        sc = u8_at(p + base + s, mask)
        mul = f16_at(p + base + 80, mask) * (sc & 15).to(tl.float32)
        add = 0.0 - f16_at(p + base + 82, mask) * (sc >> 4).to(tl.float32)
    elif QTYPE == 6:  # Q3_K
        low = (u8_at(p + base + 96 + s % 8, mask) >> ((s // 8) * 4)) & 15
        high = (u8_at(p + base + 104 + s % 4, mask) >> ((s // 4) * 2)) & 3
        mul = f16_at(p + base + 108, mask) * ((low | (high << 4)) - 32).to(tl.float32)
        add = zero
    elif QTYPE == 7 or QTYPE == 8:  # Q4_K, Q5_K
        sc, mn = _k_scale_min(p, base + 4, s, mask)
        mul = f16_at(p + base, mask) * sc.to(tl.float32)
        add = 0.0 - f16_at(p + base + 2, mask) * mn.to(tl.float32)
    elif QTYPE == 9:  # Q6_K
        sc = tl.load(p + base + 192 + s, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        mul = f16_at(p + base + 208, mask) * sc
        add = zero
    else:  # IQ4_XS
        high = (u8_at(p + base + 2 + s // 4, mask) >> ((s % 4) * 2)) & 3
        low = (u8_at(p + base + 4 + s // 2, mask) >> ((s % 2) * 4)) & 15
        mul = f16_at(p + base, mask) * ((low | (high << 4)) - 32).to(tl.float32)
        add = zero
    return mul, add


@triton.jit
def tile_gguf(blocks_ptr, levels_ptr, unused_ptr2, unused_ptr3, unused_ptr4, stride_n, unused_arg1, unused_arg2,
              rn, rk, k0, mask, N, K, QTYPE: tl.constexpr, BLOCK_WEIGHTS: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """blocks_ptr raw ggml blocks (N, bytes per row), levels_ptr the IQ4 levels (16 float32); stride_n its row
    stride; QTYPE the ggml type's code (GGUF_CODES), BLOCK_WEIGHTS weights and BLOCK_BYTES bytes per block."""
    BLOCK_K: tl.constexpr = rk.shape[1]
    base = rn * stride_n + (rk // BLOCK_WEIGHTS) * BLOCK_BYTES
    if QTYPE == 12:
        w = _bf16(blocks_ptr, base, mask)
    elif QTYPE == 13:
        w = f16_at(blocks_ptr + base, mask)
    elif QTYPE == 14:
        w = _f32(blocks_ptr, base, mask)
    else:
        j = rk % BLOCK_WEIGHTS
        if QTYPE == 0:
            q = _code_q4_0(blocks_ptr, base, j, mask).to(tl.float32)
        elif QTYPE == 1:
            q = _code_q4_1(blocks_ptr, base, j, mask).to(tl.float32)
        elif QTYPE == 2:
            q = (_q5_bits(blocks_ptr, base + 2, base + 6, j, mask) - 16).to(tl.float32)
        elif QTYPE == 3:
            q = _q5_bits(blocks_ptr, base + 4, base + 8, j, mask).to(tl.float32)
        elif QTYPE == 4:
            q = _code_q8_0(blocks_ptr, base, j, mask).to(tl.float32)
        elif QTYPE == 5:
            q = _code_q2_k(blocks_ptr, base, j, mask).to(tl.float32)
        elif QTYPE == 6:
            q = _code_q3_k(blocks_ptr, base, j, mask).to(tl.float32)
        elif QTYPE == 7:
            q = _q4_k_low(blocks_ptr, base + 16, j, mask).to(tl.float32)
        elif QTYPE == 8:
            q = _code_q5_k(blocks_ptr, base, j, mask).to(tl.float32)
        elif QTYPE == 9:
            q = _code_q6_k(blocks_ptr, base, j, mask).to(tl.float32)
        elif QTYPE == 10:
            q = lookup16(levels_ptr, _code_q4_0(blocks_ptr, base, j, mask) + 8)
        else:
            q = lookup16(levels_ptr, _code_iq4_xs(blocks_ptr, base, j, mask))
        # one scale and offset per sub-block of SUB weights, loaded once per (row, sub-block)
        SUB: tl.constexpr = 16 if (QTYPE == 5 or QTYPE == 6 or QTYPE == 9) else 32
        g, inside = group_cols(k0, K, SUB, BLOCK_K)
        first = g * SUB
        gbase = rn * stride_n + (first // BLOCK_WEIGHTS) * BLOCK_BYTES
        mul, add = _scales(blocks_ptr, gbase, (first % BLOCK_WEIGHTS) // SUB, (rn < N) & inside, QTYPE)
        if QTYPE == 1 or QTYPE == 3 or QTYPE == 5 or QTYPE == 7 or QTYPE == 8:
            w = spread(mul, SUB, BLOCK_K) * q + spread(add, SUB, BLOCK_K)
        else:
            w = spread(mul, SUB, BLOCK_K) * q
    return w


__all__ = ["GGUF_CODES", "tile_gguf"]
