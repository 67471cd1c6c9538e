"""Dense weights to GGUF blocks: gguf-py's quantizers where it has one, quantserve's own torch ones for the rest.

gguf-py (0.19) quantizes BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (bit-exact with llama.cpp's reference). For the
K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and IQ4_NL / IQ4_XS it has none, so they are written here, vectorized in
torch, after llama.cpp's non-imatrix reference quantizers (`quantize_row_q4_K_ref` and friends in ggml-quants.c):
the same scale searches (`make_qkx2_quants`, `make_qx_quants`, the IQ4 level search), the same packing. Q3_K's
per-element refinement (`make_q3_quants`), which is sequential, is replaced by make_qx_quants' candidate-scale
search. The results are not byte-identical with llama.cpp, but of the same quality, and every block decodes with
ggml's (and gguf-py's, and `quantserve.kernels.gguf`'s) dequantizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..kernels.gguf import BLOCK_SIZES, DENSE_TYPES, IQ4_LEVELS, QK_K, qtype_name
from .chunking import CHUNK_ELEMENTS, map_rows, needs_chunks

GROUP_MAX_EPS = 1e-15
# gguf-py's own quantizers; everything else quantized goes through the torch ones below
GGUF_PY_TYPES = ("BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
_CHUNK_BLOCKS = 1024  # super-blocks per step of the candidate searches: bounds their temporary memory


def quantize_gguf(weight: torch.Tensor, qtype: Any, chunk_elements: int | None = CHUNK_ELEMENTS) -> torch.Tensor:
    """A dense tensor (..., n), n a multiple of the type's block size -> uint8 ggml bytes (..., n/block*type_size).

    F32/F16 give the plain values as bytes; BF16 and the legacy 32-blocks go through gguf-py (on the CPU);
    K-quants and IQ4 through the torch quantizers of this module, on the weight's own device. The bytes come back
    on the weight's device. A big weight is quantized `chunk_elements` weights (whole rows) at a time: blocks never
    straddle rows, so the bytes are those of one whole call, with bounded float32 temporaries (None: in one go).
    """
    name = qtype_name(qtype)
    if name not in BLOCK_SIZES:
        raise ValueError(f"quantize_gguf: qtype {name!r} is not supported; accepted: {', '.join(BLOCK_SIZES)}")
    bs, ts = BLOCK_SIZES[name]
    if weight.dim() == 0 or weight.shape[-1] % bs:
        raise ValueError(f"quantize_gguf: a {name} row must be a multiple of {bs} weights; got shape {tuple(weight.shape)}")
    rows = weight.detach().reshape(-1, weight.shape[-1])
    if chunk_elements is not None and needs_chunks(rows, chunk_elements):
        parts = map_rows(lambda c: quantize_gguf(c, qtype, chunk_elements=None), rows, chunk_elements)
        return torch.cat(parts).reshape(*weight.shape[:-1], weight.shape[-1] // bs * ts)
    w = weight.detach().to(torch.float32).contiguous()
    if not torch.isfinite(w).all():
        raise ValueError(f"quantize_gguf: the weight holds NaN or infinite values; {name} blocks cannot encode them")
    out_shape = (*w.shape[:-1], w.shape[-1] // bs * ts)
    if name == "F32":
        return w.view(torch.uint8).reshape(out_shape)
    if name == "F16":
        return w.to(torch.float16).view(torch.uint8).reshape(out_shape)
    if name in GGUF_PY_TYPES:
        import gguf

        raw = gguf.quants.quantize(w.cpu().numpy(), gguf.GGMLQuantizationType[name])
        return torch.from_numpy(np.ascontiguousarray(raw)).reshape(out_shape).to(weight.device)
    blocks = w.reshape(-1, bs)
    parts = [_TORCH_QUANTIZERS[name](blocks[i:i + _CHUNK_BLOCKS]) for i in range(0, blocks.shape[0], _CHUNK_BLOCKS)]
    return torch.cat(parts).reshape(out_shape)


def quantizer_of(qtype: Any) -> str:
    """Which code quantizes that type: "gguf-py", "quantserve" (this module) or "plain" (F32/F16)."""
    name = qtype_name(qtype)
    return "gguf-py" if name in GGUF_PY_TYPES else "plain" if name in DENSE_TYPES else "quantserve"


# --- helpers --------------------------------------------------------------------------------------------------

def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(n,) float32 -> (n, 2) bytes of fp16."""
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _safe_inv(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x != 0, 1.0 / torch.where(x != 0, x, torch.ones_like(x)), torch.zeros_like(x))


def _wsum(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(M, C, n) values, (M, n) weights -> (M, C) weighted sums over n."""
    return torch.bmm(values, weights.unsqueeze(-1)).squeeze(-1)


def _signed_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the largest |x| and the signed value that has it."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    vmax = x.gather(-1, idx).squeeze(-1)
    return vmax.abs(), vmax


def _qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
          use_mad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qkx2_quants over rows of x: a scale and a min (returned negated, >= 0) with x ~ scale*L - min,
    L in [0, nmax], chosen among nstep+1 candidate scales by a weighted least-squares fit."""
    mn = x.amin(-1).clamp(max=0)
    mx = x.amax(-1)
    span = mx - mn
    flat = span == 0
    span = torch.where(flat, torch.ones_like(span), span)
    sum_w = w.sum(-1)
    sum_x = (w * x).sum(-1)
    sum_x2 = (w * x * x).sum(-1, keepdim=True)

    def error(scale: torch.Tensor, m: torch.Tensor, levels: torch.Tensor, sl: torch.Tensor, sl2: torch.Tensor,
              sxl: torch.Tensor) -> torch.Tensor:
        """sum w * (scale*L + m - x)^2 (or |.| for use_mad) per candidate; the square from the sums already at hand."""
        if use_mad:
            diff = scale.unsqueeze(-1) * levels + m.unsqueeze(-1) - x.unsqueeze(1)
            return (w.unsqueeze(1) * diff.abs()).sum(-1)
        # expanded in float64: the terms are large next to their difference
        s, mm, sl, sl2, sxl = (t.double() for t in (scale, m, sl, sl2, sxl))
        sw, sx, sx2 = (t.double() for t in (sum_w.unsqueeze(-1), sum_x.unsqueeze(-1), sum_x2))
        err = s * s * sl2 + 2 * s * mm * sl - 2 * s * sxl + mm * mm * sw - 2 * mm * sx + sx2
        return err.float()

    w_wx = torch.stack([w, w * x], dim=-1)  # (M, n, 2)

    def sums(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sum w*L, sum w*L^2, sum w*x*L per candidate (batched matmuls: far faster than sums over a short axis)."""
        s = torch.bmm(levels, w_wx)
        return s[..., 0], _wsum(levels * levels, w), s[..., 1]

    iscale0 = nmax / span
    l0 = torch.round(iscale0.unsqueeze(-1) * (x - mn.unsqueeze(-1))).clamp(0, nmax).unsqueeze(1)
    scale0, min0 = 1.0 / iscale0, mn
    best = error(scale0.unsqueeze(1), min0.unsqueeze(1), l0, *sums(l0)).squeeze(1)

    steps = torch.arange(nstep + 1, dtype=torch.float32, device=x.device)
    iscale = (rmin + rdelta * steps + nmax).unsqueeze(0) / span.unsqueeze(-1)  # (M, C)
    levels = torch.round(iscale.unsqueeze(-1) * (x - mn.unsqueeze(-1)).unsqueeze(1)).clamp_(0, nmax)  # (M, C, n)
    sum_l, sum_l2, sum_xl = sums(levels)
    det = sum_w.unsqueeze(-1) * sum_l2 - sum_l * sum_l
    ok = det > 0
    safe_det = torch.where(ok, det, torch.ones_like(det))
    scale = (sum_w.unsqueeze(-1) * sum_xl - sum_x.unsqueeze(-1) * sum_l) / safe_det
    m = (sum_l2 * sum_x.unsqueeze(-1) - sum_l * sum_xl) / safe_det
    pos = m > 0
    scale = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), scale)
    m = torch.where(pos, torch.zeros_like(m), m)
    err = torch.where(ok, error(scale, m, levels, sum_l, sum_l2, sum_xl), torch.full_like(scale, float("inf")))

    all_err = torch.cat([best.unsqueeze(-1), err], dim=-1)
    all_scale = torch.cat([scale0.unsqueeze(-1), scale], dim=-1)
    all_min = torch.cat([min0.unsqueeze(-1), m], dim=-1)
    pick = all_err.argmin(-1, keepdim=True)  # first minimum: a later candidate must be strictly better
    scale_out = all_scale.gather(-1, pick).squeeze(-1)
    min_out = all_min.gather(-1, pick).squeeze(-1)
    scale_out = torch.where(flat, torch.zeros_like(scale_out), scale_out)
    min_out = torch.where(flat, mn, min_out)
    return scale_out, -min_out


def _qx(x: torch.Tensor, nmax: int) -> torch.Tensor:
    """llama.cpp's make_qx_quants (rmse_type 1): a signed scale per row, x ~ scale*l with l in [-nmax, nmax-1],
    the best of 19 candidate scales by x^2-weighted least squares."""
    amax, vmax = _signed_absmax(x)
    small = amax < GROUP_MAX_EPS
    vmax = torch.where(small, torch.ones_like(vmax), vmax)
    tries = torch.tensor([0] + [i for i in range(-9, 10) if i], dtype=torch.float32, device=x.device)
    iscale = -(nmax + 0.1 * tries).unsqueeze(0) / vmax.unsqueeze(-1)  # (M, C)
    levels = torch.round(iscale.unsqueeze(-1) * x.unsqueeze(1)).clamp(-nmax, nmax - 1)
    w = x * x
    sumlx = _wsum(levels, w * x)
    suml2 = _wsum(levels * levels, w)
    pos = suml2 > 0
    score = torch.where(pos, sumlx * sumlx / torch.where(pos, suml2, torch.ones_like(suml2)), torch.full_like(sumlx, -1.0))
    score[:, 0] = torch.where(pos[:, 0], score[:, 0], torch.zeros_like(score[:, 0]))
    pick = score.argmax(-1, keepdim=True)
    scale = torch.where(pos, sumlx / torch.where(pos, suml2, torch.ones_like(suml2)), torch.zeros_like(sumlx))
    scale = scale.gather(-1, pick).squeeze(-1)
    return torch.where(small, torch.zeros_like(scale), scale)


def _levels_from(x: torch.Tensor, d: torch.Tensor, offset: torch.Tensor | float, lo: int, hi: int) -> torch.Tensor:
    """Per row: round((x + offset) / d) clamped to [lo, hi] (0 where d == 0), shifted by -lo to uint8 codes."""
    nz = (d != 0).unsqueeze(-1)
    safe = torch.where(d != 0, d, torch.ones_like(d)).unsqueeze(-1)
    off = offset if isinstance(offset, float) else offset.unsqueeze(-1)
    q = torch.round((x + off) / safe).clamp(lo, hi)
    q = torch.where(nz, q, torch.zeros_like(q))
    return (q - lo).to(torch.uint8)


def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins (N, 8) uint8 -> the 12 packed bytes (N, 12)."""
    a = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    b = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    c = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat([a, b, c], dim=-1)


def _pack_2bit(levels: torch.Tensor) -> torch.Tensor:
    """(N, 256) codes in [0, 3] -> 64 bytes: per half of 128, byte l holds codes l, l+32, l+64, l+96."""
    q = levels.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


# --- K-quants with a min: Q2_K, Q4_K, Q5_K ---------------------------------------------------------------------

def _k_with_min(blocks: torch.Tensor, sub: int, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool,
                scale_bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared by Q2_K/Q4_K/Q5_K: per sub-block a scale and a min, both quantized to `scale_bits` against a per
    super-block fp16 d and dmin; returns (d, dmin, scale codes, min codes, levels (N, 256) uint8)."""
    n = blocks.shape[0]
    x = blocks.reshape(-1, sub)
    if use_mad:  # Q2_K
        w = x.abs()
    else:
        av = torch.sqrt((x * x).mean(-1, keepdim=True))
        w = av + x.abs()
    scales, mins = _qkx2(x, w, nmax, rmin, rdelta, nstep, use_mad)
    scales, mins = scales.reshape(n, -1), mins.reshape(n, -1)
    qmax = (1 << scale_bits) - 1
    max_scale, max_min = scales.amax(-1), mins.amax(-1)
    inv_scale = torch.where(max_scale > 0, qmax / torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale)),
                            torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, qmax / torch.where(max_min > 0, max_min, torch.ones_like(max_min)),
                          torch.zeros_like(max_min))
    ls = torch.round(inv_scale.unsqueeze(-1) * scales).clamp(0, qmax).to(torch.uint8)
    lm = torch.round(inv_min.unsqueeze(-1) * mins).clamp(0, qmax).to(torch.uint8)
    d = _fp16_round(max_scale / qmax)
    dmin = _fp16_round(max_min / qmax)
    dl = (d.unsqueeze(-1) * ls.to(torch.float32)).reshape(-1)
    ml = (dmin.unsqueeze(-1) * lm.to(torch.float32)).reshape(-1)
    levels = _levels_from(x, dl, ml, 0, nmax).reshape(n, QK_K)
    return d, dmin, ls, lm, levels


def quantize_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """(N, 256) float32 -> (N, 84) Q2_K blocks: scales|mins (16), 2-bit codes (64), d, dmin."""
    d, dmin, ls, lm, levels = _k_with_min(blocks, 16, 3, -0.5, 0.1, 15, True, 4)
    return torch.cat([ls | (lm << 4), _pack_2bit(levels), _fp16_bytes(d), _fp16_bytes(dmin)], dim=-1)


def quantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """(N, 256) float32 -> (N, 144) Q4_K blocks: d, dmin, 12 bytes of 6-bit scales/mins, 4-bit codes (128)."""
    d, dmin, ls, lm, levels = _k_with_min(blocks, 32, 15, -1.0, 0.1, 20, False, 6)
    q = levels.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _pack_k_scales(ls, lm), qs], dim=-1)


def quantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """(N, 256) float32 -> (N, 176) Q5_K blocks: d, dmin, 12 bytes of scales/mins, high bits (32), low nibbles (128)."""
    d, dmin, ls, lm, levels = _k_with_min(blocks, 32, 31, -0.5, 0.1, 15, False, 6)
    q = levels.reshape(-1, 8, 32)
    qh = torch.zeros_like(q[:, 0])
    for k in range(8):
        qh |= (q[:, k] >> 4) << k
    low = (q & 0x0F).reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _pack_k_scales(ls, lm), qh, qs], dim=-1)


# --- symmetric K-quants: Q3_K, Q6_K ----------------------------------------------------------------------------

def _k_symmetric(blocks: torch.Tensor, nmax: int, scale_max: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared by Q3_K/Q6_K: 16 signed sub-block scales of 16, quantized against a per super-block fp16 d.
    Returns (d, scale codes as int (N, 16), levels (N, 256) uint8 in [0, 2*nmax))."""
    n = blocks.shape[0]
    x = blocks.reshape(-1, 16)
    scales = _qx(x, nmax).reshape(n, 16)
    amax, max_scale = _signed_absmax(scales)
    zero = amax < GROUP_MAX_EPS
    iscale = -scale_max / torch.where(zero, torch.ones_like(max_scale), max_scale)
    sc = torch.round(iscale.unsqueeze(-1) * scales).clamp(-scale_max, scale_max - 1)
    d = torch.where(zero, torch.zeros_like(iscale), _fp16_round(1.0 / iscale))
    sc = torch.where(zero.unsqueeze(-1), torch.zeros_like(sc), sc)
    dl = (d.unsqueeze(-1) * sc).reshape(-1)
    levels = _levels_from(x, dl, 0.0, -nmax, nmax - 1)
    levels = torch.where((dl == 0).unsqueeze(-1), torch.full_like(levels, nmax), levels)
    return d, sc.to(torch.int32), levels.reshape(n, QK_K)


def quantize_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """(N, 256) float32 -> (N, 110) Q3_K blocks: hmask (32), 2-bit low codes (64), 12 bytes of scales, d."""
    d, sc, levels = _k_symmetric(blocks, 4, 32)
    n = blocks.shape[0]
    high = (levels >> 2).reshape(n, 8, 32)
    hmask = torch.zeros(n, 32, dtype=torch.uint8, device=blocks.device)
    for k in range(8):
        hmask |= high[:, k] << k
    qs = _pack_2bit(levels & 0x03)
    s = (sc + 32).to(torch.uint8)  # 6-bit
    low = (s[:, :8] & 0x0F) | ((s[:, 8:] & 0x0F) << 4)
    top = s >> 4
    packed_high = top[:, 0:4] | (top[:, 4:8] << 2) | (top[:, 8:12] << 4) | (top[:, 12:16] << 6)
    return torch.cat([hmask, qs, low, packed_high, _fp16_bytes(d)], dim=-1)


def quantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """(N, 256) float32 -> (N, 210) Q6_K blocks: low nibbles (128), high 2 bits (64), int8 scales (16), d."""
    d, sc, levels = _k_symmetric(blocks, 32, 128)
    q = levels.reshape(-1, 2, 4, 32)
    ql = torch.cat([(q[:, :, 0] & 0x0F) | ((q[:, :, 2] & 0x0F) << 4),
                    (q[:, :, 1] & 0x0F) | ((q[:, :, 3] & 0x0F) << 4)], dim=-1).reshape(-1, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)).reshape(-1, 64)
    scales = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([ql, qh, scales, _fp16_bytes(d)], dim=-1)


# --- IQ4: 16 non-linear levels ---------------------------------------------------------------------------------

def _nearest_level(v: torch.Tensor) -> torch.Tensor:
    """Index of the nearest IQ4 level (ties to the upper one, as ggml's best_index_int8)."""
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=v.device)
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(v, mids, right=True)


def _iq4_scales(x: torch.Tensor, ntry: int = 7) -> torch.Tensor:
    """Per row of 32 (IQ4's search in quantize_row_iq4_nl_impl, x^2 weights): the best float scale."""
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=x.device)
    amax, vmax = _signed_absmax(x)
    small = amax < GROUP_MAX_EPS
    vmax = torch.where(small, torch.ones_like(vmax), vmax)
    tries = torch.arange(-ntry, ntry + 1, dtype=torch.float32, device=x.device)
    ids = torch.cat([(-IQ4_LEVELS[0] / vmax).unsqueeze(-1),  # the first guess: d = -max/levels[0]
                     (tries.unsqueeze(0) + IQ4_LEVELS[0]) / vmax.unsqueeze(-1)], dim=-1)  # (M, C)
    q = levels[_nearest_level(ids.unsqueeze(-1) * x.unsqueeze(1))]
    w = x * x
    sumqx = _wsum(q, w * x)
    sumq2 = _wsum(q * q, w)
    pos = sumq2 > 0
    safe = torch.where(pos, sumq2, torch.ones_like(sumq2))
    score = torch.where(pos, sumqx * sumqx / safe, torch.full_like(sumqx, -1.0))
    score[:, 0] = torch.where(pos[:, 0], score[:, 0], torch.zeros_like(score[:, 0]))
    d = torch.where(pos, sumqx / safe, torch.zeros_like(sumqx)).gather(-1, score.argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(small, torch.zeros_like(d), d)


def _iq4_codes(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(M, 32) floats and their scales -> (M, 16) bytes: codes j and j+16 share byte j (low, high nibble)."""
    idx = _nearest_level(x * _safe_inv(d).unsqueeze(-1)).to(torch.uint8)
    idx = torch.where((d == 0).unsqueeze(-1), torch.full_like(idx, 8), idx)  # level 1 ~ 0 when the block is all zero
    return idx[:, :16] | (idx[:, 16:] << 4)


def quantize_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    """(N, 32) float32 -> (N, 18) IQ4_NL blocks: fp16 d, 16 bytes of level indices."""
    d = _fp16_round(_iq4_scales(blocks))
    return torch.cat([_fp16_bytes(d), _iq4_codes(blocks, d)], dim=-1)


def quantize_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    """(N, 256) float32 -> (N, 136) IQ4_XS blocks: fp16 d, 2+4 bytes of 6-bit sub-block scales, 128 bytes of codes."""
    n = blocks.shape[0]
    x = blocks.reshape(-1, 32)
    scales = _iq4_scales(x).reshape(n, 8)
    _, max_scale = _signed_absmax(scales)
    d = _fp16_round(-max_scale / 32)
    sc = torch.round(scales * _safe_inv(d).unsqueeze(-1)).clamp(-32, 31)
    dl = (d.unsqueeze(-1) * sc).reshape(-1)
    codes = _iq4_codes(x, dl).reshape(n, 128)
    s = (sc + 32).to(torch.uint8)
    scales_l = (s[:, 0::2] & 0x0F) | ((s[:, 1::2] & 0x0F) << 4)
    top = (s >> 4).to(torch.int32)
    h = sum(top[:, i] << (2 * i) for i in range(8))
    scales_h = torch.stack([h & 0xFF, h >> 8], dim=-1).to(torch.uint8)
    return torch.cat([_fp16_bytes(d), scales_h, scales_l, codes], dim=-1)


_TORCH_QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q2_K": quantize_q2_k, "Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k,
    "Q6_K": quantize_q6_k, "IQ4_NL": quantize_iq4_nl, "IQ4_XS": quantize_iq4_xs,
}
