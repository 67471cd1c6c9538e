"""quantserve.kernels: packed weight formats, torch reference dequantizers and Triton kernels."""

from .api import (
    dequantize,
    linear,
    pack_bnb_4bit,
    pack_fp8,
    pack_gguf,
    pack_int4_blocks,
    pack_int4_grouped,
    pack_int8_rows,
    pack_nvfp4,
    pack_quanto_grouped,
    triton_problem,
)
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

__all__ = [
    "BnB4bit", "Float8", "FormatError", "GGUFBlocks", "Int4Blocks", "Int4Grouped", "Int8Rows", "NVFP4",
    "PackedWeight", "QuantoGrouped", "dequantize", "linear", "pack_bnb_4bit", "pack_fp8", "pack_gguf",
    "pack_int4_blocks", "pack_int4_grouped",
    "pack_int8_rows", "pack_nvfp4", "pack_quanto_grouped", "triton_problem",
]
