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


# --- headers (issue 12 items 2 and 3): Serve's proxy itself times out and bounds them (serve/proxy_guard.py) -------

HEADER_TIMEOUT_S = 3.0  # the session proxy's limits.header_timeout_s (tests/serve/helpers.make_test_config)


def test_stalled_headers_get_408_from_the_proxy_while_others_are_served(app):
    port = app.port
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(64)]
    for i, s in enumerate(stalled):
        if i % 2:  # half stop inside their headers, half never send a byte
            s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: ")
    try:
        started = time.monotonic()
        assert requests.get(f"{app.url}/healthz", timeout=30).status_code == 200
        ok = app.post({"prompt": "7", "steps": 2, "size": "16x16"})
        assert ok.status_code == 200, ok.text
        answers = [s.recv(65536) for s in stalled]
        waited = time.monotonic() - started
    finally:
        for s in stalled:
            s.close()
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), {a[:60] for a in answers}
    assert b"limits.header_timeout_s" in answers[1]
    assert waited < HEADER_TIMEOUT_S + 15, waited


def test_oversized_headers_are_refused_before_they_are_read(app):
    s = socket.create_connection(("127.0.0.1", app.port), timeout=30)
    try:  # a header line that never ends: only the proxy can answer it (the Ingress never sees a request)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 17_000)  # just over 16 KiB
        answer = s.recv(65536)
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b'"param": "headers"' in answer and b"limits.max_header_bytes" in answer
    r = requests.get(f"{app.url}/healthz", headers={f"x-h{i}": "1" for i in range(150)}, timeout=30)
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
