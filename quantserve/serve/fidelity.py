"""How far a shadow's images are from the response's: mean absolute pixel difference on a 0..1 scale."""

from __future__ import annotations

import io
from collections.abc import Sequence

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
