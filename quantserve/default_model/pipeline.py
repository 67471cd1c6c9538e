"""DigitsPipeline: sample 8x8 digits from the class-conditional DiT with DDIM and classifier-free guidance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from .model import IMAGE_SIZE, NULL_CLASS
from .prompts import ACCEPTED_PROMPTS, Prompt, parse_digit, parse_prompts  # noqa: F401 - re-exported


def to_pil(pixels: torch.Tensor, image_size: int) -> list[Image.Image]:
    """Convert (n, 1, 8, 8) pixels in [-1, 1] to greyscale PIL images upscaled with nearest neighbour."""
    arr = ((pixels.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a[0]), mode="L").resize((image_size, image_size),
                                                                          Image.NEAREST) for a in arr]


def compute_dtype(transformer: torch.nn.Module) -> torch.dtype:
    """The dtype activations run in: that of the (never quantized) patch-embedding conv, else bf16."""
    try:
        dtype = transformer.pos_embed.proj.weight.dtype
    except AttributeError:
        dtype = getattr(transformer, "dtype", torch.bfloat16)
    return dtype if dtype.is_floating_point else torch.bfloat16


@dataclass
class DigitsOutput:
    """Generated digits: PIL images (one per prompt, in order), raw pixels in [-1, 1] and class labels."""

    images: list[Image.Image]
    pixels: torch.Tensor  # (n, 1, 8, 8) float32 in [-1, 1]
    labels: list[int]


class DigitsPipeline:
    """Class-conditional digit sampler over any DiT-shaped module (plain or with quantized Linear layers)."""

    def __init__(self, transformer: torch.nn.Module, scheduler: DDIMScheduler, dtype: torch.dtype | None = None):
        self.transformer = transformer.eval()
        self.scheduler = scheduler
        self.dtype = dtype or compute_dtype(transformer)
        self.sample_size = int(getattr(getattr(transformer, "config", None), "sample_size", IMAGE_SIZE))
        self.device = next(iter(transformer.parameters())).device
        self._timed: dict[int, DDIMScheduler] = {}

    def timed_scheduler(self, steps: int) -> DDIMScheduler:
        """A scheduler set to `steps` timesteps, built once per step count (from_config costs about 1 ms a call) and
        shared: DDIM's `step` reads the scheduler and writes nothing, so concurrent calls may share it."""
        scheduler = self._timed.get(steps)
        if scheduler is None:
            scheduler = DDIMScheduler.from_config(self.scheduler.config)
            scheduler.set_timesteps(steps)
            if len(self._timed) >= 64:  # bounded: a server sees a handful of step counts
                self._timed.pop(next(iter(self._timed)))
            self._timed[steps] = scheduler
        return scheduler

    def initial_noise(self, n: int, seed: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Starting noise: image i uses seed + i (batch-position independent) unless a generator is given."""
        shape = (1, 1, self.sample_size, self.sample_size)
        if generator is not None:
            return torch.cat([torch.randn(shape, generator=generator) for _ in range(n)])
        return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])

    @torch.no_grad()  # no_grad, not inference_mode: callers (serve's batch loop) mix its output with plain tensors
    def predict(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Model output for x_t, with classifier-free guidance unless guidance_scale == 1."""
        n = x.shape[0]
        if guidance_scale != 1.0:
            x = torch.cat([x, x])
            labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
        timesteps = t.to(self.device).expand(x.shape[0])
        out = self.transformer(x.to(self.device, self.dtype), timestep=timesteps, class_labels=labels.to(self.device))
        out = (out.sample if hasattr(out, "sample") else out[0]).float().cpu()
        if guidance_scale == 1.0:
            return out
        cond, uncond = out[:n], out[n:]
        return uncond + guidance_scale * (cond - uncond)

    @torch.inference_mode()
    def __call__(
        self,
        prompts: Prompt | Sequence[Prompt],
        seed: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        image_size: int = 64,
        generator: torch.Generator | None = None,
    ) -> DigitsOutput:
        """Generate one digit per prompt; deterministic for a given seed (or generator state)."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1 pixel, got {image_size}")
        labels = parse_prompts(prompts)
        scheduler = self.timed_scheduler(num_inference_steps)
        x = self.initial_noise(len(labels), seed, generator) * scheduler.init_noise_sigma
        y = torch.tensor(labels, dtype=torch.long)
        for t in scheduler.timesteps:
            x = scheduler.step(self.predict(x, t, y, guidance_scale), t, x).prev_sample
        pixels = x.clamp(-1.0, 1.0)
        return DigitsOutput(images=to_pil(pixels, image_size), pixels=pixels, labels=labels)
