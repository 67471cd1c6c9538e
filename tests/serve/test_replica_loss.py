"""A replica killed (SIGKILL) under a request loses nothing: the router runs the seeded, idempotent request again
on a live replica (issue 12 item 6). On the real server: an application of its own at /kill, so the shared test
applications keep their replicas."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from quantserve.serve.config import parse_config

from .helpers import APP_NAME, make_test_config, wait_for

PREFIX = "/kill"
KILL_APP = f"{APP_NAME}-kill"
SLOW = {"prompt": "7", "steps": 200, "n": 4, "size": "64x64", "seed": 3}


def _replica_pids() -> list[int]:
    """The processes of the /kill app's variant replicas (Ray titles them ray::ServeReplica:<app>:<deployment>)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"ServeReplica:{KILL_APP}:Diffusion_bf16" in cmd:
            found.append(p.info["pid"])
    return found


@pytest.fixture(scope="module")
def kill_app(ray_cluster, serve_port):
    from ray import serve

    from quantserve.serve.deploy import deploy

    config = make_test_config(serve_port)
    config.update(app_name=KILL_APP, variants=config["variants"][:1], experiment={"weights": {"bf16": 1}})
    deploy(parse_config(config), timeout_s=300, route_prefix=PREFIX)
    url = f"http://127.0.0.1:{serve_port}{PREFIX}"
    wait_for(lambda: requests.get(f"{url}/readyz", timeout=30).status_code == 200, 120, "the /kill app")
    yield url
    serve.delete(KILL_APP)


def test_a_request_whose_replica_is_killed_is_answered_by_another(kill_app):
    started = time.perf_counter()
    alone = requests.post(f"{kill_app}/v1/images/generations", json=SLOW, timeout=120)
    assert alone.status_code == 200, alone.text
    alone_s = time.perf_counter() - started
    [pid] = wait_for(lambda: _replica_pids() or None, 30, "the replica's process")

    results: list[requests.Response] = []

    def send() -> None:
        results.append(requests.post(f"{kill_app}/v1/images/generations", json=SLOW, timeout=180))

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(min(0.5, alone_s / 3))  # the requests are in the replica now
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(200)
    assert [r.status_code for r in results] == [200, 200, 200], [r.text[:300] for r in results]
    assert all(len(r.json()["data"]) == 4 for r in results)
    new = wait_for(lambda: [p for p in _replica_pids() if p != pid] or None, 60, "a new replica")
    assert pid not in new
    # the router saw the replica die under each request and ran it again (its warning, in Ray's session logs)
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    text = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.err"))
    assert text.count("variant bf16: the replica died under a request (ActorDiedError); running it again") >= 3
