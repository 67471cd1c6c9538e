"""How far a shadow's images are from the response's: mean absolute pixel difference on a 0..1 scale, PSNR and
SSIM (torchmetrics' maintained implementations, on pixels scaled to 0..1)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image


def decode_png(data: bytes) -> np.ndarray:
    """A PNG as a float array in [0, 1] (greyscale images stay 2-D)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image, dtype=np.float32) / 255.0


def pixel_difference(images_a: Sequence[bytes], images_b: Sequence[bytes]) -> float:
    """Mean |a - b| over every pixel of every image pair: 0 for identical images, 1 for black against white."""
    if len(images_a) != len(images_b) or not images_a:
        raise ValueError(f"pixel_difference: need two equal, non-empty lists of images, got {len(images_a)} and {len(images_b)}")
    diffs = []
    for a, b in zip(images_a, images_b):
        x, y = decode_png(a), decode_png(b)
        if x.shape != y.shape:
            raise ValueError(f"pixel_difference: image shapes differ: {x.shape} and {y.shape}")
        diffs.append(float(np.abs(x - y).mean()))
    return float(np.mean(diffs))


PSNR_CAP_DB = 100.0  # identical images: PSNR is infinite; reported as this, so means and histograms stay finite


@dataclass(frozen=True)
class Fidelity:
    """A response's images against the reference variant's for the same seed and prompt (means over the images)."""

    mae: float   # mean |a - b| on 0..1
    psnr: float  # dB, capped at PSNR_CAP_DB
    ssim: float  # structural similarity, 1 for identical images

    def to_dict(self) -> dict[str, float]:
        return {"mae": self.mae, "psnr": self.psnr, "ssim": self.ssim}


def _batch(images: Sequence[bytes]):
    """PNG bytes as one float NCHW batch in 0..1."""
    import torch

    arrays = [decode_png(png) for png in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"compare: a request's images differ in shape: {sorted(shapes)}")
    t = torch.from_numpy(np.stack(arrays))
    return t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)


def compare(images: Sequence[bytes], reference: Sequence[bytes]) -> Fidelity:
    """MAE, PSNR and SSIM of each image pair (PNG bytes), averaged over the pairs; a ValueError when the lists or
    shapes differ. One batched call per measure (run it with one torch thread: the convolutions are tiny)."""
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if len(images) != len(reference) or not images:
        raise ValueError(f"compare: need two equal, non-empty lists of images, got {len(images)} and {len(reference)}")
    x, y = _batch(images), _batch(reference)
    if x.shape != y.shape:
        raise ValueError(f"compare: image shapes differ: {tuple(x.shape[1:])} and {tuple(y.shape[1:])}")
    mae = float((x - y).abs().mean())
    psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = float(torch.nan_to_num(psnr, posinf=PSNR_CAP_DB).clamp(max=PSNR_CAP_DB).mean())
    side = min(x.shape[2], x.shape[3])
    kernel = max(3, min(11, side if side % 2 else side - 1))  # the Gaussian window must fit in the image
    ssim = float(structural_similarity_index_measure(x, y, data_range=1.0, kernel_size=kernel))
    return Fidelity(mae, psnr, ssim)
