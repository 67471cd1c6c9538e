"""load_pipeline on real (tiny, locally built) FLUX, SD3, PixArt-Sigma and Sana pipelines: the same image as diffusers'
own loader, every backend on the denoiser and the text encoders, pre-quantized round trips, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from quantserve.runtime import PipelineQuantizationConfig, load_pipeline, save_quantized
from quantserve.runtime.errors import ConfigValueError
from quantserve.runtime.model_files import CheckpointError
from tests.pipelines_fixtures import tiny_pipeline_dir

FAMILIES = ("flux", "sd3", "pixart-sigma", "sana")
TEXT_ENCODERS = {"flux": ("text_encoder", "text_encoder_2"), "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
                 "pixart-sigma": ("text_encoder",), "sana": ("text_encoder",)}
# one scheme per backend, each also run on the text encoders
BACKEND_SCHEMES = {"bitsandbytes": "nf4", "torchao": "int8wo", "quanto": "quanto-int8", "gguf": "gguf-q8_0",
                   "modelopt": "modelopt-int8"}


def _call_kwargs(pipe) -> dict:
    """A tiny, fast generation every family accepts: 2 steps at 32x32, short prompts."""
    kwargs = dict(prompt="a red car on a road", num_inference_steps=2, height=32, width=32, output_type="np")
    name = type(pipe).__name__
    if name in ("FluxPipeline", "StableDiffusion3Pipeline", "PixArtSigmaPipeline", "SanaPipeline"):
        kwargs["max_sequence_length"] = 16 if name != "SanaPipeline" else 24
    if name == "SanaPipeline":
        kwargs["complex_human_instruction"] = None
    return kwargs


def _image(pipe, seed: int = 0) -> np.ndarray:
    with torch.no_grad():
        return pipe(generator=torch.Generator("cpu").manual_seed(seed), **_call_kwargs(pipe)).images


@pytest.fixture(scope="module")
def reference_images() -> dict[str, np.ndarray]:
    """Each family's image through quantserve's loader, unquantized, float32."""
    return {family: _image(load_pipeline(tiny_pipeline_dir(family), None, torch_dtype=torch.float32))
            for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_unquantized_pipeline_draws_what_diffusers_draws(family, reference_images):
    from diffusers import DiffusionPipeline

    path = tiny_pipeline_dir(family)
    theirs = DiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    ours = load_pipeline(path, None, torch_dtype=torch.float32)
    assert type(ours) is type(theirs)
    assert set(ours.components) == set(theirs.components)
    expected = _image(theirs)
    np.testing.assert_allclose(reference_images[family], expected, atol=1e-5, rtol=0)
    report = ours.quantserve_report
    assert report.pipeline_class == type(theirs).__name__
    assert set(TEXT_ENCODERS[family]) <= set(report.components)  # the text encoders go through quantserve too
    assert not report.quantized_layers and report.scheme == "bf16"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", sorted(BACKEND_SCHEMES))
def test_every_backend_on_the_denoiser_and_the_text_encoders(family, backend, reference_images):
    scheme = BACKEND_SCHEMES[backend]
    components = ("transformer", *TEXT_ENCODERS[family])
    pipe = load_pipeline(tiny_pipeline_dir(family), {c: scheme for c in components}, torch_dtype=torch.float32)
    image = _image(pipe)
    assert np.isfinite(image).all() and image.shape == reference_images[family].shape
    difference = float(np.abs(image - reference_images[family]).mean())
    assert difference < 0.1, f"{family} {scheme}: mean pixel difference {difference} to the unquantized image"
    report = pipe.quantserve_report
    for name in components:
        component = report.components[name]
        quantized = component.quantized_layers
        assert quantized, f"{name}: no Linear layer quantized with {scheme}:\n{component.table()}"
        assert {layer.backend for layer in quantized} == {backend}
        assert component.model_bytes < component.bf16_bytes * 2  # float32 dense parts, quantized linears
    assert report.model_bytes == sum(r.model_bytes for r in report.components.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_t5_keeps_its_fp32_modules_dense(dtype):
    """T5's `wo` is never quantized; as transformers loads it, float32 in a float16 model, the model's dtype else."""
    pipe = load_pipeline(tiny_pipeline_dir("flux"), {"text_encoder_2": "nf4"}, torch_dtype=dtype)
    rows = {layer.name: layer for layer in pipe.quantserve_report.components["text_encoder_2"].layers}
    wo = [row for name, row in rows.items() if name.endswith(".wo")]
    stored = "float32" if dtype == torch.float16 else "bfloat16"
    assert wo and all(row.backend == "dense" and row.fmt == stored and "_keep_in_fp32_modules" in row.reason
                      for row in wo)
    assert all(row.backend == "bitsandbytes" for name, row in rows.items() if name.endswith((".wi_0", ".wi_1", ".q")))
    assert pipe.text_encoder_2.shared.weight is pipe.text_encoder_2.encoder.embed_tokens.weight  # tie restored


def test_a_scheme_alone_quantizes_the_denoiser_only():
    pipe = load_pipeline(tiny_pipeline_dir("pixart-sigma"), "int8wo", torch_dtype=torch.float32)
    components = pipe.quantserve_report.components
    assert components["transformer"].quantized_layers and not components["text_encoder"].quantized_layers


def test_pipeline_quantization_config_forms_agree():
    from diffusers import PipelineQuantizationConfig as DiffusersPipelineConfig

    path = tiny_pipeline_dir("flux")
    kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32}
    forms = [
        PipelineQuantizationConfig("bitsandbytes_4bit", kwargs, ["transformer", "text_encoder_2"]),
        {"quant_backend": "bitsandbytes_4bit", "quant_kwargs": {**kwargs, "bnb_4bit_compute_dtype": "float32"},
         "components_to_quantize": ["transformer", "text_encoder_2"]},
        DiffusersPipelineConfig(quant_backend="bitsandbytes_4bit", quant_kwargs=kwargs,
                                components_to_quantize=["transformer", "text_encoder_2"]),
    ]
    images = []
    for form in forms:
        pipe = load_pipeline(path, form, torch_dtype=torch.float32)
        backends = {n: r.backend for n, r in pipe.quantserve_report.components.items()}
        assert backends == {"text_encoder": "none", "text_encoder_2": "bitsandbytes", "transformer": "bitsandbytes",
                            "vae": "none"}
        images.append(_image(pipe))
    assert all(np.array_equal(images[0], other) for other in images[1:])


def test_quant_mapping_takes_diffusers_and_transformers_config_objects():
    import diffusers
    import transformers

    mapping = {"transformer": diffusers.BitsAndBytesConfig(load_in_8bit=True),
               "text_encoder_2": transformers.QuantoConfig(weights="int8"),
               "text_encoder": transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")}
    pipe = load_pipeline(tiny_pipeline_dir("flux"), PipelineQuantizationConfig(quant_mapping=mapping),
                         torch_dtype=torch.float32)
    components = pipe.quantserve_report.components
    assert components["transformer"].backend == "bitsandbytes" and components["text_encoder"].backend == "bitsandbytes"
    assert {layer.fmt for layer in components["text_encoder"].quantized_layers} == {"nf4"}
    assert components["text_encoder_2"].backend == "quanto"
    assert np.isfinite(_image(pipe)).all()


def test_mistakes_in_the_mapping_name_the_component():
    import transformers

    path = tiny_pipeline_dir("flux")
    with pytest.raises(ConfigValueError, match="text_encoder_9") as caught:
        load_pipeline(path, {"text_encoder_9": "nf4"})
    assert "text_encoder_2" in str(caught.value)  # says which components exist
    with pytest.raises(ConfigValueError, match="'transformer'.*diffusers model"):
        load_pipeline(path, {"transformer": transformers.QuantoConfig(weights="int8")})
    with pytest.raises(ConfigValueError, match="quant_backend"):
        PipelineQuantizationConfig(quant_backend="bitsandbytes_3bit", quant_kwargs={"x": 1})
    with pytest.raises(ConfigValueError, match="tokenizer"):
        load_pipeline(path, PipelineQuantizationConfig("quanto", {"weights_dtype": "int8"}, ["tokenizer"]))


def _copy(family: str, tmp_path: Path) -> Path:
    out = tmp_path / family
    shutil.copytree(tiny_pipeline_dir(family), out)
    return out


def test_a_missing_component_and_a_truncated_text_encoder_are_named(tmp_path):
    path = _copy("flux", tmp_path)
    shutil.rmtree(path / "tokenizer_2")
    with pytest.raises(CheckpointError, match="tokenizer_2"):
        load_pipeline(path)
    path = _copy("sd3", tmp_path / "b")
    weights = path / "text_encoder_3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"text_encoder_3/model\.safetensors.*truncated"):
        load_pipeline(path, {"text_encoder_3": "int8wo"})
    path = _copy("pixart-sigma", tmp_path / "c")
    index = json.loads((path / "model_index.json").read_text())
    index["text_encoder"] = ["os", "system"]
    (path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'text_encoder' comes from library 'os'"):
        load_pipeline(path)


@pytest.mark.parametrize("mapping", [
    {"transformer": "nf4", "text_encoder_2": "int8wo", "text_encoder": "quanto-int4"},
    {"transformer": "gguf-q4_0", "text_encoder_2": "llm-int8"},
    {"transformer": "modelopt-fp8", "text_encoder": "fp4"},
], ids=["nf4-int8wo-quanto", "gguf-llmint8", "modelopt-fp4"])
def test_pre_quantized_pipeline_round_trip_is_bit_for_bit(tmp_path, mapping):
    pipe = load_pipeline(tiny_pipeline_dir("flux"), mapping, torch_dtype=torch.float32)
    before = _image(pipe)
    out = save_quantized(pipe, tmp_path / "flux-q")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    for name in mapping:
        assert "quantization_config" in json.loads((out / name / "config.json").read_text())
    again = load_pipeline(out, torch_dtype=torch.float32)
    assert again.quantserve_report.pre_quantized
    assert {n: r.backend for n, r in again.quantserve_report.components.items()} == \
           {n: r.backend for n, r in pipe.quantserve_report.components.items()}
    assert np.array_equal(before, _image(again))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_a_failed_save_leaves_the_previous_directory_intact(tmp_path, monkeypatch):
    from quantserve.runtime import loader

    pipe = load_pipeline(tiny_pipeline_dir("pixart-sigma"), {"transformer": "nf4"}, torch_dtype=torch.float32)
    out = save_quantized(pipe, tmp_path / "pixart-q")
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    calls = []

    def failing(model, folder):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(model, folder)

    real = loader.write_model
    monkeypatch.setattr(loader, "write_model", failing)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(pipe, out)
    after = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["pixart-q"]


def test_a_gguf_file_replaces_the_transformer(tmp_path):
    path = tiny_pipeline_dir("flux")
    pipe = load_pipeline(path, {"transformer": "gguf-q8_0"}, torch_dtype=torch.float32)
    out = save_quantized(pipe, tmp_path / "flux-gguf")
    gguf_file = next((out / "transformer").glob("*.gguf"))
    replaced = load_pipeline(path, None, torch_dtype=torch.float32, transformer_gguf=gguf_file)
    assert replaced.quantserve_report.components["transformer"].backend == "gguf"
    assert np.array_equal(_image(pipe), _image(replaced))
    with pytest.raises(CheckpointError, match="no such .gguf"):
        load_pipeline(path, transformer_gguf=tmp_path / "nope.gguf")


def test_transformers_written_bitsandbytes_text_encoder_loads_pre_quantized(tmp_path):
    """A T5 that transformers itself quantized (bitsandbytes 4-bit) and saved: same packed weights, no requantizing."""
    import bitsandbytes as bnb
    import transformers

    from quantserve.runtime import load_model

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=64, d_ff=128, num_layers=1, num_heads=2, d_kv=32,
                                   feed_forward_proj="gated-gelu")
    transformers.T5EncoderModel(config).save_pretrained(tmp_path / "dense")
    theirs = transformers.T5EncoderModel.from_pretrained(
        tmp_path / "dense", quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    theirs.save_pretrained(tmp_path / "t5-nf4")
    ours = load_model(tmp_path / "t5-nf4", torch_dtype=torch.float32)
    assert ours.quantserve_report.pre_quantized
    compared = 0
    for name, module in theirs.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            expected = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert torch.equal(ours.get_submodule(name).qweight.dequantize(torch.float32), expected.float()), name
            compared += 1
    assert compared >= 6


def test_report_lists_components_and_prefixed_layers():
    pipe = load_pipeline(tiny_pipeline_dir("sd3"), {"transformer": "nf4", "text_encoder_3": "int8wo"},
                         torch_dtype=torch.float32)
    report = pipe.quantserve_report
    names = [layer.name for layer in report.layers]
    assert any(n.startswith("text_encoder_3.encoder.") for n in names) and any(n.startswith("transformer.") for n in names)
    assert report.scheme == "text_encoder_3=int8wo, transformer=nf4" or report.scheme == "transformer=nf4, text_encoder_3=int8wo"
    text = report.table(limit=3)
    for component in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        assert f"== {component} ==" in text
    assert "StableDiffusion3Pipeline" in text
    d = report.to_dict()
    assert d["model_bytes"] == report.model_bytes and set(d["components"]) == set(report.components)
    assert report.backend == "bitsandbytes"


def test_cli_quantizes_and_explains_a_pipeline_directory(tmp_path, capsys):
    from quantserve.cli import main

    out = tmp_path / "flux-cli"
    assert main(["quantize", str(tiny_pipeline_dir("flux")), "--components", "transformer=nf4,text_encoder_2=int8wo",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FluxPipeline" in printed and f"wrote {out}" in printed
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "T5EncoderModel" in printed and "torchao" in printed
    assert main(["explain", str(out), "--json"]) == 0
    layers = {d["layer"].split(".")[0] for d in json.loads(capsys.readouterr().out)}
    assert layers == {"transformer", "text_encoder_2"}
    assert main(["quantize", str(tiny_pipeline_dir("flux")), "--components", "transformer=nf5", "--out",
                 str(tmp_path / "x")]) == 1
    assert "transformer=nf5" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_tied_weights_follow_transformers(tmp_path):
    """T5's embed_tokens is tied to shared when the checkpoint stores only shared; when it stores both with different
    values, transformers keeps both as stored, and so does quantserve (loading and saving again)."""
    import transformers
    from safetensors.torch import load_file, save_file

    from quantserve.runtime import load_model

    config = transformers.T5Config(vocab_size=64, d_model=64, d_ff=128, num_layers=1, num_heads=2, d_kv=32,
                                   feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(tmp_path / "t5")
    ids = torch.tensor([[3, 4, 5, 1]])
    tied = load_model(tmp_path / "t5", torch_dtype=torch.float32)
    assert tied.shared.weight is tied.encoder.embed_tokens.weight
    weights = tmp_path / "t5" / "model.safetensors"
    state = load_file(weights)
    state["encoder.embed_tokens.weight"] = state["shared.weight"] + 1
    save_file(state, weights, metadata={"format": "pt"})
    theirs = transformers.T5EncoderModel.from_pretrained(tmp_path / "t5")
    ours = load_model(tmp_path / "t5", torch_dtype=torch.float32)
    again = load_model(save_quantized(ours, tmp_path / "t5-again"), torch_dtype=torch.float32)
    with torch.no_grad():
        expected = theirs(input_ids=ids).last_hidden_state
        assert torch.equal(ours(input_ids=ids).last_hidden_state, expected)
        assert torch.equal(again(input_ids=ids).last_hidden_state, expected)
