"""Which autotune configs a format and a device get: decode budgets (no register spills) and shared memory.

The figures behind the budgets come from real compiles (tests/kernels/test_aot.py, benchmarks/triton_aot.md); these
tests check the selection rules themselves, and that every format's budget leaves it configs to try.
"""

from __future__ import annotations

import pytest
import triton

from quantserve.kernels import triton_args, triton_common
from quantserve.kernels.gguf import BLOCK_SIZES


def _config(bn, bk, warps):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps)


def test_thread_cost_counts_decoded_weights_and_a_quarter_of_the_accumulators():
    # split-K: 16 rows of accumulators
    assert triton_common.config_cost(_config(32, 64, 4)) == (32 * 64 + 16 * 32 // 4) // 128 == 17
    assert triton_common.config_cost(_config(128, 128, 8)) == (128 * 128 + 16 * 128 // 4) // 256 == 66
    tiled = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8)
    assert triton_common.config_cost(tiled) == (256 * 32 + 128 * 256 // 4) // 256 == 64


def test_within_budget_keeps_the_configs_a_decoder_compiles_without_spilling():
    configs = [_config(32, 64, 4), _config(64, 64, 4), _config(128, 128, 8)]  # costs 17, 34, 66
    assert triton_common.within_budget(configs, 17) == configs[:1]
    assert triton_common.within_budget(configs, 34) == configs[:2]
    assert triton_common.within_budget(configs, 66) == configs
    # none within: the cheapest, so a launch always has a config
    assert triton_common.within_budget(configs[1:], 8) == [configs[1]]


def test_fits_shared_memory_prunes_what_the_device_lacks():
    configs = [_config(32, 64, 4), _config(64, 128, 8), _config(128, 128, 8)]
    shared = {id(configs[0]): 24 * 1024, id(configs[1]): 90 * 1024, id(configs[2]): 170 * 1024}
    sizes = lambda c: shared[id(c)]  # noqa: E731
    assert triton_common.fits_shared_memory(configs, sizes, 227 * 1024) == configs  # H100
    assert triton_common.fits_shared_memory(configs, sizes, 163 * 1024) == configs[:2]  # A100
    assert triton_common.fits_shared_memory(configs, sizes, 99 * 1024) == configs[:2]  # L40S
    assert triton_common.fits_shared_memory(configs[1:], sizes, 48 * 1024) == [configs[1]]  # the smallest


def test_prune_for_device_needs_a_gpu():
    """Without CUDA (the interpreter) nothing is compiled to measure: the configs pass through unchanged."""
    configs = [_config(32, 64, 4), _config(64, 64, 4)]
    assert triton_common.prune_for_device(None, configs, {}, {}) == configs


@pytest.mark.parametrize("kernel", ["splitk", "tiled"])
def test_every_decoder_has_a_budget_that_leaves_configs(kernel):
    from quantserve.kernels import aot

    names = {triton_args.decoder_name(t, 0) for t in (
        "tile_bnb4", "tile_int8_rows", "tile_float8", "tile_int4_torchao", "tile_quanto", "tile_nvfp4",
        "tile_int4_blocks")} | {f"gguf:{q}" for q in BLOCK_SIZES} | {"tile_bnb4:nested"}
    table = triton_args.DECODE_BUDGETS[kernel]
    assert set(table) - {"default"} <= names, "a budget for a decoder that does not exist"
    for fmt in aot.format_names():
        assert aot.shipped(kernel, fmt), fmt
    assert triton_args.decode_budget(kernel, "tile_gguf_unknown", 0) == table["default"]
