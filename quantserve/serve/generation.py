"""A variant's model in a replica: load it through its pipeline family, then generate batches of compatible jobs.

Plain Python with no Ray, so the batching, the per-request outcomes and the fidelity to an in-process pipeline call
are tested without a cluster. The family (serve/protocol.py) normalises each job and says which jobs are compatible;
compatible jobs run as one pipeline call, each job with its own seeds (image i of a job uses seed + i).
"""

from __future__ import annotations

import io
import logging
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import ResolvedLimits, ServeConfig, VariantConfig
from .families import resolve
from .gemm_probe import GemmProbe, GemmSample
from .protocol import ClientError, GenerationCancelled, ModelSource, ServedPipeline, StepCallback

logger = logging.getLogger("quantserve.serve")

__all__ = ["BatchGenerator", "BatchStats", "ClientError", "LoadedVariant", "encode_png", "error_outcome",
           "load_variant", "new_error_id"]


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
    """A variant ready to generate: its served pipeline (the family's), the labels metrics carry, and its limits."""

    config: VariantConfig
    engine: ServedPipeline
    source: ModelSource
    limits: ResolvedLimits
    device: str
    tuning: dict[str, Any] = field(default_factory=lambda: {"on_start": False})  # serve/tuning.py's summary

    @property
    def report(self) -> Any:
        return self.engine.report

    @property
    def phases(self) -> dict[str, float]:
        """Seconds per phase of the load (read, unpack or quantize, to_device, build, ...: runtime/phases.py),
        summing to about the load's seconds."""
        return self.engine.phases

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
        report, engine = self.report, self.engine
        configs = engine.quantization_configs()
        denoiser = "transformer" if "transformer" in configs else next(iter(configs), None)
        layers = report.layers
        components = {name: _component_info(r, configs.get(name))
                      for name, r in getattr(report, "components", {}).items()}
        return {
            "id": self.config.name,
            "model": "embedded digits DiT" if self.config.model is None else self.source.path.name,
            "family": engine.family,
            "pipeline_class": engine.pipeline_class,
            "scheme": self.scheme,
            "backend": self.backend,
            "kernel": self.kernel,
            "quantization_config": configs.get(denoiser) if denoiser else None,
            "model_bytes": report.model_bytes,
            "bf16_bytes": report.bf16_bytes,
            "ratio": round(report.ratio, 4),
            "dtype": self.config.dtype,
            "device": self.device,
            "load_seconds": round(report.seconds, 3),
            "limits": self.limits.to_dict(),
            "layers": {
                "total": len(layers),
                "quantized": len(report.quantized_layers),
                "kernels": dict(Counter(layer.kernel for layer in layers)),
                "backends": dict(Counter(layer.backend for layer in layers)),
                "formats": dict(Counter(layer.fmt for layer in layers)),
                "kernel_reasons": dict(Counter(layer.reason for layer in report.quantized_layers if layer.reason)),
            },
            "routing": self.routing(),
            "autotune": self.tuning,
            **({"components": components} if components else {}),
            **engine.info(),
        }


    def routing(self) -> dict[str, Any]:
        """What the quantized layers run now (after any deploy-time autotune): layers per kernel, and where the
        winners differ by M, layers per (M bucket, kernel)."""
        from quantserve.runtime.router import quant_layers

        kernels: Counter[str] = Counter()
        by_m: dict[int, Counter[str]] = {}
        for module in self.engine.modules:
            for _, layer in quant_layers(module):
                kernels[layer.kernel_name] += 1
                for bucket, (name, _) in layer.by_bucket.items():
                    by_m.setdefault(bucket, Counter())[name] += 1
        return {"kernels": dict(kernels), "by_m_bucket": {str(b): dict(c) for b, c in sorted(by_m.items())}}


def _component_info(report: Any, config: Any) -> dict[str, Any]:
    return {"class": report.model_class, "backend": report.backend, "scheme": report.scheme,
            "quantization_config": config, "model_bytes": report.model_bytes, "bf16_bytes": report.bf16_bytes,
            "layers": len(report.layers), "quantized": len(report.quantized_layers)}


def load_variant(config: VariantConfig, limits: ResolvedLimits | None = None, field: str | None = None) -> LoadedVariant:
    """Load a variant through the family that serves its model; a ConfigError names `field` (its model)."""
    field = field or f"variants[{config.name}].model"
    limits = limits or ServeConfig(variants=[config]).variant_limits(config.name)
    family, source = resolve(config.model, field)
    family.check(source, config, field.rsplit(".", 1)[0])
    device = "cuda" if config.resources.num_gpus > 0 else "cpu"
    engine = family.load(source, config, limits, device)
    return LoadedVariant(config, engine, source, limits, device)


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
    encode_seconds: float = 0.0  # PNG encoding, part of `seconds`


class BatchGenerator:
    """Generates batches of jobs on one loaded variant; every job gets its own outcome, never a shared failure
    unless the pipeline call it ran in failed. One pipeline call runs at a time (a lock: batches and streams)."""

    def __init__(self, loaded: LoadedVariant, probe: GemmProbe | None = None):
        self.loaded, self.engine = loaded, loaded.engine
        self.probe = probe
        self._lock = threading.Lock()

    def prepare(self, job: Mapping[str, Any]) -> dict[str, Any]:
        """The job normalised by the variant's family; ClientError names the field it refuses."""
        if not isinstance(job, Mapping):
            raise ClientError("body", f"expected a job mapping, got {type(job).__name__}")
        return self.engine.normalize(job)

    def run(self, jobs: Sequence[Mapping[str, Any]], on_step: StepCallback | None = None
            ) -> tuple[list[dict[str, Any]], BatchStats]:
        """One outcome per job, in order: {"status": 200, "images": [png bytes], ...} or a 4xx/500 outcome.

        `on_step(step, steps)` is called after every denoising step of every group (a stream runs one job)."""
        start = time.perf_counter()
        stats = BatchStats()
        outcomes: list[dict[str, Any] | None] = [None] * len(jobs)
        groups: dict[Hashable, list[tuple[int, dict[str, Any]]]] = {}
        for i, job in enumerate(jobs):
            try:
                normal = self.prepare(job)
            except ClientError as exc:
                outcomes[i] = client_outcome(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - one job's failure is that job's 500, not the batch's
                outcomes[i] = error_outcome(exc, "the model replica")
                continue
            groups.setdefault(self.engine.batch_key(normal), []).append((i, normal))
        sampling = self.probe is not None and bool(groups) and self.probe.due()
        for members in groups.values():
            group = [job for _, job in members]
            try:
                results = self._run_group(group, stats, sampling, on_step)
                encode_start = time.perf_counter()
                for (i, job), result in zip(members, results, strict=True):
                    outcomes[i] = {"status": 200, "images": [encode_png(im) for im in result.images],
                                   "seed": job["seed"], "steps": job["steps"], "guidance": job["guidance"],
                                   "size": job["size"], **result.meta}
                    stats.images += job["n"]
                stats.encode_seconds += time.perf_counter() - encode_start
            except GenerationCancelled as exc:  # the requester is gone: nothing to log, nobody to answer
                failed = {"status": 499, "code": "cancelled", "message": f"cancelled: {exc}"}
                for i, _ in members:
                    outcomes[i] = dict(failed)
            except Exception as exc:  # noqa: BLE001 - a failed pipeline call answers each of its jobs with a 500
                failed = error_outcome(exc, "the model replica")
                for i, _ in members:
                    outcomes[i] = dict(failed)
        stats.seconds = time.perf_counter() - start
        assert all(o is not None for o in outcomes)
        return outcomes, stats  # type: ignore[return-value]

    def _run_group(self, group: list[dict[str, Any]], stats: BatchStats, sampling: bool,
                   on_step: StepCallback | None) -> list[Any]:
        last = [time.perf_counter()]

        def step(done: int, steps: int) -> None:
            now = time.perf_counter()
            stats.step_seconds.append(now - last[0])
            last[0] = now
            if on_step is not None:
                on_step(done, steps)

        with self._lock:
            last[0] = time.perf_counter()
            if not sampling:
                return self.engine.run(group, step)
            assert self.probe is not None
            with self.probe.sampling() as gemm:
                results = self.engine.run(group, step)
            for key, sample in gemm.items():
                total = stats.gemm.setdefault(key, GemmSample(*key))
                total.calls += sample.calls
                total.flops += sample.flops
                total.seconds += sample.seconds
            return results

    def health(self) -> None:
        """A tiny real forward of the variant's denoiser; raises when it cannot compute or returns non-finite."""
        self.engine.health()


def client_outcome(exc: ClientError) -> dict[str, Any]:
    return {"status": exc.status, "param": exc.param, "message": str(exc)}
