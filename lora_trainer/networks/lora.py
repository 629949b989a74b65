"""LoRA / LoCon (Hu et al. 2021; Kohya's LoCon for convs), also the file format of DyLoRA.

ΔW = (α/r) · up @ down, with ``lora_mid`` (a CP/Tucker core) between them on k×k convs:
ΔW[o, i] = (α/r) · Σ up[o, a] · mid[a, b] · down[b, i].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .registry import INITIALISERS, Algorithm, Delta, Tensors, as_matrix, has_kernel, optional, register, scale

UP, DOWN, MID = "lora_up.weight", "lora_down.weight", "lora_mid.weight"


def lora_weight(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """up @ down (through ``mid`` when present), without scale, shaped like the layer's weight."""
    if mid is not None:
        return torch.einsum("oa,abhw,bi->oihw", as_matrix(up), mid, as_matrix(down)).reshape(shape)
    return (as_matrix(up) @ as_matrix(down)).reshape(shape)


def delta(tensors: Tensors, weight: torch.Tensor, multiplier: float) -> Delta:
    down = tensors[DOWN]
    raw = lora_weight(tensors[UP], down, optional(tensors, MID), weight.shape)
    # in place: raw is this call's own product (autograd keeps the factors, not it), one ΔW-sized copy fewer, and on
    # the meta device (a file's fit check) an out-of-place product goes through torch._refs, which imports dynamo
    return Delta(raw.mul_(scale(tensors, down.shape[0]) * multiplier))


def init(shape: torch.Size, rank: int, spec, bias_shape: torch.Size | None = None) -> dict[str, torch.Tensor]:
    """sd-scripts' init: down as nn.Linear's default (Kaiming uniform, a=√5), up zero; convs keep their kernel in
    down, or with ``spec.tucker`` in a core between 1×1 factors (LyCORIS), initialised as down."""
    kernel = tuple(shape[2:])
    tensors = {}
    if spec.tucker and has_kernel(shape):
        tensors[MID] = torch.empty(rank, rank, *kernel)
        nn.init.kaiming_uniform_(tensors[MID], a=math.sqrt(5))
        kernel = (1,) * len(kernel)
    tensors[DOWN] = torch.empty(rank, shape[1], *kernel)
    nn.init.kaiming_uniform_(tensors[DOWN], a=math.sqrt(5))
    tensors[UP] = torch.zeros(shape[0], rank, *(1,) * (len(shape) - 2))
    if spec.use_scalar:  # the trained scalar starts at 0 instead (LyCORIS)
        nn.init.kaiming_uniform_(tensors[UP], a=math.sqrt(5))
    return tensors


INITIALISERS["lora"] = INITIALISERS["dylora"] = init
register(Algorithm("lora", frozenset({UP}), frozenset({UP, DOWN, MID, "alpha", "scale"}), delta))
