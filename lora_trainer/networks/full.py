"""Full fine-tuning stored as a difference: ΔW = m·diff, Δb = m·diff_b (LyCORIS ``algo=full``)."""

from __future__ import annotations

import torch

from .registry import INITIALISERS, Algorithm, Delta, Tensors, optional, register


def delta(tensors: Tensors, weight: torch.Tensor, multiplier: float) -> Delta:
    bias = optional(tensors, "diff_b")
    return Delta(tensors["diff"].reshape(weight.shape) * multiplier, None if bias is None else bias * multiplier)


def init(shape: torch.Size, rank: int, spec, bias_shape: torch.Size | None = None) -> dict[str, torch.Tensor]:
    """LyCORIS's native fine-tuning: the weight's (and bias's) difference itself is trained, from zero; no rank."""
    tensors = {"diff": torch.zeros(shape)}
    if bias_shape is not None:
        tensors["diff_b"] = torch.zeros(bias_shape)
    return tensors


INITIALISERS["full"] = init
register(Algorithm("full", frozenset({"diff"}), frozenset({"diff", "diff_b"}), delta))
