"""load_model / save_quantized with tiny Flux, SD3 and DiT models, through bitsandbytes (the loader's machinery)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from quantserve.runtime import BitsAndBytesConfig
from quantserve.runtime.compare import relative_error
from quantserve.runtime.dummy_inputs import dummy_inputs
from quantserve.runtime.loader import load_model, load_report, save_quantized
from quantserve.runtime.model_files import CheckpointError
from quantserve.runtime.quant_linear import QuantLinear

from .tiny_models import save_tiny

# relative output error against the bf16 model: 8-bit is held tighter than 4-bit
TOLERANCE = {"nf4": 0.25, "fp4": 0.25, "llm-int8": 0.03}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny(kind, root / kind) for kind in ("flux", "sd3", "dit")}


def _run(model, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(**dummy_inputs(model, seed=seed), return_dict=False)[0].float()


@pytest.fixture(scope="module")
def bf16_outputs(models) -> dict[str, torch.Tensor]:
    return {kind: _run(load_model(path)) for kind, path in models.items()}


@pytest.mark.parametrize("kind", ["flux", "sd3", "dit"])
@pytest.mark.parametrize("scheme", ["nf4", "fp4", "llm-int8"])
def test_bitsandbytes_schemes_load_every_model(models, bf16_outputs, kind, scheme):
    model = load_model(models[kind], scheme)
    report = load_report(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert not linears and quant, "every Linear layer of these models is quantized"
    assert all(m.backend == "bitsandbytes" for m in quant)
    assert relative_error(_run(model), bf16_outputs[kind]) < TOLERANCE[scheme]
    linear_bytes = sum(layer.nbytes for layer in report.quantized_layers)
    bf16_linear_bytes = sum(layer.bf16_bytes for layer in report.quantized_layers)
    # 4-bit: 0.5 byte per weight + one fp32 absmax per 64 (0.0625 byte); 8-bit: 1 byte + one fp32 per row
    bound = 0.30 if scheme != "llm-int8" else 0.53
    assert linear_bytes / bf16_linear_bytes < bound
    assert report.model_bytes < report.bf16_bytes


def test_double_quant_storage_and_compute_dtype_are_honoured(models, bf16_outputs):
    plain = load_model(models["dit"], BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    double = load_model(models["dit"], config)
    layer = next(m for m in double.modules() if isinstance(m, QuantLinear))
    assert layer.qweight.data.dtype == torch.bfloat16
    assert layer.qweight.quant_state().nested and layer.qweight.quant_state().dtype == torch.bfloat16
    # absmax shrinks from fp32 to 8-bit codes (bnb adds a 256-entry code table per layer: a win on real widths only)
    plain_layer = next(m for m in plain.modules() if isinstance(m, QuantLinear))
    assert layer.qweight.absmax.dtype == torch.uint8 and plain_layer.qweight.absmax.dtype == torch.float32
    assert layer.qweight.absmax.numel() == plain_layer.qweight.absmax.numel()
    assert relative_error(_run(double), bf16_outputs["dit"]) < TOLERANCE["nf4"]


def test_llm_int8_threshold_and_skip_modules(models):
    # diffusers' rule: a skip entry names a module or a parent of it ("proj_out_1" is not inside "proj_out")
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=2.0, llm_int8_skip_modules=["proj_out_1", "attn1"])
    model = load_model(models["dit"], config)
    report = model.quantserve_report
    dense = {layer.name: layer for layer in report.layers if layer.backend == "dense"}
    assert set(dense) == {"proj_out_1"} | {f"transformer_blocks.0.attn1.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert all("modules_to_not_convert" in layer.reason for layer in dense.values())
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    assert layer.qweight.meta["threshold"] == 2.0


def test_keep_in_fp32_modules_are_kept(models, monkeypatch):
    from diffusers import DiTTransformer2DModel

    monkeypatch.setattr(DiTTransformer2DModel, "_keep_in_fp32_modules", ["proj_out_2"])
    model = load_model(models["dit"], "nf4")
    assert model.proj_out_2.weight.dtype == torch.float32 and isinstance(model.proj_out_2, torch.nn.Linear)
    assert "fp32" in next(l.reason for l in model.quantserve_report.layers if l.name == "proj_out_2")
    assert isinstance(model.proj_out_1, QuantLinear)


@pytest.mark.parametrize("scheme", ["nf4", "llm-int8"])
def test_save_then_load_quantizes_nothing_and_is_bit_identical(models, tmp_path, scheme):
    model = load_model(models["flux"], scheme)
    out = save_quantized(model, tmp_path / "q")
    stored = json.loads((out / "config.json").read_text())
    assert stored["quantization_config"]["quant_method"] == "bitsandbytes"
    assert stored["_class_name"] == "FluxTransformer2DModel"
    again = load_model(out)
    assert again.quantserve_report.pre_quantized
    assert torch.equal(_run(again, seed=3), _run(model, seed=3))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directories left"


def test_checkpoint_config_wins_over_the_argument(models, tmp_path, caplog):
    out = save_quantized(load_model(models["dit"], "nf4"), tmp_path / "nf4")
    with caplog.at_level(logging.WARNING, logger="quantserve.runtime.loader"):
        model = load_model(out, "llm-int8")
    assert "checkpoint's config wins" in caplog.text
    assert model.quantserve_config.bnb_4bit_quant_type == "nf4"


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, bf16_outputs):
    from .tiny_models import tiny_dit

    torch.manual_seed(0)
    tiny_dit().save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert torch.equal(_run(load_model(tmp_path / "sharded")), bf16_outputs["dit"])


def test_pipeline_directory_with_a_per_component_mapping(models, tmp_path):
    import shutil

    pipe = tmp_path / "pipe"
    shutil.copytree(models["dit"], pipe / "transformer")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
                                                       "scheduler": ["diffusers", "DDIMScheduler"]}))
    components = load_model(pipe, {"transformer": "nf4"})
    assert list(components) == ["transformer"]
    assert isinstance(components["transformer"].proj_out_1, QuantLinear)
    with pytest.raises(ValueError, match="vae"):
        load_model(pipe, {"vae": "nf4"})


# --- bad input: each a clear error naming the file (and tensor), nothing half-written -------------------------

def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def test_missing_safetensors_names_the_folder(models, tmp_path):
    folder = _copy(models["dit"], tmp_path / "m")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors"):
        load_model(folder)


def test_pickled_weights_are_refused(models, tmp_path):
    folder = _copy(models["dit"], tmp_path / "m")
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled"):
        load_model(folder)


def test_corrupt_safetensors_names_the_file(models, tmp_path):
    folder = _copy(models["dit"], tmp_path / "m")
    path = folder / "diffusion_pytorch_model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as info:
        load_model(folder)
    assert str(path) in str(info.value)


def test_truncated_safetensors_names_file(models, tmp_path):
    folder = _copy(models["dit"], tmp_path / "m")
    path = folder / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-4096])
    with pytest.raises(CheckpointError) as info:
        load_model(folder, "nf4")
    assert "diffusion_pytorch_model.safetensors" in str(info.value)


def test_unknown_method_and_invalid_values_name_config_json(models, tmp_path):
    folder = _copy(models["dit"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    for block, field in (({"quant_method": "awq"}, "quant_method"),
                         ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf5"}, "bnb_4bit_quant_type")):
        (folder / "config.json").write_text(json.dumps({**config, "quantization_config": block}))
        with pytest.raises(CheckpointError) as info:
            load_model(folder)
        assert "config.json" in str(info.value) and field in str(info.value)


def test_shape_disagreeing_with_config_names_tensor_and_file(models, tmp_path):
    folder = _copy(models["dit"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["attention_head_dim"] = 16  # the checkpoint was saved with 32
    (folder / "config.json").write_text(json.dumps(config))
    for scheme in (None, "nf4"):
        with pytest.raises(CheckpointError) as info:
            load_model(folder, scheme)
        message = str(info.value)
        assert "diffusion_pytorch_model.safetensors" in message and "shape" in message and "'" in message


def test_missing_tensor_is_named(models, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(models["dit"], tmp_path / "m")
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    del tensors["proj_out_2.bias"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="proj_out_2.bias"):
        load_model(folder, "nf4")


def test_failed_save_leaves_the_previous_checkpoint_intact(models, tmp_path, monkeypatch):
    out = save_quantized(load_model(models["dit"], "nf4"), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(load_model(models["dit"], "llm-int8"), tmp_path / "out")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary directory left behind"


def test_gguf_file_needs_its_config(tmp_path):
    with pytest.raises(ValueError, match="config"):
        load_model(tmp_path / "model.gguf")


def test_gguf_tensor_shape_disagreeing_with_config_is_named(models, tmp_path):
    out = save_quantized(load_model(models["dit"], "gguf-q8_0"), tmp_path / "q8")
    config = json.loads((out / "config.json").read_text())
    config["attention_head_dim"] = 16
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_model(out)
    assert "model.gguf" in str(info.value) and "shape" in str(info.value)


def test_quantized_bytes_for_a_dense_parameter_are_refused(models, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(models["dit"], tmp_path / "m")
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["proj_out_2.weight"] = tensors["proj_out_2.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="proj_out_2.weight.*stored quantized"):
        load_model(folder)
