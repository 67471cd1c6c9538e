"""Deploy-time autotune: a variant's replica tunes, at start, the kernel problems its serving implies.

Which problems: the replica runs one real 1-step, 1-image generation at the variant's default size (its family's
probe prompt) and records the rows (M) every quantized Linear layer sees; a request of k images (k up to the
batch's `max_batch_images`, and twice that under classifier-free guidance) multiplies them. Each (format, N, K,
M bucket) the autotune cache lacks for this device is timed (runtime/autotune.py), within `autotune.budget_s`,
under the cache file's lock: replicas of a variant starting together on one machine tune once, and the second
finds the first one's winners. Then every layer is routed again, each M bucket to its winner.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from quantserve.runtime.autotune import Problems, TuneCache, tune_problems
from quantserve.runtime.quant_linear import QuantLinear
from quantserve.runtime.router import KernelPolicy, quant_layers, route, shape_key

from .config import VariantConfig
from .protocol import ServedPipeline

logger = logging.getLogger("quantserve.serve")


def observed_rows(engine: ServedPipeline) -> dict[int, tuple[str, QuantLinear, set[int]]]:
    """id(layer) -> (name, layer, the rows it saw) during one 1-step, 1-image generation at the default size."""
    seen: dict[int, tuple[str, QuantLinear, set[int]]] = {}
    hooks = []
    for module in engine.modules:
        for name, layer in quant_layers(module):
            entry = seen.setdefault(id(layer), (name, layer, set()))

            def record(_mod: Any, args: tuple, rows: set[int] = entry[2]) -> None:
                x = args[0]
                rows.add(int(x.numel() // max(1, x.shape[-1])))

            hooks.append(layer.register_forward_pre_hook(record))
    try:
        job = engine.normalize({"prompt": engine.probe_prompt, "n": 1, "steps": 1, "seed": 0})
        engine.run([job])
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def serving_problems(engine: ServedPipeline, max_images: int) -> Problems:
    """Every (format, N, K, M bucket) the variant's layers see for 1..max_images images, with and without CFG."""
    problems: Problems = {}
    for name, layer, rows in observed_rows(engine).values():
        for r in sorted(rows):
            for k in range(1, 2 * max_images + 1):
                problems.setdefault(shape_key(layer, r * k), (name, layer, r * k))
    return problems


def tune_on_start(engine: ServedPipeline, config: VariantConfig, device: str) -> dict[str, Any]:
    """Tune what the cache lacks (progress in the log), route again; a summary for /v1/models."""
    settings = config.autotune
    summary: dict[str, Any] = {"on_start": settings.on_start, "budget_s": settings.budget_s}
    if not settings.on_start:
        return summary
    start = time.monotonic()
    dev = torch.device(device)
    problems = serving_problems(engine, config.batching.max_batch_images)
    cache = TuneCache()
    policy = KernelPolicy.from_dict(config.kernel_policy or None).merged(KernelPolicy.from_env())
    variant = config.name

    def progress(done: int, total: int, key: str) -> None:
        logger.info("variant %s: autotune %d/%d %s (%.1f s)", variant, done, total, key, time.monotonic() - start)

    logger.info("variant %s: autotune of %d problems on %s (cache %s, budget %.0f s)", variant, len(problems),
                device, cache.path, settings.budget_s)
    results, skipped = tune_problems(problems, dev, cache, policy, budget_s=settings.budget_s, on_progress=progress)
    entries = cache.entries(dev)
    for module in engine.modules:
        route(module, dev, policy=policy, cache=entries)
    fresh = [r for r in results if not r.cached]
    summary.update(problems=len(problems), tuned=len(fresh), cached=len(results) - len(fresh), over_budget=len(skipped),
                   seconds=round(time.monotonic() - start, 2), cache=str(cache.path),
                   winners={r.key: r.winner for r in sorted(results, key=lambda r: r.key)})
    logger.info("variant %s: autotune done: %d tuned, %d from the cache, %d left over budget, %.1f s", variant,
                len(fresh), summary["cached"], len(skipped), summary["seconds"])
    return summary
