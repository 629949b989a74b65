"""LoHa (Hyeon-Woo et al., FedPara): the Hadamard product of two low-rank products.

ΔW = (α/r) · (w1a @ w1b) ⊙ (w2a @ w2b); with Tucker cores ``hada_t1/t2`` on k×k convs each factor is
rebuilt from its core (and ``w*_a`` is then stored [r, out], transposed with respect to plain mode).
"""

from __future__ import annotations

import torch

from .registry import Algorithm, Delta, Tensors, as_matrix, register, scale, tucker

SUFFIXES = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "scale"})


def _factor(tensors: Tensors, index: int, shape: torch.Size) -> torch.Tensor:
    a, b, core = tensors[f"hada_w{index}_a"], tensors[f"hada_w{index}_b"], tensors.get(f"hada_t{index}")
    if core is not None:
        return tucker(core, a, b)
    return (as_matrix(a) @ as_matrix(b)).reshape(shape)


def delta(tensors: Tensors, weight: torch.Tensor, multiplier: float) -> Delta:
    raw = _factor(tensors, 1, weight.shape) * _factor(tensors, 2, weight.shape)
    return Delta(raw * (scale(tensors, tensors["hada_w1_b"].shape[0]) * multiplier))


register(Algorithm("loha", frozenset({"hada_w1_a"}), SUFFIXES, delta))
