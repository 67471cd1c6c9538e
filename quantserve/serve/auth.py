"""Optional API keys for the HTTP API, checked as OpenAI's clients send them: `Authorization: Bearer <key>`.

Keys come from any of: the config's `auth.api_keys` (each a key, or `sha256:<hex digest>` so the file need not hold
the key itself), a file named by `auth.api_keys_file` (one key per line; `#` comments; e.g. a mounted Kubernetes
Secret), and the environment variable QUANTSERVE_API_KEY (comma-separated) of the Ingress replicas. With none
configured the API is open. Only SHA-256 digests are kept and passed between processes; a presented key is hashed
and compared with every digest in constant time (`hmac.compare_digest`, no early exit), and no key or digest is ever
logged or echoed. /healthz and /readyz stay open for probes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

ENV_VAR = "QUANTSERVE_API_KEY"
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
DIGEST_PREFIX = "sha256:"
MIN_KEY_CHARS = 16


class AuthError(ValueError):
    """A key source that cannot be used: names the source, never the key."""


def digest(key: str) -> str:
    """The SHA-256 hex digest of a key (what the config may hold instead of the key: `sha256:<digest>`)."""
    return hashlib.sha256(key.encode()).hexdigest()


def _entry_digest(entry: str, where: str) -> str:
    entry = entry.strip()
    if entry.startswith(DIGEST_PREFIX):
        hexd = entry[len(DIGEST_PREFIX):].lower()
        if len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
            raise AuthError(f"{where}: a '{DIGEST_PREFIX}' entry needs 64 hex digits")
        return hexd
    if len(entry) < MIN_KEY_CHARS or any(c.isspace() for c in entry):
        raise AuthError(f"{where}: an API key needs at least {MIN_KEY_CHARS} characters and no spaces")
    return digest(entry)


def config_digests(entries: Iterable[str], where: str = "auth.api_keys") -> list[str]:
    """Digests of the config's entries (keys or sha256:<hex>); AuthError names the entry's index."""
    return [_entry_digest(e, f"{where}.{i}") for i, e in enumerate(entries)]


def file_digests(path: str | os.PathLike[str]) -> list[str]:
    """Digests of the keys in a file: one per line, blank lines and `#` comments skipped."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise AuthError(f"auth.api_keys_file: cannot read {path}: {exc.strerror or exc}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(_entry_digest(line, f"auth.api_keys_file {path} line {n}"))
    return out


class ApiKeys:
    """The accepted keys, as digests; `allows` checks an Authorization header value."""

    def __init__(self, digests: Iterable[str] = ()) -> None:
        self._digests = tuple(sorted({bytes.fromhex(d) for d in digests}))

    @classmethod
    def load(cls, digests: Iterable[str] = (), file: str | None = None,
             environ: Mapping[str, str] | None = None) -> ApiKeys:
        """Every source together: the config's digests, the file's keys, $QUANTSERVE_API_KEY."""
        environ = os.environ if environ is None else environ
        all_digests = list(digests)
        if file:
            all_digests += file_digests(file)
        env = environ.get(ENV_VAR, "")
        all_digests += [_entry_digest(k, ENV_VAR) for k in env.split(",") if k.strip()]
        return cls(all_digests)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def hex_digests(self) -> list[str]:
        """The digests (SHA-256 of the keys, never the keys), e.g. to derive a signing key from."""
        return [d.hex() for d in self._digests]

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:  # never the digests
        return f"ApiKeys({len(self._digests)} keys)"

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header value carries an accepted key (`Bearer <key>`, scheme in any case)."""
        if not self._digests:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        presented = hashlib.sha256(token.strip().encode()).digest()
        ok = False
        for d in self._digests:  # every digest compared: the time does not depend on which one matched
            ok |= hmac.compare_digest(d, presented)
        return ok


__all__ = ["ApiKeys", "AuthError", "DIGEST_PREFIX", "ENV_VAR", "OPEN_PATHS", "config_digests", "digest",
           "file_digests"]
