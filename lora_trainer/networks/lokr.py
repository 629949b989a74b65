"""LoKr (LyCORIS): the Kronecker product of a small factor W1 [a, c] and a larger W2 [b, d(, kh, kw)].

Either factor may be stored full (``lokr_w1``, ``lokr_w2``) or as a low-rank product (``_a @ _b``), W2 also
as a Tucker core ``lokr_t2`` on k×k convs. The scale is α/r with r the rank of the decomposed factor (W2's
first); with both factors full there is no rank and the scale is 1 (LyCORIS stores alpha = dim then).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .registry import INITIALISERS, Algorithm, Delta, Tensors, as_matrix, has_kernel, register, scale, tucker

SUFFIXES = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "scale"})


def _rank(tensors: Tensors) -> int | None:
    for key in ("lokr_w2_b", "lokr_w1_b"):
        if key in tensors:
            return tensors[key].shape[0]
    return None


def kronecker_weight(tensors: Tensors, shape: torch.Size) -> torch.Tensor:
    """kron(W1, W2) shaped like the layer's weight, without scale."""
    w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    a, c = w1.shape
    b, d = shape[0] // a, shape[1] // c
    kernel = tuple(shape[2:])
    if "lokr_w2" in tensors:
        w2 = tensors["lokr_w2"]
    elif "lokr_t2" in tensors:
        w2 = tucker(tensors["lokr_t2"], tensors["lokr_w2_a"], tensors["lokr_w2_b"])
    else:
        w2 = as_matrix(tensors["lokr_w2_a"]) @ as_matrix(tensors["lokr_w2_b"])
    w2 = w2.reshape(b, d, *kernel)
    w1 = w1.reshape(a, c, *(1 for _ in kernel))
    # kron needs contiguous inputs: a Tucker-rebuilt W2 is a non-contiguous einsum result
    return torch.kron(w1.contiguous(), w2.contiguous()).reshape(shape)


def delta(tensors: Tensors, weight: torch.Tensor, multiplier: float) -> Delta:
    return Delta(kronecker_weight(tensors, weight.shape) * (scale(tensors, _rank(tensors)) * multiplier))


def factorization(n: int, factor: int = -1) -> tuple[int, int]:
    """(small, large) with small·large = n: ``factor`` itself when it divides n, else the most square pair with
    small ≤ factor (no cap for -1), as LyCORIS splits a layer's sides between W1 and W2."""
    if factor > 0 and n % factor == 0:
        return min(factor, n // factor), max(factor, n // factor)
    cap = n if factor < 0 else factor
    pairs = [(m, n // m) for m in range(1, math.isqrt(n) + 1) if n % m == 0 and m <= cap]
    return min(pairs, key=sum)


def init(shape: torch.Size, rank: int, spec, bias_shape: torch.Size | None = None) -> dict[str, torch.Tensor]:
    """W1 [a, c] full and random; W2 [b, d(, k)] zero when full, else w2_a random and w2_b zero (LyCORIS's choice);
    with ``spec.tucker`` a decomposed W2 of a k×k convolution is a core [r, r, k] between w2_a [r, b] and w2_b [r, d]."""
    (a, b), (c, d) = factorization(shape[0], spec.factor), factorization(shape[1], spec.factor)
    if spec.unbalanced_factorization:  # LyCORIS: the output side's larger part in W1
        a, b = b, a
    kernel = tuple(shape[2:])
    tensors = {}
    if spec.decompose_both and rank < max(a, c) / 2 and not spec.full_matrix:
        tensors["lokr_w1_a"], tensors["lokr_w1_b"] = torch.empty(a, rank), torch.empty(rank, c)
        nn.init.kaiming_uniform_(tensors["lokr_w1_a"], a=math.sqrt(5))
        nn.init.kaiming_uniform_(tensors["lokr_w1_b"], a=math.sqrt(5))
    else:
        tensors["lokr_w1"] = torch.empty(a, c)
        nn.init.kaiming_uniform_(tensors["lokr_w1"], a=math.sqrt(5))
    if not spec.full_matrix and rank < max(b, d) / 2 and spec.tucker and has_kernel(shape):
        tensors["lokr_t2"], tensors["lokr_w2_a"] = torch.empty(rank, rank, *kernel), torch.empty(rank, b)
        nn.init.kaiming_uniform_(tensors["lokr_t2"], a=math.sqrt(5))
        nn.init.kaiming_uniform_(tensors["lokr_w2_a"], a=math.sqrt(5))
        tensors["lokr_w2_b"] = torch.zeros(rank, d)
    elif not spec.full_matrix and rank < max(b, d) / 2:
        tensors["lokr_w2_a"] = torch.empty(b, rank)
        nn.init.kaiming_uniform_(tensors["lokr_w2_a"], a=math.sqrt(5))
        tensors["lokr_w2_b"] = torch.zeros(rank, d * math.prod(kernel))
    else:
        tensors["lokr_w2"] = torch.zeros(b, d, *kernel)
    if spec.use_scalar:  # the trained scalar starts at 0 instead (LyCORIS)
        nn.init.kaiming_uniform_(tensors["lokr_w2" if "lokr_w2" in tensors else "lokr_w2_b"], a=math.sqrt(5))
    return tensors


INITIALISERS["lokr"] = init
register(Algorithm("lokr", frozenset({"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"}), SUFFIXES, delta))
