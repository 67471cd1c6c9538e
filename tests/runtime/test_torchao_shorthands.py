"""The torchao shorthand table: every name builds the torchao config object it stands for, with every kwarg."""

from __future__ import annotations

import pytest
import torch

from quantserve.runtime import TorchAoConfig
from quantserve.runtime.torchao_shorthands import SHORTHANDS

NAMED_IN_SPEC = [
    "int4wo", "int4_weight_only", "int4dq", "int8_dynamic_activation_int4_weight", "int8wo", "int8_weight_only",
    "int8dq", "int8_dynamic_activation_int8_weight", "float8wo", "float8wo_e5m2", "float8wo_e4m3", "float8dq",
    "float8dq_e4m3", *[f"uint{b}wo" for b in range(1, 8)],
]


def test_table_holds_every_shorthand_of_the_spec():
    assert set(NAMED_IN_SPEC) <= set(SHORTHANDS)


@pytest.mark.parametrize("name", sorted(SHORTHANDS))
def test_shorthand_builds_its_torchao_class(name):
    import torchao.quantization as q
    from torchao.core.config import AOBaseConfig, config_from_dict, config_to_dict

    row = SHORTHANDS[name]
    ao = TorchAoConfig(name).to_ao_config()
    assert isinstance(ao, AOBaseConfig) and isinstance(ao, getattr(q, row.torchao_class))
    assert config_from_dict(config_to_dict(ao)) == ao
    assert row.float8 == name.startswith("float8")


@pytest.mark.parametrize("name", sorted(n for n, r in SHORTHANDS.items() if r.kwargs))
def test_every_accepted_kwarg_reaches_the_torchao_config(name):
    row = SHORTHANDS[name]
    default = TorchAoConfig(name).to_ao_config()
    for key, spec in row.kwargs.items():
        values = spec.choices or ((True, False) if spec.kind is bool else ())
        built = {v: TorchAoConfig(name, **{key: v}).to_ao_config() for v in values}
        # each value builds, and at least one value changes the torchao object (the kwarg is not dropped)
        assert any(ao != default for ao in built.values()) or len(values) == 1, (name, key)


def test_legacy_meanings():
    assert TorchAoConfig("float8wo").to_ao_config().weight_dtype == torch.float8_e5m2
    assert TorchAoConfig("float8wo_e4m3").to_ao_config().weight_dtype == torch.float8_e4m3fn
    assert TorchAoConfig("int4wo", group_size=32).to_ao_config().group_size == 32
    assert TorchAoConfig("uint3wo", group_size=32).to_ao_config().weight_dtype == torch.int3
    assert TorchAoConfig("int4dq").to_ao_config().weight_dtype == torch.int4
    from torchao.quantization import PerRow

    assert TorchAoConfig("float8dq_e4m3_row").to_ao_config().granularity == [PerRow(), PerRow()]
