"""The rollout keeper: one named, detached Ray actor per application that holds its progressive rollout
(serve/rollout.py), outside every router replica.

Every Ingress replica (each runs an A/B router) sends it, once a second, the candidate's and the baseline's
requests and shadow comparisons, and takes back the rollout's state; the keeper judges the steps on what all of
them saw, so two Ingress replicas never decide twice. The state is written to Ray's internal KV store on every
change, so it survives both a router replica's restart (the new replica finds the keeper by name) and the keeper's
own (Ray restarts it, `max_restarts=-1`, and it reads the KV back; only the current step's window of requests is
lost, and the step goes on collecting). A redeploy with the same rollout config keeps the rollout where it is, a
finished one included; a changed config starts it again; a config without a rollout ends it.

Decisions are log lines (the keeper's and each router's), events in GET /v1/ab, and metrics:
`quantserve_ab_rollout_weight`, `quantserve_ab_rollout_decisions{decision,guard}` and
`quantserve_ab_rollout_guard_value{guard}` (scraped as `ray_quantserve_ab_rollout_*`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import ray

from .metrics import RolloutMetrics
from .rollout import ACTIONS, Rollout, RolloutActionError, fingerprint

logger = logging.getLogger("quantserve.serve")

KEEPER_NAMESPACE = "quantserve"  # the Ray namespace of the keeper actors (Serve's replicas live in "serve")
KV_NAMESPACE = "quantserve"


def keeper_name(app_name: str) -> str:
    return f"rollout-keeper-{app_name}"


def kv_key(app_name: str) -> bytes:
    return f"rollout/{app_name}".encode()


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class RolloutKeeper:
    """Holds one application's Rollout; its methods run one at a time (a plain, non-async actor)."""

    def __init__(self, app_name: str):
        from ray.experimental.internal_kv import _internal_kv_get

        self.app_name = app_name
        self.rollout: Rollout | None = None
        self.fingerprint: str | None = None
        raw = _internal_kv_get(kv_key(app_name), namespace=KV_NAMESPACE)
        if raw:
            data = json.loads(raw)
            self.rollout, self.fingerprint = Rollout.from_dict(data["rollout"]), data["fingerprint"]
            logger.info("rollout %s: restored at step %d (weight %g, %s)", app_name, self.rollout.step,
                        self.rollout.weight, self.rollout.status)
        self.metrics = RolloutMetrics()
        self._export()

    # --- called by the routers ------------------------------------------------------------------------------
    def configure(self, config: dict[str, Any] | None) -> dict[str, Any] | None:
        """A router's experiment: the same rollout config keeps the state; a new one starts over; None ends it."""
        if config is None:
            if self.rollout is not None:
                logger.info("rollout %s: removed from the config (it was %s at weight %g)", self.app_name,
                            self.rollout.status, self.rollout.weight)
                self.rollout, self.fingerprint = None, None
                self._save()
            return None
        fp = fingerprint(config)
        if self.rollout is not None and fp == self.fingerprint:
            return self.rollout.public()
        reason = "configured" if self.rollout is None else "the rollout config changed: started again"
        self.rollout, self.fingerprint = Rollout.start(config, reason=reason), fp
        self._decided(self.rollout.events[-1])
        return self.rollout.public()

    def sync(self, requests: Sequence[Sequence[Any]], comparisons: Sequence[Sequence[Any]]) -> dict[str, Any] | None:
        """A router's news since its last sync; judge the step if due; the state back."""
        if self.rollout is None:
            return None
        self.rollout.observe(requests, comparisons)
        event = self.rollout.tick()
        if event is not None:
            self._decided(event)
        else:
            self._export()
        return self.rollout.public()

    def control(self, action: str, who: str = "operator") -> dict[str, Any]:
        """promote, rollback, pause or resume: {"rollout": state} or {"error": message, "status": http status}."""
        if self.rollout is None:
            return {"status": 409, "error": "no rollout in the experiment: add experiment.rollout to the serve config "
                                            "and deploy it"}
        try:
            event = self.rollout.control(action, who=who)
        except RolloutActionError as exc:
            return {"status": exc.status, "error": str(exc), "accepted": list(ACTIONS)}
        self._decided(event)
        return {"rollout": self.rollout.public()}

    def state(self) -> dict[str, Any] | None:
        return None if self.rollout is None else self.rollout.public()

    # --- inside ---------------------------------------------------------------------------------------------
    def _decided(self, event: dict[str, Any]) -> None:
        r = self.rollout
        assert r is not None
        logger.info("rollout %s: %s %s -> step %d, weight %g (%s)", self.app_name, event["decision"], r.candidate,
                    event["step"], event["weight"], event.get("reason", ""))
        self.metrics.decided(self._tags(), event["decision"], event.get("guard", "none"))
        self._save()
        self._export()

    def _tags(self) -> dict[str, str]:
        r = self.rollout
        return {"application": self.app_name, "candidate": r.candidate if r else "", "baseline": r.baseline if r else ""}

    def _export(self) -> None:
        if self.rollout is not None:
            self.metrics.export(self._tags(), self.rollout.weight, self.rollout.config["guards"], self.rollout.guards)

    def _save(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

        if self.rollout is None:
            _internal_kv_del(kv_key(self.app_name), namespace=KV_NAMESPACE)
            return
        data = {"rollout": self.rollout.to_dict(), "fingerprint": self.fingerprint, "saved": time.time()}
        _internal_kv_put(kv_key(self.app_name), json.dumps(data).encode(), overwrite=True, namespace=KV_NAMESPACE)


def keeper_for(app_name: str, create: bool) -> Any:
    """The application's keeper actor (created when `create`), or None when there is none. Blocking: call it in a
    thread from async code."""
    name = keeper_name(app_name)
    if create:
        return RolloutKeeper.options(name=name, namespace=KEEPER_NAMESPACE, lifetime="detached",
                                     get_if_exists=True).remote(app_name)
    try:
        return ray.get_actor(name, namespace=KEEPER_NAMESPACE)
    except ValueError:
        return None
