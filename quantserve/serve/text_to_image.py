"""The diffusers text-to-image family: FluxPipeline, StableDiffusion3Pipeline, PixArtSigmaPipeline, SanaPipeline.

A variant loads through `quantserve.runtime.load_pipeline` (every weight component quantized as its config says).
Each pipeline class has a spec (a registry keyed by class name, not if/elif): the size rule its latents need, the
extra request fields it allows with their bounds, the keyword arguments always passed (no resolution binning: the
image has the size asked for), how it reports a finished step, and the inputs of a tiny forward of its denoiser for
the health check. A batch is one pipeline call: prompts repeated per image, one CPU generator per image seeded
seed + i, so a job's images equal those of `pipe(prompt=[p] * n, generator=[Generator().manual_seed(seed + i) ...])`
whatever else shares its batch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from quantserve.runtime.dtypes import FLOAT_DTYPES, dtype_from_name

from .config import ConfigError, ResolvedLimits, VariantConfig
from .protocol import (
    ClientError,
    ExtraField,
    JobResult,
    ModelSource,
    PipelineFamily,
    ServedPipeline,
    StepCallback,
    check_common,
    check_extras,
)
from .quantization import component_names

PROBE_TEXT_TOKENS = 4  # text tokens of the health probe's encoder states


@dataclass(frozen=True)
class TextToImageSpec:
    """How quantserve serves one diffusers pipeline class."""

    pipeline_class: str
    size_multiple: Callable[[Any], int]  # pipe -> each side of the image must be a multiple of this
    size_reason: str  # why, for the 422 message: formatted with {vae} (vae_scale_factor) and {patch}
    extras: tuple[ExtraField, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)  # always passed (where the pipeline takes them)
    legacy_callback: bool = False  # callback(step, t, latents) instead of callback_on_step_end
    probe: Callable[[Any, torch.dtype, torch.device], dict[str, Any]] | None = None  # denoiser -> forward kwargs

    def extra_map(self) -> dict[str, ExtraField]:
        return {e.name: e for e in self.extras}


SPECS: dict[str, TextToImageSpec] = {}


def register_spec(spec: TextToImageSpec) -> TextToImageSpec:
    SPECS[spec.pipeline_class] = spec
    return spec


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def _patch(pipe: Any) -> int:
    return int(getattr(pipe.transformer.config, "patch_size", 1) or 1)


def _mid_timestep(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A real timestep from the middle of the training schedule (these pipelines pass t in 0..1000)."""
    return torch.full((1,), 500.0, device=device, dtype=dtype)


def _zeros(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype, device=device)


def _probe_flux(tr: Any, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """FLUX: 2x2 packed latent tokens with their ids, T5 states and txt_ids, CLIP's pooled vector, t/1000."""
    cfg, side = tr.config, 2
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device, dtype)
    inputs = {
        "hidden_states": torch.randn(1, side * side, cfg.in_channels, generator=torch.Generator().manual_seed(0)
                                     ).to(device, dtype),
        "encoder_hidden_states": _zeros(1, PROBE_TEXT_TOKENS, cfg.joint_attention_dim, dtype=dtype, device=device),
        "pooled_projections": _zeros(1, cfg.pooled_projection_dim, dtype=dtype, device=device),
        "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),  # FluxPipeline passes t / 1000
        "img_ids": img_ids,
        "txt_ids": _zeros(PROBE_TEXT_TOKENS, 3, dtype=dtype, device=device),
    }
    if getattr(cfg, "guidance_embeds", False):
        inputs["guidance"] = torch.full((1,), 3.5, device=device, dtype=torch.float32)
    return inputs


def _latent(tr: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    side = 2 * int(getattr(tr.config, "patch_size", 1) or 1)
    return torch.randn(1, tr.config.in_channels, side, side, generator=torch.Generator().manual_seed(0)).to(device, dtype)


def _probe_sd3(tr: Any, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    cfg = tr.config
    return {"hidden_states": _latent(tr, dtype, device),
            "encoder_hidden_states": _zeros(1, PROBE_TEXT_TOKENS, cfg.joint_attention_dim, dtype=dtype, device=device),
            "pooled_projections": _zeros(1, cfg.pooled_projection_dim, dtype=dtype, device=device),
            "timestep": _mid_timestep(device, dtype)}


def _probe_pixart(tr: Any, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    cfg = tr.config
    return {"hidden_states": _latent(tr, dtype, device),
            "encoder_hidden_states": _zeros(1, PROBE_TEXT_TOKENS, cfg.caption_channels, dtype=dtype, device=device),
            "encoder_attention_mask": torch.ones(1, PROBE_TEXT_TOKENS, device=device),
            "timestep": _mid_timestep(device),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def _probe_sana(tr: Any, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    cfg = tr.config
    inputs = {"hidden_states": _latent(tr, dtype, device),
              "encoder_hidden_states": _zeros(1, PROBE_TEXT_TOKENS, cfg.caption_channels, dtype=dtype, device=device),
              "encoder_attention_mask": torch.ones(1, PROBE_TEXT_TOKENS, device=device),
              "timestep": _mid_timestep(device, dtype)}
    if getattr(cfg, "guidance_embeds", False):
        inputs["guidance"] = torch.full((1,), 4.5, device=device, dtype=dtype)
    return inputs


def _max_sequence_length(high: int) -> ExtraField:
    return ExtraField("max_sequence_length", int, 1, high, "text tokens the T5/Gemma encoder reads")


register_spec(TextToImageSpec(
    "FluxPipeline", lambda pipe: pipe.vae_scale_factor * 2,
    "vae_scale_factor {vae} x 2: FLUX packs 2x2 latent patches",
    extras=(_max_sequence_length(512),
            ExtraField("true_cfg_scale", float, 1.0, 20.0, "true classifier-free guidance with negative_prompt (> 1)")),
    probe=_probe_flux))
register_spec(TextToImageSpec(
    "StableDiffusion3Pipeline", lambda pipe: pipe.vae_scale_factor * _patch(pipe),
    "vae_scale_factor {vae} x the transformer's patch_size {patch}",
    extras=(_max_sequence_length(512),), probe=_probe_sd3))
register_spec(TextToImageSpec(
    "PixArtSigmaPipeline", lambda pipe: _lcm(8, pipe.vae_scale_factor * _patch(pipe)),
    "vae_scale_factor {vae} x the transformer's patch_size {patch}, and a multiple of 8",
    extras=(_max_sequence_length(300),), fixed={"clean_caption": False, "use_resolution_binning": False},
    legacy_callback=True, probe=_probe_pixart))
register_spec(TextToImageSpec(
    "SanaPipeline", lambda pipe: _lcm(32, pipe.vae_scale_factor * _patch(pipe)),
    "vae_scale_factor {vae} x the transformer's patch_size {patch}, and a multiple of 32",
    extras=(_max_sequence_length(300),), fixed={"clean_caption": False, "use_resolution_binning": False},
    probe=_probe_sana))


class TextToImagePipeline(ServedPipeline):
    """A loaded diffusers text-to-image pipeline behind the protocol."""

    family = "text-to-image"

    def __init__(self, pipe: Any, spec: TextToImageSpec, limits: ResolvedLimits, dtype: torch.dtype,
                 default_size_field: str = "limits.default_size"):
        self.pipe, self.spec, self.limits, self.dtype = pipe, spec, limits, dtype
        self.pipeline_class = type(pipe).__name__
        self.report = pipe.quantserve_report
        self.denoiser = pipe.transformer
        self.modules = [getattr(pipe, name) for name in self.report.components]
        self.multiple = int(spec.size_multiple(pipe))
        self.size_reason = spec.size_reason.format(vae=pipe.vae_scale_factor, patch=_patch(pipe))
        params = inspect.signature(type(pipe).__call__).parameters
        self.takes_negative = "negative_prompt" in params
        guidance = params.get("guidance_scale")
        self.default_guidance = float(guidance.default) if guidance is not None and isinstance(
            guidance.default, (int, float)) else 1.0
        self.fixed = {k: v for k, v in spec.fixed.items() if k in params}
        self.extras = {name: e for name, e in spec.extra_map().items() if name in params}
        pipe.set_progress_bar_config(disable=True)
        refused = self._size_rule(limits.default_width, limits.default_height)
        if refused:
            raise ConfigError(f"{default_size_field}: the default size {limits.default_width}x{limits.default_height} "
                              f"does not suit {self.pipeline_class}: {refused}")

    def _size_rule(self, width: int, height: int) -> str | None:
        if width % self.multiple or height % self.multiple:
            return f"each side must be a multiple of {self.multiple} for {self.pipeline_class} ({self.size_reason})"
        return None

    def normalize(self, job: Mapping[str, Any]) -> dict[str, Any]:
        out = check_common(job, self.limits, self.default_guidance, self._size_rule)
        if out["negative_prompt"] is not None and not self.takes_negative:
            raise ClientError("negative_prompt", f"{self.pipeline_class} takes no negative prompt")
        out["extras"] = check_extras(out["extras"], self.extras, self.pipeline_class)
        return out

    def batch_key(self, job: Mapping[str, Any]) -> Hashable:
        return (job["width"], job["height"], job["steps"], job["guidance"], job["negative_prompt"] is not None,
                tuple(sorted(job["extras"].items())))

    def call_kwargs(self, jobs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The pipeline call for a group of compatible, normalised jobs (without the step callback)."""
        first = jobs[0]
        kwargs: dict[str, Any] = {
            "prompt": [job["prompt"] for job in jobs for _ in range(job["n"])],
            "height": first["height"], "width": first["width"], "num_inference_steps": first["steps"],
            "guidance_scale": first["guidance"], "num_images_per_prompt": 1,
            "generator": [torch.Generator("cpu").manual_seed(job["seed"] + i) for job in jobs for i in range(job["n"])],
            "output_type": "pil", **self.fixed, **first["extras"],
        }
        if first["negative_prompt"] is not None:
            kwargs["negative_prompt"] = [job["negative_prompt"] for job in jobs for _ in range(job["n"])]
        return kwargs

    def run(self, jobs: Sequence[Mapping[str, Any]], on_step: StepCallback | None = None) -> list[JobResult]:
        kwargs = self.call_kwargs(jobs)
        steps = jobs[0]["steps"]
        if on_step is not None:
            if self.spec.legacy_callback:
                kwargs.update(callback=lambda i, t, latents: on_step(i + 1, steps), callback_steps=1)
            else:
                def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                    on_step(i + 1, steps)
                    return {}
                kwargs["callback_on_step_end"] = on_step_end
        images = self.pipe(**kwargs).images
        results, offset = [], 0
        for job in jobs:
            results.append(JobResult(list(images[offset:offset + job["n"]])))
            offset += job["n"]
        return results

    def health(self) -> None:
        tr = self.denoiser
        device = next(tr.parameters()).device
        inputs = self.spec.probe(tr, self.dtype, device) if self.spec.probe else None
        if inputs is None:
            raise RuntimeError(f"health check: no probe for {self.pipeline_class}")
        with torch.inference_mode():
            out = tr(**inputs, return_dict=False)[0]
        if out.shape[0] != 1 or not torch.isfinite(out).all():
            raise RuntimeError(f"health check: {type(tr).__name__}'s output is not finite (shape {tuple(out.shape)})")

    def quantization_configs(self) -> dict[str, Any]:
        configs = getattr(self.pipe, "quantserve_configs", {}) or {}
        return {name: (c.to_dict() if c is not None else None) for name, c in configs.items()}

    def info(self) -> dict[str, Any]:
        return {
            "size_multiple": self.multiple,
            "negative_prompt": self.takes_negative,
            "extras": {name: e.to_dict() for name, e in self.extras.items()},
            "defaults": {"size": f"{self.limits.default_width}x{self.limits.default_height}",
                         "steps": self.limits.default_steps, "guidance": self.default_guidance},
        }


class TextToImageFamily(PipelineFamily):
    """diffusers text-to-image pipelines, picked by model_index.json's `_class_name`."""

    name = "text-to-image"

    def claims(self, source: ModelSource) -> bool:
        return source.model is not None and source.class_name in SPECS

    def supported(self) -> list[str]:
        return sorted(SPECS)

    def extra_fields(self) -> list[str]:
        return sorted({e.name for spec in SPECS.values() for e in spec.extras})

    def check(self, source: ModelSource, config: VariantConfig, field_prefix: str) -> None:
        components = sorted(k for k, v in (source.index or {}).items() if not k.startswith("_") and isinstance(v, list))
        for name in component_names(config.quantization_spec()):
            if name not in components:
                raise ConfigError(f"{field_prefix}.quantization: component {name!r} is not in {source.path}/"
                                  f"model_index.json (its components: {', '.join(components)})")

    def load(self, source: ModelSource, config: VariantConfig, limits: ResolvedLimits, device: str) -> ServedPipeline:
        from quantserve.runtime import load_pipeline

        spec = SPECS[source.class_name or ""]
        dtype = dtype_from_name(config.dtype, FLOAT_DTYPES)
        pipe = load_pipeline(source.path, config.quantization_spec(), device=device, torch_dtype=dtype,
                             kernel_policy=config.kernel_policy or None)
        return TextToImagePipeline(pipe, spec, limits, dtype)
