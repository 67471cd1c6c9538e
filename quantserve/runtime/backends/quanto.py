"""optimum-quanto, driven directly: int8 and float8 (e4m3fn) weights with a scale per row, int4 and int2 weights
with a scale and a shift per row or per group of the row, all through quanto's own quantizers and kernels.

quanto keeps a quantized weight as a tensor subclass (a `QTensor`) made of plain tensors: `_data` (int8, float8, or
int4/int2 codes packed into uint8), `_scale` and, for int4/int2, `_shift`. quantserve keeps those plain tensors as
buffers and rebuilds the QTensor from them with quanto's own deserializers, so `F.linear(x, qtensor)` dispatches
to quanto's kernels exactly as quanto's `QLinear` does.

Choices that follow diffusers' quanto quantizer, so that quantserve and diffusers give the same numbers:
- weights are quantized in the compute dtype (diffusers quantizes `QLinear`s holding `torch_dtype` weights); the
  group size and the optimizer (absmax for 8 bits, min-max for 4 and 2 bits) are the ones `QLinear` picks;
- a Linear is left dense when its own name (the last part of its dotted name) is in `modules_to_not_convert`;
- a checkpoint diffusers saved keeps quanto's layout `{layer}.weight._data` (int8/float8) or
  `{layer}.weight._data._data` (packed uint8), `{layer}.weight._scale`, `{layer}.weight._shift` (int4/int2), plus
  `{layer}.input_scale` and `{layer}.output_scale` (activation scales, 1.0 since diffusers quantizes weights only).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ...kernels.formats import Float8, FormatError, Int8Rows, PackedWeight, QuantoGrouped
from ..chunking import map_rows
from ..config import QuantoConfig, dtype_name
from ..model_files import CheckpointError
from .base import Backend, QuantizedWeight

logger = logging.getLogger(__name__)

# config.weights_dtype -> quanto qtype name (quanto's qfloat8 is float8_e4m3fn, as diffusers maps "float8")
QTYPE_NAMES = {"int8": "qint8", "float8": "qfloat8_e4m3fn", "int4": "qint4", "int2": "qint2"}
WEIGHTS_OF_QTYPE = {v: k for k, v in QTYPE_NAMES.items()}
BUFFERS_8BIT = ("data", "scale")
BUFFERS_LOW_BIT = ("data", "scale", "shift")
ALIGNMENT = 64


def _quanto():
    import optimum.quanto

    return optimum.quanto


def _qtype(name: str):
    qtypes = _quanto().qtypes
    if name not in qtypes or name not in WEIGHTS_OF_QTYPE:
        raise ValueError(f"quanto weight meta.qtype: got {name!r}; accepted: {', '.join(map(repr, WEIGHTS_OF_QTYPE))}")
    return qtypes[name]


def quanto_group_size(qtype_name: str, out_features: int, in_features: int) -> int | None:
    """The group size quanto's QLinear uses for this shape: None (one scale per row) for 8 bits, and for 4 and
    2 bits when in_features <= 128; else the largest of 128, 96, 64, 32 dividing in_features (None if none does)."""
    with torch.device("meta"):
        layer = _quanto().QLinear(in_features, out_features, bias=False, weights=_qtype(qtype_name))
    return layer.weight_group_size


def fmt_of(qtype_name: str) -> str:
    """'quanto:int8', 'quanto:float8', 'quanto:int4_grouped', 'quanto:int2_grouped' (a row is one group when
    quanto uses no groups: meta['group_size'] is then None and meta['block'] equals in_features)."""
    weights = WEIGHTS_OF_QTYPE[qtype_name]
    return f"quanto:{weights}" if _qtype(qtype_name).bits == 8 else f"quanto:{weights}_grouped"


def _expected_data_shape(qtype_name: str, shape: tuple[int, int], group_size: int | None) -> tuple[int, int]:
    out_features, in_features = shape
    bits = _qtype(qtype_name).bits
    if bits == 8:
        return out_features, in_features
    if group_size is None:
        rows, cols = out_features, in_features
    else:
        rows, cols = out_features * in_features // group_size, group_size
    per_byte = 8 // bits
    return (rows + per_byte - 1) // per_byte, cols


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` in contiguous, 64-byte aligned memory. Tensors read from a safetensors file sit wherever the header left
    them, and torch's AVX-512 `_weight_int8pack_mm` (quanto's CPU int8 kernel) crashes on such unaligned weights."""
    if t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


class QuantoWeight(QuantizedWeight):
    """A quanto weight: buffers `data`, `scale` (and `shift` for int4/int2), as quanto serializes its QTensors.

    `meta`: qtype (quanto's name), axis, group_size (quanto's value, None = one group per row), block (the
    effective group length), shape, and `optimized`: whether the native path runs quanto's device-specific
    subclass (`QTensor.optimize()`: TinyGemm for bfloat16 int4 in groups of 128, Marlin/AWQ on CUDA) or the
    generic one (dequantize then matmul; int8 through quanto's `qbytes_mm`).
    """

    backend = "quanto"

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
        qtype_name = meta.get("qtype")
        qtype = _qtype(qtype_name)
        shape = tuple(int(s) for s in meta["shape"])
        super().__init__(shape[0], shape[1], fmt_of(qtype_name), meta)
        names = BUFFERS_8BIT if qtype.bits == 8 else BUFFERS_LOW_BIT
        missing = [n for n in names if n not in tensors]
        extra = sorted(set(tensors) - set(names))
        if missing or extra:
            raise ValueError(f"quanto {qtype_name} weight: tensors {sorted(tensors)}; needs exactly {list(names)}")
        data = tensors["data"]
        want_dtype = qtype.dtype if qtype.bits == 8 else torch.uint8
        want_shape = _expected_data_shape(qtype_name, shape, meta.get("group_size"))
        if data.dtype != want_dtype or tuple(data.shape) != want_shape:
            raise ValueError(f"quanto {qtype_name} weight of shape {shape} (group_size {meta.get('group_size')}): "
                             f"data is {dtype_name(data.dtype)} {tuple(data.shape)}; "
                             f"needs {dtype_name(want_dtype)} {want_shape}")
        for name in names:
            self.register_buffer(name, _aligned(tensors[name]))
        self._native: torch.Tensor | None = None
        self.native_path = ""

    # --- rebuilding the QTensor with quanto's own deserializers -------------------------------------------
    def qtensor(self, optimized: bool | None = None) -> torch.Tensor:
        """The quanto QTensor over these buffers (no copy for the generic subclass)."""
        q = _quanto()
        qtype = _qtype(self.meta["qtype"])
        size = torch.Size((self.out_features, self.in_features))
        stride = (self.in_features, 1)
        axis = self.meta.get("axis", 0)
        if qtype.bits == 8:
            state = {"_data": self.data, "_scale": self.scale}
            t = q.WeightQBytesTensor.load_from_state_dict(state, "", qtype=qtype, axis=axis, size=size, stride=stride,
                                                          activation_qtype=None, missing_keys=[])
        else:
            state = {"_data._data": self.data, "_scale": self.scale, "_shift": self.shift}
            t = q.WeightQBitsTensor.load_from_state_dict(state, "", qtype=qtype, axis=axis,
                                                         group_size=self.meta.get("group_size"), size=size,
                                                         stride=stride, missing_keys=[])
        optimized = self.meta.get("optimized", True) if optimized is None else optimized
        return t.optimize() if optimized else t

    def _native_qtensor(self) -> torch.Tensor:
        if self._native is None:
            try:
                self._native = self.qtensor()
            except RuntimeError as exc:  # e.g. quanto's CPU TinyGemm packing needs out_features % 16 == 0
                logger.warning("quanto %s %s: quanto's optimized layout failed (%s); using its generic path",
                               self.fmt, (self.out_features, self.in_features), exc)
                self._native = self.qtensor(optimized=False)
            self.native_path = type(self._native).__name__
        return self._native

    def _apply(self, fn, recurse=True):  # .to(), .cuda(): the cached QTensor holds the old buffers
        self._native = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._native = None
        super()._load_from_state_dict(*args, **kwargs)

    # --- the QuantizedWeight interface ---------------------------------------------------------------------
    def _packed(self) -> PackedWeight:
        """quanto's own buffers, viewed: int8 -> Int8Rows, float8 -> Float8, int4/int2 -> QuantoGrouped (axis 0)."""
        axis = self.meta.get("axis", 0)
        if axis not in (0, None):
            raise FormatError(f"quanto weight axis {axis}: quantserve's kernels take axis 0 (per output row) only")
        qtype = _qtype(self.meta["qtype"])
        if qtype.bits == 8 and qtype.is_floating_point:
            return Float8(self.data, self.scale.reshape(-1), dtype=self.scale.dtype)
        if qtype.bits == 8:
            return Int8Rows(self.data, self.scale.reshape(-1), dtype=self.scale.dtype)
        if axis is None:
            raise FormatError(f"quanto weight axis {axis}: quantserve's kernels take axis 0 (per output row) only")
        return QuantoGrouped(self.data, self.scale.reshape(-1), self.shift.reshape(-1),
                             (self.out_features, self.in_features),
                             int(self.meta.get("block") or self.meta.get("group_size") or self.in_features), qtype.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """quanto's own dequantization of the generic QTensor: scale * data (minus the shift for int4/int2)."""
        with torch.no_grad():
            return self.qtensor(optimized=False).dequantize().to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """quanto's dispatch: F.linear on the QTensor, in the scale's dtype, as quanto's QLinear runs it."""
        qt = self._native_qtensor()
        dtype = qt.dtype
        xq, bias = x.to(dtype), None if bias is None else bias.to(dtype)
        if self._takes_cpu_int8pack(xq):
            if self.in_features % 16:
                y = self._generic_int8_linear(xq, bias)
                return y if y.dtype == x.dtype else y.to(x.dtype)
            xq = _aligned(xq)
        y = torch.nn.functional.linear(xq, qt, bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _takes_cpu_int8pack(self, x: torch.Tensor) -> bool:
        """Whether quanto's CPU int8 matmul runs `torch._weight_int8pack_mm` (bfloat16 input, in_features % 4 == 0).

        On AVX-512 CPUs that kernel crashes (SIGSEGV, torch 2.13) for in_features not a multiple of 16, or an input
        or weight not 64-byte aligned; `linear` then aligns the input, or uses quanto's generic int8 matmul."""
        return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.data.dtype == torch.int8
                and self.in_features % 4 == 0)

    def _generic_int8_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """quanto's device-independent `qbytes_mm` (scale the int8 weight, then matmul), as quanto's linear uses it."""
        from optimum.quanto.library.qbytes_mm import qbytes_mm

        scale = self.scale if self.scale.ndim == 0 else self.scale.reshape(self.out_features, 1)
        y = qbytes_mm(x.reshape(-1, self.in_features), self.data, scale)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    @classmethod
    def from_qtensor(cls, t: torch.Tensor, optimized: bool) -> QuantoWeight:
        """Keep a quanto QTensor's plain tensors, in quanto's own serialized form (`save_to_state_dict`)."""
        state: dict[str, torch.Tensor] = {}
        t.save_to_state_dict(state, "", keep_vars=False)
        tensors = {"data": state.pop("_data._data", None)}
        if tensors["data"] is None:
            tensors["data"] = state.pop("_data")
        tensors["scale"] = state.pop("_scale")
        if "_shift" in state:
            tensors["shift"] = state.pop("_shift")
        if state:
            raise ValueError(f"quanto QTensor {type(t).__name__}: unexpected parts {sorted(state)}")
        out_features, in_features = t.shape
        group_size = getattr(t, "_group_size", None)
        meta = {"qtype": t.qtype.name, "axis": t.axis, "group_size": group_size,
                "block": in_features if group_size is None else group_size,
                "shape": [out_features, in_features], "optimized": optimized}
        return cls(tensors, meta)


def _int8_absmax_in_c(w: torch.Tensor, qtype: Any, optimizer: Any, compute_dtype: torch.dtype) -> bool:
    """Whether quantserve's C quantizer can stand in for quanto's int8 absmax quantization of `w` (a CPU weight
    already in the compute dtype, the CPU kernels built here)."""
    q = _quanto()
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer

    if qtype is not q.qint8 or type(optimizer) is not AbsmaxOptimizer or w.device.type != "cpu":
        return False
    if w.dtype != compute_dtype or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    from ...kernels import cpu_build

    return cpu_build.problem() is None


class QuantoBackend(Backend, config=QuantoConfig):
    name = "quanto"
    config: QuantoConfig

    def __init__(self, config: QuantoConfig, compute_dtype: torch.dtype = torch.bfloat16, **options: Any):
        super().__init__(config, compute_dtype, **options)
        self._planned_shapes: dict[str, tuple[int, int]] = {}

    @property
    def qtype_name(self) -> str:
        return QTYPE_NAMES[self.config.weights_dtype]

    # planning
    def skip_patterns(self) -> list[str]:
        """None: diffusers' quanto quantizer does not match modules_to_not_convert as substrings of the dotted
        name but against each module's own name, so `can_quantize` applies the list (a substring match would
        keep `proj_out_1` dense for ['proj_out'], where diffusers quantizes it and saves it quantized)."""
        return []

    def can_quantize(self, name: str, module: nn.Module) -> tuple[bool, str]:
        ok, why = super().can_quantize(name, module)
        if not ok:
            return ok, why
        own_name = name.rpartition(".")[2]
        if own_name in (self.config.modules_to_not_convert or []):
            return False, f"skipped ({own_name!r} in modules_to_not_convert; quanto matches a layer's own name)"
        # quanto's checkpoint layout does not record in_features of grouped weights: remember the planned shape
        self._planned_shapes[name] = (module.out_features, module.in_features)
        return True, ""

    # loading
    def quantize(self, name: str, weight: torch.Tensor) -> QuantizedWeight:
        """As quanto's QLinear.freeze(): its optimizer and group size, the weight in the compute dtype.

        quanto's scales are per row (8 bits) or per group of a row (4 and 2 bits), so the optimizer and quanto's
        quantize op run over row chunks (in the compute dtype a chunk at a time) and the codes and scales are
        joined: the same tensors as one whole-weight call, with small temporaries. 4- and 2-bit codes are packed
        once over the whole weight, as quanto packs them (along the first axis, not per chunk)."""
        if weight.ndim != 2:
            raise ValueError(f"{name}: quanto quantizes 2-D Linear weights; got shape {tuple(weight.shape)}")
        q = _quanto()
        qtype = _qtype(self.qtype_name)
        w = weight.detach()
        with torch.device("meta"):
            layer = q.QLinear(w.shape[1], w.shape[0], bias=False, dtype=self.compute_dtype, weights=qtype)
        group_size, optimizer = layer.weight_group_size, layer.optimizer
        if w.shape[0] == 1:  # quanto quantizes a single row per tensor
            with torch.no_grad():
                w = w.to(self.compute_dtype)
                scale, shift = ((optimizer(w, qtype=qtype, axis=0), None) if qtype.bits == 8
                                else optimizer(w, qtype=qtype, axis=0, group_size=group_size))
                t = q.quantize_weight(w, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=group_size,
                                      optimized=False)
            return QuantoWeight.from_qtensor(t, optimized=True)

        if _int8_absmax_in_c(w, qtype, optimizer, self.compute_dtype):
            # the same bytes as quanto's absmax + quantize_symmetric, in one pass with no temporaries (~10x faster)
            from ...kernels import cpu as cpu_kernels

            data, scale = cpu_kernels.quantize_int8_absmax(w)
            t = q.WeightQBytesTensor(qtype, 0, torch.Size(w.shape), (w.shape[1], 1), data, scale,
                                     activation_qtype=None)
            return QuantoWeight.from_qtensor(t, optimized=True)

        def one_chunk(c: torch.Tensor) -> tuple[torch.Tensor, ...]:
            c = c.to(self.compute_dtype)
            if qtype.bits == 8:
                scale = optimizer(c, qtype=qtype, axis=0)
                return torch.ops.quanto.quantize_symmetric(c, dtype=qtype.dtype, axis=0, scale=scale), scale
            scale, shift = optimizer(c, qtype=qtype, axis=0, group_size=group_size)
            codes = torch.ops.quanto.quantize_affine(c, bits=qtype.bits, axis=0, group_size=group_size, scale=scale,
                                                     shift=shift)
            return codes, scale, shift

        with torch.no_grad():
            parts = map_rows(one_chunk, w, self.chunk_elements, min_rows=2)
            joined = [torch.cat(list(p)) for p in zip(*parts)]
            size, stride = torch.Size(w.shape), (w.shape[1], 1)
            # the generic subclass holds the exact scale and shift; the optimized one is rebuilt from them
            if qtype.bits == 8:
                t = q.WeightQBytesTensor(qtype, 0, size, stride, joined[0], joined[1], activation_qtype=None)
            else:
                t = q.WeightQBitsTensor(qtype, 0, group_size, size, stride, *joined)
        return QuantoWeight.from_qtensor(t, optimized=True)

    def from_packed(self, name: str, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    out_features: int, in_features: int) -> QuantizedWeight:
        if list(meta.get("shape", [])) != [out_features, in_features]:
            raise CheckpointError(f"{name}: quanto meta.shape {meta.get('shape')} differs from the layer's "
                                  f"({out_features}, {in_features})")
        weight = QuantoWeight(dict(tensors), meta)
        if weight.fmt != fmt:
            raise CheckpointError(f"{name}: stored fmt {fmt!r}, but its meta describes {weight.fmt!r}")
        return weight

    def checkpoint_keys(self, name: str, source: Any) -> list[str]:
        """Every tensor of layer `name` in diffusers/quanto's layout that `source` holds (bias excluded)."""
        keys = [f"{name}.weight.{k}" for k in ("_data", "_data._data", "_scale", "_shift")]
        keys += [f"{name}.input_scale", f"{name}.output_scale"]
        return [k for k in keys if k in source]

    def read_checkpoint_layer(self, name: str, source: Any,
                              shape: tuple[int, int] | None = None) -> QuantizedWeight | None:
        """Layer `name` as diffusers (QuantoConfig, then save_pretrained) stored it; None if stored otherwise.

        The weight runs as diffusers runs a loaded checkpoint: scales in the compute dtype, quanto's generic
        QTensor (diffusers assigns the stored tensors into it, so no optimized subclass is made).
        """
        prefix = f"{name}.weight."
        if f"{prefix}_scale" not in source:
            return None
        packed = f"{prefix}_data._data" in source
        data_key = f"{prefix}_data._data" if packed else f"{prefix}_data"
        if data_key not in source:
            raise CheckpointError(f"{source.path}: has {prefix}_scale but neither {prefix}_data "
                                  f"nor {prefix}_data._data")
        self._check_activation_scales(name, source)
        qtype_name = self.qtype_name
        qtype = _qtype(qtype_name)
        data = source.get(data_key)
        if packed != (qtype.bits < 8) or (qtype.bits == 8 and data.dtype != qtype.dtype):
            raise CheckpointError(f"{source.file_of(data_key)}: {data_key} is {dtype_name(data.dtype)}, which is not "
                                  f"how quanto stores {self.config.weights_dtype} weights (config weights_dtype)")
        tensors = {"data": data, "scale": source.get(f"{prefix}_scale").to(self.compute_dtype)}
        if qtype.bits < 8:
            if f"{prefix}_shift" not in source:
                raise CheckpointError(f"{source.path}: {name} is stored as {qtype_name} but has no {prefix}_shift")
            tensors["shift"] = source.get(f"{prefix}_shift").to(self.compute_dtype)
        shape = (shape or self._planned_shapes.get(name)
                 or self._infer_shape(name, source, data, tensors["scale"], qtype.bits))
        out_features, in_features = shape
        group_size = quanto_group_size(qtype_name, out_features, in_features)
        axis = None if qtype.bits == 8 and out_features == 1 else 0  # quanto quantizes a single row per tensor
        meta = {"qtype": qtype_name, "axis": axis, "group_size": group_size,
                "block": in_features if group_size is None else group_size,
                "shape": [out_features, in_features], "optimized": False}
        try:
            return QuantoWeight(tensors, meta)
        except ValueError as exc:
            raise CheckpointError(f"{source.file_of(data_key)}: layer {name}: {exc}") from exc

    def _check_activation_scales(self, name: str, source: Any) -> None:
        for key in (f"{name}.input_scale", f"{name}.output_scale"):
            if key in source:
                value = source.get(key).float()
                if not torch.all(value == 1.0):
                    raise CheckpointError(f"{source.file_of(key)}: {key} = {value.tolist()}: quantized activations are "
                                          "not supported (diffusers' QuantoConfig quantizes weights only)")

    def _infer_shape(self, name: str, source: Any, data: torch.Tensor, scale: torch.Tensor,
                     bits: int) -> tuple[int, int]:
        """(out, in) from the stored tensors alone: direct for 8 bits; for int4/int2 the bias gives out_features,
        or the layout is unambiguous (a row longer than 128, or not a multiple of 32, is never split in groups)."""
        if bits == 8:
            return int(data.shape[0]), int(data.shape[1])
        rows, cols = int(scale.shape[0]), int(data.shape[1])
        bias_key = f"{name}.bias"
        if bias_key in source:
            out_features = int(source.shape(bias_key)[0])
            if rows % out_features == 0:
                return out_features, cols * (rows // out_features)
        if cols > 128 or cols % 32:
            return rows, cols
        raise CheckpointError(f"{source.path}: the shape of quanto layer {name} cannot be read from its tensors "
                              f"(_scale rows {rows}, group length {cols}) and it has no bias; plan it first "
                              "(can_quantize) or pass shape=(out_features, in_features)")
