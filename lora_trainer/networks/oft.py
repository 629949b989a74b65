"""Diag-OFT (Qiu et al. 2023, LyCORIS ``diag-oft``): an orthogonal rotation of a layer's output channels.

``oft_blocks`` [n, b, b] hold one generator per block of b output rows; Q = B − Bᵀ is skew-symmetric, the
Cayley transform R = (I + Q)(I − Q)⁻¹ is orthogonal, and W' = Rᵀ·W blockwise (then ⊙ ``rescale``). The stored
``alpha`` is the constraint: ‖Q‖_F is clamped to alpha · out_channels. The multiplier interpolates each
rotation towards I (as LyCORIS does), so a strength change recomputes the layer.
"""

from __future__ import annotations

import torch

from .lokr import factorization
from .registry import INITIALISERS, Algorithm, Delta, Tensors, optional, register


def cayley_rotations(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ for every block of ``blocks`` [..., b, b], with ‖Q‖ (over all blocks) ≤ constraint."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        q = q * torch.clamp(constraint / (torch.linalg.norm(q) + 1e-8), max=1.0)  # branch-free: works on meta too
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def towards_identity(rotations: torch.Tensor, multiplier: float) -> torch.Tensor:
    if multiplier == 1:
        return rotations
    eye = torch.eye(rotations.shape[-1], dtype=rotations.dtype, device=rotations.device)
    return multiplier * rotations + (1 - multiplier) * eye


def constraint_of(tensors: Tensors, out_channels: int) -> float:
    alpha = optional(tensors, "alpha")
    return 0.0 if alpha is None else float(alpha) * out_channels


def rescaled(tensors: Tensors, rotated: torch.Tensor) -> torch.Tensor:
    rescale = optional(tensors, "rescale")
    return rotated if rescale is None else rotated * rescale.reshape(-1, *(1,) * (rotated.dim() - 1))


def delta(tensors: Tensors, weight: torch.Tensor, multiplier: float) -> Delta:
    blocks = tensors["oft_blocks"]
    n, b = blocks.shape[0], blocks.shape[1]
    r = towards_identity(cayley_rotations(blocks, constraint_of(tensors, weight.shape[0])), multiplier)
    rotated = torch.einsum("knm,kn...->km...", r, weight.reshape(n, b, *weight.shape[1:])).reshape(weight.shape)
    return Delta(rescaled(tensors, rotated) - weight)


def init(shape: torch.Size, rank: int, spec, bias_shape: torch.Size | None = None) -> dict[str, torch.Tensor]:
    """LyCORIS's: zero generators (R = I) in blocks of about ``rank`` output rows, alpha = the constraint, and a
    ``rescale`` of ones with ``spec.rescaled``."""
    size, count = factorization(shape[0], rank)
    tensors = {"oft_blocks": torch.zeros(count, size, size), "alpha": torch.tensor(float(spec.constraint))}
    if spec.rescaled:
        tensors["rescale"] = torch.ones(shape[0], *(1,) * (len(shape) - 1))
    return tensors


INITIALISERS["diag-oft"] = init
register(Algorithm(
    "diag-oft", frozenset({"oft_blocks"}), frozenset({"oft_blocks", "rescale", "alpha"}), delta,
    linear_in_multiplier=False, uses_weight=True, accepts=lambda tensors: tensors["oft_blocks"].dim() == 3,
))
