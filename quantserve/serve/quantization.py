"""The forms a variant's `quantization` takes, checked before anything loads, and the short label metrics carry.

Every form `quantserve.runtime.load_pipeline` accepts: a scheme name (the denoiser only), a quantization_config
block (the denoiser only), a mapping component -> scheme / block / null, or a PipelineQuantizationConfig in its dict
form ({quant_backend, quant_kwargs, components_to_quantize} or {quant_mapping}). Whether the components a mapping
names exist is known only beside the model directory: the variant's family checks that (`PipelineFamily.check`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

BF16_NAMES = ("bf16", "none")  # quantization values meaning "no quantization"
COMPONENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_LABEL_CHARS = 96


def is_single_config(value: Any) -> bool:
    """A scheme name or one config block (for one model), as opposed to a mapping by component."""
    return isinstance(value, str) or (isinstance(value, Mapping) and (
        "quant_method" in value or any(str(k).startswith(("load_in", "_load_in")) for k in value)))


def is_pipeline_config(value: Any) -> bool:
    """The dict form of a PipelineQuantizationConfig."""
    from quantserve.runtime.pipeline_config import PIPELINE_KEYS

    return isinstance(value, Mapping) and bool(value) and set(value) <= set(PIPELINE_KEYS)


def _check_one(value: Any, where: str = "") -> None:
    """A scheme name, a config block, or None/'bf16' (not quantized)."""
    from quantserve.runtime.schemes import SCHEMES, resolve_quantization_config

    prefix = f"{where}: " if where else ""
    if value is None or (isinstance(value, str) and value in BF16_NAMES):
        return
    if isinstance(value, str):
        if value not in SCHEMES:
            raise ValueError(f"{prefix}unknown scheme {value!r}; accepted: {', '.join(SCHEMES)} or a "
                             "quantization_config mapping")
        return
    if not isinstance(value, Mapping):
        raise ValueError(f"{prefix}expected a scheme name or a quantization_config block, got {type(value).__name__}")
    try:
        resolve_quantization_config(dict(value))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{prefix}{exc}") from None


def check_quantization(value: Any) -> None:
    """Raise ValueError naming the part of `value` that load_pipeline would refuse (component names aside)."""
    if value is None or is_single_config(value):
        _check_one(value)
        return
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a scheme name, a quantization_config block, a mapping component -> scheme, or a "
                         f"PipelineQuantizationConfig, got {type(value).__name__}")
    if not value:
        raise ValueError("an empty mapping quantizes nothing: write bf16 (or null) instead")
    if is_pipeline_config(value):
        from quantserve.runtime.pipeline_config import PipelineQuantizationConfig

        try:
            config = PipelineQuantizationConfig.from_dict(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(str(exc)) from None
        for name, spec in (config.quant_mapping or {}).items():
            _check_component(name, spec, "quant_mapping")
        return
    for name, spec in value.items():
        _check_component(name, spec)


def _check_component(name: Any, spec: Any, parent: str = "") -> None:
    where = f"{parent}.{name}" if parent else str(name)
    if not isinstance(name, str) or not COMPONENT_NAME.fullmatch(name):
        raise ValueError(f"{where}: a component name such as transformer or text_encoder_2, got {name!r}")
    if spec is not None and not is_single_config(spec):
        raise ValueError(f"{where}: expected a scheme name, a quantization_config block or null, got {spec!r}")
    _check_one(spec, where)


def _label_one(spec: Any) -> str:
    if spec is None or (isinstance(spec, str) and spec in BF16_NAMES):
        return "bf16"
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return str(spec.get("quant_method", "custom"))
    return type(spec).__name__


def quantization_label(spec: Any) -> str:
    """'nf4', 'bitsandbytes' (a block's quant_method), 'transformer=nf4,text_encoder_2=int8wo' or 'bf16'."""
    if spec is None or is_single_config(spec):
        return _label_one(spec)
    if not isinstance(spec, Mapping):
        return type(spec).__name__
    if is_pipeline_config(spec):
        if spec.get("quant_backend"):
            parts = spec.get("components_to_quantize")
            label = str(spec["quant_backend"])
            return (label + ":" + ",".join(map(str, parts)) if parts else label)[:MAX_LABEL_CHARS]
        spec = spec.get("quant_mapping") or {}
    parts = [f"{name}={_label_one(value)}" for name, value in spec.items() if _label_one(value) != "bf16"]
    return (",".join(parts) or "bf16")[:MAX_LABEL_CHARS]


def component_names(spec: Any) -> list[str]:
    """The components a mapping or PipelineQuantizationConfig names (empty for a scheme or a single block)."""
    if spec is None or is_single_config(spec) or not isinstance(spec, Mapping):
        return []
    if is_pipeline_config(spec):
        if "quant_mapping" in spec:
            return list(spec["quant_mapping"] or {})
        return list(spec.get("components_to_quantize") or [])
    return list(spec)
