"""Diffusers-format model folders (``model_index.json``, ``unet/``, ``text_encoder/``, ``vae/``…), converted on load.

The folder's tensors are renamed to the single-file layout; detection and loading then take the same path as a
``.safetensors`` checkpoint. What names cannot say (head counts, activations, the VAE's scaling factor, eps/v)
comes from the folder's ``config.json`` files as overrides.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from .checkpoint import TensorSource, open_tensors
from .configs import SD1, SD2, SDXL, ModelConfig
from .text_encoders import TextEncoderConfig, text_encoder_from_transformers
from .unet import UNetConfig, unet_from_diffusers
from .vae import vae_from_diffusers

_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "unet" / "config.json").exists()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON ({error}); the Diffusers folder is damaged.") from error


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in _WEIGHT_NAMES:
        if (folder / name).exists():
            source = open_tensors(folder / name)
            return {key: source.get(key) for key in source.keys()}
    raise UserError(f"{folder} holds no weights (looked for {', '.join(_WEIGHT_NAMES[:2])}…).")


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """Diffusers' ``unet/config.json`` as our UNetConfig (its ``attention_head_dim`` means heads for SD1)."""
    widths = list(config["block_out_channels"])
    down_types = config["down_block_types"]
    per_block = config.get("transformer_layers_per_block", 1)
    per_block = per_block if isinstance(per_block, list) else [per_block] * len(widths)
    depths = tuple(d if "CrossAttn" in kind else 0 for d, kind in zip(per_block, down_types))
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    if isinstance(heads, int):
        num_heads, head_dim = heads, None
    else:
        num_heads, head_dim = None, widths[0] // heads[0]
    adm = config.get("projection_class_embeddings_input_dim") if config.get("addition_embed_type") == "text_time" else None
    return UNetConfig(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=config.get("layers_per_block", 2),
        transformer_depth=depths,
        transformer_depth_middle=per_block[-1],
        context_dim=config["cross_attention_dim"],
        num_heads=num_heads,
        head_dim=head_dim,
        use_linear_projection=config.get("use_linear_projection", False),
        adm_in_channels=adm,
        norm_groups=config.get("norm_num_groups", 32),
    )


def _text_encoder_config(config: dict, layout: str) -> TextEncoderConfig:
    activation = config.get("hidden_act", "quick_gelu")
    return TextEncoderConfig(
        layout=layout,
        vocab_size=config.get("vocab_size", 49408),
        max_positions=config.get("max_position_embeddings", 77),
        width=config["hidden_size"],
        layers=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        mlp_width=config["intermediate_size"],
        activation="quick_gelu" if activation == "quick_gelu" else "gelu",
        projection_dim=config.get("projection_dim") if "WithProjection" in str(config.get("architectures", "")) else None,
    )


def diffusers_family(path: Path) -> ModelConfig | None:
    """SD1, SD2 or SDXL: the family a Diffusers folder loads as, from its configs alone (its native size, the LoRAs
    that fit it, told without reading a weight); None for a folder that is not one, or whose UNet config is damaged
    (loading it says what is wrong)."""
    if not is_diffusers_folder(path):
        return None
    try:
        return _family(path, unet_config_from_diffusers(_read_json(path / "unet" / "config.json")))
    except (UserError, KeyError, TypeError):
        return None


def _family(path: Path, unet_config: UNetConfig) -> ModelConfig:
    has_second_encoder = (path / "text_encoder_2" / "config.json").exists()
    return SDXL if has_second_encoder else (SD2 if unet_config.context_dim == 1024 else SD1)


def open_diffusers_folder(path: Path) -> tuple[TensorSource, dict]:
    """The folder's tensors under single-file names, plus the overrides its configs dictate."""
    if not is_diffusers_folder(path):
        raise UserError(f"{path} is a folder but not a Diffusers model (no unet/config.json): give a checkpoint file.")
    unet_config = unet_config_from_diffusers(_read_json(path / "unet" / "config.json"))
    family = _family(path, unet_config)

    tensors = {family.unet_prefix + k: v for k, v in unet_from_diffusers(_read_weights(path / "unet"), unet_config).items()}
    overrides: dict = {
        "unet": {"num_heads": unet_config.num_heads, "head_dim": unet_config.head_dim, "norm_groups": unet_config.norm_groups},
        "text_encoders": [],
    }
    for slot, folder in zip(family.text_encoders, ("text_encoder", "text_encoder_2")):
        te_json = _read_json(path / folder / "config.json")
        if not te_json:
            raise UserError(f"{path / folder} is missing: this {family.label} model needs it.")
        te_config = _text_encoder_config(te_json, slot.config.layout)
        converted = text_encoder_from_transformers(_read_weights(path / folder), te_config)
        tensors.update({slot.prefix + k: v for k, v in converted.items()})
        # Diffusers stores SD2's OpenCLIP encoder as a CLIPTextModel without projection and without the last layer
        # (SD2 reads the penultimate one), so that encoder's own last layer is the one to use
        truncated = slot.config.layout == "open_clip" and te_config.projection_dim is None
        skip = slot.skip_layers - 1 if truncated else slot.skip_layers
        overrides["text_encoders"].append({"heads": te_config.heads, "activation": te_config.activation, "skip_layers": skip})

    vae_json = _read_json(path / "vae" / "config.json")
    if vae_json:
        tensors.update({family.vae_prefix + k: v for k, v in vae_from_diffusers(_read_weights(path / "vae")).items()})
        overrides["vae"] = {"norm_groups": vae_json.get("norm_num_groups", 32), "scaling_factor": vae_json.get("scaling_factor", 0.18215)}

    prediction = _read_json(path / "scheduler" / "scheduler_config.json").get("prediction_type")
    if prediction in ("epsilon", "v_prediction"):
        overrides["prediction_type"] = prediction
    return TensorSource.from_dict(path, tensors), overrides
