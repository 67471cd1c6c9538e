"""Random packed weights of every format, shared by the kernel tests (Triton and native CPU)."""

from __future__ import annotations

import torch

from quantserve.kernels import api
from quantserve.kernels.gguf import BLOCK_SIZES
from quantserve.kernels.int4 import quantize_int4_grouped

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _signed_small(n: int, g: torch.Generator) -> torch.Tensor:
    """Scale-like values: magnitudes in [1e-3, 2e-2], random signs."""
    return (torch.rand(n, generator=g) * 0.019 + 0.001) * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)


def bnb(n, k, blocksize, nested, quant_type="nf4", dtype=torch.bfloat16, seed=0):
    import bitsandbytes.functional as BF

    w = (torch.randn(n, k, generator=_gen(seed)) * 0.05).to(dtype)
    data, state = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    return api.pack_bnb_4bit(data, state)


def int8_rows(n, k, kind, seed=0):
    g = _gen(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    if kind == "bnb":  # LLM.int8: row absmax, divided by 127
        return api.pack_int8_rows(q, torch.rand(n, generator=g) + 0.1, divisor=127.0)
    zero = torch.randint(-5, 6, (n, 1), dtype=torch.int8, generator=g)  # torchao: int zero point, bf16 result
    return api.pack_int8_rows(q, torch.rand(n, 1, generator=g) * 1e-3, zero, dtype=torch.bfloat16)


def fp8(n, k, dtype, per_row, seed=0):
    g = _gen(seed)
    q = (torch.randn(n, k, generator=g) * 8).to(dtype)  # finite codes only
    scale = torch.rand(n if per_row else 1, generator=g) * 1e-2 + 1e-3
    return api.pack_fp8(q, scale, dtype=None if per_row else torch.bfloat16)


def quanto(n, k, group, bits, seed=0):
    g = _gen(seed)
    group = group or k
    groups = n * k // group
    rows = -(-groups // (8 // bits))
    data = torch.randint(0, 256, (rows, group), dtype=torch.uint8, generator=g)
    return api.pack_quanto_grouped(data, (torch.rand(groups, generator=g) * 1e-2).bfloat16(),
                                   (torch.rand(groups, generator=g) * 1e-2).bfloat16(), (n, k), group, bits)


def nvfp4(n, k, seed=0):
    g = _gen(seed)
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, k // 16, generator=g) * 4 + 0.05).to(torch.float8_e4m3fn)
    return api.pack_nvfp4(codes, scales, 0.01)


def int4_blocks(n, k, block, seed=0):
    g = _gen(seed)
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    scales = torch.rand(n * k // block, generator=g) * 300 + 50  # ModelOpt keeps 7 / amax: large, positive
    return api.pack_int4_blocks(codes, scales, block)


GGUF_FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
                    "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}


def gguf_blocks(n, k, qtype, seed=0):
    """Random codes; fp16 scale fields of moderate size (so float16 products stay finite)."""
    per_block, block_bytes = BLOCK_SIZES[qtype]
    g = _gen(seed)
    if qtype in ("BF16", "F16", "F32"):
        dense = torch.randn(n, k, generator=g) * 0.05
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[qtype]
        return api.pack_gguf(dense.to(dtype).view(torch.uint8), qtype, (n, k))
    raw = torch.randint(0, 256, (n * k // per_block, block_bytes), dtype=torch.uint8, generator=g)
    for offset in GGUF_FP16_FIELDS[qtype]:
        raw[:, offset:offset + 2] = _signed_small(raw.shape[0], g).half().view(torch.uint8).reshape(-1, 2)
    return api.pack_gguf(raw, qtype, (n, k))


# name -> builder; N is 17 or 48 (odd and even), K ragged against the tiles wherever the format allows
CASES = {
    "nf4": lambda: bnb(17, 80, 64, False),
    "nf4_double_quant": lambda: bnb(17, 96, 32, True),
    "nf4_odd_k": lambda: bnb(17, 45, 64, False, dtype=torch.float16),
    "fp4_block128": lambda: bnb(48, 66, 128, True, quant_type="fp4", dtype=torch.float32),
    "int8_rows_bnb": lambda: int8_rows(17, 50, "bnb"),
    "int8_rows_torchao": lambda: int8_rows(48, 40, "torchao"),
    "float8_e4m3_rows": lambda: fp8(17, 50, torch.float8_e4m3fn, True),
    "float8_e5m2_tensor": lambda: fp8(17, 36, torch.float8_e5m2, False),
    "int4_torchao": lambda: quantize_int4_grouped(torch.randn(17, 96, generator=_gen(0)) * 0.02, 32),
    "quanto_int4": lambda: quanto(17, 128, 64, 4),
    "quanto_int2": lambda: quanto(17, 40, None, 2),
    "nvfp4": lambda: nvfp4(17, 48),
    "int4_blocks": lambda: int4_blocks(17, 96, 32),
    **{f"gguf_{q}": (lambda q=q: gguf_blocks(17, 2 * BLOCK_SIZES[q][0] if BLOCK_SIZES[q][0] > 1 else 40, q))
       for q in BLOCK_SIZES},
}


def build(name: str):
    """The packed weight of case `name` (bitsandbytes' torch fallback runs eagerly, not through dynamo)."""
    with torch._dynamo.config.patch(disable=True):
        return CASES[name]()
