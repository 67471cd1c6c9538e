"""Giving freed heap memory back to the operating system while a model loads.

A quantizer's temporaries are freed after each layer, but glibc's malloc keeps freed heap pages (and those of its
per-thread arenas) mapped unless the top of the heap is free; interleaved with the quantized tensors that stay,
they add up to hundreds of MiB of resident memory nobody uses. `malloc_trim(0)` returns them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to do
        return None


def release_freed_memory() -> bool:
    """Return freed heap memory to the OS (glibc's malloc_trim); False where the C library has no such call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
