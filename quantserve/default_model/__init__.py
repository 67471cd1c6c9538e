"""The embedded default model: a class-conditional DiT trained on sklearn's 8x8 digits, shipped in the package.

It lets quantserve serve a real, trained diffusion model on a fresh machine with no model hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .prompts import parse_digit, parse_prompts

_LAZY = {"DigitsOutput", "DigitsPipeline"}


def __getattr__(name: str):
    """The pipeline names load diffusers: import them on first use, so `quantserve --help` stays light."""
    if name in _LAZY:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DigitsOutput",
    "DigitsPipeline",
    "default_model_dir",
    "load_default_pipeline",
    "load_pipeline",
    "parse_digit",
    "parse_prompts",
]


def default_model_dir() -> Path:
    """Path of the shipped model directory (diffusers layout: transformer/, scheduler/, model_index.json)."""
    return Path(__file__).resolve().parent / "weights"


def _load_transformer(model_dir: Path, quantization_config: object | None, dtype: torch.dtype) -> torch.nn.Module:
    """Load the DiT from `model_dir`/transformer, optionally quantized; the one place quantized loading hooks in."""
    from quantserve.runtime import load_model

    return load_model(model_dir / "transformer", quantization_config, torch_dtype=dtype)


def load_pipeline(
    model_dir: str | Path, quantization_config: object | None = None, dtype: torch.dtype = torch.bfloat16
) -> DigitsPipeline:
    """A DigitsPipeline over the model directory `model_dir` (as written by the training script)."""
    from diffusers import DDIMScheduler

    from .pipeline import DigitsPipeline

    model_dir = Path(model_dir)
    transformer = _load_transformer(model_dir, quantization_config, dtype)
    scheduler = DDIMScheduler.from_pretrained(model_dir / "scheduler")
    return DigitsPipeline(transformer, scheduler, dtype=dtype)


def load_default_pipeline(
    quantization_config: object | None = None, dtype: torch.dtype = torch.bfloat16
) -> DigitsPipeline:
    """A DigitsPipeline over the shipped weights, computing in `dtype` (bf16 by default)."""
    return load_pipeline(default_model_dir(), quantization_config, dtype)
