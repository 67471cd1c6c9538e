"""quantserve's Triton kernels compiled for real GPUs (sm_80, sm_90) with Triton's own compiler, no GPU needed.

Every kernel x every packed format x the smallest and the largest autotune config shipped for that format (within
its decode budget), bf16 activations, built in worker processes by quantserve.kernels.aot into a private Triton
cache: every build compiles, none spills registers to local memory, every build's shared memory is within the
target's limit or the autotuner prunes it there, and the matmul skeletons use tensor cores. The full sweep (every
config, sm_80/sm_89/sm_90, bf16 and fp16) is benchmarks/triton_aot.md.
"""

from __future__ import annotations

import os

import pytest

from quantserve.kernels import aot

TARGETS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cache = tmp_path_factory.mktemp("triton-cache")
    previous = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(cache)  # the spawned workers inherit it: every build really compiles
    try:
        builds = aot.plan(TARGETS, aot.format_names(), configs="extremes", dtypes=("bf16",))
        return aot.run(builds, jobs=2, progress=False)
    finally:
        if previous is None:
            del os.environ["TRITON_CACHE_DIR"]
        else:
            os.environ["TRITON_CACHE_DIR"] = previous


def _of(results, **want):
    return [r for r in results if all(getattr(r.build, k) == v for k, v in want.items())]


def test_plan_takes_the_gpu_configs_and_each_formats_budget():
    """The interpreter's kernels carry one small config; the plan counts the configs a GPU gets, and per format
    only those within its decode budget."""
    assert {k: aot.config_count(k) for k in aot.KERNELS} == {"dequantize": 6, "tiled": 10, "splitk": 10,
                                                             "splitk_reduce": 1}
    # GGUF Q5_K's tiled decoder compiles without spilling up to a per-thread cost of 24 (three configs);
    # float8 takes every split-K config
    assert aot.shipped("tiled", "gguf_Q5_K") == [0, 2, 4]
    assert aot.shipped("splitk", "float8_e4m3_rows") == list(range(10))
    assert aot.budget_reason("tiled", "gguf_Q5_K", 1) == "pruned: per-thread cost 32, over the decode budget of 24"
    builds = aot.plan(["sm_90"], ["gguf_Q5_K"], configs="extremes", dtypes=("bf16",))
    assert sorted({(b.kernel, b.config) for b in builds}) == [
        ("dequantize", 1), ("dequantize", 5), ("splitk", 0), ("splitk", 7), ("splitk_reduce", 0), ("tiled", 2),
        ("tiled", 4)]
    everything = aot.plan(["sm_90"], ["nf4"], configs="all", dtypes=("bf16",))
    assert len(everything) == 6 + 10 + 10 + 1
    with pytest.raises(ValueError, match="target 'sm_70'"):
        aot.plan(["sm_70"], ["nf4"])


def test_targets_table_cites_its_source():
    for target in aot.TARGETS.values():
        assert "Programming Guide" in target.source and f"{target.capability / 10:.1f}" in target.source
        assert target.regs_per_thread == 255
    assert aot.TARGETS["sm_80"].smem_per_block == 163 * 1024
    assert aot.TARGETS["sm_89"].smem_per_block == 99 * 1024
    assert aot.TARGETS["sm_90"].smem_per_block == 227 * 1024


def test_every_build_compiles_without_spilling_within_shared_memory(results):
    formats = aot.format_names()
    assert len(results) == 2 * (6 * len(formats) + 1)
    failed = [(r.build, r.reason) for r in results if r.status == "failed"]
    assert not failed, failed
    assert {r.status for r in results} <= {"compiled", "pruned"}
    spilling = [(r.build, r.registers, r.stack, r.local) for r in results if r.spills]
    assert not spilling, spilling
    for r in results:
        assert 0 < r.registers <= aot.TARGETS[r.build.target].regs_per_thread, r
        assert r.smem_limit == aot.TARGETS[r.build.target].smem_per_block
        # over the target's shared memory <=> pruned there (the autotuner's rule, the device's limit)
        assert (r.status == "pruned") == (r.shared > r.smem_limit), r
        assert r.tensor_core is not None and r.ldg128 is not None


def test_float8_runs_on_sm_80_by_integer_decoding(results):
    """No float8 conversion on sm_80: the codes are decoded by integer arithmetic there, so the router admits
    float8 and NVFP4 weights on an A100 and every build compiles."""
    for fmt in ("float8_e4m3_rows", "float8_e5m2_tensor", "nvfp4"):
        assert {r.status for r in _of(results, fmt=fmt, target="sm_80")} == {"compiled"}, fmt
    assert aot.decline_reason("float8_e4m3_rows", aot.TARGETS["sm_80"]) is None


def test_matmul_skeletons_use_tensor_cores(results):
    for kernel in ("tiled", "splitk"):
        for r in _of(results, kernel=kernel):
            assert r.tensor_core > 0, (r.build, r.tensor_ops)
    sm80_ops = {op.split(":")[0] for r in _of(results, target="sm_80", kernel="tiled") for op in
                r.tensor_ops.split(", ") if op}
    assert sm80_ops == {"HMMA"}
    # Hopper: the tiled skeleton's 64-row tiles go through wgmma (HGMMA in SASS)
    assert any("HGMMA" in r.tensor_ops for r in _of(results, target="sm_90", kernel="tiled"))
    assert all(r.tensor_core == 0 for r in results if r.build.kernel in ("dequantize", "splitk_reduce"))


def test_int8_dequantize_loads_128_bits(results):
    loads = {(r.build.target, r.build.config): r.ldg128 for r in _of(results, kernel="dequantize",
                                                                      fmt="int8_rows_bnb")}
    assert all(v > 0 for v in loads.values()), loads


def test_report_summary_and_table(results):
    s = aot.summary(results)
    assert set(s) == set(TARGETS)
    for name, row in s.items():
        assert row["builds"] == row["compiled"] + row["failed"] + row["declined"] + row["pruned"]
        assert row["spilling"] == 0 and row["over_smem"] == 0
    text = aot.markdown(results, "python -m quantserve.kernels.aot --test", 1.0, 2)
    assert ("| target | GPUs | smem limit (KiB) | builds | compiled | failed | declined | pruned | spilling "
            "| over shared memory |") in text
    assert f"| sm_80 | {aot.TARGETS['sm_80'].gpus} | 163 | {s['sm_80']['builds']} |" in text
    assert text.count("\n| sm_") >= len(results)
