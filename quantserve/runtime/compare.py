"""Compare quantization schemes on one model: the output's relative error against bf16, and the worst layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .dummy_inputs import dummy_inputs
from .quant_linear import QuantLinear


@dataclass
class SchemeComparison:
    scheme: str
    relative_error: float
    model_bytes: int
    bf16_bytes: int
    seconds: float
    worst_layers: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "relative_error": self.relative_error, "model_bytes": self.model_bytes,
                "bf16_bytes": self.bf16_bytes, "load_seconds": self.seconds, "error": self.error,
                "worst_layers": [{"layer": n, "relative_error": e} for n, e in self.worst_layers]}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


LayerIO = dict[str, tuple[torch.Tensor, torch.Tensor]]


def run_with_layer_io(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, LayerIO]:
    """The model's output, and every Linear layer's (input, output) during that forward pass."""
    seen: LayerIO = {}
    handles = [module.register_forward_hook(lambda _m, args, out, name=name: seen.__setitem__(name, (args[0].detach(), out.detach())))
               for name, module in model.named_modules() if isinstance(module, (nn.Linear, QuantLinear))]
    try:
        with torch.no_grad():
            result = model(**inputs, return_dict=False)[0]
    finally:
        for handle in handles:
            handle.remove()
    return result.float(), seen


def layer_errors(model: nn.Module, reference_io: LayerIO) -> list[tuple[str, float]]:
    """Each layer's own error: the quantized layer fed the bf16 layer's input, against the bf16 layer's output."""
    modules = dict(model.named_modules())
    errors = []
    with torch.no_grad():
        for name, (x, y) in reference_io.items():
            if name in modules:
                errors.append((name, relative_error(modules[name](x), y)))
    return sorted(errors, key=lambda item: -item[1])


def compare_schemes(model_dir: str | Path, schemes: Sequence[str], seed: int = 0, batch: int = 1, worst: int = 5,
                    progress: bool = False) -> list[SchemeComparison]:
    """Load bf16 and each scheme, feed all the same seeded inputs, and measure each against bf16."""
    from .loader import load_model

    reference = load_model(model_dir)
    inputs = dummy_inputs(reference, batch=batch, seed=seed)
    ref_out, ref_io = run_with_layer_io(reference, inputs)
    ref_report = reference.quantserve_report
    results = [SchemeComparison("bf16", 0.0, ref_report.model_bytes, ref_report.bf16_bytes, ref_report.seconds)]
    del reference
    for scheme in schemes:
        if scheme == "bf16":
            continue
        try:
            model = load_model(model_dir, scheme, progress=progress)
        except Exception as exc:  # one scheme failing (no GPU, missing package) must not hide the others
            results.append(SchemeComparison(scheme, float("nan"), 0, 0, 0.0, error=f"{type(exc).__name__}: {exc}"))
            continue
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
        per_layer = layer_errors(model, ref_io)
        report = model.quantserve_report
        results.append(SchemeComparison(scheme, relative_error(out, ref_out), report.model_bytes, report.bf16_bytes,
                                        report.seconds, per_layer[:worst]))
        del model
    return results
