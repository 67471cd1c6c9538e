"""config.json files in the exact form diffusers writes: read field by field, written, read again, inspected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantserve.cli import main as cli_main
from quantserve.runtime import (
    BitsAndBytesConfig,
    GGUFQuantizationConfig,
    NVIDIAModelOptConfig,
    QuantoConfig,
    TorchAoConfig,
    quantization_config_from_dict,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"

EXPECTED = {
    "bnb-nf4-double": (BitsAndBytesConfig, dict(
        load_in_4bit=True, load_in_8bit=False, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8, llm_int8_threshold=6.0,
        llm_int8_skip_modules=["proj_out"], llm_int8_enable_fp32_cpu_offload=False, llm_int8_has_fp16_weight=False)),
    "bnb-llm-int8": (BitsAndBytesConfig, dict(
        load_in_4bit=False, load_in_8bit=True, llm_int8_threshold=4.0, llm_int8_skip_modules=["proj_out", "pos_embed"],
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="fp4")),
    "torchao-string-int8wo": (TorchAoConfig, dict(quant_type="int8wo", quant_type_kwargs={}, modules_to_not_convert=None)),
    "torchao-string-int4wo": (TorchAoConfig, dict(quant_type="int4wo", quant_type_kwargs={"group_size": 64},
                                                  modules_to_not_convert=["proj_out"])),
    "torchao-aobase-int8wo": (TorchAoConfig, dict(quant_type_kwargs={}, modules_to_not_convert=["proj_out"])),
    "quanto-int4": (QuantoConfig, dict(weights_dtype="int4", modules_to_not_convert=["proj_out"])),
    "gguf": (GGUFQuantizationConfig, dict(compute_dtype=torch.bfloat16, pre_quantized=True, modules_to_not_convert=None)),
    "modelopt-fp8": (NVIDIAModelOptConfig, dict(
        quant_type="FP8", weight_only=True, modules_to_not_convert=["proj_out"], channel_quantize=None, block_quantize=None,
        scale_channel_quantize=None, scale_block_quantize=None, algorithm="max", disable_conv_quantization=False)),
    "modelopt-nvfp4-int8": (NVIDIAModelOptConfig, dict(
        quant_type="NVFP4_INT8", weight_only=False, channel_quantize=-1, block_quantize=16, scale_channel_quantize=-1,
        scale_block_quantize=16, algorithm="max")),
}


def _block(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]


def test_every_fixture_has_expectations():
    assert sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").exists()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_reads_field_by_field(name):
    cls, fields = EXPECTED[name]
    config = quantization_config_from_dict(_block(name))
    assert type(config) is cls
    for field_name, value in fields.items():
        assert getattr(config, field_name) == value, field_name


def test_torchao_aobase_fixture_is_a_real_torchao_config():
    from torchao.quantization import Int8WeightOnlyConfig, PerRow

    config = quantization_config_from_dict(_block("torchao-aobase-int8wo"))
    assert config.quant_type == Int8WeightOnlyConfig(granularity=PerRow())


def test_modelopt_fixture_keeps_the_modelopt_config_diffusers_derived():
    block = _block("modelopt-fp8")
    config = quantization_config_from_dict(block)
    assert config.modelopt_config == block["modelopt_config"]
    assert config.modelopt_config["quant_cfg"]["*weight_quantizer"]["num_bits"] == [4, 3]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_writes_and_reads_again(name, tmp_path):
    config = quantization_config_from_dict(_block(name))
    written = config.to_dict()
    assert quantization_config_from_dict(json.loads(json.dumps(written))) == config
    config.to_json_file(tmp_path / "q.json")
    assert quantization_config_from_dict(json.loads((tmp_path / "q.json").read_text())) == config
    # every key diffusers wrote is either written back or is one diffusers derives from what is written
    derived = {"calib_cfg", "forward_loop"}
    assert set(_block(name)) - set(written) <= derived


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inspect_names_the_backend(name, capsys):
    assert cli_main(["inspect", str(FIXTURES / name)]) == 0
    out = capsys.readouterr().out
    backend = EXPECTED[name][0].quant_method.value
    assert f"backend     : {backend}" in out and "status      : valid" in out
    assert cli_main(["inspect", "--json", str(FIXTURES / name / "config.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report[0]["backend"] == backend and report[0]["model_class"] == "DiTTransformer2DModel"
