"""The work-aware autoscaling policy and the replica's work estimate (quantserve.serve.autoscaling), without Ray
running.

The contexts are Ray's own AutoscalingContext (a plain class, constructible with its keyword arguments), with real
ReplicaIDs and AutoscalingConfigs. The delays are checked through Ray's real wrapper (_apply_autoscaling_config,
what the controller puts around every custom policy) on a fake clock, and the whole controller-side path (the
policy named by import path with policy_kwargs, per-replica metric reports, aggregation, the decision) through
Ray's DeploymentAutoscalingState, which needs no Ray instance.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID, ReplicaMetricReport, TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from quantserve.serve.autoscaling import (
    PENDING_WORK_METRIC, POLICY_IMPORT_PATH, QUEUED_METRIC, RUNNING_METRIC, STATE_KEY, WorkAwarePolicy,
    WorkEstimator, ray_policy_config, work_aware_policy,
)

DEP = DeploymentID(name="Diffusion_nf4", app_name="quantserve-test")


def replicas(count: int) -> list[ReplicaID]:
    return [ReplicaID(f"r{i}", DEP) for i in range(count)]


def config(**overrides: Any) -> AutoscalingConfig:
    values = {"min_replicas": 1, "max_replicas": 16, "upscale_delay_s": 0, "downscale_delay_s": 0}
    values.update(overrides)
    return AutoscalingConfig(**values)


def context(running: list[ReplicaID], work: dict[ReplicaID, tuple[float, float, float]] | None = None, *,
            ray_running: dict[ReplicaID, float] | None = None, target: int | None = None,
            total_requests: float | None = None, handle_queued: float = 0.0, state: dict[str, Any] | None = None,
            cfg: AutoscalingConfig | None = None,
            newest: dict[ReplicaID, tuple[float, float, float]] | None = None) -> AutoscalingContext:
    """A context as the controller builds it. work: per replica (pending_work_s, running_jobs, queued_jobs), the
    mean over the look-back window; a replica that reports work also reports Ray's running_requests (its jobs)
    unless ray_running says otherwise. newest: per replica, its newest sample of the same figures (the raw series
    then runs oldest to newest: an older point, the newest one last but listed first, as order is not promised)."""
    cfg = cfg or config()
    work = work or {}
    raw: dict[str, dict[ReplicaID, list[TimeStampedValue]]] = {}
    now = time.time()
    for replica, (seconds, run, queue) in (newest or {}).items():
        for name, value in ((PENDING_WORK_METRIC, seconds), (RUNNING_METRIC, run), (QUEUED_METRIC, queue),
                            ("running_requests", run + queue)):
            raw.setdefault(name, {})[replica] = [TimeStampedValue(now - 0.1, value), TimeStampedValue(now - 2.0, -1.0)]
    metrics: dict[str, dict[ReplicaID, float]] = {}
    for replica, (seconds, run, queue) in work.items():
        metrics.setdefault(PENDING_WORK_METRIC, {})[replica] = seconds
        metrics.setdefault(RUNNING_METRIC, {})[replica] = run
        metrics.setdefault(QUEUED_METRIC, {})[replica] = queue
        metrics.setdefault("running_requests", {})[replica] = run + queue
    for replica, value in (ray_running or {}).items():
        metrics.setdefault("running_requests", {})[replica] = value
    if total_requests is None:
        total_requests = sum(r + q for _, r, q in work.values()) + handle_queued
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name,
        current_num_replicas=len(running), target_num_replicas=len(running) if target is None else target,
        running_replicas=running, total_num_requests=total_requests, total_queued_requests=handle_queued,
        aggregated_metrics=metrics, raw_metrics=raw, capacity_adjusted_min_replicas=cfg.min_replicas,
        capacity_adjusted_max_replicas=cfg.max_replicas, policy_state=state or {}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=time.time(), config=cfg)


# --- the policy's decision ------------------------------------------------------------------------------------

def test_big_work_asks_for_more_replicas_than_small_work_with_the_same_request_count():
    reps = replicas(2)
    # Each replica holds 4 requests either way (what Ray's request policy sees), but 0.2 s or 9 s each.
    small = context(reps, {r: (4 * 0.2, 1, 3) for r in reps})
    big = context(reps, {r: (4 * 9.0, 1, 3) for r in reps})
    small_n, small_state = work_aware_policy(small, target_wait_s=2.0)
    big_n, big_state = work_aware_policy(big, target_wait_s=2.0)
    assert small_n == 1  # 1.6 s of work: one replica keeps the wait under 2 s
    assert big_n == 8  # 72 s of work wants 36, but 8 requests can use at most 8 replicas
    assert big_state[STATE_KEY]["work_s"] == pytest.approx(72.0)
    assert small_state[STATE_KEY]["job_s"] == pytest.approx(0.2)


def test_replicas_are_work_over_target_wait_rounded_up():
    reps = replicas(2)
    ctx = context(reps, {reps[0]: (7.0, 1, 9), reps[1]: (3.5, 1, 9)})  # 10.5 s among 20 requests
    assert work_aware_policy(ctx, target_wait_s=2.0)[0] == 6
    assert work_aware_policy(ctx, target_wait_s=5.0)[0] == 3
    assert WorkAwarePolicy(target_wait_s=1.0)(ctx)[0] == 11  # the kwargs a class policy gets from Ray
    assert work_aware_policy(ctx, target_wait_s=10.5)[0] == 1  # exactly on the boundary: not one more


def test_up_on_the_newest_figures_down_only_on_the_windows_mean():
    reps = replicas(1)
    # A load step 1 s into a 12 s window: the mean still reads 1.5 s of work, the newest sample 9 s.
    step = context(reps, {reps[0]: (1.5, 1, 0.5)}, newest={reps[0]: (9.0, 1, 5)})
    n, state = work_aware_policy(step, target_wait_s=2.0)
    assert n == 5 and state[STATE_KEY]["reason"] == "work (newest figures)"
    assert state[STATE_KEY]["work_s"] == pytest.approx(9.0)
    assert work_aware_policy(context(reps, {reps[0]: (1.5, 1, 0.5)}), 2.0)[0] == 1  # the mean alone: one
    # A lull: the newest sample is idle but the window's mean still holds work, so nothing goes yet.
    lull = context(replicas(3), {r: (4.0, 1, 1) for r in replicas(3)}, newest={r: (0.0, 0, 0) for r in replicas(3)})
    n, state = work_aware_policy(lull, target_wait_s=2.0)
    assert n == 6 and state[STATE_KEY]["reason"] == "work"


def test_the_decision_is_clamped_to_min_and_max():
    reps = replicas(2)
    flood = context(reps, {r: (500.0, 1, 99) for r in reps}, cfg=config(max_replicas=3))
    assert work_aware_policy(flood, 2.0)[0] == 3
    idle = context(reps, {r: (0.0, 0, 0) for r in reps}, cfg=config(min_replicas=2, max_replicas=3))
    assert work_aware_policy(idle, 2.0)[0] == 2


def test_idle_replicas_with_min_zero_ask_for_zero_and_any_work_for_at_least_one():
    reps = replicas(1)
    assert work_aware_policy(context(reps, {reps[0]: (0.0, 0, 0)}, cfg=config(min_replicas=0)), 2.0)[0] == 0
    tiny = context(reps, {reps[0]: (0.01, 1, 0)}, cfg=config(min_replicas=0))
    assert work_aware_policy(tiny, 2.0)[0] == 1


def test_requests_queued_at_the_handles_count_as_work_at_the_measured_seconds_per_request():
    reps = replicas(1)
    # The replica holds 2 requests worth 3 s each (6 s), and 10 more wait at the handles for a free slot.
    ctx = context(reps, {reps[0]: (6.0, 1, 1)}, handle_queued=10)
    n, state = work_aware_policy(ctx, 2.0)
    assert state[STATE_KEY]["work_s"] == pytest.approx(36.0)
    assert n == 12  # 36 s / 2 s = 18, but only 12 requests in all


def test_from_zero_with_requests_waiting_asks_for_replicas_and_remembers_the_last_request_size():
    cfg = config(min_replicas=0, max_replicas=8)
    # Seen before scaling to zero: requests of 4 s each.
    _, state = work_aware_policy(context(replicas(1), {replicas(1)[0]: (8.0, 1, 1)}, cfg=cfg), 2.0)
    assert state[STATE_KEY]["job_s"] == pytest.approx(4.0)
    idle = context([], target=0, total_requests=0, cfg=cfg, state=state)
    assert work_aware_policy(idle, 2.0)[0] == 0
    waiting = context([], target=0, handle_queued=3, cfg=cfg, state=state)  # 3 x 4 s = 12 s
    assert work_aware_policy(waiting, 2.0)[0] == 3
    # Nothing learned yet: the default seconds per request, and never zero while requests wait.
    fresh = context([], target=0, total_requests=1, handle_queued=0, cfg=cfg)
    assert work_aware_policy(fresh, 2.0, default_job_s=1.0)[0] == 1


def test_before_any_replica_reports_the_target_is_held_unless_rays_counts_ask_for_more():
    reps = replicas(3)
    ctx = context(reps, {}, total_requests=0)  # a fresh deployment: no report from anyone
    n, state = work_aware_policy(ctx, 2.0)
    assert n == 3 and state[STATE_KEY]["reason"] == "no replica metrics yet"
    assert work_aware_policy(context(replicas(1), {}, total_requests=0, target=3), 2.0)[0] == 3  # scale-up goes on
    # 12 requests in Ray's count (4 of them queued at the handles), no report yet; 3 s per request last seen.
    busy = context(reps, {}, total_requests=12, handle_queued=4, state={STATE_KEY: {"job_s": 3.0}})
    n, state = work_aware_policy(busy, 2.0)
    assert state[STATE_KEY]["work_s"] == pytest.approx(36.0) and n == 12


def test_a_fresh_deploy_does_not_scale_on_request_counts_before_its_first_measurement():
    """No report yet and nothing measured before: a request count alone says nothing about the work (two 2-step
    16x16 jobs are not two seconds), so the one running replica is held until the first report arrives."""
    [only] = replicas(1)
    fresh = context([only], {}, total_requests=2)
    assert work_aware_policy(fresh, 1.0)[0] == 1
    # once something was measured (1.5 s per request, kept in the policy's state), the same count is work
    measured = context([only], {}, total_requests=2, state={STATE_KEY: {"job_s": 1.5}})
    assert work_aware_policy(measured, 1.0)[0] == 2


def test_a_replica_that_just_started_keeps_the_count_from_going_below_what_runs():
    old, new = replicas(2)
    light = {old: (0.5, 1, 0)}  # the old replica alone would be one replica's worth
    n, state = work_aware_policy(context([old, new], light), 2.0)
    assert n == 2 and state[STATE_KEY]["silent"] == 1
    # Once the new replica reports, its idleness counts: one replica is enough.
    assert work_aware_policy(context([old, new], {**light, new: (0.0, 0, 0)}), 2.0)[0] == 1


def test_a_replica_without_the_work_metric_is_counted_by_its_running_requests():
    a, b = replicas(2)
    # b's record_autoscaling_stats failed: only Ray's running_requests (6) arrive, each at a's 2 s per request.
    ctx = context([a, b], {a: (8.0, 1, 3)}, ray_running={b: 6})
    n, state = work_aware_policy(ctx, 2.0)
    assert state[STATE_KEY]["estimated"] == 1
    assert state[STATE_KEY]["work_s"] == pytest.approx(8.0 + 6 * 2.0)
    assert n == 10


def test_policy_settings_are_validated():
    with pytest.raises(ValueError, match="target_wait_s"):
        WorkAwarePolicy(target_wait_s=0)
    with pytest.raises(ValueError, match="default_job_s"):
        WorkAwarePolicy(default_job_s=-1)
    assert ray_policy_config(3.0) == {"policy_function": POLICY_IMPORT_PATH,
                                      "policy_kwargs": {"target_wait_s": 3.0, "default_job_s": 1.0}}


# --- the delays, as Ray's wrapper applies them ------------------------------------------------------------------

@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A settable clock for Ray's delay logic (ray.serve.autoscaling_policy reads time.time())."""
    import ray.serve.autoscaling_policy as ray_policy

    fake = SimpleNamespace(now=1_000_000.0)
    fake.time = lambda: fake.now
    monkeypatch.setattr(ray_policy, "time", fake)
    return fake


def wrapped(target_wait_s: float = 2.0):
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    return _apply_autoscaling_config(WorkAwarePolicy(target_wait_s=target_wait_s))


def test_upscale_waits_for_upscale_delay_s_of_consecutive_wishes(clock: SimpleNamespace):
    policy = wrapped()
    cfg = config(upscale_delay_s=10)
    reps = replicas(1)
    busy = {reps[0]: (8.0, 1, 3)}  # wants 4
    state: dict[str, Any] = {}
    for t, expected in ((0, 1), (5, 1), (9.9, 1), (10, 4)):
        clock.now = 1_000_000.0 + t
        n, state = policy(context(reps, busy, target=1, cfg=cfg, state=state))
        assert n == expected, f"at t={t}"
    # A pause in the wish (load gone for one tick) starts the delay again.
    state = {}
    clock.now = 2_000_000.0
    n, state = policy(context(reps, busy, target=1, cfg=cfg, state=state))
    clock.now += 6
    n, state = policy(context(reps, {reps[0]: (0.5, 1, 0)}, target=1, cfg=cfg, state=state))
    assert n == 1
    clock.now += 6
    n, state = policy(context(reps, busy, target=1, cfg=cfg, state=state))
    assert n == 1  # 12 s after the first wish, but only 0 s into this run of them
    assert STATE_KEY in state  # the policy's own state survives Ray's merge


def test_downscale_waits_for_downscale_delay_s(clock: SimpleNamespace):
    policy = wrapped()
    cfg = config(downscale_delay_s=30)
    reps = replicas(4)
    quiet = {r: (0.1, 1, 0) for r in reps}  # wants 1
    state: dict[str, Any] = {}
    for t, expected in ((0, 4), (15, 4), (29, 4), (30, 1)):
        clock.now = 1_000_000.0 + t
        n, state = policy(context(reps, quiet, target=4, cfg=cfg, state=state))
        assert n == expected, f"at t={t}"


def test_scale_to_zero_waits_for_downscale_to_zero_delay_s_and_a_request_brings_one_back(clock: SimpleNamespace):
    policy = wrapped()
    cfg = config(min_replicas=0, downscale_delay_s=5, downscale_to_zero_delay_s=60)
    rep = replicas(1)
    idle = {rep[0]: (0.0, 0, 0)}
    state: dict[str, Any] = {}
    for t, expected in ((0, 1), (5, 1), (59, 1), (60, 0)):
        clock.now = 1_000_000.0 + t
        n, state = policy(context(rep, idle, target=1, cfg=cfg, state=state))
        assert n == expected, f"at t={t}"
    # At zero, a request waiting at the handle: one replica at once, no upscale delay.
    slow_up = config(min_replicas=0, upscale_delay_s=300)
    n, _ = policy(context([], target=0, handle_queued=1, cfg=slow_up, state=state))
    assert n == 1


# --- the whole controller-side path (Ray's DeploymentAutoscalingState, no Ray instance) -----------------------

def controller_state(**autoscaling: Any):
    from ray.serve._private.autoscaling_state import DeploymentAutoscalingState
    from ray.serve._private.config import DeploymentConfig, ReplicaConfig
    from ray.serve._private.deployment_info import DeploymentInfo

    values = {"min_replicas": 0, "max_replicas": 10, "upscale_delay_s": 0, "downscale_delay_s": 0,
              "policy": ray_policy_config(target_wait_s=2.0)}
    values.update(autoscaling)
    info = DeploymentInfo(deployment_config=DeploymentConfig(autoscaling_config=values),
                          replica_config=ReplicaConfig.create(lambda: None), start_time_ms=0, deployer_job_id="test")
    state = DeploymentAutoscalingState(DEP)
    state.register(info, 1)
    return state


def report(state: Any, replica: ReplicaID, estimator: WorkEstimator) -> None:
    """What the replica pushes: Ray's running_requests and the values of record_autoscaling_stats."""
    now = time.time()
    stats = estimator.stats()
    metrics = {name: [TimeStampedValue(now - 0.5, float(value))] for name, value in stats.items()}
    metrics["running_requests"] = [TimeStampedValue(now - 0.5, float(stats[RUNNING_METRIC] + stats[QUEUED_METRIC]))]
    state.record_request_metrics_for_replica(ReplicaMetricReport(replica_id=replica, metrics=metrics, timestamp=now))


def test_ray_controller_runs_the_policy_by_import_path_with_its_kwargs_on_replica_stats():
    state = controller_state()
    reps = replicas(2)
    state.update_running_replica_ids(reps)
    estimators = [WorkEstimator(default_s_per_image_step=0.01, prior_size=(512, 512)) for _ in reps]
    for i in range(3):  # each replica: three 1024x1024, 28-step, n=4 jobs: 4 x 28 x 0.04 = 4.48 s apiece
        for est in estimators:
            est.start(i, 1024, 1024, 28, 4)
    for replica, est in zip(reps, estimators):
        report(state, replica, est)
    assert state.get_decision_num_replicas(2) == 6  # 26.88 s / 2 s = 14, at most one per request: 6
    assert state._policy_state[STATE_KEY]["work_s"] == pytest.approx(26.88)

    # The same count of small requests: 256x256, 4 steps, n=1 is 4 x 0.01/4 = 0.01 s apiece.
    small = [WorkEstimator(default_s_per_image_step=0.01) for _ in reps]
    for i in range(3):
        for est in small:
            est.start(i, 256, 256, 4, 1)
    for replica, est in zip(reps, small):
        report(state, replica, est)
    assert state.get_decision_num_replicas(2) == 1


def test_ray_controller_applies_the_delays_itself():
    # Why the policy applies none: the controller's wrapper does, so an upscale waits upscale_delay_s.
    state = controller_state(upscale_delay_s=3600)
    rep = replicas(1)
    state.update_running_replica_ids(rep)
    est = WorkEstimator(default_s_per_image_step=1.0)
    for i in range(5):
        est.start(i, 512, 512, 4)
    report(state, rep[0], est)
    assert state.get_decision_num_replicas(1) == 1
    assert state._policy_state[STATE_KEY]["desired"] == 5


# --- the replica's work estimate ------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_prior_scales_with_pixels_before_anything_is_measured():
    est = WorkEstimator(default_s_per_image_step=0.08, prior_size=(512, 512))
    assert est.rate(512, 512) == pytest.approx(0.08)
    assert est.rate(1024, 1024) == pytest.approx(0.32)
    assert est.rate(256, 512) == pytest.approx(0.04)
    assert est.job_seconds(1024, 1024, steps=28, n=4) == pytest.approx(4 * 28 * 0.32)


def test_finished_jobs_teach_the_rate_as_a_moving_average():
    est = WorkEstimator(default_s_per_image_step=1.0, alpha=0.5)
    est.start("a", 256, 256, steps=10, n=2)
    est.finish("a", 2.0)  # 20 image-steps in 2 s
    assert est.rate(256, 256) == pytest.approx(0.1)  # the first sample replaces the prior
    est.start("b", 256, 256, steps=10, n=1)
    est.finish("b", 3.0)  # 0.3 s per image-step
    assert est.rate(256, 256) == pytest.approx(0.5 * 0.3 + 0.5 * 0.1)
    est.start("c", 256, 256, steps=10, n=1)
    est.finish("c", None)  # failed: no lesson, but no longer pending
    assert est.rate(256, 256) == pytest.approx(0.2)
    assert est.pending_seconds() == 0.0
    assert est.rates() == {"256x256": pytest.approx(0.2)}


def test_an_unseen_size_borrows_the_nearest_measured_size_scaled_by_pixels():
    est = WorkEstimator(default_s_per_image_step=5.0)
    est.start(1, 256, 256, 1)
    est.finish(1, 0.01)
    est.start(2, 1024, 1024, 1)
    est.finish(2, 0.5)
    assert est.rate(768, 768) == pytest.approx(0.5 * (768 * 768) / (1024 * 1024))  # nearer 1024 than 256
    assert est.rate(128, 256) == pytest.approx(0.01 * 0.5)  # nearer 256x256
    assert est.rate(1024, 1024) == pytest.approx(0.5)  # measured sizes are used as they are


def test_a_batch_is_one_sample_of_its_seconds_per_image_step():
    est = WorkEstimator()
    est.start("x", 512, 512, steps=20, n=2)
    est.start("y", 512, 512, steps=20, n=3)
    est.finish_batch(["x", "y"], 10.0)  # 100 image-steps in 10 s
    assert est.rate(512, 512) == pytest.approx(0.1)


def test_pending_seconds_sum_queued_jobs_whole_and_running_jobs_remainders():
    clock = FakeClock()
    est = WorkEstimator(default_s_per_image_step=0.1, prior_size=(64, 64), clock=clock)
    est.start("q1", 64, 64, steps=10, n=1)  # 1 s
    est.start("q2", 128, 128, steps=10, n=2)  # 2 x 10 x 0.4 = 8 s
    assert est.pending_seconds() == pytest.approx(9.0)
    assert est.stats() == {PENDING_WORK_METRIC: pytest.approx(9.0), RUNNING_METRIC: 0, QUEUED_METRIC: 2}
    est.begin("q2")
    clock.now += 3.0
    assert est.pending_seconds() == pytest.approx(1.0 + 5.0)
    assert est.stats()[RUNNING_METRIC] == 1 and est.stats()[QUEUED_METRIC] == 1
    clock.now += 10.0  # past its estimate: counts 0, not negative
    assert est.pending_seconds() == pytest.approx(1.0)
    est.finish("q2", 13.0)
    est.finish("q1", 1.0)
    assert est.stats() == {PENDING_WORK_METRIC: 0.0, RUNNING_METRIC: 0, QUEUED_METRIC: 0}
    assert all(isinstance(v, (int, float)) for v in est.stats().values())  # what Ray accepts


def test_the_estimator_refuses_nonsense():
    est = WorkEstimator()
    est.start(1, 64, 64, 4)
    with pytest.raises(ValueError, match="already started"):
        est.start(1, 64, 64, 4)
    with pytest.raises(ValueError, match="width and height"):
        est.start(2, 0, 64, 4)
    with pytest.raises(ValueError, match="steps and n"):
        est.start(3, 64, 64, 0)
    with pytest.raises(ValueError, match="alpha"):
        WorkEstimator(alpha=0)
    est.finish("unknown", 1.0)  # ignored
    assert est.rates() == {}


def test_replicas_still_starting_keep_their_target_until_one_runs():
    """A deploy's initial replica at min_replicas 0 (or a cold start's), not running yet: its start may outlast
    downscale_to_zero_delay_s (a node added for it first), and wanting 0 meanwhile would stop it before it ever
    loads. Ray's own policy holds the target while nothing runs; so does this one."""
    cfg = config(min_replicas=0, max_replicas=4)
    n, state = work_aware_policy(context([], target=1, total_requests=0, cfg=cfg), 2.0)
    assert n == 1 and state[STATE_KEY]["reason"] == "replicas starting, none running yet"
    assert work_aware_policy(context([], target=6, total_requests=0, cfg=cfg), 2.0)[0] == 4  # within the bounds
    assert work_aware_policy(context([], target=0, total_requests=0, cfg=cfg), 2.0)[0] == 0  # at zero, stays
    # once one runs (and reports nothing waiting) the policy may take it away again
    running = replicas(1)
    assert work_aware_policy(context(running, {running[0]: (0.0, 0, 0)}, target=1, cfg=cfg), 2.0)[0] == 0
