"""Quantizing a big layer a few rows at a time, so the quantizers' float32 temporaries stay small.

Most quantizers make several full-size float32 copies of the weight they quantize (an upcast, a scaled copy, a
rounded copy); on a 56 M-weight layer that is hundreds of MiB beyond the layer itself. Where a format's scales are
per row or per group of a row, quantizing row chunks and concatenating gives the very bytes of one whole-tensor
call. Where a scale is per tensor, the global amax comes first from a cheap chunked pass (a max is exact in any
order), then the chunks are quantized with that scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from .memory import release_freed_memory

# ~4 M weights per chunk: a float32 temporary of 16 MiB
CHUNK_ELEMENTS = 1 << 22

T = TypeVar("T")


def rows_per_chunk(weight: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS, multiple: int = 1) -> int:
    """How many rows of `weight` one chunk holds: at least one (or `multiple`), a multiple of `multiple`."""
    per_row = max(1, weight[0].numel()) if weight.dim() > 0 and weight.shape[0] else 1
    rows = max(1, chunk_elements // per_row)
    return max(multiple, rows - rows % multiple)


def row_slices(weight: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS, multiple: int = 1,
               min_rows: int = 1) -> list[slice]:
    """Consecutive row ranges of `weight`, each within the chunk size; a last range shorter than `min_rows`
    joins the one before it (quanto cannot quantize a single row per row)."""
    rows = rows_per_chunk(weight, chunk_elements, multiple)
    n = weight.shape[0]
    slices = [slice(start, min(start + rows, n)) for start in range(0, n, rows)]
    if len(slices) > 1 and slices[-1].stop - slices[-1].start < min_rows:
        slices[-2:] = [slice(slices[-2].start, n)]
    return slices


def needs_chunks(weight: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS, multiple: int = 1) -> bool:
    """True when `weight` has more rows than one chunk holds."""
    return weight.dim() > 0 and weight.shape[0] > rows_per_chunk(weight, chunk_elements, multiple)


def map_rows(fn: Callable[[torch.Tensor], T], weight: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS,
             multiple: int = 1, min_rows: int = 1) -> list[T]:
    """`fn` applied to each contiguous row chunk of `weight`, in order; each chunk's freed temporaries go back to
    the OS before the next (else the heap keeps them, fragmented between the results that stay)."""
    slices = row_slices(weight, chunk_elements, multiple, min_rows)
    out = []
    for s in slices:
        out.append(fn(weight[s].contiguous()))
        if len(slices) > 1:
            release_freed_memory()
    return out


def absmax(weight: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """max |weight| over the whole tensor (0-d, weight's dtype), computed a chunk at a time: bit-identical to
    `weight.abs().amax()` since a maximum does not depend on the order it is taken in."""
    parts = map_rows(lambda c: c.abs().amax(), weight, chunk_elements)
    return torch.stack(parts).amax()
