"""Which layers a network trains: sd-scripts' LoRA targets, or a LyCORIS preset (``network_args preset=…``).

LyCORIS picks layers by the class of the block that holds them in sd-scripts' own UNet (``Transformer2DModel``,
``ResnetBlock2D``, ``Downsample2D``/``Upsample2D``, ``CrossAttention``, ``TimestepEmbedding``) and by name
(``conv_in``, ``conv_out``, ``time_embedding.linear_1/2``); in a chosen block every Linear and 1×1 conv gets a
module at ``network_dim``, and k×k convs at ``conv_dim`` only where the preset enables convolutions. sd-scripts'
SDXL UNet has neither a ``TimestepEmbedding`` class nor those names, so on SDXL the embedding and in/out layers are
never chosen. Text encoders: ``CLIPAttention`` (q/k/v/out) and ``CLIPMLP`` (fc1/fc2). Presets as in lycoris-lora
4.1.3 (``lycoris/config.py``); its ``ia3`` preset names layers by patterns that match nothing in SD models, and
preset files are not read.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .naming import ATTENTION, CONV, OTHER, UNET, Target

TRANSFORMER, ATTENTION_ONLY, RESNET = "transformer", "attention", "resnet"  # UNet blocks
TIME_EMBEDDING, IN_OUT = "time_embedding", "conv_in/out"  # SD1/SD2 UNet layers chosen by name
TE_ATTENTION, TE_MLP = "attention", "mlp"


@dataclass(frozen=True)
class Preset:
    unet: frozenset[str]
    unet_layers: frozenset[str]
    text_encoder: frozenset[str]
    convs: bool  # k×k convolutions get modules (at conv_dim, LyCORIS's default: network_dim)


_TE = frozenset({TE_ATTENTION, TE_MLP})
LYCORIS_PRESETS = {
    "full": Preset(frozenset({TRANSFORMER, RESNET}), frozenset({TIME_EMBEDDING, IN_OUT}), _TE, True),
    "full-lin": Preset(frozenset({TRANSFORMER, RESNET}), frozenset({TIME_EMBEDDING}), _TE, False),
    "attn-mlp": Preset(frozenset({TRANSFORMER}), frozenset({TIME_EMBEDDING}), _TE, False),
    "attn-only": Preset(frozenset({ATTENTION_ONLY}), frozenset(), frozenset({TE_ATTENTION}), False),
    "unet-only": Preset(frozenset({TRANSFORMER, RESNET}), frozenset({TIME_EMBEDDING, IN_OUT}), frozenset(), True),
    "unet-transformer-only": Preset(frozenset({TRANSFORMER}), frozenset({TIME_EMBEDDING}), frozenset(), False),
    "unet-convblock-only": Preset(frozenset({RESNET}), frozenset({IN_OUT}), frozenset(), True),
}
LYCORIS_DEFAULT = "full"

# our (original checkpoint) paths of the layers LyCORIS chooses by name on sd-scripts' SD1/SD2 UNet
_NAMED_LAYERS = {"time_embed.0": TIME_EMBEDDING, "time_embed.2": TIME_EMBEDDING, "input_blocks.0.0": IN_OUT,
                 "out.2": IN_OUT}


def lycoris_preset(name: str) -> Preset:
    if name not in LYCORIS_PRESETS:
        raise UserError(f"network_args preset={name}: use one of {', '.join(LYCORIS_PRESETS)} (LyCORIS's built-in "
                        "presets; preset files and the ia3 preset are not supported)")
    return LYCORIS_PRESETS[name]


def targeted(target: Target, preset: str | None, with_convs: bool, naming: str) -> bool:
    """Whether ``target`` gets a module: sd-scripts' LoRA (attention blocks and text encoders, plus the ResBlock and
    sampler layers with ``conv_dim``) when ``preset`` is None, else the LyCORIS preset's choice."""
    if preset is None:
        return target.group == ATTENTION or (target.group == CONV and with_convs)
    chosen = LYCORIS_PRESETS[preset]
    if target.component != UNET:
        part = TE_ATTENTION if "_self_attn_" in target.name else TE_MLP
        return target.group == ATTENTION and part in chosen.text_encoder
    if target.group == ATTENTION:
        in_attention = ".attn1." in target.module or ".attn2." in target.module
        return TRANSFORMER in chosen.unet or (ATTENTION_ONLY in chosen.unet and in_attention)
    if target.group == CONV:
        return RESNET in chosen.unet
    if target.group == OTHER and naming != "sgm":
        return _NAMED_LAYERS.get(target.module) in chosen.unet_layers
    return False
