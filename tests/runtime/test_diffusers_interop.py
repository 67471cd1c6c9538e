"""Interop with diffusers' own config classes where they run on a CPU: quanto, torchao (AOBaseConfig), bitsandbytes."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from diffusers.quantizers import quantization_config as dq

from quantserve.runtime import BitsAndBytesConfig, QuantoConfig, TorchAoConfig, quantization_config_from_dict

import tests.fixtures.make_fixtures as make_fixtures


def _through_json(d: dict) -> dict:
    return json.loads(json.dumps(d))


@pytest.fixture(autouse=True)
def _quiet_quanto_deprecation():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


@pytest.mark.parametrize("weights", ["float8", "int8", "int4", "int2"])
def test_quanto_both_ways(weights):
    ours = QuantoConfig(weights_dtype=weights, modules_to_not_convert=["proj_out"])
    theirs = dq.QuantoConfig.from_dict(_through_json(ours.to_dict()))
    assert (theirs.weights_dtype, theirs.modules_to_not_convert) == (weights, ["proj_out"])
    assert QuantoConfig.from_dict(_through_json(theirs.to_dict())) == ours


@pytest.mark.parametrize("shorthand", ["int8wo", "int8dq", "int4wo", "float8wo_e4m3", "float8dq_e4m3_row", "uint4wo"])
def test_torchao_aobase_both_ways(shorthand):
    ao = TorchAoConfig(shorthand).to_ao_config()
    ours = TorchAoConfig(ao, modules_to_not_convert=["proj_out"])
    theirs = dq.TorchAoConfig.from_dict(_through_json(ours.to_dict()))
    assert theirs.quant_type == ao and theirs.modules_to_not_convert == ["proj_out"]
    back = TorchAoConfig.from_dict(_through_json(theirs.to_dict()))
    assert back == ours
    assert _through_json(theirs.to_dict()) == _through_json(ours.to_dict())


def test_bitsandbytes_both_ways():
    ours = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage="bfloat16")
    theirs = dq.BitsAndBytesConfig.from_dict(_through_json(ours.to_dict()))
    assert theirs.load_in_4bit and theirs.bnb_4bit_quant_storage is torch.bfloat16
    assert _through_json(theirs.to_dict()) == _through_json(ours.to_dict())
    assert BitsAndBytesConfig.from_dict(_through_json(theirs.to_dict())) == ours
    assert dq.BitsAndBytesConfig.from_dict(json.loads(ours.to_json_string())).to_dict() == theirs.to_dict()


def test_fixtures_are_still_what_diffusers_writes():
    for name, block in make_fixtures.diffusers_blocks().items():
        on_disk = json.loads((make_fixtures.HERE / name / "config.json").read_text())["quantization_config"]
        assert on_disk == block, name
        # and quantserve writes the very same block back
        assert quantization_config_from_dict(block).to_dict() == block, name
