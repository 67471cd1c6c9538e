"""Serve a config on a local Ray instance started by this process, until asked to stop; then stop what it started.

`quantserve serve` runs it: start Ray (metrics exported for Prometheus), deploy, print where to reach the API, then
wait. SIGINT/SIGTERM stop it, SIGHUP re-reads the config (a change of the experiment alone reconfigures the router
live). Stopping shuts Serve down (bounded by SHUTDOWN_GRACE_S), stops Ray and kills, by pid, any Ray process this
command started that is still there.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .config import ConfigError, ServeConfig
from .proxy_guard import guarded_proxy

SHUTDOWN_GRACE_S = 30.0
REAP_TIMEOUT_S = 20.0


class Signals:
    """SIGINT/SIGTERM ask to stop, SIGHUP asks to reload the config; the main loop acts on them."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGTERM, self._on_stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: self.reload.set())

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stop.set()


def check_variants(cfg: ServeConfig) -> list[str]:
    """Each variant's model resolved to the pipeline family that serves it, and checked, before Ray starts."""
    from .families import check_variant

    problems = []
    for i, v in enumerate(cfg.variants):
        try:
            check_variant(v, i)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def describe(cfg: ServeConfig) -> str:
    """One line: the variants with their schemes, and the traffic split."""
    weights = cfg.experiment.resolved_weights(cfg.variant_names)
    total = sum(weights.values())
    split = ", ".join(f"{name} {100 * w / total:.0f}%" for name, w in weights.items())
    variants = ", ".join(f"{v.name} ({v.scheme_label})" for v in cfg.variants)
    return f"variants {variants}; split {split}"


def _process_tree() -> list[Any]:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _reap(processes: list[Any], timeout_s: float) -> list[int]:
    """Wait for the processes this command started to exit; kill (by pid) any still there after the timeout."""
    import psutil

    def alive(p: Any) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in processes):
        time.sleep(0.2)
    killed = []
    for p in processes:
        if alive(p):
            try:
                p.kill()
                killed.append(p.pid)
            except psutil.Error:
                pass
    return killed


def _shutdown(started: list[Any], app_name: str | None = None) -> None:
    """Drain, then stop: deleting the application first stops routing new requests to it while its replicas
    answer what they accepted (each within the config's graceful_shutdown_timeout_s); only then do Serve's proxy
    and Ray stop. (Stopping Serve first cut every in-flight client off at once.)"""
    import ray
    from ray import serve

    started = started + [p for p in _process_tree() if p.pid not in {q.pid for q in started}]
    done = threading.Event()

    def stop_serve() -> None:
        if app_name is not None:
            try:
                serve.delete(app_name, _blocking=True)
            except Exception as exc:  # noqa: BLE001 - shutting down regardless
                print(f"quantserve serve: draining {app_name}: {exc}", file=sys.stderr)
        try:
            serve.shutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down regardless
            print(f"quantserve serve: serve.shutdown: {exc}", file=sys.stderr)
        done.set()

    threading.Thread(target=stop_serve, daemon=True).start()
    if not done.wait(SHUTDOWN_GRACE_S):
        print("quantserve serve: Serve did not shut down in time; stopping Ray", file=sys.stderr)
    ray.shutdown()
    killed = _reap(started, REAP_TIMEOUT_S)
    if killed:
        print(f"quantserve serve: killed {len(killed)} leftover Ray process(es): {killed}", file=sys.stderr)


def _ready_message(cfg: ServeConfig, reloadable: bool) -> str:
    base = f"http://{cfg.http.host}:{cfg.http.port}"
    return (f"quantserve serve: ready\n"
            f"  API      {base}/v1/images/generations  (OpenAI base_url: {base}/v1)\n"
            f"  models   {base}/v1/models   experiment {base}/v1/ab   health {base}/healthz {base}/readyz\n"
            f"  metrics  http://127.0.0.1:{cfg.metrics.port}/metrics  (Prometheus)\n"
            f"  Ctrl-C stops" + ("; SIGHUP reloads the config file" if reloadable else ""))


def serve_locally(cfg: ServeConfig, reload: Callable[[], ServeConfig], config_path: str | None = None,
                  num_cpus: int | None = None, startup_timeout_s: float = 600.0) -> bool:
    """Start a local Ray instance, deploy `cfg` and serve until SIGINT/SIGTERM; on SIGHUP deploy `reload()` (a
    failed reload keeps the previous config). False when the deployment failed (the reason printed)."""
    signals = Signals()
    signals.install()
    import ray

    from .deploy import DeployError, deploy, submit

    print(f"quantserve serve: starting Ray and {describe(cfg)}", flush=True)
    init_kwargs: dict[str, Any] = {"address": "local", "include_dashboard": False, "namespace": "serve",
                                   "_metrics_export_port": cfg.metrics.port}
    if num_cpus is not None:
        init_kwargs["num_cpus"] = num_cpus
    with guarded_proxy(cfg.limits):  # Serve's proxy: header timeout and bounds (serve/proxy_guard.py)
        ray.init(**init_kwargs)
    signals.install()  # ray.init sets its own SIGTERM handler; ours stops cleanly instead
    started = _process_tree()
    ok = True
    try:
        deploy(cfg, timeout_s=startup_timeout_s, stop=signals.stop.is_set)
        print(_ready_message(cfg, config_path is not None), flush=True)
        while not signals.stop.wait(0.5):
            if signals.reload.is_set():
                signals.reload.clear()
                try:
                    new = reload()
                    submit(new)
                    print(f"quantserve serve: reloaded {config_path}: {describe(new)}", flush=True)
                except (ConfigError, ValueError, DeployError) as exc:
                    print(f"quantserve serve: reload failed, still serving the previous config: {exc}", file=sys.stderr)
    except DeployError as exc:
        if not signals.stop.is_set():
            print(f"quantserve serve: {exc}", file=sys.stderr)
            ok = False
    finally:
        print("quantserve serve: stopping (answering the requests in flight first)", flush=True)
        _shutdown(started, cfg.app_name)
        print("quantserve serve: stopped", flush=True)
    return ok
