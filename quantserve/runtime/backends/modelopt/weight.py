"""The ModelOpt weight: modelopt's real-quantized codes and scales as buffers, dequantized by modelopt's own
QTensor, handed to quantserve's kernels as a packed format; and the hook that quantizes a layer's input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ....kernels.formats import Float8, Int4Blocks, Int8Rows, NVFP4, PackedWeight
from ...errors import BackendUnavailableError
from ..base import NoPackedFormat, QuantizedWeight
from .common import BACKEND, CUDA_ONLY_ACTIVATIONS, QTENSOR_CLASSES, SCALE_BUFFERS, _dtype, _from_json, _qtensor_class
from .plan import _block_dims

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
