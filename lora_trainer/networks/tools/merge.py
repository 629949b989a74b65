"""Merge several networks, each with a weight, into one LoRA file.

``concat`` (LoRA/LoCon inputs): ranks side by side, each input's α/r and weight folded into its up, α = total
rank — the merged ΔW is exactly Σ wᵢ·ΔWᵢ. ``svd`` (any algorithm): Σ ΔWᵢ(wᵢ) computed by each algorithm's own
code, then truncated SVD to the asked rank with α = rank, as sd-scripts' ``svd_merge_lora.py`` does (including
its clamp of the factors to the 0.99 quantile). Algorithms whose ΔW reads the base weight (DoRA, OFT, BOFT,
IA3, GLoRA) need the checkpoint (``model``); so do LoHa/LoKr modules whose layer shape the file does not record.
"""

from __future__ import annotations

import math

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import UserError
from ..files import NetworkFile
from ..lora import DOWN, MID, UP
from ..naming import canonical
from ..network import save_network
from ..registry import Tensors, find_algorithm, modifiers_for, module_delta, scale
from .inspect import base_model_of
from .shared import (CLAMP_QUANTILE, CheckpointLayers, check_clamp_quantile, checked_output, is_kxk_conv, is_plain_lora,
                     lora_layer_shape, low_rank, read_network_file)

MODES = ("concat", "svd")


@dataclass
class MergeResult:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)
    path: Path | None = None

    def lines(self) -> list[str]:
        modules = len({key.rsplit(".", 2)[0] for key in self.tensors if key.endswith(DOWN)})
        return [*self.notes, f"merged {modules} modules" + (f" into {self.path}" if self.path else "")]


def _grouped(networks: Sequence[tuple[NetworkFile, float]]) -> dict[str, list[tuple[NetworkFile, Tensors, float]]]:
    """Kohya module name → every input's tensors for that layer (files may use other namings for the same layer)."""
    modules: dict[str, list] = {}
    for network, weight in networks:
        for name, tensors in network.modules.items():
            modules.setdefault(canonical(name), []).append((network, tensors, weight))
    return modules


def concat_merge(networks: Sequence[tuple[NetworkFile, float]]) -> dict[str, torch.Tensor]:
    """Exact merge of LoRA/LoCon files: up = [√f₁·up₁ | √f₂·up₂ …], down = [√f₁·down₁; √f₂·down₂ …] with fᵢ = wᵢsᵢ
    (the sign on up), α = Σ rᵢ."""
    tensors = {}
    for name, parts in _grouped(networks).items():
        shapes = {lora_layer_shape(t) for _, t, _ in parts}
        if len(shapes) > 1:
            raise UserError(f"{name}: the inputs were made for layers of different shapes {sorted(map(tuple, shapes))}; "
                            "they are for different base models")
        ups, downs = [], []
        for network, module, weight in parts:
            if MID in module:
                raise UserError(f"{network.path}: {name} stores a CP/Tucker core (lora_mid), which ranks cannot be "
                                "concatenated with; use --mode svd")
            down, up = module[DOWN].float(), module[UP].float()
            if down.dim() == 4 and up.dim() == 2:  # DyLoRA saves conv ups flat
                up = up[:, :, None, None]
            # the factor split as √|f| on both sides (its sign on up), as sd-scripts' merge_lora.py: folded into up
            # alone, a small α/r pushed up's values into fp16's subnormals, where they lose digits
            factor = weight * scale(module, down.shape[0])
            root = abs(factor) ** 0.5
            ups.append(up * math.copysign(root, factor))
            downs.append(down * root)
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
        tensors |= {f"{name}.{UP}": up, f"{name}.{DOWN}": down, f"{name}.alpha": torch.tensor(float(down.shape[0]))}
    return tensors


def layer_shape_from_tensors(tensors: Tensors) -> torch.Size | None:
    """The layer shape a module's tensors pin down, or None when they do not (a conv stored flattened)."""
    if "lora_up.weight" in tensors:
        return lora_layer_shape(tensors)
    if "diff" in tensors:
        return tensors["diff"].shape
    if "hada_t1" in tensors:
        return torch.Size((tensors["hada_w1_a"].shape[1], tensors["hada_w1_b"].shape[1], *tensors["hada_t1"].shape[2:]))
    w1 = tensors.get("lokr_w1")
    if w1 is None and "lokr_w1_a" in tensors:
        w1 = torch.empty(tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1], device="meta")
    if w1 is not None and "lokr_w2" in tensors:
        w2 = tensors["lokr_w2"]
        return torch.Size((w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:]))
    if w1 is not None and "lokr_t2" in tensors:
        t2 = tensors["lokr_t2"]
        return torch.Size((w1.shape[0] * tensors["lokr_w2_a"].shape[1], w1.shape[1] * tensors["lokr_w2_b"].shape[1], *t2.shape[2:]))
    return None


def needs_base_weight(tensors: Tensors) -> bool:
    return find_algorithm(tensors).uses_weight or bool(modifiers_for(tensors))


def summed_delta(name: str, parts, layers: CheckpointLayers | None) -> tuple[torch.Tensor | None, bool]:
    """Σ ΔWᵢ(wᵢ) of one layer in fp32, and whether some input also changed the bias (a LoRA cannot carry that)."""
    target = layers.find(name) if layers else None
    if layers and target is None:
        raise UserError(f"{parts[0][0].path}: {name} is no layer of {layers.path}; is the checkpoint for another base model?")
    shape = layers.shape(target) if target else next((s for _, t, _ in parts if (s := layer_shape_from_tensors(t))), None)
    total, bias = None, False
    for network, tensors, weight in parts:
        if needs_base_weight(tensors) and target is None:
            raise UserError(f"{network.path}: {name} is {find_algorithm(tensors).name}"
                            f"{' with DoRA' if modifiers_for(tensors) else ''}, whose change depends on the base weights; "
                            "give the checkpoint it was trained on with --model")
        if shape is None:
            raise UserError(f"{network.path}: {name} ({find_algorithm(tensors).name}) does not record its layer's shape "
                            "(a Linear layer or a flattened convolution read alike); give the checkpoint with --model")
        if len(shape) < 2:
            return None, False  # norm layers: a LoRA cannot express a change of a 1-D weight
        reads_weight = target is not None and needs_base_weight(tensors)
        base = layers.weight(target) if reads_weight else torch.empty(shape, dtype=torch.float32, device="meta")
        delta = module_delta(tensors, base, weight)
        total = delta.weight if total is None else total + delta.weight
        bias = bias or delta.bias is not None
    return total, bias


def svd_merge(networks: Sequence[tuple[NetworkFile, float]], rank: int, conv_rank: int | None = None,
              layers: CheckpointLayers | None = None, clamp_quantile: float | None = CLAMP_QUANTILE,
              progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Σ ΔWᵢ per layer, each module's SVD to ``rank`` (k×k convs: ``conv_rank``), α = rank; and notes on what was
    dropped. ``progress(done, total)`` after each module."""
    conv_rank = rank if conv_rank is None else conv_rank
    tensors, dropped_bias, dropped_norm = {}, [], []
    grouped = _grouped(networks)
    for done, (name, parts) in enumerate(grouped.items(), 1):
        if progress:
            progress(done - 1, len(grouped))
        delta, bias = summed_delta(name, parts, layers)
        if delta is None:
            dropped_norm.append(name)
            continue
        if bias:
            dropped_bias.append(name)
        factors = low_rank(delta, conv_rank if is_kxk_conv(delta.shape) else rank, clamp_quantile)
        tensors |= {f"{name}.{UP}": factors.up, f"{name}.{DOWN}": factors.down, f"{name}.alpha": torch.tensor(float(factors.rank))}
    if progress:
        progress(len(grouped), len(grouped))
    notes = []
    if dropped_bias:
        notes.append(f"bias changes of {len(dropped_bias)} layers dropped (a LoRA holds none): {', '.join(dropped_bias[:5])}")
    if dropped_norm:
        notes.append(f"{len(dropped_norm)} norm layers dropped (a LoRA cannot change them): {', '.join(dropped_norm[:5])}")
    return tensors, notes


def _family(network: NetworkFile) -> str:
    base, _ = base_model_of(network)
    return "SDXL" if base.startswith("SDXL") else "SD2" if base.startswith("SD2") else "SD1" if base.startswith("SD1") else ""


def merged_metadata(networks: Sequence[tuple[NetworkFile, float]], dims: set[int], conv_rank: int | None, title: str) -> dict[str, str]:
    """sd-scripts' minimum network metadata (+ modelspec with merged_from), base model taken from the inputs."""
    source = next((n.metadata for n, _ in networks if n.metadata.get("ss_base_model_version")), {})
    dim = str(next(iter(dims))) if len(dims) == 1 else "Dynamic"
    metadata = {
        "ss_v2": source.get("ss_v2", "False"),
        "ss_base_model_version": source.get("ss_base_model_version", ""),
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": dim,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.merged_from": ", ".join(n.name for n, _ in networks),
    }
    if conv_rank is not None:
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))})
    for key in ("modelspec.architecture", "modelspec.implementation", "modelspec.resolution", "modelspec.prediction_type"):
        if any(key in n.metadata for n, _ in networks):
            metadata[key] = next(n.metadata[key] for n, _ in networks if key in n.metadata)
    return {k: v for k, v in metadata.items() if v != ""}


def merge_networks(networks: Sequence[tuple[NetworkFile, float]], mode: str = "concat", rank: int | None = None,
                   conv_rank: int | None = None, layers: CheckpointLayers | None = None,
                   clamp_quantile: float | None = CLAMP_QUANTILE, title: str = "merged",
                   progress: Callable[[int, int], None] | None = None) -> MergeResult:
    if mode not in MODES:
        raise UserError(f"merge mode {mode!r} is not one of {', '.join(MODES)}")
    if not networks:
        raise UserError("nothing to merge: give at least one network file")
    families = {n.path or n.name: f for n, _ in networks if (f := _family(n))}
    if len(set(families.values())) > 1:
        raise UserError("the networks are for different base models (" + ", ".join(f"{p}: {f}" for p, f in families.items()) +
                        "); merge only networks made for the same one")
    if mode == "concat":
        for network, _ in networks:
            others = sorted({name for name, t in network.modules.items() if not is_plain_lora(t)})
            if others:
                kinds = ", ".join(sorted({find_algorithm(network.modules[n]).name + ("+dora" if modifiers_for(network.modules[n]) else "")
                                          for n in others}))
                raise UserError(f"{network.path}: concat merges LoRA/LoCon only, this file has {kinds} "
                                f"({len(others)} modules); use --mode svd --new_rank N")
        tensors, notes = concat_merge(networks), []
    else:
        if not rank or rank < 1:
            raise UserError("--mode svd needs --new_rank (the rank of the merged LoRA)")
        tensors, notes = svd_merge(networks, rank, conv_rank, layers, clamp_quantile, progress)
    dims = {int(t.shape[0]) for k, t in tensors.items() if k.endswith(DOWN)}
    return MergeResult(tensors, merged_metadata(networks, dims, conv_rank if mode == "svd" else None, title), notes)


def merge(inputs: Sequence[tuple[str | Path, float]], out: str | Path, mode: str = "concat", rank: int | None = None,
          conv_rank: int | None = None, model: str | Path | None = None, precision: str = "fp16",
          clamp_quantile: float | None = CLAMP_QUANTILE, progress: Callable[[int, int], None] | None = None) -> MergeResult:
    out = checked_output(out, [path for path, _ in inputs] + [model])
    if mode == "concat" and (rank is not None or conv_rank is not None or model is not None):
        raise UserError("--new_rank, --new_conv_rank and --model are for --mode svd; concat keeps every module's rank")
    if mode == "svd" and (rank is not None and rank < 1 or conv_rank is not None and conv_rank < 1):
        raise UserError("--new_rank and --new_conv_rank must be at least 1")
    check_clamp_quantile(clamp_quantile)
    networks = [(read_network_file(path), weight) for path, weight in inputs]
    layers = CheckpointLayers(model) if model else None
    result = merge_networks(networks, mode, rank, conv_rank, layers, clamp_quantile, title=out.stem, progress=progress)
    result.path = save_network(result.tensors, out, result.metadata, precision)
    return result
