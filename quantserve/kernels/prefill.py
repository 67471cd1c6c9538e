"""Fill Triton's on-disk cache for named GPU targets ahead of time, on a machine without a GPU.

A GPU replica compiles each Triton kernel x autotune config at its first launch (about a second each, hundreds of
them for one model: benchmarks/RESULTS.md measures it). Triton looks a launch up in its cache
(TRITON_CACHE_DIR, default ~/.triton/cache) by a key made of the kernel's source, its specialization (argument
types, 16-byte alignment, integers divisible by 16 or equal to 1, constexprs), the compile options and the target.
This module makes those launches here, through Triton's own launcher in warm-up mode (`JITFunction.warmup`, the
autotuner's `warmup`: compile, no launch) with Triton's driver answering for the target GPU instead of a CUDA
device. The arguments are those `triton_matmul.linear` and `triton_dequant.dequantize` pass (their `launches`),
so the keys are the ones the GPU computes; a replica started with the filled cache finds every compile there.

What a launch is specialized on, and so what a prefill must cover, is the format and its constants, the
activation dtype, bias or not, and M's class (1, a multiple of 16, neither) on each kernel path (split-K for
M <= 16, tiled above); N and K only through divisibility by 16, so one set of FLUX shapes stands for every
FLUX linear.

    python -m quantserve.kernels.prefill --targets sm_90 --formats nf4,gguf_Q4_K
    quantserve autotune MODEL_DIR --triton-targets sm_80,sm_90   (the formats of a model's own layers)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# M values whose launches a FLUX deployment makes: 1 (a single text or timestep row: constant 1), 16 (split-K,
# a multiple of 16), 6 (split-K, not), 4096 (the image tokens of 1024 px: tiled, a multiple of 16), 4104 (tiled,
# not: 4096 image + 8 extra tokens)
DEFAULT_MS = (1, 6, 16, 4096, 4104)
FLUX_N, FLUX_K = 3072, 3072


class _TargetDriver:
    """Triton's active driver while prefilling: answers for a GPU target (its device key, stream and
    GPUTarget); only compiles happen under it, never a launch."""

    def __init__(self, real: Any, name: str, capability: int) -> None:
        from triton.backends.compiler import GPUTarget

        self._real = real
        self.device = f"prefill:{name}"
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self) -> str:
        return self.device

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextmanager
def target_driver(name: str):
    """Within: Triton compiles for target `name` (sm_80, sm_90, ...; kernels.aot.TARGETS) as if it were the GPU."""
    from triton.runtime import driver

    from .aot import TARGETS

    if name not in TARGETS:
        raise ValueError(f"target {name!r}; accepted: {', '.join(TARGETS)}")
    previous = driver._active
    try:
        real = driver.active
    except RuntimeError:  # no GPU driver at all on this machine: nothing is delegated
        real = None
    driver.set_active(_TargetDriver(real, name, TARGETS[name].capability))
    try:
        yield
    finally:
        driver._active = previous


@dataclass
class Prefilled:
    target: str
    fmt: str
    compiles: int
    seconds: float


def _check_compiled() -> None:
    from . import triton_common

    if triton_common.INTERPRETED:
        raise RuntimeError("prefill: quantserve's Triton kernels were imported with TRITON_INTERPRET=1; prefill "
                           "compiles them for a GPU, so run it without TRITON_INTERPRET")


def warm_packed(packed: Any, target: str, ms: Iterable[int] = DEFAULT_MS, dtypes: Sequence[str] = ("bf16",),
                bias: bool = True, sm_count: int = 132) -> int:
    """Compile, for `target`, every launch `linear` and `dequantize` make for `packed` (a packed weight on the CPU)
    at each M and activation dtype, every autotune config the autotuner would try; returns the compiles made (a
    compile found in the cache counts too)."""
    import torch

    from . import triton_dequant, triton_matmul
    from .aot import TARGETS
    from .triton_args import tile_args

    _check_compiled()
    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    capability = divmod(TARGETS[target].capability, 10)
    args = tile_args(packed, capability=capability)
    n, k = args.shape
    compiles = 0
    with target_driver(target):
        for dtype_name in dtypes:
            dtype = torch_dtypes[dtype_name]
            for m in sorted(set(ms)):
                x2 = torch.empty((m, k), dtype=dtype)
                out = torch.empty((m, n), dtype=dtype)
                b = torch.empty(n, dtype=dtype) if bias else None
                for kernel, grid, launch_args, launch_kwargs in triton_matmul.launches(x2, args, b, out,
                                                                                      sm_count=sm_count):
                    made = kernel.warmup(*launch_args, grid=grid, **launch_kwargs)
                    compiles += len(made) if isinstance(made, list) else 1
            dense = torch.empty((n, k), dtype=dtype)
            made = triton_dequant._dequant_kernel.warmup(dense, dense.stride(0), N=n, K=k, grid=(1, 1),
                                                         **args.kwargs())
            compiles += len(made)
    return compiles


def _warm_format(target: str, fmt: str, ms: Sequence[int], dtypes: Sequence[str], bias: bool) -> Prefilled:
    from .aot import packed_format

    start = time.perf_counter()
    count = warm_packed(packed_format(fmt, FLUX_N), target, ms, dtypes, bias)
    return Prefilled(target, fmt, count, time.perf_counter() - start)


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def prefill(targets: Sequence[str], formats: Sequence[str], ms: Sequence[int] = DEFAULT_MS,
            dtypes: Sequence[str] = ("bf16",), bias: bool = True, jobs: int = 2,
            progress: bool = True) -> list[Prefilled]:
    """Fill Triton's cache (TRITON_CACHE_DIR) for every target x format at the FLUX linear shape, in `jobs`
    worker processes (fresh interpreters: the kernels compiled, not interpreted)."""
    import multiprocessing

    from tqdm import tqdm

    from .aot import TARGETS, format_names

    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"targets: unknown {', '.join(unknown)}; accepted: {', '.join(TARGETS)}")
    unknown = sorted(set(formats) - set(format_names()))
    if unknown:
        raise ValueError(f"formats: unknown {', '.join(unknown)}; accepted: {', '.join(format_names())}")
    jobs_list = [(t, f) for t in targets for f in formats]
    done: dict[tuple[str, str], Prefilled] = {}
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        futures = {pool.submit(_warm_format, t, f, tuple(ms), tuple(dtypes), bias): (t, f) for t, f in jobs_list}
        with tqdm(total=len(futures), desc="triton prefill", unit="format", disable=not progress,
                  file=sys.stderr) as bar:
            for future in as_completed(futures):
                result = future.result()
                done[(result.target, result.fmt)] = result
                bar.set_postfix_str(f"{result.target} {result.fmt}", refresh=False)
                bar.update()
    return [done[j] for j in jobs_list]


def main(argv: Sequence[str] | None = None) -> int:
    from .aot import DEFAULT_TARGETS, TARGETS, format_names

    parser = argparse.ArgumentParser(prog="python -m quantserve.kernels.prefill",
                                     description=__doc__.split("\n\n")[0] + " Compiles go to TRITON_CACHE_DIR "
                                     "(default ~/.triton/cache); copy that directory to the GPU machines, or set "
                                     "it in the image (the Dockerfile does).")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help=f"comma-separated, of {', '.join(TARGETS)} (default {','.join(DEFAULT_TARGETS)})")
    parser.add_argument("--formats", default="all", help="comma-separated packed format names, or all (default)")
    parser.add_argument("--m", default=",".join(map(str, DEFAULT_MS)),
                        help=f"the M values (rows per linear) to cover (default {','.join(map(str, DEFAULT_MS))})")
    parser.add_argument("--dtypes", default="bf16", help="activation dtypes, of bf16, fp16 (default bf16)")
    parser.add_argument("--no-bias", action="store_true", help="layers without bias (default: with)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def split(text: str) -> list[str]:
        return [s.strip() for s in text.split(",") if s.strip()]

    formats = list(format_names()) if args.formats == "all" else split(args.formats)
    try:
        ms = [int(m) for m in split(args.m)]
    except ValueError:
        parser.error(f"--m: {args.m!r}; expected comma-separated positive integers")
    if not ms or min(ms) < 1:
        parser.error(f"--m: {args.m!r}; expected comma-separated positive integers")
    bad = sorted(set(split(args.dtypes)) - {"bf16", "fp16"})
    if bad:
        parser.error(f"--dtypes: unknown {', '.join(bad)}; accepted: bf16, fp16")
    try:
        start = time.perf_counter()
        results = prefill(split(args.targets), formats, ms, split(args.dtypes), not args.no_bias, args.jobs,
                          not args.no_progress)
    except ValueError as exc:
        parser.error(str(exc))
    wall = time.perf_counter() - start
    for r in results:
        print(f"{r.target} {r.fmt}: {r.compiles} compiles in {r.seconds:.1f} s")
    total = sum(r.compiles for r in results)
    print(f"{total} compiles, {wall:.0f} s wall, cache {os.environ.get('TRITON_CACHE_DIR') or '~/.triton/cache'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
