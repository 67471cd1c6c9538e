"""Hypothesis strategies that build valid quantization configs over every parameter."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from quantserve.runtime.config import (
    BNB_STORAGE_DTYPES,
    COMPUTE_DTYPES,
    MODELOPT_ALGORITHMS,
    MODELOPT_TYPES,
    QUANTO_WEIGHTS,
    BitsAndBytesConfig,
    GGUFQuantizationConfig,
    NVIDIAModelOptConfig,
    QuantoConfig,
    TorchAoConfig,
)
from quantserve.runtime.torchao_shorthands import SHORTHANDS, KwargSpec

module_names = st.lists(st.from_regex(r"[a-z_][a-z0-9_.]{0,12}", fullmatch=True), max_size=3)
maybe_modules = st.none() | module_names


def dtype_or_name(names: tuple[str, ...]) -> st.SearchStrategy:
    """A dtype given either as torch.dtype or as its name, as users and config.json do."""
    return st.sampled_from(names).flatmap(lambda n: st.sampled_from([n, getattr(torch, n), f"torch.{n}"]))


@st.composite
def bnb_configs(draw) -> BitsAndBytesConfig:
    mode = draw(st.sampled_from(["4bit", "8bit", "none"]))
    return BitsAndBytesConfig(
        load_in_4bit=mode == "4bit",
        load_in_8bit=mode == "8bit",
        llm_int8_threshold=draw(st.floats(min_value=0, max_value=100, allow_nan=False) | st.integers(0, 50)),
        llm_int8_skip_modules=draw(maybe_modules),
        llm_int8_enable_fp32_cpu_offload=draw(st.booleans()),
        llm_int8_has_fp16_weight=draw(st.booleans()),
        bnb_4bit_compute_dtype=draw(st.none() | dtype_or_name(COMPUTE_DTYPES)),
        bnb_4bit_quant_type=draw(st.sampled_from(["fp4", "nf4"])),
        bnb_4bit_use_double_quant=draw(st.booleans()),
        bnb_4bit_quant_storage=draw(st.none() | dtype_or_name(BNB_STORAGE_DTYPES)),
    )


def kwarg_values(spec: KwargSpec) -> st.SearchStrategy:
    if spec.choices is not None:
        base = st.sampled_from(spec.choices)
    elif spec.kind is bool:
        base = st.booleans()
    else:
        base = st.integers(min_value=spec.minimum or 1, max_value=512)
    return (st.none() | base) if spec.allow_none else base


@st.composite
def torchao_string_configs(draw) -> TorchAoConfig:
    name = draw(st.sampled_from(sorted(SHORTHANDS)))
    specs = SHORTHANDS[name].kwargs
    keys = draw(st.lists(st.sampled_from(sorted(specs)), unique=True)) if specs else []
    kwargs = {k: draw(kwarg_values(specs[k])) for k in keys}
    return TorchAoConfig(name, modules_to_not_convert=draw(maybe_modules), **kwargs)


quanto_configs = st.builds(QuantoConfig, weights_dtype=st.sampled_from(QUANTO_WEIGHTS), modules_to_not_convert=maybe_modules)
gguf_configs = st.builds(GGUFQuantizationConfig, compute_dtype=st.none() | dtype_or_name(COMPUTE_DTYPES))

json_leaf = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=8)
json_dicts = st.dictionaries(st.text(min_size=1, max_size=8), st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6), max_size=3)


@st.composite
def modelopt_configs(draw) -> NVIDIAModelOptConfig:
    weight = draw(st.sampled_from(MODELOPT_TYPES))
    act = draw(st.none() | st.sampled_from(MODELOPT_TYPES))
    channel = draw(st.none() | st.sampled_from([-1, 0, 1]))
    block = draw(st.none() | st.sampled_from([16, 32, 64, 128])) if channel is not None else None
    scale_channel = draw(st.none() | st.sampled_from([-1, 0])) if block is not None else None
    return NVIDIAModelOptConfig(
        quant_type=weight if act is None else f"{weight}_{act}",
        modules_to_not_convert=draw(maybe_modules),
        weight_only=draw(st.booleans()),
        channel_quantize=channel,
        block_quantize=block,
        scale_channel_quantize=scale_channel,
        scale_block_quantize=None if scale_channel is None else draw(st.sampled_from([8, 16, 128])),
        algorithm=draw(st.sampled_from(MODELOPT_ALGORITHMS)),
        modelopt_config=draw(st.none() | json_dicts.filter(bool)),
        disable_conv_quantization=draw(st.booleans()),
    )


any_config = st.one_of(bnb_configs(), torchao_string_configs(), quanto_configs, gguf_configs, modelopt_configs())
