"""NVIDIA ModelOpt, driven through its own code: FP8, INT8, INT4, NF4 and NVFP4 weights stored packed, optionally with
FP8, INT8 or NVFP4 activations, calibrated with modelopt's "max" calibrator.

How one layer is quantized (as modelopt's `mtq.quantize` + `mtq.compress` do it to a model, one layer at a time so
that no bf16 copy of the whole model is ever held):
- the modelopt `quant_cfg` (the config's explicit `modelopt_config`, else one derived from `quant_type` as diffusers
  derives it) is applied by modelopt itself to a one-layer scaffold named like the real layer, so its wildcards and
  its default-disabled list (`*lm_head*`, `*proj_out.*`, ...) match exactly as they would on the whole model;
- `mtq.quantize` calibrates the weight quantizer, `mtq.compress` turns the weight into modelopt's real-quantized
  `QTensor` (float8_e4m3fn bytes, int8, int4 or NF4 codes two per byte, or NVFP4 e2m1 codes with e4m3 block
  scales and an fp32 global scale); quantserve keeps those tensors and scales as buffers;
- `dequantize` is the QTensor's own `dequantize`, fed the stored scales exactly as modelopt's TensorQuantizer does.

Activations: modelopt simulates W8A8/W4A4 on hardware without the low-bit GEMM by fake-quantizing the input of each
layer (quantize then dequantize with a calibrated amax) before a matmul with the dequantized weight; quantserve does
the same, with modelopt's own `TensorQuantizer`, applied by a forward pre-hook on each `QuantLinear` (so every kernel
the router picks sees quantized inputs). `after_load` calibrates the activation amax with the user's `forward_loop`
or, by default, a few passes over random inputs of the model's shapes; the amax is stored with the weight, so a
saved model reloads without calibration and gives bit-identical outputs.

What needs a GPU: NVFP4 activation quantization (modelopt's dynamic block quantization has only CUDA kernels). The
weights of every type quantize, dequantize and run on the CPU.

Where quantserve differs from modelopt run over a whole bf16 model, and why:
- weights are quantized from a float32 copy of each layer (modelopt's numerics on exact values; scales come out fp32);
- calibration runs with the earlier layers' weights already quantized (the dense ones are gone), so the activation
  amax of later layers can differ slightly from modelopt's, which calibrates with dense weights;
- only Linear layers are quantized: a config's attention-matmul, softmax and output quantizers are not applied (a
  warning names them), nor the Conv weight and LayerNorm input quantizers modelopt adds to a whole model;
- only the "max" algorithm: AWQ, SmoothQuant and SVDQuant rewrite weights from statistics of the whole model;
- NF4: modelopt 0.47's NF4QTensor.dequantize fails on weights with more than one scale block; quantserve undoes the
  scale double quantization per scale block (modelopt's formula) and hands it the block scales.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import io
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...kernels.formats import NVFP4, Float8, Int4Blocks, Int8Rows, PackedWeight
from ..chunking import absmax, map_rows, needs_chunks
from ..config import NVIDIAModelOptConfig, dtype_name
from ..errors import BackendUnavailableError, ConfigValueError
from .base import Backend, NoPackedFormat, QuantizedWeight

logger = logging.getLogger(__name__)

OWNER = "NVIDIAModelOptConfig"
BACKEND = "modelopt"
QUANTIZE_DTYPE = torch.float32
# packed-weight kind -> the modelopt QTensor class that holds and dequantizes it (a fixed list: no class is ever
# named by a checkpoint)
QTENSOR_CLASSES = {"fp8": "FP8QTensor", "int8": "INT8QTensor", "int4": "INT4QTensor", "nf4": "NF4QTensor",
                   "nvfp4": "NVFP4QTensor"}
# weight buffers, by the name of the TensorQuantizer attribute modelopt keeps them in (dequantize's keyword)
SCALE_BUFFERS = {"scale": "_scale", "double_scale": "_double_scale", "scale_zeros": "_scale_zeros"}
INPUT_AMAX = "input_quantizer._amax"
# quantizers a modelopt config may enable that have no place in a Linear layer: attention matmuls, softmax, outputs
IGNORED_QUANTIZERS = ("bmm_quantizer", "softmax_quantizer", "output_quantizer")
ACTIVATION_TYPES = ("FP8", "INT8", "NVFP4")
# activations quantized as modelopt's own presets do: per tensor with a calibrated amax (FP8_DEFAULT_CFG,
# INT8_DEFAULT_CFG), NVFP4 in dynamic blocks of 16 with e4m3 scales under a calibrated global amax (NVFP4_DEFAULT_CFG)
ACTIVATION_CFG = {
    "FP8": {"num_bits": (4, 3), "axis": None},
    "INT8": {"num_bits": 8, "axis": None},
    "NVFP4": {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}},
}
CUDA_ONLY_ACTIVATIONS = {
    "nvfp4": "NVFP4 activation quantization needs a CUDA GPU: modelopt's dynamic block quantization runs only as its "
             "Triton kernel (compute capability >= 8.9) or its CUDA extension; on a CPU modelopt stops with "
             "'amax must be a CUDA tensor for dynamic block quantization.' Use FP8 or INT8 activations on a CPU",
}


def _mtq():
    import modelopt.torch.quantization as mtq

    return mtq


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"modelopt weight meta.dtype: got {name!r}; accepted: a torch dtype name such as 'float32'")
    return dtype


def _qtensor_class(kind: str) -> type:
    import modelopt.torch.quantization.qtensor as qtensor

    return getattr(qtensor, QTENSOR_CLASSES[kind])


@contextlib.contextmanager
def _quiet():
    """modelopt prints 'Inserted N quantizers' per call and warns that real quantization is experimental."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", message="Real quantization has been applied")
        warnings.filterwarnings("ignore", message="Skipping extension modelopt_cuda_ext")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


# --- quantizer state <-> JSON (meta holds only JSON values) ---------------------------------------------------

def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v) for v in value]}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _to_json(v) for k, v in value.items()}
        return {"__items__": [[_to_json(k), _to_json(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, torch.dtype):
        return {"__dtype__": dtype_name(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"modelopt quantizer state: cannot store {type(value).__name__} {value!r} as JSON")


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, Mapping):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        if set(value) == {"__items__"}:
            return {_from_json(k): _from_json(v) for k, v in value["__items__"]}
        if set(value) == {"__dtype__"}:
            dtype = getattr(torch, str(value["__dtype__"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"modelopt quantizer state: {value['__dtype__']!r} is not a torch dtype")
            return dtype
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _quantizer_state(quantizer: nn.Module) -> dict[str, Any]:
    """A TensorQuantizer's properties (num_bits, axis, block sizes, flags) as modelopt saves them, in JSON form."""
    return _to_json(quantizer.get_modelopt_state(properties_only=True))


def _quantizer_from_state(state: Mapping[str, Any], amax: torch.Tensor | None) -> nn.Module:
    """A TensorQuantizer rebuilt by modelopt's `set_from_modelopt_state`, only ever setting modelopt's own properties."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    if not isinstance(state, Mapping):
        raise ValueError(f"modelopt input quantizer state: got {type(state).__name__}; accepted: a dict")
    quantizer = TensorQuantizer()
    allowed = set(quantizer._get_properties_for_modelopt_state())
    decoded = _from_json(state)
    unknown = sorted(set(decoded) - allowed)
    if unknown:
        raise ValueError(f"modelopt input quantizer state: unknown properties {unknown}; accepted: {sorted(allowed)}")
    quantizer.set_from_modelopt_state(decoded, properties_only=True)
    if amax is not None:
        quantizer.amax = amax
    return quantizer


# --- the modelopt quant_cfg: explicit or derived ---------------------------------------------------------------

def _json_attrs(cfg: Any) -> Any:
    """A quantizer attribute dict as JSON gives it back ([4, 3], {"-1": 16}), in the form modelopt validates
    ((4, 3), {-1: 16})."""
    if isinstance(cfg, list):
        return [_json_attrs(c) for c in cfg]
    if not isinstance(cfg, Mapping):
        return cfg
    out = dict(cfg)
    for key in ("num_bits", "axis"):
        if isinstance(out.get(key), list):
            out[key] = tuple(out[key])
    if isinstance(out.get("block_sizes"), Mapping):
        out["block_sizes"] = _json_block_sizes(out["block_sizes"])
    return out


def _json_block_sizes(blocks: Mapping[Any, Any]) -> dict[Any, Any]:
    fixed: dict[Any, Any] = {}
    for key, value in blocks.items():
        if isinstance(key, str) and key.lstrip("-").isdigit():
            key = int(key)
        if key == "scale_bits" and isinstance(value, list):
            value = tuple(value)
        if key == "scale_block_sizes" and isinstance(value, Mapping):
            value = _json_block_sizes(value)
        fixed[key] = value
    return fixed


def _entries_from_json(quant_cfg: Any) -> list[dict[str, Any]]:
    """A modelopt quant_cfg as a list of entries, from the 0.47 list form or the older dict form diffusers writes.

    In the older form "default" was applied first (whatever its place in the dict; config.json sorts keys) and
    every other key after it; the list keeps that order.
    """
    if isinstance(quant_cfg, Mapping):
        items = sorted(quant_cfg.items(), key=lambda kv: kv[0] != "default")
        entries: list[dict[str, Any]] = []
        for key, value in items:
            name = "*" if key == "default" else key
            if isinstance(name, str) and name.startswith("nn.") and isinstance(value, Mapping):
                for pattern, sub in value.items():
                    entries.append(_entry(pattern, sub, parent_class=name))
            else:
                entries.append(_entry(name, value))
        return entries
    if isinstance(quant_cfg, (list, tuple)):
        out = []
        for raw in quant_cfg:
            if not isinstance(raw, Mapping):
                raise ConfigValueError(OWNER, "modelopt_config['quant_cfg'][]", raw, "a dict entry")
            if "quantizer_name" in raw:
                entry = dict(raw)
                if "cfg" in entry:
                    entry["cfg"] = _json_attrs(entry["cfg"])
                out.append(entry)
            else:
                out.extend(_entries_from_json(dict(raw)))
        return out
    raise ConfigValueError(OWNER, "modelopt_config['quant_cfg']", quant_cfg,
                           "a list of {'quantizer_name': ..., 'cfg'/'enable': ...} entries, or the older dict form")


def _entry(name: str, value: Any, parent_class: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"quantizer_name": name}
    if parent_class:
        entry["parent_class"] = parent_class
    if isinstance(value, Mapping):
        cfg = {k: v for k, v in value.items() if k != "enable"}
        if "enable" in value:
            entry["enable"] = bool(value["enable"])
        if cfg:
            entry["cfg"] = _json_attrs(cfg)
    else:
        entry["cfg"] = _json_attrs(value)
    return entry


def _algorithm_name(algorithm: Any) -> str | None:
    if algorithm is None or isinstance(algorithm, str):
        return algorithm
    if isinstance(algorithm, Mapping):
        return algorithm.get("method")
    return repr(algorithm)


def derived_quant_cfg(config: NVIDIAModelOptConfig) -> list[dict[str, Any]]:
    """The modelopt quant_cfg (0.47 list form) that `quant_type` and the block/channel fields mean.

    As diffusers derives it: weights real-quantized (fake_quant False) with the type's bits, per channel along
    `channel_quantize` or in blocks of `block_quantize`, NF4/NVFP4 scales as `scale_*` say; then modelopt's
    default-disabled list. Activations only when weight_only is False, quantized as modelopt's own presets do
    (see ACTIVATION_CFG); the activation type defaults to the weight type.
    """
    mtq = _mtq()
    weight = _weight_attrs(config)
    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False},
                                     {"quantizer_name": "*weight_quantizer", "cfg": weight}]
    act = activation_type(config)
    if act is not None:
        entries.append({"quantizer_name": "*input_quantizer", "cfg": copy.deepcopy(ACTIVATION_CFG[act])})
    entries.extend(copy.deepcopy(list(mtq.config._default_disabled_quantizer_cfg)))
    return entries


def activation_type(config: NVIDIAModelOptConfig) -> str | None:
    """The activation type a derived config quantizes inputs to, None for weight-only."""
    if config.weight_only:
        return None
    act = config.activation_type or config.weight_type
    if act not in ACTIVATION_TYPES:
        raise ConfigValueError(OWNER, "quant_type", config.quant_type,
                               f"activations of type {', '.join(ACTIVATION_TYPES)} (modelopt has no {act} activation "
                               "quantization), or weight_only=True")
    return act


def _weight_attrs(config: NVIDIAModelOptConfig) -> dict[str, Any]:
    w = config.weight_type
    block, axis = config.block_quantize, config.channel_quantize
    scale_block = config.scale_block_quantize
    attrs: dict[str, Any] = {"num_bits": config.quanttype_to_numbits[w], "fake_quant": False}
    if w in ("INT4", "NF4", "NVFP4"):
        if block is None:
            raise ConfigValueError(OWNER, "block_quantize", block,
                                   f"a block size for {w} weights (with channel_quantize=-1), e.g. "
                                   f"{16 if w == 'NVFP4' else 128 if w == 'INT4' else 64}")
        if axis not in (-1, 1):
            raise ConfigValueError(OWNER, "channel_quantize", axis,
                                   [-1], hint=f"{w} blocks run along the last axis (input features)")
        blocks: dict[Any, Any] = {-1: block}
        if w == "NF4":
            if scale_block is None:
                raise ConfigValueError(OWNER, "scale_block_quantize", scale_block,
                                       "a scale block size for NF4 (modelopt double-quantizes NF4 block scales to "
                                       "int8 in blocks of this size), e.g. 256, with scale_channel_quantize=-1")
            blocks.update({"scale_bits": 8, "scale_block_sizes": {-1: scale_block}})
        elif w == "NVFP4":
            if scale_block is not None and scale_block != block:
                raise ConfigValueError(OWNER, "scale_block_quantize", scale_block, [block, None],
                                       hint="NVFP4 has one e4m3 scale per block of block_quantize values")
            blocks.update({"type": "dynamic", "scale_bits": (4, 3)})
        elif scale_block is not None:
            raise ConfigValueError(OWNER, "scale_block_quantize", scale_block, [None],
                                   hint="INT4 block scales are not quantized further (only NF4 and NVFP4 scales are)")
        attrs["block_sizes"] = blocks
        return attrs
    if scale_block is not None:
        raise ConfigValueError(OWNER, "scale_block_quantize", scale_block, [None],
                               hint=f"{w} has no quantized scales (only NF4 and NVFP4 do)")
    if block is not None:
        attrs["block_sizes"] = {axis: block}
    else:
        attrs["axis"] = axis
    return attrs


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


# --- the quantized weight -------------------------------------------------------------------------------------

class ModelOptWeight(QuantizedWeight):
    """A modelopt real-quantized weight: `weight` (packed codes) and its scales as buffers; optionally the
    `input_quantizer` (modelopt TensorQuantizer, with its calibrated `_amax`) that fake-quantizes this layer's inputs.

    The dtypes of the packed tensors are the format: `.to(torch.bfloat16)` moves nothing but the device.
    """

    backend = BACKEND

    def __init__(self, fmt: str, meta: dict[str, Any], tensors: Mapping[str, torch.Tensor],
                 input_quantizer: nn.Module | None = None):
        out_features, in_features = meta["shape"]
        super().__init__(out_features, in_features, fmt, meta)
        kind = meta["kind"]
        if kind not in QTENSOR_CLASSES:
            raise ValueError(f"modelopt weight meta.kind: got {kind!r}; accepted: {', '.join(map(repr, QTENSOR_CLASSES))}")
        self.register_buffer("weight", tensors["weight"])
        for name in SCALE_BUFFERS:
            if name in tensors:
                self.register_buffer(name, tensors[name])
        weight_state = _from_json(meta["weight_quantizer"])
        self._block_sizes = weight_state.get("_block_sizes")
        self._qtensor_cls = _qtensor_class(kind)
        self._orig_dtype = _dtype(meta["dtype"])
        if input_quantizer is not None:
            self.input_quantizer = input_quantizer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """modelopt's own QTensor.dequantize in float32 (given the scales exactly as its TensorQuantizer.dequantize
        gives them), then cast: a bf16 weight is the float32 one rounded once, its scale never rounded to bf16."""
        return self._dequantize_fp32().to(dtype)

    def _dequantize_fp32(self) -> torch.Tensor:
        qtensor = self._qtensor_cls(torch.Size(self.meta["shape"]), self._orig_dtype, self.weight)
        fp32 = torch.float32
        if self.meta["kind"] == "nf4":
            return qtensor.dequantize(dtype=fp32, scale=self.nf4_block_scales(fp32), block_sizes=self._block_sizes,
                                      double_scale=torch.ones(1, device=self.weight.device),
                                      scale_zeros=torch.zeros((), device=self.weight.device))
        return qtensor.dequantize(
            dtype=fp32, scale=self.scale, block_sizes=self._block_sizes,
            double_scale=getattr(self, "double_scale", None), scale_zeros=getattr(self, "scale_zeros", None))

    def nf4_block_scales(self, dtype: torch.dtype) -> torch.Tensor:
        """NF4 block scales from their int8 double quantization: modelopt's own formula
        `(scale / double_scale).to(dtype) + scale_zeros`, with each row of int8 scales divided by its own double
        scale. (modelopt 0.47's NF4QTensor.dequantize broadcasts the flattened scales against every double scale,
        which fails as soon as a weight has more than one scale block, i.e. more than block * scale_block values;
        this gives it the per-block scales with the identity double quantization instead.)"""
        scale_block = self._block_sizes["scale_block_sizes"][-1]
        rows = self.scale.view(-1, scale_block) / self.double_scale.view(-1, 1)
        blocks = (rows.to(dtype) + self.scale_zeros).flatten()
        return blocks[: self.weight.numel() * 2 // self._block_sizes[-1]]

    @property
    def activation(self) -> str | None:
        return self.meta.get("activation")

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input fake-quantized by modelopt's TensorQuantizer (identity for weight-only layers)."""
        quantizer = getattr(self, "input_quantizer", None)
        if quantizer is None:
            return x
        if quantizer._if_quant and self.activation in CUDA_ONLY_ACTIVATIONS and x.device.type != "cuda":
            raise BackendUnavailableError(f"modelopt {self.fmt} layer: {CUDA_ONLY_ACTIVATIONS[self.activation]} "
                                          f"(this input is on {x.device})")
        return quantizer(x)

    def _packed(self) -> PackedWeight:
        """NVFP4 in blocks of 16, INT4 in blocks along one axis, FP8 and INT8 per tensor or per output row: modelopt's
        own codes and scales, viewed; the other layouts (NF4, other blocks) have no quantserve kernel."""
        kind, dims = self.meta["kind"], _block_dims(self._block_sizes)
        n, k = self.out_features, self.in_features
        if kind == "nvfp4" and dims == {-1: 16}:
            return NVFP4(self.weight.reshape(n, -1), self.scale.reshape(n, -1), self.double_scale.reshape(1).float(), 16)
        if kind == "int4" and len(dims) == 1:
            return Int4Blocks(self.weight.reshape(n, -1), self.scale.reshape(-1), next(iter(dims.values())))
        if self.fmt in ("modelopt:fp8", "modelopt:fp8_axis0"):
            return Float8(self.weight.reshape(n, k), self.scale.reshape(-1))
        if self.fmt == "modelopt:int8_axis0":
            return Int8Rows(self.weight.reshape(n, k), self.scale.reshape(-1))
        raise NoPackedFormat(self.fmt)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of this module's state dict: codes, scales and the input amax (keys as the state dict names them)."""
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        # a dtype cast (model.to(torch.bfloat16)) would turn float8 codes and fp32 scales into other numbers:
        # apply everything else (device moves, share_memory_), but only the device part of a cast
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            target = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            return fn(t) if target.dtype == t.dtype else t.to(target.device)

        return super()._apply(keep_dtype, recurse)


class _QuantizeInput:
    """Forward pre-hook on a QuantLinear: fake-quantize its input with the weight's input quantizer."""

    def __init__(self, weight: ModelOptWeight):
        self.weight = weight

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.weight.quantize_input(args[0]), *args[1:])


# --- the backend ----------------------------------------------------------------------------------------------

class ModelOptBackend(Backend, config=NVIDIAModelOptConfig):
    """Quantizes each Linear with modelopt's real quantization; calibrates activation amax in `after_load`.

    Options: `calibration_loop` (a `forward_loop(model)` used when neither `after_load` nor the config gives one).
    """

    name = BACKEND
    config: NVIDIAModelOptConfig

    def __init__(self, config: NVIDIAModelOptConfig, compute_dtype: torch.dtype = torch.bfloat16, **options: Any):
        super().__init__(config, compute_dtype, **options)
        self._plans: dict[tuple[str, int, int], LayerPlan] = {}
        self._planned_shapes: dict[str, tuple[int, int]] = {}
        self._entries: list[dict[str, Any]] | None = None
        self._warned_ignored = False

    # the quant_cfg -------------------------------------------------------------------------------------------
    def quant_cfg(self) -> list[dict[str, Any]]:
        """The modelopt quant_cfg entries this backend applies (explicit modelopt_config, else derived)."""
        if self._entries is None:
            explicit = self.config.modelopt_config
            if explicit is not None:
                if "quant_cfg" not in explicit:
                    raise ConfigValueError(OWNER, "modelopt_config", dict(explicit), "a dict with a 'quant_cfg' key")
                self._entries = _entries_from_json(explicit["quant_cfg"])
            else:
                if self.config.weight_only and self.config.activation_type is not None:
                    logger.warning("NVIDIAModelOptConfig.quant_type %r names %s activations but weight_only=True: "
                                   "activations stay unquantized (set weight_only=False to quantize them)",
                                   self.config.quant_type, self.config.activation_type)
                self._entries = derived_quant_cfg(self.config)
            self._warn_ignored_quantizers(self._entries)
        return self._entries

    def algorithm(self) -> str:
        explicit = self.config.modelopt_config
        if explicit is not None and "algorithm" in explicit:
            return _algorithm_name(explicit["algorithm"]) or "max"
        return self.config.algorithm

    def _check_algorithm(self) -> None:
        algorithm = self.algorithm()
        if algorithm != "max":
            raise ConfigValueError(OWNER, "algorithm", algorithm, ["max"],
                                   hint=f"{algorithm!r} rewrites weights from activation statistics of the whole "
                                        "bf16 model, which quantize-on-load (one layer at a time) never holds")

    def _warn_ignored_quantizers(self, entries: list[dict[str, Any]]) -> None:
        ignored = sorted({e["quantizer_name"] for e in entries
                          if e.get("enable", True) and "cfg" in e
                          and any(s in e["quantizer_name"] for s in IGNORED_QUANTIZERS)})
        if ignored and not self._warned_ignored:
            self._warned_ignored = True
            logger.warning("modelopt quant_cfg enables %s: quantserve quantizes Linear weights and inputs only; "
                           "attention matmuls, softmax and layer outputs stay in the compute dtype", ignored)

    # planning ------------------------------------------------------------------------------------------------
    def plan(self, name: str, out_features: int, in_features: int) -> LayerPlan:
        """What the quant_cfg makes of Linear `name` of this shape (cached)."""
        key = (name, out_features, in_features)
        self._planned_shapes[name] = (out_features, in_features)
        if key not in self._plans:
            self._plans[key] = self._make_plan(name, out_features, in_features)
        return self._plans[key]

    def _make_plan(self, name: str, out_features: int, in_features: int) -> LayerPlan:
        from modelopt.torch.quantization.conversion import set_quantizer_by_cfg
        from modelopt.torch.quantization.nn import QuantModuleRegistry

        entries = self.quant_cfg()
        leaf = QuantModuleRegistry.convert(nn.Linear(in_features, out_features, bias=False, device="meta"))
        root = _scaffold(name, leaf)
        with _quiet():
            set_quantizer_by_cfg(root, entries)
        wq, iq = leaf.weight_quantizer, leaf.input_quantizer
        if not wq.is_enabled:
            return LayerPlan(None, self._why_disabled(f"{name}.weight_quantizer", leaf, entries))
        kind, fmt = classify_weight_quantizer(wq, f"{name}.weight_quantizer")
        why = self._shape_problem(kind, wq, out_features, in_features)
        if why:
            return LayerPlan(None, why)
        activation = classify_input_quantizer(iq, f"{name}.input_quantizer")
        input_state = _quantizer_state(iq) if activation else None
        return LayerPlan(kind, "", fmt, _quantizer_state(wq), activation, input_state)

    @staticmethod
    def _why_disabled(quantizer_name: str, leaf: nn.Module, entries: list[dict[str, Any]]) -> str:
        from modelopt.torch.quantization.nn import QuantModuleRegistry

        for entry in reversed(entries):
            parent = entry.get("parent_class")
            if parent and not isinstance(leaf, QuantModuleRegistry[parent]):
                continue
            if fnmatch.fnmatch(quantizer_name, entry["quantizer_name"]) and entry.get("enable") is False:
                shown = {k: v for k, v in entry.items() if k != "cfg"}
                return f"modelopt quant_cfg disables its weight quantizer (entry {shown})"
        return "modelopt quant_cfg leaves its weight quantizer disabled"

    @staticmethod
    def _shape_problem(kind: str, quantizer: nn.Module, out_features: int, in_features: int) -> str:
        dims = _block_dims(quantizer._block_sizes)
        block = dims.get(-1)
        if kind in ("int4", "nf4") and in_features % 2:
            return f"in_features {in_features} is odd; {kind} packs two codes per byte along it"
        if kind == "int4" and block and (out_features * in_features) % block:
            return (f"int4 blocks of {block} do not divide the weight's {out_features * in_features} elements "
                    "(modelopt blocks the flattened weight)")
        if kind in ("nvfp4", "int8") and dims:
            shape = (out_features, in_features)
            for dim, size in dims.items():
                if shape[dim] % size:
                    return f"{kind} blocks of {size} do not divide dimension {dim} ({shape[dim]}) of the weight"
        if kind == "nvfp4" and block is not None and block % 2:
            return f"nvfp4 block size {block} is odd; codes are packed two per byte"
        return ""

    def can_quantize(self, name: str, module: nn.Module) -> tuple[bool, str]:
        ok, why = super().can_quantize(name, module)
        if not ok:
            return ok, why
        plan = self.plan(name, module.out_features, module.in_features)
        return (plan.kind is not None), plan.reason

    # loading -------------------------------------------------------------------------------------------------
    def quantize(self, name: str, weight: torch.Tensor) -> ModelOptWeight:
        """Quantize one (out, in) weight with `mtq.quantize` + `mtq.compress` on a one-layer scaffold named `name`."""
        self._check_algorithm()
        out_features, in_features = weight.shape
        plan = self.plan(name, out_features, in_features)
        if plan.kind is None:
            raise ConfigValueError(OWNER, "quant_cfg", name, "a layer whose weight quantizer the config enables",
                                   hint=plan.reason)
        if not self._row_separable(plan) or not needs_chunks(weight, self.chunk_elements):
            tensors = self._quantize_rows(name, weight, plan, None)
        else:
            # row chunks, each quantized by modelopt as the whole weight would be; a per-tensor amax (FP8's scale,
            # NVFP4's global scale) is the whole weight's, found first in a chunked pass, so the bytes are the same
            amax = absmax(weight, self.chunk_elements).to(QUANTIZE_DTYPE)
            parts = map_rows(lambda c: self._quantize_rows(name, c, plan, amax), weight, self.chunk_elements)
            tensors = {}
            for key, first in parts[0].items():
                if first.dim() == 0:
                    if any(not torch.equal(p[key], first) for p in parts[1:]):
                        raise RuntimeError(f"modelopt {name}: per-tensor {key} differs between row chunks")
                    tensors[key] = first
                else:
                    tensors[key] = torch.cat([p[key] for p in parts])
        meta = self._meta(plan, (out_features, in_features))
        input_quantizer = _quantizer_from_state(plan.input_state, None) if plan.activation else None
        if input_quantizer is not None and input_quantizer._dynamic:
            meta["input_amax"] = "dynamic"
        return ModelOptWeight(plan.fmt, meta, tensors, input_quantizer)

    @staticmethod
    def _row_separable(plan: LayerPlan) -> bool:
        """Whether rows quantize independently given the per-tensor amax: not NF4 (its scales are quantized again in
        blocks that span rows), nor blocks along the output axis."""
        blocks = _from_json(plan.weight_state or {}).get("_block_sizes") or {}
        return plan.kind != "nf4" and set(_block_dims(blocks)) <= {-1, 1}

    def _quantize_rows(self, name: str, weight: torch.Tensor, plan: LayerPlan,
                       global_amax: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """modelopt's quantize ("max" calibration) + compress of some rows of layer `name`, on a one-layer scaffold;
        a per-tensor weight amax is replaced by `global_amax` (the whole weight's) before compressing."""
        mtq = _mtq()
        out_features, in_features = weight.shape
        linear = nn.Linear(in_features, out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(weight.detach().to(QUANTIZE_DTYPE), requires_grad=False)
        root = _scaffold(name, linear)
        with _quiet(), torch.no_grad():
            mtq.quantize(root, {"quant_cfg": self.quant_cfg(), "algorithm": "max"}, forward_loop=None)
            leaf = root.get_submodule(name)
            amax = getattr(leaf.weight_quantizer, "amax", None)
            if global_amax is not None and amax is not None and amax.numel() == 1:
                leaf.weight_quantizer.amax = global_amax.to(amax.dtype).reshape(amax.shape)
            mtq.compress(root)
        qtensor = leaf.weight.get_qtensor()
        expected = QTENSOR_CLASSES[plan.kind]
        if type(qtensor).__name__ != expected:
            raise RuntimeError(f"modelopt made a {type(qtensor).__name__} for {name}, expected {expected} ({plan.fmt})")
        tensors = {"weight": qtensor._quantized_data.detach()}
        for buffer, attr in SCALE_BUFFERS.items():
            value = getattr(leaf.weight_quantizer, attr, None)
            if value is not None:
                tensors[buffer] = value.detach()
        return tensors

    def from_packed(self, name: str, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    out_features: int, in_features: int) -> ModelOptWeight:
        known = {"weight", *SCALE_BUFFERS, INPUT_AMAX}
        unknown = sorted(set(tensors) - known)
        if unknown or "weight" not in tensors:
            raise ValueError(f"modelopt layer {name}: tensors {sorted(tensors)}; expected 'weight' and some of "
                             f"{sorted(known - {'weight'})}")
        if list(meta.get("shape", [])) != [out_features, in_features]:
            raise ValueError(f"modelopt layer {name}: meta.shape {meta.get('shape')} != {[out_features, in_features]}")
        state = meta.get("input_quantizer")
        if meta.get("input_amax") == "calibrated" and INPUT_AMAX not in tensors:
            raise ValueError(f"modelopt layer {name}: meta says its input amax was calibrated, but the checkpoint "
                             f"holds no {INPUT_AMAX!r}")
        input_quantizer = _quantizer_from_state(state, tensors.get(INPUT_AMAX)) if state else None
        weight = ModelOptWeight(fmt, dict(meta), {k: v for k, v in tensors.items() if k != INPUT_AMAX}, input_quantizer)
        expected_fmt = _fmt(meta["kind"], _from_json(meta["weight_quantizer"]).get("_axis"), weight._block_sizes)
        if fmt != expected_fmt:
            raise ValueError(f"modelopt layer {name}: fmt {fmt!r} does not match its meta ({expected_fmt!r})")
        return weight

    def checkpoint_keys(self, name: str, source: Any) -> list[str]:
        """A ModelOpt-compressed layer: its packed weight, the weight quantizer's scales and the input amax."""
        return [k for k in source.keys() if k.startswith((f"{name}.weight", f"{name}.input_quantizer."))]

    def read_checkpoint_layer(self, name: str, source: Any) -> ModelOptWeight | None:
        """Layer `name` as a modelopt-compressed module keeps it in its state dict (what diffusers' save_pretrained
        writes after mtq.compress): `{name}.weight` packed, `{name}.weight_quantizer._scale` (and `_double_scale`,
        `_scale_zeros`), `{name}.input_quantizer._amax`; None when `source` holds no such layer. The layout is read
        with this config's quant_cfg, which must describe the same format (its dtype and shape are checked)."""
        from ..model_files import CheckpointError

        prefix = f"{name}.weight_quantizer."
        if f"{prefix}_scale" not in source:
            if f"{name}.weight" in source and f"{prefix}_amax" in source:
                raise CheckpointError(f"{source.path}: {name}.weight has a modelopt weight_quantizer._amax but no "
                                      f"{prefix}_scale: a fake-quantized (not compressed) modelopt checkpoint")
            return None
        shape = self._planned_shapes.get(name)
        if shape is None:
            raise CheckpointError(f"{source.path}: {name} holds modelopt-packed tensors, but no Linear of that name was "
                                  "planned for quantization")
        plan = self.plan(name, *shape)
        if plan.kind is None:
            raise CheckpointError(f"{source.path}: {name} is stored modelopt-packed, but the config keeps it dense "
                                  f"({plan.reason})")
        tensors = {"weight": source.get(f"{name}.weight")}
        for buffer, attr in SCALE_BUFFERS.items():
            if f"{prefix}{attr}" in source:
                tensors[buffer] = source.get(f"{prefix}{attr}")
        self._check_packed(source.path, name, plan, shape, tensors)
        meta = self._meta(plan, shape)
        amax = source.get(f"{name}.input_quantizer._amax") if f"{name}.input_quantizer._amax" in source else None
        input_quantizer = _quantizer_from_state(plan.input_state, amax) if plan.activation else None
        if input_quantizer is not None and amax is not None:
            meta["input_amax"] = "calibrated"
        elif input_quantizer is not None and input_quantizer._dynamic:
            meta["input_amax"] = "dynamic"
        return ModelOptWeight(plan.fmt, meta, tensors, input_quantizer)

    @staticmethod
    def _check_packed(path: Any, name: str, plan: LayerPlan, shape: tuple[int, int],
                      tensors: dict[str, torch.Tensor]) -> None:
        from ..model_files import CheckpointError

        out_features, in_features = shape
        blocks = _from_json(plan.weight_state).get("_block_sizes") or {}
        block = blocks.get(-1, 1)
        padded = -(-out_features * in_features // block) * block
        expected = {"fp8": (torch.float8_e4m3fn, out_features * in_features),
                    "int8": (torch.int8, out_features * in_features),
                    "int4": (torch.uint8, padded // 2), "nf4": (torch.uint8, padded // 2),
                    "nvfp4": (torch.uint8, out_features * in_features // 2)}[plan.kind]
        needs = {"fp8": ["scale"], "int8": ["scale"], "int4": ["scale"], "nvfp4": ["scale", "double_scale"],
                 "nf4": ["scale", "double_scale", "scale_zeros"]}[plan.kind]
        weight = tensors["weight"]
        if (weight.dtype, weight.numel()) != expected:
            raise CheckpointError(f"{path}: {name}.weight is {dtype_name(weight.dtype)} with {weight.numel()} values; "
                                  f"the config's {plan.fmt} for a {list(shape)} weight stores {dtype_name(expected[0])} "
                                  f"with {expected[1]}")
        missing = [n for n in needs if n not in tensors]
        if missing:
            raise CheckpointError(f"{path}: {name} ({plan.fmt}) lacks "
                                  + ", ".join(f"{name}.weight_quantizer.{SCALE_BUFFERS[n]}" for n in missing))

    @staticmethod
    def _meta(plan: LayerPlan, shape: tuple[int, int]) -> dict[str, Any]:
        return {"kind": plan.kind, "shape": list(shape), "dtype": dtype_name(QUANTIZE_DTYPE),
                "weight_quantizer": plan.weight_state, "activation": plan.activation,
                "input_quantizer": plan.input_state, "input_amax": "pending" if plan.activation else None}

    # calibration ---------------------------------------------------------------------------------------------
    def after_load(self, model: nn.Module, forward_loop: Callable[[nn.Module], None] | None = None) -> None:
        """Hook each quantized layer's input quantizer in front of it; calibrate the amax of those still without one.

        The calibration loop is `forward_loop`, else the config's, else the `calibration_loop` option, else a few
        passes over random inputs of the model's shapes (`runtime.dummy_inputs.calibration_loop`). A reloaded
        model (amax stored) runs no loop at all.
        """
        layers = [(name, module) for name, module in model.named_modules()
                  if isinstance(getattr(module, "qweight", None), ModelOptWeight) and module.qweight.activation]
        for _, module in layers:
            if not any(isinstance(h, _QuantizeInput) for h in module._forward_pre_hooks.values()):
                module.register_forward_pre_hook(_QuantizeInput(module.qweight))
        off_gpu = sorted({m.qweight.activation for _, m in layers
                          if m.qweight.activation in CUDA_ONLY_ACTIVATIONS and m.qweight.weight.device.type != "cuda"})
        for act in off_gpu:
            logger.warning("modelopt: %s activations on a model placed off the GPU: %s", act, CUDA_ONLY_ACTIVATIONS[act])
        pending = [(name, module.qweight) for name, module in layers if module.qweight.meta.get("input_amax") == "pending"]
        if not pending:
            return
        self._check_algorithm()
        loop = forward_loop or self.config.forward_loop or self.options.get("calibration_loop")
        if loop is None:
            from ..dummy_inputs import calibration_loop

            loop = calibration_loop()
        self.calibrate(model, pending, loop)

    @staticmethod
    def calibrate(model: nn.Module, pending: list[tuple[str, ModelOptWeight]], loop: Callable[[nn.Module], None]) -> None:
        """modelopt's max calibration of the given layers' input quantizers over `loop(model)`."""
        from modelopt.torch.quantization.model_calib import enable_stats_collection, finish_stats_collection

        quantizers = nn.ModuleList([weight.input_quantizer for _, weight in pending])
        was_training = model.training
        model.eval()
        enable_stats_collection(quantizers)
        try:
            with torch.no_grad():
                loop(model)
        finally:
            finish_stats_collection(quantizers)
            model.train(was_training)
        missed = []
        for name, weight in pending:
            if weight.input_quantizer.amax is None:
                weight.meta["input_amax"] = "dynamic"
                missed.append(name)
            else:
                weight.meta["input_amax"] = "calibrated"
        if missed:
            logger.warning("modelopt calibration: the forward_loop never reached %d layers %s; their inputs are "
                           "quantized with a per-call (dynamic) amax", len(missed), missed[:8])

    def describe(self) -> str:
        return self.config.summary() + ("" if self.config.modelopt_config is None else " (explicit modelopt_config)")
