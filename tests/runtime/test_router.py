"""The router and the autotuner on the CPU: candidates, policy, cache, warm start, rejection of wrong kernels."""

from __future__ import annotations

import json

import pytest
import torch

from quantserve.runtime.autotune import TuneCache, autotune, device_key, tokens_for, tune_layer
from quantserve.runtime.loader import load_model
from quantserve.runtime.quant_linear import QuantLinear
from quantserve.runtime.candidates import Candidate, scoped_candidate
from quantserve.runtime.router import KernelPolicy, m_bucket, route, shape_key

from .tiny_models import save_tiny


@pytest.fixture(scope="module")
def nf4_model(tmp_path_factory):
    folder = save_tiny("dit", tmp_path_factory.mktemp("r") / "dit")
    return load_model(folder, "nf4")


def test_m_buckets_are_powers_of_two():
    assert [m_bucket(m) for m in (1, 2, 3, 16, 17, 1000)] == [1, 2, 4, 16, 32, 1024]


def test_fixed_preference_without_cache(nf4_model):
    decisions = route(nf4_model, "cpu", m=4)
    # on a CPU: quantserve's fused CPU kernel first, then the backend's, the CPU slabs, the CPU GEMM, the reference
    assert decisions and all(d.kernel == "cpu_fused" and "fixed preference" in d.reason for d in decisions)
    assert all(d.runnable == ["cpu_fused", "native", "cpu_dequant", "cpu_gemm", "reference"] for d in decisions)


def test_policy_forces_and_disables_by_pattern(nf4_model):
    policy = KernelPolicy.from_dict({"force": {"proj_out_*": "reference"},
                                     "disable": {"*attn1*": ["cpu_fused", "native"]}})
    decisions = {d.layer: d for d in route(nf4_model, "cpu", m=4, policy=policy)}
    assert decisions["proj_out_1"].kernel == "reference" and decisions["proj_out_1"].reason == "forced by kernel policy"
    assert decisions["transformer_blocks.0.attn1.to_q"].kernel == "cpu_dequant"
    assert decisions["transformer_blocks.0.attn1.to_q"].rejected["native"] == "disabled by kernel policy"
    assert decisions["transformer_blocks.0.ff.net.2"].kernel == "cpu_fused"
    assert nf4_model.proj_out_1.kernel_name == "reference"


def test_policy_from_environment_and_bad_names():
    policy = KernelPolicy.from_env({"QUANTSERVE_FORCE_KERNEL": "proj_*=reference", "QUANTSERVE_DISABLE_KERNELS": "native,*ff*=reference"})
    assert policy.forced("proj_out_1") == "reference" and policy.forced("x") is None
    assert policy.disabled("a.ff.b") == {"native", "reference"}
    with pytest.raises(ValueError, match="kernel_policy.force.*'magic'"):
        KernelPolicy.from_dict({"force": {"*": "magic"}})
    with pytest.raises(ValueError, match="unknown keys"):
        KernelPolicy.from_dict({"prefer": {}})


def test_autotune_stores_winners_and_a_warm_start_tunes_nothing(nf4_model, tmp_path):
    cache = TuneCache(tmp_path / "autotune.json")
    results = autotune(nf4_model, [2, 16], device="cpu", cache=cache)
    assert results and not any(r.cached for r in results)
    stored = json.loads(cache.path.read_text())[device_key("cpu")]
    assert set(stored) == {r.key for r in results}
    for entry in stored.values():
        assert entry["winner"] in entry["timings_ms"]
        assert set(entry["timings_ms"]) == {"cpu_fused", "cpu_dequant", "cpu_gemm", "native", "reference"}
    mtime = cache.path.stat().st_mtime_ns
    again = autotune(nf4_model, [2, 16], device="cpu", cache=TuneCache(cache.path))
    assert all(r.cached for r in again) and cache.path.stat().st_mtime_ns == mtime, "warm start rewrites nothing"
    layer = nf4_model.proj_out_1
    assert layer.kernel_name == stored[shape_key(layer, 16)]["winner"] and "autotuned" in layer.kernel_reason


def test_a_kernel_that_strays_from_the_reference_is_rejected(nf4_model):
    wrong = Candidate("wrong", lambda x, w, b: torch.zeros(x.shape[0], w.out_features, dtype=x.dtype),
                      lambda layer, device: (True, ""), 1, "a broken kernel")
    with scoped_candidate(wrong):
        result = tune_layer(nf4_model.proj_out_1, "proj_out_1", 8, torch.device("cpu"))
        assert "wrong" in result.rejected and "strays" in result.rejected["wrong"]
        assert result.winner in ("cpu_fused", "cpu_dequant", "cpu_gemm", "native", "reference")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTSERVE_CACHE_DIR", str(tmp_path / "c"))
    assert TuneCache().path == tmp_path / "c" / "autotune.json"


def test_tokens_for_resolution_and_batch(nf4_model):
    assert tokens_for(nf4_model, 8, 3) == 3 * 16  # 8x8 pixels, patch 2 -> 16 tokens per image


def test_load_model_routes_with_policy_and_warm_cache(tmp_path, monkeypatch):
    folder = save_tiny("dit", tmp_path / "dit")
    model = load_model(folder, "nf4", kernel_policy={"force": {"proj_out_*": "reference"}})
    assert model.proj_out_1.kernel_name == "reference" and model.proj_out_1.kernel_reason == "forced by kernel policy"
    assert model.transformer_blocks[0].attn1.to_q.kernel_name == "cpu_fused"
    report = {l.name: l for l in model.quantserve_report.layers}
    assert report["proj_out_1"].kernel == "reference"
    monkeypatch.setenv("QUANTSERVE_DISABLE_KERNELS", "cpu_fused|cpu_dequant|cpu_gemm,*=native")
    assert load_model(folder, "nf4").proj_out_2.kernel_name == "reference"
    # a warm autotune cache is read at load: each layer gets its tuned winner
    monkeypatch.delenv("QUANTSERVE_DISABLE_KERNELS")
    monkeypatch.setenv("QUANTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    tuned = load_model(folder, "nf4")
    autotune(tuned, [16], device="cpu", cache=TuneCache())
    fresh = load_model(folder, "nf4")
    assert "autotuned" in fresh.proj_out_1.kernel_reason
