"""Named quantization presets ("schemes"): the one table every command uses to turn `--scheme nf4` into a config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .config import (
    BitsAndBytesConfig,
    GGUFQuantizationConfig,
    NVIDIAModelOptConfig,
    QuantizationConfigMixin,
    QuantizationMethod,
    QuantoConfig,
    TorchAoConfig,
    quantization_config_from_dict,
)
from .backends.gguf import scheme_name
from .errors import ConfigTypeError, ConfigValueError


@dataclass(frozen=True)
class Scheme:
    """A named preset: the config it builds (None for bf16), its backend, and, for GGUF, the ggml block type."""

    name: str
    backend: QuantizationMethod | None
    build: Callable[[], QuantizationConfigMixin | None]
    summary: str
    bits: float
    gguf_type: str | None = None

    def config(self) -> QuantizationConfigMixin | None:
        """A fresh config object (callers may change it without touching the table)."""
        return self.build()


def _bnb4(kind: str) -> Callable[[], QuantizationConfigMixin]:
    return lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.bfloat16)


def _ao(name: str) -> Callable[[], QuantizationConfigMixin]:
    return lambda: TorchAoConfig(name)


def _quanto(dtype: str) -> Callable[[], QuantizationConfigMixin]:
    return lambda: QuantoConfig(weights_dtype=dtype)


def _gguf() -> QuantizationConfigMixin:
    return GGUFQuantizationConfig(compute_dtype=torch.bfloat16)


def _gguf_row(qtype: str, summary: str, bits: float) -> Scheme:
    """A gguf-* scheme: GGUF blocks of `qtype`, quantized on load (the backend names it with `scheme_name`)."""
    return Scheme(scheme_name(qtype), QuantizationMethod.GGUF, _gguf, summary, bits, gguf_type=qtype)


def _modelopt(quant_type: str, **kwargs: Any) -> Callable[[], QuantizationConfigMixin]:
    return lambda: NVIDIAModelOptConfig(quant_type=quant_type, **kwargs)


_BNB = QuantizationMethod.BITS_AND_BYTES
_AO = QuantizationMethod.TORCHAO
_QUANTO = QuantizationMethod.QUANTO
_GGUF = QuantizationMethod.GGUF
_MO = QuantizationMethod.MODELOPT

_ROWS = (
    Scheme("bf16", None, lambda: None, "no quantization: bfloat16 weights", 16),
    Scheme("nf4", _BNB, _bnb4("nf4"), "bitsandbytes NF4, blocks of 64, bf16 compute", 4.5),
    Scheme("fp4", _BNB, _bnb4("fp4"), "bitsandbytes FP4, blocks of 64, bf16 compute", 4.5),
    Scheme("llm-int8", _BNB, lambda: BitsAndBytesConfig(load_in_8bit=True), "bitsandbytes LLM.int8 (int8 rows, fp16 outliers)", 8),
    Scheme("int8wo", _AO, _ao("int8wo"), "torchao int8 weight-only, per row", 8),
    Scheme("int8dq", _AO, _ao("int8dq"), "torchao int8 weights and dynamic int8 activations", 8),
    Scheme("int4wo", _AO, _ao("int4wo"), "torchao int4 weight-only, groups of 128", 4.25),
    Scheme("float8wo", _AO, _ao("float8wo_e4m3"), "torchao float8 e4m3 weight-only", 8),
    Scheme("float8dq", _AO, _ao("float8dq"), "torchao float8 e4m3 weights and dynamic activations", 8),
    Scheme("quanto-int8", _QUANTO, _quanto("int8"), "optimum-quanto int8 weights", 8),
    Scheme("quanto-int4", _QUANTO, _quanto("int4"), "optimum-quanto int4 weights, grouped", 4.5),
    Scheme("quanto-int2", _QUANTO, _quanto("int2"), "optimum-quanto int2 weights, grouped", 2.5),
    Scheme("quanto-float8", _QUANTO, _quanto("float8"), "optimum-quanto float8 e4m3 weights", 8),
    _gguf_row("Q8_0", "GGUF Q8_0 blocks (32 int8 + fp16 scale)", 8.5),
    _gguf_row("Q4_0", "GGUF Q4_0 blocks (32 int4 + fp16 scale)", 4.5),
    _gguf_row("Q4_K", "GGUF Q4_K super-blocks of 256", 4.5),
    _gguf_row("Q6_K", "GGUF Q6_K super-blocks of 256", 6.5625),
    Scheme("modelopt-fp8", _MO, _modelopt("FP8"), "ModelOpt FP8 e4m3 weights, per tensor", 8),
    Scheme("modelopt-int8", _MO, _modelopt("INT8", channel_quantize=0), "ModelOpt INT8 weights, per output channel", 8),
    Scheme("modelopt-int4", _MO, _modelopt("INT4", channel_quantize=-1, block_quantize=128), "ModelOpt INT4 weights, blocks of 128 (fp32 scales)", 4.25),
    Scheme("modelopt-nvfp4", _MO, _modelopt("NVFP4", channel_quantize=-1, block_quantize=16, scale_channel_quantize=-1, scale_block_quantize=16),
           "ModelOpt NVFP4 (e2m1, blocks of 16 with e4m3 scales)", 4.5),
)

SCHEMES: Mapping[str, Scheme] = {row.name: row for row in _ROWS}


def get_scheme(name: str) -> Scheme:
    """The scheme of that name; a ValueError lists every name."""
    if not isinstance(name, str) or name not in SCHEMES:
        raise ConfigValueError("scheme", "name", name, list(SCHEMES))
    return SCHEMES[name]


def resolve_quantization_config(spec: Any) -> QuantizationConfigMixin | None:
    """A config from what a user may pass: None, a scheme name, a config object, or a config.json block (dict)."""
    if spec is None or isinstance(spec, QuantizationConfigMixin):
        return spec
    if isinstance(spec, str):
        return get_scheme(spec).config()
    if isinstance(spec, Mapping):
        return quantization_config_from_dict(spec)
    raise ConfigTypeError("quantization_config", "quantization_config", spec,
                          "None, a scheme name (" + ", ".join(SCHEMES) + "), a config object or a dict")
