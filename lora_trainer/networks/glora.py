"""GLoRA (Chavan et al. 2023) as LyCORIS ≥ 3.1 writes it: ΔW = (α/r) · (W·A1·A2 + B1·B2).

W·A1·A2 acts on W's input-channel axis (a conv keeps its kernel); B1·B2 is a LoRA-shaped term. The
pre-3.1 layout (a1 [r, in], a2 [in, r], b1 [r, in], b2 [out, r]; ΔW = (α/r)·(W·A2·A1 + B2·B1)) is told
apart by shape and read too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .registry import INITIALISERS, Algorithm, Delta, Tensors, as_matrix, register, scale

SUFFIXES = frozenset({"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha", "scale"})


def _is_current_layout(a1: torch.Tensor, b1: torch.Tensor, weight: torch.Tensor) -> bool:
    return a1.shape[0] == weight.shape[1] and b1.shape[0] == weight.shape[0]


def delta(tensors: Tensors, weight: torch.Tensor, multiplier: float) -> Delta:
    a1, a2 = as_matrix(tensors["a1.weight"]), as_matrix(tensors["a2.weight"])
    b1, b2 = as_matrix(tensors["b1.weight"]), as_matrix(tensors["b2.weight"])
    if _is_current_layout(a1, b1, weight):
        rank, weight_side, lora_side = a2.shape[0], a1 @ a2, b1 @ b2
    else:
        rank, weight_side, lora_side = a1.shape[0], a2 @ a1, b2 @ b1
    # contract W's input channels with the [in, in] matrix, keeping any kernel axes
    through_w = torch.einsum("oi...,ij->oj...", weight, weight_side)
    raw = through_w + lora_side.reshape(weight.shape)
    return Delta(raw * (scale(tensors, rank) * multiplier))


def init(shape: torch.Size, rank: int, spec, bias_shape: torch.Size | None = None) -> dict[str, torch.Tensor]:
    """LyCORIS's current layout: a1 [in, r], b1 [out, r] Kaiming (a=√5), a2 [r, in], b2 [r, in(, k)] zero; on a
    convolution 1×1 kernels except b2's."""
    pointwise = (1,) * (len(shape) - 2)
    tensors = {"a1.weight": torch.empty(shape[1], rank, *pointwise), "a2.weight": torch.zeros(rank, shape[1], *pointwise),
               "b1.weight": torch.empty(shape[0], rank, *pointwise), "b2.weight": torch.zeros(rank, *shape[1:])}
    for key in ("a1.weight", "b1.weight") + (("a2.weight", "b2.weight") if spec.use_scalar else ()):
        nn.init.kaiming_uniform_(tensors[key], a=math.sqrt(5))  # with use_scalar the trained scalar starts at 0 instead
    return tensors


INITIALISERS["glora"] = init
register(Algorithm("glora", frozenset({"a1.weight"}), SUFFIXES, delta, uses_weight=True))
