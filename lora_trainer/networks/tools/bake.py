"""Bake networks into a checkpoint: W + Σ ΔW for every layer they touch, saved as a new single-file checkpoint.

Works on the file's tensors, not on a loaded model: the model is built on the meta device only to know the
layers and their Kohya names, each touched weight is read, changed in fp32 and cast once, and every other tensor
is written back as read (bit-identical when the precision stays the same). Each network's ΔW is computed from
the original weight, as ``MergedNetworks`` does, so the order networks are listed in does not matter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import UserError
from ...models.checkpoint import TensorSource, build_models, detect_architecture, open_tensors
from ...safe_io import save_safetensors
from ..apply import Strength
from ..files import MatchReport, NetworkFile, match_network
from ..naming import UNET, Target, model_targets
from ..network import SAVE_DTYPES
from ..registry import module_delta
from .shared import checked_output, read_network_file


@dataclass
class BakeResult:
    path: Path
    changed_keys: list[str]
    reports: list[MatchReport] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = [f"{r.network}: {len(r.matched)} layers baked" + (f", {len(r.unmatched)} modules match no layer of the model "
                 f"(skipped: {', '.join(r.unmatched[:5])}{' …' if len(r.unmatched) > 5 else ''})" if r.unmatched else "")
                 for r in self.reports]
        return lines + [f"wrote {self.path} ({len(self.changed_keys)} tensors changed)"]


def component_prefixes(config) -> dict[str, str]:
    """Target.component → the checkpoint key prefix of that part."""
    return {UNET: config.unet_prefix} | {slot.kohya_name: slot.prefix for slot in config.text_encoders}


def _key(target: Target, prefixes: dict[str, str], parameter: str) -> str:
    return f"{prefixes[target.component]}{target.module}.{parameter}"


def _rows(tensor: torch.Tensor, target: Target) -> torch.Tensor:
    return tensor if target.rows is None else tensor[target.rows[0] : target.rows[1]]


def baked_tensors(source: TensorSource, config, networks: Sequence[tuple[NetworkFile, Strength]],
                  progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, torch.Tensor], list[MatchReport]]:
    """The new fp32 values of every checkpoint tensor the networks change, and each network's match report;
    ``progress(done, total)`` after each module added.

    UserError (with the report) when a network fits no layer, has broken modules, or is for another base model.
    """
    unet, text_encoders, _ = build_models(config)  # meta device: names and shapes only
    targets = model_targets(config, unet, text_encoders)
    prefixes = component_prefixes(config)

    def stored(target: Target) -> torch.Tensor:
        key = _key(target, prefixes, target.parameter)
        if key not in source.shapes:
            raise UserError(f"{source.path}: has no tensor {key}; the checkpoint is pruned or damaged")
        shape = source.shapes[key]
        if target.rows is not None:  # a fused q/k/v projection: the target owns only its rows
            shape = (target.rows[1] - target.rows[0], *shape[1:])
        return torch.empty(shape, device="meta")

    reports, changed = [], {}
    originals: dict[str, torch.Tensor] = {}

    def original(key: str) -> torch.Tensor:
        if key not in originals:
            originals[key] = source.get(key).float()
        return originals[key]

    for network, _ in networks:  # every network checked before the first (slow) change
        report = match_network(network, targets, stored, config.label)
        if not report.ok or report.hint:  # a version mismatch can still match a few text-encoder layers by name
            raise UserError(f"{network.path or network.name} cannot be baked into {source.path}:\n{report.message()}")
        reports.append(report)
    done, total = 0, sum(len(report.matched) for report in reports)
    for (network, strength), report in zip(networks, reports):
        for match in report.matched:
            target = match.target
            weight_key = _key(target, prefixes, target.parameter)
            base = _rows(original(weight_key), target)
            delta = module_delta(match.tensors, base, strength.for_target(target))
            for key, change in ((weight_key, delta.weight), (_key(target, prefixes, target.bias or "bias"), delta.bias)):
                if change is None:
                    continue
                if key not in source.shapes:
                    raise UserError(f"{network.path}: {match.name} changes {key}, which {source.path} does not have")
                new = changed.setdefault(key, original(key).clone())
                _rows(new, target).add_(change.to(new.dtype))
            done += 1
            if progress:
                progress(done, total)
    return changed, reports


_CONTENT_HASHES = ("modelspec.hash_sha256", "sshs_model_hash", "sshs_legacy_hash")


def bake(checkpoint: str | Path, networks: Sequence[tuple[str | Path | NetworkFile, Strength]], out: str | Path,
         precision: str = "fp16", progress: Callable[[int, int], None] | None = None) -> BakeResult:
    """Merge ``networks`` (any algorithm, each with text-encoder/UNet strengths) into ``checkpoint`` and save ``out``;
    ``progress(done, total)`` after each module added."""
    checkpoint, out = Path(checkpoint), Path(out)
    if precision not in SAVE_DTYPES:
        raise UserError(f"precision {precision!r} is not one of {', '.join(SAVE_DTYPES)}")
    if checkpoint.is_dir():
        raise UserError(f"{checkpoint}: bake writes single-file checkpoints; give a .safetensors/.ckpt file, not a Diffusers folder")
    out = checked_output(out, [checkpoint, *(n.path if isinstance(n, NetworkFile) else n for n, _ in networks)])
    source = open_tensors(checkpoint)
    config, _ = detect_architecture(source)
    loaded = [(n if isinstance(n, NetworkFile) else read_network_file(n), s) for n, s in networks]
    if not loaded:
        raise UserError("no network to bake: give at least one --lora file")
    changed, reports = baked_tensors(source, config, loaded, progress)

    dtype = SAVE_DTYPES[precision]
    tensors = {}
    for key in source.keys():
        tensor = changed[key] if key in changed else source.get(key)
        tensors[key] = tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor
    record = [{"name": n.name, "te": s.te, "unet": s.te if s.unet is None else s.unet, **({"blocks": s.blocks} if s.blocks else {})}
              for n, s in loaded]
    kept = {k: v for k, v in source.metadata.items() if k not in _CONTENT_HASHES}  # of the source's tensors, not these
    metadata = {**kept, "lora_trainer.baked": json.dumps(record, ensure_ascii=False),
                "modelspec.merged_from": ", ".join([checkpoint.stem] + [n.name for n, _ in loaded])}
    save_safetensors(tensors, out, metadata)
    return BakeResult(out, sorted(changed), reports)
