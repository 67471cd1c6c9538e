"""Guards in Ray Serve's HTTP proxy, before a request is parsed into an ASGI call or forwarded to the Ingress.

Serve's proxy is uvicorn over httptools, which has no read timeout for request headers and no bound on their size:
a client that opens connections and trickles (or never sends) its headers holds them forever, and a 64 MB header is
read into memory and forwarded. The Ingress can only judge a request once the proxy has read all of it.

Serve calls `install()` in the proxy's process at its start when RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names it
(`quantserve serve` sets that before it starts Ray; the Helm chart sets it in the Ray containers). `install` makes
uvicorn build its connections from GuardedHttpToolsProtocol, which
- answers 408 and closes a connection whose request line and headers have not all arrived `header_timeout_s`
  after it opened or after the request's first byte (idle keep-alive connections stay uvicorn's own timeout);
- answers 431 and closes a connection as soon as the headers it is reading pass `max_header_bytes` or
  `max_headers` lines, before the parser has buffered more.
The figures come from the serve config's `limits` block, handed over as JSON in QUANTSERVE_PROXY_LIMITS (read once,
at the proxy's start: a SIGHUP reload changes the Ingress's limits, not these).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("quantserve.serve")

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
LIMITS_ENV = "QUANTSERVE_PROXY_LIMITS"
CALLBACK = "quantserve.serve.proxy_guard:install"
PROTOCOL = "quantserve.serve.proxy_guard:GuardedHttpToolsProtocol"
HEADER_FIELDS = ("header_timeout_s", "max_header_bytes", "max_headers")


@dataclass(frozen=True)
class HeaderGuard:
    header_timeout_s: float = 10.0
    max_header_bytes: int = 16_384
    max_headers: int = 100


_guard = HeaderGuard()


# How often replicas and handles sample and push their autoscaling metrics to Serve's controller. Ray's default
# push, 10 s, is added to every scale-up's reaction time; a variant's few heavy replicas afford 1 s. Ray 2.60 takes
# the push interval from each deployment's autoscaling_config.metrics_interval_s (deprecated; quantserve's config
# sets it to 1 s, serve/config.py) and ignores the two PUSH_INTERVAL variables below, which are to replace it in a
# later Ray; the sampling factor it does read. A value already in the environment is kept.
AUTOSCALING_ENV = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
                   "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
                   # a sample every look_back_period_s x 0.05 (0.6 s at the default 12 s; Ray's 0.2 gives 2.4 s):
                   # the work policy scales up on the newest sample (serve/autoscaling.py)
                   "RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR": "0.05"}


def proxy_environment(limits: Any) -> dict[str, str]:
    """The environment of a Ray node that serves quantserve: Serve's proxy installs these guards with `limits` (a
    LimitsConfig), and replicas sample and push their autoscaling metrics often (AUTOSCALING_ENV)."""
    return {CALLBACK_ENV: CALLBACK,
            LIMITS_ENV: json.dumps({name: getattr(limits, name) for name in HEADER_FIELDS}),
            **{name: os.environ.get(name, value) for name, value in AUTOSCALING_ENV.items()}}


@contextmanager
def guarded_proxy(limits: Any) -> Iterator[None]:
    """Around `ray.init` of a local instance: its raylet, and so Serve's proxy, inherit proxy_environment(limits);
    this process's environment is put back afterwards."""
    env = proxy_environment(limits)
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def guard_from_environment(environ: dict[str, str] | os._Environ[str] = os.environ) -> HeaderGuard:
    """The guard's figures from QUANTSERVE_PROXY_LIMITS, checked as the config checks them (ValueError naming the
    variable and field); the config's defaults where it is unset or leaves a field out."""
    from pydantic import ValidationError

    from .config import LimitsConfig, format_validation_error

    raw = environ.get(LIMITS_ENV, "").strip()
    try:
        given = json.loads(raw) if raw else {}
        if not isinstance(given, dict):
            raise ValueError("expected a JSON object")
        limits = LimitsConfig.model_validate({k: v for k, v in given.items() if k in HEADER_FIELDS})
    except (ValueError, ValidationError) as exc:
        detail = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise ValueError(f"{LIMITS_ENV}: {detail} (expected JSON with {', '.join(HEADER_FIELDS)})") from None
    return HeaderGuard(*(getattr(limits, name) for name in HEADER_FIELDS))


def install() -> list:
    """Serve's proxy callback: route uvicorn's HTTP protocol to the guarded one. Returns no middleware."""
    global _guard
    import uvicorn.config

    _guard = guard_from_environment()
    for name in ("auto", "httptools"):
        uvicorn.config.HTTP_PROTOCOLS[name] = PROTOCOL
    logger.info("quantserve proxy guard: header timeout %.1f s, at most %d header bytes and %d headers",
                _guard.header_timeout_s, _guard.max_header_bytes, _guard.max_headers)
    return []


def _close_with(protocol: Any, status: int, reason: str, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": "headers",
                                 "code": reason}}).encode()
    phrase = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
    protocol.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, phrase, len(body), body))
    protocol.transport.close()


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools comes with ray[serve] (uvicorn[standard])
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        """uvicorn's httptools protocol with a header read timeout and header bounds (this module's doc)."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._qs_timer: asyncio.TimerHandle | None = None
            self._qs_reset()
            self._qs_arm()

        def _qs_reset(self) -> None:
            self._qs_reading, self._qs_bytes, self._qs_lines, self._qs_tail = True, 0, 0, b""

        def _qs_arm(self) -> None:
            self._qs_cancel()
            self._qs_timer = self.loop.call_later(_guard.header_timeout_s, self._qs_expired)

        def _qs_cancel(self) -> None:
            if self._qs_timer is not None:
                self._qs_timer.cancel()
                self._qs_timer = None

        def _qs_expired(self) -> None:
            self._qs_timer = None
            if self._qs_reading and not self.transport.is_closing():
                _close_with(self, 408, "header_timeout", f"headers: not received within {_guard.header_timeout_s:g} "
                                                          "s (limits.header_timeout_s)")

        def data_received(self, data: bytes) -> None:
            if self._qs_reading:
                # count this request's header bytes and lines up to the blank line that ends them
                buf = self._qs_tail + data
                end = buf.find(b"\r\n\r\n")
                part = data if end < 0 else data[:max(0, end + 4 - len(self._qs_tail))]
                self._qs_bytes += len(part)
                self._qs_lines += part.count(b"\n")
                if self._qs_bytes > _guard.max_header_bytes or self._qs_lines > _guard.max_headers + 1:
                    self._qs_cancel()
                    _close_with(self, 431, "headers_too_large",
                                f"headers: over {_guard.max_header_bytes} bytes or {_guard.max_headers} headers "
                                "(limits.max_header_bytes, limits.max_headers)")
                    return
                if end >= 0:
                    self._qs_reading = False
                else:
                    self._qs_tail = buf[-3:]
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._qs_arm()

        def on_headers_complete(self) -> None:
            self._qs_cancel()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._qs_reset()  # the connection's next bytes are the next request's headers

        def connection_lost(self, exc: Exception | None) -> None:
            self._qs_cancel()
            super().connection_lost(exc)
