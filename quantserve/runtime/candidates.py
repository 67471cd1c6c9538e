"""The kernel candidates a QuantLinear may run: the registry, and the one table of their fixed preference.

A candidate is a kernel with a name, a launch, a `can_run(layer, device) -> (bool, reason)` and a rank. The built-ins
(the backend's own kernel, quantserve's Triton and CPU kernels, the torch reference) are registered in one place,
`kernel_candidates.register()`, which the router calls on import. Tests add a candidate for a while with
`scoped_candidate(...)`, which restores the registry as it was when they leave.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .quant_linear import Kernel, QuantLinear

CanRun = Callable[[QuantLinear, torch.device], "tuple[bool, str]"]

TRITON_FUSED, CPU_FUSED, NATIVE = "triton_fused", "cpu_fused", "native"
CPU_GEMM = "cpu_gemm"
TRITON_DEQUANT, CPU_DEQUANT, REFERENCE = "triton_dequant", "cpu_dequant", "reference"

# The fixed preference, used when the autotune cache has nothing for a layer (lower runs first): quantserve's fused
# Triton kernel (CUDA), quantserve's fused CPU kernel (whose "auto" path already runs the fused GEMM where it wins),
# the backend's own kernel, Triton dequantize-then-GEMM, CPU
# slab dequantize-then-GEMM, the fused CPU GEMM at any M (there for the autotuner to time; unmeasured, the slabs are the
# safer choice at large M), and the torch reference last, which always runs. quantserve's fused kernels come first
# because they read the packed weight once and never build the dense one; the autotuner replaces this order with
# measured winners per shape.
PREFERENCE: dict[str, int] = {
    TRITON_FUSED: 10,
    CPU_FUSED: 15,
    NATIVE: 20,
    TRITON_DEQUANT: 30,
    CPU_DEQUANT: 35,
    CPU_GEMM: 36,
    REFERENCE: 90,
}


@dataclass(frozen=True)
class Candidate:
    """A kernel the router may pick: its name, its launch, where it runs, and its rank in the fixed preference."""

    name: str
    kernel: Kernel
    can_run: CanRun
    preference: int
    summary: str = ""


_CANDIDATES: dict[str, Candidate] = {}


def register(candidate: Candidate) -> Candidate:
    """Add `candidate` (replacing one of the same name)."""
    _CANDIDATES[candidate.name] = candidate
    return candidate


def candidates() -> list[Candidate]:
    """Every registered candidate, in fixed preference order."""
    return sorted(_CANDIDATES.values(), key=lambda c: c.preference)


def candidate(name: str) -> Candidate:
    """The registered candidate called `name` (KeyError names the known ones)."""
    try:
        return _CANDIDATES[name]
    except KeyError:
        raise KeyError(f"no kernel candidate {name!r}; known: {sorted(_CANDIDATES)}") from None


def names() -> set[str]:
    """The names of every registered candidate."""
    return set(_CANDIDATES)


@contextmanager
def scoped_candidate(*added: Candidate) -> Iterator[None]:
    """Register `added` for the duration of a `with` block; on leaving, the registry is as it was before."""
    saved = dict(_CANDIDATES)
    try:
        for c in added:
            register(c)
        yield
    finally:
        _CANDIDATES.clear()
        _CANDIDATES.update(saved)
