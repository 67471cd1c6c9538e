"""The arguments of a Triton tile helper for one packed weight: each format's Triton spec, bound by name.

A spec (registered as the format's `triton` entry in kernels/format_ops.py) names its tile helper
(kernels/triton_tiles.py, kernels/triton_gguf.py) and gives the packed weight's tensors and values by the helper's
own parameter names (`codes_ptr=p.data, absmax_ptr=p.absmax, BLOCKSIZE=p.blocksize, ...`). `bind` puts them in
the skeletons' slots in the helper's order: tensors in `w_ptr0..w_ptr4`, runtime scalars in `w_arg0..w_arg2`,
compile-time constants in `W_META0..W_META2`. A slot the format does not use gets the first tensor (never read)
or 0.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from .format_ops import implementation, registers
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
from .triton_common import NATIVE_CODES
from .triton_gguf import GGUF_CODES
from .triton_tiles import (
    tile_bnb4,
    tile_float8,
    tile_gguf,
    tile_int4_blocks,
    tile_int4_torchao,
    tile_int8_rows,
    tile_nvfp4,
    tile_quanto,
)

PTR_SLOTS = tuple(f"w_ptr{i}" for i in range(5))
ARG_SLOTS = tuple(f"w_arg{i}" for i in range(3))
META_SLOTS = tuple(f"W_META{i}" for i in range(3))
TILE_INDICES = ("rn", "rk", "k0", "mask", "N", "K")  # what the skeleton passes between the scalars and the constants


@dataclass(frozen=True)
class TileArgs:
    """What a skeleton needs to dequantize tiles of one packed weight: the helper and its slot values."""

    tile: Any
    ptrs: tuple[torch.Tensor, ...]
    ints: tuple[Any, ...]
    consts: tuple[int, ...]
    native: int
    shape: tuple[int, int]

    def kwargs(self) -> dict[str, Any]:
        """The skeletons' keyword arguments: TILE, the slots, NATIVE."""
        return dict(zip(PTR_SLOTS, self.ptrs), **dict(zip(ARG_SLOTS, self.ints)), TILE=self.tile,
                    **dict(zip(META_SLOTS, self.consts)), NATIVE=self.native)


def parameters(tile: Any) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """A tile helper's parameter names by group: (tensors, runtime scalars, constants)."""
    names = tuple(inspect.signature(tile.fn).parameters)
    ptrs, args, indices, metas = names[:5], names[5:8], names[8:14], names[14:]
    if indices != TILE_INDICES or len(metas) != len(META_SLOTS):
        raise TypeError(f"{tile.fn.__name__}: a tile helper takes 5 tensors, 3 scalars, {', '.join(TILE_INDICES)}, "
                        f"3 constants; got ({', '.join(names)})")
    return ptrs, args, metas


def bind(tile: Any, native: int, shape: tuple[int, int], **named: Any) -> TileArgs:
    """TileArgs for `tile` from its arguments given by parameter name (the first tensor is required)."""
    ptrs, args, metas = parameters(tile)
    unknown = sorted(set(named) - set(ptrs + args + metas))
    if unknown:
        raise TypeError(f"{tile.fn.__name__}: no parameter {', '.join(unknown)}; it takes "
                        f"{', '.join(ptrs + args + metas)}")
    first = named[ptrs[0]]
    return TileArgs(tile, tuple(first if named.get(p) is None else named[p] for p in ptrs),
                    tuple(named.get(a, 0) for a in args), tuple(named.get(c, 0) for c in metas), native, shape)


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    key = (name, device)
    if key not in _TABLES:
        _TABLES[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _TABLES[key]


def _native(packed: Any) -> int:
    return NATIVE_CODES[getattr(packed, "dtype", None)]


@registers(BnB4bit, "triton")
def _bnb4_args(p: BnB4bit) -> TileArgs:
    nested = dict(nested_absmax_ptr=p.nested_absmax, nested_map_ptr=p.nested_quant_map,
                  nested_blocksize=int(p.nested_blocksize), offset=float(p.offset)) if p.nested else \
        dict(nested_blocksize=1, offset=0.0)
    return bind(tile_bnb4, _native(p), p.shape, codes_ptr=p.data, absmax_ptr=p.absmax, quant_map_ptr=p.quant_map,
                BLOCKSIZE=p.blocksize, NESTED=int(p.nested), ROW_BLOCKS=int(p.shape[-1] % p.blocksize == 0),
                **nested)


@registers(Int8Rows, "triton")
def _int8_args(p: Int8Rows) -> TileArgs:
    return bind(tile_int8_rows, _native(p), p.shape, codes_ptr=p.qdata, scale_ptr=p.scale, zero_ptr=p.zero_point,
                stride_n=p.qdata.stride(0), divisor=float(p.divisor), HAS_ZERO=int(p.zero_point is not None),
                HAS_DIVISOR=int(float(p.divisor) != 1.0))


# float8 conversion instructions exist from compute capability 8.9 (Ada); below, float8 codes are read as bytes and
# decoded by integer arithmetic (bit-exact: tests/kernels/test_triton_kernels.py checks all 256 codes)
FLOAT8_HARDWARE = (8, 9)


def float8_by_bits(capability: tuple[int, int] | None) -> bool:
    """Whether the kernels decode float8 codes by integer arithmetic on a GPU of this compute capability."""
    return capability is not None and tuple(capability) < FLOAT8_HARDWARE


def _capability(tensor: torch.Tensor) -> tuple[int, int] | None:
    if tensor.device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(tensor.device)


@registers(Float8, "triton")
def _float8_args(p: Float8, capability: tuple[int, int] | None = None) -> TileArgs:
    codes, bits = p.qdata, 0
    if float8_by_bits(capability or _capability(p.qdata)):
        codes, bits = p.qdata.view(torch.uint8), 1 if p.qdata.dtype == torch.float8_e4m3fn else 2
    return bind(tile_float8, _native(p), p.shape, codes_ptr=codes, scale_ptr=p.scale, stride_n=p.qdata.stride(0),
                PER_ROW=int(p.per_row), BITS=bits)


@registers(Int4Grouped, "triton")
def _int4_args(p: Int4Grouped) -> TileArgs:
    scale, zero = p.scale.contiguous(), p.zero_point.contiguous()
    if p.qdata.stride(1) != 1:
        raise FormatError(f"Int4Grouped.qdata: expected unit column stride, got strides {p.qdata.stride()}")
    return bind(tile_int4_torchao, 0, tuple(p.shape), codes_ptr=p.qdata, scale_ptr=scale, zero_ptr=zero,
                stride_n=p.qdata.stride(0), GROUP_SIZE=p.group_size)


@registers(QuantoGrouped, "triton")
def _quanto_args(p: QuantoGrouped) -> TileArgs:
    return bind(tile_quanto, 0, p.shape, codes_ptr=p.data, scale_ptr=p.scale, shift_ptr=p.shift,
                packed_rows=p.packed_rows, stride_p=p.data.stride(0), BITS=p.bits, GROUP_SIZE=p.group_size,
                SCALE_NATIVE=NATIVE_CODES[p.scale.dtype])


@registers(NVFP4, "triton")
def _nvfp4_args(p: NVFP4, capability: tuple[int, int] | None = None) -> TileArgs:
    bits = float8_by_bits(capability or _capability(p.qdata))
    scales = p.block_scale.view(torch.uint8) if bits else p.block_scale
    return bind(tile_nvfp4, 0, p.shape, codes_ptr=p.qdata, block_scale_ptr=scales,
                global_scale_ptr=p.global_scale, stride_n=p.qdata.stride(0), stride_scale_n=p.block_scale.stride(0),
                SCALE_BLOCK=p.block_size, BITS=int(bits))


@registers(Int4Blocks, "triton")
def _int4_blocks_args(p: Int4Blocks) -> TileArgs:
    return bind(tile_int4_blocks, 0, p.shape, codes_ptr=p.qdata, scale_ptr=p.scale, stride_n=p.qdata.stride(0),
                SCALE_BLOCK=p.block_size, ROW_BLOCKS=int(p.shape[-1] % p.block_size == 0))


@registers(GGUFBlocks, "triton")
def _gguf_args(p: GGUFBlocks) -> TileArgs:
    per_block, block_bytes = GGUF_BLOCK_SIZES[p.qtype]
    levels = _table("iq4", tuple(float(v) for v in IQ4_LEVELS), p.data.device)
    return bind(tile_gguf, 0, p.shape, blocks_ptr=p.data, levels_ptr=levels, stride_n=p.data.stride(0),
                QTYPE=GGUF_CODES[p.qtype], BLOCK_WEIGHTS=per_block, BLOCK_BYTES=block_bytes)


# --- decode budgets -------------------------------------------------------------------------------------------
# The highest per-thread cost (triton_common.thread_cost: weight elements decoded per K step plus a quarter of the
# float32 accumulators) each decoder compiles for without spilling registers to local memory on sm_80, sm_89 and
# sm_90, per matmul skeleton: measured with `python -m quantserve.kernels.aot --configs all --suggest-budgets` over
# every config, bf16 and fp16, with the budgets wide open (benchmarks/triton_aot.md), checked by
# tests/kernels/test_aot.py. A
# spill turns a weight-bandwidth-bound kernel local-memory-bound, so the autotuner never tries a config over its
# decoder's budget (triton_common.within_budget). Decoders not named take the default (every shipped config:
# split-K costs 16..66, tiled 20..64).
DECODE_BUDGETS: dict[str, dict[str, int]] = {
    "splitk": {"default": 66, "tile_bnb4": 33, "tile_bnb4:nested": 32, "tile_int4_torchao": 33, "tile_int8_rows": 34,
               "gguf:F32": 34, "gguf:Q4_0": 34, "gguf:Q4_K": 34, "gguf:Q5_0": 34, "gguf:Q5_K": 34, "gguf:Q6_K": 34},
    "tiled": {"default": 64, "tile_bnb4:nested": 48, "gguf:BF16": 48, "gguf:F16": 48, "gguf:F32": 48,
              "gguf:Q8_0": 48, "gguf:IQ4_NL": 36, "gguf:Q6_K": 36, "gguf:Q3_K": 32, "gguf:Q5_0": 32, "gguf:Q5_K": 24},
}
_GGUF_NAMES = {code: name for name, code in GGUF_CODES.items()}


def decoder_name(tile: Any, meta0: int, meta1: int = 0) -> str:
    """The decoder a tile helper and its first two constants select: the helper's name, gguf:<ggml type>, or
    tile_bnb4:nested for double-quantized bitsandbytes 4-bit."""
    name = getattr(getattr(tile, "fn", tile), "__name__", str(tile))
    if name == "tile_gguf":
        return f"gguf:{_GGUF_NAMES[int(meta0)]}"
    if name == "tile_bnb4" and int(meta1):
        return "tile_bnb4:nested"
    return name


def decode_budget(kernel: str, tile: Any, meta0: int, meta1: int = 0) -> int:
    """The per-thread cost budget of the decoder of (`tile`, `meta0`, `meta1`) in `kernel` (splitk, tiled)."""
    table = DECODE_BUDGETS[kernel]
    return table.get(decoder_name(tile, meta0, meta1), table["default"])


def tile_args(packed: PackedWeight, capability: tuple[int, int] | None = None) -> TileArgs:
    """The tile helper and its arguments for one packed weight, by its format's registered spec, for a GPU of
    `capability` (default: the packed weight's own device; ahead-of-time builds name their target's)."""
    spec = implementation(packed, "triton", "triton")
    args = spec(packed, capability) if "capability" in inspect.signature(spec).parameters else spec(packed)
    n, k = args.shape
    if n * k >= 2**31:
        raise FormatError(f"triton: a {n}x{k} weight has {n * k} elements; the kernels index with int32 "
                          "(fewer than 2**31 elements)")
    return args


__all__ = ["ARG_SLOTS", "DECODE_BUDGETS", "FLOAT8_HARDWARE", "decode_budget", "decoder_name", "float8_by_bits", "META_SLOTS", "PTR_SLOTS", "TileArgs", "bind", "parameters", "tile_args"]
