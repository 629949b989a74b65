"""LoHa (Hyeon-Woo et al., FedPara): the Hadamard product of two low-rank products.

ΔW = (α/r) · (w1a @ w1b) ⊙ (w2a @ w2b); with Tucker cores ``hada_t1/t2`` on k×k convs each factor is
rebuilt from its core (and ``w*_a`` is then stored [r, out], transposed with respect to plain mode).
"""

from __future__ import annotations

import torch

from .registry import INITIALISERS, Algorithm, Delta, Tensors, as_matrix, has_kernel, optional, register, scale, tucker

SUFFIXES = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "scale"})


def _factor(tensors: Tensors, index: int, shape: torch.Size) -> torch.Tensor:
    a, b, core = tensors[f"hada_w{index}_a"], tensors[f"hada_w{index}_b"], optional(tensors, f"hada_t{index}")
    if core is not None:
        return tucker(core, a, b)
    return (as_matrix(a) @ as_matrix(b)).reshape(shape)


def delta(tensors: Tensors, weight: torch.Tensor, multiplier: float) -> Delta:
    raw = _factor(tensors, 1, weight.shape) * _factor(tensors, 2, weight.shape)
    return Delta(raw * (scale(tensors, tensors["hada_w1_b"].shape[0]) * multiplier))


def init(shape: torch.Size, rank: int, spec, bias_shape: torch.Size | None = None) -> dict[str, torch.Tensor]:
    """LyCORIS's init: w1 random, w2_a zero, so the product is zero at step 0 but every factor gets a gradient;
    with ``spec.tucker`` a k×k convolution gets cores (std 0.1) and factors stored [r, out], [r, in]."""
    if spec.tucker and has_kernel(shape):
        kernel = tuple(shape[2:])
        tensors = {
            "hada_t1": torch.randn(rank, rank, *kernel) * 0.1,
            "hada_w1_a": torch.randn(rank, shape[0]) * 0.1,
            "hada_w1_b": torch.randn(rank, shape[1]),
            "hada_t2": torch.randn(rank, rank, *kernel) * 0.1,
            "hada_w2_a": torch.zeros(rank, shape[0]),
            "hada_w2_b": torch.randn(rank, shape[1]),
        }
    else:
        fan_in = int(torch.Size(shape[1:]).numel())
        tensors = {
            "hada_w1_a": torch.randn(shape[0], rank) * 0.1,
            "hada_w1_b": torch.randn(rank, fan_in),
            "hada_w2_a": torch.zeros(shape[0], rank),
            "hada_w2_b": torch.randn(rank, fan_in),
        }
    if spec.use_scalar:  # the trained scalar starts at 0 instead (LyCORIS)
        tensors["hada_w2_a"].normal_(std=0.1)
    return tensors


INITIALISERS["loha"] = init
register(Algorithm("loha", frozenset({"hada_w1_a"}), SUFFIXES, delta))
