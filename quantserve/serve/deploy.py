"""Deploy a serve config on the Ray instance this process is connected to, the way `serve deploy` does.

Deploying a Ray Serve config (rather than `serve.run` of a built application) lets Ray tell code changes from config
changes: deploying again with only the experiment changed reconfigures the Ingress's A/B router in place, without restarting any
replica. `quantserve serve` and the tests use it. A Ray Serve config lists every application of the cluster, so a
submit keeps the other applications already deployed from a config (each with its own name and route prefix) and
replaces only the one it deploys.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray import serve

from .app import ray_serve_config
from .config import DEPLOYMENT_PREFIX, ServeConfig


class DeployError(RuntimeError):
    """The application did not reach RUNNING: the message carries Ray Serve's reason."""


def start_serve(cfg: ServeConfig) -> Any:
    """Start Ray Serve's controller and HTTP proxy (if not running yet) on cfg.http; returns the Serve client."""
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    return _get_global_client()


def _other_apps(client: Any, app_name: str) -> list[dict[str, Any]]:
    """The applications other than `app_name` that the cluster runs from a config (kept by the next deploy)."""
    details = client.get_serve_details() or {}
    kept = []
    for name, app in (details.get("applications") or {}).items():
        status = str(app.get("status", ""))
        config = app.get("deployed_app_config")
        if name == app_name or config is None or status.endswith("DELETING"):
            continue
        kept.append({k: v for k, v in dict(config).items() if v is not None})
    return kept


def submit(cfg: ServeConfig, route_prefix: str = "/") -> None:
    """Hand the config to Ray Serve's controller (returns at once; see `wait_running`); the cluster's other
    applications stay as they are."""
    from ray.serve.schema import ServeDeploySchema

    client = start_serve(cfg)
    document = ray_serve_config(cfg, route_prefix)
    document["applications"] = _other_apps(client, cfg.app_name) + document["applications"]
    client.deploy_apps(ServeDeploySchema.model_validate(document))


def app_status(app_name: str) -> tuple[str, str]:
    """(status, message) of an application, with the messages of its unhealthy deployments."""
    status = serve.status()
    app = status.applications.get(app_name)
    if app is None:
        return "NOT_STARTED", ""
    messages = [app.message] if app.message else []
    for name, d in app.deployments.items():
        if d.message and str(getattr(d.status, "value", d.status)) != "HEALTHY":
            messages.append(f"{name}: {d.message}")
    return str(getattr(app.status, "value", app.status)), "\n".join(messages)


STARTED_STATES = ("STARTING", "UPDATING", "RUNNING")  # replicas Serve has decided on, started or not yet


def replica_counts(app_name: str) -> dict[str, dict[str, int]]:
    """Per variant of a running app: {"wanted": replicas Serve is starting or running (the autoscaler's decision,
    before a slow start ends), "running": replicas serving}. Empty when the app is not there."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name.removeprefix(DEPLOYMENT_PREFIX): {"wanted": sum(n for state, n in d.replica_states.items()
                                                      if state in STARTED_STATES),
                                        "running": int(d.replica_states.get("RUNNING", 0))}
            for name, d in app.deployments.items() if name.startswith(DEPLOYMENT_PREFIX)}


def wait_running(app_name: str, timeout_s: float = 600.0, stop: Callable[[], bool] | None = None,
                 poll_s: float = 0.5) -> None:
    """Block until the application is RUNNING; DeployError when it fails, times out, or `stop()` turns true."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, message = app_status(app_name)
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise DeployError(f"application {app_name!r} is {status}: {message}")
        if stop is not None and stop():
            raise DeployError(f"application {app_name!r}: stopped while {status}")
        if time.monotonic() > deadline:
            raise DeployError(f"application {app_name!r} not running after {timeout_s:.0f} s (status {status}): {message}")
        time.sleep(poll_s)


def deploy(cfg: ServeConfig, timeout_s: float = 600.0, stop: Callable[[], bool] | None = None,
           route_prefix: str = "/") -> None:
    """Submit the config and wait until the application runs."""
    submit(cfg, route_prefix)
    wait_running(cfg.app_name, timeout_s, stop)
