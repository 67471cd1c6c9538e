"""Test and benchmark helpers: real, small diffusers pipelines built offline with seeded random weights.

`from quantserve.testing import build_pipeline` works; the names load on first use, so that
`python -m quantserve.testing.pipelines` does not import its own module twice.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DTYPES", "FAMILIES", "PRESETS", "build_pipeline", "flux_real_width_configs", "pipeline_spec"]


def __getattr__(name: str) -> Any:
    """Load the public names of quantserve.testing.pipelines on first use."""
    if name in __all__:
        from quantserve.testing import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
