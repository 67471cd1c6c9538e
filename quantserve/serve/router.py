"""The A/B router: assigns each request to a variant, calls that variant's Diffusion deployment, and mirrors a
sampled share onto the shadow variant after the response, recording how far the shadow's pixels are.

It runs inside each Ingress replica (plain Python, no deployment of its own), so a request makes one Ray hop
(Ingress -> Diffusion) instead of two; benchmarks/serving.md measured that hop at about 5 ms here. The experiment
(weights, salt, sticky key, shadow) is the Ingress deployment's user_config: Ray Serve calls `Ingress.reconfigure`
with a new one without restarting the replica (a lightweight update), which hands it to `ABRouter.reconfigure`, so
weights change live. Counts and shadow results are per Ingress replica; the Prometheus metrics add them up.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from .ab import Splitter, UnknownVariantError
from .config import ExperimentConfig, format_validation_error
from .fidelity import compare
from .generation import error_outcome
from .metrics import RouterMetrics
from .rollout import judge, split_weights
from .rollout_keeper import keeper_for

logger = logging.getLogger("quantserve.serve")
# what a handle raises when the replica process serving a call died (SIGKILL, OOM, node loss)
REPLICA_DIED = (RayActorError, ActorUnavailableError)

RECENT_SHADOWS = 20
RECENT_FIDELITY = 10_000
INFO_TIMEOUT_S = 10.0
ROLLOUT_SYNC_S = 1.0      # how often a router sends the rollout keeper its news and takes the rollout's state back
ROLLOUT_TIMEOUT_S = 10.0


class ABRouter:
    """Routes jobs to the Diffusion deployments by the experiment (inside an Ingress replica)."""

    def __init__(self, schemes: dict[str, str], deployments: dict[str, str], handles: dict[str, Any],
                 retry_after_s: int = 1, min_replicas: dict[str, int] | None = None):
        self.names = list(schemes)
        # a variant with min_replicas 0 may be at zero replicas: a request waits for its cold start, and neither
        # /readyz nor /v1/models wakes it
        self.may_idle = {name for name, n in (min_replicas or {}).items() if n == 0}
        self.schemes = dict(schemes)
        self.deployments = dict(deployments)
        self.handles = dict(handles)
        self.retry_after_s = retry_after_s
        self.splitter = Splitter(self.names, {name: 1.0 for name in self.names})
        self.experiment = ExperimentConfig()
        self.generation = 0
        # the progressive rollout (serve/rollout.py), kept by a detached actor shared by every Ingress replica
        self.keeper: Any = None
        self.rollout: dict[str, Any] | None = None  # its latest state, as the keeper returned it
        self.pending_requests: list[tuple] = []
        self.pending_comparisons: list[tuple] = []
        self.sync_task: asyncio.Task | None = None
        self.sync_failures = 0
        self.metrics = RouterMetrics(schemes)
        self.counts: dict[str, Counter[str]] = {name: Counter() for name in self.names}
        self.shadow_tasks: set[asyncio.Task] = set()
        self.shadow_counts: Counter[str] = Counter()
        self.shadow_diffs: deque[dict[str, Any]] = deque(maxlen=RECENT_SHADOWS)
        # (variant, reference) -> running sums [runs, mae, psnr, ssim, compare ms] for /v1/ab
        self.fidelity_sums: defaultdict[tuple[str, str], np.ndarray] = defaultdict(lambda: np.zeros(5))
        # (variant, reference) -> recent (time, mae, psnr, ssim), for the report's windows and percentiles
        self.fidelity_recent: defaultdict[tuple[str, str], deque] = defaultdict(lambda: deque(maxlen=RECENT_FIDELITY))
        context = serve.get_replica_context()
        self.app_name = context.app_name
        self.replica = context.replica_id.unique_id
        self.started = time.time()

    def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        """Apply a new experiment; an invalid one raises, and Ray keeps the deployment on the old one."""
        from pydantic import ValidationError

        try:
            experiment = ExperimentConfig.model_validate(dict(user_config or {}))
        except ValidationError as exc:
            raise ValueError("Ingress user_config (the experiment): " + format_validation_error(exc, "experiment.")
                             ) from None
        experiment.check(self.names)
        self.experiment = experiment
        if experiment.rollout is None:
            self.rollout = None
        elif self.rollout is not None and (self.rollout["candidate"], self.rollout["baseline"]) != (
                experiment.rollout.candidate, experiment.rollout.baseline):
            self.rollout = None  # another pair: wait for the keeper's state (configure_rollout) before splitting
        self._split()
        self.generation += 1
        logger.info("experiment %d: %s", self.generation, self.splitter.describe())

    def _split(self) -> None:
        """The splitter for the experiment, with the rollout's share applied to its candidate and baseline."""
        e = self.experiment
        weights = e.resolved_weights(self.names)
        if e.rollout is not None:
            share = self.rollout["weight"] if self.rollout is not None else 0.0  # unknown yet: the baseline's
            weights = split_weights(weights, e.rollout.candidate, e.rollout.baseline, share)
        self.splitter = Splitter(self.names, weights, e.salt, e.sticky_key, e.shadow.variant, e.shadow.sample_rate)

    # --- the progressive rollout -------------------------------------------------------------------------------
    async def configure_rollout(self) -> None:
        """Hand the experiment's rollout config to the application's keeper (created on first use) and take its
        state: the same config resumes where the rollout is, even from a new replica. Without a rollout, an
        existing keeper is told to end it. Raises when the keeper cannot be reached (the replica must not serve a
        split it cannot know)."""
        config = self.experiment.rollout
        if config is None:
            keeper = self.keeper or await asyncio.to_thread(keeper_for, self.app_name, False)
            if keeper is not None:
                await asyncio.wait_for(keeper.configure.remote(None), ROLLOUT_TIMEOUT_S)
            self.keeper = None
            self._apply_rollout(None)
            return
        if self.keeper is None:
            self.keeper = await asyncio.to_thread(keeper_for, self.app_name, True)
        state = await asyncio.wait_for(self.keeper.configure.remote(config.model_dump(mode="json")), ROLLOUT_TIMEOUT_S)
        self._apply_rollout(state)
        if self.sync_task is None or self.sync_task.done():
            self.sync_task = asyncio.get_running_loop().create_task(self._sync_loop())

    def _apply_rollout(self, state: dict[str, Any] | None) -> None:
        before = self.rollout
        self.rollout = state
        if state is None:
            if before is not None:
                self._split()
            return
        seen = {e["time"] for e in (before or {}).get("events", [])}
        for event in state["events"]:  # the keeper's decisions, in this replica's log too
            if event["time"] not in seen and before is not None:
                logger.info("rollout %s vs %s: %s -> step %d, weight %g (%s)", state["candidate"], state["baseline"],
                            event["decision"], event["step"], event["weight"], event.get("reason", ""))
        if before is None or before["version"] != state["version"]:  # the keeper bumps it with every weight change
            self._split()

    async def _sync_loop(self) -> None:
        while self.keeper is not None:
            await asyncio.sleep(ROLLOUT_SYNC_S)
            await self.sync_rollout()

    async def sync_rollout(self) -> None:
        """Send the keeper the requests and comparisons since the last sync; apply the state it returns."""
        keeper = self.keeper
        if keeper is None:
            return
        requests, self.pending_requests = self.pending_requests, []
        comparisons, self.pending_comparisons = self.pending_comparisons, []
        try:
            state = await asyncio.wait_for(keeper.sync.remote(requests, comparisons), ROLLOUT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the keeper restarting: keep the last split, say so now and then
            self.sync_failures += 1
            if self.sync_failures in (1, 10) or self.sync_failures % 60 == 0:
                logger.warning("rollout keeper unreachable (%d tries): %s: %s", self.sync_failures,
                               type(exc).__name__, exc)
            return
        self.sync_failures = 0
        if keeper is self.keeper:
            self._apply_rollout(state)

    def record(self, variant: str, status: int, latency_s: float) -> None:
        """One answered generation (the Ingress's log), for the rollout's step window."""
        if self.keeper is not None and self.rollout is not None and variant in (
                self.rollout["candidate"], self.rollout["baseline"]):
            self.pending_requests.append((time.time(), variant, status, latency_s))

    async def control_rollout(self, action: str, who: str) -> dict[str, Any]:
        """A manual action (promote, rollback, pause, resume): {"rollout": state} or {"error", "status"}."""
        if self.keeper is None:
            return {"status": 409, "error": "no rollout in the experiment: add experiment.rollout to the serve "
                                            "config and deploy it"}
        answer = await asyncio.wait_for(self.keeper.control.remote(action, who), ROLLOUT_TIMEOUT_S)
        if "rollout" in answer:
            self._apply_rollout(answer["rollout"])
        return answer

    async def rollout_state(self) -> dict[str, Any] | None:
        """The keeper's state now (this replica's last copy when the keeper does not answer)."""
        if self.keeper is None:
            return None
        try:
            return await asyncio.wait_for(self.keeper.state.remote(), ROLLOUT_TIMEOUT_S)
        except Exception:  # noqa: BLE001
            return self.rollout

    async def generate(self, job: dict[str, Any], model: str | None = None, forced: str | None = None,
                       user: str | None = None, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Assign, generate, maybe shadow; always returns an outcome dict with a status (never raises)."""
        arrived = time.perf_counter()
        splitter = self.splitter  # one experiment for the whole request, even if reconfigured meanwhile
        try:
            assignment = splitter.assign(requested=model, forced=forced, sticky_id=splitter.sticky_id(user, headers))
        except UnknownVariantError as exc:
            param = "model" if exc.field_name == "model" else exc.field_name
            return {"status": 404, "param": param, "message": str(exc), "code": "model_not_found"}
        self.metrics.assigned(assignment.variant, assignment.reason)
        self.counts[assignment.variant][assignment.reason] += 1
        calling = time.perf_counter()
        outcome = await self._call(assignment.variant, job)
        timing = outcome.setdefault("timing", {})
        timing["router_call"] = (time.perf_counter() - calling) * 1000
        timing["router"] = (time.perf_counter() - arrived) * 1000
        outcome["variant"] = assignment.variant
        outcome["assignment"] = assignment.reason
        if outcome["status"] == 200 and (shadow := splitter.shadow_for(assignment)) is not None:
            task = asyncio.get_running_loop().create_task(
                self._shadow(assignment.variant, shadow, job, outcome["images"]))
            self.shadow_tasks.add(task)
            task.add_done_callback(self.shadow_tasks.discard)
        return outcome

    async def _call(self, variant: str, job: dict[str, Any]) -> dict[str, Any]:
        """The variant's outcome. A replica that dies under the request (killed, out of memory) loses nothing:
        generation is seeded and idempotent, so the request runs once more, on a live replica."""
        for attempt in (1, 2):
            response = self.handles[variant].generate.remote(job)
            try:
                return await response
            except asyncio.CancelledError:  # the Ingress gave up (timeout, client gone): stop the replica's work too
                response.cancel()
                raise
            except REPLICA_DIED as exc:
                if attempt == 1:
                    logger.warning("variant %s: the replica died under a request (%s); running it again",
                                   variant, type(exc).__name__)
                    continue
                outcome = error_outcome(exc, f"variant {variant}")
                outcome["message"] = (f"variant {variant}: the replica died under this request, and again under its "
                                      f"retry on another replica (error id {outcome['error_id']})")
                return outcome
            except Exception as exc:  # noqa: BLE001 - always an outcome, never silence
                return self._failure(variant, exc)
        raise AssertionError("unreachable")

    def _failure(self, variant: str, exc: Exception) -> dict[str, Any]:
        """A full queue is a 503 with Retry-After; any other error in a replica is a 500 with an id."""
        if isinstance(exc, (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)):
            self.metrics.rejected(variant)
            return {"status": 503, "retry_after_s": self.retry_after_s, "code": "overloaded",
                    "message": f"variant {variant} is at capacity (its queue is full); retry after "
                               f"{self.retry_after_s} s ({type(exc).__name__})"}
        return error_outcome(exc, f"variant {variant}")

    async def generate_stream(self, job: dict[str, Any], model: str | None = None, forced: str | None = None,
                              user: str | None = None, headers: Mapping[str, str] | None = None
                              ) -> AsyncIterator[dict[str, Any]]:
        """Assign, then pass the variant's stream through (called with handle.options(stream=True)): an
        {"event": "error", ...outcome} alone, or accepted, one step event per denoising step, and done. Every item
        names the variant and why it was chosen; a done 200 may be shadowed like a plain request."""
        splitter = self.splitter
        try:
            assignment = splitter.assign(requested=model, forced=forced, sticky_id=splitter.sticky_id(user, headers))
        except UnknownVariantError as exc:
            param = "model" if exc.field_name == "model" else exc.field_name
            yield {"event": "error", "status": 404, "param": param, "message": str(exc), "code": "model_not_found"}
            return
        variant = assignment.variant
        self.metrics.assigned(variant, assignment.reason)
        self.counts[variant][assignment.reason] += 1
        stamp = {"variant": variant, "assignment": assignment.reason}
        started = False
        stream = self.handles[variant].options(stream=True).generate_stream.remote(job)
        try:
            async for item in stream:
                started = True
                item.update(stamp)
                if item["event"] == "done" and item["status"] == 200 and (
                        shadow := splitter.shadow_for(assignment)) is not None:
                    task = asyncio.get_running_loop().create_task(self._shadow(variant, shadow, job, item["images"]))
                    self.shadow_tasks.add(task)
                    task.add_done_callback(self.shadow_tasks.discard)
                yield item
        except Exception as exc:  # noqa: BLE001 - before the first event an error alone; after, the stream's end
            yield {"event": "done" if started else "error", **self._failure(variant, exc), **stamp}
        finally:  # closed early (the client went away, a timeout): the replica stops at its next step
            stream.cancel()

    async def _shadow(self, variant: str, shadow: str, job: dict[str, Any], images: list[bytes]) -> None:
        """Run the same job (same seed) on the shadow variant and record the pixel difference."""
        outcome = await self._call(shadow, job)
        if outcome["status"] != 200:
            kind = "dropped" if outcome["status"] == 503 else "error"
            self.shadow_counts[kind] += 1
            self.metrics.shadowed(variant, shadow, None, kind)
            return
        try:
            started = time.perf_counter()
            fidelity = await asyncio.to_thread(compare, images, outcome["images"])
            compare_ms = (time.perf_counter() - started) * 1000
        except Exception as exc:  # noqa: BLE001
            error_outcome(exc, f"shadow comparison {variant} vs {shadow}")
            self.shadow_counts["error"] += 1
            self.metrics.shadowed(variant, shadow, None, "error")
            return
        self.shadow_counts["ok"] += 1
        self.fidelity_sums[(variant, shadow)] += [1, fidelity.mae, fidelity.psnr, fidelity.ssim, compare_ms]
        self.fidelity_recent[(variant, shadow)].append((time.time(), fidelity.mae, fidelity.psnr, fidelity.ssim))
        if self.keeper is not None:
            self.pending_comparisons.append((time.time(), variant, shadow, fidelity.mae, fidelity.psnr, fidelity.ssim))
        self.shadow_diffs.append({"variant": variant, "shadow_variant": shadow, "pixel_diff": fidelity.mae,
                                  **fidelity.to_dict(), "compare_ms": round(compare_ms, 3),
                                  "seed": job["seed"], "n": job["n"], "time": time.time()})
        self.metrics.shadowed(variant, shadow, fidelity, "ok")

    async def state(self) -> dict[str, Any]:
        """The live experiment, assignment counts and shadow results (GET /v1/ab)."""
        ok = self.shadow_counts["ok"]
        return {
            "experiment": self.splitter.describe(),
            "generation": self.generation,
            "router": {"replica": self.replica, "pid": os.getpid(), "started": self.started},
            "assignments": {name: dict(c) for name, c in self.counts.items()},
            "rollout": await self.rollout_state(),
            "shadow": {"runs": dict(self.shadow_counts), "in_flight": len(self.shadow_tasks),
                       "mean_pixel_diff": sum(t[1] for t in self.fidelity_sums.values()) / ok if ok else None, "recent": list(self.shadow_diffs),
                       "fidelity": [{"variant": v, "reference": r, "runs": int(t[0]), "mean_mae": t[1] / t[0],
                                     "mean_psnr": t[2] / t[0], "mean_ssim": t[3] / t[0], "mean_compare_ms": t[4] / t[0]}
                                    for (v, r), t in sorted(self.fidelity_sums.items()) if t[0]]},
        }

    def fidelity_report(self, window_s: float | None, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per variant, its shadow comparisons against each reference within the window: runs, mean and 5th
        percentile of SSIM and PSNR, mean and 95th percentile of MAE (the bad tail of each)."""
        now = time.time() if now is None else now
        out: dict[str, dict[str, Any]] = {}
        for (variant, reference), recent in sorted(self.fidelity_recent.items()):
            rows = np.array([r[1:] for r in recent if window_s is None or r[0] >= now - window_s])
            if not len(rows):
                continue
            mae, psnr, ssim = rows[:, 0], rows[:, 1], rows[:, 2]
            out.setdefault(variant, {})[reference] = {
                "runs": len(rows), "ssim_mean": round(float(ssim.mean()), 4),
                "ssim_p5": round(float(np.percentile(ssim, 5)), 4), "psnr_mean": round(float(psnr.mean()), 2),
                "psnr_p5": round(float(np.percentile(psnr, 5)), 2), "mae_mean": round(float(mae.mean()), 5),
                "mae_p95": round(float(np.percentile(mae, 95)), 5)}
        return out

    def judge_window(self, guards: dict[str, float], candidate: str, baseline: str, window_s: float | None,
                     log: Any = None, now: float | None = None) -> list[dict[str, Any]]:
        """Each guard's verdict for candidate vs baseline over the report's window (the rollout judges its steps
        the same way, in the keeper): [{guard, value, limit, holds, text}], or a 'waits' entry per guard short of
        data."""
        now = time.time() if now is None else now
        since = -math.inf if window_s is None else now - window_s
        requests = [(r.time, r.variant, r.status, r.latency_s) for r in (log.records if log is not None else ())
                    if r.time >= since]
        comparisons = [(t, candidate, baseline, mae, psnr, ssim)
                       for t, mae, psnr, ssim in self.fidelity_recent.get((candidate, baseline), ()) if t >= since]
        results, waiting = judge(guards, candidate, baseline, requests, comparisons)
        return [r.to_dict() for r in results] + [{"waits": w} for w in waiting]

    async def models(self) -> list[dict[str, Any]]:
        """Every variant's info from one of its replicas; a variant that does not answer is listed as unavailable,
        one scaled to zero as such (asking it would start a replica)."""
        running = ({n: v["running_replicas"] for n, v in (await self.readiness())["variants"].items()}
                   if self.may_idle else {})

        async def one(name: str) -> dict[str, Any]:
            if name in self.may_idle and running.get(name) == 0:
                return {"id": name, "scheme": self.schemes[name], "available": True, "scaled_to_zero": True,
                        "running_replicas": 0}
            try:
                info = await asyncio.wait_for(self.handles[name].info.remote(), INFO_TIMEOUT_S)
                return {**info, "available": True}
            except Exception as exc:  # noqa: BLE001 - listing must not fail because one variant is busy or down
                return {"id": name, "scheme": self.schemes[name], "available": False,
                        "error": f"{type(exc).__name__}: {exc}"[:300]}
        return list(await asyncio.gather(*(one(name) for name in self.names)))

    async def readiness(self) -> dict[str, Any]:
        """Per variant: its deployment's status and running replicas; ready when every variant has one, or may
        idle at zero (min_replicas 0: its next request starts one)."""
        try:
            status = await asyncio.to_thread(serve.status)
            deployments = status.applications[self.app_name].deployments
        except Exception as exc:  # noqa: BLE001
            return {"ready": False, "error": f"cannot read Serve status: {type(exc).__name__}: {exc}"[:300], "variants": {}}
        variants = {}
        for name in self.names:
            d = deployments.get(self.deployments[name])
            running = int(d.replica_states.get("RUNNING", 0)) if d is not None else 0
            variants[name] = {"status": str(getattr(d.status, "value", d.status)) if d else "MISSING",
                              "running_replicas": running,
                              "ready": running > 0 or (name in self.may_idle and d is not None)}
            if running == 0 and name in self.may_idle:
                variants[name]["scaled_to_zero"] = True
        return {"ready": all(v["ready"] for v in variants.values()), "variants": variants}
