"""A minimal HTTP client of quantserve's images API (standard library only): the endpoint URL, a JSON POST, errors.

`quantserve generate --url` and `quantserve loadtest` use it; it needs neither Ray nor a running Ray instance.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


def api_base(url: str) -> str:
    """http://host:port[/prefix] from a base URL given with or without a trailing /v1."""
    url = url.rstrip("/")
    if not re.match(r"^https?://", url):
        raise ValueError(f"--url: expected http://HOST:PORT, got {url!r}")
    return url[:-3] if url.endswith("/v1") else url


def generations_url(url: str) -> str:
    """The generations endpoint under a base URL given as http://host:port, .../v1 or the endpoint itself."""
    url = url.rstrip("/")
    if url.endswith("/images/generations"):
        return url
    return api_base(url) + "/v1/images/generations"


def post_json(url: str, body: dict[str, Any], timeout: float, headers: dict[str, str] | None = None
              ) -> tuple[int, dict[str, str], bytes]:
    """POST a JSON body; (status, headers, body) for any HTTP status, OSError for network failures."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def get_json(url: str, timeout: float, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """GET a JSON document: (status, parsed body or the raw bytes when it is not JSON); OSError for network failures."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return status, body


def error_message(body: bytes) -> str:
    """The message of an API error body ({"error": {"message": ...}}), else the body's first 300 bytes."""
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:300].decode("utf-8", "replace")
