"""The test-only failing pipeline (quantserve.testing.faults): what it claims, and that production configs carry
no fault hook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantserve.serve.config import ConfigError, VariantConfig, parse_config
from quantserve.serve.families import check_variant, resolve, supported_classes
from quantserve.testing.faults import CLASS_NAME, INDEX_KEY, write_faulty_model

from .helpers import make_test_config


def test_faulty_family_claims_only_its_own_directories(tmp_path: Path) -> None:
    faulty = write_faulty_model(tmp_path / "faulty", 13)
    family, source = resolve(str(faulty))
    assert family.name == "faulty-digits" and source.class_name == CLASS_NAME
    assert resolve(None)[0].name == "digits"  # the default model stays the digits family's
    assert CLASS_NAME not in supported_classes()  # never offered to users in error messages


def test_faulty_directory_without_its_seed_is_a_config_error(tmp_path: Path) -> None:
    faulty = write_faulty_model(tmp_path / "faulty", 13)
    index = json.loads((faulty / "model_index.json").read_text())
    index[INDEX_KEY] = {"fail_on_seed": "13"}
    (faulty / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"variants\.0\.model: .*fail_on_seed must be an int"):
        check_variant(VariantConfig(name="x", model=str(faulty)), 0)
    with pytest.raises(TypeError, match="fail_on_seed"):
        write_faulty_model(tmp_path / "other", True)


def test_production_config_has_no_fault_hook() -> None:
    config = make_test_config(8000)
    config["variants"][0]["fail_on_seed"] = 13
    with pytest.raises(ConfigError, match=r"variants\.0\.fail_on_seed"):
        parse_config(config)
    schema = json.loads((Path(__file__).parents[2] / "helm/quantserve/values.schema.json").read_text())
    assert "fail_on_seed" not in json.dumps(schema)


def test_families_judge_prompts_without_a_model() -> None:
    """The Ingress asks each variant's family; only the digits family can tell without loading anything."""
    from quantserve.serve.families import families

    registry = families()
    digits, t2i = registry["digits"], registry["text-to-image"]
    assert digits.check_prompt("7") is None and digits.check_prompt("seven") is None
    assert "a cat" in digits.check_prompt("a cat")
    assert registry["faulty-digits"].check_prompt("a cat") == digits.check_prompt("a cat")
    assert t2i.check_prompt("a cat") is None and t2i.check_prompt("7") is None
