"""torchao tensor subclasses as plain tensors and JSON: torchao's own description (rebuilt only through
its allow-listed `object_from_dict`), sub-byte codes in bit planes, and the packed-layout names (`fmt_of`).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ...dtypes import dtype_from_name
from ...errors import BackendUnavailableError

FMT_INT4 = "int4_grouped"
FMT_PREFIX = "torchao:"
BITPLANES = "qdata_bitplanes"


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
        if value.get("_type") == "torch.dtype":
            dtype_from_name(str(value.get("_data")), field_name="torchao description")  # a ValueError when not a dtype
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
