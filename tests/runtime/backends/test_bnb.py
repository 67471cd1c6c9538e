"""bitsandbytes backend details: chunked 4-bit quantization equals bitsandbytes' whole-tensor call byte for byte."""

from __future__ import annotations

import pytest
import torch

from quantserve.runtime import BitsAndBytesConfig
from quantserve.runtime.backends.bnb import quantize_4bit_chunked


@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_chunked_quantization_is_byte_identical(double, quant_type, storage):
    import bitsandbytes.functional as F

    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
                             bnb_4bit_quant_storage=storage)
    whole, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double, quant_type=quant_type,
                                   quant_storage=storage)
    chunked, cstate = quantize_4bit_chunked(weight, cfg, chunk_elements=256 * 10)  # 10 rows a chunk, ragged tail
    assert torch.equal(chunked.view(torch.uint8), whole.view(torch.uint8))  # bf16 storage holds NaN patterns
    ours, theirs = cstate.as_dict(packed=True), state.as_dict(packed=True)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert torch.equal(F.dequantize_4bit(chunked, cstate), F.dequantize_4bit(whole, state))
