"""A digits variant in a replica, without Ray: loading through its family, batching, per-job outcomes, GEMM
sampling. (The text-to-image family: test_text_to_image.py.)"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from quantserve.serve.config import ConfigError, VariantConfig
from quantserve.serve.fidelity import PSNR_CAP_DB, compare, pixel_difference
from quantserve.serve.gemm_probe import GemmProbe
from quantserve.serve.generation import (
    BatchGenerator,
    LoadedVariant,
    encode_png,
    load_variant,
)

from .helpers import FAIL_SEED, MODEL_DIR, faulty_model_dir


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """As a replica runs (torch_threads: 1): two threads on two busy cores only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bf16() -> LoadedVariant:
    return load_variant(VariantConfig(name="bf16", model=MODEL_DIR, quantization="bf16"))


@pytest.fixture(scope="module")
def nf4() -> LoadedVariant:
    return load_variant(VariantConfig(name="nf4", model=MODEL_DIR, quantization="nf4"))


def job(prompt: str = "7", n: int = 1, size: int = 16, steps: int = 4, guidance: float = 1.0, seed: int = 0) -> dict:
    return {"prompt": prompt, "n": n, "size": f"{size}x{size}", "steps": steps, "guidance": guidance, "seed": seed}


def test_loaded_variants_report_scheme_bytes_and_kernels(bf16: LoadedVariant, nf4: LoadedVariant) -> None:
    b, q = bf16.info(), nf4.info()
    assert (b["scheme"], b["backend"], b["kernel"], b["quantization_config"]) == ("bf16", "none", "torch", None)
    assert (b["family"], b["pipeline_class"], b["extras"], b["negative_prompt"]) == ("digits", "DigitsPipeline", {}, False)
    assert (q["scheme"], q["backend"]) == ("nf4", "bitsandbytes")
    assert q["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert q["layers"]["quantized"] == q["layers"]["total"] > 0
    assert q["model_bytes"] < b["model_bytes"] / 2


def test_a_batch_gives_each_job_what_the_pipeline_gives_it_alone(nf4: LoadedVariant) -> None:
    jobs = [job("7", n=2, seed=3), job("three", n=1, size=32, seed=5), job("1", steps=2, guidance=2.0, seed=8)]
    outcomes, stats = BatchGenerator(nf4).run(jobs)
    assert [o["status"] for o in outcomes] == [200, 200, 200]
    assert [o["labels"] for o in outcomes] == [[7, 7], [3], [1]]
    assert stats.images == 4 and len(stats.step_seconds) == 4 + 2  # two groups: (4 steps, 1.0) and (2 steps, 2.0)
    for j, outcome in zip(jobs, outcomes):
        side = int(j["size"].split("x")[0])
        alone = nf4.engine.pipe([j["prompt"]] * j["n"], seed=j["seed"], num_inference_steps=j["steps"],
                                guidance_scale=j["guidance"], image_size=side)
        assert pixel_difference(outcome["images"], [encode_png(im) for im in alone.images]) < 0.02
        assert Image.open(io.BytesIO(outcome["images"][0])).size == (side, side)
        assert outcome["size"] == j["size"]


def test_one_bad_job_does_not_fail_its_batch() -> None:
    faulty = load_variant(VariantConfig(name="faulty", model=faulty_model_dir(), quantization="bf16"))
    assert faulty.engine.family == "faulty-digits"
    generator = BatchGenerator(faulty)
    outcomes, _ = generator.run([job(seed=1), job("a cat"), job(seed=FAIL_SEED), job("2", seed=2),
                                 {**job(), "size": "32x16"}, {**job(), "negative_prompt": "1"},
                                 {**job(), "extras": {"max_sequence_length": 8}}])
    assert [o["status"] for o in outcomes] == [200, 422, 500, 200, 422, 422, 422]
    assert outcomes[1]["param"] == "prompt" and "a cat" in outcomes[1]["message"]
    assert outcomes[4]["param"] == "size" and "square" in outcomes[4]["message"]
    assert outcomes[5]["param"] == "negative_prompt"
    assert outcomes[6]["param"] == "max_sequence_length" and "digits" in outcomes[6]["message"]
    assert outcomes[2]["error_id"] in outcomes[2]["message"]
    generator.health()


def test_gemm_probe_times_the_layers_by_backend_and_kernel(bf16: LoadedVariant, nf4: LoadedVariant) -> None:
    from quantserve.runtime.router import quant_layers

    # the kernels nf4's layers run: the router's choice per layer, per M bucket where autotune winners differ (the
    # session's autotune cache may hold winners from a replica that tuned at start)
    nf4_kernels = {name for m in nf4.engine.modules for _, layer in quant_layers(m)
                   for name in [layer.kernel_name, *(n for n, _ in layer.by_bucket.values())]}
    for loaded, backend, kernels in ((bf16, "dense", {"torch"}), (nf4, "bitsandbytes", nf4_kernels)):
        probe = GemmProbe(loaded.engine.modules, every=2)
        generator = BatchGenerator(loaded, probe=probe)
        _, sampled = generator.run([job()])
        _, skipped = generator.run([job()])
        assert sampled.gemm and {b for b, _ in sampled.gemm} == {backend}
        assert {k for _, k in sampled.gemm} <= kernels, (sampled.gemm.keys(), kernels)
        for sample in sampled.gemm.values():
            assert sample.calls > 0 and sample.flops > 0 and sample.gflops > 0
        assert skipped.gemm == {}
    assert not GemmProbe(bf16.engine.pipe.transformer, every=0).due()


def test_kernel_policy_reaches_the_router() -> None:
    config = VariantConfig(name="ref", model=MODEL_DIR, quantization="nf4",
                           kernel_policy={"force": {"transformer_blocks.0.*": "reference"}})
    loaded = load_variant(config)
    forced = [layer for layer in loaded.report.layers if layer.name.startswith("transformer_blocks.0.")]
    assert forced and all(layer.kernel == "reference" for layer in forced)
    others = [layer for layer in loaded.report.layers if not layer.name.startswith("transformer_blocks.0.")]
    assert all(layer.kernel != "reference" for layer in others)
    assert loaded.info()["layers"]["kernels"]["reference"] == len(forced)
    assert sum(loaded.info()["layers"]["kernel_reasons"].values()) == len(loaded.report.quantized_layers)
    outcomes, _ = BatchGenerator(loaded).run([job()])
    assert outcomes[0]["status"] == 200


def test_a_kernel_the_runtime_does_not_know_fails_the_load_naming_the_policy() -> None:
    config = VariantConfig(name="typo", model=MODEL_DIR, quantization="nf4", kernel_policy={"force": {"*": "refrence"}})
    with pytest.raises(ValueError, match=r"kernel_policy\.force\['\*'\]: unknown kernel 'refrence'"):
        load_variant(config)


def test_a_directory_no_family_serves_names_the_variant(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"variants\[gone\]\.model: .* not a pipeline directory .*supported pipeline "
                                          r"classes: DigitsPipeline, FluxPipeline"):
        load_variant(VariantConfig(name="gone", model=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"variants\[gone\]\.model: .* is not a directory"):
        load_variant(VariantConfig(name="gone", model=str(tmp_path / "missing")))


def test_pixel_difference() -> None:
    black = encode_png(Image.new("L", (8, 8), 0))
    white = encode_png(Image.new("L", (8, 8), 255))
    assert pixel_difference([black], [black]) == 0.0
    assert pixel_difference([black, black], [white, black]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="equal"):
        pixel_difference([black], [])



def test_fidelity_of_identical_noisy_and_inverted_images() -> None:
    """MAE, PSNR and SSIM through torchmetrics, averaged over a request's images; shapes must agree."""
    rng = np.random.default_rng(0)

    def png(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    grey = (rng.random((16, 16)) * 255).astype(np.uint8)
    noisy = np.clip(grey.astype(int) + rng.integers(-8, 9, grey.shape), 0, 255).astype(np.uint8)
    colour = (rng.random((24, 40, 3)) * 255).astype(np.uint8)
    same = compare([png(grey)], [png(grey)])
    assert (same.mae, same.psnr, same.ssim) == (0.0, PSNR_CAP_DB, pytest.approx(1.0))
    near = compare([png(grey), png(grey)], [png(noisy), png(grey)])
    assert 0 < near.mae < 0.02 and 30 < near.psnr < PSNR_CAP_DB and 0.95 < near.ssim < 1.0
    assert near.mae == pytest.approx(pixel_difference([png(grey), png(grey)], [png(noisy), png(grey)]))
    far = compare([png(colour)], [png(255 - colour)])
    assert far.mae > 0.4 and far.psnr < 10 and far.ssim < 0
    assert compare([png(grey[:8, :8].copy())], [png(noisy[:8, :8].copy())]).ssim > 0.9  # a window that fits 8x8
    with pytest.raises(ValueError, match="shapes differ"):
        compare([png(grey)], [png(colour)])
    with pytest.raises(ValueError, match="equal, non-empty"):
        compare([png(grey)], [])
