"""Shared pieces of quantserve's Triton kernels: whether they run interpreted, rounding and casting, byte loads.

Every other Triton module (the tile helpers of kernels/triton_tiles.py and kernels/triton_gguf.py, the skeletons of
kernels/triton_dequant.py and kernels/triton_matmul.py) builds on these.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# True when this module's kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = bool(triton.knobs.runtime.interpret)
if INTERPRETED:
    # Pin Triton's own knob (not the environment): Triton reads it again at run time (lazily imported modules,
    # constexpr functions), and the kernels built here stay interpreted even if TRITON_INTERPRET is unset later.
    triton.knobs.runtime.interpret = True

# rounding to the format's native dtype (the dtype the backend's own dequantization returns), as a constexpr code
NATIVE_CODES = {None: 0, torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# --- small shared helpers -------------------------------------------------------------------------------------

# Triton's interpreter (3.x) truncates float32 -> bfloat16 casts; a GPU rounds to nearest even. In the interpreter
# `cast_to` rounds by hand, so interpreted kernels compute what compiled ones do.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRETED)


@triton.jit
def cast_to(x, DTYPE: tl.constexpr):
    """float32 values to DTYPE, rounding to nearest even."""
    if _ROUND_BF16_BY_HAND and DTYPE == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        y = (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def round_to(x, NATIVE: tl.constexpr):
    """Round float32 values to bfloat16 (1) or float16 (2) and back; 0 leaves them."""
    if NATIVE == 1:
        x = cast_to(x, tl.bfloat16).to(tl.float32)
    elif NATIVE == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def u8_at(ptr, mask):
    """Bytes at `ptr` as int32 (0 where masked)."""
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def f16_at(ptr, mask):
    """A little-endian float16 stored in two bytes at `ptr`, as float32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


# --- per-group values: loaded once per (row, group), spread over the group's columns --------------------------
# A tile's scales repeat along K (one per block of 16..256 columns). Loading them per element costs a 64-bit
# address, a register and a pipelined shared-memory slot per element (the builds for real GPUs spilled and ran out
# of shared memory on exactly that: benchmarks/triton_aot.md); loading them per group and spreading the values
# costs that once per group. Tiles start at a multiple of BLOCK_K, BLOCK_K and groups are powers of two, so a
# tile covers whole groups (BLOCK_K >= GROUP) or lies inside one (BLOCK_K < GROUP).


@triton.jit
def group_cols(k0, K, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """The groups of GROUP columns a tile starting at column k0 covers, as a (1, max(1, BLOCK_K // GROUP)) index,
    and which of them lie inside the K columns."""
    if BLOCK_K > GROUP:
        g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)[None, :]
    else:
        g = k0 // GROUP + tl.arange(0, 1)[None, :]
    return g, g * GROUP < K


@triton.jit
def spread(v, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, groups) values from `group_cols` spread to (BLOCK_N, BLOCK_K): column j takes its group's value."""
    BLOCK_N: tl.constexpr = v.shape[0]
    if BLOCK_K > GROUP:
        out = tl.reshape(tl.broadcast_to(v[:, :, None], (BLOCK_N, BLOCK_K // GROUP, GROUP)), (BLOCK_N, BLOCK_K))
    else:
        out = tl.broadcast_to(v, (BLOCK_N, BLOCK_K))
    return out


@triton.jit
def nibbles(ptr, row_at, k0, K, rows, HIGH_FIRST: tl.constexpr, BLOCK_K: tl.constexpr):
    """The 4-bit codes of columns k0 .. k0 + BLOCK_K of each row (two per byte, the row's bytes at `row_at`;
    HIGH_FIRST: the even column in the high nibble), as int32 (BLOCK_N, BLOCK_K). Each row's BLOCK_K / 2 bytes are
    loaded as one contiguous run (vectorized to 128-bit loads), then split and interleaved in registers; per-element
    byte gathers (two elements reading one byte) cannot be vectorized. Needs K even."""
    BLOCK_N: tl.constexpr = rows.shape[0]
    c = k0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :]
    byte = tl.load(ptr + row_at + c, mask=rows & (c * 2 < K), other=0).to(tl.int32) & 255
    if HIGH_FIRST:
        pair = tl.join(byte >> 4, byte & 15)
    else:
        pair = tl.join(byte & 15, byte >> 4)
    return tl.reshape(pair, (BLOCK_N, BLOCK_K))


@triton.jit
def lookup16(table_ptr, code):
    """table_ptr[code] for 4-bit codes, from a 16-entry float32 table held in registers (tl.gather): a gather from
    global memory per element would be pipelined through shared memory, 4 bytes per element and stage."""
    BLOCK_N: tl.constexpr = code.shape[0]
    table = tl.broadcast_to(tl.load(table_ptr + tl.arange(0, 16))[None, :], (BLOCK_N, 16))
    return tl.gather(table, code, 1)


# --- autotune configs a device can run -------------------------------------------------------------------------

def thread_cost(params: dict, num_warps: int) -> int:
    """What one K step of a config asks of each thread's registers, in weight-element units: the weight elements it
    decodes (BLOCK_N x BLOCK_K over the program's threads) plus a quarter of its float32 accumulators
    (BLOCK_M x BLOCK_N; split-K's BLOCK_M is 16): a decoded element keeps several values live (address, code,
    scale, product), an accumulator one register."""
    threads = 32 * num_warps
    rows = params.get("BLOCK_M", 16)
    return (params["BLOCK_N"] * params["BLOCK_K"] + rows * params["BLOCK_N"] // 4) // threads


def config_cost(config: triton.Config) -> int:
    return thread_cost(config.kwargs, config.num_warps)


def within_budget(configs: list[triton.Config], budget: int) -> list[triton.Config]:
    """The configs whose `thread_cost` is within a format's decode budget (`triton_args.decode_budget`: the most
    its decoder compiles for without spilling registers on sm_80, sm_89 and sm_90, measured by
    quantserve.kernels.aot); the cheapest when none is."""
    kept = [c for c in configs if config_cost(c) <= budget]
    return kept or [min(configs, key=config_cost)]


def fits_shared_memory(configs: list[triton.Config], shared_of, limit: int) -> list[triton.Config]:
    """The configs whose compiled kernel needs at most `limit` bytes of shared memory per block (`shared_of(config)`
    compiles it and reads Triton's metadata); the smallest when none fits. The ahead-of-time report applies the
    same rule to each target's limit (quantserve.kernels.aot)."""
    sizes = {id(c): shared_of(c) for c in configs}
    kept = [c for c in configs if sizes[id(c)] <= limit]
    return kept or [min(configs, key=lambda c: sizes[id(c)])]


def device_shared_memory(device: int) -> int:
    """The most shared memory one block may use on CUDA device `device` (opt-in maximum, as Triton's launcher
    checks it before raising OutOfResources)."""
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(device)["max_shared_mem"])


def prune_for_device(kernel, configs: list[triton.Config], named_args: dict, kwargs: dict) -> list[triton.Config]:
    """Drop the configs whose compiled `kernel` needs more shared memory than the current CUDA device gives a
    block, before the autotuner benchmarks them (so no launch fails with OutOfResources). Each config is compiled
    here (`warmup`, with the launch's own arguments); the autotuner then reuses those compiles."""
    if INTERPRETED or len(configs) < 2 or not torch.cuda.is_available():
        return configs
    args = list(named_args.values())

    def shared_of(config: triton.Config) -> int:
        # the autotuner launches with config.all_kwargs(): the same compile key, so its benchmark reuses this compile
        compiled = kernel.warmup(*args, grid=(1,), **kwargs, **config.all_kwargs())
        return int(compiled.metadata.shared)

    return fits_shared_memory(configs, shared_of, device_shared_memory(torch.cuda.current_device()))


__all__ = ["INTERPRETED", "NATIVE_CODES", "cast_to", "device_shared_memory", "f16_at", "fits_shared_memory",
           "group_cols", "lookup16", "nibbles", "prune_for_device", "round_to", "spread", "u8_at",
           "config_cost", "thread_cost", "within_budget"]
