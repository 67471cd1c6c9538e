"""The quantization config module: round trips, diffs, validation with field-naming errors, dispatch, environment."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from quantserve.runtime import (
    BackendUnavailableError,
    BitsAndBytesConfig,
    ConfigTypeError,
    ConfigValueError,
    GGUFQuantizationConfig,
    NVIDIAModelOptConfig,
    QuantizationConfigMixin,
    QuantizationMethod,
    QuantoConfig,
    Requirement,
    TorchAoConfig,
    quantization_config_from_dict,
)
from quantserve.runtime.config import normalize_modelopt_quant_type
from quantserve.runtime.torchao_shorthands import SHORTHANDS

from .strategies import any_config, bnb_configs, modelopt_configs, torchao_string_configs

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_quantization_method_values_are_plain_strings():
    assert [m.value for m in QuantizationMethod] == ["bitsandbytes", "torchao", "quanto", "gguf", "modelopt"]
    assert json.dumps({"m": QuantizationMethod.GGUF}) == '{"m": "gguf"}'
    assert QuantizationMethod("quanto") is QuantizationMethod.QUANTO and str(QuantizationMethod.TORCHAO) == "torchao"


# --- round trips ----------------------------------------------------------------------------------------------

def _assert_round_trips(config: QuantizationConfigMixin, tmp_path) -> None:
    cls = type(config)
    full = config.to_dict()
    json.dumps(full)  # plain JSON values only
    assert isinstance(full["quant_method"], str) and full["quant_method"] == cls.quant_method.value
    assert cls.from_dict(full) == config
    assert quantization_config_from_dict(json.loads(json.dumps(full))) == config
    assert cls.from_dict(json.loads(config.to_json_string(use_diff=True))) == config
    assert cls.from_dict(json.loads(config.to_json_string(use_diff=False))) == config
    path = tmp_path / "quantization_config.json"
    config.to_json_file(path)
    assert quantization_config_from_dict(json.loads(path.read_text())) == config


@SETTINGS
@given(config=any_config)
def test_every_config_round_trips_through_dict_json_and_file(config, tmp_path_factory):
    _assert_round_trips(config, tmp_path_factory.mktemp("rt"))


@SETTINGS
@given(config=torchao_string_configs())
def test_torchao_aobase_form_round_trips(config, tmp_path_factory):
    ao = TorchAoConfig(config.to_ao_config(), modules_to_not_convert=config.modules_to_not_convert)
    block = ao.to_dict()
    assert set(block) == {"quant_method", "quant_type", "modules_to_not_convert"}
    assert set(block["quant_type"]) == {"default"}
    assert block["quant_type"]["default"]["_type"] == SHORTHANDS[config.quant_type].torchao_class
    _assert_round_trips(ao, tmp_path_factory.mktemp("ao"))


@SETTINGS
@given(config=any_config)
def test_equality_compares_every_serialized_field(config):
    for f in fields(config):
        if not f.compare or not f.init:
            continue
        other = type(config).from_dict(config.to_dict())
        original = getattr(other, f.name)
        try:
            # any other valid value for this field must make the configs differ
            changed = _another_valid_value(other, f.name, original)
        except LookupError:
            continue
        assert other != config, f"changing {f.name} from {original!r} to {changed!r} left the configs equal"


def _other(current, a, b):
    return b if current == a else a


ALTERNATIVES = {
    "llm_int8_threshold": lambda c, cfg: [c + 1.0],
    "llm_int8_skip_modules": lambda c, cfg: [["other_block"] if c != ["other_block"] else None],
    "modules_to_not_convert": lambda c, cfg: [["other_block"] if c != ["other_block"] else None],
    "bnb_4bit_compute_dtype": lambda c, cfg: [_other(c, torch.float16, torch.bfloat16)],
    "bnb_4bit_quant_storage": lambda c, cfg: [_other(c, torch.int8, torch.uint8)],
    "bnb_4bit_quant_type": lambda c, cfg: [_other(c, "nf4", "fp4")],
    "compute_dtype": lambda c, cfg: [_other(c, torch.float16, torch.bfloat16)],
    "weights_dtype": lambda c, cfg: [_other(c, "int2", "int8")],
    "quant_type": lambda c, cfg: [_other(c, "INT8", "FP8")] if isinstance(cfg, NVIDIAModelOptConfig) else [_other(c, "int8wo", "int8dq")],
    "quant_type_kwargs": lambda c, cfg: [],  # depends on quant_type; covered by the round trips
    "algorithm": lambda c, cfg: [_other(c, "awq_lite", "max")],
    "modelopt_config": lambda c, cfg: [_other(c, {"changed": True}, None)],
    "channel_quantize": lambda c, cfg: [_other(c, 0, -1)],
    "block_quantize": lambda c, cfg: [_other(c, 32, 64)],
    "scale_channel_quantize": lambda c, cfg: [_other(c, 0, -1)],
    "scale_block_quantize": lambda c, cfg: [_other(c, 8, 16)],
}


def _another_valid_value(config, name, current):
    candidates = [not current] if isinstance(current, bool) else ALTERNATIVES[name](current, config)
    for value in candidates:
        try:
            config.update(**{name: value})
            return value
        except (ValueError, TypeError):
            continue
    raise LookupError(name)


def test_defaults_follow_the_spec():
    bnb = BitsAndBytesConfig()
    assert (bnb.load_in_4bit, bnb.load_in_8bit, bnb.llm_int8_threshold) == (False, False, 6.0)
    assert bnb.bnb_4bit_compute_dtype is torch.float32 and bnb.bnb_4bit_quant_storage is torch.uint8
    assert bnb.bnb_4bit_quant_type == "fp4" and bnb.llm_int8_skip_modules is None
    assert not (bnb.llm_int8_enable_fp32_cpu_offload or bnb.llm_int8_has_fp16_weight or bnb.bnb_4bit_use_double_quant)
    gguf = GGUFQuantizationConfig()
    assert gguf.compute_dtype is torch.float32 and gguf.pre_quantized is True and gguf.modules_to_not_convert is None
    assert QuantoConfig().weights_dtype == "int8"
    mo = NVIDIAModelOptConfig("FP8")
    assert (mo.weight_only, mo.algorithm, mo.modelopt_config, mo.disable_conv_quantization) == (True, "max", None, False)
    assert TorchAoConfig("int8wo").quant_type_kwargs == {}


def test_diff_against_class_defaults():
    for cls in (BitsAndBytesConfig, QuantoConfig, GGUFQuantizationConfig):
        assert json.loads(cls().to_json_string()) == {"quant_method": cls.quant_method.value}
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    assert json.loads(nf4.to_json_string()) == {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "_load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    assert json.loads(TorchAoConfig("int8wo").to_json_string()) == {"quant_method": "torchao", "quant_type": "int8wo"}
    assert json.loads(NVIDIAModelOptConfig("INT8").to_json_string()) == {"quant_method": "modelopt", "quant_type": "INT8"}
    assert json.loads(GGUFQuantizationConfig(torch.bfloat16).to_json_string()) == {"quant_method": "gguf", "compute_dtype": "bfloat16"}
    # use_diff=False writes every field
    assert set(json.loads(QuantoConfig().to_json_string(use_diff=False))) == {"quant_method", "weights_dtype", "modules_to_not_convert"}


def test_repr_shows_the_json():
    config = QuantoConfig(weights_dtype="int4")
    assert repr(config) == "QuantoConfig " + config.to_json_string()
    assert dict(config) == config.to_dict()


def test_torchao_string_form_serializes_as_the_spec_says():
    config = TorchAoConfig("int4wo", modules_to_not_convert=["proj_out"], group_size=64)
    assert config.to_dict() == {"quant_method": "torchao", "quant_type": "int4wo", "quant_type_kwargs": {"group_size": 64},
                                "modules_to_not_convert": ["proj_out"]}
    again = TorchAoConfig.from_dict(config.to_dict())
    assert again == config and again.quant_type_kwargs == {"group_size": 64}


# --- from_dict and update -------------------------------------------------------------------------------------

def test_from_dict_applies_kwargs_and_returns_the_unused_ones():
    config, unused = QuantoConfig.from_dict({"weights_dtype": "int4"}, return_unused_kwargs=True,
                                            modules_to_not_convert=["a"], not_a_field=1)
    assert config.modules_to_not_convert == ["a"] and unused == {"not_a_field": 1}
    assert QuantoConfig.from_dict({"weights_dtype": "int2"}).weights_dtype == "int2"


def test_from_dict_rejects_another_backends_block():
    with pytest.raises(ConfigValueError, match="quant_method"):
        QuantoConfig.from_dict({"quant_method": "gguf"})


def test_from_dict_warns_about_unknown_keys(caplog):
    with caplog.at_level(logging.WARNING, logger="quantserve.runtime.config"):
        QuantoConfig.from_dict({"weights_dtype": "int8", "some_future_key": 3})
    assert "some_future_key" in caplog.text


def test_update_returns_unused_kwargs_and_validates_all_or_nothing():
    config = BitsAndBytesConfig(load_in_4bit=True)
    assert config.update(bnb_4bit_quant_type="nf4", foo=1) == {"foo": 1}
    assert config.bnb_4bit_quant_type == "nf4"
    # switching 4-bit to 8-bit in one update is valid as a whole
    config.update(load_in_4bit=False, load_in_8bit=True)
    assert config.load_in_8bit and not config.load_in_4bit
    before = config.to_dict()
    with pytest.raises(ConfigValueError, match="bnb_4bit_quant_type"):
        config.update(llm_int8_threshold=3.0, bnb_4bit_quant_type="int4")
    assert config.to_dict() == before, "a failed update must leave every field as it was"


def test_attribute_assignment_is_validated_and_rolled_back():
    config = BitsAndBytesConfig(load_in_8bit=True)
    with pytest.raises(ConfigValueError, match="load_in_4bit"):
        config.load_in_4bit = True
    assert config.load_in_4bit is False and config.load_in_8bit is True
    config.bnb_4bit_compute_dtype = "float16"
    assert config.bnb_4bit_compute_dtype is torch.float16


def test_bnb_private_keys_are_read_and_written():
    config = BitsAndBytesConfig.from_dict({"_load_in_4bit": True, "_load_in_8bit": False, "quant_method": "bitsandbytes"})
    assert config.load_in_4bit and not config.load_in_8bit
    d = config.to_dict()
    assert d["_load_in_4bit"] is True and d["load_in_4bit"] is True and d["_load_in_8bit"] is False
    with pytest.raises(ConfigValueError, match="_load_in_4bit"):
        BitsAndBytesConfig.from_dict({"_load_in_4bit": True, "load_in_4bit": False})
    assert config.update(_load_in_4bit=False) == {} and not config.load_in_4bit


def test_bnb_quantization_method_names():
    assert BitsAndBytesConfig(load_in_8bit=True).quantization_method() == "llm_int8"
    assert BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").quantization_method() == "nf4"
    assert BitsAndBytesConfig().quantization_method() is None and not BitsAndBytesConfig().is_quantizable()


# --- validation: each rule, its exception type, and the field in the message ---------------------------------

INVALID = [
    (BitsAndBytesConfig, dict(load_in_4bit=True, load_in_8bit=True), ValueError, "load_in_4bit"),
    (BitsAndBytesConfig, dict(load_in_4bit="yes"), TypeError, "load_in_4bit"),
    (BitsAndBytesConfig, dict(load_in_8bit=1), TypeError, "load_in_8bit"),
    (BitsAndBytesConfig, dict(llm_int8_threshold="6"), TypeError, "llm_int8_threshold"),
    (BitsAndBytesConfig, dict(llm_int8_threshold=-1.0), ValueError, "llm_int8_threshold"),
    (BitsAndBytesConfig, dict(llm_int8_threshold=float("nan")), ValueError, "llm_int8_threshold"),
    (BitsAndBytesConfig, dict(llm_int8_skip_modules="proj_out"), TypeError, "llm_int8_skip_modules"),
    (BitsAndBytesConfig, dict(llm_int8_skip_modules=["ok", 3]), TypeError, "llm_int8_skip_modules"),
    (BitsAndBytesConfig, dict(llm_int8_enable_fp32_cpu_offload=None), TypeError, "llm_int8_enable_fp32_cpu_offload"),
    (BitsAndBytesConfig, dict(llm_int8_has_fp16_weight="no"), TypeError, "llm_int8_has_fp16_weight"),
    (BitsAndBytesConfig, dict(bnb_4bit_compute_dtype="bfloat17"), ValueError, "bnb_4bit_compute_dtype"),
    (BitsAndBytesConfig, dict(bnb_4bit_compute_dtype=torch.int8), ValueError, "bnb_4bit_compute_dtype"),
    (BitsAndBytesConfig, dict(bnb_4bit_compute_dtype=16), TypeError, "bnb_4bit_compute_dtype"),
    (BitsAndBytesConfig, dict(bnb_4bit_quant_type="nf5"), ValueError, "bnb_4bit_quant_type"),
    (BitsAndBytesConfig, dict(bnb_4bit_quant_type=4), TypeError, "bnb_4bit_quant_type"),
    (BitsAndBytesConfig, dict(bnb_4bit_use_double_quant="true"), TypeError, "bnb_4bit_use_double_quant"),
    (BitsAndBytesConfig, dict(bnb_4bit_quant_storage="int4"), ValueError, "bnb_4bit_quant_storage"),
    (TorchAoConfig, dict(quant_type="int3wo"), ValueError, "quant_type"),
    (TorchAoConfig, dict(quant_type=8), TypeError, "quant_type"),
    (TorchAoConfig, dict(quant_type="int8wo", inner_k_tiles=8), ValueError, "inner_k_tiles"),
    (TorchAoConfig, dict(quant_type="int4wo", group_size=48), ValueError, "group_size"),
    (TorchAoConfig, dict(quant_type="int4wo", group_size="64"), TypeError, "group_size"),
    (TorchAoConfig, dict(quant_type="int4wo", inner_k_tiles=4), ValueError, "inner_k_tiles"),
    (TorchAoConfig, dict(quant_type="uint4wo", group_size=0), ValueError, "group_size"),
    (TorchAoConfig, dict(quant_type="int8dq", act_mapping_type="affine"), ValueError, "act_mapping_type"),
    (TorchAoConfig, dict(quant_type="float8wo", granularity="row"), ValueError, "granularity"),
    (TorchAoConfig, dict(quant_type="int8wo", modules_to_not_convert="proj_out"), TypeError, "modules_to_not_convert"),
    (QuantoConfig, dict(weights_dtype="int3"), ValueError, "weights_dtype"),
    (QuantoConfig, dict(weights_dtype="float16"), ValueError, "weights_dtype"),
    (QuantoConfig, dict(modules_to_not_convert=[1]), TypeError, "modules_to_not_convert"),
    (GGUFQuantizationConfig, dict(compute_dtype="int8"), ValueError, "compute_dtype"),
    (GGUFQuantizationConfig, dict(compute_dtype=[]), TypeError, "compute_dtype"),
    (NVIDIAModelOptConfig, dict(quant_type=8), TypeError, "quant_type"),
    (NVIDIAModelOptConfig, dict(quant_type="FP8", weight_only="yes"), TypeError, "weight_only"),
    (NVIDIAModelOptConfig, dict(quant_type="FP8", channel_quantize=1.5), TypeError, "channel_quantize"),
    (NVIDIAModelOptConfig, dict(quant_type="INT4", block_quantize=128), ValueError, "block_quantize"),
    (NVIDIAModelOptConfig, dict(quant_type="INT4", channel_quantize=-1, block_quantize=0), ValueError, "block_quantize"),
    (NVIDIAModelOptConfig, dict(quant_type="NVFP4", channel_quantize=-1, block_quantize=16, scale_block_quantize=16), ValueError, "scale_block_quantize"),
    (NVIDIAModelOptConfig, dict(quant_type="NVFP4", scale_channel_quantize=-1, scale_block_quantize=16), ValueError, "scale_block_quantize"),
    (NVIDIAModelOptConfig, dict(quant_type="FP8", algorithm="gptq"), ValueError, "algorithm"),
    (NVIDIAModelOptConfig, dict(quant_type="FP8", forward_loop="calibrate"), TypeError, "forward_loop"),
    (NVIDIAModelOptConfig, dict(quant_type="FP8", modelopt_config=["quant_cfg"]), TypeError, "modelopt_config"),
    (NVIDIAModelOptConfig, dict(quant_type="FP8", modelopt_config={"f": object()}), ValueError, "modelopt_config"),
    (NVIDIAModelOptConfig, dict(quant_type="FP8", disable_conv_quantization=0), TypeError, "disable_conv_quantization"),
]


@pytest.mark.parametrize("cls,kwargs,exc,field_name", INVALID, ids=[f"{c.__name__}-{f}-{i}" for i, (c, _, _, f) in enumerate(INVALID)])
def test_invalid_values_raise_naming_the_field(cls, kwargs, exc, field_name):
    with pytest.raises(exc) as info:
        cls(**kwargs)
    message = str(info.value)
    assert field_name in message and cls.__name__ in message
    assert "accepted" in message or "expected" in message


def test_unknown_torchao_shorthand_lists_every_accepted_name():
    with pytest.raises(ValueError) as info:
        TorchAoConfig("int4_wo")
    for name in ("int4wo", "int8dq", "float8dq_e4m3", "uint1wo", "uint7wo"):
        assert repr(name) in str(info.value)


def test_unsupported_torchao_kwarg_lists_the_accepted_ones():
    with pytest.raises(ValueError) as info:
        TorchAoConfig("int4wo", block_size=32)
    assert "block_size" in str(info.value) and "group_size" in str(info.value) and "inner_k_tiles" in str(info.value)


def test_gguf_fixed_fields_cannot_be_changed():
    with pytest.raises(ConfigValueError, match="pre_quantized"):
        GGUFQuantizationConfig.from_dict({"quant_method": "gguf", "pre_quantized": False})
    with pytest.raises(ConfigValueError, match="modules_to_not_convert"):
        GGUFQuantizationConfig.from_dict({"modules_to_not_convert": ["x"]})
    config = GGUFQuantizationConfig()
    with pytest.raises(ConfigValueError, match="pre_quantized"):
        config.pre_quantized = False
    assert config.pre_quantized is True


def test_torchao_rejects_both_kwarg_forms_and_kwargs_with_an_aobase_config():
    with pytest.raises(ConfigValueError, match="quant_type_kwargs"):
        TorchAoConfig("int4wo", quant_type_kwargs={"group_size": 32}, group_size=64)
    from torchao.quantization import Int8WeightOnlyConfig

    with pytest.raises(ConfigValueError, match="quant_type_kwargs"):
        TorchAoConfig(Int8WeightOnlyConfig(), group_size=32)
    with pytest.raises(ConfigValueError, match="quant_type"):
        TorchAoConfig.from_dict({"quant_method": "torchao", "quant_type": {"fqn": {}}})
    with pytest.raises(ConfigValueError, match="config_from_dict"):
        TorchAoConfig.from_dict({"quant_method": "torchao", "quant_type": {"default": {"_type": "os.system", "_data": {}}}})


# --- ModelOpt quant types -------------------------------------------------------------------------------------

@pytest.mark.parametrize("given,expected,warned", [
    ("FP8", "FP8", None), ("fp8_int8", "FP8_INT8", None), ("NVFP4_NVFP4", "NVFP4_NVFP4", None), ("NF4", "NF4", None),
    ("INT3", "FP8", "INT3"), ("FP8_INT3", "FP8", "INT3"), ("INT4_FP8_FP8", "FP8", "more than two parts"),
])
def test_modelopt_quant_type_normalization(given, expected, warned, caplog):
    with caplog.at_level(logging.WARNING, logger="quantserve.runtime.config"):
        assert NVIDIAModelOptConfig(given).quant_type == expected
    if warned:
        assert warned in caplog.text and "quant_type" in caplog.text
    else:
        assert caplog.text == ""
    assert normalize_modelopt_quant_type(expected) == expected


def test_modelopt_forward_loop_is_never_serialized():
    config = NVIDIAModelOptConfig("INT8", forward_loop=lambda model: None)
    assert "forward_loop" not in config.to_dict()
    assert NVIDIAModelOptConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TypeError, match="forward_loop"):
        NVIDIAModelOptConfig.from_dict({"quant_type": "FP8", "forward_loop": "os.system"})


def test_modelopt_reads_diffusers_calib_cfg():
    config = NVIDIAModelOptConfig.from_dict({"quant_method": "modelopt", "quant_type": "INT8", "calib_cfg": {"method": "smoothquant"}})
    assert config.algorithm == "smoothquant"
    with pytest.raises(ConfigValueError, match="calib_cfg"):
        NVIDIAModelOptConfig.from_dict({"quant_type": "INT8", "calib_cfg": {"method": "max"}, "algorithm": "awq_lite"})


def test_building_configs_imports_no_backend_library():
    code = (
        "import sys, torch, quantserve\n"
        "from quantserve.runtime import *\n"
        "from quantserve.runtime import SCHEMES\n"
        "NVIDIAModelOptConfig('NVFP4', channel_quantize=-1, block_quantize=16).to_json_string()\n"
        "TorchAoConfig('float8dq_e4m3_row').to_dict(); BitsAndBytesConfig(load_in_4bit=True).to_dict()\n"
        "QuantoConfig('int4'); GGUFQuantizationConfig(torch.bfloat16)\n"
        "[s.config() for s in SCHEMES.values()]\n"
        "loaded = [m for m in ('modelopt', 'torchao', 'bitsandbytes', 'optimum.quanto', 'gguf', 'ray', 'triton') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- dispatch -------------------------------------------------------------------------------------------------

def test_dispatch_on_quant_method():
    assert isinstance(quantization_config_from_dict({"quant_method": "quanto"}), QuantoConfig)
    assert isinstance(quantization_config_from_dict({"quant_method": "gguf"}), GGUFQuantizationConfig)
    assert isinstance(quantization_config_from_dict({"quant_method": "modelopt", "quant_type": "FP8"}), NVIDIAModelOptConfig)
    assert isinstance(quantization_config_from_dict({"quant_method": "torchao", "quant_type": "int8dq"}), TorchAoConfig)
    # transformers-style blocks carry no quant_method: the load_in_* flags mark bitsandbytes
    assert quantization_config_from_dict({"load_in_8bit": True}).load_in_8bit
    assert quantization_config_from_dict({"_load_in_4bit": True}).load_in_4bit


def test_unknown_method_lists_the_known_ones():
    for block in ({"quant_method": "awq"}, {"weights_dtype": "int8"}):
        with pytest.raises(ValueError) as info:
            quantization_config_from_dict(block)
        for name in ("bitsandbytes", "torchao", "quanto", "gguf", "modelopt"):
            assert name in str(info.value)
        assert "quant_method" in str(info.value)
    with pytest.raises(TypeError, match="quantization_config"):
        quantization_config_from_dict("nf4")


# --- environment checks (applied when a config meets a model and a device) ------------------------------------

def test_requirement_reports_missing_and_too_old_packages():
    missing = Requirement("quantserve-no-such-package", "1.0", "a test")
    assert missing.installed() is None and "not installed" in missing.problem() and "pip install" in missing.problem()
    too_old = Requirement("pytest", "999.0")
    assert "found" in too_old.problem() and "pip install -U" in too_old.problem()
    assert Requirement("pytest", "1.0").problem() is None


def test_bitsandbytes_version_is_checked_when_applied_not_when_built():
    config = BitsAndBytesConfig(load_in_4bit=True)  # built without touching bitsandbytes
    assert [r.spec for r in config.requirements()] == ["bitsandbytes>=0.39.0"]
    config.check_environment("cpu")  # bitsandbytes 0.50 is installed here
    assert BitsAndBytesConfig().requirements() == []


def test_missing_backend_package_is_a_clear_error():
    class Needy(QuantoConfig):
        def requirements(self):
            return [Requirement("quantserve-no-such-package", "2.0", "a test backend")]

    with pytest.raises(BackendUnavailableError, match="quantserve-no-such-package>=2.0.*pip install"):
        Needy().check_environment("cpu")


@pytest.mark.parametrize("name", ["float8wo", "float8wo_e5m2", "float8wo_e4m3", "float8dq", "float8dq_e4m3", "float8dq_e4m3_row"])
def test_float8_needs_compute_capability_8_9_on_cuda(name):
    config = TorchAoConfig(name)  # constructing works on a CPU-only machine
    config.check_environment("cpu")
    config.check_environment("cuda", capability=(8, 9))
    config.check_environment("cuda", capability=(9, 0))
    with pytest.raises(BackendUnavailableError, match="compute capability >= 8.9.*8.0"):
        config.check_environment("cuda", capability=(8, 0))
    TorchAoConfig("int8wo").check_environment("cuda", capability=(7, 5))


def test_float8_check_covers_aobase_configs():
    from torchao.quantization import Float8WeightOnlyConfig

    with pytest.raises(BackendUnavailableError, match="Float8WeightOnlyConfig"):
        TorchAoConfig(Float8WeightOnlyConfig()).check_environment("cuda", capability=(8, 6))


def test_summaries_name_the_scheme():
    assert "nf4" in BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").summary()
    assert "group_size=64" in TorchAoConfig("int4wo", group_size=64).summary()
    assert "INT4" in NVIDIAModelOptConfig("INT4", channel_quantize=-1, block_quantize=128).summary()


@SETTINGS
@given(config=bnb_configs())
def test_bnb_dtype_fields_serialize_as_names(config):
    d = config.to_dict()
    assert getattr(torch, d["bnb_4bit_compute_dtype"]) is config.bnb_4bit_compute_dtype
    assert getattr(torch, d["bnb_4bit_quant_storage"]) is config.bnb_4bit_quant_storage


@SETTINGS
@given(config=modelopt_configs())
def test_modelopt_configs_keep_their_fields(config):
    again = NVIDIAModelOptConfig.from_dict(json.loads(config.to_json_string()))
    assert (again.quant_type, again.block_quantize, again.scale_block_quantize) == (config.quant_type, config.block_quantize, config.scale_block_quantize)
