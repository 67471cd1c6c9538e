"""The judge: a small CNN trained on the held-out digits (unseen by the diffusion model), in seconds, on the CPU."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model import NUM_CLASSES, load_split

FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """Two conv layers and a 128-d feature layer; `features` feeds the Fréchet distance, `logits` the accuracy."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, FEATURE_DIM), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features of (n, 1, 8, 8) pixels in [-1, 1]."""
        return self.conv(pixels.float())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.dropout(self.features(pixels)))

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        """Predicted digit per image."""
        return self.eval()(pixels).argmax(dim=1)


def _random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift a batch by up to one pixel (background-padded) so the judge tolerates small offsets."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + 8, dx : dx + 8]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run on one CPU thread: tiny convs are faster so (several times over on a busy 2-core machine) and the
    judge's weights then do not depend on the caller's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_classifier(
    images: np.ndarray, labels: np.ndarray, epochs: int = 40, seed: int = 0, batch: int = 64
) -> DigitClassifier:
    """Train the judge deterministically (fixed seed, forked global RNG) on (n, 8, 8) images in [-1, 1]."""
    x = torch.from_numpy(images).float().unsqueeze(1)
    y = torch.from_numpy(labels).long()
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = DigitClassifier()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch):
                idx = order[start : start + batch]
                loss = F.cross_entropy(model(_random_shift(x[idx], gen)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def heldout_classifier() -> DigitClassifier:
    """The judge trained on the fixed held-out split, cached for the process."""
    split = load_split()
    return train_classifier(split.heldout_x, split.heldout_y)
