"""(IA)³ (Liu et al. 2022): learned rescaling of a layer's output channels, or of its input channels.

W' = W ⊙ (1 + m·w), w broadcast along the output axis, or the input axis when ``on_input`` is 1.
"""

from __future__ import annotations

import torch

from .registry import INITIALISERS, Algorithm, Delta, Tensors, register


def delta(tensors: Tensors, weight: torch.Tensor, multiplier: float) -> Delta:
    w = tensors["weight"].flatten()
    on_input = "on_input" in tensors and bool(int(tensors["on_input"]))
    trailing = weight.dim() - 2
    shape = (1, -1, *(1,) * trailing) if on_input else (-1, 1, *(1,) * trailing)
    return Delta(weight * w.reshape(shape) * multiplier)


def init(shape: torch.Size, rank: int, spec, bias_shape: torch.Size | None = None) -> dict[str, torch.Tensor]:
    """LyCORIS's: a zero scale per output channel (per input channel with ``train_on_input``), shaped [1, c, 1, 1]
    on a convolution; no rank."""
    channels = shape[1] if spec.ia3_on_input else shape[0]
    weight = torch.zeros(channels) if len(shape) == 2 else torch.zeros(1, channels, *(1,) * (len(shape) - 2))
    return {"weight": weight, "on_input": torch.tensor(int(spec.ia3_on_input))}


INITIALISERS["ia3"] = init
register(Algorithm("ia3", frozenset({"weight"}), frozenset({"weight", "on_input"}), delta, uses_weight=True))
