"""A Ray cluster whose autoscaler adds and removes nodes, on one machine: Ray's fake multi-node provider.

`fake_cluster()` starts a head node of its own (`ray start --head --block` in a new session, its own temp dir, a free
GCS port, free ports for everything that defaults to a fixed one) with an autoscaling config written to that temp
dir. The provider (ray.autoscaler._private.fake_multi_node) "launches" a node by starting a raylet in the monitor's
process that joins the head's GCS, and "terminates" it by killing the processes of that node alone.

What makes it work with Ray 2.60's wheel (each found the hard way):
- autoscaler v1 (RAY_enable_autoscaler_v2=0): v2 fills the config out with the provider's defaults file,
  fake_multi_node/example.yaml, which the wheel does not ship, and its monitor dies; v1 takes the config as written;
- provider.gcs_address: without it the provider points every new node at <node ip>:6379 (Ray's default port), not
  at this head; the node never registers here and the autoscaler gives it up as "launch failed" (and were another
  Ray instance listening on 6379, the node would join that one);
- RAY_AUTH_MODE=disabled for the head and every driver: `ray start` turns token authentication on when
  ~/.ray/auth_token exists, while a driver whose RAY_AUTH_MODE is unset connects without the token and the GCS
  refuses it (InvalidAuthToken);
- DASHBOARD_METRIC_PORT: even without the dashboard's HTTP server the head starts its metrics server on the fixed
  port 44227, which another Ray instance on the machine may hold;
- RAY_FAKE_CLUSTER=1 makes the head take the provider's fixed head node id (fff...00000); the provider refuses to
  start without it.

The pytest process already holds a Ray connection (tests/serve/conftest.py), and a process connects to one cluster
only, so drive this cluster from another process (tests/serve/fake_cluster_driver.py). Nothing here runs `ray stop`:
on exit the context manager shuts Serve down through a driver of its own, sends SIGTERM to the head's process group
and to every process it started (found by its temp dir on the command line or by descent from the head), SIGKILL to
what is left, checks that nothing is, and removes the temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .helpers import free_port

HEAD_NODE_TYPE = "ray.head.default"  # the provider's name for the head's node type (FAKE_HEAD_NODE_TYPE)
GPU_NODE_TYPE = "fake_gpu_node"
GPU_RESOURCE = "fake_gpu"
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # each node's object store (Ray's default would reserve 30% of the RAM)


def ray_bin() -> str:
    """The `ray` script of this interpreter's environment (not whatever `ray` is first on PATH)."""
    return str(Path(sys.executable).with_name("ray"))


def autoscaling_config(port: int, *, head_cpus: int, gpu_node_cpus: int, max_gpu_nodes: int,
                       idle_timeout_minutes: float) -> dict[str, Any]:
    """The autoscaler's cluster config: the head (no workers of its own type) and one worker node type that stands
    in for a GPU node (a custom resource, `fake_gpu`, instead of a GPU)."""
    return {
        "cluster_name": "qsfc",
        "max_workers": max_gpu_nodes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{port}",  # else the provider sends new nodes to <ip>:6379
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            HEAD_NODE_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            GPU_NODE_TYPE: {
                "resources": {"CPU": gpu_node_cpus, GPU_RESOURCE: 1, "object_store_memory": OBJECT_STORE_BYTES},
                "node_config": {}, "min_workers": 0, "max_workers": max_gpu_nodes,
            },
        },
        "head_node_type": HEAD_NODE_TYPE,
        "idle_timeout_minutes": idle_timeout_minutes,
        "upscaling_speed": 1.0,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def driver_env() -> dict[str, str]:
    """The environment of a process that connects to the fake cluster: no RAY_ADDRESS of the caller's, the same
    authentication mode as the head."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    return env


@dataclass
class FakeCluster:
    address: str  # the head's GCS, "127.0.0.1:<port>"; connect with ray.init(address=...)
    temp_dir: Path
    config: dict[str, Any]
    head_pid: int
    http_port: int  # a free port for Serve's HTTP proxy (the driver starts Serve on it)
    head_started_s: float  # `ray start` until the head answered
    stats: dict[str, Any] = field(default_factory=dict)  # filled on exit: shutdown times, processes killed, left over

    @property
    def logs_dir(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def monitor_log(self) -> str:
        """The autoscaler monitor's log (its decisions: "Adding 1 node(s) of type ...", "Removing ... (idle)")."""
        parts = []
        for name in ("monitor.log", "monitor.err", "monitor.out"):
            path = self.logs_dir / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def our_processes(self) -> list[psutil.Process]:
        return _our_processes(self.temp_dir, self.head_pid)


def _our_processes(temp_dir: Path, head_pid: int) -> list[psutil.Process]:
    """Every live process this cluster started: the head's descendants, its session (the head leads one of its own;
    Ray's workers take process groups of their own inside it), its process group, and anything with the cluster's
    own temp dir on its command line (the raylets, the agents, the fake nodes' processes)."""
    marker = str(temp_dir)
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    try:
        head = psutil.Process(head_pid)
        for p in [head, *head.children(recursive=True)]:
            found[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == me or p.pid in found:
                continue
            if (marker in " ".join(p.info["cmdline"] or []) or os.getsid(p.pid) == head_pid
                    or os.getpgid(p.pid) == head_pid):
                found[p.pid] = p
        except (psutil.Error, ProcessLookupError):
            continue
    alive = []
    for p in found.values():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            continue
    return alive


def _wait_head(proc: subprocess.Popen, out: Path, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {proc.returncode}:\n{out.read_text(errors='replace')}")
        if "Ray runtime started" in out.read_text(errors="replace"):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"the head did not start within {timeout} s:\n{out.read_text(errors='replace')}")


def shutdown_serve(address: str, timeout: float = 60) -> bool:
    """serve.shutdown() on the fake cluster, from a process of its own (this one may be connected elsewhere)."""
    code = ("import ray, sys\nfrom ray import serve\n"
            "ray.init(address=sys.argv[1], namespace='qsfc', log_to_driver=False)\nserve.shutdown()\n")
    try:
        return subprocess.run([sys.executable, "-c", code, address], env=driver_env(), timeout=timeout,
                              capture_output=True).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _kill(cluster_dir: Path, head: subprocess.Popen, stats: dict[str, Any]) -> None:
    """SIGTERM the head's group and every process of ours, wait, SIGKILL what is left, check that nothing is."""
    t0 = time.monotonic()
    procs = _our_processes(cluster_dir, head.pid)
    stats["processes_at_exit"] = len(procs)
    try:
        os.killpg(head.pid, signal.SIGTERM)  # the head was started in a session (and process group) of its own
    except ProcessLookupError:
        pass
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)  # psutil checks the process is still the one listed (no reused pid)
        except psutil.Error:
            pass
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    gone, alive = psutil.wait_procs(procs, timeout=max(1.0, 30 - (time.monotonic() - t0)))
    alive = {p.pid: p for p in alive}
    alive.update({p.pid: p for p in _our_processes(cluster_dir, head.pid)})
    stats["sigkilled"] = len(alive)
    for p in alive.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if head.poll() is None:
        head.wait(timeout=10)
    psutil.wait_procs(list(alive.values()), timeout=10)
    left = _our_processes(cluster_dir, head.pid)
    stats["left_over"] = []
    for p in left:
        try:
            stats["left_over"].append(f"{p.pid} {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            continue
    stats["kill_s"] = round(time.monotonic() - t0, 2)


@contextmanager
def fake_cluster(*, head_cpus: int = 1, gpu_node_cpus: int = 1, max_gpu_nodes: int = 2,
                 idle_timeout_minutes: float = 0.1, start_timeout: float = 90) -> Iterator[FakeCluster]:
    """A head node whose autoscaler launches `fake_gpu_node`s ({"CPU": gpu_node_cpus, "fake_gpu": 1}) on demand and
    terminates them after `idle_timeout_minutes` idle; everything it started is gone when the block exits."""
    temp_dir = Path(tempfile.mkdtemp(prefix="qsfc-", dir="/tmp"))  # short: Ray's unix sockets live under it
    port = free_port()
    config = autoscaling_config(port, head_cpus=head_cpus, gpu_node_cpus=gpu_node_cpus, max_gpu_nodes=max_gpu_nodes,
                                idle_timeout_minutes=idle_timeout_minutes)
    config_path = temp_dir / "autoscaling.yaml"
    config_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    env = driver_env()
    env.update({
        "RAY_FAKE_CLUSTER": "1",  # the provider requires it; the head takes the provider's fixed head node id
        "RAY_enable_autoscaler_v2": "0",  # v2 needs fake_multi_node/example.yaml, missing from the wheel
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # the monitor's loop (default 5 s)
        "DASHBOARD_METRIC_PORT": str(free_port()),  # default: the fixed 44227
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM: stop now (default: drain the head for up to 30 s)
    })
    cmd = [ray_bin(), "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp_dir}",
           f"--num-cpus={head_cpus}", "--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}",
           "--include-dashboard=false", f"--dashboard-port={free_port()}", f"--autoscaling-config={config_path}",
           "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0",  # workers: OS-chosen ports
           f"--ray-client-server-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}"]
    out = temp_dir / "head.out"
    t0 = time.monotonic()
    try:
        with open(out, "w") as out_file:
            head = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # a session and process group of its own
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    stats: dict[str, Any] = {}
    cluster = None
    try:
        _wait_head(head, out, port, start_timeout)
        cluster = FakeCluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir, config=config, head_pid=head.pid,
                              http_port=free_port(), head_started_s=round(time.monotonic() - t0, 2), stats=stats)
        yield cluster
    finally:
        try:
            if cluster is not None and head.poll() is None:
                t1 = time.monotonic()
                stats["serve_shutdown_ok"] = shutdown_serve(cluster.address)
                stats["serve_shutdown_s"] = round(time.monotonic() - t1, 2)
        finally:
            try:
                _kill(temp_dir, head, stats)
            finally:
                if not os.environ.get("QSFC_KEEP_TEMP"):  # keep the logs to look at a failure
                    shutil.rmtree(temp_dir, ignore_errors=True)
