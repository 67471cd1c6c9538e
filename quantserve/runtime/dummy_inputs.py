"""Random keyword inputs of the right shapes for a diffusers transformer: for compare, calibration and tuning.

Each supported model class has one small builder keyed by class name (a registry, not an if/elif chain); the
inputs are seeded, so two models fed `dummy_inputs(..., seed=s)` see the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Builder = Callable[[Any, int, torch.Generator, torch.dtype], dict[str, torch.Tensor]]
_BUILDERS: dict[str, Builder] = {}


def _register(*class_names: str) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        for name in class_names:
            _BUILDERS[name] = fn
        return fn

    return wrap


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def _timestep(gen: torch.Generator, batch: int) -> torch.Tensor:
    return torch.randint(1, 1000, (batch,), generator=gen).float()


@_register("FluxTransformer2DModel")
def _flux(cfg: Any, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    side, text = 4, 8
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1)
    inputs = {
        "hidden_states": _randn(gen, batch, side * side, cfg.in_channels, dtype=dtype),
        "encoder_hidden_states": _randn(gen, batch, text, cfg.joint_attention_dim, dtype=dtype),
        "pooled_projections": _randn(gen, batch, cfg.pooled_projection_dim, dtype=dtype),
        "timestep": torch.rand(batch, generator=gen).to(dtype),
        "img_ids": img_ids.reshape(-1, 3).to(dtype),
        "txt_ids": torch.zeros(text, 3, dtype=dtype),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5, dtype=dtype)
    return inputs


@_register("SD3Transformer2DModel")
def _sd3(cfg: Any, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    size = cfg.sample_size
    return {
        "hidden_states": _randn(gen, batch, cfg.in_channels, size, size, dtype=dtype),
        "encoder_hidden_states": _randn(gen, batch, 8, cfg.joint_attention_dim, dtype=dtype),
        "pooled_projections": _randn(gen, batch, cfg.pooled_projection_dim, dtype=dtype),
        "timestep": _timestep(gen, batch).to(dtype),
    }


@_register("DiTTransformer2DModel")
def _dit(cfg: Any, batch: int, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    size = cfg.sample_size
    return {
        "hidden_states": _randn(gen, batch, cfg.in_channels, size, size, dtype=dtype),
        "timestep": _timestep(gen, batch).long(),
        "class_labels": torch.randint(0, max(1, cfg.num_embeds_ada_norm - 1), (batch,), generator=gen),
    }


def supported_classes() -> list[str]:
    return sorted(_BUILDERS)


def dummy_inputs(model: nn.Module, batch: int = 1, seed: int = 0, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Seeded random inputs for `model(**inputs)`, on the model's device, in `dtype` (default: the model's)."""
    name = type(model).__name__
    if name not in _BUILDERS:
        raise ValueError(f"dummy_inputs: no input shapes known for {name}; known: {', '.join(supported_classes())}")
    first = next(model.parameters())
    dtype = dtype or (first.dtype if first.is_floating_point() else torch.float32)
    gen = torch.Generator().manual_seed(seed)
    inputs = _BUILDERS[name](model.config, batch, gen, dtype)
    return {k: v.to(first.device) for k, v in inputs.items()}


def calibration_loop(batches: int = 4, batch: int = 1, seed: int = 0) -> Callable[[nn.Module], None]:
    """A default `forward_loop` for calibration: a few forward passes over random inputs of the model's shapes."""

    def loop(model: nn.Module) -> None:
        with torch.no_grad():
            for i in range(batches):
                model(**dummy_inputs(model, batch=batch, seed=seed + i), return_dict=False)

    return loop
