"""Where a load's seconds go: exclusive time per phase, phases nested (a read inside an unpack counts as read).

The loader's phases (`LoadReport.phases`, `PipelineReport.phases`; a replica exports them as cold-start phases):

- imports: the pipeline's and its components' classes (diffusers and transformers import lazily)
- skeleton: config.json, the model class, the empty (meta-device) model, the plan of which layers to quantize
- read: the weights' bytes from the files (memory-mapped and faulted in, or read into a buffer)
- unpack: a pre-quantized layer rebuilt from its stored packed tensors (no arithmetic)
- quantize: a dense layer quantized on load
- to_device: tensors moved to the device and dense ones cast to the compute dtype
- build: the backend's after-load step, kernel routing and the load report
- components: tokenizers, scheduler and the pipeline object
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

LOAD_PHASES = ("imports", "skeleton", "read", "unpack", "quantize", "to_device", "build", "components")


class PhaseTimer:
    """Exclusive seconds per phase: entering a phase pauses the one around it; re-entering the current one is a no-op."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[str] = []
        self._mark = time.perf_counter()

    def _charge(self, now: float) -> None:
        if self._stack:
            name = self._stack[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + (now - self._mark)
        self._mark = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._stack and self._stack[-1] == name:
            yield
            return
        self._charge(time.perf_counter())
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._stack.pop()


def timed(timer: PhaseTimer | None, name: str) -> Any:
    """`timer.phase(name)`, or nothing when there is no timer."""
    return timer.phase(name) if timer is not None else nullcontext()


def merge_phases(*parts: Mapping[str, float]) -> dict[str, float]:
    """Seconds per phase summed over several loads, in LOAD_PHASES order."""
    total: dict[str, float] = {}
    for part in parts:
        for name, seconds in part.items():
            total[name] = total.get(name, 0.0) + seconds
    order = {name: i for i, name in enumerate(LOAD_PHASES)}
    return dict(sorted(total.items(), key=lambda kv: order.get(kv[0], len(order))))


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a start (imports, load, first forward), then on again with what
    the start built moved to the permanent generation (gc.freeze). The imports allocate millions of objects that
    live as long as the process, and the collector would walk them again and again: pausing it cut the digits
    replica's imports and load by about a quarter here (benchmarks/RESULTS.md, "Autoscaling"), and frozen objects
    are never walked by the collections while serving either."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
