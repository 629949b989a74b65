"""Resize a LoRA/LoCon to another rank by SVD, as sd-scripts' ``networks/resize_lora.py`` computes it.

Per module: ΔW = up @ down (without α), SVD, keep a fixed rank or a rank chosen from the singular values
(``sv_ratio``, ``sv_fro``, ``sv_cumulative``, capped by the fixed rank), up = U·S, down = Vᵀ, and the new α =
old scale × new rank, so the effective scale α/r — and with it ΔW — is preserved up to the dropped ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import UserError
from ..files import NetworkFile, bundled_embedding_tensors
from ..lora import DOWN, MID, UP, lora_weight
from ..network import save_network
from ..registry import Tensors, scale
from .shared import MIN_SINGULAR_VALUE, checked_output, lora_layer_shape, read_network_file, require_plain_lora

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


def dynamic_rank(singular_values: torch.Tensor, method: str, parameter: float) -> int:
    """The rank sd-scripts' dynamic methods keep (before the cap), singular values largest first.

    sv_ratio: every value larger than the largest / parameter; sv_fro: the fewest whose squares reach parameter² of
    the squared total; sv_cumulative: the fewest whose sum reaches parameter of the total.
    """
    s = singular_values.double()
    if method == "sv_ratio":
        index = int((s > s[0] / parameter).sum()) - 1
    elif method == "sv_fro":
        index = int(torch.searchsorted(torch.cumsum(s.pow(2), 0) / s.pow(2).sum(), parameter**2))
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), parameter))
    else:
        raise UserError(f"unknown dynamic method {method!r}; use one of {', '.join(DYNAMIC_METHODS)}")
    return max(0, min(index, len(s) - 1)) + 1


def chosen_rank(singular_values: torch.Tensor, max_rank: int, method: str | None = None, parameter: float | None = None) -> int:
    """``max_rank``, or the dynamic rank capped by it; 1 for a zero matrix (sd-scripts' rule)."""
    rank = dynamic_rank(singular_values, method, parameter) if method else max_rank
    if float(singular_values[0]) <= MIN_SINGULAR_VALUE:
        return 1
    return min(rank, max_rank)


@dataclass(frozen=True)
class ModuleResize:
    name: str
    old_rank: int
    new_rank: int
    new_alpha: float
    retained_fro: float  # share of ΔW's Frobenius norm kept
    retained_sum: float
    max_ratio: float  # largest / smallest kept singular value

    def line(self) -> str:
        return (f"{self.name:75} | rank {self.old_rank} → {self.new_rank}, alpha {self.new_alpha:g}, "
                f"sum(S) retained {self.retained_sum:.1%}, fro retained {self.retained_fro:.1%}, max(S) ratio {self.max_ratio:0.1f}")


def resize_module(name: str, tensors: Tensors, max_rank: int, method: str | None = None,
                  parameter: float | None = None) -> tuple[dict[str, torch.Tensor], ModuleResize]:
    """One LoRA module at its new rank: {suffix: tensor} (LoCon layout, no lora_mid) and the figures for the report."""
    shape = lora_layer_shape(tensors)
    old_rank = tensors[DOWN].shape[0]
    old_scale = scale(tensors, old_rank)
    mid = tensors.get(MID)
    product = lora_weight(tensors[UP].float(), tensors[DOWN].float(), None if mid is None else mid.float(), shape)
    matrix = product.reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    # never above the module's own rank (sd-scripts' cap is the asked rank only): past it the SVD adds zero directions
    rank = min(chosen_rank(s, max_rank, method, parameter), old_rank, len(s))
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    if len(shape) == 4:
        up, down = up.reshape(shape[0], rank, 1, 1), down.reshape(rank, *shape[1:])
    new_alpha = float(old_scale * rank)
    kept = s[:rank]
    figures = ModuleResize(
        name, old_rank, rank, new_alpha,
        retained_fro=float(kept.pow(2).sum().sqrt() / s.pow(2).sum().sqrt()) if float(s[0]) > 0 else 1.0,
        retained_sum=float(kept.abs().sum() / s.abs().sum()) if float(s[0]) > 0 else 1.0,
        max_ratio=float(s[0] / s[rank - 1]) if float(s[rank - 1]) > 0 else float("inf"),
    )
    resized = {DOWN: down.contiguous(), UP: up.contiguous(), "alpha": torch.tensor(new_alpha)}
    return resized, figures


@dataclass
class ResizeResult:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: list[ModuleResize] = field(default_factory=list)
    path: Path | None = None
    asked_rank: int | None = None  # a fixed rank (no dynamic method)

    @property
    def mean_retained_fro(self) -> float:
        return sum(m.retained_fro for m in self.modules) / len(self.modules)

    def lines(self, per_module: bool = True) -> list[str]:
        lines = [m.line() for m in self.modules] if per_module else []
        lines.append(f"average Frobenius norm retained: {self.mean_retained_fro:.2%} over {len(self.modules)} modules")
        below = [m for m in self.modules if self.asked_rank and m.old_rank < self.asked_rank]
        if below:
            ranks = ", ".join(str(r) for r in sorted({m.old_rank for m in below}))
            lines.append(f"{len(below)} module{'s' if len(below) > 1 else ''} kept {'their' if len(below) > 1 else 'its'} "
                         f"rank ({ranks}), below the asked {self.asked_rank}: a higher rank would hold only zeros")
        if self.path:
            lines.append(f"wrote {self.path}")
        return lines


def resize_network(network: NetworkFile, rank: int, conv_rank: int | None = None, method: str | None = None,
                   parameter: float | None = None, progress: Callable[[int, int], None] | None = None) -> ResizeResult:
    """Every module resized (convolutions, 1×1 ones too as in sd-scripts' resize_lora.py, to ``conv_rank``, default
    ``rank``); metadata rewritten as sd-scripts does;
    ``progress(done, total)`` after each module."""
    require_plain_lora(network, "resize", "convert it first with `lora merge --mode svd --new_rank N` (one file, "
                       "weight 1; LoHa/LoKr files also need their checkpoint, --model)")
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise UserError("the new rank must be at least 1")
    if method and parameter is None:
        raise UserError(f"--dynamic_method {method} needs --dynamic_param")
    if method == "sv_ratio" and not parameter >= 1:  # as sd-scripts: the largest over the smallest kept value
        raise UserError(f"--dynamic_param {parameter}: sv_ratio keeps singular values within that ratio of the "
                        "largest; give 1 or more (e.g. 8)")
    if method in ("sv_fro", "sv_cumulative") and not 0 < parameter <= 1:
        raise UserError(f"--dynamic_param {parameter}: {method} keeps that share of the module (0 to 1, e.g. 0.9)")
    conv_rank = rank if conv_rank is None else conv_rank
    tensors, modules = {}, []
    for done, (name, module) in enumerate(network.modules.items(), 1):
        max_rank = conv_rank if len(lora_layer_shape(module)) == 4 else rank  # 1×1 convs too, as sd-scripts
        resized, figures = resize_module(name, module, max_rank, method, parameter)
        tensors |= {f"{name}.{suffix}": t for suffix, t in resized.items()}
        modules.append(figures)
        if progress:
            progress(done, len(network.modules))

    metadata = {k: v for k, v in network.metadata.items() if not k.startswith("sshs_")}
    comment = metadata.get("ss_training_comment", "")
    old_dim = max(m.old_rank for m in modules)
    if method:
        metadata["ss_training_comment"] = f"Dynamic resize with {method}: {parameter} from {old_dim}; {comment}"
        metadata["ss_network_dim"] = metadata["ss_network_alpha"] = "Dynamic"
    else:
        conv = "" if conv_rank == rank else f" (conv: {min(conv_rank, old_dim)})"
        metadata["ss_training_comment"] = f"dimension is resized from {old_dim} to {min(rank, old_dim)}{conv}; {comment}"
        metadata["ss_network_dim"] = str(min(rank, old_dim))
        metadata["ss_network_alpha"] = str(modules[-1].new_alpha)  # sd-scripts writes the last module's
    tensors |= bundled_embedding_tensors(network)  # the trigger words the file brings stay with it (sd-scripts drops them)
    return ResizeResult(tensors, metadata, modules, asked_rank=None if method else rank)


def resize(path: str | Path, out: str | Path, rank: int, conv_rank: int | None = None, method: str | None = None,
           parameter: float | None = None, precision: str = "fp16",
           progress: Callable[[int, int], None] | None = None) -> ResizeResult:
    out = checked_output(out, [path])
    network = read_network_file(path)
    result = resize_network(network, rank, conv_rank, method, parameter, progress)
    result.path = save_network(result.tensors, out, result.metadata, precision)
    return result
