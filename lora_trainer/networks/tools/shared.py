"""What the tools share: reading a file that must be a network, a LoRA module's shape and ΔW, ΔW → (up, down) by SVD."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import UserError
from ..files import NetworkFile, non_finite_tensors, read_network
from ..lora import DOWN, MID, UP, lora_weight
from ..registry import Tensors, find_algorithm, modifiers_for, scale

# sd-scripts: a module whose largest singular value is below this is a zero matrix, kept as rank 1
MIN_SINGULAR_VALUE = 1e-6
# sd-scripts clamps the extracted factors to this quantile of their values (outliers cost precision in fp16)
CLAMP_QUANTILE = 0.99


_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.", "model_ema.")


def checked_output(out, inputs) -> Path:
    """Where a tool writes its file, checked before any work: a ``.safetensors`` name (the WebUI and sd-scripts read a
    ``.ckpt`` as a pickle), never one of ``inputs`` (a read-only file would be replaced all the same), in a folder that
    can be written."""
    from ...safe_io import check_writable

    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give the file to write, such as {out / 'merged.safetensors'}")
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"{out}: the tools write safetensors files; name it {out.stem}.safetensors")
    if any(Path(path).resolve() == out.resolve() for path in inputs if path is not None):
        raise UserError(f"{out}: refusing to overwrite an input; choose another output name")
    check_writable(out.parent, "the output folder", "--out")
    return out


def non_finite(network: NetworkFile) -> list[str]:
    """``module: NaN or Inf in <tensor>`` for every module holding one (a diverged training's file)."""
    found = []
    for name, tensors in network.modules.items():
        if bad := non_finite_tensors(tensors):
            found.append(f"{name}: NaN or Inf in {', '.join(bad)}")
    return found


def read_network_file(path, finite: bool = True,
                      for_checkpoint: str = "give the checkpoint with --model and the network file as the LoRA") -> NetworkFile:
    """A LoRA-family file, or UserError naming the file and what it is instead (``for_checkpoint``: what to do with a
    checkpoint given in its place); with ``finite``, one whose values are all numbers (a NaN would stop an SVD with a
    traceback, or pass into a merged file)."""
    network = read_network(path)
    keys = [f"{m}.{s}" for m, tensors in network.modules.items() for s in tensors] + network.unreadable_keys
    if any(key.startswith(_CHECKPOINT_PREFIXES) for key in keys):
        raise UserError(f"{network.path}: is a Stable Diffusion checkpoint, not a LoRA/LyCORIS network; {for_checkpoint}")
    if not network.modules:
        raise UserError(f"{network.path}: holds no LoRA/LyCORIS module (no key ends in a known network suffix such as "
                        "lora_up.weight or hada_w1_a); it is not a network file")
    if finite and (bad := non_finite(network)):
        raise UserError(f"{network.path}: {bad[0]}{f' (and {len(bad) - 1} more modules)' if len(bad) > 1 else ''}: the "
                        "training diverged; use an earlier epoch's file")
    return network


def lora_layer_shape(tensors: Tensors) -> torch.Size:
    """The layer shape a LoRA/LoCon module was made for, read from its tensors alone."""
    up, down, mid = tensors[UP], tensors[DOWN], tensors.get(MID)
    if mid is not None:
        return torch.Size((up.shape[0], down.shape[1], *mid.shape[2:]))
    return torch.Size((up.shape[0], *down.shape[1:]))


def lora_delta(tensors: Tensors) -> torch.Tensor:
    """ΔW at strength 1 (α/r included), in fp32, shaped like the layer."""
    down = tensors[DOWN].float()
    mid = tensors.get(MID)
    raw = lora_weight(tensors[UP].float(), down, None if mid is None else mid.float(), lora_layer_shape(tensors))
    return raw * scale(tensors, down.shape[0])


def is_plain_lora(tensors: Tensors) -> bool:
    try:
        return find_algorithm(tensors).name == "lora" and not modifiers_for(tensors)
    except ValueError:
        return False


def require_plain_lora(network: NetworkFile, what: str, instead: str) -> None:
    """UserError naming the file and every other algorithm in it, when ``what`` handles only LoRA/LoCon."""
    others = {name: count for name, count in network.algorithms.items() if name != "lora"}
    dora = sum(1 for tensors in network.modules.values() if modifiers_for(tensors))
    if dora:
        others["DoRA (dora_scale)"] = dora
    if others or not network.modules:
        found = ", ".join(f"{name} ({count} modules)" for name, count in sorted(others.items())) or "no network modules"
        raise UserError(f"{network.path}: {what} works on LoRA/LoCon files only, this file has {found}; {instead}")


@dataclass(frozen=True)
class LowRank:
    """ΔW ≈ up @ down with ``rank`` rows in down; the SVD's figures for the report."""

    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1] for convs
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    rank: int
    singular_values: torch.Tensor  # all of them, largest first

    @property
    def retained_fro(self) -> float:
        """Share of ΔW's Frobenius norm the kept singular values carry (sd-scripts' "fro retained")."""
        total = float(self.singular_values.pow(2).sum().sqrt())
        return float(self.singular_values[: self.rank].pow(2).sum().sqrt()) / total if total > 0 else 1.0

    @property
    def retained_sum(self) -> float:
        total = float(self.singular_values.abs().sum())
        return float(self.singular_values[: self.rank].abs().sum()) / total if total > 0 else 1.0


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).float())


def check_clamp_quantile(value: float | None) -> None:
    if value is not None and not 0 < value <= 1:  # also NaN
        raise UserError(f"--clamp_quantile {value}: give a share between 0 and 1, as sd-scripts (0.99 by default; 1 "
                        "clamps nothing)")


def low_rank(delta: torch.Tensor, rank: int, clamp_quantile: float | None = None) -> LowRank:
    """Truncated SVD of ΔW: up = U·S, down = Vᵀ (sd-scripts' split), optionally clamped to ±quantile of their values.

    ``rank`` is capped by the layer's sides, so α = rank keeps the scale exactly 1.
    """
    shape = delta.shape
    matrix = delta.reshape(shape[0], -1).float()
    rank = max(1, min(rank, *matrix.shape))
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    if clamp_quantile is not None and clamp_quantile < 1:
        # sd-scripts takes the quantile of the signed values and clamps symmetrically
        limit = torch.quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    if len(shape) == 4:
        up, down = up.reshape(shape[0], rank, 1, 1), down.reshape(rank, *shape[1:])
    return LowRank(up.contiguous(), down.contiguous(), rank, s)


def is_kxk_conv(shape: torch.Size) -> bool:
    return len(shape) == 4 and math.prod(shape[2:]) > 1


class CheckpointLayers:
    """The LoRA-targetable layers of a checkpoint file, read lazily: shapes without loading, weights on demand.

    The model is built on the meta device only for its layer names; tensors come straight from the file.
    """

    def __init__(self, path):
        from ...models.checkpoint import build_models, detect_architecture, open_tensors
        from ..naming import UNET, alias_table, model_targets

        path = Path(path)
        if path.is_dir():
            raise UserError(f"{path}: give a single-file checkpoint (.safetensors/.ckpt), not a Diffusers folder")
        self.path = path
        self.source = open_tensors(path)
        self.config, _ = detect_architecture(self.source)
        unet, text_encoders, _ = build_models(self.config)
        self.targets = model_targets(self.config, unet, text_encoders)
        self.prefixes = {UNET: self.config.unet_prefix} | {s.kohya_name: s.prefix for s in self.config.text_encoders}
        self._table = alias_table(self.targets)

    def find(self, module_name: str):
        from ..naming import canonical

        return self._table.get(canonical(module_name))

    def key(self, target, parameter: str | None = None) -> str:
        return f"{self.prefixes[target.component]}{target.module}.{parameter or target.parameter}"

    def shape(self, target) -> torch.Size:
        shape = self.source.shapes[self.key(target)]
        return torch.Size(shape if target.rows is None else (target.rows[1] - target.rows[0], *shape[1:]))

    def weight(self, target) -> torch.Tensor:
        """The layer's weight in fp32 (its own rows of a fused q/k/v projection)."""
        weight = self.source.get(self.key(target)).float()
        return weight if target.rows is None else weight[target.rows[0] : target.rows[1]]
