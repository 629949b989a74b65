""""What kind of model is this file?": architecture, precision, parts, key counts and hashes, without loading it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..hashing import file_sha256, legacy_model_hash
from .checkpoint import UnknownArchitecture, dtype_histogram, identify, looks_like_network, open_tensors

_PARTS = {
    "UNet": ("model.diffusion_model.",),
    "VAE": ("first_stage_model.",),
    "text encoder (CLIP ViT-L)": ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."),
    "text encoder (OpenCLIP)": ("cond_stage_model.model.", "conditioner.embedders.1.model."),
    "EMA UNet": ("model_ema.",),
}


@dataclass
class CheckpointReport:
    path: Path
    architecture: str  # "SD1", "SD2-v", "SDXL", ... or "unknown"
    reason: str
    precision: dict[str, int]
    parts: dict[str, int]  # part -> tensor count
    other_keys: int
    total_keys: int
    sha256: str | None
    legacy_hash: str | None
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [
            f"file:          {self.path}",
            f"architecture:  {self.architecture}",
            f"why:           {self.reason}",
            "precision:     " + ", ".join(f"{name} × {count}" for name, count in sorted(self.precision.items())),
            "parts:",
        ]
        out += [f"  {name:<26} {count} tensors" for name, count in self.parts.items()]
        if self.other_keys:  # beside a model's parts, its schedule buffers and the like; else the file is not a model
            label = "other (schedule buffers…)" if self.parts else "not a model's part"
            out.append(f"  {label:<26} {self.other_keys} tensors")
        out.append(f"tensors:       {self.total_keys}")
        if self.sha256:
            out.append(f"hash:          {self.sha256[:10]} (AutoV2, the WebUI's 'Model hash'), legacy {self.legacy_hash}")
            out.append(f"sha256:        {self.sha256}")
        out += [f"note:          {note}" for note in self.notes]
        for key in ("modelspec.title", "modelspec.architecture", "ss_sd_model_name"):
            if key in self.metadata:
                out.append(f"{key}: {self.metadata[key]}")
        return out


def inspect_checkpoint(path: str | Path, with_hashes: bool = True) -> CheckpointReport:
    path = Path(path)
    source = open_tensors(path)
    parts = {}
    for name, prefixes in _PARTS.items():
        count = sum(1 for key in source.shapes if key.startswith(prefixes))
        if count:
            parts[name] = count
    other = len(source.shapes) - sum(parts.values())
    try:
        config, reason, notes, _ = identify(source, path)
        architecture = config.label
    except UnknownArchitecture as error:
        architecture, reason, notes = "unknown", str(error), []
        if looks_like_network(list(source.shapes)):
            from ..training.options import join_command_line

            command = join_command_line(["python", "-m", "lora_trainer", "lora", "inspect", str(path)])
            architecture = "LoRA/LyCORIS network, not a checkpoint"
            reason = (f"its tensors are a network's (lora_down/lora_up, hada_…, lokr_…); for its rank, base model, "
                      f"training and tags run: {command}")
    sha = file_sha256(path) if with_hashes else None
    legacy = legacy_model_hash(path) if with_hashes else None
    return CheckpointReport(path, architecture, reason, dtype_histogram(source), parts, other, len(source.shapes), sha, legacy, notes, source.metadata)
