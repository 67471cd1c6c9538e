"""Packed formats and their torch reference dequantizers, held against each library's own dequantization.

Every backend's weight hands itself over as a packed format (`QuantizedWeight.packed()`, views of its buffers),
then dequantized by kernels/reference.py; the result must equal the library's own dequantization bit for bit in the
library's own output dtype, and the backend's `dequantize(dtype)` in every dtype. The one difference allowed is the
sign of a zero (`torch.equal`): bitsandbytes' own CPU paths disagree on it (its C kernel decodes FP4 code 8 as -0.0,
its torch fallback as +0.0).
"""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT

from quantserve.kernels import api
from quantserve.kernels import reference as R
from quantserve.kernels.formats import (
    BNB_BLOCKSIZES,
    NVFP4,
    BnB4bit,
    Float8,
    FormatError,
    GGUFBlocks,
    Int4Blocks,
    Int4Grouped,
    Int8Rows,
    QuantoGrouped,
    format_name,
    nbytes,
    tensors_of,
)
from quantserve.kernels.gguf import BLOCK_SIZES, QUANTIZED_TYPES
from quantserve.runtime import kernel_candidates as kc
from quantserve.runtime.backends import backend_for
from quantserve.runtime.backends.gguf import GGUFWeight
from quantserve.runtime.backends.torchao import TorchAoWeight
from quantserve.runtime.config import BitsAndBytesConfig, NVIDIAModelOptConfig, QuantoConfig, TorchAoConfig
from quantserve.runtime.quant_linear import QuantLinear

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal values, shape and dtype (zeros of either sign compare equal), and no NaN on either side."""
    assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape), (ours.dtype, theirs.dtype, ours.shape, theirs.shape)
    assert not ours.isnan().any() and not theirs.isnan().any()
    if not torch.equal(ours, theirs):
        diff = (ours.float() - theirs.float()).abs()
        raise AssertionError(f"{int((diff > 0).sum())} values differ, max {float(diff.max()):.3g}")


def check_backend_weight(weight, expected_type: type) -> object:
    """The adapted weight: the expected format, cached, equal to the backend's dequantize in every dtype."""
    packed = weight.packed()
    assert isinstance(packed, expected_type)
    assert weight.packed() is packed, "the packed format is cached on the weight"
    for dtype in DTYPES:
        assert_same(R.dequantize(packed, dtype), weight.dequantize(dtype))
    return packed


def shares_memory(packed, weight) -> bool:
    """Every tensor of the packed format views one of the weight's buffers (no copy)."""
    ptrs = {b.untyped_storage().data_ptr() for b in weight.buffers()}
    return all(t.untyped_storage().data_ptr() in ptrs for t in tensors_of(packed).values())


@pytest.fixture
def no_compile():
    """bitsandbytes' torch fallback is wrapped in torch.compile, which recompiles (seconds) for every new shape and
    block size; run it eagerly (the same torch ops; compiling only speeds them up)."""
    with torch._dynamo.config.patch(disable=True):
        yield


# --- bitsandbytes -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double_quant"])
@pytest.mark.parametrize("blocksize", BNB_BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_4bit_equals_bitsandbytes_dequantize_4bit(quant_type, blocksize, nested, no_compile):
    import bitsandbytes.functional as BF
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.functional import get_4bit_type

    gen = torch.Generator().manual_seed(blocksize + nested)
    # (24, 200): blocks across rows, a partial last block; (17, 33): odd K (bitsandbytes' torch path); (5, 100).
    # (bitsandbytes 0.50's CPU C kernel misplaces blocks for some rows shorter than a block, e.g. (3, 64) in blocks
    # of 128, disagreeing with its own quantizer and its torch path; the reference follows the torch path and CUDA.)
    for dtype, shape in ((torch.bfloat16, (24, 200)), (torch.float16, (17, 33)), (torch.float32, (5, 100))):
        w = torch.randn(*shape, generator=gen).to(dtype) * 0.05
        data, state = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
        packed = api.pack_bnb_4bit(data, state)
        assert packed.nested == nested and packed.dtype == dtype and packed.shape == shape
        assert packed.data.data_ptr() == data.data_ptr(), "packing views bitsandbytes' bytes"
        ours = R.dequantize(packed, dtype)
        assert_same(ours, BF.dequantize_4bit(data, state))
        code = get_4bit_type(quant_type, device=data.device)
        absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax
        assert_same(ours, _dequantize_4bit_compute(data.reshape(-1), absmax, code, blocksize, shape, dtype))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_backend_weights_through_packed(quant_type, double_quant, no_compile):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16)
    # K a multiple of the block size: bitsandbytes 0.50's CPU C kernel misdecodes e.g. (48, 96) in blocks of 64
    weight = backend_for(config).quantize("layer", torch.randn(48, 128) * 0.02)
    packed = check_backend_weight(weight, BnB4bit)
    assert packed.nested == double_quant and shares_memory(packed, weight)
    assert nbytes(packed) == weight.nbytes


def test_bnb_int8_rows_through_packed():
    weight = backend_for(BitsAndBytesConfig(load_in_8bit=True)).quantize("layer", torch.randn(40, 72) * 0.02)
    packed = check_backend_weight(weight, Int8Rows)
    assert packed.divisor == 127.0 and shares_memory(packed, weight)


# --- torchao ----------------------------------------------------------------------------------------------------

def _torchao_float8_per_tensor(weight: torch.Tensor):
    from torchao.quantization import Float8WeightOnlyConfig, PerTensor

    return TorchAoConfig(Float8WeightOnlyConfig(granularity=PerTensor()))


@pytest.mark.parametrize("quant_type, fmt, cls", [
    ("int8wo", "torchao:int8_rows", Int8Rows),
    ("float8wo_e4m3", "torchao:float8_e4m3_rows", Float8),
    ("float8wo_e5m2", "torchao:float8_e5m2_rows", Float8),
    ("float8_tensor", "torchao:float8_e4m3_tensor", Float8),
    ("int4wo", "int4_grouped", Int4Grouped),
])
def test_torchao_weights_through_packed(quant_type, fmt, cls):
    w = (torch.randn(48, 256, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16()
    config = _torchao_float8_per_tensor(w) if quant_type == "float8_tensor" else TorchAoConfig(quant_type)
    weight = backend_for(config).quantize("layer", w)
    assert weight.fmt == fmt
    packed = check_backend_weight(weight, cls)
    assert shares_memory(packed, weight)
    if fmt.startswith("torchao:"):  # torchao's own subclass, dequantized by torchao itself
        assert_same(R.dequantize(packed, torch.bfloat16), weight.subclass().dequantize())


def test_torchao_dynamic_activation_formats_have_no_packed_form():
    weight = TorchAoWeight("torchao:int8_rows+dyn_int8", {"shape": [4, 8]}, {})
    with pytest.raises(FormatError, match="dynamically"):
        weight.packed()
    ok, reason = kc.can_run_cpu(QuantLinear(weight, None), torch.device("cpu"))
    assert not ok and "no quantserve kernel for format torchao:int8_rows+dyn_int8" in reason and "dynamically" in reason


# --- optimum-quanto ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(48, 96), (48, 256), (47, 200)], ids=["row_groups", "groups_of_128", "odd_rows"])
@pytest.mark.parametrize("weights, cls", [("int8", Int8Rows), ("float8", Float8), ("int4", QuantoGrouped),
                                          ("int2", QuantoGrouped)])
def test_quanto_weights_through_packed(weights, cls, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 0.02
    weight = backend_for(QuantoConfig(weights_dtype=weights), torch.bfloat16).quantize("layer", w)
    packed = check_backend_weight(weight, cls)
    assert shares_memory(packed, weight)
    with torch.no_grad():  # quanto's own QTensor.dequantize, in its own dtype
        assert_same(R.dequantize(packed, torch.bfloat16), weight.qtensor(optimized=False).dequantize())


def test_quanto_float16_scales_round_in_float16():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    weight = backend_for(QuantoConfig(weights_dtype="int4"), torch.float16).quantize("layer", w)
    packed = check_backend_weight(weight, QuantoGrouped)
    assert packed.dtype == torch.float16


# --- NVIDIA ModelOpt --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, fmt, cls", [
    ({"quant_type": "NVFP4", "channel_quantize": -1, "block_quantize": 16, "scale_channel_quantize": -1,
      "scale_block_quantize": 16}, "modelopt:nvfp4", NVFP4),
    ({"quant_type": "FP8"}, "modelopt:fp8", Float8),
    ({"quant_type": "FP8", "channel_quantize": 0}, "modelopt:fp8_axis0", Float8),
    ({"quant_type": "INT8", "channel_quantize": 0}, "modelopt:int8_axis0", Int8Rows),
    ({"quant_type": "INT4", "channel_quantize": -1, "block_quantize": 128}, "modelopt:int4_block128", Int4Blocks),
], ids=["nvfp4", "fp8", "fp8_rows", "int8_rows", "int4_blocks"])
def test_modelopt_weights_through_packed(kwargs, fmt, cls):
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(4)) * 0.02
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weight = backend_for(NVIDIAModelOptConfig(**kwargs)).quantize("transformer_blocks.0.attn.to_q", w)
    assert weight.fmt == fmt
    packed = check_backend_weight(weight, cls)
    assert shares_memory(packed, weight) or cls is NVFP4  # NVFP4's global scale is made float32 (a 4-byte copy)


# --- GGUF -------------------------------------------------------------------------------------------------------

FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}


def random_gguf(qtype: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes with finite fp16 fields (any finite bit pattern), as (rows, bytes per row)."""
    bs, ts = BLOCK_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // bs, ts), dtype=np.uint8)
    for offset in FP16_FIELDS.get(qtype, ()):
        bits = rng.integers(0, 1 << 16, size=raw.shape[0], dtype=np.uint16)
        bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0xBFFF, bits)
        raw[:, offset:offset + 2] = bits.astype("<u2").view(np.uint8).reshape(-1, 2)
    if qtype == "BF16":  # the top halves of random float32 values
        halves = (rng.standard_normal(rows * cols).astype(np.float32).view(np.uint32) >> 16).astype("<u2")
        raw = halves.view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [*QUANTIZED_TYPES, "BF16"])
def test_gguf_blocks_equal_gguf_py(qtype):
    bs = BLOCK_SIZES[qtype][0]
    rows, cols = 5, max(bs, 32) * 2
    raw = random_gguf(qtype, rows, cols, seed=len(qtype))
    packed = api.pack_gguf(torch.from_numpy(raw), qtype, (rows, cols))
    theirs = np.ascontiguousarray(gguf.quants.dequantize(raw, GT[qtype]), dtype=np.float32)
    ours = R.dequantize(packed, torch.float32)
    assert (ours.view(torch.int32).numpy() == theirs.view(np.int32)).all()  # bit for bit, zeros' sign included
    weight = GGUFWeight(torch.from_numpy(raw), qtype, (rows, cols))
    adapted = check_backend_weight(weight, GGUFBlocks)
    assert adapted.data.data_ptr() == weight.data.data_ptr() and format_name(adapted) == f"gguf:{qtype}"


# --- the public API and validation ------------------------------------------------------------------------------

def test_pack_functions_build_each_format_from_plain_tensors():
    q8 = torch.randint(-127, 128, (6, 10), dtype=torch.int8)
    scale = torch.rand(6, 1) + 0.1
    rows = api.pack_int8_rows(q8, scale, divisor=127.0)
    assert torch.equal(api.dequantize(rows, torch.float32), q8.float() * (scale / 127.0))
    f8 = (torch.randn(6, 10) * 4).to(torch.float8_e4m3fn)
    assert torch.equal(api.dequantize(api.pack_fp8(f8, torch.tensor(0.5)), torch.float32), f8.float() * 0.5)
    assert api.pack_fp8(f8, scale).per_row and not api.pack_fp8(f8, torch.tensor([0.5])).per_row
    from quantserve.kernels.int4 import quantize_int4_grouped

    ref4 = quantize_int4_grouped(torch.randn(8, 64), 32)
    p4 = api.pack_int4_grouped(ref4.qdata, ref4.scale, ref4.zero_point, 32)
    assert torch.equal(api.dequantize(p4, torch.float32), R.dequantize(ref4, torch.float32))
    codes = torch.randint(0, 256, (8, 8), dtype=torch.uint8)
    block = torch.full((8, 1), 2.0).to(torch.float8_e4m3fn)
    nv = api.pack_nvfp4(codes, block, 0.25, block_size=16)
    low = torch.from_numpy(nv_values()[(codes & 15).numpy()])
    assert torch.equal(api.dequantize(nv, torch.float32)[:, 0::2], low * 0.5)
    quanto = api.pack_quanto_grouped(torch.randint(0, 256, (2, 16), dtype=torch.uint8), torch.ones(4),
                                     torch.zeros(4), (4, 16), None, bits=4)
    assert quanto.group_size == 16 and quanto.fmt == "quanto:int4_grouped"


def nv_values() -> np.ndarray:
    from quantserve.kernels.formats import E2M1_VALUES

    return np.array(E2M1_VALUES, dtype=np.float32)


@pytest.mark.parametrize("build, words", [
    (lambda: BnB4bit(torch.zeros(8, dtype=torch.uint8), torch.ones(1), torch.zeros(16), (4, 4), blocksize=48),
     r"BnB4bit\.blocksize: 48; accepted: 32, 64"),
    (lambda: BnB4bit(torch.zeros(8, dtype=torch.uint8), torch.ones(3), torch.zeros(16), (4, 4)),
     r"BnB4bit\.absmax: 3 elements .* expected 1"),
    (lambda: BnB4bit(torch.zeros(8, dtype=torch.uint8), torch.ones(1), torch.zeros(16), (4, 4), quant_type="int4"),
     r"BnB4bit\.quant_type: 'int4'"),
    (lambda: BnB4bit(torch.zeros(8, dtype=torch.uint8), torch.ones(1, dtype=torch.uint8), torch.zeros(16), (4, 4),
                     nested_absmax=torch.ones(1), nested_quant_map=torch.zeros(255)),
     r"BnB4bit\.nested_quant_map: 255 elements"),
    (lambda: Int8Rows(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4)), r"Int8Rows\.qdata: dtype torch\.uint8"),
    (lambda: Int8Rows(torch.zeros(4, 8, dtype=torch.int8), torch.ones(5)), r"Int8Rows\.scale: 5 elements"),
    (lambda: Int8Rows(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), divisor=0.0), r"Int8Rows\.divisor"),
    (lambda: Int8Rows(torch.zeros(8, 4, dtype=torch.int8).t(), torch.ones(4)), r"Int8Rows\.qdata: .*unit column"),
    (lambda: Float8(torch.zeros(5, 8).to(torch.float8_e4m3fn), torch.ones(3)),
     r"Float8\.scale: 3 elements .* expected 1 \(per tensor\) or 5"),
    (lambda: QuantoGrouped(torch.zeros(2, 16, dtype=torch.uint8), torch.ones(4), torch.ones(4), (4, 16), 5),
     r"QuantoGrouped\.group_size: 5 does not divide in_features 16"),
    (lambda: QuantoGrouped(torch.zeros(3, 16, dtype=torch.uint8), torch.ones(4), torch.ones(4), (4, 16), 16),
     r"QuantoGrouped\.data: shape \(3, 16\); expected \(2, 16\)"),
    (lambda: NVFP4(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 1), torch.ones(1)),
     r"NVFP4\.block_scale: dtype torch\.float32"),
    (lambda: NVFP4(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 1).to(torch.float8_e4m3fn),
                   torch.ones(2)), r"NVFP4\.global_scale: 2 elements"),
    (lambda: GGUFBlocks(torch.zeros(2, 18, dtype=torch.uint8), "Q7_0", (2, 32)), r"GGUFBlocks\.qtype: 'Q7_0'"),
    (lambda: GGUFBlocks(torch.zeros(2, 18, dtype=torch.uint8), "Q4_0", (2, 48)), r"GGUFBlocks\.shape: .*32"),
    (lambda: api.pack_gguf(torch.zeros(30, dtype=torch.uint8), "Q4_0", (2, 32)),
     r"GGUFBlocks\.data: 30 bytes; a \(2, 32\) Q4_0 weight has 36"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_fields_are_named(build, words):
    with pytest.raises(FormatError, match=words):
        build()


def test_dequantize_and_linear_refuse_what_they_cannot_run():
    packed = api.pack_fp8(torch.zeros(4, 8).to(torch.float8_e4m3fn), torch.ones(1))
    with pytest.raises(ValueError, match=r"impl: 'cuda'; accepted: 'reference', 'triton'"):
        api.dequantize(packed, impl="cuda")
    with pytest.raises(FormatError, match="not a packed format"):
        api.linear(torch.zeros(1, 8), torch.zeros(4, 8))
    y = api.linear(torch.ones(2, 8, dtype=torch.bfloat16), packed, torch.ones(4))
    assert y.dtype == torch.bfloat16 and torch.equal(y, torch.ones(2, 4, dtype=torch.bfloat16))


def test_packed_rebuilds_when_the_buffers_change():
    weight = backend_for(BitsAndBytesConfig(load_in_8bit=True)).quantize("layer", torch.randn(8, 16))
    first = weight.packed()
    weight.SCB = weight.SCB * 2  # a new tensor, as .to() would make
    second = weight.packed()
    assert second is not first and torch.equal(second.scale, first.scale * 2)
