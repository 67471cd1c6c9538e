"""What one Linear becomes under the quant_cfg (`LayerPlan`): its packed kind and format name from the
weight quantizer modelopt set up, and its activation type from the input quantizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...errors import ConfigValueError
from .common import OWNER

# --- what one layer becomes -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerPlan:
    """What the quant_cfg says for one Linear: its packed kind (None: stays dense, `reason` says why)."""

    kind: str | None
    reason: str = ""
    fmt: str = ""
    weight_state: dict[str, Any] | None = None
    activation: str | None = None
    input_state: dict[str, Any] | None = None


def _scaffold(name: str, linear: nn.Linear) -> nn.Module:
    """A module tree holding `linear` at the dotted path `name`, so modelopt's wildcards see the real layer name."""
    root = nn.Module()
    parent = root
    *path, leaf = name.split(".")
    for part in path:
        child = nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(leaf, linear)
    return root


def _block_dims(blocks: Mapping[Any, Any] | None) -> dict[int, int]:
    return {k: v for k, v in (blocks or {}).items() if isinstance(k, int)}


def _fmt(kind: str, axis: Any, blocks: Mapping[Any, Any] | None) -> str:
    dims = _block_dims(blocks)
    if kind == "nvfp4":
        return "modelopt:nvfp4" if dims == {-1: 16} else f"modelopt:nvfp4_block{dims[-1]}"
    if dims:
        return f"modelopt:{kind}_block" + "x".join(str(dims[d]) for d in sorted(dims))
    if axis is None:
        return f"modelopt:{kind}"
    return f"modelopt:{kind}_axis" + ("_".join(map(str, axis)) if isinstance(axis, tuple) else str(axis))


def classify_weight_quantizer(quantizer: nn.Module, where: str) -> tuple[str, str]:
    """(kind, fmt) of the packed weight modelopt's real quantization makes with this quantizer's settings."""
    from modelopt.torch.quantization.nn import SequentialQuantizer

    if isinstance(quantizer, SequentialQuantizer):
        raise ConfigValueError(OWNER, f"quant_cfg quantizer {where}", "a list of quantizer configs",
                               "one quantizer config per weight (sequential W4A8-style weight quantizers are not supported)")
    bits, blocks, axis = quantizer._num_bits, quantizer._block_sizes or {}, quantizer._axis
    scale_bits, dims = blocks.get("scale_bits"), _block_dims(blocks)
    kind = None
    if scale_bits == (8, 0):
        kind = None  # MX formats: not one of the five types
    elif bits == (4, 3):
        kind = "fp8"
    elif bits == 8:
        kind = "int8"
    elif bits == 4 and scale_bits == 8 and blocks.get("scale_block_sizes") and dims:
        kind = "nf4"
    elif bits == 4 and dims and scale_bits is None:
        kind = "int4"
    elif bits == (2, 1) and scale_bits == (4, 3) and dims:
        kind = "nvfp4"
    if kind is None:
        raise ConfigValueError(
            OWNER, f"quant_cfg quantizer {where}", f"num_bits={bits}, block_sizes={dict(blocks) or None}",
            "FP8 (num_bits (4, 3)), INT8 (8), INT4 (4 with block_sizes {-1: n}), NF4 (4 with block_sizes "
            "{-1: n, 'scale_bits': 8, 'scale_block_sizes': {-1: m}}) or NVFP4 ((2, 1) with block_sizes "
            "{-1: 16, 'scale_bits': (4, 3)})")
    if kind in ("int4", "nf4", "nvfp4") and set(dims) != {-1}:
        raise ConfigValueError(OWNER, f"quant_cfg quantizer {where}", f"block_sizes={dict(blocks)}",
                               f"{kind} blocks along the last axis only, keyed -1 (e.g. {{-1: 16}})")
    return kind, _fmt(kind, axis, blocks)


def classify_input_quantizer(quantizer: nn.Module, where: str) -> str | None:
    """The activation kind an input quantizer fake-quantizes to ("fp8", "int8", "nvfp4"), None when it is off."""
    from modelopt.torch.quantization.calib import MaxCalibrator
    from modelopt.torch.quantization.nn import SequentialQuantizer

    if isinstance(quantizer, SequentialQuantizer):
        raise ConfigValueError(OWNER, f"quant_cfg quantizer {where}", "a list of quantizer configs",
                               "one quantizer config per input")
    if not quantizer.is_enabled:
        return None
    bits, blocks = quantizer._num_bits, quantizer._block_sizes or {}
    accepted = ("per-tensor or per-channel FP8 ({'num_bits': (4, 3), 'axis': None}) or INT8 ({'num_bits': 8, "
                "'axis': None}), or NVFP4 in dynamic blocks ({'num_bits': (2, 1), 'block_sizes': {-1: 16, "
                "'type': 'dynamic', 'scale_bits': (4, 3)}})")
    if not isinstance(quantizer._calibrator, MaxCalibrator):
        raise ConfigValueError(OWNER, f"quant_cfg quantizer {where}", type(quantizer._calibrator).__name__,
                               ["max"], hint="only the max calibrator is supported")
    if not blocks and bits in ((4, 3), 8):
        return "fp8" if bits == (4, 3) else "int8"
    if bits == (2, 1) and blocks.get("scale_bits") == (4, 3) and blocks.get("type") == "dynamic":
        return "nvfp4"
    hint = ""
    if blocks.get("type") == "dynamic" and blocks.get("scale_bits") is None:
        hint = ("modelopt 0.47 cannot run dynamic block quantization without scale_bits (its dynamic_block_quant "
                "asserts scale_bits is an (exponent, mantissa) pair), on any device")
    raise ConfigValueError(OWNER, f"quant_cfg quantizer {where}",
                           f"num_bits={bits}, block_sizes={dict(blocks) or None}", accepted, hint=hint)
