"""The table of torchao string shorthands ("int8wo", "float8dq_e4m3", ...) and the torchao config each one means.

diffusers accepted these names before it moved to `AOBaseConfig` instances, and configs written then still carry
them. Each entry says which keyword arguments it takes (kept in `TorchAoConfig.quant_type_kwargs`) and builds the
torchao config object lazily, so that reading or writing a config never imports torchao.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigTypeError, ConfigValueError


@dataclass(frozen=True)
class KwargSpec:
    """What one shorthand keyword accepts: a type, optionally a closed set of values, optionally None."""

    kind: type
    choices: tuple[Any, ...] | None = None
    allow_none: bool = False
    minimum: int | None = None

    def check(self, owner: str, name: str, value: Any) -> Any:
        if value is None and self.allow_none:
            return None
        if isinstance(value, bool) and self.kind is not bool:
            raise ConfigTypeError(owner, name, value, self.kind.__name__)
        if not isinstance(value, self.kind):
            raise ConfigTypeError(owner, name, value, self.kind.__name__ + (" or None" if self.allow_none else ""))
        if self.choices is not None and value not in self.choices:
            raise ConfigValueError(owner, name, value, self.choices)
        if self.minimum is not None and value < self.minimum:
            raise ConfigValueError(owner, name, value, f"an integer >= {self.minimum}")
        return value


@dataclass(frozen=True)
class Shorthand:
    """One string shorthand: the torchao config class it builds, its accepted kwargs, and whether it is float8."""

    name: str
    torchao_class: str
    build: Callable[[Mapping[str, Any]], Any] = field(repr=False)
    kwargs: Mapping[str, KwargSpec] = field(default_factory=dict)
    float8: bool = False
    bits: float = 16.0
    summary: str = ""


def _q():
    import torchao.quantization as q

    return q


_INT4_KWARGS = {
    "group_size": KwargSpec(int, (32, 64, 128, 256)),
    # torchao >= 0.15 packs tinygemm tiles with inner_k_tiles=8 only; given, it selects that packed layout.
    "inner_k_tiles": KwargSpec(int, (8,)),
    "use_hqq": KwargSpec(bool),
}


def _int4wo(kw: Mapping[str, Any]):
    q = _q()
    from torchao.quantization.quantize_.workflows.int4.int4_choose_qparams_algorithm import (
        Int4ChooseQParamsAlgorithm,
    )
    from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

    args: dict[str, Any] = {"group_size": kw.get("group_size", 128)}
    if kw.get("use_hqq"):
        args["int4_choose_qparams_algorithm"] = Int4ChooseQParamsAlgorithm.HQQ
    if "inner_k_tiles" in kw:
        args["int4_packing_format"] = Int4PackingFormat.TILE_PACKED_TO_4D
    return q.Int4WeightOnlyConfig(**args)


def _int4dq(kw: Mapping[str, Any]):
    q = _q()
    return q.Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=q.PerGroup(kw.get("group_size", 32))
    )


def _int8wo(kw: Mapping[str, Any]):
    q = _q()
    group = kw.get("group_size")
    return q.Int8WeightOnlyConfig(granularity=q.PerRow() if group is None else q.PerGroup(group))


def _int8dq(kw: Mapping[str, Any]):
    from torchao.quantization.quant_primitives import MappingType

    mapping = MappingType[kw.get("act_mapping_type", "symmetric").upper()]
    return _q().Int8DynamicActivationInt8WeightConfig(
        act_mapping_type=mapping, weight_only_decode=kw.get("weight_only_decode", False)
    )


def _float8wo(dtype_name: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda kw: _q().Float8WeightOnlyConfig(weight_dtype=getattr(torch, dtype_name))


def _float8dq(granularity: str | None) -> Callable[[Mapping[str, Any]], Any]:
    def build(kw: Mapping[str, Any]):
        q = _q()
        kind = granularity or kw.get("granularity", "tensor")
        gran = q.PerRow() if kind == "row" else q.PerTensor()
        return q.Float8DynamicActivationFloat8WeightConfig(
            activation_dtype=torch.float8_e4m3fn, weight_dtype=torch.float8_e4m3fn, granularity=[gran, gran]
        )

    return build


def _uintxwo(bits: int) -> Callable[[Mapping[str, Any]], Any]:
    def build(kw: Mapping[str, Any]):
        q = _q()
        from torchao.quantization.quant_primitives import MappingType

        return q.IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{bits}"),
            granularity=q.PerGroup(kw.get("group_size", 64)),
            mapping_type=MappingType.ASYMMETRIC,
        )

    return build


GROUP_SIZES = (32, 64, 128, 256)
_GROUP = {"group_size": KwargSpec(int, GROUP_SIZES)}
_GROUP_OR_NONE = {"group_size": KwargSpec(int, GROUP_SIZES, allow_none=True)}
_INT8DQ_KWARGS = {
    "act_mapping_type": KwargSpec(str, ("symmetric", "asymmetric")),
    "weight_only_decode": KwargSpec(bool),
}
_FLOAT8DQ_KWARGS = {"granularity": KwargSpec(str, ("tensor", "row"))}


def _table() -> dict[str, Shorthand]:
    rows: list[Shorthand] = []
    for name in ("int4wo", "int4_weight_only"):
        rows.append(Shorthand(name, "Int4WeightOnlyConfig", _int4wo, _INT4_KWARGS, bits=4, summary="int4 weights, grouped, bf16 activations"))
    for name in ("int4dq", "int8_dynamic_activation_int4_weight"):
        rows.append(Shorthand(name, "Int8DynamicActivationIntxWeightConfig", _int4dq, _GROUP, bits=4, summary="int4 weights, int8 dynamic activations"))
    for name in ("int8wo", "int8_weight_only"):
        rows.append(Shorthand(name, "Int8WeightOnlyConfig", _int8wo, _GROUP_OR_NONE, bits=8, summary="int8 weights per row"))
    for name in ("int8dq", "int8_dynamic_activation_int8_weight"):
        rows.append(Shorthand(name, "Int8DynamicActivationInt8WeightConfig", _int8dq, _INT8DQ_KWARGS, bits=8, summary="int8 weights and dynamic int8 activations"))
    # diffusers' "float8wo" has always meant e5m2 weights; torchao's own default is e4m3.
    for name, dtype in (("float8wo", "float8_e5m2"), ("float8wo_e5m2", "float8_e5m2"), ("float8wo_e4m3", "float8_e4m3fn"), ("float8_weight_only", "float8_e4m3fn")):
        rows.append(Shorthand(name, "Float8WeightOnlyConfig", _float8wo(dtype), float8=True, bits=8, summary=f"{dtype} weights"))
    for name in ("float8dq", "float8dq_e4m3", "float8_dynamic_activation_float8_weight"):
        rows.append(Shorthand(name, "Float8DynamicActivationFloat8WeightConfig", _float8dq(None), _FLOAT8DQ_KWARGS, float8=True, bits=8, summary="float8_e4m3fn weights and dynamic activations"))
    for gran in ("tensor", "row"):
        rows.append(Shorthand(f"float8dq_e4m3_{gran}", "Float8DynamicActivationFloat8WeightConfig", _float8dq(gran), float8=True, bits=8, summary=f"float8_e4m3fn weights and activations, scaled per {gran}"))
    for bits in range(1, 8):
        rows.append(Shorthand(f"uint{bits}wo", "IntxWeightOnlyConfig", _uintxwo(bits), _GROUP, bits=bits, summary=f"{bits}-bit asymmetric weights, grouped"))
    return {row.name: row for row in rows}


SHORTHANDS: Mapping[str, Shorthand] = _table()
