"""Shared fixtures: the shipped pipeline, loaded once per test session."""

from __future__ import annotations

import pytest
import torch

from quantserve.default_model import DigitsPipeline, load_default_pipeline


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    """One torch thread: this tiny model gains nothing from two, and on a busy 2-core machine two threads
    spin against other jobs and run ~20x slower (0.5 s vs 11 s for 50 digits)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pipe() -> DigitsPipeline:
    """The default (bf16) pipeline over the shipped weights."""
    return load_default_pipeline()
