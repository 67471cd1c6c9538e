"""The torch reference dequantizers of GGUF blocks, held bit-exact (float32) against gguf-py's numpy ones."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT

from quantserve.kernels.gguf import (
    BLOCK_SIZES,
    QUANTIZED_TYPES,
    block_size,
    dequantize_gguf,
    qtype_name,
    row_bytes,
    type_size,
)

# byte offsets of each type's fp16 fields (d, dmin) inside one block, from ggml's block_* structs
FP16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,),
}
GGUF_PY_QUANTIZES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def random_blocks(qtype: str, n_blocks: int, seed: int) -> np.ndarray:
    """Valid random blocks: random bytes, with every fp16 field set to a finite value (any finite bit pattern:
    negatives, zeros and subnormals included)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, type_size(qtype)), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        bits = rng.integers(0, 1 << 16, size=n_blocks, dtype=np.uint16)
        bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0xBFFF, bits)  # exponent all ones (inf/nan) -> finite
        raw[:, offset:offset + 2] = bits.astype("<u2").view(np.uint8).reshape(n_blocks, 2)
    return raw


def assert_bit_exact(ours: torch.Tensor, theirs: np.ndarray) -> None:
    theirs = np.ascontiguousarray(theirs, dtype=np.float32)
    assert tuple(ours.shape) == theirs.shape
    assert ours.dtype == torch.float32
    mismatch = ours.contiguous().view(torch.int32).numpy() != theirs.view(np.int32)
    assert not mismatch.any(), f"{mismatch.sum()} values differ; first at {np.argwhere(mismatch)[0]}"


def test_block_table_matches_ggml():
    assert set(QUANTIZED_TYPES) == set(FP16_FIELDS)
    for name, sizes in BLOCK_SIZES.items():
        assert sizes == gguf.GGML_QUANT_SIZES[GT[name]], name


@pytest.mark.parametrize("qtype", QUANTIZED_TYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blocks_bit_exact_against_gguf_py(qtype, seed):
    bs = block_size(qtype)
    rows, cols = 3 + seed, bs * (2 + seed)  # non-square, several blocks per row
    raw = random_blocks(qtype, rows * cols // bs, seed).reshape(rows, -1)
    theirs = gguf.quants.dequantize(raw, GT[qtype])
    ours = dequantize_gguf(torch.from_numpy(raw), qtype, (rows, cols))
    assert_bit_exact(ours, theirs)


@pytest.mark.parametrize("qtype", GGUF_PY_QUANTIZES)
def test_blocks_quantized_by_gguf_py_bit_exact(qtype):
    data = np.random.default_rng(7).standard_normal((6, 128)).astype(np.float32) * 0.05
    raw = gguf.quants.quantize(data, GT[qtype])
    ours = dequantize_gguf(torch.from_numpy(raw), GT[qtype], data.shape)  # the enum is accepted too
    assert_bit_exact(ours, gguf.quants.dequantize(raw, GT[qtype]))


def test_bf16_f16_f32_bit_exact():
    data = np.random.default_rng(3).standard_normal((5, 24)).astype(np.float32) * 100
    raw = gguf.quants.quantize(data, GT.BF16)
    assert_bit_exact(dequantize_gguf(torch.from_numpy(raw), "bf16", data.shape), gguf.quants.dequantize(raw, GT.BF16))
    # the extremes of bf16: NaN payloads and infinities pass through as bits
    special = np.array([0x7FC1, 0xFF80, 0x7F80, 0x0001, 0x8000], dtype=np.uint16)
    out = dequantize_gguf(torch.from_numpy(special.view(np.uint8)), "BF16", (5,))
    assert out.view(torch.int32).numpy().view(np.uint32).tolist() == [int(v) << 16 for v in special]
    half = data.astype(np.float16)
    assert_bit_exact(dequantize_gguf(torch.from_numpy(half.view(np.uint8)), "F16", data.shape),
                     gguf.quants.dequantize(half, GT.F16))
    assert_bit_exact(dequantize_gguf(torch.from_numpy(data.view(np.uint8)), "F32", data.shape), data)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "IQ4_XS"])
def test_any_byte_layout_and_leading_dims(qtype):
    """Blocks may come flat or (rows, bytes); shapes with more than two dims keep their leading dims."""
    bs = block_size(qtype)
    raw = random_blocks(qtype, 2 * 3 * 2, seed=5)
    shape = (2, 3, 2 * bs)
    flat = dequantize_gguf(torch.from_numpy(raw).reshape(-1), qtype, shape)
    rows = dequantize_gguf(torch.from_numpy(raw).reshape(6, -1), qtype, shape)
    assert flat.shape == shape and torch.equal(flat, rows)
    assert_bit_exact(flat, gguf.quants.dequantize(raw.reshape(6, -1), GT[qtype]).reshape(shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_dtype_is_the_float32_result_cast(dtype):
    raw = torch.from_numpy(random_blocks("Q6_K", 4, seed=9))
    f32 = dequantize_gguf(raw, "Q6_K", (2, 512))
    low = dequantize_gguf(raw, "Q6_K", (2, 512), dtype)
    assert low.dtype == dtype and torch.equal(low, f32.to(dtype))


def test_errors_name_what_is_wrong():
    raw = torch.zeros(18, dtype=torch.uint8)
    with pytest.raises(ValueError, match="Q4_0.*32"):
        dequantize_gguf(raw, "Q4_0", (1, 16))  # not a whole block per row
    with pytest.raises(ValueError, match="bytes"):
        dequantize_gguf(raw, "Q4_0", (2, 32))  # one block of bytes, two blocks of weights
    with pytest.raises(ValueError, match="accepted: .*Q4_K"):
        dequantize_gguf(raw, "IQ2_XXS", (1, 256))
    with pytest.raises(TypeError, match="uint8"):
        dequantize_gguf(raw.to(torch.int16), "Q4_0", (1, 32))
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        row_bytes("Q4_K", 300)
    assert qtype_name(GT.Q6_K) == "Q6_K" and qtype_name("q4_k") == "Q4_K"
    assert row_bytes("Q4_K", 512) == 288 and row_bytes("Q8_0", 64) == 68
