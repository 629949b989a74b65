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
# LyCORIS 4.1.3 gives these modules no max-norm (its base class returns nothing, so a run skips them): a Kohya GUI
# preset that pairs --scale_weight_norms with iA3 or train_norm runs there, and here, with the rest limited
LEFT_ALONE = ("ia3", "glora", "full", "norm")


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
    if dora or algorithm not in SUPPORTED + LEFT_ALONE:  # OFT's max-norm in LyCORIS is its own rule; DoRA's magnitude
        name = "DoRA" if dora else algorithm
        raise UserError(f"--scale_weight_norms works with LoRA, LoCon, DyLoRA, LoHa and LoKr, not with {name}: "
                        "drop --scale_weight_norms or the algorithm")


def left_alone_warning(algorithms: set[str], train_norm: bool) -> str | None:
    """What --scale_weight_norms leaves as it is in this network, said once at the start (None: it limits everything)."""
    names = sorted(a for a in algorithms if a in LEFT_ALONE and a != "norm") + (["train_norm"] if train_norm else [])
    if not names:
        return None
    return (f"--scale_weight_norms limits the LoRA, LoCon, DyLoRA, LoHa and LoKr modules only; the {', '.join(names)} "
            "changes are left as they are, as in LyCORIS")


@torch.no_grad()
def apply_max_norm(modules: Iterable, limit: float) -> MaxNormReport:
    """Shrink every module (``NetworkModule``) whose ΔW norm exceeds ``limit``; report as sd-scripts logs it."""
    scaled, norms = 0, []
    for module in modules:
        if module.algorithm not in SUPPORTED:
            continue
        tensors = module.file_tensors()
        names = factor_names(tensors)
        norm = float(module_delta(tensors, module._base_weight[0].detach(), 1.0).weight.float().norm())
        ratio = shrink_ratio(norm, limit)
        if ratio < 1.0:
            scaled += 1
            per_factor = ratio ** (1.0 / len(names))
            for name in names:
                module.scale_(name, per_factor)
        norms.append(norm * ratio)
    return MaxNormReport(scaled, sum(norms) / max(1, len(norms)), max(norms, default=0.0))
