"""The built-in kernel candidates, registered with the router in one place (`register`).

- "native": the backend's own kernel (`QuantizedWeight.linear`), offered only where the weight class has one;
- "reference": dequantize with torch, then a dense matmul (always runs: the yardstick);
- "triton_fused": Triton's fused dequantize-matmul (split-K for M <= 16, tiled above);
- "cpu_fused": the native CPU kernels' path "auto": the fused dequantize-GEMV (M = 1, or up to 4), the fused
  dequantize-GEMM (bf16 activations, M up to 256, where AMX runs), slabs above;
- "cpu_gemm": the native CPU kernels' fused dequantize-GEMM at any M (a panel of weight rows decoded once into an
  L1/L2-sized bf16 buffer, multiplied against every activation row on AMX, AVX512-BF16 or portable float32 code);
- "triton_dequant": Triton dequantizes the weight to the activation dtype, torch runs the matmul;
- "cpu_dequant": the CPU kernels dequantize slabs of rows, torch's GEMM multiplies each.

Their ranks in the fixed preference are the one table in runtime/candidates.py. quantserve's kernels take the
weight's packed format (`QuantizedWeight.packed()`, views of its buffers): the Triton ones on CUDA, or on the CPU
while TRITON_INTERPRET=1 is set (Triton's interpreter, for tests); the CPU ones on the CPU wherever a C compiler
built kernels/csrc (kernels/cpu_build.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import api as kernels_api
from ..kernels.formats import FormatError, PackedWeight
from .backends.base import NoPackedFormat, QuantizedWeight
from .candidates import (
    CPU_DEQUANT,
    CPU_FUSED,
    CPU_GEMM,
    NATIVE,
    PREFERENCE,
    REFERENCE,
    TRITON_DEQUANT,
    TRITON_FUSED,
    Candidate,
)
from .candidates import register as register_candidate
from .quant_linear import QuantLinear, native_kernel, reference_kernel

FUSED, DEQUANT = TRITON_FUSED, TRITON_DEQUANT


# --- the backend's own kernel and the reference ---------------------------------------------------------------

def can_run_native(layer: QuantLinear, device: torch.device) -> tuple[bool, str]:
    """The backend's own kernel runs where the weight class has one; else it would be the reference again."""
    weight = layer.qweight
    if not weight.has_own_kernel():
        return False, (f"{type(weight).__name__} has no kernel of its own ({weight.backend or 'this'} backend): "
                       "its path is the torch reference's")
    return True, ""


def _always(layer: QuantLinear, device: torch.device) -> tuple[bool, str]:
    return True, ""


# --- quantserve's kernels -------------------------------------------------------------------------------------

def _packed_for(layer: QuantLinear, kernels: str) -> tuple[PackedWeight | None, str]:
    """The layer's packed format, or None and why `kernels` cannot take it."""
    weight = layer.qweight
    try:
        return weight.packed(), ""
    except NoPackedFormat as exc:
        return None, f"no {kernels} kernel for format {weight.fmt}" + (f": {exc.why}" if exc.why else "")
    except (FormatError, AttributeError, KeyError, TypeError, ValueError) as exc:
        return None, f"format {weight.fmt} cannot be handed to the {kernels} kernels: {exc}"


def triton_fused_kernel(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Triton's fused dequantize-matmul."""
    from ..kernels import triton_matmul

    return triton_matmul.linear(x, weight.packed(), bias)


def triton_dequant_kernel(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Triton dequantizes the weight to x's dtype; torch (cuBLAS on a GPU) multiplies."""
    from ..kernels import triton_dequant

    w = triton_dequant.dequantize(weight.packed(), x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def can_run_triton(layer: QuantLinear, device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels run this layer on `device`, and why not when they do not."""
    problem = kernels_api.triton_problem(device)
    if problem is not None:
        return False, problem
    packed, why = _packed_for(layer, "Triton")
    return (False, why) if packed is None else (True, "")


def cpu_fused_kernel(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The CPU kernels' own choice by M: the fused GEMV, the fused GEMM, or slab dequantize + GEMM (`cpu.linear`)."""
    from ..kernels import cpu

    return cpu.linear(x, weight.packed(), bias)


def cpu_gemm_kernel(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The CPU kernels' fused dequantize-GEMM (AMX, AVX512-BF16 or portable: `cpu.gemm_path`)."""
    from ..kernels import cpu

    return cpu.linear(x, weight.packed(), bias, path="gemm")


def cpu_dequant_kernel(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The CPU kernels dequantize cache-sized slabs of rows; torch's GEMM multiplies each."""
    from ..kernels import cpu

    return cpu.linear(x, weight.packed(), bias, path="slab")


def can_run_cpu(layer: QuantLinear, device: torch.device) -> tuple[bool, str]:
    """Whether the native CPU kernels run this layer on `device`, and why not when they do not."""
    if device.type != "cpu":
        return False, f"the CPU kernels run on the CPU, not {device.type}"
    from ..kernels import cpu

    packed, why = _packed_for(layer, "quantserve")
    if packed is None:
        return False, why.replace("the quantserve kernels", "the CPU kernels")
    problem = cpu.problem(packed)
    return (False, problem) if problem else (True, "")


def builtins() -> tuple[Candidate, ...]:
    """The built-in candidates, ranked by runtime/candidates.py's PREFERENCE."""
    rows = (
        (NATIVE, native_kernel, can_run_native, "the backend's own kernel"),
        (REFERENCE, reference_kernel, _always, "dequantize with torch, then a dense matmul"),
        (TRITON_FUSED, triton_fused_kernel, can_run_triton,
         "Triton fused dequantize-matmul (split-K for M <= 16, tiled above)"),
        (CPU_FUSED, cpu_fused_kernel, can_run_cpu,
         "CPU fused dequantize-GEMV, fused GEMM (bf16 on AMX) up to 256 rows, slabs above (C, SIMD, OpenMP)"),
        (CPU_GEMM, cpu_gemm_kernel, can_run_cpu,
         "CPU fused dequantize-GEMM: bf16 panels decoded once, AMX / AVX512-BF16 / portable matmul (C, OpenMP)"),
        (TRITON_DEQUANT, triton_dequant_kernel, can_run_triton, "Triton dequantize, then a dense matmul"),
        (CPU_DEQUANT, cpu_dequant_kernel, can_run_cpu, "CPU dequantize in cache-sized slabs, each then a dense matmul"),
    )
    return tuple(Candidate(name, kernel, can_run, PREFERENCE[name], summary) for name, kernel, can_run, summary in rows)


def register() -> None:
    """Register the built-in candidates (again: equal objects replace the old ones)."""
    for candidate in builtins():
        register_candidate(candidate)
