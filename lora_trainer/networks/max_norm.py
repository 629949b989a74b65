"""Max-norm regularisation of each module's ΔW (sd-scripts' ``--scale_weight_norms``; Srivastava et al. 2014).

After an optimizer step, a module whose ΔW (at multiplier 1, alpha scale included) has a Frobenius norm above
the limit is shrunk back onto it. ΔW of LoRA, LoHa and LoKr is a product of its factor tensors, homogeneous of
degree k in them (LoRA: up·down → 2, with a CP core 3; LoHa: (w1a·w1b)⊙(w2a·w2b) → 4), so scaling every factor
by ratio^(1/k) scales ΔW by exactly ratio. sd-scripts does the same for LoRA (√ratio on up and down).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..errors import UserError
from .registry import module_delta

_NOT_FACTORS = ("alpha", "scale", "dora_scale")
SUPPORTED = ("lora", "dylora", "loha", "lokr")


@dataclass(frozen=True)
class MaxNormReport:
    keys_scaled: int
    average_norm: float
    max_norm: float  # the largest ΔW norm after scaling


def factor_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in tensors.items() if name not in _NOT_FACTORS and t.is_floating_point()]


def shrink_ratio(norm: float, limit: float) -> float:
    """1 when the norm is within the limit, else the factor that brings it onto the limit."""
    return 1.0 if norm <= limit else limit / norm


def check_supported(algorithm: str, dora: bool) -> None:
    if dora or algorithm not in SUPPORTED:
        name = "DoRA" if dora else algorithm
        raise UserError(f"--scale_weight_norms works with LoRA, LoCon, DyLoRA, LoHa and LoKr, not with {name}: "
                        "drop --scale_weight_norms or the algorithm")


@torch.no_grad()
def apply_max_norm(modules: Iterable, limit: float) -> MaxNormReport:
    """Shrink every module (``NetworkModule``) whose ΔW norm exceeds ``limit``; report as sd-scripts logs it."""
    scaled, norms = 0, []
    for module in modules:
        tensors = module.file_tensors()
        names = factor_names(tensors)
        norm = float(module_delta(tensors, module._base_weight[0].detach(), 1.0).weight.float().norm())
        ratio = shrink_ratio(norm, limit)
        if ratio < 1.0:
            scaled += 1
            per_factor = ratio ** (1.0 / len(names))
            for name in names:
                tensors[name].mul_(per_factor)
        norms.append(norm * ratio)
    return MaxNormReport(scaled, sum(norms) / max(1, len(norms)), max(norms, default=0.0))
