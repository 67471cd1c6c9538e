"""Tiny diffusers models built from configs and saved locally: the test subjects of the loader (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel


def tiny_flux(width: int = 64) -> FluxTransformer2DModel:
    heads = 2
    head_dim = width // heads
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=width, pooled_projection_dim=width, guidance_embeds=False,
        axes_dims_rope=(head_dim // 4, head_dim // 4, head_dim // 2),
    )


def tiny_sd3(width: int = 64) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=width // 2, num_attention_heads=2,
        joint_attention_dim=width, caption_projection_dim=width, pooled_projection_dim=width, out_channels=4,
        pos_embed_max_size=16,
    )


def tiny_dit(width: int = 64, layers: int = 1) -> DiTTransformer2DModel:
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=width // 2, in_channels=1, out_channels=1, num_layers=layers,
        sample_size=8, patch_size=2, num_embeds_ada_norm=11, norm_num_groups=1,
    )


BUILDERS = {"flux": tiny_flux, "sd3": tiny_sd3, "dit": tiny_dit}


def save_tiny(kind: str, folder: Path, seed: int = 0, **kwargs) -> Path:
    """Build a tiny model of `kind` with seeded random weights and save it as a diffusers directory."""
    torch.manual_seed(seed)
    model = BUILDERS[kind](**kwargs)
    with torch.no_grad():  # diffusers zero-initialises some output layers; give every weight signal
        for param in model.parameters():
            if param.dim() >= 2 and param.abs().sum() == 0:
                param.normal_(0, 0.02)
    model.save_pretrained(folder)
    return folder
