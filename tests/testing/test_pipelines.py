"""quantserve.testing.pipelines: tiny pipelines that diffusers' own loader reads offline and that generate images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from quantserve.testing import pipelines
from quantserve.testing.pipelines import FAMILIES, build_pipeline, flux_real_width_configs
from tests.pipelines_fixtures import tiny_pipeline_dir

PIPELINE_CLASSES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline",
                    "pixart-sigma": "PixArtSigmaPipeline", "sana": "SanaPipeline"}
CAPTION = "a photo of a red fox sitting on the moon golden hour"  # words of the corpus; CLIP lower-cases anyway
SIZE = 32  # the smallest size every family takes: VAE scale 8 x patch 2 (FLUX, SD3, PixArt), DC-AE's scale 32 (Sana)


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _load(path: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)  # diffusers' own loader, float32, nothing from the hub
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_loads_tokenizes_and_generates(family: str, tmp_path: Path) -> None:
    path = build_pipeline(family, tmp_path / family)
    assert path == tmp_path / family
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == PIPELINE_CLASSES[family]
    assert sum(p.stat().st_size for p in path.rglob("*.safetensors")) < 4_000_000

    pipe = _load(path)
    assert type(pipe).__name__ == PIPELINE_CLASSES[family]

    for name, tokenizer in pipe.components.items():
        if not name.startswith("tokenizer"):
            continue
        ids = tokenizer(CAPTION).input_ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == CAPTION, name
        assert tokenizer.unk_token_id not in tokenizer(CAPTION, add_special_tokens=False).input_ids, name
        assert ids[-1] == tokenizer.eos_token_id or ids[0] == tokenizer.bos_token_id, name
        encoder = pipe.components["text_encoder" + name.removeprefix("tokenizer")]
        assert encoder.config.vocab_size == len(tokenizer), name
        if hasattr(encoder.config, "max_position_embeddings") and "clip" in encoder.config.model_type:
            assert tokenizer.model_max_length == encoder.config.max_position_embeddings == 77

    # the pipeline's own defaults for the text (FLUX's 512 T5 tokens, Sana's long instruction + 300) must fit
    extra = {"use_resolution_binning": False} if family in ("pixart-sigma", "sana") else {}
    images = pipe(CAPTION, num_inference_steps=2, height=SIZE, width=SIZE, output_type="np",
                  generator=torch.Generator().manual_seed(0), **extra).images
    assert images.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0.01  # weights at unit gain: the image depends on them, it is not flat grey


@pytest.mark.parametrize("family", ["pixart-sigma", "sana"])
def test_resolution_binning_default_works(family: str) -> None:
    # the transformers' sample_size is one of the sizes the pipelines' aspect-ratio tables know
    pipe = _load(tiny_pipeline_dir(family))
    images = pipe("a small cat", num_inference_steps=1, height=SIZE, width=SIZE, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = _files(build_pipeline("sana", tmp_path / "a", seed=3))
    b = _files(build_pipeline("sana", tmp_path / "b", seed=3))
    assert a == b  # every file, tokenizers and configs included
    c = _files(build_pipeline("sana", tmp_path / "c", seed=4))
    weights = [name for name in a if name.endswith(".safetensors")]
    assert len(weights) == 3
    assert all(a[name] != c[name] for name in weights)
    assert {n: a[n] for n in a if n not in weights} == {n: c[n] for n in c if n not in weights}


def test_dtypes_of_one_seed_hold_the_same_values(tmp_path: Path) -> None:
    build_pipeline("flux", tmp_path / "f32")
    build_pipeline("flux", tmp_path / "bf16", dtype="bfloat16")
    f32 = load_file(tmp_path / "f32" / "transformer" / "diffusion_pytorch_model.safetensors")
    bf16 = load_file(tmp_path / "bf16" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert f32.keys() == bf16.keys()
    for name, tensor in bf16.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, f32[name].to(torch.bfloat16)), name


def test_refuses_a_non_empty_out_dir_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_pipeline("sd3", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    build_pipeline("sd3", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left beside it

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (build_pipeline("sd3", empty) / "model_index.json").exists()  # an empty directory is fine


def test_a_failed_build_leaves_the_old_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = build_pipeline("pixart-sigma", tmp_path / "out")
    before = _files(out)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipelines, "_write_components", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_pipeline("pixart-sigma", out, overwrite=True)
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"family": "sdxl"}, r"family 'sdxl' is unknown; accepted values: flux, sd3, pixart-sigma, sana"),
    ({"preset": "huge"}, r"preset 'huge' is unknown; accepted values: tiny, flux-real-width"),
    ({"family": "sd3", "preset": "flux-real-width"},
     r"preset 'flux-real-width' is not available for family 'sd3'; accepted values for 'sd3': tiny"),
    ({"dtype": torch.int8}, r"dtype torch.int8 is not supported; accepted values: float32, bfloat16, float16"),
    ({"dtype": "fp8"}, r"dtype 'fp8' is not supported; accepted values: float32, bfloat16"),
])
def test_bad_arguments_name_the_argument_and_the_accepted_values(kwargs: dict, message: str, tmp_path: Path) -> None:
    arguments = {"family": "flux", "out_dir": tmp_path / "out", **kwargs}
    with pytest.raises(ValueError, match=message):
        build_pipeline(**arguments)
    assert not (tmp_path / "out").exists()


def test_flux_real_width_configs() -> None:
    configs = flux_real_width_configs()
    transformer, clip, t5, vae = (configs[k] for k in ("transformer", "text_encoder", "text_encoder_2", "vae"))
    assert transformer["num_attention_heads"] * transformer["attention_head_dim"] == 3072
    assert (transformer["num_attention_heads"], transformer["attention_head_dim"]) == (24, 128)
    assert (transformer["num_layers"], transformer["num_single_layers"]) == (1, 1)
    assert transformer["joint_attention_dim"] == t5["d_model"] == 4096
    assert transformer["pooled_projection_dim"] == clip["hidden_size"] == 768
    assert transformer["in_channels"] == 4 * vae["latent_channels"] == 64
    assert transformer["guidance_embeds"] is True
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    assert (t5["d_ff"], t5["num_heads"], t5["d_kv"], t5["num_layers"]) == (10240, 64, 64, 2)
    assert t5["feed_forward_proj"] == "gated-gelu"
    assert (clip["intermediate_size"], clip["num_attention_heads"], clip["projection_dim"]) == (3072, 12, 768)
    assert (clip["num_hidden_layers"], clip["max_position_embeddings"]) == (2, 77)
    assert vae["block_out_channels"] == [128, 256, 512, 512]
    assert (vae["latent_channels"], vae["layers_per_block"]) == (16, 2)
    assert (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)
    assert t5["vocab_size"] == len(pipelines.t5_tokenizer()) and clip["vocab_size"] == len(pipelines.clip_tokenizer())


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        pipelines.main(["--help"])
    assert exit_info.value.code == 0
    assert "flux-real-width" in capsys.readouterr().out

    assert pipelines.main(["sana", str(tmp_path / "cli"), "--seed", "1", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    config = json.loads((tmp_path / "cli" / "text_encoder" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"

    with pytest.raises(SystemExit) as exit_info:
        pipelines.main(["sana", str(tmp_path / "cli")])  # exists and not empty
    assert exit_info.value.code == 2
    assert "overwrite" in capsys.readouterr().err


def test_session_cache_builds_once() -> None:
    path = tiny_pipeline_dir("sd3")
    assert tiny_pipeline_dir("sd3") is path
    assert (path / "model_index.json").exists()
