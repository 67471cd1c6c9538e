"""torchao, driven directly: each Linear weight becomes a torchao tensor subclass, run by torchao's own dispatch.

- int8wo/int8dq (`Int8Tensor`), float8wo (`Float8Tensor`, e4m3 or e5m2), uint1wo..uint7wo and int4dq
  (`IntxUnpackedToInt8Tensor`), and any `AOBaseConfig` that yields a subclass on torchao's safetensors allow-list:
  `torchao.quantization.quantize_` makes the subclass; `linear` is `F.linear(x, subclass)`.
- float8dq: torchao's config handler refuses anything but CUDA >= 8.9 / MI300 / XPU, yet its `Float8Tensor` runs on
  a CPU through `torch._scaled_mm`; off CUDA the subclass is built with the same `Float8Tensor.from_hp` call the
  handler makes, after a probe that `_scaled_mm` works on that device.
- int4wo: torchao's `Int4WeightOnlyConfig` needs the GPU library mslk; quantserve's own `int4_grouped`
  (kernels/int4.py) has the same layout and arithmetic and runs everywhere.

Storing: a subclass is kept as its plain component tensors (buffers) plus torchao's own JSON description of it
(`TensorSubclassAttributeJSONEncoder`, the form diffusers writes into safetensors headers) in `meta`; it is rebuilt
only through torchao's allow-listed `object_from_dict`. Sub-byte codes that torchao holds one per int8 are kept
packed in bit planes (n bits per weight) and unpacked when the layer runs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.formats import Float8, Int8Rows, PackedWeight
from ...kernels.int4 import (
    Int4Grouped,
    dequantize_int4_grouped,
    int4_grouped_from_unsigned,
    quantize_int4_grouped,
)
from ..config import TorchAoConfig
from ..errors import BackendUnavailableError, ConfigValueError
from ..model_files import CheckpointError
from .base import Backend, NoPackedFormat, QuantizedWeight, json_dtype
from ..chunking import absmax, map_rows, needs_chunks

FMT_INT4 = "int4_grouped"
FMT_PREFIX = "torchao:"
BITPLANES = "qdata_bitplanes"

# subclasses whose kernels exist only on some devices: type name -> (device types, what to tell the user)
_DEVICE_ONLY = {
    "Int4TilePackedTo4dTensor": (("cuda",), "a CUDA GPU (tinygemm int4 kernel)"),
    "Int4PlainInt32Tensor": (("xpu", "npu"), "an Intel XPU or Ascend NPU"),
    "NVFP4Tensor": (("cuda",), "a CUDA GPU with compute capability >= 10.0 (Blackwell)"),
    "MXTensor": (("cuda",), "a CUDA GPU with compute capability >= 10.0 (Blackwell)"),
}


def _torchao() -> Any:
    try:
        import torchao.quantization as q
    except ImportError as exc:  # pragma: no cover - torchao is a dependency of this backend
        raise BackendUnavailableError("TorchAoConfig: the torchao backend needs torchao >= 0.15: "
                                      "pip install torchao") from exc
    return q


def _safetensors_utils() -> Any:
    from torchao.prototype.safetensors import safetensors_utils

    return safetensors_utils


def _describe(t: torch.Tensor) -> dict[str, Any]:
    """torchao's JSON description of a subclass: {"_type", "_data" (non-tensor attributes), "_tensor_data_names"}."""
    return json.loads(json.dumps(t, cls=_safetensors_utils().TensorSubclassAttributeJSONEncoder))


def _rebuild(desc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A subclass from its description and tensors, through torchao's allow-listed `object_from_dict` only."""
    utils = _safetensors_utils()
    kind = desc.get("_type")
    if kind not in utils.ALLOWED_TENSORS_SUBCLASSES:
        raise ValueError(f"torchao tensor type {kind!r} is not on torchao's safetensors allow-list "
                         f"{utils.ALLOWED_TENSORS_SUBCLASSES}")
    wanted = list(desc.get("_tensor_data_names") or [])
    if sorted(wanted) != sorted(tensors):
        raise ValueError(f"{kind} needs tensors {sorted(wanted)}, got {sorted(tensors)}")
    _check_dtype_names(desc.get("_data"))
    data = dict(desc.get("_data") or {})
    data.update(tensors)
    return utils.object_from_dict({"_type": kind, "_data": data})


def _check_dtype_names(value: Any) -> None:
    """torchao's decoder resolves {"_type": "torch.dtype", "_data": name} as getattr(torch, name): dtypes only."""
    if isinstance(value, dict):
        if value.get("_type") == "torch.dtype" and not isinstance(getattr(torch, str(value.get("_data")), None),
                                                                   torch.dtype):
            raise ValueError(f"torchao description: {value.get('_data')!r} is not a torch dtype")
        for item in value.values():
            _check_dtype_names(item)
    elif isinstance(value, list):
        for item in value:
            _check_dtype_names(item)


# --- bit planes: n-bit codes at n bits per weight -------------------------------------------------------------

def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes < 2**bits (any shape) to (bits, ceil(numel / 8)) uint8: plane b holds bit b of 8 codes per byte,
    code i of a byte in bit i."""
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    flat = flat.reshape(-1, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=flat.device)
    planes = [((flat >> b) & 1).to(torch.int32).mul(weights).sum(-1).to(torch.uint8) for b in range(bits)]
    return torch.stack(planes).contiguous()


def unpack_bitplanes(planes: torch.Tensor, numel: int) -> torch.Tensor:
    """The inverse of `pack_bitplanes`: the first `numel` unsigned codes, flat, uint8."""
    shifts = torch.arange(8, dtype=torch.uint8, device=planes.device)
    out = torch.zeros(planes.shape[1], 8, dtype=torch.uint8, device=planes.device)
    for b in range(planes.shape[0]):
        out |= ((planes[b].unsqueeze(-1) >> shifts) & 1) << b
    return out.reshape(-1)[:numel]


def _intx_bits(t: torch.Tensor) -> int:
    return int(str(t.target_dtype).removeprefix("torch.int"))


def _intx_qmin(bits: int) -> int:
    return -(1 << (bits - 1))


# --- formats --------------------------------------------------------------------------------------------------

def _granularity(block: list[int], shape: tuple[int, ...]) -> str:
    if len(block) != 2:
        return "blocks"
    if block[0] == 1 and block[1] == shape[1]:
        return "rows"
    if list(block) == list(shape):
        return "tensor"
    return "grouped" if block[0] == 1 else "blocks"


def fmt_of(t: torch.Tensor) -> str:
    """The packed-layout name of a torchao subclass: 'torchao:int8_rows', 'torchao:float8_e4m3_tensor+dyn_float8'."""
    kind = type(t).__name__
    block = list(getattr(t, "block_size", None) or [])
    gran = _granularity(block, tuple(t.shape))
    act = None
    if kind == "Int8Tensor":
        base, act = f"int8_{gran}", "int8" if t.act_quant_kwargs is not None else None
    elif kind == "Float8Tensor":
        flavour = "e4m3" if t.qdata.dtype == torch.float8_e4m3fn else "e5m2"
        base, act = f"float8_{flavour}_{gran}", "float8" if t.act_quant_kwargs is not None else None
    elif kind == "IntxUnpackedToInt8Tensor":
        bits = _intx_bits(t)
        base = f"int{bits}_{gran}" + ("_bitplanes" if bits < 8 else "")
        act = "int8" if t.activation_quantization is not None else None
    else:
        base = kind
    return FMT_PREFIX + base + (f"+dyn_{act}" if act else "")


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


def _float8_dynamic_off_cuda(name: str, weight: torch.Tensor, cfg: Any) -> torch.Tensor:
    """What torchao's Float8DynamicActivationFloat8WeightConfig handler builds, without its CUDA-only gate."""
    from torchao.float8.inference import _granularity_is_a_1_128_w_128_128
    from torchao.quantization import Float8Tensor, PerRow
    from torchao.quantization.quantize_.workflows import QuantizeTensorToFloat8Kwargs
    from torchao.quantization.quantize_.workflows.float8.float8_packing_format import Float8PackingFormat

    problem = _scaled_mm_problem(weight.device)
    if problem is not None:
        raise _float8_dynamic_needs(weight.device, problem)
    if cfg.packing_format != Float8PackingFormat.PLAIN or _granularity_is_a_1_128_w_128_128(cfg.granularity):
        raise BackendUnavailableError(
            f"TorchAoConfig.quant_type: float8 dynamic quantization with packing {cfg.packing_format.value!r} and "
            f"granularity {cfg.granularity} needs a CUDA GPU with compute capability >= 8.9; on {weight.device} only "
            "plain packing with PerTensor or PerRow granularity runs")
    act_granularity, weight_granularity = cfg.granularity
    if isinstance(weight_granularity, PerRow) and weight.dtype != torch.bfloat16:
        raise ConfigValueError("load_model", "torch_dtype", weight.dtype, [torch.bfloat16],
                               hint=f"layer {name!r}: torchao's per-row float8 quantization takes bfloat16 "
                                    "weights only")
    act = QuantizeTensorToFloat8Kwargs(cfg.activation_dtype, act_granularity, hp_value_lb=cfg.activation_value_lb,
                                       hp_value_ub=cfg.activation_value_ub, kernel_preference=cfg.kernel_preference)
    return Float8Tensor.from_hp(weight, float8_dtype=cfg.weight_dtype, granularity=weight_granularity,
                                mm_config=cfg.mm_config, kernel_preference=cfg.kernel_preference, act_quant_kwargs=act)


# --- the quantized weights ------------------------------------------------------------------------------------

class TorchAoWeight(QuantizedWeight):
    """A torchao tensor subclass kept as plain buffers + torchao's JSON description (meta["torchao"]).

    `subclass()` rebuilds the torchao tensor (cached until the buffers move; rebuilt per call when its codes are
    bit-plane packed, so memory holds n bits per weight); `linear` hands it to F.linear for torchao's dispatch.
    """

    backend = "torchao"

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
    return json_dtype((w.meta.get("torchao", {}).get("_data") or {}).get("dtype"))


# the formats `fmt_of` names that quantserve's kernels take (weight-only), and how to view them
_PACKED = {
    FMT_PREFIX + "int8_rows": _int8_rows,
    **{f"{FMT_PREFIX}float8_{flavour}_{gran}": _float8 for flavour in ("e4m3", "e5m2") for gran in ("rows", "tensor")},
}


class Int4GroupedWeight(QuantizedWeight):
    """quantserve's int4_grouped (torchao Int4Tensor's layout): two codes per byte, bf16 scale and zero per group."""

    backend = "torchao"

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


def _row_axis(t: torch.Tensor, rows: int) -> int | None:
    """The axis of a component tensor with one entry per weight row (the first such), None when it has none."""
    return next((i for i, n in enumerate(t.shape) if n == rows), None)


def _int8_weight_in_c(w: torch.Tensor, quantize_one: Any) -> torch.Tensor | None:
    """int8wo through quantserve's C quantizer (torchao's per-row symmetric arithmetic, one pass, no temporaries):
    torchao quantizes two probe rows first, for the subclass's description and to check that the C kernel gives
    its very bytes with this torchao; None (use torchao) when anything differs or the CPU kernels are unavailable."""
    if w.device.type != "cpu" or w.dim() != 2 or w.shape[0] < 2 or w.dtype not in (torch.float32, torch.bfloat16,
                                                                                  torch.float16):
        return None
    from ...kernels import cpu as cpu_kernels
    from ...kernels import cpu_build

    if cpu_build.problem() is not None:
        return None
    probe = quantize_one(w[:2].contiguous())
    desc = _describe(probe)
    if (desc.get("_type") != "Int8Tensor" or sorted(desc.get("_tensor_data_names") or []) != ["qdata", "scale", "zero_point"]
            or list((desc.get("_data") or {}).get("block_size") or []) != [1, w.shape[1]]
            or getattr(probe, "zero_point", None) is None or bool(probe.zero_point.any())):
        return None
    eps = torch.finfo(torch.float32).eps
    q2, s2 = cpu_kernels.quantize_int8_symmetric(w[:2], eps)
    if not (torch.equal(q2, probe.qdata) and probe.scale.dtype == s2.dtype and torch.equal(s2, probe.scale)
            and tuple(probe.scale.shape) == (2, 1)):
        return None
    if probe.zero_point.dtype != torch.int8 or tuple(probe.zero_point.shape) != (2, 1):
        return None
    qdata, scale = cpu_kernels.quantize_int8_symmetric(w, eps)
    return _rebuild(desc, {"qdata": qdata, "scale": scale, "zero_point": torch.zeros(w.shape[0], 1, dtype=torch.int8)})


def _int4_weight(weight: torch.Tensor, cfg: Any, chunk_elements: int | None = None) -> Int4GroupedWeight:
    """int4wo: min-max (torchao's default) or HQQ (torchao's own HQQ solver) qparams, in int4_grouped.

    Min-max is per group of a row, so it runs over row chunks (same bytes); HQQ stays whole: its solver stops on
    the error of the whole tensor, so chunks would take different iteration counts."""
    from torchao.quantization.quantize_.workflows.int4.int4_choose_qparams_algorithm import Int4ChooseQParamsAlgorithm

    group = int(cfg.group_size)
    if cfg.int4_choose_qparams_algorithm == Int4ChooseQParamsAlgorithm.HQQ:
        from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

        codes, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
            weight, nbits=4, group_size=group, axis=1, compute_dtype=torch.bfloat16, device=weight.device,
            verbose=False, raw_output=False)
        return Int4GroupedWeight(int4_grouped_from_unsigned(codes, scale, zero, group), {"qparams": "hqq"})
    if chunk_elements is None or not needs_chunks(weight, chunk_elements):
        return Int4GroupedWeight(quantize_int4_grouped(weight, group), {"qparams": "minmax"})
    parts = map_rows(lambda c: quantize_int4_grouped(c, group), weight, chunk_elements)
    packed = Int4Grouped(torch.cat([p.qdata for p in parts]), torch.cat([p.scale for p in parts], dim=1),
                         torch.cat([p.zero_point for p in parts], dim=1), group)
    return Int4GroupedWeight(packed, {"qparams": "minmax"})


def _int4_from_torchao(t: torch.Tensor) -> Int4GroupedWeight | None:
    """A torchao Int4Tensor (what a GPU writes for int4wo) as int4_grouped, when it is the plain bf16 kind."""
    block = list(t.block_size)
    if t.qdata.dim() != 2 or block[0] != 1 or t.act_pre_scale is not None or t.activation_dtype != torch.bfloat16:
        return None
    return Int4GroupedWeight(Int4Grouped(t.qdata.contiguous(), t.scale.contiguous(), t.zero_point.contiguous(),
                                         block[-1]), {"qparams": "torchao Int4Tensor"})


# --- the backend ----------------------------------------------------------------------------------------------

def _group_size_problem(cfg: Any, in_features: int) -> str | None:
    sizes = []
    for attr in ("group_size", "granularity", "weight_granularity"):
        value = getattr(cfg, attr, None)
        if isinstance(value, (list, tuple)):
            value = value[-1]
        size = value if isinstance(value, int) and not isinstance(value, bool) else getattr(value, "group_size", None)
        if isinstance(size, int):
            sizes.append(size)
    for size in sizes:
        if size <= 0 or in_features % size:
            return f"in_features {in_features} is not a multiple of group_size {size} ({type(cfg).__name__})"
    return None


def shape_problem(cfg: Any, out_features: int, in_features: int) -> str | None:
    """Why torchao would skip (or fail on) a Linear of this shape under `cfg`, or None."""
    q = _torchao()
    problem = _group_size_problem(cfg, in_features)
    if problem:
        return problem
    if isinstance(cfg, q.Int4WeightOnlyConfig) and in_features % 2:
        return f"in_features {in_features} is odd; int4 packs two codes per byte"
    if isinstance(cfg, q.Float8DynamicActivationFloat8WeightConfig) and (in_features % 16 or out_features % 16):
        return (f"torchao float8 dynamic quantization needs in_features and out_features that are multiples of 16, "
                f"got {out_features}x{in_features}")
    if isinstance(cfg, q.Float8DynamicActivationFloat8WeightConfig) and out_features == in_features == 128:
        # torchao 0.18 reads a per-tensor scale of a 128x128 weight as 128x128 block scaling, then asserts at run
        # time ("input_tensor must be 1x128 scaled") for more than one input row
        return "torchao float8 dynamic quantization misreads a 128x128 weight's scale as 128x128 blocks"
    return None


def _resolve_fqn(table: dict[str, Any], name: str) -> Any:
    """diffusers' resolution of an FqnToConfig for one Linear: exact '{name}.weight' or '{name}', then the first
    're:' pattern that fully matches either, then '_default' (None: no config, the layer stays dense)."""
    param = f"{name}.weight"
    for fqn in (param, name):
        if fqn in table:
            return table[fqn]
    for fqn in (param, name):
        for pattern, config in table.items():
            if pattern.startswith("re:") and re.fullmatch(pattern[3:], fqn):
                return config
    return table.get("_default")


class TorchAoBackend(Backend, config=TorchAoConfig):
    name = "torchao"
    config: TorchAoConfig

    def __init__(self, config: TorchAoConfig, compute_dtype: torch.dtype = torch.bfloat16, **options: Any):
        super().__init__(config, compute_dtype, **options)
        self._ao_config: Any = None
        self._quiet: dict[int, Any] = {}
        self._metadata: weakref.WeakKeyDictionary[Any, dict[str, Any] | None] = weakref.WeakKeyDictionary()

    # planning
    def ao_config(self) -> Any:
        """The torchao config object (built once from the shorthand, or the AOBaseConfig given)."""
        if self._ao_config is None:
            _torchao()
            self._ao_config = self.config.to_ao_config()
        return self._ao_config

    def layer_config(self, name: str) -> Any:
        """The torchao config for layer `name`: an FqnToConfig is resolved as diffusers resolves it (exact
        '{name}.weight' or '{name}', then 're:' patterns, then '_default'); None leaves the layer dense."""
        cfg = self.ao_config()
        fqn_type = getattr(_torchao(), "FqnToConfig", None)
        if fqn_type is None or not isinstance(cfg, fqn_type):
            return cfg
        found = _resolve_fqn(cfg.fqn_to_config, name)
        if isinstance(found, fqn_type):
            raise ConfigValueError("TorchAoConfig", "quant_type", type(found).__name__,
                                   "an FqnToConfig whose entries are plain torchao configs or None",
                                   hint=f"layer {name!r} resolves to a nested FqnToConfig")
        return found

    def can_quantize(self, name: str, module: nn.Module) -> tuple[bool, str]:
        ok, why = super().can_quantize(name, module)
        if not ok:
            return ok, why
        cfg = self.layer_config(name)
        if cfg is None:
            return False, "the FqnToConfig maps this layer to no config"
        problem = shape_problem(cfg, module.out_features, module.in_features)
        return (False, f"kept dense: {problem}") if problem else (True, "")

    # loading
    def _without_global_side_effects(self, cfg: Any) -> Any:
        """The config with set_inductor_config off: quantize_ would otherwise change torch._inductor's global config."""
        if not getattr(cfg, "set_inductor_config", False) or not dataclasses.is_dataclass(cfg):
            return cfg
        if id(cfg) not in self._quiet:
            self._quiet[id(cfg)] = dataclasses.replace(cfg, set_inductor_config=False)
        return self._quiet[id(cfg)]

    def quantize(self, name: str, weight: torch.Tensor) -> QuantizedWeight:
        q = _torchao()
        cfg = self.layer_config(name)
        if cfg is None:
            raise ConfigValueError("TorchAoConfig", "quant_type", "FqnToConfig", "a config for every layer quantized",
                                   hint=f"layer {name!r} maps to None")
        problem = shape_problem(cfg, *weight.shape)
        if problem:
            raise ConfigValueError("TorchAoConfig", "quant_type", type(cfg).__name__,
                                   "a config that fits the layer's shape", hint=f"layer {name!r}: {problem}")
        w = weight.detach()
        if w.is_floating_point() and w.dtype != self.compute_dtype:
            w = w.to(self.compute_dtype)
        if isinstance(cfg, q.Int4WeightOnlyConfig):
            return _int4_weight(w, cfg, self.chunk_elements)
        if isinstance(cfg, q.Int8WeightOnlyConfig):
            fast = _int8_weight_in_c(w, lambda c: self._quantize_(name, c, cfg))
            if fast is not None:
                return TorchAoWeight.from_subclass(fast)
        if isinstance(cfg, q.Float8DynamicActivationFloat8WeightConfig) and w.device.type not in ("cuda", "xpu"):
            return TorchAoWeight.from_subclass(self._chunked(w, lambda c: _float8_dynamic_off_cuda(name, c, cfg)))
        return TorchAoWeight.from_subclass(self._chunked(w, lambda c: self._quantize_(name, c, cfg)))

    def _chunked(self, w: torch.Tensor, quantize_one: Any) -> torch.Tensor:
        """The subclass `quantize_one(w)` makes, computed over row chunks when its scales allow it (same tensors).

        Per-row and per-group subclasses (block_size[0] == 1) are the chunks' tensors concatenated along the rows;
        a per-tensor Float8Tensor gets its scale from the global amax, then each chunk is quantized with it;
        anything else is quantized whole."""
        if not needs_chunks(w, self.chunk_elements):
            return quantize_one(w)
        first_rows = next(iter(map_rows(lambda c: c.shape[0], w, self.chunk_elements)))
        first = quantize_one(w[:first_rows].contiguous())
        desc = _describe(first)
        block = list(desc["_data"].get("block_size") or [])
        names = list(desc["_tensor_data_names"])
        axes = {n: _row_axis(getattr(first, n), first_rows) for n in names}
        rowwise = len(block) == 2 and block[0] == 1 and None not in axes.values()
        if not rowwise:
            if desc["_type"] == "Float8Tensor" and block == [first_rows, w.shape[1]]:
                return self._float8_per_tensor(w, first, desc)
            return quantize_one(w)
        parts = [first] + map_rows(quantize_one, w[first_rows:], self.chunk_elements)
        for part in parts[1:]:
            if _describe(part) != desc:
                return quantize_one(w)  # a chunk came out differently described: not row-separable after all
        tensors = {n: torch.cat([getattr(p, n) for p in parts], dim=axes[n]) for n in names}
        return _rebuild(desc, tensors)

    def _float8_per_tensor(self, w: torch.Tensor, first: torch.Tensor, desc: dict[str, Any]) -> torch.Tensor:
        """Float8Tensor.from_hp with a per-tensor scale, a chunk at a time: the scale from the exact global amax
        through torchao's own `_choose_scale_float8`, each chunk through its `_quantize_affine_float8`."""
        from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

        float8_dtype = first.qdata.dtype
        amax = absmax(w, self.chunk_elements).reshape(1, 1)
        scale = _choose_scale_float8(amax, block_size=[1, 1], float8_dtype=float8_dtype)
        qdata = torch.cat(map_rows(lambda c: _quantize_affine_float8(c, scale, float8_dtype), w, self.chunk_elements))
        full = json.loads(json.dumps(desc))
        full["_data"]["block_size"] = list(w.shape)
        return _rebuild(full, {"qdata": qdata, "scale": scale.reshape(first.scale.shape)})

    def _quantize_(self, name: str, weight: torch.Tensor, cfg: Any) -> torch.Tensor:
        """torchao.quantization.quantize_ on a one-layer Linear holding `weight`; the subclass it leaves there."""
        from torchao.utils import TorchAOBaseTensor

        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        try:
            _torchao().quantize_(linear, self._without_global_side_effects(cfg))
        except (AssertionError, ImportError, NotImplementedError, RuntimeError) as exc:
            raise BackendUnavailableError(
                f"torchao {type(cfg).__name__} cannot quantize layer {name!r} ({weight.shape[0]}x{weight.shape[1]}, "
                f"{weight.dtype}) on {weight.device}: {type(exc).__name__}: {exc}") from exc
        t = linear.weight
        if not isinstance(t, TorchAOBaseTensor):
            raise BackendUnavailableError(f"torchao {type(cfg).__name__} left layer {name!r} "
                                          f"({weight.shape[0]}x{weight.shape[1]}) unquantized on {weight.device}")
        allowed = _safetensors_utils().ALLOWED_TENSORS_SUBCLASSES
        if type(t).__name__ not in allowed:
            raise BackendUnavailableError(
                f"torchao {type(cfg).__name__} made a {type(t).__name__} for layer {name!r}, which torchao cannot "
                f"store as safetensors; quantserve keeps only {allowed}")
        return t.detach()

    def from_packed(self, name: str, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    out_features: int, in_features: int) -> QuantizedWeight:
        where = f"layer {name!r} ({fmt})"
        try:
            if fmt == FMT_INT4:
                packed = Int4Grouped(tensors["qdata"], tensors["scale"], tensors["zero_point"],
                                     int(meta["group_size"]))
                weight: QuantizedWeight = Int4GroupedWeight(packed, meta)
            elif fmt.startswith(FMT_PREFIX):
                weight = TorchAoWeight(fmt, meta, tensors)
                weight.subclass()  # fail at load, not at the first forward
            else:
                raise ValueError(f"not a torchao format; accepted: {FMT_INT4!r} or {FMT_PREFIX!r}...")
        except (KeyError, ValueError, TypeError, AssertionError, RuntimeError) as exc:
            raise CheckpointError(f"{where}: cannot rebuild the torchao weight: {type(exc).__name__}: {exc}") from exc
        if (weight.out_features, weight.in_features) != (out_features, in_features):
            raise CheckpointError(f"{where}: stored as {weight.out_features}x{weight.in_features}, "
                                  f"the model needs {out_features}x{in_features}")
        return weight

    def read_checkpoint_layer(self, name: str, source: Any) -> QuantizedWeight | None:
        """A layer diffusers saved with torchao: safetensors tensors '{name}._weight_{part}' and, in the header,
        '{name}.weight' -> torchao's JSON description (torchao's flatten_tensor_state_dict)."""
        entries = self._torchao_entries(source)
        entry = entries.get(f"{name}.weight") if entries else None
        if entry is None or entry.get("_type") == "Tensor":
            return None
        tensors = {}
        for part in entry.get("_tensor_data_names") or []:
            key = f"{name}._weight_{part}"
            if key not in source:
                raise CheckpointError(f"{source.path}: has no tensor {key!r}, which its torchao metadata for "
                                      f"{name}.weight names")
            tensors[part] = source.get(key)
        try:
            t = _rebuild(entry, tensors)
        except (ValueError, TypeError, AssertionError, RuntimeError) as exc:
            raise CheckpointError(f"{source.path}: {name}.weight: cannot rebuild the torchao tensor: {exc}") from exc
        if type(t).__name__ == "Int4Tensor":
            weight = _int4_from_torchao(t)
            if weight is not None:
                return weight
        return TorchAoWeight.from_subclass(t)

    def checkpoint_keys(self, name: str, source: Any) -> list[str]:
        """diffusers' torchao checkpoints store a layer's parts as '{name}._weight_{part}'."""
        return [k for k in source.keys() if k.startswith(f"{name}._weight_")]

    def _torchao_entries(self, source: Any) -> dict[str, Any] | None:
        """The parsed torchao header of `source` (None when it holds none), once per source."""
        try:
            return self._metadata[source]
        except (KeyError, TypeError):
            pass
        metadata = source.metadata()
        entries = None
        if "tensor_names" in metadata and _safetensors_utils().is_metadata_torchao(metadata):
            entries = {k: json.loads(metadata[k]) for k in json.loads(metadata["tensor_names"]) if k in metadata}
        try:
            self._metadata[source] = entries
        except TypeError:
            pass
        return entries
