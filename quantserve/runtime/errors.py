"""Errors raised by quantserve.runtime: each names the field, the value and what is accepted."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _accepted_text(accepted: Iterable[Any] | str) -> str:
    if isinstance(accepted, str):
        return accepted
    return ", ".join(repr(a) for a in accepted)


class ConfigValueError(ValueError):
    """A config field holds a value outside the accepted set."""

    def __init__(self, owner: str, field: str, value: Any, accepted: Iterable[Any] | str, hint: str = ""):
        self.owner, self.field, self.value = owner, field, value
        self.accepted = accepted if isinstance(accepted, str) else list(accepted)
        message = f"{owner}.{field}: got {value!r}; accepted: {_accepted_text(accepted)}"
        super().__init__(message + (f". {hint}" if hint else ""))


class ConfigTypeError(TypeError):
    """A config field holds a value of the wrong type."""

    def __init__(self, owner: str, field: str, value: Any, expected: str):
        self.owner, self.field, self.value, self.expected = owner, field, value, expected
        super().__init__(f"{owner}.{field}: expected {expected}, got {type(value).__name__} {value!r}")


class BackendUnavailableError(RuntimeError):
    """The backend a config names cannot run here: a package is missing or too old, or the device lacks a feature."""
