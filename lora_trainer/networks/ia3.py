"""(IA)³ (Liu et al. 2022): learned rescaling of a layer's output channels, or of its input channels.

W' = W ⊙ (1 + m·w), w broadcast along the output axis, or the input axis when ``on_input`` is 1.
"""

from __future__ import annotations

import torch

from .registry import Algorithm, Delta, Tensors, register


def delta(tensors: Tensors, weight: torch.Tensor, multiplier: float) -> Delta:
    w = tensors["weight"].flatten()
    on_input = "on_input" in tensors and bool(int(tensors["on_input"]))
    trailing = weight.dim() - 2
    shape = (1, -1, *(1,) * trailing) if on_input else (-1, 1, *(1,) * trailing)
    return Delta(weight * w.reshape(shape) * multiplier)


register(Algorithm("ia3", frozenset({"weight"}), frozenset({"weight", "on_input"}), delta, uses_weight=True))
