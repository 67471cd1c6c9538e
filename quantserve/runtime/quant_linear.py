"""QuantLinear: a Linear layer whose weight is a backend's QuantizedWeight, run through a chosen kernel."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .backends.base import QuantizedWeight

Kernel = Callable[[torch.Tensor, QuantizedWeight, "torch.Tensor | None"], torch.Tensor]


def native_kernel(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The backend's own path."""
    return weight.linear(x, bias)


def reference_kernel(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Dequantize to the activation dtype, then a dense matmul: slow, simple, the yardstick."""
    return torch.nn.functional.linear(x, weight.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear: `qweight` holds the packed weight, `bias` stays dense, `kernel` computes."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self.qweight = qweight
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.compute_dtype = compute_dtype
        self.kernel: Kernel = native_kernel
        self.kernel_name = "native"
        self.kernel_reason = ""
        # the autotuner's winner per M bucket (rows rounded up to a power of two), when they differ by M; a call
        # takes its own bucket's kernel, else the nearest tuned bucket's; empty: `kernel` for every M
        self.by_bucket: dict[int, tuple[str, Kernel]] = {}
        self._for_bucket: dict[int, tuple[str, Kernel]] = {}

    def set_kernel(self, name: str, kernel: Kernel, reason: str = "") -> None:
        self.kernel, self.kernel_name, self.kernel_reason = kernel, name, reason
        self.set_bucket_kernels({})

    def set_bucket_kernels(self, table: dict[int, tuple[str, Kernel]]) -> None:
        """Kernels by M bucket (autotune winners); an empty table runs `kernel` for every M."""
        self.by_bucket = dict(table)
        self._for_bucket = {}

    def kernel_for(self, rows: int) -> tuple[str, Kernel]:
        """(name, kernel) a call with `rows` activation rows runs."""
        if not self.by_bucket:
            return self.kernel_name, self.kernel
        bucket = 1 << max(0, rows - 1).bit_length()
        chosen = self._for_bucket.get(bucket)
        if chosen is None:  # first call in this bucket: its own winner, else the nearest tuned bucket's (by ratio)
            target = bucket.bit_length()
            nearest = min(self.by_bucket, key=lambda b: (abs(b.bit_length() - target), b))
            chosen = self._for_bucket[bucket] = self.by_bucket[nearest]
        return chosen

    @property
    def backend(self) -> str:
        return self.qweight.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        kernel = self.kernel_for(x.numel() // max(1, x.shape[-1]))[1] if self.by_bucket else self.kernel
        y = kernel(x, self.qweight, self.bias)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def extra_repr(self) -> str:
        by_m = (", by M: " + ", ".join(f"{b}={name}" for b, (name, _) in sorted(self.by_bucket.items()))
                if self.by_bucket else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self.kernel_name}{by_m}")
