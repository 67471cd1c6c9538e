"""The torch reference dequantizer of every packed format: plain, vectorized torch, the yardstick of every kernel.

Each reference computes in float32 in the order the producing library does (bitsandbytes, torchao, optimum-quanto,
modelopt, ggml/gguf-py), rounds to the format's `dtype` (the dtype that library's dequantization returns) and
then casts to the dtype asked for; the tests hold them bit for bit against the libraries' own dequantization.
Each is registered as its format's `reference` in kernels/format_ops.py, the one table every kernel family
dispatches through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .format_ops import implementation, registers
from .formats import (
    E2M1_VALUES,
    NVFP4,
    BnB4bit,
    Float8,
    GGUFBlocks,
    Int4Blocks,
    Int4Grouped,
    Int8Rows,
    PackedWeight,
    QuantoGrouped,
)
from .gguf import dequantize_gguf
from .int4 import dequantize_int4_grouped

def bnb_absmax(p: BnB4bit) -> torch.Tensor:
    """The float32 absmax per block; double-quantized: bitsandbytes' dequantize_blockwise, then + offset."""
    if not p.nested:
        return p.absmax.reshape(-1)
    codes = p.nested_quant_map.reshape(-1)[p.absmax.reshape(-1).long()]
    scale = p.nested_absmax.reshape(-1).repeat_interleave(p.nested_blocksize)[: codes.numel()]
    return codes * scale + torch.tensor(p.offset, dtype=torch.float32, device=codes.device)


@registers(BnB4bit, "reference")
def _bnb_4bit(p: BnB4bit) -> torch.Tensor:
    n, k = p.shape
    numel = n * k
    data = p.data.reshape(-1)
    codes = torch.empty(2 * data.numel(), dtype=torch.long, device=data.device)
    codes[0::2] = (data >> 4).long()
    codes[1::2] = (data & 0x0F).long()
    values = p.quant_map.reshape(-1)[codes[:numel]]
    absmax = bnb_absmax(p).repeat_interleave(p.blocksize)[:numel]
    return (values * absmax).reshape(n, k)


@registers(Int8Rows, "reference")
def _int8_rows(p: Int8Rows) -> torch.Tensor:
    n = p.qdata.shape[0]
    q = p.qdata.float()
    if p.zero_point is not None:
        q = q - p.zero_point.reshape(n, 1).float()
    scale = p.scale.reshape(n, 1).float()
    if float(p.divisor) != 1.0:
        scale = scale / float(p.divisor)
    return q * scale


@registers(Float8, "reference")
def _float8(p: Float8) -> torch.Tensor:
    scale = p.scale.float().reshape(-1, 1) if p.per_row else p.scale.float().reshape(())
    return p.qdata.float() * scale


@registers(Int4Grouped, "reference")
def _int4_grouped(p: Int4Grouped) -> torch.Tensor:
    return dequantize_int4_grouped(p, torch.float32)


@registers(QuantoGrouped, "reference")
def _quanto_grouped(p: QuantoGrouped) -> torch.Tensor:
    """quanto's QBitsDequantizer: scale * codes, then minus shift, each rounded to the scale's dtype."""
    n, k = p.shape
    groups = n * k // p.group_size
    r = torch.arange(groups, device=p.data.device)
    rows, fields = r % p.packed_rows, r // p.packed_rows
    codes = (p.data[rows] >> (p.bits * fields).to(torch.uint8).unsqueeze(1)) & ((1 << p.bits) - 1)
    w = p.scale.reshape(groups, 1) * codes
    w = w - p.shift.reshape(groups, 1)
    return w.reshape(n, k)


@registers(NVFP4, "reference")
def _nvfp4(p: NVFP4) -> torch.Tensor:
    n, k = p.shape
    codes = torch.empty(n, k, dtype=torch.long, device=p.qdata.device)
    codes[:, 0::2] = (p.qdata & 0x0F).long()
    codes[:, 1::2] = (p.qdata >> 4).long()
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)[codes]
    per_block = p.block_scale.float() * p.global_scale.reshape(()).float()
    return (values.view(n, -1, p.block_size) * per_block.unsqueeze(-1)).reshape(n, k)


@registers(Int4Blocks, "reference")
def _int4_blocks(p: Int4Blocks) -> torch.Tensor:
    """ModelOpt's INT4QTensor.dequantize: (code - 8) / scale per block, in float32."""
    n, k = p.shape
    codes = torch.empty(n, k, dtype=torch.long, device=p.qdata.device)
    codes[:, 0::2] = (p.qdata >> 4).long()
    codes[:, 1::2] = (p.qdata & 0x0F).long()
    return ((codes - 8).view(-1, p.block_size) / p.scale.reshape(-1, 1)).reshape(n, k)


@registers(GGUFBlocks, "reference")
def _gguf(p: GGUFBlocks) -> torch.Tensor:
    return dequantize_gguf(p.data, p.qtype, p.shape, torch.float32)


def dequantize(packed: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense (N, K) weight of any packed format, in `dtype` (rounded first to the format's own `dtype`)."""
    w = implementation(packed, "reference", "dequantize")(packed)
    native = getattr(packed, "dtype", None)
    if native is not None and w.dtype != native:
        w = w.to(native)
    return w if w.dtype == dtype else w.to(dtype)


def linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias with the weight dequantized to x's dtype: the yardstick of the fused kernels."""
    return F.linear(x, dequantize(packed, x.dtype), None if bias is None else bias.to(x.dtype))
