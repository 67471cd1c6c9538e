"""One registry entry per packed format class (kernels/format_ops.py): every kernel family dispatches through it."""

from __future__ import annotations

import pytest
import torch

from quantserve.kernels import api, format_ops
from quantserve.kernels.formats import FORMAT_CLASSES, FormatError


def test_every_format_class_has_a_reference_a_cpu_builder_and_a_triton_spec():
    from quantserve.kernels import cpu, triton_args  # noqa: F401  (each registers its slot)

    entries = format_ops.entries()
    assert [e.cls for e in entries] == list(FORMAT_CLASSES)
    for entry in entries:
        assert entry.reference and entry.cpu and entry.triton, entry.cls.__name__
    assert {e.cls.__name__ for e in entries if e.float8_codes} == {"Float8", "NVFP4"}


def test_a_slot_is_set_once_and_only_for_format_classes():
    entry = format_ops.ops_for(api.pack_fp8(torch.zeros(2, 4).to(torch.float8_e4m3fn), torch.ones(1)), "test")
    with pytest.raises(ValueError, match=r"Float8\.reference is already"):
        format_ops.register_format(entry.cls, reference=lambda p: p)
    with pytest.raises(ValueError, match="slot 'rocm'; accepted: 'reference', 'cpu', 'triton'"):
        format_ops.register_format(entry.cls, rocm=lambda p: p)
    with pytest.raises(FormatError, match="register_format: 'Tensor' is not a packed format class"):
        format_ops.register_format(torch.Tensor, reference=lambda p: p)
    with pytest.raises(FormatError, match="who: Tensor is not a packed format; accepted: BnB4bit, Int8Rows"):
        format_ops.implementation(torch.zeros(1), "reference", "who")


def test_tile_arguments_are_bound_by_the_helpers_parameter_names():
    from quantserve.kernels import triton_args, triton_tiles

    assert triton_args.parameters(triton_tiles.tile_float8) == (
        ("codes_ptr", "scale_ptr", "unused_ptr2", "unused_ptr3", "unused_ptr4"),
        ("stride_n", "unused_arg1", "unused_arg2"), ("PER_ROW", "BITS", "UNUSED_META2"))
    q, s = torch.zeros(3, 8).to(torch.float8_e5m2), torch.ones(3)
    packed = api.pack_fp8(q, s)
    kw = triton_args.tile_args(packed).kwargs()
    assert kw["TILE"] is triton_tiles.tile_float8 and kw["w_ptr0"] is packed.qdata and kw["w_ptr1"] is packed.scale
    assert kw["w_ptr2"] is packed.qdata, "an unused tensor slot repeats the codes (never read)"
    assert (kw["w_arg0"], kw["W_META0"], kw["W_META1"]) == (8, 1, 0)
    with pytest.raises(TypeError, match="tile_float8: no parameter scales_ptr; it takes codes_ptr, scale_ptr"):
        triton_args.bind(triton_tiles.tile_float8, 0, (3, 8), codes_ptr=q, scales_ptr=s)
