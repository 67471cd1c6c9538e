"""Train the embedded default model: a class-conditional DiT on sklearn's 8x8 digits, CPU only.

Run: python -m quantserve.default_model.train --out DIR [--steps N] [--seed S] [--batch B]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from tqdm import tqdm

from quantserve.kernels.atomic_write import atomic_directory
from quantserve.runtime.dtypes import dtype_from_name

from .model import (
    DIGIT_NAMES,
    HELDOUT_FRACTION,
    NULL_CLASS,
    NUM_CLASSES,
    PIXEL_MAX,
    SPLIT_SEED,
    build_scheduler,
    build_transformer,
    load_split,
)

WEIGHT_DTYPES = ("bfloat16", "float32")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the training command line."""
    p = argparse.ArgumentParser(prog="python -m quantserve.default_model.train", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="model directory to write (replaced atomically)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0, help="seed for init, batches and noise")
    p.add_argument("--batch", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="share of labels replaced by the null class")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--weights-dtype", choices=sorted(WEIGHT_DTYPES), default="bfloat16")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.cfg_dropout < 1.0:
        p.error(f"--cfg-dropout must be in [0, 1), got {args.cfg_dropout}")
    return args


def disable_builtin_label_dropout(model: DiTTransformer2DModel) -> None:
    """Turn off diffusers' per-block random label drop so the one null-class drop per sample in the loop rules.

    Each DiT block owns its own LabelEmbedding, which in train mode would drop labels independently per block.
    """
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up then cosine decay to a tenth of the peak learning rate."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Move the EMA weights towards the current weights."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - decay)


def training_target(scheduler: DDIMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Regression target matching the scheduler's prediction_type."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "epsilon":
        return noise
    raise ValueError(f"prediction_type {kind!r} unsupported: use 'v_prediction' or 'epsilon'")


def train_model(args: argparse.Namespace) -> tuple[DiTTransformer2DModel, DDIMScheduler, dict[str, object]]:
    """Train the DiT and return its EMA copy, the scheduler and a summary of the run."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    split = load_split()
    images = torch.from_numpy(split.train_x).unsqueeze(1)
    labels = torch.from_numpy(split.train_y)
    model, scheduler = build_transformer(), build_scheduler()
    disable_builtin_label_dropout(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    model.train()
    smoothed, start = None, time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", unit="step", mininterval=2.0, file=sys.stderr)
    for step in bar:
        idx = torch.randint(0, len(images), (args.batch,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(args.batch, generator=gen) < args.cfg_dropout] = NULL_CLASS
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        pred = model(scheduler.add_noise(x0, noise, t), timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred, training_target(scheduler, x0, noise, t))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, min(args.ema, (1.0 + step) / (10.0 + step)))
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.4f}", refresh=False)
    summary = {
        "steps": args.steps, "seed": args.seed, "batch": args.batch, "lr": args.lr, "ema_decay": args.ema,
        "cfg_dropout": args.cfg_dropout, "threads": args.threads, "final_loss_smoothed": round(smoothed, 5),
        "wall_time_s": round(time.perf_counter() - start, 1), "train_images": len(images),
    }
    return ema.eval(), scheduler, summary


def cast_weights(model: DiTTransformer2DModel, dtype: torch.dtype) -> DiTTransformer2DModel:
    """Cast the weights to the saved dtype (quietly: diffusers warns about fp32-kept modules, of which DiT has none)."""
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        return model.to(dtype)
    finally:
        diffusers.utils.logging.set_verbosity(level)


def model_index(weights_dtype: str, training: dict[str, object]) -> dict[str, object]:
    """diffusers-style model_index.json plus quantserve's description of the model under `_quantserve`."""
    return {
        "_class_name": "DigitsPipeline",
        "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "_quantserve": {
            "task": "class-conditional generation of 8x8 handwritten digits, pixel space",
            "class_labels": {name: i for i, name in enumerate(DIGIT_NAMES)},
            "null_class": NULL_CLASS,
            "num_classes": NUM_CLASSES,
            "pixel_range": [-1.0, 1.0],
            "dataset": "sklearn.datasets.load_digits, pixels 0..%d scaled to [-1, 1]" % PIXEL_MAX,
            "split": {"function": "sklearn.model_selection.train_test_split", "test_size": HELDOUT_FRACTION,
                      "random_state": SPLIT_SEED, "stratify": "labels", "diffusion_trains_on": "train"},
            "weights_dtype": weights_dtype,
            "weights": "EMA",
            "training": training,
        },
    }


def save_model_dir(
    out: Path, transformer: DiTTransformer2DModel, scheduler: DDIMScheduler, index: dict[str, object]
) -> None:
    """Save transformer, scheduler and model_index.json as one diffusers model directory."""

    with atomic_directory(Path(out).resolve()) as tmp:
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    """Train and write the model directory."""
    args = parse_args(argv)
    ema, scheduler, summary = train_model(args)
    summary["command"] = "python -m quantserve.default_model.train " + " ".join(
        sys.argv[1:] if argv is None else list(argv)
    )
    transformer = cast_weights(ema, dtype_from_name(args.weights_dtype, WEIGHT_DTYPES))
    save_model_dir(args.out, transformer, scheduler, model_index(args.weights_dtype, summary))
    print(f"wrote {args.out} in {summary['wall_time_s']} s (final loss {summary['final_loss_smoothed']})")


if __name__ == "__main__":
    main()
