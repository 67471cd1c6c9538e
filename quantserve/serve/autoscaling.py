"""Work-aware autoscaling for the Diffusion deployments: a replica's pending work in seconds, and a Ray Serve
custom autoscaling policy that sizes a variant so the expected queue wait stays near `target_wait_s`.

Plain Python (standard library only): importable, and unit-tested, without Ray running. Ray pickles the policy's
module by value into its controller, so this module must not import the rest of quantserve at module level.

Why: Ray's default policy counts ongoing requests, but one 1024x1024, 28-step, n=4 request is over a hundred
times the work of a 256x256, 4-step, n=1 one. Here each replica reports the seconds of work it holds, and the
policy asks for ceil(total pending seconds / target_wait_s) replicas.

What Ray Serve 2.60 provides (read from the installed ray/serve: config.py, autoscaling_policy.py,
_private/autoscaling_state.py, _private/replica.py)
------------------------------------------------------------------------------------------------------------------
* Configuration. `AutoscalingConfig.policy` is an `AutoscalingPolicy(policy_function=..., policy_kwargs={...})`.
  `policy_function` is a callable or an import path, "pkg.module:name" or "pkg.module.name"; Ray turns a callable
  into the dotted path and cloudpickles the object with its module registered *by value*. `policy_kwargs` (JSON
  values only) are passed **only when policy_function is a class**: the controller instantiates it once per
  deployment (re-instantiated on a config change) as `cls(**policy_kwargs)` and calls the instance on every tick.
  A plain function gets no kwargs; so the configurable entry point here is the class `WorkAwarePolicy`:

      autoscaling_config={"min_replicas": 0, "max_replicas": 4, "upscale_delay_s": 0, "downscale_delay_s": 30,
                          "downscale_to_zero_delay_s": 120,
                          "policy": {"policy_function": "quantserve.serve.autoscaling:WorkAwarePolicy",
                                     "policy_kwargs": {"target_wait_s": 2.0}}}

  (`work_aware_policy` is the same logic as a plain function with the default target, for callers that cannot
  pass kwargs.)
* The call. `policy(ctx: AutoscalingContext) -> (desired_replicas: int | float, policy_state: dict)`, once per
  controller tick (~0.1 s). `AutoscalingContext` (ray.serve.config, a plain constructible class) carries:
  deployment_id, deployment_name, app_name, current_num_replicas (running), target_num_replicas (the current
  target), running_replicas (list of ReplicaID), total_num_requests (running + queued, aggregated over
  look_back_period_s), total_queued_requests (queued at handles, i.e. not yet at any replica; may be None),
  aggregated_metrics (dict metric -> {ReplicaID: value}), raw_metrics (metric -> {ReplicaID: time series}),
  capacity_adjusted_min_replicas / _max_replicas, policy_state, last_scale_up_time, last_scale_down_time,
  current_time, and config (the AutoscalingConfig).
* State between calls. `ctx.policy_state` is a copy of the dict the previous call returned (empty at first and
  after a redeploy); whatever the policy returns is kept. Ray keeps its own delay bookkeeping in the same dict under
  "__decision_counters" and "__decision_timestamp" and merges them back itself.
* Per-replica metrics. A deployment method `record_autoscaling_stats(self) -> dict[str, int | float]` (sync or
  async, at most RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S = 10 s) is called by the replica each time it samples
  its autoscaling metrics; the first result must be a dict of numbers, else Ray disables custom metrics for that
  replica. The values travel with the replica's "running_requests" series to the controller, which averages each
  over look_back_period_s (config.aggregation_function: mean by default) and hands them to the policy as
  `ctx.aggregated_metrics[name][replica_id]`, and their raw series as `ctx.raw_metrics`. A replica records a point
  every look_back_period_s x RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR (0.2; quantserve sets 0.05), at
  most metrics_interval_s, and pushes every autoscaling_config.metrics_interval_s: Ray 2.60 reads the deprecated
  config field (default 10 s) and ignores the RAY_SERVE_{REPLICA,HANDLE}_AUTOSCALING_METRIC_PUSH_INTERVAL_S
  variables meant to replace it; quantserve's config sets 1 s. So a replica that just started is absent from every
  metric for up to that long, and the handles push their queued counts on the same interval. With the 10 s
  default a load step reached the policy 5 to 8 s late here. Ray's own per-replica "running_requests" is in
  the same report only when replicas collect it (RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE=0); by default
  the handles count running requests and it is absent.
* Ray wraps **every** custom policy (`_apply_autoscaling_config`, applied in DeploymentAutoscalingState.register):
  (1) cold-start fast path: at 0 running replicas with total_num_requests > 0 it returns
  max(ceil(upscaling_factor), target) *without calling the policy*; (2) upscaling_factor / downscaling_factor;
  (3) the delays, by wall-clock timestamp (not by counting ticks any more): an upscale happens once the policy has
  wanted more replicas for upscale_delay_s in a row, a downscale once it has wanted fewer for downscale_delay_s, and
  1 -> 0 once for downscale_to_zero_delay_s (downscale_delay_s when unset); a change of direction restarts the
  clock; (4) the min/max bounds (apply_bounds). Because of (3), this policy returns the *raw* replica count it
  wants and applies no delay of its own: doing so too would double every delay. The tests run the policy through
  Ray's real wrapper to check the delays as the controller applies them.

The replica side (WorkEstimator) and the policy agree on metric names: PENDING_WORK_METRIC ("pending_work_s"),
RUNNING_METRIC ("running_jobs") and QUEUED_METRIC ("queued_jobs").
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("ray.serve")  # in the controller, Serve's own log

PENDING_WORK_METRIC = "pending_work_s"
RUNNING_METRIC = "running_jobs"
QUEUED_METRIC = "queued_jobs"
RAY_RUNNING_REQUESTS_METRIC = "running_requests"  # Ray's own per-replica series (ray.serve._private.common)

DEFAULT_TARGET_WAIT_S = 2.0
DEFAULT_JOB_S = 1.0  # seconds per request assumed before any replica has reported work
DEFAULT_S_PER_IMAGE_STEP = 0.05  # prior at DEFAULT_PRIOR_SIZE before anything was measured
DEFAULT_PRIOR_SIZE = (512, 512)
STATE_KEY = "quantserve_work_policy"  # this policy's entry in ctx.policy_state


# --- the replica's side: its pending work ---------------------------------------------------------------------

@dataclass
class _Job:
    width: int
    height: int
    steps: int
    n: int
    running_since: float | None = None


class WorkEstimator:
    """One replica's estimate of its pending work, in seconds.

    A job (a request) is `start`ed when the replica accepts it (queued), `begin`s when its generation starts
    (running) and `finish`es with the seconds it took. Its work is n x steps x the measured seconds per
    image-step at its size (width, height); a running job counts what is left of that estimate (never below 0).
    The rate per size is an exponential moving average (weight `alpha` for the newest sample) refreshed by every
    finished job. A size not measured yet borrows the rate of the measured size nearest in pixel count, scaled by
    the pixel ratio (linear in pixels: exact for the convolutions and MLPs, optimistic for attention at large
    sizes, and replaced by a measurement after the first job); before any measurement it is
    `default_s_per_image_step` at `prior_size`, scaled the same way.

    Thread-safe: the replica's event loop and its generation threads may call it concurrently.
    """

    def __init__(self, default_s_per_image_step: float = DEFAULT_S_PER_IMAGE_STEP,
                 prior_size: tuple[int, int] = DEFAULT_PRIOR_SIZE, alpha: float = 0.3,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not default_s_per_image_step > 0:
            raise ValueError(f"default_s_per_image_step must be > 0, got {default_s_per_image_step}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        _check_size(*prior_size)
        self.default_s_per_image_step = float(default_s_per_image_step)
        self.prior_size = (int(prior_size[0]), int(prior_size[1]))
        self.alpha = float(alpha)
        self._clock = clock
        self._rates: dict[tuple[int, int], float] = {}
        self._jobs: dict[Hashable, _Job] = {}
        self._lock = threading.Lock()

    # jobs
    def start(self, job_id: Hashable, width: int, height: int, steps: int, n: int = 1) -> None:
        """A job accepted by the replica: queued until `begin`."""
        _check_size(width, height)
        if steps < 1 or n < 1:
            raise ValueError(f"steps and n must be >= 1, got steps={steps}, n={n}")
        with self._lock:
            if job_id in self._jobs:
                raise ValueError(f"job {job_id!r} already started")
            self._jobs[job_id] = _Job(int(width), int(height), int(steps), int(n))

    def begin(self, job_id: Hashable) -> None:
        """The job's generation started: from now on it counts what is left of its estimate."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.running_since is None:
                job.running_since = self._clock()

    def finish(self, job_id: Hashable, seconds: float | None) -> None:
        """The job is done. `seconds`: the time its generation took (None for a failed or cancelled job, which
        teaches nothing); it refreshes the rate of the job's size. Unknown ids are ignored."""
        self.finish_batch([job_id], seconds)

    def finish_batch(self, job_ids: Iterable[Hashable], seconds: float | None) -> None:
        """Jobs generated together in `seconds` (one batched pipeline call): one rate sample, the batch's seconds
        per image-step, for the size of the batch's jobs (per size when the batch mixes sizes, pro rata)."""
        with self._lock:
            jobs = [job for job_id in job_ids if (job := self._jobs.pop(job_id, None)) is not None]
            if seconds is None or not jobs or not math.isfinite(seconds) or seconds <= 0:
                return
            units = sum(job.n * job.steps for job in jobs)
            sample = seconds / units
            for size in {(job.width, job.height) for job in jobs}:
                old = self._rates.get(size)
                self._rates[size] = sample if old is None else self.alpha * sample + (1 - self.alpha) * old

    # estimates
    def rate(self, width: int, height: int) -> float:
        """Seconds per image-step at this size: measured, else the prior."""
        with self._lock:
            return self._rate(width, height)

    def _rate(self, width: int, height: int) -> float:
        measured = self._rates.get((width, height))
        if measured is not None:
            return measured
        pixels = width * height
        if self._rates:
            (w0, h0), rate0 = min(self._rates.items(),
                                  key=lambda item: (abs(math.log(pixels / (item[0][0] * item[0][1]))), item[0]))
            return rate0 * pixels / (w0 * h0)
        return self.default_s_per_image_step * pixels / (self.prior_size[0] * self.prior_size[1])

    def job_seconds(self, width: int, height: int, steps: int, n: int = 1) -> float:
        """A job's whole estimate."""
        return n * steps * self.rate(width, height)

    def pending_seconds(self) -> float:
        """Seconds of work this replica holds: queued jobs whole, running jobs what is left of them."""
        return self._snapshot()[0]

    def _snapshot(self) -> tuple[float, int, int]:
        now = self._clock()
        total, running, queued = 0.0, 0, 0
        with self._lock:
            for job in self._jobs.values():
                estimate = job.n * job.steps * self._rate(job.width, job.height)
                if job.running_since is None:
                    queued += 1
                    total += estimate
                else:
                    running += 1
                    total += max(0.0, estimate - (now - job.running_since))
        return total, running, queued

    def stats(self) -> dict[str, float]:
        """What the replica's `record_autoscaling_stats` returns: numbers only, as Ray requires."""
        total, running, queued = self._snapshot()
        return {PENDING_WORK_METRIC: round(total, 6), RUNNING_METRIC: running, QUEUED_METRIC: queued}

    def rates(self) -> dict[str, float]:
        """The measured seconds per image-step, by 'WxH'."""
        with self._lock:
            return {f"{w}x{h}": r for (w, h), r in sorted(self._rates.items())}


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be >= 1, got {width}x{height}")


# --- the controller's side: the policy ------------------------------------------------------------------------

def _number(value: Any) -> float | None:
    """A finite float, or None (a missing metric, or a lazily evaluated one that is absent)."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class WorkEstimate:
    """What the policy saw: the total pending work, how it was assembled, and the replicas it wants."""

    work_s: float  # replicas' pending work + the handles' queued requests x job_s
    job_s: float  # mean seconds of one request, used for what is only counted in requests
    jobs: float  # requests held by replicas and queued at handles
    reporting: int  # running replicas that reported pending work
    estimated: int  # running replicas without the work metric, estimated from Ray's running_requests
    silent: int  # running replicas with no report at all (just started)
    desired: int  # before Ray's delays; within min/max


def newest_metrics(ctx: Any) -> dict[str, dict[Any, float]]:
    """Each replica's newest sample of the work metrics (ctx.raw_metrics: metric -> {replica: time series}), where
    ctx.aggregated_metrics holds their mean over look_back_period_s. Empty when Ray passes no raw series."""
    raw = ctx.raw_metrics or {}
    newest: dict[str, dict[Any, float]] = {}
    for name in (PENDING_WORK_METRIC, RUNNING_METRIC, QUEUED_METRIC, RAY_RUNNING_REQUESTS_METRIC):
        for replica, series in (raw.get(name) or {}).items():
            points = [p for p in series or () if _number(getattr(p, "value", None)) is not None]
            if points:
                newest.setdefault(name, {})[replica] = float(max(points, key=lambda p: p.timestamp).value)
    return newest


def estimate_work(ctx: Any, target_wait_s: float, default_job_s: float = DEFAULT_JOB_S,
                  metrics: Mapping[str, Mapping[Any, float]] | None = None) -> WorkEstimate:
    """The policy's reading of an AutoscalingContext (see the module docstring for its fields), from the replicas'
    figures averaged over look_back_period_s (ctx.aggregated_metrics), or from `metrics` when given."""
    if metrics is None:
        metrics = ctx.aggregated_metrics or {}
    work = metrics.get(PENDING_WORK_METRIC, {})
    running = metrics.get(RUNNING_METRIC, {})
    queued = metrics.get(QUEUED_METRIC, {})
    ray_running = metrics.get(RAY_RUNNING_REQUESTS_METRIC, {})
    state = (ctx.policy_state or {}).get(STATE_KEY, {})

    reported_work, reported_jobs, reporting, unreported = 0.0, 0.0, 0, []
    for replica in ctx.running_replicas:
        w = _number(work.get(replica))
        if w is None:
            unreported.append(replica)
            continue
        reporting += 1
        reported_work += max(0.0, w)
        reported_jobs += max(0.0, _number(running.get(replica)) or 0.0) + max(0.0, _number(queued.get(replica)) or 0.0)

    # Seconds per request: as measured now, else as last measured, else the configured default.
    measured_job_s = reported_work / reported_jobs if reported_jobs > 0 and reported_work > 0 else \
        _number(state.get("job_s"))
    job_s = measured_job_s or default_job_s

    estimated, silent, extra_jobs = 0, 0, 0.0
    for replica in unreported:  # its stats failed or are not in yet: count its requests as Ray does
        r = _number(ray_running.get(replica))
        if r is None:
            silent += 1
        else:
            estimated += 1
            extra_jobs += max(0.0, r)
    handle_queued = max(0.0, _number(ctx.total_queued_requests) or 0.0)  # not at any replica yet
    # What Ray counts (running + queued, from the handles) that no report explains is the silent replicas', charged
    # at the measured seconds per request. Before any measurement, a guess (default_job_s) would size the variant by
    # request count alone, and a fresh deploy would scale up on it and then hold for downscale_delay_s: hold instead
    # (below) until the first report, a second or two later.
    if silent and measured_job_s:
        extra_jobs += max(0.0, (_number(ctx.total_num_requests) or 0.0) - reported_jobs - extra_jobs - handle_queued)
    jobs = reported_jobs + extra_jobs + handle_queued
    work_s = reported_work + (extra_jobs + handle_queued) * job_s

    lo, hi = int(ctx.capacity_adjusted_min_replicas), int(ctx.capacity_adjusted_max_replicas)
    desired = math.ceil(work_s / target_wait_s - 1e-9) if work_s > 0 else 0
    if jobs > 0:
        desired = min(desired, math.ceil(jobs - 1e-9))  # more replicas than requests would wait for nothing
    if jobs > 0 or (_number(ctx.total_num_requests) or 0.0) > 0:
        desired = max(desired, 1)  # something is waiting: never zero replicas for it
    if silent and ctx.current_num_replicas > 0:
        # A replica not heard from yet is no evidence of idleness: no downscale below what runs until it reports.
        desired = max(desired, ctx.current_num_replicas)
    desired = max(lo, min(hi, desired))
    return WorkEstimate(round(work_s, 6), round(job_s, 6), jobs, reporting, estimated, silent, desired)


def work_aware_policy(ctx: Any, target_wait_s: float = DEFAULT_TARGET_WAIT_S,
                      default_job_s: float = DEFAULT_JOB_S) -> tuple[int, dict[str, Any]]:
    """Ray Serve policy: the replicas that keep the expected queue wait at `target_wait_s`,
    ceil(total pending work s / target_wait_s), within [min_replicas, max_replicas] (capacity adjusted).

    Fast up, slow down: the work is read from the replicas' figures averaged over look_back_period_s, and also from
    each replica's newest sample (ctx.raw_metrics); the policy asks for the larger of the two counts. So a load
    step scales up within a metrics push, and replicas go only after the whole window (and Ray's downscale delay)
    has been quiet.

    At zero replicas with requests waiting it asks for at least one (Ray's cold-start path usually answers that
    before calling the policy). A running replica with no report yet (Ray pushes replica metrics every
    autoscaling_config.metrics_interval_s, 1 s in quantserve's config) keeps the count from going below what
    runs, and the requests Ray counts that no report explains are charged to it at the last known seconds per
    request; when no replica has reported at all, the current target is held unless those counts ask for more. The delays are Ray's (module docstring).
    Returns (replicas, policy_state) with this policy's own entry under STATE_KEY; Ray merges its keys back."""
    if not target_wait_s > 0:
        raise ValueError(f"target_wait_s must be > 0, got {target_wait_s}")
    previous = dict((ctx.policy_state or {}).get(STATE_KEY, {}))
    est = estimate_work(ctx, target_wait_s, default_job_s)  # the mean over look_back_period_s
    desired, reason = est.desired, "work"
    newest = newest_metrics(ctx)
    if newest.get(PENDING_WORK_METRIC):
        # Up on the newest figures, down on the window's mean: a load step shows in the newest samples within a push
        # interval, in the mean only once it fills the window (seconds later); and a lull must last the window, as
        # well as Ray's downscale delay, before replicas go.
        now = estimate_work(ctx, target_wait_s, default_job_s, metrics=newest)
        if now.desired > desired:
            est, desired, reason = now, now.desired, "work (newest figures)"
    if est.reporting == 0 and est.estimated == 0:
        # No running replica has reported: a fresh deployment, replicas just started, a restarted controller, or none
        # running yet (a deploy's initial replica, a cold start: a start that waits for a node may outlast
        # downscale_to_zero_delay_s, and wanting 0 meanwhile would stop it before it ever loads). Keep the target, as
        # Ray's own policy does (a scale-up under way goes on), and go above it only on what Ray's counts show.
        lo, hi = int(ctx.capacity_adjusted_min_replicas), int(ctx.capacity_adjusted_max_replicas)
        held = max(lo, min(hi, int(ctx.target_num_replicas)))
        if ctx.current_num_replicas > 0:
            desired, reason = max(desired, held), "no replica metrics yet"
        elif held > desired:
            desired, reason = held, "replicas starting, none running yet"
    state = {"job_s": est.job_s if est.reporting else previous.get("job_s", default_job_s), "work_s": est.work_s,
             "jobs": est.jobs, "desired": desired, "reporting": est.reporting, "estimated": est.estimated,
             "silent": est.silent, "reason": reason}
    if desired != previous.get("desired"):  # in Serve's controller log: why the wish changed (Ray's delays follow)
        logger.info("work policy for %s: wants %d replicas (running %d): %.2f s of pending work over %.1f jobs "
                    "at %.3f s per job, target_wait_s %g (%s)", getattr(ctx, "deployment_name", "?"), desired,
                    ctx.current_num_replicas, est.work_s, est.jobs, est.job_s, target_wait_s, reason)
    return desired, {STATE_KEY: state}


class WorkAwarePolicy:
    """`work_aware_policy` with its settings, as Ray instantiates a class policy: once per deployment, with
    AutoscalingPolicy.policy_kwargs (e.g. {"target_wait_s": 2.0, "default_job_s": 1.0}) as keyword arguments."""

    def __init__(self, target_wait_s: float = DEFAULT_TARGET_WAIT_S, default_job_s: float = DEFAULT_JOB_S) -> None:
        if not target_wait_s > 0:
            raise ValueError(f"target_wait_s must be > 0, got {target_wait_s}")
        if not default_job_s > 0:
            raise ValueError(f"default_job_s must be > 0, got {default_job_s}")
        self.target_wait_s = float(target_wait_s)
        self.default_job_s = float(default_job_s)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        return work_aware_policy(ctx, self.target_wait_s, self.default_job_s)

    def __repr__(self) -> str:
        return f"WorkAwarePolicy(target_wait_s={self.target_wait_s}, default_job_s={self.default_job_s})"


POLICY_IMPORT_PATH = "quantserve.serve.autoscaling:WorkAwarePolicy"


def ray_policy_config(target_wait_s: float = DEFAULT_TARGET_WAIT_S, default_job_s: float = DEFAULT_JOB_S
                      ) -> dict[str, Any]:
    """The `policy` entry of a deployment's autoscaling_config that selects this policy."""
    WorkAwarePolicy(target_wait_s, default_job_s)  # validate here, not in Ray's controller
    return {"policy_function": POLICY_IMPORT_PATH,
            "policy_kwargs": {"target_wait_s": float(target_wait_s), "default_job_s": float(default_job_s)}}
