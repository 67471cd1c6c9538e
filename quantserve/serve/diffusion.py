"""The Diffusion deployment: one per variant. Loads the variant through quantserve at start, batches compatible
requests with @serve.batch, records the model metrics, and checks its health with a tiny forward."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import torch
from ray import serve

from .config import VariantConfig
from .gemm_probe import GemmProbe
from .generation import BatchGenerator, BatchStats, error_outcome, load_variant
from .metrics import VariantMetrics


def _batch_images(jobs: list[dict[str, Any]]) -> int:
    """A batch's size for @serve.batch: images, not requests."""
    return sum(int(job.get("n", 1)) for job in jobs)


@serve.deployment(name="Diffusion", graceful_shutdown_timeout_s=5, health_check_timeout_s=30)
class Diffusion:
    """Generates images for one variant; the router calls `generate(job)`, /v1/models reads `info()`."""

    def __init__(self, variant: dict[str, Any]):
        self.config = VariantConfig.model_validate(variant)
        torch.set_num_threads(self.config.resources.torch_threads)
        self.loaded = load_variant(self.config)
        self.probe = GemmProbe(self.loaded.pipe.transformer, self.config.gemm_sample_every)
        self.generator = BatchGenerator(self.loaded.pipe, self.config.fail_on_seed, self.probe)
        self.generator.health()  # fail the start, not the first request, when the model cannot compute
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.started = time.time()
        self.metrics = VariantMetrics(self.config.name, self.loaded.backend, self.loaded.scheme, self.loaded.kernel)
        self.metrics.model_bytes.set(self.loaded.report.model_bytes)
        self._batched.set_max_batch_size(self.config.batching.max_batch_images)
        self._batched.set_batch_wait_timeout_s(self.config.batching.batch_wait_timeout_s)

    async def generate(self, job: dict[str, Any]) -> dict[str, Any]:
        """One job's outcome: {"status": 200, "images": [PNG bytes], ...} or an error outcome; never raises."""
        arrived = time.perf_counter()
        try:
            outcome = await self._batched(job)
        except Exception as exc:  # noqa: BLE001 - e.g. @serve.batch rejecting an oversized job
            outcome = error_outcome(exc, f"variant {self.config.name}")
        outcome["replica"] = self.replica
        outcome["variant"] = self.config.name
        self.metrics.requests.inc(tags={"status": str(outcome["status"])})
        # a gauge set once at start can miss the metrics agent's first export; refresh it with every request
        self.metrics.model_bytes.set(self.loaded.report.model_bytes)
        if outcome["status"] == 200:
            self.metrics.request_latency.observe(time.perf_counter() - arrived)
        return outcome

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, batch_size_fn=_batch_images)
    async def _batched(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        outcomes, stats = await asyncio.to_thread(self.generator.run, jobs)
        self._record(jobs, outcomes, stats)
        return outcomes

    def _record(self, jobs: list[dict[str, Any]], outcomes: list[dict[str, Any]], stats: BatchStats) -> None:
        m = self.metrics
        for job, outcome in zip(jobs, outcomes):
            if outcome["status"] == 200:
                m.images.inc(job["n"])
                m.steps.inc(job["n"] * job["steps"])
        for seconds in stats.step_seconds:
            m.step_latency.observe(seconds)
        if stats.images and stats.seconds > 0:
            m.images_per_second.set(stats.images / stats.seconds)
        for (backend, kernel), sample in stats.gemm.items():
            tags = m.with_kernel(backend, kernel)
            m.gemm_gflops.set(sample.gflops, tags=tags)
            m.gemm_calls.inc(sample.calls, tags=tags)

    async def info(self) -> dict[str, Any]:
        """The variant's scheme, config, bytes and kernels, and which replica answered."""
        return {**self.loaded.info(), "replica": self.replica, "pid": os.getpid(), "started": self.started}

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; an exception marks the replica unhealthy and Ray restarts it."""
        await asyncio.to_thread(self.generator.health)
