"""LoRA / LoCon (Hu et al. 2021; Kohya's LoCon for convs), also the file format of DyLoRA.

ΔW = (α/r) · up @ down, with ``lora_mid`` (a CP/Tucker core) between them on k×k convs:
ΔW[o, i] = (α/r) · Σ up[o, a] · mid[a, b] · down[b, i].
"""

from __future__ import annotations

import torch

from .registry import Algorithm, Delta, Tensors, as_matrix, register, scale

UP, DOWN, MID = "lora_up.weight", "lora_down.weight", "lora_mid.weight"


def lora_weight(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """up @ down (through ``mid`` when present), without scale, shaped like the layer's weight."""
    if mid is not None:
        return torch.einsum("oa,abhw,bi->oihw", as_matrix(up), mid, as_matrix(down)).reshape(shape)
    return (as_matrix(up) @ as_matrix(down)).reshape(shape)


def delta(tensors: Tensors, weight: torch.Tensor, multiplier: float) -> Delta:
    down = tensors[DOWN]
    raw = lora_weight(tensors[UP], down, tensors.get(MID), weight.shape)
    return Delta(raw * (scale(tensors, down.shape[0]) * multiplier))


register(Algorithm("lora", frozenset({UP}), frozenset({UP, DOWN, MID, "alpha", "scale"}), delta))
