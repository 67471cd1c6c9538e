"""Architecture, noise schedule and data split of the embedded default model (digits DiT)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

from .prompts import DIGIT_NAMES, NUM_CLASSES  # noqa: F401 - re-exported
# DiT's LabelEmbedding appends one extra row for classifier-free guidance when its dropout is > 0,
# so num_embeds_ada_norm=10 gives an 11-row table whose row 10 is the null (unconditional) class.
NULL_CLASS = NUM_CLASSES
IMAGE_SIZE = 8
PIXEL_MAX = 16.0  # load_digits pixel values lie in 0..16
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.4
PREDICTION_TYPE = "v_prediction"

TRANSFORMER_CONFIG: dict[str, object] = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "num_embeds_ada_norm": NUM_CLASSES,
    "dropout": 0.0,
}

SCHEDULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": PREDICTION_TYPE,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
}


def build_transformer() -> DiTTransformer2DModel:
    """Build the untrained digits DiT from its config (no download) with DiT's adaLN-zero init."""
    model = DiTTransformer2DModel(**TRANSFORMER_CONFIG)
    for block in model.transformer_blocks:
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return model


def build_scheduler() -> DDIMScheduler:
    """Build the cosine-schedule DDIM scheduler the model is trained and sampled with."""
    return DDIMScheduler(**SCHEDULER_CONFIG)


@dataclass(frozen=True)
class DigitsSplit:
    """The fixed split of sklearn's digits: the diffusion model trains on `train`, the judge on `heldout`."""

    train_x: np.ndarray  # (n, 8, 8) float32 in [-1, 1]
    train_y: np.ndarray  # (n,) int64
    heldout_x: np.ndarray
    heldout_y: np.ndarray


def to_model_range(raw: np.ndarray) -> np.ndarray:
    """Map load_digits values 0..16 to the model's pixel range [-1, 1]."""
    return (raw.astype(np.float32) / PIXEL_MAX) * 2.0 - 1.0


def load_split() -> DigitsSplit:
    """Load sklearn's digits (offline) and split them with a fixed seed, stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = to_model_range(digits.images)
    labels = digits.target.astype(np.int64)
    tx, hx, ty, hy = train_test_split(
        images, labels, test_size=HELDOUT_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return DigitsSplit(train_x=tx, train_y=ty, heldout_x=hx, heldout_y=hy)
