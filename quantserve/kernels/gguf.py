"""GGUF (ggml) block formats: the torch reference dequantizers, from raw ggml bytes to float.

A quantized GGUF tensor is a run of fixed-size blocks, each encoding `block_size` consecutive weights of one row
(32 for the legacy types and IQ4_NL, 256 for the K-quants and IQ4_XS). The layouts below follow ggml's
`block_q*` structs (ggml-common.h), as gguf-py's `gguf/quants.py` documents them; the float arithmetic is done in
float32 in the same order as gguf-py, so the results are bit-exact against `gguf.quants.dequantize`.

Pure torch, vectorized over blocks; this module knows nothing of files, configs or backends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

QK_K = 256

# name -> (weights per block, bytes per block), as ggml's GGML_QUANT_SIZES
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 2 + 16),
    "Q4_1": (32, 2 + 2 + 16),
    "Q5_0": (32, 2 + 4 + 16),
    "Q5_1": (32, 2 + 2 + 4 + 16),
    "Q8_0": (32, 2 + 32),
    "Q2_K": (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    "Q3_K": (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    "Q4_K": (QK_K, 2 + 2 + 12 + QK_K // 2),
    "Q5_K": (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    "Q6_K": (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    "IQ4_NL": (32, 2 + 16),
    "IQ4_XS": (QK_K, 2 + 2 + QK_K // 64 + QK_K // 2),
}

DENSE_TYPES = ("F32", "F16", "BF16")
QUANTIZED_TYPES = tuple(t for t in BLOCK_SIZES if t not in DENSE_TYPES)

# the 16 non-linear levels of IQ4_NL and IQ4_XS (ggml's kvalues_iq4nl)
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def qtype_name(qtype: Any) -> str:
    """The ggml type name ("Q4_K") of a name in any case or a `gguf.GGMLQuantizationType`."""
    name = getattr(qtype, "name", qtype)
    if not isinstance(name, str):
        raise TypeError(f"qtype: expected a ggml type name or GGMLQuantizationType, got {qtype!r}")
    return name.upper()


def block_size(qtype: Any) -> int:
    """Weights per block of a ggml type (32 or 256 for quantized types, 1 for F32/F16/BF16)."""
    return _sizes(qtype)[0]


def type_size(qtype: Any) -> int:
    """Bytes per block of a ggml type."""
    return _sizes(qtype)[1]


def row_bytes(qtype: Any, n: int) -> int:
    """Bytes that `n` consecutive weights (a multiple of the block size) take in that type."""
    bs, ts = _sizes(qtype)
    if n % bs:
        raise ValueError(f"{qtype_name(qtype)}: a row of {n} weights is not a multiple of the block size {bs}")
    return n // bs * ts


def _sizes(qtype: Any) -> tuple[int, int]:
    name = qtype_name(qtype)
    if name not in BLOCK_SIZES:
        raise ValueError(f"qtype: {name!r} is not a ggml type the torch reference handles; "
                         f"accepted: {', '.join(BLOCK_SIZES)}")
    return BLOCK_SIZES[name]


# --- small helpers -------------------------------------------------------------------------------------------

def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) little-endian fp16 bytes -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _shifts(values: Sequence[int], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.uint8, device=device).reshape(*shape)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Bytes (n, k*group) -> 4-bit codes (n, k, 2*group): per group of bytes, the low nibbles, then the high ones."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group) >> _shifts((0, 4), (1, 1, 2, 1), qs.device)
    return (q & 0x0F).reshape(n, -1, 2 * group)


def _crumbs(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Bytes (n, k*group) -> 2-bit codes (n, k, 4*group): bits 0-1 of each byte of a group, then 2-3, 4-5, 6-7."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), qs.device)
    return (q & 0x03).reshape(n, -1, 4 * group)


def _bits(qh: torch.Tensor, group: int) -> torch.Tensor:
    """Bytes (n, k*group) -> 1-bit codes (n, k, 8*group): bit 0 of each byte of a group, then bit 1, ... bit 7."""
    n = qh.shape[0]
    q = qh.reshape(n, -1, 1, group) >> _shifts(range(8), (1, 1, 8, 1), qh.device)
    return (q & 0x01).reshape(n, -1, 8 * group)


def _bits_le(b: torch.Tensor) -> torch.Tensor:
    """Bytes (n, k) of a little-endian integer -> its 8k bits (n, 8k), least significant first."""
    n = b.shape[0]
    return ((b.reshape(n, -1, 1) >> _shifts(range(8), (1, 1, 8), b.device)) & 0x01).reshape(n, -1)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (as ggml's get_scale_min_k4)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=device)


# --- one dequantizer per type: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 ----------------------

def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], -1).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], -1).to(torch.float32)
    return d * q + m


def _q5(b: torch.Tensor) -> torch.Tensor:
    """The 5-bit codes of Q5_0/Q5_1 from their 4 qh bytes and 16 qs bytes (the last 20 bytes of a block)."""
    qh = _bits_le(b[:, -20:-16])
    ql = _nibbles(b[:, -16:], 16).reshape(b.shape[0], -1)
    return ql | (qh << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _q5(b).to(torch.int8) - 16
    return _f16(b[:, :2]) * q.to(torch.float32)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _q5(b).to(torch.float32) + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    x = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return x * d


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = _crumbs(qs, 32).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    low = _nibbles(scales[:, :8], 8).reshape(n, 16)
    high = _crumbs(scales[:, 8:12], 4).reshape(n, 16)
    sc = (low | (high << 4)).to(torch.int8) - 32
    dl = (d * sc.to(torch.float32)).reshape(n, 16, 1)
    ql = _crumbs(qs, 32).reshape(n, 16, 16)
    qh = _bits(hmask, 32).reshape(n, 16, 16) ^ 1  # a set hmask bit means "no -4 offset"
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    qh = _bits(b[:, 16:48], 32).reshape(n, 8, 32)
    ql = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, 8, 32)
    high = _crumbs(qh, 32).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).to(torch.float32)).reshape(n, QK_K)


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    idx = _nibbles(b[:, 2:], 16).reshape(b.shape[0], -1)
    return d * _levels(b.device)[idx.long()]


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    # 2 high bits per scale from a little-endian uint16: scale i takes bits 2i, 2i+1
    high = ((b[:, 2:4].reshape(n, 2, 1) >> _shifts((0, 2, 4, 6), (1, 1, 4), b.device)) & 0x03).reshape(n, 8)
    low = (b[:, 4:8].reshape(n, 4, 1) >> _shifts((0, 4), (1, 1, 2), b.device)).reshape(n, 8) & 0x0F
    sc = (low | (high << 4)).to(torch.int8) - 32
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    idx = _nibbles(b[:, 8:], 16)
    return (dl * _levels(b.device)[idx.long()]).reshape(n, QK_K)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    bits = b.contiguous().view(torch.int16).to(torch.int32) << 16
    return bits.view(torch.float32)


def _fp16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def _fp32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


_DEQUANTIZERS = {
    "F32": _fp32, "F16": _fp16, "BF16": _bf16,
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs,
}


def dequantize_gguf(raw: torch.Tensor, qtype: Any, shape: Sequence[int],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw ggml bytes (a uint8 tensor of whole blocks, any shape) of type `qtype` -> a dense tensor of `shape`.

    Computed in float32 (bit-exact against gguf-py), then cast to `dtype`. `shape` is in torch order: its last
    dimension runs along the blocks (a weight's in_features).
    """
    name = qtype_name(qtype)
    bs, ts = _sizes(name)
    if raw.dtype != torch.uint8:
        raise TypeError(f"dequantize_gguf: raw must be a uint8 tensor of {name} blocks, got {raw.dtype}")
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if shape and shape[-1] % bs:
        raise ValueError(f"dequantize_gguf: last dimension {shape[-1]} of shape {shape} is not a multiple of the "
                         f"{name} block size {bs}")
    if raw.numel() != numel // bs * ts:
        raise ValueError(f"dequantize_gguf: {raw.numel()} bytes of {name} hold {raw.numel() // ts * bs} weights "
                         f"({ts} bytes per {bs}), but shape {shape} has {numel}")
    blocks = raw.reshape(-1, ts)
    out = _DEQUANTIZERS[name](blocks)
    return out.reshape(shape).to(dtype)
