"""Torch dtypes by name, written once: "bfloat16" <-> torch.bfloat16, the form config.json and serve configs hold."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = ("bfloat16", "float16", "float32")  # the dtypes a model loads and computes in


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str | torch.dtype, accepted: Iterable[str] | None = None,
                    field_name: str = "dtype") -> torch.dtype:
    """torch.bfloat16 for 'bfloat16' or 'torch.bfloat16' (a torch.dtype passes through); only names in `accepted`
    when given. A ValueError names the field, the value and what would be accepted."""
    text = dtype_name(name) if isinstance(name, torch.dtype) else str(name).removeprefix("torch.")
    allowed = tuple(accepted) if accepted is not None else None
    dtype = getattr(torch, text, None) if isinstance(name, (str, torch.dtype)) else None
    if allowed is not None and (not isinstance(dtype, torch.dtype) or text not in allowed):
        raise ValueError(f"{field_name}: got {name!r}; accepted: {', '.join(allowed)}")
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{field_name}: {name!r} is not a torch dtype name such as 'bfloat16'")
    return dtype
