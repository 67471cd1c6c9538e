"""The diffusers text-to-image family without Ray, on the tiny offline pipelines (FLUX, SD3, PixArt-Sigma, Sana):
which family serves which directory, request validation, batching, the health probe, and local generation."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quantserve.serve.config import ConfigError, LimitsConfig, VariantConfig
from quantserve.serve.families import check_variant, families, resolve
from quantserve.serve.generation import BatchGenerator, LoadedVariant, encode_png, load_variant
from quantserve.serve.protocol import ClientError, GenerationCancelled

from .helpers import T2I_QUANTIZATION, tiny_pipeline_dir

FAMILIES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline", "pixart-sigma": "PixArtSigmaPipeline",
            "sana": "SanaPipeline"}
LIMITS = LimitsConfig(max_n=3, max_steps=8, default_steps=2, max_size=128, min_size=16, default_size=32,
                      max_prompt_chars=200)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(family: str, **variant: object) -> LoadedVariant:
    config = VariantConfig(name=family, model=str(tiny_pipeline_dir(family)), dtype="float32", **variant)
    return load_variant(config, LIMITS.for_variant(config.limits))


@pytest.fixture(scope="module")
def loaded() -> dict[str, LoadedVariant]:
    return {family: load(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def flux(loaded: dict[str, LoadedVariant]) -> LoadedVariant:
    return loaded["flux"]


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


# --- which family serves what ---------------------------------------------------------------------------------

def test_each_pipeline_class_finds_its_family_and_null_is_the_digits_model() -> None:
    for family, class_name in FAMILIES.items():
        found, source = resolve(str(tiny_pipeline_dir(family)), "variants.0.model")
        assert (found.name, source.class_name) == ("text-to-image", class_name)
    found, source = resolve(None)
    assert found.name == "digits" and source.class_name == "DigitsPipeline"
    assert type(families()["digits"]).__module__ == "quantserve.default_model.serving"  # through the entry point


def test_an_unknown_pipeline_class_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ConfigError) as info:
        check_variant(VariantConfig(name="x", model=str(tmp_path)), 3)
    message = str(info.value)
    assert message.startswith("variants.3.model: ") and "a StableDiffusionXLPipeline pipeline" in message
    for supported in [*FAMILIES.values(), "DigitsPipeline"]:
        assert supported in message


def test_quantizing_a_component_the_pipeline_lacks_is_a_config_error() -> None:
    config = VariantConfig(name="x", model=str(tiny_pipeline_dir("pixart-sigma")),
                           quantization={"transformer": "nf4", "text_encoder_2": "int8wo"})
    with pytest.raises(ConfigError, match=r"variants\.1\.quantization: component 'text_encoder_2' is not in .* "
                                          r"\(its components: scheduler, text_encoder, tokenizer, transformer, vae\)"):
        check_variant(config, 1)
    check_variant(VariantConfig(name="x", model=str(tiny_pipeline_dir("flux")), quantization=T2I_QUANTIZATION), 0)


def test_serve_imports_nothing_from_the_face_package_or_the_digits_model() -> None:
    import ast

    serve_dir = Path(__file__).resolve().parents[2] / "quantserve" / "serve"
    allowed = ("quantserve.runtime", "quantserve.kernels", "quantserve.serve")
    for path in serve_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                if name.split(".")[0] == "quantserve":
                    assert name.startswith(allowed), f"{path.name} imports {name}"


# --- requests -------------------------------------------------------------------------------------------------

def test_requests_are_normalised_for_the_pipeline(flux: LoadedVariant) -> None:
    engine = flux.engine
    job = engine.normalize({"prompt": "a red car", "seed": 4})
    assert (job["size"], job["width"], job["height"]) == ("32x32", 32, 32)  # the variant's default size
    assert (job["n"], job["steps"], job["guidance"]) == (1, 2, 3.5)  # FluxPipeline's own default guidance
    assert job["negative_prompt"] is None and job["extras"] == {}
    assert engine.normalize(job) == job  # normalising twice changes nothing
    job = engine.normalize({"prompt": "a red car", "size": "96x32", "negative_prompt": "blurry", "seed": 0,
                            "extras": {"max_sequence_length": 64, "true_cfg_scale": 2}})
    assert (job["width"], job["height"]) == (96, 32)  # not only square
    assert job["extras"] == {"max_sequence_length": 64, "true_cfg_scale": 2.0}


@pytest.mark.parametrize(("change", "param", "words"), [
    ({"size": "40x32"}, "size", "multiple of 16 for FluxPipeline (vae_scale_factor 8 x 2"),
    ({"size": "32x40"}, "size", "multiple of 16"),
    ({"size": "256x32"}, "size", "between 16 and 128"),
    ({"size": "32X32"}, "size", "expected 'WxH'"),
    ({"size": " 32x32"}, "size", "expected 'WxH'"),
    ({"n": 4}, "n", "between 1 and 3"),
    ({"steps": 9}, "steps", "between 1 and 8"),
    ({"guidance": 21.0}, "guidance", "between 0 and 20"),
    ({"prompt": "x" * 201}, "prompt", "1..200 characters"),
    ({"negative_prompt": "x" * 201}, "negative_prompt", "at most 200"),
    ({"extras": {"clip_skip": 1}}, "clip_skip", "its extra fields: max_sequence_length, true_cfg_scale"),
    ({"extras": {"max_sequence_length": 513}}, "max_sequence_length", "between 1 and 512"),
    ({"extras": {"max_sequence_length": 1.5}}, "max_sequence_length", "an integer"),
    ({"extras": {"true_cfg_scale": True}}, "true_cfg_scale", "a number"),
])
def test_a_bad_field_is_a_client_error_naming_it(flux: LoadedVariant, change: dict, param: str, words: str) -> None:
    with pytest.raises(ClientError) as info:
        flux.engine.normalize({"prompt": "a red car", "seed": 0, **change})
    assert info.value.param == param and info.value.status == 422
    assert str(info.value).startswith(f"{param}: ") and words in str(info.value), str(info.value)


def test_each_family_has_its_size_rule_and_extras(loaded: dict[str, LoadedVariant]) -> None:
    rules = {family: (lv.engine.multiple, sorted(lv.engine.extras)) for family, lv in loaded.items()}
    assert rules == {"flux": (16, ["max_sequence_length", "true_cfg_scale"]), "sd3": (16, ["max_sequence_length"]),
                     "pixart-sigma": (16, ["max_sequence_length"]), "sana": (32, ["max_sequence_length"])}
    with pytest.raises(ClientError, match=r"size: each side must be a multiple of 32 for SanaPipeline"):
        loaded["sana"].engine.normalize({"prompt": "a cat", "size": "48x32", "seed": 0})
    with pytest.raises(ClientError, match="true_cfg_scale: not a request field of StableDiffusion3Pipeline"):
        loaded["sd3"].engine.normalize({"prompt": "a cat", "seed": 0, "extras": {"true_cfg_scale": 2.0}})


def test_a_default_size_the_pipeline_cannot_make_fails_the_load() -> None:
    config = VariantConfig(name="sana", model=str(tiny_pipeline_dir("sana")), dtype="float32",
                           limits={"default_size": "48x48"})
    with pytest.raises(ConfigError, match=r"limits\.default_size: the default size 48x48 does not suit SanaPipeline"):
        load_variant(config, LIMITS.for_variant(config.limits))


# --- generation -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_generates_non_square_images_and_probes_its_denoiser(loaded: dict[str, LoadedVariant],
                                                                          family: str) -> None:
    lv = loaded[family]
    outcomes, stats = BatchGenerator(lv).run([{"prompt": "a red car", "size": "64x32", "steps": 2, "seed": 1,
                                               "negative_prompt": "blurry"}])
    assert outcomes[0]["status"] == 200, outcomes[0]
    image = Image.open(io.BytesIO(outcomes[0]["images"][0]))
    assert image.size == (64, 32) and pixels(outcomes[0]["images"][0]).std() > 0
    assert len(stats.step_seconds) == 2

    seen: list[torch.Tensor] = []
    denoiser = lv.engine.denoiser
    hook = denoiser.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["hidden_states"]),
                                              with_kwargs=True)
    try:
        lv.engine.health()
    finally:
        hook.remove()
    (hidden,) = seen  # one real forward of the variant's own denoiser, with its own channels
    channels = hidden.shape[-1] if family == "flux" else hidden.shape[1]
    assert channels == denoiser.config.in_channels and hidden.dtype == torch.float32


def test_a_denoiser_that_computes_garbage_fails_the_health_check() -> None:
    lv = load("sd3")
    lv.engine.health()
    with torch.no_grad():
        next(lv.engine.denoiser.transformer_blocks[0].parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="not finite"):
        lv.engine.health()


def test_compatible_jobs_share_one_call_and_match_separate_calls(flux: LoadedVariant) -> None:
    a = {"prompt": "a red car", "n": 2, "size": "64x32", "steps": 2, "seed": 3}
    b = {"prompt": "a blue cat on the moon", "size": "64x32", "steps": 2, "seed": 9}
    c = {"prompt": "a red car", "size": "32x32", "steps": 2, "seed": 3}  # another size: another call
    d = {**b, "negative_prompt": "blurry", "extras": {"true_cfg_scale": 2.0}}  # another call too
    generator = BatchGenerator(flux)
    calls: list[int] = []
    run = flux.engine.run
    flux.engine.run = lambda jobs, on_step=None: calls.append(sum(j["n"] for j in jobs)) or run(jobs, on_step)
    try:
        together, stats = generator.run([a, b, c, d])
    finally:
        del flux.engine.run
    assert calls == [3, 1, 1] and stats.images == 5 and len(stats.step_seconds) == 3 * 2
    for job, outcome in zip([a, b, c, d], together):
        alone, _ = generator.run([job])
        assert outcome["status"] == alone[0]["status"] == 200 and len(outcome["images"]) == job.get("n", 1)
        for x, y in zip(outcome["images"], alone[0]["images"]):
            # the same noise and prompts; a GEMM over more rows may round an ulp differently: at most one level
            assert np.abs(pixels(x) - pixels(y)).max() <= 1
    assert pixels(together[0]["images"][0]).tolist() != pixels(together[0]["images"][1]).tolist()  # seed 3, 4


def test_a_job_equals_the_plain_pipeline_call_with_per_image_generators(flux: LoadedVariant) -> None:
    job = {"prompt": "a red car", "n": 2, "size": "48x32", "steps": 3, "seed": 7, "guidance": 2.0}
    outcomes, _ = BatchGenerator(flux).run([job])
    pipe = flux.engine.pipe
    images = pipe(prompt=["a red car"] * 2, height=32, width=48, num_inference_steps=3, guidance_scale=2.0,
                  generator=[torch.Generator("cpu").manual_seed(7 + i) for i in range(2)]).images
    assert outcomes[0]["images"] == [encode_png(im) for im in images]  # bit for bit


def test_a_step_callback_can_stop_a_call_whose_requester_is_gone(flux: LoadedVariant) -> None:
    seen: list[tuple[int, int]] = []

    def on_step(done: int, steps: int) -> None:
        seen.append((done, steps))
        if done == 2:
            raise GenerationCancelled("the stream closed")

    generator = BatchGenerator(flux)
    outcomes, stats = generator.run([{"prompt": "a red car", "steps": 6, "seed": 0}], on_step)
    assert seen == [(1, 6), (2, 6)] and len(stats.step_seconds) == 2  # stopped at once, not after six steps
    assert outcomes[0]["status"] == 499 and outcomes[0]["code"] == "cancelled"
    again, _ = generator.run([{"prompt": "a red car", "steps": 1, "seed": 0}])
    assert again[0]["status"] == 200  # the replica goes on serving


def test_quantized_text_encoder_and_denoiser_variant(flux: LoadedVariant) -> None:
    quant = load("flux", quantization=T2I_QUANTIZATION)
    info = quant.info()
    assert info["scheme"] == "transformer=nf4,text_encoder_2=int8wo" and info["backend"] == "bitsandbytes"
    assert info["components"]["text_encoder_2"]["quantized"] > 0
    assert info["components"]["text_encoder_2"]["quantization_config"]["quant_method"] == "torchao"
    assert info["model_bytes"] < flux.info()["model_bytes"]
    job = {"prompt": "a red car", "size": "32x32", "steps": 2, "seed": 1}
    (q,), _ = BatchGenerator(quant).run([job])
    (p,), _ = BatchGenerator(flux).run([job])
    assert q["status"] == 200
    assert np.abs(pixels(q["images"][0]) - pixels(p["images"][0])).mean() < 40  # close to the unquantized image


# --- quantserve generate, locally ------------------------------------------------------------------------------

def test_generate_locally_writes_the_images_a_replica_makes(flux: LoadedVariant, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from quantserve.cli import main

    out = tmp_path / "pngs"
    assert main(["generate", "--model", str(tiny_pipeline_dir("flux")), "--prompt", "a red car", "--size", "48x32",
                 "--steps", "2", "--seed", "4", "--n", "2", "--guidance", "2.5", "--dtype", "float32",
                 "--threads", "1", "--extra", "max_sequence_length=32", "--no-progress", "--out", str(out)]) == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["a_red_car-seed4.png", "a_red_car-seed5.png"]
    job = {"prompt": "a red car", "size": "48x32", "steps": 2, "seed": 4, "n": 2, "guidance": 2.5,
           "extras": {"max_sequence_length": 32}}
    (expected,), _ = BatchGenerator(flux).run([job])
    assert [(out / f).read_bytes() for f in files] == expected["images"]
    assert "FluxPipeline (text-to-image)" in capsys.readouterr().out


def test_generate_locally_with_a_component_mapping_and_its_errors(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from quantserve.cli import main

    model = str(tiny_pipeline_dir("flux"))
    common = ["--prompt", "a red car", "--steps", "1", "--seed", "0", "--dtype", "float32", "--no-progress"]
    assert main(["generate", "--model", model, *common, "--quantization", json.dumps(T2I_QUANTIZATION),
                 "--size", "32x16", "--out", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "a_red_car-seed0.png").size == (32, 16)
    assert main(["generate", "--model", model, *common, "--size", "33x16", "--out", str(tmp_path)]) == 2
    assert "size: each side must be a multiple of 16" in capsys.readouterr().err
    assert main(["generate", "--model", model, *common, "--scheme", "nf5", "--out", str(tmp_path)]) == 2
    assert "unknown scheme 'nf5'" in capsys.readouterr().err
    assert main(["generate", "--model", model, *common, "--quantization", '{"text_encoder_3": "nf4"}',
                 "--out", str(tmp_path)]) == 1
    assert "'text_encoder_3' is not in" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing" / "dir"), *common, "--out", str(tmp_path)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_which_way_generate_goes() -> None:
    import argparse

    from quantserve.serve_cli import generate_mode

    model = str(tiny_pipeline_dir("flux"))
    assert generate_mode(argparse.Namespace(url=None, model=model)) == "local"
    assert generate_mode(argparse.Namespace(url="http://h:1", model=model)) == "remote"  # --url: always remote
    assert generate_mode(argparse.Namespace(url=None, model="nf4")) == "remote"  # a variant of the default server
    assert generate_mode(argparse.Namespace(url=None, model=None)) == "remote"
    with pytest.raises(ValueError, match="--model: ./nowhere is not a directory"):
        generate_mode(argparse.Namespace(url=None, model="./nowhere"))
