"""SD1.x, SD2.x and SDXL as data: which parts a model has, where they live in a checkpoint, how they are wired.

Every difference between the versions is a field here; the UNet, the text encoders, the sampler and the trainer
read these fields and never ask "is this SDXL?".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..sampling.schedule import NoiseSchedule
from .text_encoders import CLIP_VIT_L, OPENCLIP_VIT_BIGG, OPENCLIP_VIT_H, TextEncoderConfig
from .unet import SD1_UNET, SD2_UNET, SDXL_UNET, UNetConfig
from .vae import SD_VAE, SDXL_VAE, VAEConfig


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a model: its architecture, its checkpoint prefix and which layer feeds the UNet."""

    config: TextEncoderConfig
    prefix: str
    skip_layers: int  # layers skipped from the end at "clip skip 1"; the user's clip skip adds to it
    final_norm: bool  # whether the final layer norm is applied to the hidden states the UNet sees
    pad_id: int  # CLIP-L pads prompts with EOS (the WebUI's id_pad = id_end); the OpenCLIP towers pad with 0
    kohya_name: str  # the LoRA key prefix sd-scripts uses for it: lora_te, lora_te1, lora_te2
    # sd-scripts builds SD2's encoder without the last layer (never used), so Kohya LoRAs name none in it
    kohya_layers: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    name: str  # "sd1" | "sd2" | "sd2-v" | "sdxl"
    label: str  # for people: "SD1", "SD2-v", ...
    unet: UNetConfig
    text_encoders: tuple[TextEncoderSlot, ...]
    vae: VAEConfig
    prediction_type: str = "epsilon"  # or "v_prediction"
    resolution: int = 512  # native training/sampling size
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    unet_prefix: str = "model.diffusion_model."
    # How sd-scripts names this UNet's LoRA modules: after the Diffusers model it trains (SD1/SD2) or after the
    # original SGM model (SDXL). Either way the names are built from our own (original) module names.
    lora_unet_naming: str = "diffusers"  # or "sgm"
    # sd-scripts' SD2 UNet keeps proj_in/proj_out as 1×1 convs, so its LoRA tensors for them are 4-D
    kohya_conv_projections: bool = False
    vae_prefix: str = "first_stage_model."
    # SDXL: sd-scripts and the WebUI keep its encoders' layers whatever the clip skip setting says
    takes_clip_skip: bool = True
    # what --bucket_reso_steps must be a multiple of: sd-scripts' train_network.py asserts 64, sdxl_train_network.py 32
    bucket_step_multiple: int = 64

    @property
    def needs_size_conditioning(self) -> bool:
        return self.unet.adm_in_channels is not None

    def skip_layers(self, slot: TextEncoderSlot, clip_skip: int) -> int:
        """How many final layers of ``slot``'s encoder to leave out at a clip skip setting (1 = as the model was made)."""
        return slot.skip_layers + (clip_skip - 1 if self.takes_clip_skip else 0)

    def with_prediction(self, prediction_type: str) -> ModelConfig:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction type {prediction_type!r} is not one of epsilon, v_prediction")
        if prediction_type == self.prediction_type:
            return self
        family = self.name.removesuffix("-v")
        name = family + ("-v" if prediction_type == "v_prediction" else "")
        label = self.label.removesuffix("-v") + ("-v" if prediction_type == "v_prediction" else "")
        return dataclasses.replace(self, name=name, label=label, prediction_type=prediction_type)


SD1 = ModelConfig(
    name="sd1",
    label="SD1",
    unet=SD1_UNET,
    text_encoders=(TextEncoderSlot(CLIP_VIT_L, "cond_stage_model.transformer.", 0, True, 49407, "lora_te"),),
    vae=SD_VAE,
)

# sd-scripts and the WebUI feed SD2's UNet from OpenCLIP's penultimate layer, after ln_final.
SD2 = ModelConfig(
    name="sd2",
    label="SD2",
    unet=SD2_UNET,
    text_encoders=(TextEncoderSlot(OPENCLIP_VIT_H, "cond_stage_model.model.", 1, True, 0, "lora_te", kohya_layers=23),),
    vae=SD_VAE,
    kohya_conv_projections=True,
)
SD2_V = SD2.with_prediction("v_prediction")

# SDXL: both encoders' penultimate layers, without final norm, concatenated to 768 + 1280 = 2048 channels.
SDXL = ModelConfig(
    name="sdxl",
    label="SDXL",
    unet=SDXL_UNET,
    text_encoders=(
        TextEncoderSlot(CLIP_VIT_L, "conditioner.embedders.0.transformer.", 1, False, 49407, "lora_te1"),
        TextEncoderSlot(OPENCLIP_VIT_BIGG, "conditioner.embedders.1.model.", 1, False, 0, "lora_te2"),
    ),
    vae=SDXL_VAE,
    resolution=1024,
    lora_unet_naming="sgm",
    takes_clip_skip=False,
    bucket_step_multiple=32,
)

FULL_SIZE = {config.name: config for config in (SD1, SD2, SD2_V, SDXL)}
