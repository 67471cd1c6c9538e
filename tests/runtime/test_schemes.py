"""The scheme table every command uses."""

from __future__ import annotations

import pytest

from quantserve.runtime import SCHEMES, QuantizationMethod, get_scheme, resolve_quantization_config
from quantserve.runtime import BitsAndBytesConfig, quantization_config_from_dict

SPEC_NAMES = ["bf16", "nf4", "fp4", "llm-int8", "int8wo", "int8dq", "int4wo", "float8wo", "float8dq", "quanto-int8",
              "quanto-int4", "quanto-int2", "quanto-float8", "gguf-q8_0", "gguf-q4_0", "gguf-q4_k", "gguf-q6_k",
              "modelopt-fp8", "modelopt-int8", "modelopt-int4", "modelopt-nvfp4"]


def test_table_has_exactly_the_named_schemes():
    assert list(SCHEMES) == SPEC_NAMES


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_scheme_builds_a_config_of_its_backend(name):
    scheme = get_scheme(name)
    config = scheme.config()
    if scheme.backend is None:
        assert config is None
        return
    assert config.quant_method is scheme.backend
    assert quantization_config_from_dict(config.to_dict()) == config
    assert scheme.config() is not config, "each call gives a fresh config"
    assert (scheme.gguf_type is not None) == (scheme.backend is QuantizationMethod.GGUF)
    assert 1 < scheme.bits <= 16


def test_scheme_details():
    nf4 = get_scheme("nf4").config()
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4"
    assert get_scheme("llm-int8").config().load_in_8bit
    assert get_scheme("modelopt-nvfp4").config().block_quantize == 16
    assert get_scheme("gguf-q4_k").gguf_type == "Q4_K"


def test_unknown_scheme_lists_every_name():
    with pytest.raises(ValueError) as info:
        get_scheme("nf3")
    assert "scheme" in str(info.value) and all(repr(n) in str(info.value) for n in SPEC_NAMES)


def test_resolve_accepts_names_configs_and_dicts():
    assert resolve_quantization_config(None) is None and resolve_quantization_config("bf16") is None
    config = BitsAndBytesConfig(load_in_8bit=True)
    assert resolve_quantization_config(config) is config
    assert resolve_quantization_config("quanto-int2").weights_dtype == "int2"
    assert resolve_quantization_config({"quant_method": "gguf"}).quant_method is QuantizationMethod.GGUF
    with pytest.raises(TypeError, match="scheme name"):
        resolve_quantization_config(4)


def test_the_gguf_backend_names_exactly_the_gguf_schemes():
    """backends/gguf.py lists the types its quantize-on-load schemes pack into (it may not import this table)."""
    from quantserve.runtime.backends.gguf import ON_LOAD_TYPES, scheme_name

    assert {s.name: s.gguf_type for s in SCHEMES.values() if s.gguf_type} == {scheme_name(t): t for t in ON_LOAD_TYPES}
