"""Quantizing a layer in row chunks gives the very tensors of one whole-layer call, for every backend and scheme.

Small chunk sizes on a small layer (a ragged last chunk included) stand in for the big layers the chunking is for.
"""

from __future__ import annotations

import json

import pytest
import torch

from quantserve.runtime.backends.base import backend_for
from quantserve.runtime.chunking import CHUNK_ELEMENTS, absmax, map_rows, rows_per_chunk
from quantserve.runtime.loader import resolve_with_options

OUT, IN = 80, 256  # 80 rows: chunks of 12 leave a ragged tail of 8
SCHEMES = ["llm-int8", "int8wo", "int8dq", "int4wo", "float8wo", "float8dq", "quanto-int8", "quanto-int4",
           "quanto-int2", "quanto-float8", "gguf-q8_0", "gguf-q4_0", "gguf-q4_k", "gguf-q6_k", "modelopt-fp8",
           "modelopt-int8", "modelopt-int4", "modelopt-nvfp4", "nf4", "fp4"]


def _backend(spec, chunk_elements):
    config, options, _ = resolve_with_options(spec)
    backend = backend_for(config, torch.bfloat16, **options)
    backend.chunk_elements = chunk_elements
    return backend


def _quantize(spec, weight, chunk_elements, name="blocks.0.ff.net.0.proj"):
    from torch import nn

    backend = _backend(spec, chunk_elements)
    ok, why = backend.can_quantize(name, nn.Linear(weight.shape[1], weight.shape[0], device="meta"))
    assert ok, why
    return backend.quantize(name, weight)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.element_size() in (1, 2, 4, 8) and a.is_contiguous() and b.is_contiguous():
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(view), b.view(view))  # bit for bit, NaN patterns included
    return torch.equal(a, b)


def _assert_identical(whole, chunked):
    assert type(whole) is type(chunked)
    assert whole.fmt == chunked.fmt
    assert json.dumps(whole.meta, sort_keys=True, default=str) == json.dumps(chunked.meta, sort_keys=True, default=str)
    wt, ct = whole.packed_tensors(), chunked.packed_tensors()
    assert sorted(wt) == sorted(ct)
    for name in wt:
        assert _same(wt[name].contiguous(), ct[name].contiguous()), name
    assert torch.equal(whole.dequantize(torch.float32), chunked.dequantize(torch.float32))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_chunked_equals_whole(scheme):
    torch.manual_seed(0)
    weight = (torch.randn(OUT, IN) * 0.05).to(torch.bfloat16)
    weight[3, 7] = 0.9  # an outlier: per-tensor scales must come from the global amax, not a chunk's
    whole = _quantize(scheme, weight, CHUNK_ELEMENTS)
    chunked = _quantize(scheme, weight, 12 * IN)  # 12 rows a chunk
    _assert_identical(whole, chunked)


def test_chunk_helpers():
    w = torch.randn(10, 8)
    assert rows_per_chunk(w, 24) == 3
    assert rows_per_chunk(w, 24, multiple=2) == 2
    assert rows_per_chunk(w, 1) == 1
    assert [c.shape[0] for c in map_rows(lambda c: c, w, 24)] == [3, 3, 3, 1]
    assert torch.equal(absmax(w, 16), w.abs().amax())


@pytest.mark.parametrize("weights", ["int8", "float8", "int4", "int2"])
@pytest.mark.parametrize("rows", [1, OUT])
def test_quanto_chunks_equal_quanto_quantize_weight(weights, rows):
    """The chunked quanto path against quanto's own whole-tensor optimizer + quantize_weight (what QLinear.freeze
    runs), so chunked == whole is not just the new code agreeing with itself."""
    from optimum import quanto
    from torch import nn

    from quantserve.runtime.backends.quanto import QTYPE_NAMES, QuantoWeight

    torch.manual_seed(1)
    weight = (torch.randn(rows, IN) * 0.05).to(torch.bfloat16)
    qtype = quanto.qtypes[QTYPE_NAMES[weights]]
    with torch.device("meta"):
        layer = quanto.QLinear(IN, rows, bias=False, dtype=torch.bfloat16, weights=qtype)
    gs, opt = layer.weight_group_size, layer.optimizer
    scale, shift = (opt(weight, qtype=qtype, axis=0), None) if qtype.bits == 8 else opt(weight, qtype=qtype, axis=0,
                                                                                         group_size=gs)
    t = quanto.quantize_weight(weight, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=gs, optimized=False)
    reference = QuantoWeight.from_qtensor(t, optimized=True)
    chunked = _quantize(f"quanto-{weights}", weight, 12 * IN)
    _assert_identical(reference, chunked)
