"""Judge generated digits: class accuracy and Fréchet distance under a held-out classifier, pixel drift, grids.

Run: python -m quantserve.default_model.evaluate [--schemes bf16,nf4] [--n 50] [--out DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .classifier import DigitClassifier, heldout_classifier
from .model import NUM_CLASSES, load_split
from .eval_cli import add_eval_arguments
from .pipeline import DigitsPipeline

BASELINE = "bf16"
UNQUANTIZED = {"bf16": torch.bfloat16, "fp32": torch.float32}
Images = torch.Tensor | np.ndarray | Sequence[Image.Image]


def eval_labels(n_per_digit: int) -> list[int]:
    """Labels of an evaluation set: n_per_digit of each digit, digit-major (0,0,..,1,1,..)."""
    if n_per_digit < 1:
        raise ValueError(f"n_per_digit must be >= 1, got {n_per_digit}")
    return [d for d in range(NUM_CLASSES) for _ in range(n_per_digit)]


def generate(
    pipeline: DigitsPipeline,
    labels: Sequence[int],
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 1.0,
    chunk: int = 50,
    desc: str = "generate",
) -> torch.Tensor:
    """Generate pixels (n, 1, 8, 8) for labels in chunks; image i always uses seed + i, whatever the chunking."""
    out = []
    with tqdm(total=len(labels), desc=desc, unit="img", leave=False, file=sys.stderr) as bar:
        for start in range(0, len(labels), chunk):
            part = list(labels[start : start + chunk])
            result = pipeline(part, seed=seed + start, num_inference_steps=steps, guidance_scale=guidance_scale)
            out.append(result.pixels)
            bar.update(len(part))
    return torch.cat(out)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (n, d) feature sets (FID's formula)."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)  # same spectrum as cov_a @ cov_b, symmetric
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def _features(classifier: DigitClassifier, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Classifier features of (n, 1, 8, 8) or (n, 8, 8) pixels in [-1, 1]."""
    x = torch.as_tensor(pixels, dtype=torch.float32)
    x = x.unsqueeze(1) if x.dim() == 3 else x
    with torch.no_grad():
        return classifier.eval().features(x).numpy().astype(np.float64)


def score(pixels: torch.Tensor, labels: Sequence[int], classifier: DigitClassifier | None = None) -> dict[str, Any]:
    """Accuracy (overall and per digit) and Fréchet distance to the real held-out digits for generated pixels."""
    classifier = classifier or heldout_classifier()
    y = torch.as_tensor(list(labels))
    hits = (classifier.predict(pixels.float()) == y).float()
    per_digit = {str(d): round(hits[y == d].mean().item(), 4) for d in range(NUM_CLASSES) if (y == d).any()}
    fid = frechet_distance(_features(classifier, pixels), _features(classifier, load_split().heldout_x))
    return {"accuracy": round(hits.mean().item(), 4), "fid": round(fid, 3), "per_digit_accuracy": per_digit,
            "n": len(y)}


def real_reference(classifier: DigitClassifier | None = None) -> dict[str, Any]:
    """The same figures for real digits the judge never saw (the diffusion training split): the floor to read by."""
    split = load_split()
    figures = score(torch.from_numpy(split.train_x).unsqueeze(1), split.train_y.tolist(), classifier)
    figures.pop("per_digit_accuracy")
    return figures


def evaluate(
    pipeline: DigitsPipeline, n_per_digit: int = 50, seed: int = 0, steps: int = 25, guidance_scale: float = 1.0
) -> dict[str, Any]:
    """Generate n_per_digit of each digit and score them (accuracy, FID, per-digit accuracy, seconds)."""
    labels = eval_labels(n_per_digit)
    start = time.perf_counter()
    pixels = generate(pipeline, labels, seed, steps, guidance_scale)
    figures = score(pixels, labels)
    figures["seconds"] = round(time.perf_counter() - start, 2)
    return figures


def _as_pixels(images: Images) -> np.ndarray:
    """Pixels in [-1, 1] from a tensor/array in [-1, 1] or from 8-bit greyscale PIL images."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return torch.as_tensor(images).float().numpy()
    return np.stack([np.asarray(im.convert("L"), dtype=np.float32) / 127.5 - 1.0 for im in images])


def pixel_difference(images_a: Images, images_b: Images) -> float:
    """Mean absolute pixel difference, in [-1, 1] units (0 = identical, 2 = inverted), of two same-seed image sets."""
    a, b = _as_pixels(images_a), _as_pixels(images_b)
    if a.shape != b.shape:
        raise ValueError(f"images_a and images_b must have the same shape, got {a.shape} and {b.shape}")
    return float(np.abs(a - b).mean())


def save_grid(pixels: torch.Tensor, path: str | Path, rows: int = NUM_CLASSES, scale: int = 4, pad: int = 2) -> Path:
    """Write a PNG grid of (rows*cols, 1, h, w) pixels, row-major (row r = digit r for digit-major eval sets).

    Each cell is upscaled nearest by `scale`; cells are separated by `pad` grey pixels, so the PNG is
    (cols*w*scale + (cols+1)*pad) wide and (rows*h*scale + (rows+1)*pad) high.
    """
    n, _, h, w = pixels.shape
    if rows < 1 or n % rows:
        raise ValueError(f"rows must divide the {n} images, got rows={rows}")
    cols = n // rows
    cell_h, cell_w = h * scale, w * scale
    canvas = np.full((rows * cell_h + (rows + 1) * pad, cols * cell_w + (cols + 1) * pad), 128, dtype=np.uint8)
    grey = ((pixels.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).numpy()[:, 0]
    for i, img in enumerate(grey):
        r, c = divmod(i, cols)
        y, x = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
        canvas[y : y + cell_h, x : x + cell_w] = np.kron(img, np.ones((scale, scale), dtype=np.uint8))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas, mode="L").save(path)
    return path


def grid_subset(pixels: torch.Tensor, cols: int) -> torch.Tensor:
    """The first `cols` samples of each digit of a digit-major eval set, so grids stay viewable for large n."""
    per_digit = pixels.reshape(NUM_CLASSES, -1, *pixels.shape[1:])
    return per_digit[:, :cols].reshape(-1, *pixels.shape[1:])


def grid_name(scheme: str) -> str:
    """File name of a scheme's grid, safe for any scheme spelling (e.g. 'torchao:int8' -> digits_torchao_int8.png)."""
    return "digits_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", scheme) + ".png"


def load_scheme(scheme: str) -> DigitsPipeline:
    """Pipeline for a scheme: bf16/fp32 load unquantized; any other name goes to the quantized loader."""
    from . import load_default_pipeline

    if scheme in UNQUANTIZED:
        return load_default_pipeline(dtype=UNQUANTIZED[scheme])
    return load_default_pipeline(quantization_config=scheme)


def parse_schemes(text: str) -> list[str]:
    """Split --schemes; bf16 goes first (added if missing) as the baseline for the pixel difference."""
    schemes = [s.strip() for s in text.split(",") if s.strip()]
    if not schemes:
        raise ValueError(f"--schemes is empty: give a comma-separated list such as {BASELINE},nf4")
    return [BASELINE] + [s for s in dict.fromkeys(schemes) if s != BASELINE]


def run_scheme(scheme: str, args: argparse.Namespace, labels: list[int]) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Load, generate and score one scheme; a failure becomes {'error': ...} instead of a traceback."""
    try:
        pipeline = load_scheme(scheme)
        start = time.perf_counter()
        pixels = generate(pipeline, labels, args.seed, args.steps, args.guidance, desc=scheme)
        seconds = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - reported per scheme; the exit code says it failed
        return {"error": f"{type(exc).__name__}: {exc}"}, None
    figures = score(pixels, labels)
    figures["seconds"] = round(seconds, 2)
    if args.out is not None:
        figures["grid"] = str(save_grid(grid_subset(pixels, args.grid_cols), Path(args.out) / grid_name(scheme)))
    return figures, pixels


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Plain-text table: scheme, accuracy, FID, mean pixel difference to bf16, generation seconds."""
    width = max(12, *(len(name) for name in results))
    lines = [f"{'scheme':<{width}} {'accuracy':>8} {'FID':>8} {'pixdiff':>8} {'seconds':>8}"]
    for name, fig in results.items():
        if "error" in fig:
            lines.append(f"{name:<{width}} error: {fig['error']}")
            continue
        diff = fig.get("pixel_diff_to_bf16")
        diff_text = "-" if diff is None else f"{diff:.4f}"
        secs = fig.get("seconds")
        lines.append(f"{name:<{width}} {fig['accuracy']:>8.4f} {fig['fid']:>8.3f} {diff_text:>8} "
                     f"{'-' if secs is None else f'{secs:.1f}':>8}")
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate each scheme, print a table (or JSON); 0 when every scheme ran, 1 otherwise."""
    try:
        schemes = parse_schemes(args.schemes)
        labels = eval_labels(args.n)
        if args.grid_cols < 1:
            raise ValueError(f"--grid-cols must be >= 1, got {args.grid_cols}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, Any]] = {}
    baseline: torch.Tensor | None = None
    for scheme in schemes:
        figures, pixels = run_scheme(scheme, args, labels)
        if scheme == BASELINE:
            baseline = pixels
        elif pixels is not None and baseline is not None:
            figures["pixel_diff_to_bf16"] = round(pixel_difference(pixels, baseline), 5)
        results[scheme] = figures
    results["real (train split)"] = real_reference()
    settings = {"n_per_digit": args.n, "seed": args.seed, "steps": args.steps, "guidance_scale": args.guidance}
    if args.json:
        print(json.dumps({"settings": settings, "results": results}, indent=2))
    else:
        print(format_table(results))
    return 1 if any("error" in fig for fig in results.values()) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of `python -m quantserve.default_model.evaluate`."""
    parser = argparse.ArgumentParser(prog="python -m quantserve.default_model.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(parser)
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
