"""Trained norm layers (LyCORIS ``train_norm``): γ += m·w_norm, β += m·b_norm."""

from __future__ import annotations

import torch

from .registry import Algorithm, Delta, Tensors, optional, register


def delta(tensors: Tensors, weight: torch.Tensor, multiplier: float) -> Delta:
    w, b = optional(tensors, "w_norm"), optional(tensors, "b_norm")
    return Delta(None if w is None else w.reshape(weight.shape) * multiplier, None if b is None else b * multiplier)


register(Algorithm("norm", frozenset({"w_norm", "b_norm"}), frozenset({"w_norm", "b_norm"}), delta))
