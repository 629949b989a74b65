"""Judging epochs: a held-out split with fixed noise, per-image losses, and which epoch to use.

Validation loss only compares epochs fairly when every evaluation sees the same noise and timesteps, so each
held-out image gets its own noise and a fixed set of timesteps, drawn once from ``validation_seed``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

def validation_timesteps(min_timestep: int | None, max_timestep: int | None, num_timesteps: int) -> list[int]:
    """sd-scripts' four: evenly inside the trained range (200, 400, 600, 800 by default), the same at every
    evaluation; a range narrowed by --min/--max_timestep is measured where it trains."""
    low = 0 if min_timestep is None else min_timestep
    high = num_timesteps if max_timestep is None else max_timestep
    return [low + (high - low) * i // 5 for i in range(1, 5)]


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, validation) of one subset, as sd-scripts splits it: Python's shuffle seeded with ``seed``, the
    last round(n × ``fraction``) held out — the same images for the same seed and the same (sorted) files. Unlike
    sd-scripts, the two never share an image, and one image at least trains."""
    if fraction <= 0 or len(items) < 2:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    count = min(len(items) - 1, round(len(items) * fraction))
    held = set(order[len(items) - count:])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def validation_generator(seed: int, index: int) -> torch.Generator:
    """The random draws (noise) of held-out image ``index``: the same at every evaluation."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


@dataclass(frozen=True)
class Recommendation:
    epoch: int
    reason: str


TIED_WITHIN = 0.01  # validation losses this close (relative) to the lowest are ties: a few images' noise


def knee(values: list[float]) -> int | None:
    """Index of the knee of a falling curve: the point farthest below the chord from first to last (Kneedle); None
    when there is none: fewer than 3 points, a curve that did not fall, or one that falls about evenly (no point
    clearly below the chord: a tenth of the fall)."""
    if len(values) < 3 or values[-1] >= values[0]:
        return None
    first, last = values[0], values[-1]
    span = len(values) - 1
    distances = [(first + (last - first) * i / span) - v for i, v in enumerate(values)]
    index = max(range(len(values)), key=lambda i: distances[i])
    return index if distances[index] > 0.1 * (first - last) else None


def recommended_from_recorded(recorded: dict) -> Recommendation | None:
    """``recommend_epoch`` over the epoch losses a file records (``epoch_training_loss`` and
    ``epoch_validation_loss`` by epoch, as the trainer writes them); None without any."""
    training, validation = recorded.get("epoch_training_loss") or {}, recorded.get("epoch_validation_loss") or {}
    epochs = sorted(int(key) for key in training if str(key).isdigit())
    if not epochs:
        return None
    return recommend_epoch([training[str(e)] for e in epochs], [validation.get(str(e)) for e in epochs], epochs)


def unkept_epoch(epoch: int) -> str:
    """Said where the recommended ``epoch`` has no file (the trainer's end, the grid)."""
    return (f"no file of epoch {epoch} was kept: to have it, save every epoch with --save_every_n_epochs 1, and "
            "--save_last_n_epochs left out or as large as the epochs")


def recommend_epoch(train_losses: list[float], validation_losses: list[float | None],
                    epochs: list[int] | None = None, no_validation: str = "no validation split") -> Recommendation | None:
    """The earliest epoch within ``TIED_WITHIN`` of the lowest validation loss when epochs were validated, else the
    knee of the training loss; ``epochs`` numbers the losses (1, 2, … unless given: a run continued from a later
    epoch); ``no_validation`` says why there is no validation loss."""
    if not train_losses:
        return None
    epochs = epochs or list(range(1, len(train_losses) + 1))
    measured = [(loss, i) for i, loss in enumerate(validation_losses) if loss is not None and math.isfinite(loss)]
    if measured:
        lowest, at = min(measured)
        loss, index = next((loss, i) for loss, i in sorted(measured, key=lambda m: m[1])
                           if loss <= lowest + TIED_WITHIN * abs(lowest))
        reason = f"lowest validation loss ({lowest:.4f}) of {len(measured)} evaluated epochs"
        if index != at:
            reason = (f"validation loss {loss:.4f}, within {TIED_WITHIN:.0%} of the lowest ({lowest:.4f}, epoch "
                      f"{epochs[at]}) of {len(measured)} evaluated epochs: the earlier file, less fitted to the images")
        return Recommendation(epochs[index], reason)
    finite = [(loss, i) for i, loss in enumerate(train_losses) if math.isfinite(loss)]
    if not finite:
        return None
    values = [loss for loss, _ in finite]
    at = knee(values)
    last = epochs[finite[-1][1]]
    if at is not None:
        return Recommendation(epochs[finite[at][1]], f"{no_validation}: the knee of the training loss, where more "
                              "epochs stop paying off; check the grid around it: training loss alone cannot show "
                              "overfitting")
    if len(values) < 3:
        why = (f"{len(values)} epochs are" if len(values) > 1 else "1 epoch is") + " too few to find where training stops paying off"
    elif values[-1] >= values[0]:
        why = "the training loss did not fall over the run (a learning rate too low, or too few steps?)"
    else:
        why = "the training loss was still falling about evenly: more epochs may still pay off"
    return Recommendation(last, f"{no_validation}; {why}: the last epoch; compare the epochs in the grid")


def outlier_images(per_image: dict[str, list[float]], count: int = 5) -> list[tuple[str, float]]:
    """Images whose mean training loss stands clearly above the rest, at most ``count``, highest first: often a bad
    crop, a wrong caption or an odd one out. Each loss was drawn at a random timestep, which moves it tenfold, so an
    image's mean is named only when it lies more than four standard errors (the spread of all draws over the root of
    its own count) above the mean of all draws — usually none: the highest of alike images is noise, not a finding."""
    draws = [value for values in per_image.values() for value in values]
    if len(per_image) < 5 or len(draws) < 2:
        return []
    mean = sum(draws) / len(draws)
    spread = (sum((value - mean) ** 2 for value in draws) / (len(draws) - 1)) ** 0.5
    means = {path: sum(v) / len(v) for path, v in per_image.items() if v}
    clear = [(path, loss) for path, loss in means.items()
             if loss > mean + 4 * spread / len(per_image[path]) ** 0.5]
    return sorted(clear, key=lambda item: -item[1])[:count]
