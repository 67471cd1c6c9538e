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

    def set_kernel(self, name: str, kernel: Kernel, reason: str = "") -> None:
        self.kernel, self.kernel_name, self.kernel_reason = kernel, name, reason

    @property
    def backend(self) -> str:
        return self.qweight.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        y = self.kernel(x, self.qweight, self.bias)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, kernel={self.kernel_name}"
