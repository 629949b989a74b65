"""Judging epochs: a held-out split with fixed noise, per-image losses, and which epoch to use.

Validation loss only compares epochs fairly when every evaluation sees the same noise and timesteps, so each
held-out image gets its own noise and a fixed set of timesteps, drawn once from ``validation_seed``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

VALIDATION_TIMESTEPS = (100, 350, 600, 850)  # spread over the schedule; the same for every evaluation


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, validation): a seeded shuffle, then ``fraction`` of the images (at least one) held out."""
    if fraction <= 0 or len(items) < 2:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    count = min(len(items) - 1, max(1, round(len(items) * fraction)))
    held = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def fixed_noise(shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """Noise for held-out image ``index``: the same tensor at every evaluation."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


@dataclass(frozen=True)
class Recommendation:
    epoch: int
    reason: str


def knee(values: list[float]) -> int:
    """Index of the knee of a falling curve: the point farthest below the chord from first to last (Kneedle)."""
    if len(values) < 3:
        return len(values) - 1
    first, last = values[0], values[-1]
    span = len(values) - 1
    distances = [(first + (last - first) * i / span) - v for i, v in enumerate(values)]
    return max(range(len(values)), key=lambda i: distances[i])


def recommend_epoch(train_losses: list[float], validation_losses: list[float | None],
                    epochs: list[int] | None = None) -> Recommendation | None:
    """Lowest validation loss when there is a held-out split, else the knee of the training loss; ``epochs`` numbers
    the losses (1, 2, … unless given: a run continued from a later epoch)."""
    if not train_losses:
        return None
    epochs = epochs or list(range(1, len(train_losses) + 1))
    measured = [(loss, i) for i, loss in enumerate(validation_losses) if loss is not None]
    if measured:
        loss, index = min(measured)
        return Recommendation(epochs[index], f"lowest validation loss ({loss:.4f}) of {len(measured)} evaluated epochs")
    return Recommendation(epochs[knee(train_losses)], "no validation split: the knee of the training loss, where more "
                          "epochs stop paying off (check the grid around it; training loss alone cannot show overfitting)")


def outlier_images(per_image: dict[str, list[float]], count: int = 5) -> list[tuple[str, float]]:
    """Images whose mean training loss is highest: often a bad crop, a wrong caption or an odd one out."""
    means = {path: sum(v) / len(v) for path, v in per_image.items() if v}
    return sorted(means.items(), key=lambda item: -item[1])[:count]
