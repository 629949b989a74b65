"""Where our Kohya-named targets live in the WebUI's loaded model.

The WebUI's ``shared.sd_model`` is an LDM/SGM model whose module names are the checkpoint's tensor names
(``model.diffusion_model.*``, ``cond_stage_model.transformer.*``, SDXL ``conditioner.embedders.N.*``), with the
prompt hijack's ``.wrapped`` in between for the text encoders. Our own models use the same names below those
prefixes, so the targets are built once from our model skeleton (on the meta device: no memory) and resolved in
the WebUI's modules. OpenCLIP's fused q/k/v (``nn.MultiheadAttention.in_proj_weight``) is handled by row slices.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..models.checkpoint import build_models, detect_architecture, open_tensors
from ..models.configs import ModelConfig
from ..networks.apply import MergedNetworks
from ..networks.naming import UNET, model_targets


def checkpoint_config(path: Path) -> ModelConfig:
    """The architecture of a checkpoint file, read from its tensor names and shapes (no weights loaded, nothing run).

    Not ``identify``: its eps/v decision may run a test forward of a full SD2 UNet, which would stall the first
    generation after every SD2 load; eps or v changes no layer a LoRA names, and the WebUI has decided it already."""
    return detect_architecture(open_tensors(path))[0]


def merged_networks_for(sd_model: nn.Module, config: ModelConfig) -> tuple[MergedNetworks, list[str]]:
    """A MergedNetworks over the WebUI model's own parameters, and the targets this model does not have."""
    by_name = {name.replace(".wrapped", ""): module for name, module in sd_model.named_modules()}
    unet, text_encoders, _ = build_models(config)
    components = {UNET: by_name.get(config.unet_prefix.rstrip("."))}
    components |= {slot.kohya_name: by_name.get(slot.prefix.rstrip(".")) for slot in config.text_encoders}
    targets, missing = {}, []
    for name, target in model_targets(config, unet, text_encoders).items():
        component = components.get(target.component)
        try:
            module = component.get_submodule(target.module) if component is not None else None
        except AttributeError:
            module = None
        if module is None or not hasattr(module, target.parameter):
            missing.append(name)
        else:
            targets[name] = target
    present = {k: v for k, v in components.items() if v is not None}
    # backups and cached ΔW in RAM, as the built-in keeps its backups: the GPU stays free for generating
    return MergedNetworks(targets, present, config.label, store="cpu"), missing


def sd_version_of_config(config: ModelConfig) -> str:
    """"SD1", "SD2" or "SDXL": the values LoRA metadata is compared with (activation.sd_version_of)."""
    return config.label.removesuffix("-v")
