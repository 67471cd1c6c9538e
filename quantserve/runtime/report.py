"""The load report: per layer its backend, format, bits per weight, bytes and kernel; totals against bf16."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .quant_linear import QuantLinear


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    backend: str
    fmt: str
    bits_per_weight: float
    nbytes: int
    kernel: str
    reason: str = ""

    @property
    def bf16_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * 2


@dataclass
class LoadReport:
    """What `load_model` did: the scheme, every Linear layer's fate, the model's bytes, and how long it took."""

    model_class: str
    source: str
    backend: str
    scheme: str
    pre_quantized: bool
    layers: list[LayerReport] = field(default_factory=list)
    model_bytes: int = 0
    bf16_bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # exclusive seconds per phase of the load, summing to about `seconds` (runtime/phases.py names them)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.model_bytes / self.bf16_bytes if self.bf16_bytes else 1.0

    @property
    def quantized_layers(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.backend != "dense"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d

    def table(self, limit: int | None = None) -> str:
        """A human-readable table of the layers (optionally the first `limit`) and the totals."""
        shown = self.layers if limit is None else self.layers[:limit]
        width = min(60, max([5] + [len(layer.name) for layer in shown]))
        head = f"{'layer':<{width}} {'shape':>11} {'backend':<13} {'format':<20} {'bits/w':>6} {'bytes':>10}  kernel"
        rows = [head, "-" * len(head)]
        for layer in shown:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            name = layer.name if len(layer.name) <= width else "..." + layer.name[-(width - 3):]
            kernel = layer.kernel + (f" ({layer.reason})" if layer.reason else "")
            rows.append(f"{name:<{width}} {shape:>11} {layer.backend:<13} {layer.fmt:<20} "
                        f"{layer.bits_per_weight:>6.2f} {layer.nbytes:>10}  {kernel}")
        if limit is not None and len(self.layers) > limit:
            rows.append(f"... {len(self.layers) - limit} more layers")
        rows.append("-" * len(head))
        rows.append(f"{self.model_class} via {self.backend} ({self.scheme}); "
                    f"{len(self.quantized_layers)}/{len(self.layers)} Linear layers quantized; "
                    f"model {self.model_bytes / 2**20:.2f} MiB vs bf16 {self.bf16_bytes / 2**20:.2f} MiB "
                    f"= {self.ratio:.3f}x; loaded in {self.seconds:.2f} s")
        rows.extend(f"note: {n}" for n in self.notes)
        return "\n".join(rows)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure(model: nn.Module, report: LoadReport, reasons: dict[str, str]) -> LoadReport:
    """Fill the per-layer rows and the totals of `report` from the loaded model."""
    report.layers.clear()
    model_bytes = bf16_bytes = 0
    counted: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            q = module.qweight
            report.layers.append(LayerReport(name, (q.out_features, q.in_features), q.backend, q.fmt,
                                             round(q.bits_per_weight, 3), q.nbytes, module.kernel_name,
                                             module.kernel_reason))
            model_bytes += q.nbytes
            bf16_bytes += q.out_features * q.in_features * 2
            counted.update(id(t) for t in q.packed_tensors().values())
        elif isinstance(module, nn.Linear):
            w = module.weight
            report.layers.append(LayerReport(name, tuple(w.shape), "dense", str(w.dtype).removeprefix("torch."),
                                             w.element_size() * 8.0, _tensor_bytes(w), "torch", reasons.get(name, "")))
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in counted:
            continue
        counted.add(id(tensor))
        model_bytes += _tensor_bytes(tensor)
        bf16_bytes += tensor.numel() * (2 if tensor.is_floating_point() else tensor.element_size())
    report.model_bytes, report.bf16_bytes = model_bytes, bf16_bytes
    return report
