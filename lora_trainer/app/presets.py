"""Starting points users expect: subject presets (character, style, …) with the strength they are used at, VRAM
tiers whose memory switches are merged on top, our own preset files, and Kohya TOML import/export.

Everything here is plain dicts of sd-scripts option names, so what a preset fills is exactly what
``options_from`` checks and the trainer runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import toml_text
from ..dataset.captions import VARYING_CAPTION_OPTIONS
from ..errors import UserError
from ..safe_io import read_utf8, write_text
from ..training.options import (FIELDS, TrainOptions, kohya_command, kohya_command_notes, options_from,
                                read_config_file, sd_scripts_notes, write_config)
from ..training.sd_scripts_backend import for_sd_scripts, told_by_checkpoint

# What every preset shares: sd-scripts' LoRA on attention + text encoder, buckets, latents cached, a numbered file
# and a sample every epoch so the user can pick the best epoch afterwards.
_COMMON: dict[str, Any] = {
    "network_module": "networks.lora", "optimizer_type": "AdamW", "lr_scheduler": "cosine", "lr_warmup_steps": 0.05,
    "resolution": "512", "enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64,
    "caption_extension": ".txt", "cache_latents": True, "save_every_n_epochs": 1, "save_model_as": "safetensors",
    "train_batch_size": 2, "min_snr_gamma": 5.0, "max_data_loader_n_workers": 0, "seed": 42, "save_state": True,
}


@dataclass(frozen=True)
class Preset:
    title: str
    options: dict[str, Any]
    strength_range: tuple[float, float]  # the <lora:name:weight> users settle on for this kind of LoRA
    preferred_weight: float  # written to the Lora card, prefilled in the grid
    advice: str = ""

    @property
    def guidance(self) -> str:
        low, high = self.strength_range
        span = f"{low:g}–{high:g}" if high > low else f"{low:g} or more"
        return f"Use at strength {span} (card weight {self.preferred_weight:g}). {self.advice}".strip()


PRESETS: dict[str, Preset] = {
    "character": Preset("Character", {
        **_COMMON, "network_dim": 32, "network_alpha": 16, "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": [5e-5],
        "max_train_epochs": 10, "keep_tokens": 1, "shuffle_caption": True, "flip_aug": False},
        (0.6, 0.8), 0.7, "Put the trigger word first in every caption (keep_tokens 1); no flips, faces are asymmetric."),
    "anime_character": Preset("Anime character", {
        **_COMMON, "network_dim": 16, "network_alpha": 8, "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": [5e-5],
        "max_train_epochs": 10, "keep_tokens": 1, "shuffle_caption": True, "flip_aug": False, "clip_skip": 2},
        (0.6, 0.8), 0.7, "Booru-tagged captions with the trigger first; clip skip 2 as anime models expect."),
    "style": Preset("Style", {
        **_COMMON, "network_dim": 32, "network_alpha": 16, "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": [2e-5],
        "max_train_epochs": 12, "keep_tokens": 0, "shuffle_caption": True, "flip_aug": True},
        (0.4, 0.5), 0.45, "Many varied images; caption the content, not the style, so the style goes into the LoRA."),
    "concept": Preset("Concept", {
        **_COMMON, "network_dim": 16, "network_alpha": 8, "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": [5e-5],
        "max_train_epochs": 10, "keep_tokens": 1, "shuffle_caption": True, "flip_aug": True},
        (0.7, 1.0), 0.8, "The trigger word first; caption everything that is not the concept."),
    "clothing": Preset("Clothing", {
        **_COMMON, "network_dim": 16, "network_alpha": 8, "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": [5e-5],
        "max_train_epochs": 10, "keep_tokens": 1, "shuffle_caption": True, "flip_aug": True},
        (0.5, 0.7), 0.6, "Several wearers so the outfit, not the person, is learnt; lower strength keeps faces intact."),
    "object": Preset("Object / product", {
        **_COMMON, "network_dim": 16, "network_alpha": 16, "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": [5e-5],
        "max_train_epochs": 12, "keep_tokens": 1, "shuffle_caption": True, "flip_aug": False},
        (1.0, 1.0), 1.0, "Shapes and logos must stay exact: no flips; use at full strength."),
}

# The switches that make a run fit the card: memory first (checkpointing, 8-bit optimizer, mixed precision, cached
# latents, batch size), then what to give up (SDXL's text encoders and 1024 resolution). SD1 keeps its text encoder
# on 6 GB: it costs ≈ 0.1 GiB there. Each tier leaves a tenth of its card free: the estimate (``vram_gib``) of every
# preset on it, SD1 and SDXL, is at most 0.9 × the card, as a desktop and other programs take about that much (a
# 6 GB card under Windows has ≈ 5.3–5.6 GiB free). Within that, a larger card trains more at once: SD1 at batch 2
# from 8 GB, without gradient checkpointing (faster steps) from 12 GB.
USABLE_SHARE = 0.9  # of a card, for training: the rest is the desktop's and other programs'
VRAM_TIERS: dict[str, dict[str, Any]] = {
    "6 GB": {"gradient_checkpointing": True, "mixed_precision": "fp16", "cache_latents": True, "optimizer_type": "AdamW8bit",
             "train_batch_size": 1, "sdpa": True},
    "8 GB": {"gradient_checkpointing": True, "mixed_precision": "fp16", "cache_latents": True, "optimizer_type": "AdamW8bit",
             "train_batch_size": 2, "sdpa": True},
    "12 GB": {"mixed_precision": "fp16", "cache_latents": True, "optimizer_type": "AdamW8bit", "train_batch_size": 2,
              "sdpa": True},
    "16 GB": {"mixed_precision": "bf16", "cache_latents": True, "train_batch_size": 2, "sdpa": True},
    "24 GB": {"mixed_precision": "bf16", "cache_latents": True, "train_batch_size": 4, "sdpa": True},
}
NO_TIER = "no limit"
# SDXL at the same card: its native resolution and gradient checkpointing; below 16 GB the UNet only, its weights in
# fp8 and the captions encoded once (the text encoders then leave the GPU), which needs captions that do not vary
# between steps; batch 1 on 8 GB; on 6 GB 640 px and a rank of at most 4 (at 768 px even rank 4 is 5.7 GiB estimated,
# rank 8 at 640 px 5.5); on 16 GB the 8-bit optimizer (rank 32 under AdamW is 14.5 GiB estimated).
_UNET_ONLY_IN_FP8 = {"network_train_unet_only": True, "fp8_base": True, "cache_text_encoder_outputs": True}
SDXL_TIERS: dict[str, dict[str, Any]] = {
    NO_TIER: {"resolution": "1024"},
    "6 GB": {"resolution": "640", **_UNET_ONLY_IN_FP8},
    "8 GB": {"resolution": "1024", "train_batch_size": 1, **_UNET_ONLY_IN_FP8},
    "12 GB": {"resolution": "1024", "gradient_checkpointing": True, **_UNET_ONLY_IN_FP8},
    "16 GB": {"resolution": "1024", "gradient_checkpointing": True, "optimizer_type": "AdamW8bit"},
    "24 GB": {"resolution": "1024", "gradient_checkpointing": True},
}
_SDXL_MAX_RANK = {"6 GB": 4}
# What a tier gives up for SDXL beyond memory switches, said after the preset's guidance
_SDXL_TIER_ADVICE = {
    "6 GB": ("On 6 GB, SDXL trains at 640 px (its native size is 1024) and rank 4 at most, so that a tenth of the card "
             "stays free for the desktop: details finer than that resolution and rank are not learnt. On a card with "
             "nothing else on it, 768 px and rank 8 fit too (type them in)."),
}


def unet_only_tier(tier: str, sdxl: bool) -> bool:
    """Whether the tier gives up the text encoders' training (SDXL below 16 GB)."""
    return bool(sdxl and SDXL_TIERS.get(tier, {}).get("network_train_unet_only"))


def max_rank(tier: str, sdxl: bool) -> int | None:
    """The highest rank the tier fits (SDXL on 6 GB: 4), None where any rank does."""
    return _SDXL_MAX_RANK.get(tier) if sdxl else None


def sdxl_resolution(tier: str) -> int:
    """The side SDXL trains at on the tier: its native 1024 px, 640 on 6 GB."""
    return int(SDXL_TIERS.get(tier, SDXL_TIERS[NO_TIER])["resolution"])


def tier_gib(tier: str) -> float | None:
    """The card size a VRAM tier names ("8 GB" → 8), None for no limit."""
    return float(tier.split()[0]) if tier in VRAM_TIERS else None


def without_tier_switches(options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A preset file's options less the switches of the GPU memory tier it was exported at (files the Train tab
    exported before 2026-12-05 carried them, and they would override the tier the form fills now), and the names of
    those left out; the options as they are where every switch of no tier is there with its value. Of the tiers that
    match, the one with the most switches (SDXL's 12 GB holds SD 1.5's 8 GB and more)."""
    matches = []
    for tier in VRAM_TIERS:
        for sdxl in (True, False):
            switches = {**VRAM_TIERS[tier], **({k: v for k, v in SDXL_TIERS[tier].items() if k != "resolution"}
                                               if sdxl else {})}
            if all(name in options and options[name] == value for name, value in switches.items()):
                matches.append(switches)
    if not matches:
        return options, []
    switches = max(matches, key=len)
    return {name: value for name, value in options.items() if name not in switches}, sorted(switches)


def guidance(preset: str, tier: str = NO_TIER, sdxl: bool = False) -> str:
    """The preset's strength guidance, and what the tier gives up on the base model."""
    return " ".join(filter(None, [PRESETS[preset].guidance, _SDXL_TIER_ADVICE.get(tier, "") if sdxl else ""]))


def preset_options(preset: str, tier: str = NO_TIER, sdxl: bool = False) -> dict[str, Any]:
    """The preset's options with the VRAM tier's switches merged on top (tier wins)."""
    if preset not in PRESETS:
        raise UserError(f"preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if tier != NO_TIER and tier not in VRAM_TIERS:
        raise UserError(f"VRAM tier {tier!r}: choose one of {NO_TIER}, {', '.join(VRAM_TIERS)}")
    options = dict(PRESETS[preset].options)
    if tier != NO_TIER:
        options.update(VRAM_TIERS[tier])
    if sdxl:
        options.update(SDXL_TIERS[tier])
        if options.get("cache_text_encoder_outputs"):  # the presets' shuffled tags would be refused with it
            for name in VARYING_CAPTION_OPTIONS:
                options.pop(name, None)
        rank = max_rank(tier, sdxl)
        if rank and options["network_dim"] > rank:  # alpha with it, keeping the preset's alpha/dim scale
            options["network_alpha"] = options["network_alpha"] * rank / options["network_dim"]
            options["network_dim"] = rank
        options.pop("clip_skip", None)  # SDXL keeps its encoders' layers: sd-scripts and the WebUI ignore it there
        if options.get("mixed_precision") == "fp16":
            options["no_half_vae"] = True  # SDXL's VAE overflows in fp16: NaN latents, black samples
    if options.get("network_train_unet_only"):
        options.pop("text_encoder_lr", None)
    return options


# --- our own preset files --------------------------------------------------------------------------------------

@dataclass
class PresetFile:
    title: str
    options: dict[str, Any]
    preferred_weight: float = 1.0
    guidance: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def write_preset_file(preset: PresetFile, path: str | Path) -> Path:
    """``[preset]`` (title, weight, guidance) and ``[options]`` (sd-scripts names) in one TOML."""
    unknown = sorted(k for k in preset.options if k not in FIELDS)
    if unknown:
        raise UserError(f"preset {preset.title!r}: unknown option(s) {', '.join(unknown)}")
    data = {"preset": {"title": preset.title, "preferred_weight": preset.preferred_weight, "guidance": preset.guidance},
            "options": {k: v for k, v in preset.options.items() if v is not None}}
    return write_text(Path(path), toml_text.dumps(data))


def read_preset_file(path: str | Path) -> PresetFile:
    path = Path(path)
    data = toml_text.loads(read_utf8(path, "Preset file"), f"Preset file {path}")
    if not isinstance(data.get("options"), dict):
        raise UserError(f"Preset file {path}: no [options] table; export a preset from the Train tab to see the layout")
    head = data.get("preset", {})
    options_from({**data["options"], "pretrained_model_name_or_path": "-", "train_data_dir": "-"}, f"preset file {path}")
    return PresetFile(str(head.get("title", path.stem)), data["options"], float(head.get("preferred_weight", 1.0)),
                      str(head.get("guidance", "")))


# --- Kohya TOML ----------------------------------------------------------------------------------------------

def import_kohya_toml(path: str | Path, notes: list[str] | None = None) -> dict[str, Any]:
    """A Kohya ``--config_file`` (args, tables flattened) or the Kohya GUI's saved settings (``.json``) → option
    values; ``notes`` gain what the file holds that is not carried over. A dataset config (``[[datasets]]``)
    instead becomes ``dataset_config = path``, as sd-scripts takes it."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return read_config_file(path, notes)
    raw = toml_text.loads(read_utf8(path, "Config file"), f"Config file {path}")
    if "datasets" in raw:
        from ..dataset.config import read_config_file as read_dataset_config

        read_dataset_config(path)
        return {"dataset_config": str(path.resolve())}
    return read_config_file(path, notes)


def export_kohya_toml(values: dict[str, Any], path: str | Path) -> Path:
    """The run as a TOML sd-scripts' ``--config_file`` reads (only what differs from the defaults), with the switches
    it must be told for the checkpoint (``--v2`` for an SD2 file: it detects none of them)."""
    options = _checked(values)
    return write_config(dataclasses.replace(options, **told_by_checkpoint(options)[1]), path)


def sd_scripts_command(values: dict[str, Any], sdxl: bool = False) -> tuple[str, list[str]]:
    """"Show the equivalent sd-scripts command": the line, for the checkpoint's script and told what sd-scripts does
    not detect (as ``--print-kohya-command``), and what ``--print-kohya-command`` says beside it."""
    script, told = for_sd_scripts(_checked(values), "sdxl_train_network.py" if sdxl else "train_network.py")
    return kohya_command(told, script), [*sd_scripts_notes(told, script), *kohya_command_notes(told, script)]


def _checked(values: dict[str, Any]) -> TrainOptions:
    return options_from({k: v for k, v in values.items() if v is not None}, "training options")
