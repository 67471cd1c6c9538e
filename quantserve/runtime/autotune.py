"""The autotuner: time every runnable kernel on this device for a model's distinct layer shapes, keep the fastest.

Results live in a JSON cache keyed by device (name, compute capability) and library versions, under
$QUANTSERVE_CACHE_DIR (default: the user cache directory). A warm start finds every key there, tunes nothing and
rewrites nothing. A candidate whose output strays from the torch reference is rejected, never chosen.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..kernels.atomic_write import atomic_write_text
from .quant_linear import QuantLinear, reference_kernel
from .router import KernelPolicy, quant_layers, route, runnable_candidates, shape_key

CACHE_FILE = "autotune.json"


def cache_dir() -> Path:
    """$QUANTSERVE_CACHE_DIR, else the user cache directory (e.g. ~/.cache/quantserve)."""
    configured = os.environ.get("QUANTSERVE_CACHE_DIR")
    if configured:
        return Path(configured)
    import platformdirs

    return Path(platformdirs.user_cache_dir("quantserve"))


def _version(dist: str) -> str:
    from .requirements import installed_version

    return installed_version(dist) or "-"


def device_info(device: torch.device | str) -> dict[str, Any]:
    """What identifies this machine for tuning: device name, compute capability and SM count, library versions."""
    device = torch.device(device)
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "triton": _version("triton"),
                            "quantserve": _version("quantserve")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count)
    else:
        import platform

        info.update(name=platform.processor() or platform.machine(), capability="-", sm_count=os.cpu_count())
    return info


def device_key(device: torch.device | str) -> str:
    info = device_info(device)
    return "|".join(f"{k}={info[k]}" for k in ("type", "name", "capability", "torch", "triton", "quantserve"))


class TuneCache:
    """The JSON cache file: {device_key: {shape_key: {"winner": name, "timings_ms": {...}, "rejected": {...}}}}."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / CACHE_FILE
        self.data: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.data = {}  # a damaged cache is only a cold start; it is rewritten whole on the next save

    def entries(self, device: torch.device | str) -> dict[str, Any]:
        return self.data.setdefault(device_key(device), {})

    def save(self) -> None:
        """Atomic write: a crash mid-write leaves the previous cache file intact."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True))

    def reload(self) -> None:
        """Merge what other processes wrote since this one read the file (theirs win for keys both hold)."""
        if self.path.is_file():
            try:
                disk = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                return
            for device, entries in disk.items():
                if isinstance(entries, dict):
                    self.data.setdefault(device, {}).update(entries)

    @contextmanager
    def locked(self, timeout_s: float) -> Iterator[bool]:
        """Hold the cache's lock file (flock) while tuning, so replicas starting together on one machine tune once:
        the second waits, then finds the first one's results. Yields False when the lock was not had in time."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(0.2)
            try:
                self.reload()
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass
class TuneResult:
    key: str
    winner: str
    timings_ms: dict[str, float]
    rejected: dict[str, str] = field(default_factory=dict)
    cached: bool = False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SLOW_CALL_MS = 100.0  # a candidate whose first call takes longer is timed with fewer repeats


def time_kernel(fn, device: torch.device, warmup: int = 2, repeats: int = 7) -> float:
    """Median milliseconds of `fn()` after warm-up (CUDA events on a GPU, perf_counter on a CPU). A call slower than
    SLOW_CALL_MS (a dequantize-everything path on a big layer) gets one warm-up and three repeats: it is not going
    to win, and its median of three is still a fair figure."""
    start = time.perf_counter()
    fn()
    _sync(device)
    if (time.perf_counter() - start) * 1e3 > SLOW_CALL_MS:
        warmup, repeats = 0, min(repeats, 3)
    for _ in range(max(0, warmup - 1)):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def tolerance(layer: QuantLinear, dtype: torch.dtype) -> float:
    """How far a kernel's output may stray from the reference: set by the accumulation and activation precision."""
    return {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}.get(dtype, 3e-2)


def tune_layer(layer: QuantLinear, name: str, m: int, device: torch.device, policy: KernelPolicy | None = None,
               dtype: torch.dtype | None = None) -> TuneResult:
    """Time every runnable candidate for one layer shape; reject any that disagrees with the reference."""
    dtype = dtype or layer.compute_dtype or torch.bfloat16
    x = torch.randn(m, layer.in_features, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    ok, rejected = runnable_candidates(layer, device, name, policy)
    with torch.no_grad():
        expected = reference_kernel(x, layer.qweight, layer.bias).float()
        scale = expected.norm().clamp_min(1e-6)
        timings: dict[str, float] = {}
        for candidate in ok:
            try:
                got = candidate.kernel(x, layer.qweight, layer.bias).float()
            except Exception as exc:  # a kernel that fails on this shape is rejected, not fatal
                rejected[candidate.name] = f"raised {type(exc).__name__}: {exc}"
                continue
            error = float((got - expected).norm() / scale)
            if not error <= tolerance(layer, dtype) and candidate.name != "reference":
                rejected[candidate.name] = f"output strays from the reference (relative error {error:.2e})"
                continue
            timings[candidate.name] = time_kernel(lambda c=candidate: c.kernel(x, layer.qweight, layer.bias), device)
    winner = min(timings, key=timings.get)
    return TuneResult(shape_key(layer, m), winner, timings, rejected)


Problems = dict[str, tuple[str, QuantLinear, int]]  # shape key -> (a layer's name, the layer, an M of its bucket)


def model_problems(model: nn.Module, m_values: list[int]) -> Problems:
    """Every distinct (format, N, K, M bucket) of `model`'s quantized layers at these M values."""
    problems: Problems = {}
    for name, layer in quant_layers(model):
        for m in m_values:
            problems.setdefault(shape_key(layer, m), (name, layer, m))
    return problems


logger = logging.getLogger("quantserve.runtime")


def tune_problems(problems: Problems, device: torch.device, cache: TuneCache, policy: KernelPolicy | None = None,
                  progress: bool = False, budget_s: float | None = None,
                  on_progress: Callable[[int, int, str], None] | None = None) -> tuple[list[TuneResult], list[str]]:
    """Tune the problems the cache lacks for this device, under the cache's lock (another process tuning the same
    cache is waited for, and its results are used), within `budget_s` seconds of tuning (None: no bound).
    Returns (results, the keys left untuned because the budget ran out). The cache file is written only when
    something new was tuned, and after every problem, so a replica stopped midway keeps what it tuned."""
    from tqdm.auto import tqdm

    wait_s = (budget_s if budget_s is not None else 3600.0) + 60.0
    with cache.locked(wait_s) as have_lock:
        entries = cache.entries(device)
        results = [TuneResult(k, e["winner"], e.get("timings_ms", {}), e.get("rejected", {}), True)
                   for k, e in entries.items() if k in problems]
        todo = {k: v for k, v in problems.items() if k not in entries}
        if not have_lock:
            logger.warning("autotune: the cache %s stayed locked for %.0f s; tuning nothing here", cache.path, wait_s)
            return results, list(todo)
        start, skipped = time.monotonic(), []
        bar = tqdm(todo.items(), desc="autotune", unit="shape", disable=not progress or not todo)
        for i, (key, (name, layer, m)) in enumerate(bar):
            if budget_s is not None and time.monotonic() - start >= budget_s:
                skipped = list(todo)[i:]
                break
            result = tune_layer(layer, name, m, device, policy)
            entries[key] = {"winner": result.winner, "timings_ms": result.timings_ms, "rejected": result.rejected}
            results.append(result)
            cache.save()
            if on_progress is not None:
                on_progress(i + 1, len(todo), key)
        bar.close()
    return results, skipped


def autotune(model: nn.Module, m_values: list[int], device: torch.device | str | None = None,
             cache: TuneCache | None = None, policy: KernelPolicy | None = None, progress: bool = False) -> list[TuneResult]:
    """Tune every distinct (format, N, K, M bucket) of `model` for each M, store winners, route the model (each
    layer runs its bucket's winner when the winners differ by M).

    Keys already in the cache are not tuned again; the cache file is written only when something new was tuned.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cache = cache or TuneCache()
    results, _ = tune_problems(model_problems(model, m_values), device, cache, policy, progress)
    route(model, device, m=max(m_values), policy=policy, cache=cache.entries(device))
    return results


def prefill_triton(model: nn.Module, m_values: list[int], targets: list[str], progress: bool = False) -> dict[str, int]:
    """Fill Triton's cache (TRITON_CACHE_DIR) for GPU `targets` (kernels.aot.TARGETS names) with every compile
    `model`'s quantized layers make at these M values (kernels.prefill), on any machine; returns compiles per
    target. Layers with no packed format (no quantserve kernel) are skipped."""
    from tqdm.auto import tqdm

    from ..kernels.formats import FormatError
    from ..kernels.prefill import warm_packed
    from .backends.base import NoPackedFormat

    problems: dict[tuple, tuple[Any, torch.dtype, bool]] = {}
    for _, layer in quant_layers(model):
        try:
            packed = layer.qweight.packed()
        except (NoPackedFormat, FormatError):
            continue
        dtype = layer.compute_dtype or (layer.bias.dtype if layer.bias is not None else torch.bfloat16)
        if dtype not in (torch.bfloat16, torch.float16):
            dtype = torch.bfloat16
        key = (layer.qweight.fmt, layer.out_features, layer.in_features, dtype, layer.bias is not None)
        problems.setdefault(key, (packed, dtype, layer.bias is not None))
    names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    made = {t: 0 for t in targets}
    todo = [(t, p) for t in targets for p in problems.values()]
    for target, (packed, dtype, bias) in tqdm(todo, desc="triton prefill", unit="layer shape",
                                              disable=not progress or not todo):
        made[target] += warm_packed(packed, target, m_values, (names[dtype],), bias)
    return made


def tokens_for(model: nn.Module, resolution: int, batch: int) -> int:
    """Rows (M) a transformer's Linear layers see for one image batch at `resolution` pixels of latent/pixel space."""
    config = getattr(model, "config", None)
    patch = int(getattr(config, "patch_size", 1) or 1)
    side = max(1, resolution // patch)
    return batch * side * side
