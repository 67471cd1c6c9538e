"""Kernels by M bucket, the shared autotune cache under its lock, and the tuning budget (issue 13)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from quantserve.runtime.autotune import TuneCache, model_problems, tune_problems
from quantserve.runtime.loader import load_model
from quantserve.runtime.quant_linear import QuantLinear, reference_kernel
from quantserve.runtime.router import quant_layers, route, shape_key

from .tiny_models import save_tiny


@pytest.fixture(scope="module")
def nf4_model(tmp_path_factory):
    folder = save_tiny("dit", tmp_path_factory.mktemp("b") / "dit")
    return load_model(folder, "nf4")


def _layer(model) -> QuantLinear:
    return next(layer for _, layer in quant_layers(model))


def test_a_layer_runs_its_buckets_kernel_and_the_nearest_for_untuned_buckets(nf4_model):
    layer = _layer(nf4_model)
    calls: list[tuple[str, int]] = []

    def tagged(tag: str):
        def kernel(x, w, b):
            calls.append((tag, x.numel() // x.shape[-1]))
            return reference_kernel(x, w, b)
        return kernel

    try:
        layer.set_bucket_kernels({1: ("a", tagged("a")), 16: ("b", tagged("b")), 256: ("c", tagged("c"))})
        for rows in (1, 2, 9, 16, 17, 100, 256, 4096):
            out = layer(torch.randn(rows, layer.in_features, dtype=torch.bfloat16))
            assert out.shape == (rows, layer.out_features)
        # 2 -> bucket 2, nearest tuned 1; 9 -> 16; 17 -> 32, nearer 16 than 256; 100 -> 128, nearer 256 (by ratio)
        assert calls == [("a", 1), ("a", 2), ("b", 9), ("b", 16), ("b", 17), ("c", 100), ("c", 256), ("c", 4096)]
        assert "by M: 1=a, 16=b, 256=c" in repr(layer)
    finally:
        route(nf4_model, "cpu")  # back to the fixed preference for the other tests
    assert layer.by_bucket == {}


def test_route_gives_each_bucket_its_winner_only_when_winners_differ(nf4_model):
    layer = _layer(nf4_model)
    base = shape_key(layer, 1).rsplit("|M=", 1)[0]
    mixed = {f"{base}|M=1": {"winner": "cpu_fused"}, f"{base}|M=64": {"winner": "reference"}}
    decisions = {d.layer: d for d in route(nf4_model, "cpu", m=1, cache=mixed)}
    first = next(name for name, _ in quant_layers(nf4_model))
    assert decisions[first].by_bucket == {1: "cpu_fused", 64: "reference"}
    assert "by M bucket: 1 cpu_fused, 64 reference" in decisions[first].reason
    assert {b: name for b, (name, _) in layer.by_bucket.items()} == {1: "cpu_fused", 64: "reference"}
    same = {f"{base}|M=1": {"winner": "reference"}, f"{base}|M=64": {"winner": "reference"}}
    route(nf4_model, "cpu", m=1, cache=same)
    assert layer.by_bucket == {} and layer.kernel_name == "reference"
    route(nf4_model, "cpu")


def test_the_budget_bounds_tuning_and_a_second_run_tunes_nothing(nf4_model, tmp_path):
    problems = model_problems(nf4_model, [1, 16])
    cache = TuneCache(tmp_path / "autotune.json")
    results, skipped = tune_problems(problems, torch.device("cpu"), cache, budget_s=0)
    assert results == [] and sorted(skipped) == sorted(problems)  # budget 0: nothing tuned, all reported left over
    assert not cache.path.exists()
    results, skipped = tune_problems(problems, torch.device("cpu"), cache, budget_s=600)
    assert skipped == [] and len(results) == len(problems) and not any(r.cached for r in results)
    again, _ = tune_problems(problems, torch.device("cpu"), TuneCache(cache.path), budget_s=600)
    assert len(again) == len(problems) and all(r.cached for r in again)


def test_the_cache_lock_makes_a_second_tuner_wait_and_merges_writes(tmp_path):
    path = tmp_path / "autotune.json"
    first, second = TuneCache(path), TuneCache(path)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with first.locked(5) as ok:
            assert ok
            first.data.setdefault("dev", {})["a"] = {"winner": "x"}
            first.save()
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    start = time.monotonic()
    with second.locked(0.5) as ok:  # the first holds it: give up after 0.5 s
        assert not ok
    assert 0.4 < time.monotonic() - start < 5
    release.set()
    t.join(10)
    with second.locked(5) as ok:  # now free: taken, and the first one's entry is read in
        assert ok and second.data["dev"]["a"] == {"winner": "x"}
        second.data["dev"]["b"] = {"winner": "y"}
        second.save()
    assert json.loads(path.read_text())["dev"] == {"a": {"winner": "x"}, "b": {"winner": "y"}}
