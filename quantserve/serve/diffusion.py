"""The Diffusion deployment: one per variant. Loads the variant through its pipeline family at start, batches
compatible requests with @serve.batch, streams one request's denoising steps, records the model metrics, and checks
its health with a tiny forward of the variant's own denoiser. It times its own start by phase (cold start), and
reports its pending work in seconds to Ray Serve's autoscaler (`record_autoscaling_stats`, read by the work-aware
policy in serve/autoscaling.py)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve

from quantserve.runtime.phases import collector_paused

from .config import ResolvedLimits, VariantConfig
from .gemm_probe import GemmProbe
from .generation import BatchGenerator, BatchStats, client_outcome, error_outcome, load_variant
from .metrics import VariantMetrics
from .protocol import ClientError, GenerationCancelled
from .autoscaling import PENDING_WORK_METRIC, WorkEstimator
from .tuning import tune_on_start


def _process_started() -> float:
    """When this worker process started (time.time() scale)."""
    import psutil

    return psutil.Process().create_time()


def _batch_images(jobs: list[dict[str, Any]]) -> int:
    """A batch's size for @serve.batch: images, not requests."""
    return sum(int(job.get("n", 1)) for job in jobs)


@serve.deployment(name="Diffusion", graceful_shutdown_timeout_s=5, health_check_timeout_s=30)
class Diffusion:
    """Generates images for one variant; the router calls `generate(job)` or streams `generate_stream(job)`,
    /v1/models reads `info()`."""

    def __init__(self, variant: dict[str, Any], limits: dict[str, Any] | None = None, index: int | None = None):
        began = time.perf_counter()
        # the worker process's start, Ray's set-up and the imports, up to this constructor
        self.cold_start = {"process": max(0.0, time.time() - _process_started())}
        with collector_paused():  # a start allocates millions of lasting objects: no collections over them
            self._start_up(variant, limits, index, began)

    def _start_up(self, variant: dict[str, Any], limits: dict[str, Any] | None, index: int | None, began: float) -> None:
        self.config = VariantConfig.model_validate(variant)
        torch.set_num_threads(self.config.resources.torch_threads)
        field = f"variants.{index}.model" if index is not None else f"variants[{self.config.name}].model"
        mark = time.perf_counter()
        self.loaded = load_variant(self.config, ResolvedLimits.from_dict(limits) if limits else None, field)
        self.cold_start["load"], mark = time.perf_counter() - mark, time.perf_counter()  # read (+ quantize) weights
        # "load" split as the loader timed it (runtime/phases.py): imports, skeleton, read, unpack or quantize,
        # to_device, build, components; exclusive seconds that sum to about "load"
        self.cold_start.update(self.loaded.phases)
        # tune what the cache lacks for this device (the second replica of a variant finds the first one's results)
        self.loaded.tuning = tune_on_start(self.loaded.engine, self.config, self.loaded.device)
        self.cold_start["autotune"], mark = time.perf_counter() - mark, time.perf_counter()
        self.probe = GemmProbe(self.loaded.engine.modules, self.config.gemm_sample_every)
        self.generator = BatchGenerator(self.loaded, self.probe)
        self.generator.health()  # fail the start, not the first request, when the model cannot compute
        self.cold_start["health"] = time.perf_counter() - mark  # the first forward: kernels built on first use
        self.cold_start["total"] = self.cold_start["process"] + (time.perf_counter() - began)
        self.work = WorkEstimator()  # pending work in seconds, for the work-aware autoscaling policy
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.started = time.time()
        self.metrics = VariantMetrics(self.config.name, self.loaded.backend, self.loaded.scheme, self.loaded.kernel)
        self.metrics.model_bytes.set(self.loaded.report.model_bytes)
        for phase, seconds in self.cold_start.items():
            self.metrics.cold_start.observe(seconds, tags={"phase": phase})
        self._batched.set_max_batch_size(self.config.batching.max_batch_images)
        self._batched.set_batch_wait_timeout_s(self.config.batching.batch_wait_timeout_s)

    def _finish(self, outcome: dict[str, Any], arrived: float) -> dict[str, Any]:
        outcome["replica"] = self.replica
        outcome["variant"] = self.config.name
        self.metrics.requests.inc(tags={"status": str(outcome["status"])})
        # a gauge set once at start can miss the metrics agent's first export; refresh it with every request
        self.metrics.model_bytes.set(self.loaded.report.model_bytes)
        if outcome["status"] == 200:
            self.metrics.request_latency.observe(time.perf_counter() - arrived)
        return outcome

    def _prepare(self, job: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(the normalised job, None), or (None, an error outcome) for a job this variant refuses."""
        try:
            return self.generator.prepare(job), None
        except ClientError as exc:
            return None, client_outcome(exc)
        except Exception as exc:  # noqa: BLE001
            return None, error_outcome(exc, f"variant {self.config.name}")

    async def generate(self, job: dict[str, Any]) -> dict[str, Any]:
        """One job's outcome: {"status": 200, "images": [PNG bytes], ...} or an error outcome; never raises."""
        arrived = time.perf_counter()
        normal, refused = self._prepare(job)
        if normal is None:  # refused before it could join a batch: the batch key needs a normalised job
            return self._finish(refused, arrived)
        self.work.start(id(normal), normal["width"], normal["height"], normal["steps"], normal["n"])
        try:
            outcome = await self._batched(normal)
        except Exception as exc:  # noqa: BLE001 - e.g. @serve.batch rejecting an oversized job
            outcome = error_outcome(exc, f"variant {self.config.name}")
        finally:
            self.work.finish(id(normal), None)  # gone from the pending work (its batch taught the rate already)
        timing = outcome.setdefault("timing", {})
        timing["replica"] = (time.perf_counter() - arrived) * 1000
        timing["queue"] = max(0.0, timing["replica"] - timing.get("generate", 0.0) - timing.get("encode", 0.0))
        if outcome.get("status") == 200:
            self.metrics.queue_wait.observe(timing["queue"] / 1000)
        return self._finish(outcome, arrived)

    async def generate_stream(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one job (called with handle.options(stream=True)): {"event": "error", ...outcome} and nothing more,
        or {"event": "accepted"}, one {"event": "step", "step": i, "steps": n} per denoising step, and
        {"event": "done", ...outcome}. The job runs as its own pipeline call, taking turns with the batches."""
        arrived = time.perf_counter()
        normal, refused = self._prepare(job)
        if normal is None:
            yield {"event": "error", **self._finish(refused, arrived)}
            return
        yield {"event": "accepted", "replica": self.replica, "variant": self.config.name,
               **{k: normal[k] for k in ("n", "size", "steps", "guidance", "seed")}}
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        gone = False

        def on_step(done: int, total: int) -> None:
            if gone:  # the stream was closed: stop the pipeline call at this step, freeing the replica
                raise GenerationCancelled(f"the stream closed after step {done} of {total}")
            loop.call_soon_threadsafe(steps.put_nowait, (done, total))

        self.work.start(id(normal), normal["width"], normal["height"], normal["steps"], normal["n"])
        self.work.begin(id(normal))  # a stream takes turns with the batches: counted as running at once
        task = asyncio.ensure_future(asyncio.to_thread(self.generator.run, [normal], on_step))
        task.add_done_callback(lambda t: self.work.finish(
            id(normal), None if t.cancelled() or t.exception() else t.result()[1].seconds))
        try:
            while not task.done():
                getter = asyncio.ensure_future(steps.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                done, total = getter.result()
                yield {"event": "step", "step": done, "steps": total}
            while not steps.empty():  # steps the thread reported before it returned are queued ahead of its result
                done, total = steps.get_nowait()
                yield {"event": "step", "step": done, "steps": total}
        except BaseException:  # cancelled or closed by the caller (the client went away)
            gone = True
            task.add_done_callback(lambda t: t.exception())  # its outcome has no reader; retrieve it quietly
            self._finish({"status": 499, "code": "cancelled"}, arrived)
            raise
        try:
            outcomes, stats = await task
            self._record([normal], outcomes, stats)
            outcome = outcomes[0]
        except Exception as exc:  # noqa: BLE001
            outcome = error_outcome(exc, f"variant {self.config.name}")
        yield {"event": "done", **self._finish(outcome, arrived)}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0, batch_size_fn=_batch_images)
    async def _batched(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ids = [id(job) for job in jobs]
        for job_id in ids:
            self.work.begin(job_id)
        try:
            outcomes, stats = await asyncio.to_thread(self.generator.run, jobs)
        except BaseException:
            self.work.finish_batch(ids, None)
            raise
        ok = all(o["status"] == 200 for o in outcomes)
        self.work.finish_batch(ids, stats.seconds - stats.encode_seconds if ok else None)  # the rate per image-step
        self._record(jobs, outcomes, stats)
        timing = {"generate": (stats.seconds - stats.encode_seconds) * 1000, "encode": stats.encode_seconds * 1000}
        for outcome in outcomes:  # the batch's times, for the Server-Timing header of each of its requests
            outcome["timing"] = dict(timing)
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
        """The variant's scheme, config, bytes and kernels, which replica answered, its cold start by phase and its
        pending work."""
        return {**self.loaded.info(), "replica": self.replica, "pid": os.getpid(), "started": self.started,
                "cold_start_s": {k: round(v, 3) for k, v in self.cold_start.items()},
                "work": {**self.work.stats(), "s_per_image_step": self.work.rates()}}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve asks each replica for these; the work-aware policy sizes the variant by pending_work_s."""
        stats = self.work.stats()
        self.metrics.pending_work.set(stats[PENDING_WORK_METRIC])
        return stats

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; an exception marks the replica unhealthy and Ray restarts it. It also
        refreshes the model-bytes gauge: Ray's metrics agent drops a gauge not set for two export intervals (20 s),
        and the dashboard counts replicas by it, idle ones included."""
        await asyncio.to_thread(self.generator.health)
        self.metrics.model_bytes.set(self.loaded.report.model_bytes)
