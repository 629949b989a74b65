"""BOFT (Liu et al. 2023, LyCORIS ``boft``): orthogonal fine-tuning through butterfly-factored rotations.

``oft_blocks`` [M, n, b, b]: M stages, each a block-diagonal rotation (Cayley, as Diag-OFT) applied from the
left to W's output rows after a butterfly permutation that pairs rows 2^i·b/2 apart; the stages compose as
W' = B_{M−1}(…B_0(W)), then ⊙ ``rescale``. The multiplier interpolates every stage towards I.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .oft import cayley_rotations, constraint_of, rescaled, towards_identity
from .registry import INITIALISERS, Algorithm, Delta, Tensors, register


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


def butterfly_blocks(rows: int, factor: int) -> tuple[int, int] | None:
    """(block size b, block count n) with b·n = rows, n a power of two and b the largest even size ≤ ``factor`` that
    allows it, as LyCORIS splits a layer; None when no even b ≤ factor does."""
    found = None
    for size in range(2, factor + 1, 2):
        count = rows // size
        if rows % size == 0 and count & (count - 1) == 0:
            found = (size, count)
    return found


def init(shape: torch.Size, rank: int, spec, bias_shape: torch.Size | None = None) -> dict[str, torch.Tensor]:
    """LyCORIS's: zero generators (every stage R = I) for log2(n) + 1 stages of n blocks, alpha = the constraint, and
    a ``rescale`` of ones with ``spec.rescaled``."""
    split = butterfly_blocks(shape[0], rank)
    if split is None:
        least = next((size for size in range(2, shape[0] + 1, 2) if butterfly_blocks(shape[0], size)), None)
        hint = f"a dim of at least {least}" if least else "another algorithm (no even block size splits it)"
        raise UserError(f"algo=boft: {shape[0]} output channels cannot be split into a power of two of even blocks of at "
                        f"most network_dim/conv_dim = {rank} (LyCORIS stops there too); use {hint}")
    size, count = split
    tensors = {"oft_blocks": torch.zeros(count.bit_length(), count, size, size), "alpha": torch.tensor(float(spec.constraint))}
    if spec.rescaled:
        tensors["rescale"] = torch.ones(shape[0], *(1,) * (len(shape) - 1))
    return tensors


INITIALISERS["boft"] = init
register(Algorithm(
    "boft", frozenset({"oft_blocks"}), frozenset({"oft_blocks", "rescale", "alpha"}), delta,
    linear_in_multiplier=False, uses_weight=True, accepts=lambda tensors: tensors["oft_blocks"].dim() == 4,
))
