"""Tile dequantization in Triton: one small @triton.jit helper per packed format, shared by every kernel skeleton.

A tile helper turns the packed bytes of a (BLOCK_N, BLOCK_K) tile of the weight into float32 values. All helpers
share one signature, so a skeleton (the dequantize kernel, the tiled and the split-K matmul) takes the helper as a
constexpr argument and never knows the format:

    tile(p0, p1, p2, p3, p4, i0, i1, i2, rn, rk, mask, N, K, C0, C1, C2) -> float32 tile

p0..p4 are the format's tensors, i0..i2 its runtime scalars (row strides, a divisor), C0..C2 its compile-time
constants (block size, bit width, ggml type), `rn` the row indices (BLOCK_N, 1), `rk` the column indices
(1, BLOCK_K), `mask` the in-bounds elements. Elements outside `mask` may hold anything; skeletons zero them.

Each element gathers its own codes and scales (the addresses of one tile's scales repeat, so they are served from
L1): any BLOCK_K works for any block size, and K needs no alignment beyond the format's own.

`tile_args(packed)` (Python) gives the helper and the arguments for one packed weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

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
from .gguf import BLOCK_SIZES as GGUF_BLOCK_SIZES
from .gguf import IQ4_LEVELS

# True when this module's kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = bool(triton.knobs.runtime.interpret)
if INTERPRETED:
    # Pin Triton's own knob (not the environment): Triton reads it again at run time (lazily imported modules,
    # constexpr functions), and the kernels built here stay interpreted even if TRITON_INTERPRET is unset later.
    triton.knobs.runtime.interpret = True

# rounding to the format's native dtype (the dtype the backend's own dequantization returns), as a constexpr code
NATIVE_CODES = {None: 0, torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# ggml types the GGUF tile helper decodes, by constexpr code
GGUF_CODES = {"Q4_0": 0, "Q4_1": 1, "Q5_0": 2, "Q5_1": 3, "Q8_0": 4, "Q2_K": 5, "Q3_K": 6, "Q4_K": 7, "Q5_K": 8,
              "Q6_K": 9, "IQ4_NL": 10, "IQ4_XS": 11, "BF16": 12, "F16": 13, "F32": 14}
assert set(GGUF_CODES) == set(GGUF_BLOCK_SIZES), "every ggml type of kernels/gguf.py has a Triton decoder"


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
def _u8(ptr, mask):
    """Bytes at `ptr` as int32 (0 where masked)."""
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16_at(ptr, mask):
    """A little-endian float16 stored in two bytes at `ptr`, as float32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


# --- bitsandbytes NF4 / FP4 -----------------------------------------------------------------------------------

@triton.jit
def tile_bnb4(p0, p1, p2, p3, p4, i0, i1, i2, rn, rk, mask, N, K, C0: tl.constexpr, C1: tl.constexpr,
              C2: tl.constexpr):
    """p0 codes (two per byte, flat, high nibble first), p1 absmax (float32, or uint8 when nested), p2 quant map
    (16 float32), p3 nested absmax, p4 nested quant map (256); i0 nested block size, i1 offset; C0 block size,
    C1 nested."""
    f = rn * K + rk
    byte = _u8(p0 + (f >> 1), mask)
    code = tl.where((f & 1) == 0, byte >> 4, byte & 15)
    value = tl.load(p2 + code, mask=mask, other=0.0)
    block = f // C0
    if C1:
        qabs = _u8(p1 + block, mask)
        absmax = tl.load(p4 + qabs, mask=mask, other=0.0) * tl.load(p3 + block // i0, mask=mask, other=0.0) + i1
    else:
        absmax = tl.load(p1 + block, mask=mask, other=0.0)
    return value * absmax


# --- int8 rows ------------------------------------------------------------------------------------------------

@triton.jit
def tile_int8_rows(p0, p1, p2, p3, p4, i0, i1, i2, rn, rk, mask, N, K, C0: tl.constexpr, C1: tl.constexpr,
                   C2: tl.constexpr):
    """p0 int8 codes (N, K), p1 scale per row, p2 zero point per row; i0 row stride, i1 divisor; C0 has zero
    point, C1 has divisor."""
    q = tl.load(p0 + rn * i0 + rk, mask=mask, other=0).to(tl.float32)
    rows = rn < N
    scale = tl.load(p1 + rn, mask=rows, other=0.0).to(tl.float32)
    if C1:
        scale = scale / i1
    if C0:
        q = q - tl.load(p2 + rn, mask=rows, other=0).to(tl.float32)
    return q * scale


# --- float8 ---------------------------------------------------------------------------------------------------

@triton.jit
def tile_float8(p0, p1, p2, p3, p4, i0, i1, i2, rn, rk, mask, N, K, C0: tl.constexpr, C1: tl.constexpr,
                C2: tl.constexpr):
    """p0 float8 codes (N, K), p1 scale (per row or one); i0 row stride; C0 per row."""
    q = tl.load(p0 + rn * i0 + rk, mask=mask).to(tl.float32)
    if C0:
        scale = tl.load(p1 + rn, mask=rn < N, other=0.0).to(tl.float32)
    else:
        scale = tl.load(p1).to(tl.float32)
    return q * scale


# --- int4 grouped, torchao's layout ---------------------------------------------------------------------------

@triton.jit
def tile_int4_torchao(p0, p1, p2, p3, p4, i0, i1, i2, rn, rk, mask, N, K, C0: tl.constexpr, C1: tl.constexpr,
                      C2: tl.constexpr):
    """p0 int8 (N, K/2), even column in the low nibble, signed; p1 scale, p2 zero point (K/g, N); i0 row stride;
    C0 group size."""
    byte = tl.load(p0 + rn * i0 + (rk >> 1), mask=mask, other=0)
    q = tl.where((rk & 1) == 0, (byte << 4) >> 4, byte >> 4).to(tl.float32)
    at = (rk // C0) * N + rn
    scale = tl.load(p1 + at, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(p2 + at, mask=mask, other=0.0).to(tl.float32)
    return q * scale + zero


# --- int4 / int2 grouped, quanto's layout ---------------------------------------------------------------------

@triton.jit
def tile_quanto(p0, p1, p2, p3, p4, i0, i1, i2, rn, rk, mask, N, K, C0: tl.constexpr, C1: tl.constexpr,
                C2: tl.constexpr):
    """p0 uint8 (P, g) packed along groups, p1 scale, p2 shift per group; i0 P (packed rows), i1 row stride;
    C0 bits, C1 group size, C2 the scale dtype's rounding code."""
    group = rn * (K // C1) + rk // C1
    byte = _u8(p0 + (group % i0) * i1 + rk % C1, mask)
    q = ((byte >> ((group // i0) * C0)) & ((1 << C0) - 1)).to(tl.float32)
    scale = tl.load(p1 + group, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(p2 + group, mask=mask, other=0.0).to(tl.float32)
    return round_to(round_to(q * scale, C2) - shift, C2)


# --- NVFP4 ----------------------------------------------------------------------------------------------------

@triton.jit
def _e2m1(code):
    """The value of a 4-bit e2m1 code (sign bit 3, exponent bits 1-2, mantissa bit 0); code 8 gives +0.0."""
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, (1.0 + m * 0.5) * ((1 << e).to(tl.float32) * 0.5))
    return tl.where(code >= 8, 0.0 - mag, mag)


@triton.jit
def tile_nvfp4(p0, p1, p2, p3, p4, i0, i1, i2, rn, rk, mask, N, K, C0: tl.constexpr, C1: tl.constexpr,
               C2: tl.constexpr):
    """p0 uint8 (N, K/2) e2m1 codes, even column in the low nibble; p1 float8 e4m3 block scales (N, K/C0); p2 the
    float32 global scale; i0, i1 row strides of p0, p1; C0 block size."""
    byte = _u8(p0 + rn * i0 + (rk >> 1), mask)
    code = tl.where((rk & 1) == 0, byte & 15, byte >> 4)
    block_scale = tl.load(p1 + rn * i1 + rk // C0, mask=mask).to(tl.float32)
    return _e2m1(code) * (block_scale * tl.load(p2))


# --- int4 blocks (ModelOpt INT4) -------------------------------------------------------------------------------

@triton.jit
def tile_int4_blocks(p0, p1, p2, p3, p4, i0, i1, i2, rn, rk, mask, N, K, C0: tl.constexpr, C1: tl.constexpr,
                     C2: tl.constexpr):
    """p0 uint8 (N, K/2) codes offset by 8, even column in the high nibble; p1 float32 divisor per block of C0
    columns (row-major over the flat weight); i0 row stride of p0."""
    byte = _u8(p0 + rn * i0 + (rk >> 1), mask)
    code = tl.where((rk & 1) == 0, byte >> 4, byte & 15)
    scale = tl.load(p1 + (rn * K + rk) // C0, mask=mask, other=1.0)
    return (code - 8).to(tl.float32) / scale


# --- GGUF: one decoder per ggml type, on (byte offset of the block, index inside the block) ---------------------

@triton.jit
def _q4_0(p, base, j, mask):
    q = ((_u8(p + base + 2 + j % 16, mask) >> ((j // 16) * 4)) & 15) - 8
    return _f16_at(p + base, mask) * q.to(tl.float32)


@triton.jit
def _q4_1(p, base, j, mask):
    q = (_u8(p + base + 4 + j % 16, mask) >> ((j // 16) * 4)) & 15
    return _f16_at(p + base, mask) * q.to(tl.float32) + _f16_at(p + base + 2, mask)


@triton.jit
def _q5_bits(p, qh_at, qs_at, j, mask):
    high = (_u8(p + qh_at + j // 8, mask) >> (j % 8)) & 1
    low = (_u8(p + qs_at + j % 16, mask) >> ((j // 16) * 4)) & 15
    return low | (high << 4)


@triton.jit
def _q5_0(p, base, j, mask):
    q = _q5_bits(p, base + 2, base + 6, j, mask) - 16
    return _f16_at(p + base, mask) * q.to(tl.float32)


@triton.jit
def _q5_1(p, base, j, mask):
    q = _q5_bits(p, base + 4, base + 8, j, mask)
    return _f16_at(p + base, mask) * q.to(tl.float32) + _f16_at(p + base + 2, mask)


@triton.jit
def _q8_0(p, base, j, mask):
    x = tl.load(p + base + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return x * _f16_at(p + base, mask)


@triton.jit
def _q2_k(p, base, j, mask):
    sc = _u8(p + base + j // 16, mask)
    t = j % 128
    q = (_u8(p + base + 16 + (j // 128) * 32 + t % 32, mask) >> ((t // 32) * 2)) & 3
    dl = _f16_at(p + base + 80, mask) * (sc & 15).to(tl.float32)
    ml = _f16_at(p + base + 82, mask) * (sc >> 4).to(tl.float32)
    return dl * q.to(tl.float32) - ml


@triton.jit
def _q3_k(p, base, j, mask):
    sb = j // 16
    low = (_u8(p + base + 96 + sb % 8, mask) >> ((sb // 8) * 4)) & 15
    high = (_u8(p + base + 104 + sb % 4, mask) >> ((sb // 4) * 2)) & 3
    sc = (low | (high << 4)) - 32
    t = j % 128
    ql = (_u8(p + base + 32 + (j // 128) * 32 + t % 32, mask) >> ((t // 32) * 2)) & 3
    hm = (_u8(p + base + j % 32, mask) >> (j // 32)) & 1
    q = ql - ((hm ^ 1) << 2)
    return (_f16_at(p + base + 108, mask) * sc.to(tl.float32)) * q.to(tl.float32)


@triton.jit
def _k_scale_min(p, at, sub, mask):
    """Q4_K/Q5_K: the 6-bit scale and min of sub-block `sub` (0..7) from the 12 bytes at `at`."""
    i = sub % 4
    a = _u8(p + at + i, mask)
    b = _u8(p + at + 4 + i, mask)
    c = _u8(p + at + 8 + i, mask)
    hi = sub >= 4
    sc = tl.where(hi, (c & 15) | ((a >> 2) & 0x30), a & 63)
    mn = tl.where(hi, (c >> 4) | ((b >> 2) & 0x30), b & 63)
    return sc, mn


@triton.jit
def _q4_k_low(p, qs_at, j, mask):
    t = j % 64
    return (_u8(p + qs_at + (j // 64) * 32 + t % 32, mask) >> ((t // 32) * 4)) & 15


@triton.jit
def _q4_k(p, base, j, mask):
    sc, mn = _k_scale_min(p, base + 4, j // 32, mask)
    q = _q4_k_low(p, base + 16, j, mask)
    d = _f16_at(p + base, mask) * sc.to(tl.float32)
    dm = _f16_at(p + base + 2, mask) * mn.to(tl.float32)
    return d * q.to(tl.float32) - dm


@triton.jit
def _q5_k(p, base, j, mask):
    sc, mn = _k_scale_min(p, base + 4, j // 32, mask)
    high = (_u8(p + base + 16 + j % 32, mask) >> (j // 32)) & 1
    q = _q4_k_low(p, base + 48, j, mask) | (high << 4)
    d = _f16_at(p + base, mask) * sc.to(tl.float32)
    dm = _f16_at(p + base + 2, mask) * mn.to(tl.float32)
    return d * q.to(tl.float32) - dm


@triton.jit
def _q6_k(p, base, j, mask):
    h = j // 128
    t = j % 128
    low = (_u8(p + base + h * 64 + t % 64, mask) >> ((t // 64) * 4)) & 15
    high = (_u8(p + base + 128 + h * 32 + t % 32, mask) >> ((t // 32) * 2)) & 3
    q = (low | (high << 4)) - 32
    sc = tl.load(p + base + 192 + j // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return (_f16_at(p + base + 208, mask) * sc) * q.to(tl.float32)


@triton.jit
def _iq4_nl(p, levels, base, j, mask):
    idx = (_u8(p + base + 2 + j % 16, mask) >> ((j // 16) * 4)) & 15
    return _f16_at(p + base, mask) * tl.load(levels + idx, mask=mask, other=0.0)


@triton.jit
def _iq4_xs(p, levels, base, j, mask):
    sub = j // 32
    high = (_u8(p + base + 2 + sub // 4, mask) >> ((sub % 4) * 2)) & 3
    low = (_u8(p + base + 4 + sub // 2, mask) >> ((sub % 2) * 4)) & 15
    sc = (low | (high << 4)) - 32
    t = j % 32
    idx = (_u8(p + base + 8 + sub * 16 + t % 16, mask) >> ((t // 16) * 4)) & 15
    return (_f16_at(p + base, mask) * sc.to(tl.float32)) * tl.load(levels + idx, mask=mask, other=0.0)


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
def tile_gguf(p0, p1, p2, p3, p4, i0, i1, i2, rn, rk, mask, N, K, C0: tl.constexpr, C1: tl.constexpr,
              C2: tl.constexpr):
    """p0 raw ggml blocks (N, bytes per row), p1 the IQ4 levels (16 float32); i0 row stride; C0 ggml type code,
    C1 weights per block, C2 bytes per block."""
    j = rk % C1
    base = rn * i0 + (rk // C1) * C2
    if C0 == 0:
        w = _q4_0(p0, base, j, mask)
    elif C0 == 1:
        w = _q4_1(p0, base, j, mask)
    elif C0 == 2:
        w = _q5_0(p0, base, j, mask)
    elif C0 == 3:
        w = _q5_1(p0, base, j, mask)
    elif C0 == 4:
        w = _q8_0(p0, base, j, mask)
    elif C0 == 5:
        w = _q2_k(p0, base, j, mask)
    elif C0 == 6:
        w = _q3_k(p0, base, j, mask)
    elif C0 == 7:
        w = _q4_k(p0, base, j, mask)
    elif C0 == 8:
        w = _q5_k(p0, base, j, mask)
    elif C0 == 9:
        w = _q6_k(p0, base, j, mask)
    elif C0 == 10:
        w = _iq4_nl(p0, p1, base, j, mask)
    elif C0 == 11:
        w = _iq4_xs(p0, p1, base, j, mask)
    elif C0 == 12:
        w = _bf16(p0, base, mask)
    elif C0 == 13:
        w = _f16_at(p0 + base, mask)
    else:
        w = _f32(p0, base, mask)
    return w


# --- Python side: the helper and its arguments for one packed weight -------------------------------------------

@dataclass(frozen=True)
class TileArgs:
    """What a skeleton needs to dequantize tiles of one packed weight."""

    tile: Any
    ptrs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    ints: tuple[Any, Any, Any]
    consts: tuple[int, int, int]
    native: int
    shape: tuple[int, int]

    def kwargs(self) -> dict[str, Any]:
        p0, p1, p2, p3, p4 = self.ptrs
        i0, i1, i2 = self.ints
        c0, c1, c2 = self.consts
        return dict(p0=p0, p1=p1, p2=p2, p3=p3, p4=p4, i0=i0, i1=i1, i2=i2, TILE=self.tile, C0=c0, C1=c1, C2=c2,
                    NATIVE=self.native)


_SPECS: dict[type, Callable[[Any], TileArgs]] = {}
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _spec(cls: type) -> Callable:
    def register(fn: Callable[[Any], TileArgs]) -> Callable[[Any], TileArgs]:
        _SPECS[cls] = fn
        return fn

    return register


def _ptrs(*tensors: torch.Tensor | None) -> tuple:
    """Five pointer arguments: unused slots repeat the first tensor (never read)."""
    first = tensors[0]
    padded = [t if t is not None else first for t in tensors] + [first] * (5 - len(tensors))
    return tuple(padded)


def _table(name: str, values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    key = (name, device)
    if key not in _TABLES:
        _TABLES[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _TABLES[key]


def _native(packed: Any) -> int:
    return NATIVE_CODES[getattr(packed, "dtype", None)]


@_spec(BnB4bit)
def _bnb4_args(p: BnB4bit) -> TileArgs:
    if p.nested:
        ptrs = _ptrs(p.data, p.absmax, p.quant_map, p.nested_absmax, p.nested_quant_map)
        ints = (int(p.nested_blocksize), float(p.offset), 0)
    else:
        ptrs, ints = _ptrs(p.data, p.absmax, p.quant_map), (1, 0.0, 0)
    return TileArgs(tile_bnb4, ptrs, ints, (p.blocksize, int(p.nested), 0), _native(p), p.shape)


@_spec(Int8Rows)
def _int8_args(p: Int8Rows) -> TileArgs:
    has_div = float(p.divisor) != 1.0
    return TileArgs(tile_int8_rows, _ptrs(p.qdata, p.scale, p.zero_point),
                    (p.qdata.stride(0), float(p.divisor), 0), (int(p.zero_point is not None), int(has_div), 0),
                    _native(p), p.shape)


@_spec(Float8)
def _float8_args(p: Float8) -> TileArgs:
    return TileArgs(tile_float8, _ptrs(p.qdata, p.scale), (p.qdata.stride(0), 0, 0), (int(p.per_row), 0, 0),
                    _native(p), p.shape)


@_spec(Int4Grouped)
def _int4_args(p: Int4Grouped) -> TileArgs:
    scale, zero = p.scale.contiguous(), p.zero_point.contiguous()
    if p.qdata.stride(1) != 1:
        raise FormatError(f"Int4Grouped.qdata: expected unit column stride, got strides {p.qdata.stride()}")
    return TileArgs(tile_int4_torchao, _ptrs(p.qdata, scale, zero), (p.qdata.stride(0), 0, 0),
                    (p.group_size, 0, 0), 0, tuple(p.shape))


@_spec(QuantoGrouped)
def _quanto_args(p: QuantoGrouped) -> TileArgs:
    return TileArgs(tile_quanto, _ptrs(p.data, p.scale, p.shift), (p.packed_rows, p.data.stride(0), 0),
                    (p.bits, p.group_size, NATIVE_CODES[p.scale.dtype]), 0, p.shape)


@_spec(NVFP4)
def _nvfp4_args(p: NVFP4) -> TileArgs:
    return TileArgs(tile_nvfp4, _ptrs(p.qdata, p.block_scale, p.global_scale),
                    (p.qdata.stride(0), p.block_scale.stride(0), 0), (p.block_size, 0, 0), 0, p.shape)


@_spec(Int4Blocks)
def _int4_blocks_args(p: Int4Blocks) -> TileArgs:
    return TileArgs(tile_int4_blocks, _ptrs(p.qdata, p.scale), (p.qdata.stride(0), 0, 0), (p.block_size, 0, 0), 0,
                    p.shape)


@_spec(GGUFBlocks)
def _gguf_args(p: GGUFBlocks) -> TileArgs:
    per_block, block_bytes = GGUF_BLOCK_SIZES[p.qtype]
    levels = _table("iq4", tuple(float(v) for v in IQ4_LEVELS), p.data.device)
    return TileArgs(tile_gguf, _ptrs(p.data, levels), (p.data.stride(0), 0, 0),
                    (GGUF_CODES[p.qtype], per_block, block_bytes), 0, p.shape)


def tile_args(packed: PackedWeight) -> TileArgs:
    """The tile helper and its arguments for one packed weight."""
    fn = _SPECS.get(type(packed))
    if fn is None:
        raise FormatError(f"triton: no tile decoder for {type(packed).__name__}; accepted: "
                          f"{', '.join(c.__name__ for c in _SPECS)}")
    args = fn(packed)
    n, k = args.shape
    if n * k >= 2**31:
        raise FormatError(f"triton: a {n}x{k} weight has {n * k} elements; the kernels index with int32 "
                          "(fewer than 2**31 elements)")
    return args


def supported_formats() -> tuple[type, ...]:
    return tuple(_SPECS)
