"""The shipped model loads, generates the digits asked for, is deterministic per seed and judged accurate."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from quantserve.default_model import DigitsPipeline, default_model_dir, load_default_pipeline
from quantserve.default_model.classifier import heldout_classifier
from quantserve.default_model.evaluate import eval_labels, generate, pixel_difference
from quantserve.default_model.model import NULL_CLASS


def test_shipped_weights_are_a_diffusers_model_dir() -> None:
    root = default_model_dir()
    for rel in ("model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                "scheduler/scheduler_config.json"):
        assert (root / rel).is_file(), rel
    assert (root / "transformer/diffusion_pytorch_model.safetensors").stat().st_size < 6_000_000


def test_generates_one_image_per_digit_in_seconds(pipe: DigitsPipeline) -> None:
    start = time.perf_counter()
    out = pipe([str(d) for d in range(10)], seed=0)
    elapsed = time.perf_counter() - start
    # ~0.1-0.3 s on an idle 2-core CPU; the bound only catches gross regressions on a busy CI machine
    assert elapsed < 60.0, f"10 digits took {elapsed:.1f} s"
    assert out.labels == list(range(10))
    assert len(out.images) == 10
    assert all(im.size == (64, 64) and im.mode == "L" for im in out.images)
    assert out.pixels.shape == (10, 1, 8, 8) and out.pixels.dtype == torch.float32
    assert torch.isfinite(out.pixels).all() and out.pixels.abs().max() <= 1.0
    assert heldout_classifier().predict(out.pixels).tolist() == list(range(10))


def test_runs_in_bf16_by_default(pipe: DigitsPipeline) -> None:
    assert pipe.dtype == torch.bfloat16
    assert pipe.transformer.proj_out_2.weight.dtype == torch.bfloat16


def test_images_are_nearest_upscaled_pixels(pipe: DigitsPipeline) -> None:
    out = pipe(["4", "seven"], seed=1, image_size=32)
    for im, px in zip(out.images, out.pixels):
        arr = np.asarray(im)
        assert arr.shape == (32, 32)
        blocks = arr.reshape(8, 4, 8, 4)
        assert (blocks == blocks[:, :1, :, :1]).all(), "each 8x8 pixel must become a constant 4x4 block"
        expected = ((px[0].clamp(-1, 1) + 1) * 127.5).round().numpy().astype(np.uint8)
        assert (arr[::4, ::4] == expected).all()


def test_bf16_accuracy_above_margin(pipe: DigitsPipeline) -> None:
    labels = eval_labels(10)
    pixels = generate(pipe, labels, seed=1000)
    accuracy = (heldout_classifier().predict(pixels) == torch.tensor(labels)).float().mean().item()
    assert accuracy >= 0.9, f"bf16 class accuracy {accuracy:.3f} < 0.9"


def test_same_seed_same_images_other_seed_other_images(pipe: DigitsPipeline) -> None:
    prompts = ["0", "1", "2", "3"]
    a, b, c = pipe(prompts, seed=7), pipe(prompts, seed=7), pipe(prompts, seed=8)
    assert torch.equal(a.pixels, b.pixels)
    assert [np.asarray(i).tobytes() for i in a.images] == [np.asarray(i).tobytes() for i in b.images]
    assert pixel_difference(a.pixels, c.pixels) > 0.05


def test_noise_of_an_image_does_not_depend_on_its_batch_position(pipe: DigitsPipeline) -> None:
    alone = pipe(["5"], seed=11).pixels
    in_batch = pipe(["2", "5"], seed=10).pixels[1:]
    assert pixel_difference(alone, in_batch) < 0.02


def test_explicit_generator_is_deterministic(pipe: DigitsPipeline) -> None:
    a = pipe(["6", "6"], generator=torch.Generator().manual_seed(3)).pixels
    b = pipe(["6", "6"], generator=torch.Generator().manual_seed(3)).pixels
    assert torch.equal(a, b)
    assert pixel_difference(a[:1], a[1:]) > 0.05, "one generator must give each image its own noise"


def test_guidance_scale_uses_the_null_class(pipe: DigitsPipeline) -> None:
    plain = pipe(["3", "8"], seed=2, num_inference_steps=10)
    guided = pipe(["3", "8"], seed=2, num_inference_steps=10, guidance_scale=1.5)
    assert pixel_difference(plain.pixels, guided.pixels) > 0.0
    assert heldout_classifier().predict(guided.pixels).tolist() == [3, 8]


def test_predict_guidance_zero_is_the_null_class_prediction(pipe: DigitsPipeline) -> None:
    x = pipe.initial_noise(3, seed=0)
    t = torch.tensor(500)
    labels = torch.tensor([1, 4, 9])
    unconditional = pipe.predict(x, t, labels, guidance_scale=0.0)
    null = pipe.predict(x, t, torch.full_like(labels, NULL_CLASS), guidance_scale=1.0)
    conditional = pipe.predict(x, t, labels, guidance_scale=1.0)
    assert not unconditional.requires_grad and unconditional.shape == (3, 1, 8, 8)
    assert torch.allclose(unconditional, null, atol=1e-2)
    assert not torch.allclose(conditional, null, atol=1e-2)


@pytest.mark.parametrize(("field", "kwargs"), [("num_inference_steps", {"num_inference_steps": 0}),
                                               ("image_size", {"image_size": 0})])
def test_bad_arguments_name_the_field(pipe: DigitsPipeline, field: str, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=field):
        pipe(["1"], **kwargs)


class Int8Linear(nn.Module):
    """Stand-in for a quantized Linear: int8 weight and per-row scale, dequantized on the fly."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        self.weight_int8 = nn.Parameter(torch.round(w / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, (self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)), self.bias)


def _quantize_linears(module: nn.Module) -> int:
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
            count += 1
        else:
            count += _quantize_linears(child)
    return count


def test_pipeline_runs_a_transformer_with_quantized_linears(pipe: DigitsPipeline) -> None:
    quantized = load_default_pipeline()
    assert _quantize_linears(quantized.transformer) > 50
    assert not any(isinstance(m, nn.Linear) for m in quantized.transformer.modules())
    prompts = list(range(10))
    ref, out = pipe(prompts, seed=4), quantized(prompts, seed=4)
    assert out.pixels.shape == (10, 1, 8, 8)
    assert pixel_difference(ref.pixels, out.pixels) < 0.1
    assert heldout_classifier().predict(out.pixels).tolist() == prompts
