"""int4_grouped: grouped asymmetric int4 weights, two codes per byte, a scale and a zero point per group.

The arithmetic and layout are torchao's int4 weight-only (`Int4Tensor`, plain packing, as its `mslk`
`int4_row_quantize_zp` + `pack_int4` make it), so the tensors of one are the tensors of the other:

- a code q in [-8, 7] per weight; w = q * scale + zero, where zero = group minimum + 8 * scale;
- `qdata`: int8 (N, K // 2); byte j of a row holds column 2j in its low nibble and column 2j + 1 in its high
  nibble, each as a two's-complement 4-bit number;
- `scale`, `zero_point`: (K // group_size, N) in the scale dtype (bf16 by default), column-major per group as torchao
  keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_MIN, INT4_MAX = -8, 7


@dataclass(frozen=True)
class Int4Grouped:
    """The packed tensors of one (N, K) weight and the group size that ties them together."""

    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    group_size: int

    def __post_init__(self) -> None:
        n, half_k = self.qdata.shape
        k = 2 * half_k
        if self.qdata.dtype != torch.int8:
            raise ValueError(f"int4_grouped.qdata: expected int8 (two codes per byte), got {self.qdata.dtype}")
        if self.group_size <= 0 or k % self.group_size:
            raise ValueError(f"int4_grouped.group_size: {self.group_size} does not divide in_features {k}")
        want = (k // self.group_size, n)
        for field in ("scale", "zero_point"):
            got = tuple(getattr(self, field).shape)
            if got != want:
                raise ValueError(f"int4_grouped.{field}: expected shape {want} for a {n}x{k} weight in groups of "
                                 f"{self.group_size}, got {got}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.qdata.shape[0], 2 * self.qdata.shape[1]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], (N, K) with K even, to int8 (N, K // 2): even columns low nibble, odd columns high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dimension must be even, got {tuple(codes.shape)}")
    low = torch.bitwise_and(codes[..., ::2], 0xF)
    high = torch.bitwise_left_shift(codes[..., 1::2], 4)
    return torch.bitwise_or(low, high).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: int8 (N, K // 2) to int8 codes (N, K), sign-extended."""
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(packed, 4), 4)  # arithmetic shift sign-extends
    high = torch.bitwise_right_shift(packed, 4)
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def quantize_int4_grouped(weight: torch.Tensor, group_size: int = 128,
                          scale_dtype: torch.dtype = torch.bfloat16) -> Int4Grouped:
    """Min-max asymmetric int4 per group of `group_size` input columns, computed in float32 as torchao does."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"quantize_int4_grouped: in_features {k} is not a multiple of group_size {group_size}")
    groups = weight.detach().to(torch.float32).reshape(-1, group_size)
    lo = groups.amin(dim=1, keepdim=True)
    hi = groups.amax(dim=1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-6) / (INT4_MAX - INT4_MIN)
    zero = lo + scale * -INT4_MIN
    codes = groups.sub(lo).div(scale).round().clamp_(0, INT4_MAX - INT4_MIN)
    codes = (codes + INT4_MIN).to(torch.int8).reshape(n, k)
    return Int4Grouped(pack_int4(codes), _per_group_t(scale, n, scale_dtype), _per_group_t(zero, n, scale_dtype),
                       group_size)


def int4_grouped_from_unsigned(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                               scale_dtype: torch.dtype = torch.bfloat16) -> Int4Grouped:
    """From codes in [0, 15] with w = (code - 8) * scale + zero (torchao's tinygemm/HQQ output), scale and zero
    given one per group in row-major group order."""
    n = codes.shape[0]
    signed = (codes.to(torch.int16) + INT4_MIN).to(torch.int8)
    return Int4Grouped(pack_int4(signed), _per_group_t(scale, n, scale_dtype), _per_group_t(zero, n, scale_dtype),
                       group_size)


def dequantize_int4_grouped(packed: Int4Grouped, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The torch reference: w = q * scale + zero per group, in float32, then cast to `dtype`."""
    n, k = packed.shape
    codes = unpack_int4(packed.qdata).to(torch.float32).reshape(n, k // packed.group_size, packed.group_size)
    scale = packed.scale.to(torch.float32).t().unsqueeze(-1)
    zero = packed.zero_point.to(torch.float32).t().unsqueeze(-1)
    return (codes * scale + zero).reshape(n, k).to(dtype)


def _per_group_t(values: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """One value per group, row-major (N * K/g), to torchao's (K/g, N) layout."""
    return values.reshape(n, -1).t().contiguous().to(dtype)
