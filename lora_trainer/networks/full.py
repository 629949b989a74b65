"""Full fine-tuning stored as a difference: ΔW = m·diff, Δb = m·diff_b."""

from __future__ import annotations

import torch

from .registry import Algorithm, Delta, Tensors, register


def delta(tensors: Tensors, weight: torch.Tensor, multiplier: float) -> Delta:
    bias = tensors.get("diff_b")
    return Delta(tensors["diff"].reshape(weight.shape) * multiplier, None if bias is None else bias * multiplier)


register(Algorithm("full", frozenset({"diff"}), frozenset({"diff", "diff_b"}), delta))
