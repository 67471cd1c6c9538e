"""Clients that stall their upload cannot lock the API (issue 12 item 2): each gets 408 after limits.body_timeout_s
and frees its Ingress slot. On the real server: an application of its own at /stall whose Ingress takes only two
requests at a time, so two stalled clients would otherwise lock everyone out."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from quantserve.serve.config import parse_config

from .helpers import APP_NAME, make_test_config, wait_for

PREFIX = "/stall"
STALL_APP = f"{APP_NAME}-stall"
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def stall_app(ray_cluster, serve_port):
    from ray import serve

    from quantserve.serve.deploy import deploy

    config = make_test_config(serve_port)
    config.update(app_name=STALL_APP, variants=config["variants"][:1], experiment={"weights": {"bf16": 1}},
                  ingress={"max_ongoing_requests": 2})
    config["limits"]["body_timeout_s"] = TIMEOUT_S
    deploy(parse_config(config), timeout_s=300, route_prefix=PREFIX)
    wait_for(lambda: requests.get(f"http://127.0.0.1:{serve_port}{PREFIX}/readyz", timeout=30).status_code == 200,
             120, "the /stall app")
    yield serve_port
    serve.delete(STALL_APP)


def _stalled(port: int) -> socket.socket:
    """Headers that announce 100 bytes of body, then 10 bytes, then nothing."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"POST {PREFIX}/v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: 100\r\n\r\n".encode() + b'{"prompt":')
    return s


def test_stalled_uploads_time_out_and_others_are_served(stall_app):
    port = stall_app
    stalled = [_stalled(port) for _ in range(4)]  # twice the Ingress's capacity
    try:
        time.sleep(0.5)
        started = time.monotonic()
        ok = requests.post(f"http://127.0.0.1:{port}{PREFIX}/v1/images/generations", timeout=60,
                           json={"prompt": "7", "steps": 2, "size": "16x16"})
        waited = time.monotonic() - started
        assert ok.status_code == 200, ok.text
        assert waited < 4 * TIMEOUT_S + 10, waited  # served once the stalled clients' slots were freed
        for s in stalled:
            answer = s.recv(65536).decode(errors="replace")
            assert answer.startswith("HTTP/1.1 408"), answer[:200]
            assert "limits.body_timeout_s" in answer
    finally:
        for s in stalled:
            s.close()
    assert requests.get(f"http://127.0.0.1:{port}{PREFIX}/healthz", timeout=30).status_code == 200
