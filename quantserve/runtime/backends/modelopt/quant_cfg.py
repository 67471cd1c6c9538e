"""The modelopt quant_cfg of an NVIDIAModelOptConfig: its explicit `modelopt_config`, else one derived from
`quant_type` as diffusers derives it, in the JSON form modelopt reads.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ...config import NVIDIAModelOptConfig
from ...errors import ConfigValueError
from .common import ACTIVATION_CFG, ACTIVATION_TYPES, OWNER, _mtq

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
