"""The embedded digits model as a pipeline family for quantserve's server (quantserve.serve.protocol).

Registered through the `quantserve.pipelines` entry point group in pyproject.toml, so quantserve.serve imports nothing
from this package. It serves `model: null` (the shipped weights), a directory whose model_index.json names
DigitsPipeline, and a bare digits-layout directory (transformer/ + scheduler/, no model_index.json). Requests keep the
digits' rules: a prompt is a digit (0-9 or its word), images are square, no negative prompt, no extra fields.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from quantserve.runtime.dtypes import FLOAT_DTYPES, dtype_from_name
from quantserve.runtime.phases import merge_phases
from quantserve.serve.config import ConfigError, ResolvedLimits, VariantConfig
from quantserve.serve.protocol import (
    ClientError,
    JobResult,
    ModelSource,
    PipelineFamily,
    ServedPipeline,
    StepCallback,
    check_common,
    check_extras,
)
from quantserve.serve.quantization import is_single_config

from . import default_model_dir

CLASS_NAME = "DigitsPipeline"


def _square(width: int, height: int) -> str | None:
    return None if width == height else "the digits model makes square images: width must equal height"


class ServedDigits(ServedPipeline):
    """A DigitsPipeline behind the server's protocol; jobs with the same steps and guidance share a batch (sizes
    may differ: every digit is 8x8 and upscaled to its job's size)."""

    family = "digits"
    pipeline_class = CLASS_NAME
    probe_prompt = "7"

    def __init__(self, pipe: Any, limits: ResolvedLimits):
        self.pipe, self.limits = pipe, limits
        self.report = pipe.transformer.quantserve_report
        self.own_phases: dict[str, float] = {}  # the family's load around the transformer's: imports, scheduler
        self.modules = [pipe.transformer]

    @property
    def phases(self) -> dict[str, float]:
        """The transformer's load phases, with the imports and the scheduler the family loaded around it."""
        return merge_phases(self.own_phases, self.report.phases)

    def normalize(self, job: Mapping[str, Any]) -> dict[str, Any]:
        from .prompts import parse_prompts

        out = check_common(job, self.limits, 1.0, _square)
        if out["negative_prompt"] is not None:
            raise ClientError("negative_prompt", "the digits model takes no negative prompt")
        out["extras"] = check_extras(out["extras"], {}, "the digits model")
        try:
            parse_prompts([out["prompt"]])
        except ValueError as exc:
            raise ClientError("prompt", str(exc).removeprefix("prompt ")) from None
        return out

    def batch_key(self, job: Mapping[str, Any]) -> Hashable:
        return (job["steps"], job["guidance"])

    def run(self, jobs: Sequence[Mapping[str, Any]], on_step: StepCallback | None = None) -> list[JobResult]:
        from .pipeline import parse_prompts, to_pil

        pipe = self.pipe
        labels = [parse_prompts([job["prompt"]] * job["n"]) for job in jobs]
        noise = torch.cat([pipe.initial_noise(job["n"], job["seed"], None) for job in jobs])
        steps, guidance = jobs[0]["steps"], jobs[0]["guidance"]
        scheduler = pipe.timed_scheduler(steps)
        x = noise * scheduler.init_noise_sigma
        y = torch.tensor([label for ls in labels for label in ls], dtype=torch.long)
        with torch.inference_mode():
            for i, t in enumerate(scheduler.timesteps):
                x = scheduler.step(pipe.predict(x, t, y, guidance), t, x).prev_sample
                if on_step is not None:
                    on_step(i + 1, steps)
        pixels = x.clamp(-1.0, 1.0)
        results, offset = [], 0
        for job, ls in zip(jobs, labels):
            results.append(JobResult(to_pil(pixels[offset:offset + len(ls)], job["width"]), {"labels": ls}))
            offset += len(ls)
        return results

    def health(self) -> None:
        pipe = self.pipe
        x = torch.zeros(1, 1, pipe.sample_size, pipe.sample_size)
        with torch.inference_mode():
            out = pipe.predict(x, torch.tensor(500), torch.tensor([0]), 1.0)
        if not torch.isfinite(out).all():
            raise RuntimeError("health check: the model's output is not finite")

    def quantization_configs(self) -> dict[str, Any]:
        config = getattr(self.pipe.transformer, "quantserve_config", None)
        return {"transformer": config.to_dict() if config is not None else None}

    def info(self) -> dict[str, Any]:
        return {"prompts": "a digit 0-9 or its word (zero ... nine)", "negative_prompt": False, "extras": {},
                "defaults": {"size": f"{self.limits.default_width}x{self.limits.default_height}",
                             "steps": self.limits.default_steps, "guidance": 1.0}}


class DigitsFamily(PipelineFamily):
    """The embedded class-conditional digits DiT (and any model directory in its layout)."""

    name = "digits"

    def default_model_dir(self) -> Path:
        return default_model_dir()

    def claims(self, source: ModelSource) -> bool:
        if source.model is None or source.class_name == CLASS_NAME:
            return True
        return source.index is None and (source.path / "transformer").is_dir() and (source.path / "scheduler").is_dir()

    def supported(self) -> list[str]:
        return [CLASS_NAME]

    def check(self, source: ModelSource, config: VariantConfig, field_prefix: str) -> None:
        for part in ("transformer", "scheduler"):
            if not (source.path / part).is_dir():
                raise ConfigError(f"{field_prefix}.model: {source.path} has no {part}/ directory (a digits model "
                                  "directory holds transformer/ and scheduler/)")
        spec = config.quantization_spec()
        if spec is not None and not is_single_config(spec) and set(spec) != {"transformer"}:
            raise ConfigError(f"{field_prefix}.quantization: the digits model has one weight component, its "
                              "transformer: give a scheme, a quantization_config block or {transformer: ...}")

    def check_prompt(self, prompt: str) -> str | None:
        from .prompts import parse_prompts  # light: the Ingress calls this

        try:
            parse_prompts([prompt])
        except ValueError as exc:
            return str(exc).removeprefix("prompt ")
        return None

    def load(self, source: ModelSource, config: VariantConfig, limits: ResolvedLimits, device: str) -> ServedPipeline:
        began = time.perf_counter()
        from diffusers import DDIMScheduler

        from quantserve.runtime import load_model

        from .pipeline import DigitsPipeline

        imports = time.perf_counter() - began  # diffusers' model classes (and what they pull in): most of a start
        self.check(source, config, source.field.rsplit(".", 1)[0])
        dtype = dtype_from_name(config.dtype, FLOAT_DTYPES)
        spec = config.quantization_spec()
        if isinstance(spec, Mapping) and set(spec) == {"transformer"}:
            spec = spec["transformer"]
        transformer = load_model(source.path / "transformer", spec, device=device, torch_dtype=dtype,
                                 kernel_policy=config.kernel_policy or None)
        mark = time.perf_counter()
        scheduler = DDIMScheduler.from_pretrained(source.path / "scheduler")
        served = ServedDigits(DigitsPipeline(transformer, scheduler, dtype=dtype), limits)
        served.own_phases = {"imports": imports, "components": time.perf_counter() - mark}
        return served
