"""BOFT (Liu et al. 2023, LyCORIS ``boft``): orthogonal fine-tuning through butterfly-factored rotations.

``oft_blocks`` [M, n, b, b]: M stages, each a block-diagonal rotation (Cayley, as Diag-OFT) applied from the
left to W's output rows after a butterfly permutation that pairs rows 2^i·b/2 apart; the stages compose as
W' = B_{M−1}(…B_0(W)), then ⊙ ``rescale``. The multiplier interpolates every stage towards I.
"""

from __future__ import annotations

import torch

from .oft import cayley_rotations, constraint_of, rescaled, towards_identity
from .registry import Algorithm, Delta, Tensors, register


def _butterfly_stage(rows: torch.Tensor, rotation: torch.Tensor, stage: int) -> torch.Tensor:
    """One stage on ``rows`` [out, rest]: permute (c g k) → (c k g), rotate blocks of b rows, permute back."""
    block = rotation.shape[-1]
    k = 2**stage * block // 2
    permuted = rows.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2)
    turned = torch.einsum("bij,bj...->bi...", rotation, permuted.unflatten(0, (-1, block))).flatten(0, 1)
    return turned.unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)


def delta(tensors: Tensors, weight: torch.Tensor, multiplier: float) -> Delta:
    stages = towards_identity(cayley_rotations(tensors["oft_blocks"], constraint_of(tensors, weight.shape[0])), multiplier)
    rows = weight.reshape(weight.shape[0], -1)
    for index, rotation in enumerate(stages):
        rows = _butterfly_stage(rows, rotation, index)
    return Delta(rescaled(tensors, rows.reshape(weight.shape)) - weight)


register(Algorithm(
    "boft", frozenset({"oft_blocks"}), frozenset({"oft_blocks", "rescale", "alpha"}), delta,
    linear_in_multiplier=False, uses_weight=True, accepts=lambda tensors: tensors["oft_blocks"].dim() == 4,
))
