"""The proxy guard (quantserve/serve/proxy_guard.py) on a real uvicorn server over loopback sockets: a header read
timeout, header bounds before the parser buffers them, and ordinary traffic untouched. The same guard inside Serve's
proxy is tested against the running app in test_stalled_clients.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from quantserve.serve import proxy_guard
from quantserve.serve.config import LimitsConfig

from .helpers import free_port

TIMEOUT_S = 1.0


async def _app(scope, receive, send) -> None:  # noqa: ANN001 - a bare ASGI app
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = json.dumps({"path": scope["path"], "body_bytes": size, "headers": len(scope["headers"])}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def server(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[int]:
    import uvicorn
    import uvicorn.config

    monkeypatch_module.setenv(proxy_guard.LIMITS_ENV, json.dumps({"header_timeout_s": TIMEOUT_S,
                                                                  "max_header_bytes": 2048, "max_headers": 16}))
    # install() rewrites uvicorn's protocol table, as it does in Serve's proxy; the test puts it back afterwards
    monkeypatch_module.setattr(uvicorn.config, "HTTP_PROTOCOLS", dict(uvicorn.config.HTTP_PROTOCOLS))
    assert proxy_guard.install() == []
    port = free_port()
    config = uvicorn.Config(_app, host="127.0.0.1", port=port, lifespan="off", log_level="critical",
                            timeout_keep_alive=30)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    assert config.http_protocol_class is proxy_guard.GuardedHttpToolsProtocol
    yield port
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_ordinary_requests_pass(server: int) -> None:
    r = requests.post(f"http://127.0.0.1:{server}/x", data=b"z" * 100_000, timeout=10)  # a body is not a header
    assert r.status_code == 200 and r.json() == {"path": "/x", "body_bytes": 100_000, "headers": 6}
    with requests.Session() as s:  # keep-alive: every request on the connection gets its own count and clock
        for _ in range(3):
            assert s.get(f"http://127.0.0.1:{server}/", headers={f"x-{i}": "v" * 50 for i in range(10)},
                         timeout=10).status_code == 200
            time.sleep(TIMEOUT_S * 0.6)


def test_stalled_headers_get_408_while_others_are_served(server: int) -> None:
    stalled = [_connect(server) for _ in range(8)]
    for i, sock in enumerate(stalled):
        if i % 2:  # half send part of their headers, half nothing at all
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    start = time.monotonic()
    assert requests.get(f"http://127.0.0.1:{server}/", timeout=10).status_code == 200
    answers = [_read_all(sock) for sock in stalled]
    elapsed = time.monotonic() - start
    for sock in stalled:
        sock.close()
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers
    assert json.loads(answers[1].split(b"\r\n\r\n", 1)[1])["error"]["code"] == "header_timeout"
    assert TIMEOUT_S * 0.8 < elapsed < TIMEOUT_S + 5


def test_trickled_headers_time_out_from_the_first_byte(server: int) -> None:
    sock = _connect(server)
    sock.sendall(b"GET / HTTP/1.1\r\n")
    start = time.monotonic()
    try:
        while time.monotonic() - start < TIMEOUT_S * 4:
            sock.sendall(b"X-A: b\r\n")  # a byte stream that never ends its headers
            time.sleep(0.1)
        pytest.fail("the trickling connection was never closed")
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    assert time.monotonic() - start < TIMEOUT_S + 2


def test_oversized_headers_get_431_before_they_are_read(server: int) -> None:
    sock = _connect(server)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096)
    answer = _read_all(sock)  # answered and closed although the header line never ended
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["param"] == "headers"
    r = requests.get(f"http://127.0.0.1:{server}/", headers={f"x-{i}": "1" for i in range(40)}, timeout=10)
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"


def test_guard_figures_come_from_the_config_and_are_checked() -> None:
    env = proxy_guard.proxy_environment(LimitsConfig(max_header_bytes=4096, header_timeout_s=3))
    assert env[proxy_guard.CALLBACK_ENV] == proxy_guard.CALLBACK
    assert proxy_guard.guard_from_environment(env) == proxy_guard.HeaderGuard(3.0, 4096, 100)
    assert proxy_guard.guard_from_environment({}) == proxy_guard.HeaderGuard()
    with pytest.raises(ValueError, match=r"QUANTSERVE_PROXY_LIMITS: .*max_header_bytes"):
        proxy_guard.guard_from_environment({proxy_guard.LIMITS_ENV: '{"max_header_bytes": 3}'})
    with pytest.raises(ValueError, match="QUANTSERVE_PROXY_LIMITS: expected a JSON object"):
        proxy_guard.guard_from_environment({proxy_guard.LIMITS_ENV: "[1]"})
    with pytest.raises(ValueError, match="QUANTSERVE_PROXY_LIMITS"):
        proxy_guard.guard_from_environment({proxy_guard.LIMITS_ENV: "{nope"})
