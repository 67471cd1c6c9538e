"""Fused dequantize-matmul in Triton: y = x @ dequant(W).T + bias, the weight never materialized in memory.

Two skeletons, both taking the format's tile helper (kernels/triton_tiles.py) as a constexpr:
- split-K (M <= 16, decode-like shapes, memory-bound): one 16-row tile of x; programs split N and K, each writes a
  float32 partial to a workspace, a second small kernel sums the partials, adds the bias and casts (one launch when
  K is not split);
- tiled (M > 16): a grouped-ordering (BLOCK_M, BLOCK_N) output tile per program, looping over K.

Tiles are dequantized to float32, rounded to the format's native dtype, cast to the activation dtype and fed to
tl.dot with a float32 accumulator, so the result is the torch reference `F.linear(x, dequantize(W, x.dtype), bias)`
up to the order of the float32 accumulation.

The kernels use only triton.language builtins and quantserve's own @triton.jit helpers, never the @jit functions of
triton.language.standard (tl.zeros, tl.cdiv, ...): when Triton was imported before TRITON_INTERPRET=1 was set,
those are compiled-only functions that the interpreter cannot call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .formats import FormatError, PackedWeight, device_of
from .triton_args import decode_budget, tile_args
from .triton_common import INTERPRETED, cast_to, prune_for_device, round_to, within_budget

X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SPLITK_MAX_M = 16
# K per split is a multiple of this (a multiple of every BLOCK_K of the split-K configs)
SPLITK_K_UNIT = 32 if INTERPRETED else 256


def _tiled_configs() -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps); a format runs those within its decode budget
    (triton_args.DECODE_BUDGETS, in triton_common.thread_cost units: 20..64 here)."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=1)]
    shapes = ((64, 64, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 8), (128, 128, 32, 3, 8), (32, 64, 32, 4, 4),
              (128, 128, 64, 3, 8), (64, 256, 32, 3, 8), (128, 256, 32, 3, 8), (32, 64, 64, 4, 4),
              (64, 128, 32, 4, 4))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in shapes]


def _splitk_configs() -> list[triton.Config]:
    """(BLOCK_N, BLOCK_K, stages, warps), the cheapest first (thread_cost 16..17, 32..34, 66; see
    `_tiled_configs`)."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1)]
    shapes = ((32, 64, 3, 4), (64, 64, 3, 8), (32, 128, 3, 8), (64, 64, 3, 4), (32, 128, 3, 4), (64, 128, 3, 8),
              (128, 64, 3, 8), (32, 256, 3, 8), (64, 128, 3, 4), (128, 128, 3, 8))
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w) for bn, bk, s, w in shapes]


def _cap(value: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(int(value)))


def _prune_tiled(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Tiles within the format's decode budget, not far larger than the problem (they only add masked work), whose
    shared memory the device has."""
    a = {**named_args, **kwargs}
    configs = within_budget(configs, decode_budget("tiled", a["TILE"], a["W_META0"], a["W_META1"]))
    m_cap, n_cap, k_cap = _cap(a["M"], 16), _cap(a["N"], 16), _cap(a["K"], 32)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= m_cap and c.kwargs["BLOCK_N"] <= n_cap
            and c.kwargs["BLOCK_K"] <= k_cap]
    kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    return prune_for_device(_tiled_kernel.fn, kept, named_args, kwargs)


def _prune_splitk(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    a = {**named_args, **kwargs}
    configs = within_budget(configs, decode_budget("splitk", a["TILE"], a["W_META0"], a["W_META1"]))
    n_cap, k_cap = _cap(a["N"], 16), _cap(min(int(a["K"]), int(a["K_SPLIT"])), 32)
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= k_cap
            and int(a["K_SPLIT"]) % c.kwargs["BLOCK_K"] == 0]
    kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    return prune_for_device(_splitk_kernel.fn, kept, named_args, kwargs)


@triton.jit
def _weight_tile(w_ptr0, w_ptr1, w_ptr2, w_ptr3, w_ptr4, w_arg0, w_arg1, w_arg2, rn, rk, k0, N, K, k_end,
                 TILE: tl.constexpr, W_META0: tl.constexpr, W_META1: tl.constexpr, W_META2: tl.constexpr,
                 NATIVE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The (BLOCK_N, BLOCK_K) weight tile in the dot's dtype; zero outside rows < N, columns < k_end (so padding
    adds nothing)."""
    mask = (rn < N) & (rk < k_end)
    w = TILE(w_ptr0, w_ptr1, w_ptr2, w_ptr3, w_ptr4, w_arg0, w_arg1, w_arg2, rn, rk, k0, mask, N, K,
             W_META0, W_META1, W_META2)
    w = tl.where(mask, round_to(w, NATIVE), 0.0)
    return cast_to(w, DOT_DTYPE)


@triton.jit
def _dot(x, w_t, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc += x @ w_t. UPCAST: the interpreter's bf16 dot is wrong (triton 3.x), so both go through float32 there
    (exact: both operands already hold bf16/fp16 values)."""
    if UPCAST:
        acc = tl.dot(x.to(tl.float32), w_t.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION)
    return acc


@triton.autotune(configs=_tiled_configs(), key=["M_BUCKET", "N", "K", "TILE", "W_META0", "W_META1", "W_META2",
                                                   "NATIVE"],
                 prune_configs_by={"early_config_prune": _prune_tiled})
@triton.jit
def _tiled_kernel(x_ptr, y_ptr, bias_ptr, M, N, K, M_BUCKET, stride_xm, stride_xk, stride_ym,
                  w_ptr0, w_ptr1, w_ptr2, w_ptr3, w_ptr4, w_arg0, w_arg1, w_arg2,
                  TILE: tl.constexpr, W_META0: tl.constexpr, W_META1: tl.constexpr, W_META2: tl.constexpr,
                  NATIVE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = (M + BLOCK_M - 1) // BLOCK_M
    grid_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m[:, None]
    rn = offs_n[:, None]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)[None, :]
        x = tl.load(x_ptr + rm * stride_xm + rk * stride_xk, mask=(rm < M) & (rk < K), other=0.0)
        w = _weight_tile(w_ptr0, w_ptr1, w_ptr2, w_ptr3, w_ptr4, w_arg0, w_arg1, w_arg2, rn, rk, k0, N, K, K, TILE,
                         W_META0, W_META1, W_META2, NATIVE,
                         x_ptr.dtype.element_ty)
        acc = _dot(x, tl.trans(w), acc, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    cn = offs_n[None, :]
    tl.store(y_ptr + rm * stride_ym + cn, cast_to(acc, y_ptr.dtype.element_ty), mask=(rm < M) & (cn < N))


@triton.autotune(configs=_splitk_configs(), key=["M_BUCKET", "N", "K", "K_SPLIT", "TILE", "W_META0", "W_META1",
                                                    "W_META2", "NATIVE"],
                 prune_configs_by={"early_config_prune": _prune_splitk})
@triton.jit
def _splitk_kernel(x_ptr, out_ptr, bias_ptr, M, N, K, M_BUCKET, K_SPLIT, stride_xm, stride_xk, stride_om,
                   w_ptr0, w_ptr1, w_ptr2, w_ptr3, w_ptr4, w_arg0, w_arg1, w_arg2,
                   TILE: tl.constexpr, W_META0: tl.constexpr, W_META1: tl.constexpr, W_META2: tl.constexpr,
                   NATIVE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   PARTIAL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """PARTIAL: write this split's float32 sum to out[split] (M, N); else the final y (bias added, cast)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m[:, None]
    rn = offs_n[:, None]
    k_start = pid_s * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)[None, :]
        x = tl.load(x_ptr + rm * stride_xm + rk * stride_xk, mask=(rm < M) & (rk < k_end), other=0.0)
        w = _weight_tile(w_ptr0, w_ptr1, w_ptr2, w_ptr3, w_ptr4, w_arg0, w_arg1, w_arg2, rn, rk, k0, N, K, k_end, TILE,
                         W_META0, W_META1, W_META2, NATIVE,
                         x_ptr.dtype.element_ty)
        acc = _dot(x, tl.trans(w), acc, UPCAST, PRECISION)
    cn = offs_n[None, :]
    out_mask = (rm < M) & (cn < N)
    if PARTIAL:
        tl.store(out_ptr + pid_s * M * N + rm * N + cn, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm * stride_om + cn, cast_to(acc, out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, y_ptr, bias_ptr, M, N, SPLIT, stride_ym, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr):
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(ws_ptr + (s * M + m) * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs, cast_to(acc, y_ptr.dtype.element_ty), mask=mask)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def pick_split_k(m: int, n: int, k: int, device: torch.device, sm_count: int | None = None) -> int:
    """How many K splits fill the device: about two programs per SM, never a split shorter than one K unit."""
    n_tiles = triton.cdiv(n, 64)
    want = triton.cdiv(2 * (sm_count or _sm_count(device)), n_tiles)
    return max(1, min(want, triton.cdiv(k, SPLITK_K_UNIT), 64))


def _check(x: torch.Tensor, n: int, k: int, device: torch.device, bias: torch.Tensor | None) -> None:
    if x.dtype not in X_DTYPES:
        raise ValueError(f"linear: x dtype {x.dtype}; accepted: {', '.join(map(str, X_DTYPES))}")
    if x.shape[-1] != k:
        raise ValueError(f"linear: x has {x.shape[-1]} features (shape {tuple(x.shape)}); the weight takes {k}")
    if x.device != device:
        raise ValueError(f"linear: x is on {x.device}, the weight on {device}")
    if bias is not None and (bias.numel() != n or bias.device != device):
        raise ValueError(f"linear: bias must hold {n} values on {device}, got {tuple(bias.shape)} on {bias.device}")
    if device.type != "cuda" and not INTERPRETED:
        raise FormatError(f"linear: Triton kernels run on a CUDA device (TRITON_INTERPRET=1 runs them on the CPU "
                          f"for tests); the weight is on {device}")


def linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
           split_k: int | None = None) -> torch.Tensor:
    """y = x @ dequant(W).T + bias in x's dtype (float32 accumulation); split-K for M <= 16, tiled above.

    `out` (M rows of N, unit column stride) receives y when given; `split_k` forces the number of K splits of the
    split-K kernel (tests, benchmarks)."""
    args = tile_args(packed)
    n, k = args.shape
    device = device_of(packed)
    _check(x, n, k, device, bias)
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=device)
    elif tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.device != device or out.stride(1) != 1:
        raise ValueError(f"linear: out must be a ({m}, {n}) {x.dtype} tensor on {device} with unit column stride, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device} strides {out.stride()}")
    if m == 0:
        return out.reshape(*lead, n)
    if bias is not None:
        bias = bias.reshape(-1).to(x.dtype).contiguous()
    for kernel, grid, launch_args, launch_kwargs in launches(x2, args, bias, out, split_k):
        kernel[grid](*launch_args, **launch_kwargs)
    return out.reshape(*lead, n)


def launches(x2: torch.Tensor, args, bias: torch.Tensor | None, out: torch.Tensor, split_k: int | None = None,
             sm_count: int | None = None) -> list[tuple]:
    """The kernel launches of `linear` for a (M, K) x: (kernel, grid, positional args, keyword args) each, in
    order. `linear` runs them; kernels.prefill compiles them (`warmup`) for a GPU target, on a machine without one,
    with exactly these arguments, so a GPU's launch finds its compile in Triton's cache."""
    n, k = args.shape
    m = x2.shape[0]
    device = x2.device
    common = dict(HAS_BIAS=bias is not None, UPCAST=INTERPRETED,
                  PRECISION="tf32x3" if x2.dtype == torch.float32 else None, **args.kwargs())
    bias_arg = bias if bias is not None else out
    m_bucket = triton.next_power_of_2(m)
    if m > SPLITK_MAX_M:
        def tiled_grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        return [(_tiled_kernel, tiled_grid, (x2, out, bias_arg, m, n, k, m_bucket, x2.stride(0), x2.stride(1),
                                             out.stride(0)), common)]
    split = split_k or pick_split_k(m, n, k, device, sm_count)
    k_split = triton.cdiv(triton.cdiv(k, split), SPLITK_K_UNIT) * SPLITK_K_UNIT
    split = triton.cdiv(k, k_split)
    partial = split > 1
    target = torch.empty((split, m, n), dtype=torch.float32, device=device) if partial else out

    def splitk_grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n, meta["BLOCK_N"]), split

    plan = [(_splitk_kernel, splitk_grid, (x2, target, bias_arg, m, n, k, m_bucket, k_split, x2.stride(0),
                                           x2.stride(1), target.stride(-2)),
             dict(PARTIAL=partial, BLOCK_M=16, **common))]
    if partial:
        block = 128 if not INTERPRETED else 32
        plan.append((_splitk_reduce_kernel, (m, triton.cdiv(n, block)),
                     (target, out, bias_arg, m, n, split, out.stride(0)), dict(HAS_BIAS=bias is not None,
                                                                              BLOCK=block)))
    return plan
