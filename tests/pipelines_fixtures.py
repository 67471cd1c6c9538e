"""Tiny diffusers pipelines built once per test session, for any test to import (a plain module, not a conftest).

    from tests.pipelines_fixtures import tiny_pipeline_dir

    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("flux"))

Each family is built on first use (seed 0, float32 weights, preset "tiny") into one temporary directory per process
that is removed at exit. The directories are shared by every caller: read them, copy them, never modify them.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _cache_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="quantserve-tiny-pipelines-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.lru_cache(maxsize=None)
def tiny_pipeline_dir(family: str) -> Path:
    """The tiny pipeline of `family`, built once per session; a shared directory that callers must not modify."""
    from quantserve.testing.pipelines import build_pipeline

    return build_pipeline(family, _cache_root() / family, preset="tiny", seed=0)
