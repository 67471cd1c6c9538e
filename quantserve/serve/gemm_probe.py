"""Sampled timing of a model's Linear layers: GEMM throughput (GFLOP/s) per backend and kernel, from real traffic.

While sampling, forward hooks time every nn.Linear and QuantLinear call made by the sampling thread (other threads,
such as a health check running beside it, are not counted) and count 2*M*K*N floating-point operations per call.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GemmSample:
    """Totals for one (backend, kernel) over a sampled run."""

    backend: str
    kernel: str
    calls: int = 0
    flops: float = 0.0
    seconds: float = 0.0

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds / 1e9 if self.seconds > 0 else 0.0


def layer_key(module: nn.Module) -> tuple[str, str] | None:
    """(backend, kernel) of a GEMM layer, or None for modules that are not one."""
    from quantserve.runtime.quant_linear import QuantLinear

    if isinstance(module, QuantLinear):
        return module.backend, module.kernel_name
    if isinstance(module, nn.Linear):
        return "dense", "torch"
    return None


class GemmProbe:
    """Times the GEMM layers of `model` (one module, or several: a pipeline's weight components) during
    `sampling()` blocks; `every` > 0 samples one call in `every`."""

    def __init__(self, model: nn.Module | Sequence[nn.Module], every: int = 20):
        self.models = [model] if isinstance(model, nn.Module) else list(model)
        self.every = every
        self.layers = [(m, key) for root in self.models for m in root.modules() if (key := layer_key(m)) is not None]
        self._count = 0
        self._lock = threading.Lock()

    def due(self) -> bool:
        """Whether the next batch should be timed: the first one, then one in `every` (never when every == 0)."""
        if self.every <= 0:
            return False
        with self._lock:
            due = self._count % self.every == 0
            self._count += 1
        return due

    @contextmanager
    def sampling(self) -> Iterator[dict[tuple[str, str], GemmSample]]:
        """Time the layers while the block runs; the dict fills in as calls complete."""
        results: dict[tuple[str, str], GemmSample] = {}
        starts: dict[int, list[float]] = defaultdict(list)
        thread = threading.get_ident()
        handles = []

        def pre(module: nn.Module, args: tuple) -> None:
            if threading.get_ident() == thread:
                if args and args[0].is_cuda:
                    torch.cuda.synchronize(args[0].device)
                starts[id(module)].append(time.perf_counter())

        def make_post(key: tuple[str, str]):
            def post(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                if threading.get_ident() != thread or not starts[id(module)]:
                    return
                if output.is_cuda:
                    torch.cuda.synchronize(output.device)
                elapsed = time.perf_counter() - starts[id(module)].pop()
                x = args[0]
                k, n = module.in_features, module.out_features
                m = x.numel() // k if k else 0
                by_m = getattr(module, "kernel_for", None)  # a QuantLinear may run another kernel at this M
                ran = (key[0], by_m(m)[0]) if by_m is not None else key
                sample = results.setdefault(ran, GemmSample(*ran))
                sample.calls += 1
                sample.flops += 2.0 * m * k * n
                sample.seconds += elapsed
            return post

        try:
            for module, key in self.layers:
                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(make_post(key)))
            yield results
        finally:
            for handle in handles:
                handle.remove()
