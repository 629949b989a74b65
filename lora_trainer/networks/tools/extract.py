"""Extract a LoRA from a fine-tuned checkpoint minus its base, as sd-scripts' ``extract_lora_from_models.py`` does.

The layers are the ones sd-scripts' ``networks.lora`` gives a module (text encoders and Transformer blocks; with
``conv_dim`` also ResBlocks and down/upsamplers, their 3×3 convs at ``conv_dim``). Per layer: ΔW = W_tuned − W_base,
truncated SVD to the rank (up = U·S, down = Vᵀ), factors clamped to the quantile of their values, α = rank.
The text encoders are left out when no weight of theirs moved more than ``min_diff`` (most fine-tunes freeze them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import UserError
from ..lora import DOWN, UP
from ..naming import ATTENTION, CONV
from ..network import base_metadata, save_network
from ..spec import NetworkSpec
from .shared import CLAMP_QUANTILE, CheckpointLayers, check_clamp_quantile, checked_output, is_kxk_conv, low_rank

MIN_DIFF = 0.01


@dataclass
class ExtractResult:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)
    path: Path | None = None

    def lines(self) -> list[str]:
        modules = sum(1 for key in self.tensors if key.endswith(DOWN))
        return [*self.notes, f"extracted {modules} modules" + (f" into {self.path}" if self.path else "")]


def extracted_tensors(base: CheckpointLayers, tuned: CheckpointLayers, dim: int, conv_dim: int | None = None,
                      min_diff: float = MIN_DIFF, clamp_quantile: float | None = CLAMP_QUANTILE,
                      progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The LoRA tensors by Kohya key, and notes for the user (text encoders skipped); ``progress(done, total)`` after
    each layer's SVD (minutes for SDXL on a CPU)."""
    differences, notes = {}, []
    for name, target in base.targets.items():
        if target.group != ATTENTION and not (target.group == CONV and conv_dim):
            continue
        tuned_target = tuned.targets.get(name)
        if tuned_target is None or tuned.shape(tuned_target) != base.shape(target):
            raise UserError(f"{tuned.path}: its layer {target.module} does not match {base.path}'s; the two checkpoints "
                            "are not the same architecture (SD1/SD2/SDXL, or different widths)")
        differences[name] = (target, tuned.weight(tuned_target) - base.weight(target))

    text_encoder = {n: d for n, (t, d) in differences.items() if t.is_text_encoder}
    largest = max((float(d.abs().max()) for d in text_encoder.values()), default=0.0)
    if text_encoder and largest <= min_diff:
        notes.append(f"text encoder unchanged (largest difference {largest:.3g} ≤ min_diff {min_diff}): extracting the UNet only")
        differences = {n: v for n, v in differences.items() if n not in text_encoder}

    tensors = {}
    for done, (name, (_, difference)) in enumerate(differences.items(), 1):
        shape = difference.shape
        rank = conv_dim if conv_dim and is_kxk_conv(shape) else dim
        factors = low_rank(difference, min(rank, shape[0], shape[1]), clamp_quantile)  # sd-scripts caps by the channel counts
        tensors |= {f"{name}.{UP}": factors.up, f"{name}.{DOWN}": factors.down, f"{name}.alpha": torch.tensor(float(factors.rank))}
        if progress:
            progress(done, len(differences))
    return tensors, notes


def extract_metadata(config, dim: int, conv_dim: int | None, title: str) -> dict[str, str]:
    """What sd-scripts writes: its minimum network keys (``ss_network_args`` always, even empty) and the modelspec."""
    args = {"conv_dim": str(conv_dim), "conv_alpha": str(float(conv_dim))} if conv_dim else {}
    spec = NetworkSpec(dim=dim, alpha=float(dim), conv_dim=conv_dim, network_args=tuple(args.items()))
    return {**base_metadata(config, spec, title), "ss_network_args": json.dumps(args)}


def extract(base: str | Path, tuned: str | Path, out: str | Path, dim: int = 4, conv_dim: int | None = None,
            min_diff: float = MIN_DIFF, clamp_quantile: float | None = CLAMP_QUANTILE, precision: str = "fp16",
            progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    if dim < 1 or (conv_dim is not None and conv_dim < 0):
        raise UserError("--dim must be at least 1 (and --conv_dim at least 0)")
    out = checked_output(out, [base, tuned])
    check_clamp_quantile(clamp_quantile)
    base_layers, tuned_layers = CheckpointLayers(base), CheckpointLayers(tuned)
    if base_layers.config.label != tuned_layers.config.label:
        raise UserError(f"{tuned}: is {tuned_layers.config.label} and {base} is {base_layers.config.label}; "
                        "extract from a fine-tune of the same base model")
    tensors, notes = extracted_tensors(base_layers, tuned_layers, dim, conv_dim, min_diff, clamp_quantile, progress)
    metadata = extract_metadata(base_layers.config, dim, conv_dim, out.stem)
    path = save_network(tensors, out, metadata, precision)
    return ExtractResult(tensors, metadata, notes, path)
