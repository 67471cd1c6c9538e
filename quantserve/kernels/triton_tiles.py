"""Tile dequantization in Triton: one small @triton.jit helper per packed format, shared by every kernel skeleton.

A tile helper turns the packed bytes of a (BLOCK_N, BLOCK_K) tile of the weight into float32 values. The skeletons
(the dequantize kernel, the tiled and the split-K matmul) take the helper as the constexpr `TILE` and never know the
format, so every helper has one positional shape, in four groups:

    tile(<5 tensors>, <3 runtime scalars>, rn, rk, k0, mask, N, K, <3 compile-time constants>) -> float32 tile

and names each parameter for what it is in its format (tile_bnb4: codes_ptr, absmax_ptr, quant_map_ptr, ...;
parameters a format does not need are called unused_*). The skeletons pass the groups through as the slots
`w_ptr0..w_ptr4`, `w_arg0..w_arg2` and `W_META0..W_META2`, in the helper's order; kernels/triton_args.py binds a
packed weight's tensors and values to the helper's parameter names. `rn` holds the row indices (BLOCK_N, 1), `rk`
the column indices (1, BLOCK_K) = k0 + 0..BLOCK_K-1, `k0` the tile's first column (a multiple of BLOCK_K), `mask`
the in-bounds elements. Elements outside `mask` may hold anything; skeletons zero them.

Each element decodes its own code; scales are loaded once per (row, group) and spread over the group's columns
(`group_cols`, `spread`), and 16-entry code tables are looked up in registers (`lookup16`): per-element gathers of
scales made the builds for real GPUs spill registers and overflow shared memory (benchmarks/triton_aot.md). Where
a format's blocks may straddle rows (bitsandbytes and ModelOpt INT4 number blocks over the flat weight), the
per-group path needs K to be a multiple of the block (ROW_BLOCKS, decided at launch) and the helper falls back to
per-element gathers otherwise. The GGUF helper lives in kernels/triton_gguf.py, the shared pieces in
kernels/triton_common.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import INTERPRETED, group_cols, lookup16, nibbles, round_to, spread, u8_at
from .triton_gguf import tile_gguf

# --- bitsandbytes NF4 / FP4 -----------------------------------------------------------------------------------

@triton.jit
def tile_bnb4(codes_ptr, absmax_ptr, quant_map_ptr, nested_absmax_ptr, nested_map_ptr, nested_blocksize, offset,
              unused_arg2, rn, rk, k0, mask, N, K, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
              ROW_BLOCKS: tl.constexpr):
    """codes_ptr two codes per byte (flat, high nibble first); absmax_ptr float32 per block, or uint8 codes into
    nested_map_ptr (256) scaled per nested_blocksize blocks by nested_absmax_ptr, plus offset, when NESTED;
    quant_map_ptr the 16 code values; ROW_BLOCKS: K is a multiple of BLOCKSIZE (absmax loaded per block)."""
    BLOCK_K: tl.constexpr = rk.shape[1]
    if ROW_BLOCKS:  # K is a multiple of the block (so even): each row holds whole bytes and whole blocks
        code = nibbles(codes_ptr, rn * (K // 2), k0, K, rn < N, True, BLOCK_K)
        g, inside = group_cols(k0, K, BLOCKSIZE, BLOCK_K)
        block = rn * (K // BLOCKSIZE) + g
        at = (rn < N) & inside
    else:
        f = rn * K + rk
        byte = u8_at(codes_ptr + (f >> 1), mask)
        code = tl.where((f & 1) == 0, byte >> 4, byte & 15)
        block = f // BLOCKSIZE
        at = mask
    value = lookup16(quant_map_ptr, code)
    if NESTED:
        qabs = u8_at(absmax_ptr + block, at)
        absmax = (tl.load(nested_map_ptr + qabs, mask=at, other=0.0)
                  * tl.load(nested_absmax_ptr + block // nested_blocksize, mask=at, other=0.0) + offset)
    else:
        absmax = tl.load(absmax_ptr + block, mask=at, other=0.0)
    if ROW_BLOCKS:
        absmax = spread(absmax, BLOCKSIZE, BLOCK_K)
    return value * absmax


# --- int8 rows ------------------------------------------------------------------------------------------------

@triton.jit
def tile_int8_rows(codes_ptr, scale_ptr, zero_ptr, unused_ptr3, unused_ptr4, stride_n, divisor, unused_arg2,
                   rn, rk, k0, mask, N, K, HAS_ZERO: tl.constexpr, HAS_DIVISOR: tl.constexpr,
                   UNUSED_META2: tl.constexpr):
    """codes_ptr int8 (N, K) with row stride stride_n; scale_ptr a scale per row (divided by divisor when
    HAS_DIVISOR); zero_ptr a zero point per row when HAS_ZERO."""
    q = tl.load(codes_ptr + rn * stride_n + rk, mask=mask, other=0).to(tl.float32)
    rows = rn < N
    scale = tl.load(scale_ptr + rn, mask=rows, other=0.0).to(tl.float32)
    if HAS_DIVISOR:
        scale = scale / divisor
    if HAS_ZERO:
        q = q - tl.load(zero_ptr + rn, mask=rows, other=0).to(tl.float32)
    return q * scale


# --- float8 ---------------------------------------------------------------------------------------------------

@triton.jit
def f32_of_e4m3(b):
    """float8 e4m3fn bits (int32, 0..255) to float32 by integer arithmetic: no float8 instruction (sm_80)."""
    e = (b >> 3) & 15
    m = b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    v = tl.where((e == 15) & (m == 7), float("nan"), v)
    return tl.where(b >= 128, -v, v)


@triton.jit
def f32_of_e5m2(b):
    """float8 e5m2 bits (int32, 0..255) to float32 by integer arithmetic."""
    e = (b >> 2) & 31
    m = b & 3
    normal = (((e + 112) << 23) | (m << 21)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, m.to(tl.float32) * 0.0000152587890625, normal)
    v = tl.where(e == 31, tl.where(m == 0, float("inf"), float("nan")), v)
    return tl.where(b >= 128, -v, v)


@triton.jit
def tile_float8(codes_ptr, scale_ptr, unused_ptr2, unused_ptr3, unused_ptr4, stride_n, unused_arg1, unused_arg2,
                rn, rk, k0, mask, N, K, PER_ROW: tl.constexpr, BITS: tl.constexpr, UNUSED_META2: tl.constexpr):
    """codes_ptr float8 (N, K) with row stride stride_n; scale_ptr one scale per row (PER_ROW) or one in all.
    BITS: 0 the codes are float8 (converted by the GPU, sm_89+); 1 e4m3fn and 2 e5m2 codes read as uint8 and
    decoded by integer arithmetic (sm_80, which has no float8 conversion)."""
    if BITS == 0:
        q = tl.load(codes_ptr + rn * stride_n + rk, mask=mask).to(tl.float32)
    elif BITS == 1:
        q = f32_of_e4m3(u8_at(codes_ptr + rn * stride_n + rk, mask))
    else:
        q = f32_of_e5m2(u8_at(codes_ptr + rn * stride_n + rk, mask))
    if PER_ROW:
        scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    else:
        scale = tl.load(scale_ptr).to(tl.float32)
    return q * scale


# --- int4 grouped, torchao's layout ---------------------------------------------------------------------------

@triton.jit
def tile_int4_torchao(codes_ptr, scale_ptr, zero_ptr, unused_ptr3, unused_ptr4, stride_n, unused_arg1,
                      unused_arg2, rn, rk, k0, mask, N, K, GROUP_SIZE: tl.constexpr, UNUSED_META1: tl.constexpr,
                      UNUSED_META2: tl.constexpr):
    """codes_ptr int8 (N, K/2), even column in the low nibble, signed, row stride stride_n; scale_ptr and zero_ptr
    (K/GROUP_SIZE, N)."""
    BLOCK_K: tl.constexpr = rk.shape[1]
    code = nibbles(codes_ptr, rn * stride_n, k0, K, rn < N, False, BLOCK_K)
    q = ((code ^ 8) - 8).to(tl.float32)  # signed nibbles
    g, inside = group_cols(k0, K, GROUP_SIZE, BLOCK_K)
    at = g * N + rn
    gmask = (rn < N) & inside
    scale = spread(tl.load(scale_ptr + at, mask=gmask, other=0.0).to(tl.float32), GROUP_SIZE, BLOCK_K)
    zero = spread(tl.load(zero_ptr + at, mask=gmask, other=0.0).to(tl.float32), GROUP_SIZE, BLOCK_K)
    return q * scale + zero


# --- int4 / int2 grouped, quanto's layout ---------------------------------------------------------------------

@triton.jit
def tile_quanto(codes_ptr, scale_ptr, shift_ptr, unused_ptr3, unused_ptr4, packed_rows, stride_p, unused_arg2,
                rn, rk, k0, mask, N, K, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SCALE_NATIVE: tl.constexpr):
    """codes_ptr uint8 (packed_rows, GROUP_SIZE) packed along groups, row stride stride_p; scale_ptr and shift_ptr
    one per group; SCALE_NATIVE the scale dtype's rounding code (NATIVE_CODES)."""
    BLOCK_K: tl.constexpr = rk.shape[1]
    group = rn * (K // GROUP_SIZE) + rk // GROUP_SIZE
    byte = u8_at(codes_ptr + (group % packed_rows) * stride_p + rk % GROUP_SIZE, mask)
    q = ((byte >> ((group // packed_rows) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    g, inside = group_cols(k0, K, GROUP_SIZE, BLOCK_K)
    at = rn * (K // GROUP_SIZE) + g
    gmask = (rn < N) & inside
    scale = spread(tl.load(scale_ptr + at, mask=gmask, other=0.0).to(tl.float32), GROUP_SIZE, BLOCK_K)
    shift = spread(tl.load(shift_ptr + at, mask=gmask, other=0.0).to(tl.float32), GROUP_SIZE, BLOCK_K)
    return round_to(round_to(q * scale, SCALE_NATIVE) - shift, SCALE_NATIVE)


# --- NVFP4 ----------------------------------------------------------------------------------------------------

@triton.jit
def _e2m1(code):
    """The value of a 4-bit e2m1 code (sign bit 3, exponent bits 1-2, mantissa bit 0); code 8 gives +0.0."""
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, (1.0 + m * 0.5) * ((1 << e).to(tl.float32) * 0.5))
    return tl.where(code >= 8, 0.0 - mag, mag)


@triton.jit
def tile_nvfp4(codes_ptr, block_scale_ptr, global_scale_ptr, unused_ptr3, unused_ptr4, stride_n, stride_scale_n,
               unused_arg2, rn, rk, k0, mask, N, K, SCALE_BLOCK: tl.constexpr, BITS: tl.constexpr,
               UNUSED_META2: tl.constexpr):
    """codes_ptr uint8 (N, K/2) e2m1 codes, even column in the low nibble; block_scale_ptr float8 e4m3
    (N, K/SCALE_BLOCK), read as uint8 and decoded by integer arithmetic when BITS (sm_80); global_scale_ptr one
    float32; stride_n, stride_scale_n their row strides."""
    BLOCK_K: tl.constexpr = rk.shape[1]
    code = nibbles(codes_ptr, rn * stride_n, k0, K, rn < N, False, BLOCK_K)
    g, inside = group_cols(k0, K, SCALE_BLOCK, BLOCK_K)
    at = rn * stride_scale_n + g
    gmask = (rn < N) & inside
    if BITS:
        block_scale = f32_of_e4m3(u8_at(block_scale_ptr + at, gmask))
    else:
        block_scale = tl.load(block_scale_ptr + at, mask=gmask).to(tl.float32)
    scale = spread(block_scale * tl.load(global_scale_ptr), SCALE_BLOCK, BLOCK_K)
    return _e2m1(code) * scale


# --- int4 blocks (ModelOpt INT4) -------------------------------------------------------------------------------

@triton.jit
def tile_int4_blocks(codes_ptr, scale_ptr, unused_ptr2, unused_ptr3, unused_ptr4, stride_n, unused_arg1,
                     unused_arg2, rn, rk, k0, mask, N, K, SCALE_BLOCK: tl.constexpr, ROW_BLOCKS: tl.constexpr,
                     UNUSED_META2: tl.constexpr):
    """codes_ptr uint8 (N, K/2) codes offset by 8, even column in the high nibble, row stride stride_n; scale_ptr
    a float32 divisor per block of SCALE_BLOCK columns (row-major over the flat weight); ROW_BLOCKS: K is a
    multiple of SCALE_BLOCK (scales loaded per block)."""
    BLOCK_K: tl.constexpr = rk.shape[1]
    code = nibbles(codes_ptr, rn * stride_n, k0, K, rn < N, True, BLOCK_K)
    if ROW_BLOCKS:
        g, inside = group_cols(k0, K, SCALE_BLOCK, BLOCK_K)
        scale = tl.load(scale_ptr + rn * (K // SCALE_BLOCK) + g, mask=(rn < N) & inside, other=1.0)
        scale = spread(scale, SCALE_BLOCK, BLOCK_K)
    else:
        scale = tl.load(scale_ptr + (rn * K + rk) // SCALE_BLOCK, mask=mask, other=1.0)
    return (code - 8).to(tl.float32) / scale


__all__ = ["INTERPRETED", "f32_of_e4m3", "f32_of_e5m2", "tile_bnb4", "tile_float8", "tile_gguf", "tile_int4_blocks", "tile_int4_torchao",
           "tile_int8_rows", "tile_nvfp4", "tile_quanto"]
