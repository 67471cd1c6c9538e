"""A variant's model in a replica: load it through quantserve, then generate batches of compatible requests.

Plain Python with no Ray, so the batching, the per-request outcomes and the fidelity to DigitsPipeline are tested
without a cluster. A job is a dict (prompt, n, size, steps, guidance, seed); jobs with the same steps and guidance
run as one batch of images, each job with its own seeds (image i of a job uses seed + i, as DigitsPipeline does).
"""

from __future__ import annotations

import io
import logging
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import VariantConfig
from .gemm_probe import GemmProbe, GemmSample

logger = logging.getLogger("quantserve.serve")

JOB_FIELDS = ("prompt", "n", "size", "steps", "guidance", "seed")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class ClientError(ValueError):
    """A request the model cannot take (e.g. a prompt it does not know): a 4xx naming the field."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(f"{param}: {message}")


def new_error_id() -> str:
    return uuid.uuid4().hex[:12]


def error_outcome(exc: BaseException, where: str) -> dict[str, Any]:
    """A 500 outcome with an error id; the traceback goes to the replica's log under that id."""
    error_id = new_error_id()
    logger.error("error %s in %s: %s\n%s", error_id, where, exc,
                 "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return {"status": 500, "error_id": error_id, "code": "internal_error",
            "message": f"internal error in {where} (error id {error_id}); the replica keeps serving"}


@dataclass
class LoadedVariant:
    """A variant ready to generate: the pipeline, its load report, and the labels metrics carry."""

    config: VariantConfig
    pipe: Any  # quantserve.default_model.DigitsPipeline
    report: Any  # quantserve.runtime.report.LoadReport
    model_dir: Path
    device: str

    @property
    def backend(self) -> str:
        return self.report.backend

    @property
    def scheme(self) -> str:
        return self.config.scheme_label

    @property
    def kernel(self) -> str:
        """The kernel most of the quantized layers run ('torch' when none is quantized)."""
        kernels = Counter(layer.kernel for layer in self.report.layers if layer.backend != "dense")
        return kernels.most_common(1)[0][0] if kernels else "torch"

    def info(self) -> dict[str, Any]:
        """What GET /v1/models shows for this variant."""
        report = self.report
        qconfig = getattr(self.pipe.transformer, "quantserve_config", None)
        layers = report.layers
        return {
            "id": self.config.name,
            "model": "embedded digits DiT" if self.config.model is None else self.model_dir.name,
            "scheme": self.scheme,
            "backend": self.backend,
            "kernel": self.kernel,
            "quantization_config": qconfig.to_dict() if qconfig is not None else None,
            "model_bytes": report.model_bytes,
            "bf16_bytes": report.bf16_bytes,
            "ratio": round(report.ratio, 4),
            "dtype": self.config.dtype,
            "device": self.device,
            "load_seconds": round(report.seconds, 3),
            "layers": {
                "total": len(layers),
                "quantized": len(report.quantized_layers),
                "kernels": dict(Counter(layer.kernel for layer in layers)),
                "backends": dict(Counter(layer.backend for layer in layers)),
                "formats": dict(Counter(layer.fmt for layer in layers)),
                "kernel_reasons": dict(Counter(layer.reason for layer in report.quantized_layers if layer.reason)),
            },
        }


def model_dir_for(config: VariantConfig) -> Path:
    """The variant's model directory: its `model`, or the embedded digits model."""
    if config.model is None:
        from quantserve.default_model import default_model_dir

        return default_model_dir()
    return Path(config.model).expanduser()


def load_variant(config: VariantConfig) -> LoadedVariant:
    """Load the variant's transformer through quantserve.runtime.load_model with its scheme and kernel policy."""
    from diffusers import DDIMScheduler
    from quantserve.runtime import load_model

    from quantserve.default_model import DigitsPipeline

    model_dir = model_dir_for(config)
    for part in ("transformer", "scheduler"):
        if not (model_dir / part).is_dir():
            raise FileNotFoundError(f"variants[{config.name}].model: {model_dir} has no {part}/ directory "
                                    "(expected a diffusers model directory with transformer/ and scheduler/)")
    device = "cuda" if config.resources.num_gpus > 0 else "cpu"
    dtype = DTYPES[config.dtype]
    transformer = load_model(model_dir / "transformer", config.quantization_spec(), device=device, torch_dtype=dtype,
                             kernel_policy=config.kernel_policy or None)
    scheduler = DDIMScheduler.from_pretrained(model_dir / "scheduler")
    pipe = DigitsPipeline(transformer, scheduler, dtype=dtype)
    return LoadedVariant(config, pipe, transformer.quantserve_report, model_dir, device)


def encode_png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class BatchStats:
    """What one call of `BatchGenerator.run` did, for metrics."""

    images: int = 0
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    gemm: dict[tuple[str, str], GemmSample] = field(default_factory=dict)


class BatchGenerator:
    """Generates batches of jobs on one loaded pipeline; every job gets its own outcome, never a shared failure
    unless the batch it ran in failed."""

    def __init__(self, pipe: Any, fail_on_seed: int | None = None, probe: GemmProbe | None = None):
        self.pipe, self.fail_on_seed, self.probe = pipe, fail_on_seed, probe

    def _prepare(self, job: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
        from quantserve.default_model import parse_prompts

        if self.fail_on_seed is not None and job["seed"] == self.fail_on_seed:
            raise RuntimeError(f"injected failure: seed {job['seed']} is this variant's fail_on_seed")
        try:
            labels = parse_prompts([job["prompt"]] * job["n"])
        except ValueError as exc:
            raise ClientError("prompt", str(exc).removeprefix("prompt ")) from None
        return labels, self.pipe.initial_noise(job["n"], job["seed"], None)

    def _denoise(self, noise: torch.Tensor, labels: list[int], steps: int, guidance: float,
                 on_step: Callable[[float], None]) -> torch.Tensor:
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)  # per call: set_timesteps mutates state
        scheduler.set_timesteps(steps)
        x = noise * scheduler.init_noise_sigma
        y = torch.tensor(labels, dtype=torch.long)
        for t in scheduler.timesteps:
            start = time.perf_counter()
            x = scheduler.step(self.pipe.predict(x, t, y, guidance), t, x).prev_sample
            on_step(time.perf_counter() - start)
        return x.clamp(-1.0, 1.0)

    def run(self, jobs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], BatchStats]:
        """One outcome per job, in order: {"status": 200, "images": [png bytes], ...} or a 4xx/500 outcome."""
        from quantserve.default_model.pipeline import to_pil

        start = time.perf_counter()
        stats = BatchStats()
        outcomes: list[dict[str, Any] | None] = [None] * len(jobs)
        groups: dict[tuple[int, float], list[tuple[int, list[int], torch.Tensor]]] = {}
        for i, job in enumerate(jobs):
            try:
                labels, noise = self._prepare(job)
            except ClientError as exc:
                outcomes[i] = {"status": 422, "param": exc.param, "message": str(exc)}
                continue
            except Exception as exc:  # noqa: BLE001 - one job's failure is that job's 500, not the batch's
                outcomes[i] = error_outcome(exc, "the model replica")
                continue
            groups.setdefault((job["steps"], float(job["guidance"])), []).append((i, labels, noise))
        sampling = self.probe is not None and bool(groups) and self.probe.due()
        for (steps, guidance), members in groups.items():
            try:
                labels = [label for _, ls, _ in members for label in ls]
                noise = torch.cat([nz for _, _, nz in members])
                with torch.inference_mode():
                    if sampling:
                        with self.probe.sampling() as gemm:
                            pixels = self._denoise(noise, labels, steps, guidance, stats.step_seconds.append)
                        for key, sample in gemm.items():
                            total = stats.gemm.setdefault(key, GemmSample(*key))
                            total.calls += sample.calls
                            total.flops += sample.flops
                            total.seconds += sample.seconds
                    else:
                        pixels = self._denoise(noise, labels, steps, guidance, stats.step_seconds.append)
                offset = 0
                for i, ls, _ in members:
                    job = jobs[i]
                    images = to_pil(pixels[offset:offset + len(ls)], job["size"])
                    offset += len(ls)
                    outcomes[i] = {"status": 200, "images": [encode_png(im) for im in images],
                                   "labels": ls, "seed": job["seed"], "steps": steps}
                    stats.images += len(ls)
            except Exception as exc:  # noqa: BLE001 - a failed batch answers each of its jobs with a 500
                failed = error_outcome(exc, "the model replica")
                for i, _, _ in members:
                    outcomes[i] = dict(failed)
        stats.seconds = time.perf_counter() - start
        assert all(o is not None for o in outcomes)
        return outcomes, stats  # type: ignore[return-value]

    def health(self) -> None:
        """A tiny forward (one image, one timestep); raises when the model cannot compute or returns non-finite."""
        pipe = self.pipe
        x = torch.zeros(1, 1, pipe.sample_size, pipe.sample_size)
        with torch.inference_mode():
            out = pipe.predict(x, torch.tensor(500), torch.tensor([0]), 1.0)
        if not torch.isfinite(out).all():
            raise RuntimeError("health check: the model's output is not finite")
