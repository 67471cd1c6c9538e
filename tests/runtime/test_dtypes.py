"""Torch dtypes by name, written once (quantserve.runtime.dtypes)."""

from __future__ import annotations

import pytest
import torch

from quantserve.runtime.dtypes import FLOAT_DTYPES, dtype_from_name, dtype_name


def test_names_and_dtypes_round_trip() -> None:
    for name in FLOAT_DTYPES:
        assert dtype_name(dtype_from_name(name)) == name
    assert dtype_from_name("torch.float16") is torch.float16
    assert dtype_from_name(torch.int8) is torch.int8


@pytest.mark.parametrize(("value", "accepted", "message"), [
    ("float64", FLOAT_DTYPES, "weights_dtype: got 'float64'; accepted: bfloat16, float16, float32"),
    ("Tensor", None, "weights_dtype: 'Tensor' is not a torch dtype name"),
    (3, None, "weights_dtype: 3 is not a torch dtype name"),
])
def test_a_bad_name_names_the_field_and_what_is_accepted(value, accepted, message) -> None:
    with pytest.raises(ValueError, match=message):
        dtype_from_name(value, accepted, field_name="weights_dtype")
