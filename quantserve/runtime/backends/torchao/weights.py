"""The torchao weights: a torchao tensor subclass kept as buffers (`TorchAoWeight`) and quantserve's
int4_grouped (`Int4GroupedWeight`); each hands quantserve's kernels its packed format, and says where it
cannot run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ....kernels.formats import Float8, Int8Rows, PackedWeight
from ....kernels.int4 import Int4Grouped, dequantize_int4_grouped
from ...dtypes import dtype_from_name
from ...errors import BackendUnavailableError
from ..base import NoPackedFormat, QuantizedWeight
from .serialization import (
    BITPLANES,
    FMT_INT4,
    FMT_PREFIX,
    _describe,
    _granularity,
    _intx_bits,
    _intx_qmin,
    _rebuild,
    fmt_of,
    pack_bitplanes,
    unpack_bitplanes,
)

# subclasses whose kernels exist only on some devices: type name -> (device types, what to tell the user)
_DEVICE_ONLY = {
    "Int4TilePackedTo4dTensor": (("cuda",), "a CUDA GPU (tinygemm int4 kernel)"),
    "Int4PlainInt32Tensor": (("xpu", "npu"), "an Intel XPU or Ascend NPU"),
    "NVFP4Tensor": (("cuda",), "a CUDA GPU with compute capability >= 10.0 (Blackwell)"),
    "MXTensor": (("cuda",), "a CUDA GPU with compute capability >= 10.0 (Blackwell)"),
}


# --- float8 with dynamic activations off CUDA -----------------------------------------------------------------

_SCALED_MM_OK: dict[str, bool | str] = {}


def _scaled_mm_problem(device: torch.device) -> str | None:
    """None when torch._scaled_mm (float8 x float8, per-row scales) runs on `device`, else the error it gave."""
    key = str(device)
    if key not in _SCALED_MM_OK:
        try:
            a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
            b = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
            s = torch.ones(16, 1, device=device)
            torch._scaled_mm(a, b.t(), s, s.t(), out_dtype=torch.bfloat16)
            _SCALED_MM_OK[key] = True
        except Exception as exc:  # any failure means: this device cannot run the float8 GEMM
            _SCALED_MM_OK[key] = f"{type(exc).__name__}: {exc}"
    result = _SCALED_MM_OK[key]
    return None if result is True else str(result)


def _float8_dynamic_needs(device: torch.device, problem: str) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"TorchAoConfig.quant_type: float8 dynamic-activation quantization (float8dq) runs its GEMM with "
        f"torch._scaled_mm, which fails on {device} ({problem}); it needs a CUDA GPU with compute capability >= 8.9 "
        f"(Ada, Hopper or newer), an AMD MI300+, an Intel XPU, or a CPU where torch._scaled_mm works. "
        f"Pick float8wo, int8wo or int8dq instead.")


# --- the quantized weights ------------------------------------------------------------------------------------

class TorchAoWeight(QuantizedWeight):
    """A torchao tensor subclass kept as plain buffers + torchao's JSON description (meta["torchao"]).

    `subclass()` rebuilds the torchao tensor (cached until the buffers move; rebuilt per call when its codes are
    bit-plane packed, so memory holds n bits per weight); `linear` hands it to F.linear for torchao's dispatch.
    """

    backend = "torchao"

    @classmethod
    def rebuilds(cls, fmt: str) -> bool:
        """Every fmt `fmt_of` names: 'torchao:' and the subclass's layout."""
        return fmt.startswith(FMT_PREFIX)

    @classmethod
    def from_stored(cls, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> TorchAoWeight:
        weight = cls(fmt, meta, tensors)
        weight.subclass()  # fail at load, not at the first forward
        return weight

    def __init__(self, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]):
        out_features, in_features = meta["shape"]
        super().__init__(out_features, in_features, fmt, meta)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self._names = tuple(tensors)
        self._cached: torch.Tensor | None = None

    @classmethod
    def from_subclass(cls, t: torch.Tensor) -> TorchAoWeight:
        desc = _describe(t)
        tensors = {n: getattr(t, n).detach() for n in desc["_tensor_data_names"]}
        meta: dict[str, Any] = {"shape": list(t.shape), "torchao": desc}
        block = list(getattr(t, "block_size", None) or [])
        if _granularity(block, tuple(t.shape)) == "grouped":
            meta["group_size"] = block[-1]
        if type(t).__name__ == "IntxUnpackedToInt8Tensor" and _intx_bits(t) < 8:
            bits = _intx_bits(t)
            codes = tensors.pop("qdata").to(torch.int16) - _intx_qmin(bits)
            tensors[BITPLANES] = pack_bitplanes(codes, bits)
            meta["bits"] = bits
        return cls(fmt_of(t), meta, tensors)

    @property
    def kind(self) -> str:
        return self.meta["torchao"]["_type"]

    def subclass(self) -> torch.Tensor:
        if self._cached is not None:
            return self._cached
        tensors = {n: getattr(self, n) for n in self._names}
        packed = tensors.pop(BITPLANES, None)
        if packed is not None:
            bits, numel = int(self.meta["bits"]), self.out_features * self.in_features
            if not 1 <= bits <= 7 or tuple(packed.shape) != (bits, -(-numel // 8)) or packed.dtype != torch.uint8:
                raise ValueError(f"{BITPLANES}: expected uint8 {(bits, -(-numel // 8))} for {bits}-bit codes of a "
                                 f"{self.out_features}x{self.in_features} weight, "
                                 f"got {packed.dtype} {tuple(packed.shape)}")
            qdata = (unpack_bitplanes(packed, numel).to(torch.int16) + _intx_qmin(bits)).to(torch.int8)
            tensors["qdata"] = qdata.reshape(self.out_features, self.in_features)
        t = _rebuild(self.meta["torchao"], tensors)
        if tuple(t.shape) != (self.out_features, self.in_features):
            raise ValueError(f"the tensors make a {tuple(t.shape)} weight, meta says "
                             f"{(self.out_features, self.in_features)}")
        if packed is None:
            self._cached = t
        return t

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        self._cached = None  # buffers are replaced by .to()/.cuda(): rebuild from the new ones
        return super()._apply(fn, recurse)

    def _check_device(self, device: torch.device) -> None:
        need = _DEVICE_ONLY.get(self.kind)
        if need is not None and device.type not in need[0]:
            raise BackendUnavailableError(f"torchao {self.kind} ({self.fmt}) runs on {need[1]} only, not on {device}")
        if self.fmt.endswith("+dyn_float8") and device.type != "cuda":
            problem = _scaled_mm_problem(device)
            if problem is not None:
                raise _float8_dynamic_needs(device, problem)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = self.subclass()
        self._check_device(t.device)
        return t.dequantize().to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = self.subclass()
        self._check_device(w.device)
        y = F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))
        return y.to(x.dtype)

    def _packed(self) -> PackedWeight:
        """int8 per row and float8 per row or tensor, weight-only: torchao's own qdata and scale, viewed."""
        if "+dyn_" in self.fmt:
            raise NoPackedFormat(self.fmt, "its activations are quantized dynamically by torchao, and quantserve's "
                                           "kernels are weight-only")
        build = _PACKED.get(self.fmt)
        if build is None:
            raise NoPackedFormat(self.fmt)
        return build(self)


def _int8_rows(w: TorchAoWeight) -> Int8Rows:
    zero = getattr(w, "zero_point", None)
    return Int8Rows(w.qdata, w.scale.reshape(-1), None if zero is None else zero.reshape(-1), dtype=_dtype_of(w))


def _float8(w: TorchAoWeight) -> Float8:
    return Float8(w.qdata, w.scale.reshape(-1), dtype=_dtype_of(w))


def _dtype_of(w: TorchAoWeight) -> torch.dtype | None:
    """The dtype torchao's description records for the dense weight (the output dtype of its dequantize)."""
    described = (w.meta.get("torchao", {}).get("_data") or {}).get("dtype")  # {"_type": "torch.dtype", "_data": name}
    name = described.get("_data") if isinstance(described, dict) else described
    return None if name is None else dtype_from_name(name, field_name="torchao description dtype")


# the formats `fmt_of` names that quantserve's kernels take (weight-only), and how to view them
_PACKED = {
    FMT_PREFIX + "int8_rows": _int8_rows,
    **{f"{FMT_PREFIX}float8_{flavour}_{gran}": _float8 for flavour in ("e4m3", "e5m2") for gran in ("rows", "tensor")},
}


class Int4GroupedWeight(QuantizedWeight):
    """quantserve's int4_grouped (torchao Int4Tensor's layout): two codes per byte, bf16 scale and zero per group."""

    backend = "torchao"
    stored_fmts = (FMT_INT4,)

    @classmethod
    def from_stored(cls, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Int4GroupedWeight:
        packed = Int4Grouped(tensors["qdata"], tensors["scale"], tensors["zero_point"], int(meta["group_size"]))
        return cls(packed, meta)

    def __init__(self, packed: Int4Grouped, meta: dict[str, Any] | None = None):
        out_features, in_features = packed.shape
        super().__init__(out_features, in_features, FMT_INT4, {**(meta or {}), "group_size": packed.group_size})
        self.register_buffer("qdata", packed.qdata)
        self.register_buffer("scale", packed.scale)
        self.register_buffer("zero_point", packed.zero_point)

    def _packed(self) -> Int4Grouped:
        return Int4Grouped(self.qdata, self.scale, self.zero_point, int(self.meta["group_size"]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4_grouped(self.packed(), dtype)
