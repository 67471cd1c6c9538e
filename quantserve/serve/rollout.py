"""Progressive rollout (issue 15): the candidate's share of the candidate + baseline traffic climbs through the
config's steps while every guard holds, and drops to 0 for good when one fails.

Plain Python, no Ray: `Rollout` is the state machine, `judge` evaluates the guards over one window of requests and
shadow comparisons. The rollout keeper (serve/rollout_keeper.py, a named detached Ray actor) holds one `Rollout`
per application, fed by every Ingress replica, so the state outlives any router replica.

The life of a rollout:

    running --(step window over, enough requests, every guard holds)--> next step ... --> complete (weight 1.0)
    running --(step window over, enough requests, a guard fails)-----> rolled_back (weight 0), stops
    running <--pause / resume--> paused;  promote -> complete;  rollback -> rolled_back   (manual, any time)

A step is judged when it has lasted `step_interval_s` and the candidate has `min_requests` requests in it (and, for
the fidelity guards, `min_comparisons` shadow comparisons); until then it waits, and says what for.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .report import ratio_ci

RUNNING, PAUSED, COMPLETE, ROLLED_BACK = "running", "paused", "complete", "rolled_back"
ACTIONS = ("promote", "rollback", "pause", "resume")
LIVE_JUDGE_INTERVAL_S = 5.0  # how often a step not yet due is judged for its live figures
MAX_EVENTS = 200
MAX_STEP_RECORDS = 200_000  # requests kept for one step's window (the oldest fall out)


class RolloutActionError(ValueError):
    """A manual action that does not apply (unknown, or not in this state): `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class GuardResult:
    guard: str
    value: float
    limit: float
    holds: bool
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _holds(guard: str, value: float, limit: float) -> bool:
    return value >= limit if guard.startswith("min_") else value <= limit


def judge(guards: Mapping[str, float], candidate: str, baseline: str,
          requests: Iterable[Sequence[Any]], comparisons: Iterable[Sequence[Any]],
          min_requests: int = 1, min_comparisons: int = 1) -> tuple[list[GuardResult], list[str]]:
    """The guards over one window: (results of the guards that could be judged, what the others still wait for).

    `requests`: (time, variant, status, latency_s) rows; `comparisons`: (time, variant, reference, mae, psnr, ssim)
    rows. Errors are 5xx answers; latencies are those of 200s. A guard whose figure has too little data waits."""
    rows = [r for r in requests if r[1] in (candidate, baseline)]
    mine = [r for r in rows if r[1] == candidate]
    ok_c = [float(r[3]) for r in mine if int(r[2]) == 200]
    ok_b = [float(r[3]) for r in rows if r[1] == baseline and int(r[2]) == 200]
    pairs = np.array([[float(c[3]), float(c[5])] for c in comparisons if c[1] == candidate and c[2] == baseline]
                     ).reshape(-1, 2)
    results: list[GuardResult] = []
    waiting: list[str] = []
    if len(mine) < min_requests:
        waiting.append(f"{candidate} has {len(mine)} of the {min_requests} requests a step needs")
    for guard, limit in guards.items():
        if guard == "max_error_rate":
            if not mine:
                continue  # counted in the requests wait above
            errors = sum(1 for r in mine if int(r[2]) >= 500)
            value = errors / len(mine)
            text = f"{candidate} error rate is {value:.2%} ({errors} of {len(mine)})"
        elif guard == "max_p95_latency_ratio":
            ratio = ratio_ci(ok_c, ok_b, 95)
            if ratio is None:
                waiting.append(f"the p95 latency ratio needs successful requests of both {candidate} "
                               f"({len(ok_c)}) and {baseline} ({len(ok_b)})")
                continue
            value = ratio[0]
            text = f"{candidate} p95 is {ratio[0]:.2f}x {baseline} [{ratio[1]:.2f}, {ratio[2]:.2f}]"
        elif guard in ("min_ssim", "max_pixel_mae"):
            if len(pairs) < min_comparisons:
                waiting.append(f"{guard} needs {min_comparisons} shadow comparisons of {candidate} against "
                               f"{baseline}, has {len(pairs)}")
                continue
            if guard == "min_ssim":
                value = float(pairs[:, 1].mean())
                text = f"{candidate} mean SSIM against {baseline} is {value:.4f} over {len(pairs)} comparisons"
            else:
                value = float(pairs[:, 0].mean())
                text = f"{candidate} mean pixel MAE against {baseline} is {value:.4f} over {len(pairs)} comparisons"
        else:
            raise ValueError(f"guards: unknown guard {guard!r}; accepted: max_error_rate, max_p95_latency_ratio, "
                             "min_ssim, max_pixel_mae")
        holds = _holds(guard, value, limit)
        bound = ">=" if guard.startswith("min_") else "<="
        results.append(GuardResult(guard, round(value, 6), limit, holds,
                                   f"{text}: {'holds' if holds else 'FAILS'} ({guard} {bound} {limit:g})"))
    return results, waiting


def fingerprint(config: Mapping[str, Any]) -> str:
    """The rollout config as canonical JSON: a redeploy with the same one keeps the rollout where it is."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


@dataclass
class Rollout:
    """One application's rollout. `config` is a RolloutConfig as a dict (model_dump)."""

    config: dict[str, Any]
    status: str = RUNNING
    step: int = 0
    step_started: float = field(default_factory=time.time)
    version: int = 1  # changes whenever the weight or status does: routers rebuild their split on a new version
    events: list[dict[str, Any]] = field(default_factory=list)
    guards: list[dict[str, Any]] = field(default_factory=list)  # the latest judgement's results
    waiting: list[str] = field(default_factory=list)
    failed: dict[str, Any] | None = None
    requests: deque = field(default_factory=lambda: deque(maxlen=MAX_STEP_RECORDS), repr=False)
    comparisons: deque = field(default_factory=lambda: deque(maxlen=MAX_STEP_RECORDS), repr=False)
    judged_at: float | None = field(default=None, repr=False)  # the last judgement (not persisted)
    observed: int = field(default=0, repr=False)  # records observed so far (not persisted)
    judged_observed: int = field(default=-1, repr=False)  # ... as of the last judgement

    @classmethod
    def start(cls, config: Mapping[str, Any], now: float | None = None, reason: str = "configured") -> Rollout:
        now = time.time() if now is None else now
        rollout = cls(dict(config), step_started=now)
        rollout._event("start", now, guard="none", reason=reason)
        return rollout

    # --- what the routers read -------------------------------------------------------------------------------
    @property
    def candidate(self) -> str:
        return self.config["candidate"]

    @property
    def baseline(self) -> str:
        return self.config["baseline"]

    @property
    def steps(self) -> list[float]:
        return list(self.config["steps"])

    @property
    def weight(self) -> float:
        """The candidate's share of the candidate + baseline traffic now."""
        return 0.0 if self.status == ROLLED_BACK else float(self.steps[self.step])

    # --- feeding and judging -------------------------------------------------------------------------------
    def observe(self, requests: Iterable[Sequence[Any]] = (), comparisons: Iterable[Sequence[Any]] = ()) -> None:
        """Requests (time, variant, status, latency_s) and comparisons (time, variant, reference, mae, psnr, ssim)
        from the routers; only the candidate's and baseline's count."""
        pair = (self.candidate, self.baseline)
        fresh = [r for r in requests if r[1] in pair]
        fresh_comparisons = [c for c in comparisons if c[1] == self.candidate and c[2] == self.baseline]
        self.requests.extend(fresh)
        self.comparisons.extend(fresh_comparisons)
        self.observed += len(fresh) + len(fresh_comparisons)

    def window(self) -> tuple[list, list]:
        """This step's requests and comparisons (those that arrived since it began)."""
        since = self.step_started
        return [r for r in self.requests if r[0] >= since], [c for c in self.comparisons if c[0] >= since]

    def tick(self, now: float | None = None) -> dict[str, Any] | None:
        """Judge the step if it is due; returns the decision's event (advance, complete, rollback) or None."""
        now = time.time() if now is None else now
        if self.status != RUNNING:
            self.waiting = []
            return None
        due_at = self.step_started + self.config["step_interval_s"]
        left = due_at - now
        # Judged when due (once it falls due, then on new records), and before that every LIVE_JUDGE_INTERVAL_S for
        # the live figures (/v1/ab, the guard gauges), not at every router sync: the p95 ratio's bootstrap over a
        # busy step is not free.
        news = self.observed != self.judged_observed or self.judged_at is None or self.judged_at < due_at
        recent = self.judged_at is not None and now - self.judged_at < LIVE_JUDGE_INTERVAL_S
        if (left <= 0 and not news) or (left > 0 and recent):
            self.waiting = [f"the step's window has {left:.0f} s to go", *self.waiting[1:]] \
                if self.waiting and self.waiting[0].startswith("the step's window") else self.waiting
            return None
        self.judged_at, self.judged_observed = now, self.observed
        requests, comparisons = self.window()
        results, waiting = judge(_active(self.config["guards"]), self.candidate, self.baseline, requests,
                                 comparisons, self.config["min_requests"], self.config["min_comparisons"])
        self.guards = [r.to_dict() for r in results]
        if left > 0:
            waiting = [f"the step's window has {left:.0f} s to go", *waiting]
        self.waiting = waiting
        enough = sum(1 for r in requests if r[1] == self.candidate) >= self.config["min_requests"]
        failed = [r for r in results if not r.holds]
        if left > 0 or not enough or (waiting and not failed):
            return None  # a failing guard rolls back once the step is due, even while another still waits for data
        if failed:
            first = failed[0]
            self.failed = {"guard": first.guard, "value": first.value, "limit": first.limit, "text": first.text,
                           "step": self.step, "weight": self.weight}
            self.status = ROLLED_BACK
            return self._event("rollback", now, guard=first.guard, results=self.guards,
                               reason=f"guard failed: {first.text}")
        self.step += 1
        self.step_started = now
        if self.step == len(self.steps) - 1:
            self.status = COMPLETE
            return self._event("complete", now, guard="all", results=self.guards, reason="every guard held at every step")
        return self._event("advance", now, guard="all", results=self.guards, reason="every guard held")

    def control(self, action: str, now: float | None = None, who: str = "operator") -> dict[str, Any]:
        """A manual action: promote (weight 1.0, complete), rollback (weight 0), pause, resume."""
        now = time.time() if now is None else now
        if action not in ACTIONS:
            raise RolloutActionError(f"action: got {action!r}; accepted: {', '.join(ACTIONS)}", 422)
        if action == "promote":
            if self.status == COMPLETE:
                raise RolloutActionError(f"the rollout of {self.candidate} is already complete (weight 1.0)")
            self.status, self.step, self.step_started = COMPLETE, len(self.steps) - 1, now
        elif action == "rollback":
            if self.status == ROLLED_BACK:
                raise RolloutActionError(f"the rollout of {self.candidate} is already rolled back")
            self.failed = {"guard": "manual", "step": self.step, "weight": self.weight,
                           "text": f"rolled back by {who}"}
            self.status = ROLLED_BACK
        elif action == "pause":
            if self.status != RUNNING:
                raise RolloutActionError(f"only a running rollout pauses; this one is {self.status}")
            self.status = PAUSED
        else:
            if self.status != PAUSED:
                raise RolloutActionError(f"only a paused rollout resumes; this one is {self.status}")
            self.status, self.step_started = RUNNING, now  # a fresh window: what happened while paused is not judged
        self.waiting = []
        return self._event(action, now, guard="manual", reason=f"by {who}")

    def _event(self, decision: str, now: float, **extra: Any) -> dict[str, Any]:
        self.version += 1
        event = {"time": round(now, 3), "decision": decision, "step": self.step, "weight": self.weight,
                 "status": self.status, **extra}
        self.events.append(event)
        del self.events[:-MAX_EVENTS]
        return event

    # --- persistence and display ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The state (not the window's records): what the keeper persists and restores."""
        return {"config": self.config, "status": self.status, "step": self.step, "step_started": self.step_started,
                "version": self.version, "events": self.events, "guards": self.guards, "waiting": self.waiting,
                "failed": self.failed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rollout:
        return cls(**{k: data[k] for k in ("config", "status", "step", "step_started", "version", "events",
                                           "guards", "waiting", "failed")})

    def public(self, now: float | None = None, events: int = 20) -> dict[str, Any]:
        """What /v1/ab shows."""
        now = time.time() if now is None else now
        return {"candidate": self.candidate, "baseline": self.baseline, "status": self.status, "step": self.step,
                "steps": self.steps, "weight": self.weight, "version": self.version,
                "step_elapsed_s": round(now - self.step_started, 1),
                "step_interval_s": self.config["step_interval_s"], "min_requests": self.config["min_requests"],
                "guards": self.guards, "waiting": self.waiting, "failed": self.failed,
                "events": self.events[-events:]}


def _active(guards: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in guards.items() if v is not None}


def split_weights(weights: Mapping[str, float], candidate: str, baseline: str, share: float) -> dict[str, float]:
    """The experiment's weights with the candidate + baseline share split `share` : `1 - share` between them;
    the other variants keep theirs."""
    out = dict(weights)
    total = out.get(candidate, 0.0) + out.get(baseline, 0.0)
    if not math.isfinite(share) or not 0.0 <= share <= 1.0:
        raise ValueError(f"rollout weight: expected a share in [0, 1], got {share!r}")
    out[candidate], out[baseline] = total * share, total * (1.0 - share)
    return out
