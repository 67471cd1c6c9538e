"""The packages a backend needs, and whether this machine has them at a recent enough version."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from packaging.version import InvalidVersion, Version


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Requirement:
    """One package a backend needs: its PyPI name, the oldest version that works, and why it is needed."""

    distribution: str
    minimum: str | None = None
    reason: str = ""

    @property
    def spec(self) -> str:
        return f"{self.distribution}>={self.minimum}" if self.minimum else self.distribution

    def installed(self) -> str | None:
        return installed_version(self.distribution)

    def problem(self) -> str | None:
        """None when satisfied, else a sentence that says what is wrong and how to fix it."""
        found = self.installed()
        why = f" ({self.reason})" if self.reason else ""
        if found is None:
            return f"{self.spec} is required{why} but not installed: pip install '{self.spec}'"
        if self.minimum is None:
            return None
        try:
            too_old = Version(found) < Version(self.minimum)
        except InvalidVersion:
            return None
        if too_old:
            return f"{self.spec} is required{why}; found {found}: pip install -U '{self.spec}'"
        return None
