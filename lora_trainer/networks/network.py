"""A trainable network on a model: which layers get a module, with what rank, and saving it the way sd-scripts does.

The network is an ``nn.ModuleDict`` keyed by Kohya names, so its state dict *is* the file's tensor dict.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import torch
from safetensors.torch import save as serialize
from torch import nn

from ..errors import UserError
from ..safe_io import save_safetensors
from .lr_groups import block_lr_weights, parameter_groups
from .modules import NetworkModule, layer_and_weight, norm_function
from .files import NetworkFile, match_network
from .lycoris_presets import targeted
from .naming import NORM, Target, model_components, model_targets
from .registry import has_kernel
from .spec import NetworkSpec

# sd-scripts' block-wise lists: 25 entries for SD1/SD2 (IN00-IN11, MID, OUT00-OUT11), 23 for SDXL
# (0 time/label embedding, 1-9 input blocks, 10-12 middle block parts, 13-21 output blocks, 22 out).
BLOCK_COUNT = {"diffusers": 25, "sgm": 23}


def block_index(target: Target, naming: str) -> int | None:
    """The target's position in sd-scripts' ``block_dims`` list; None for text encoders and the layers outside the
    blocks (time embedding, the last conv: LyCORIS presets)."""
    if target.is_text_encoder:
        return None
    match = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)", target.module)
    if match is None:
        return None
    kind, number = match.group(1), int(match.group(2))
    sgm = naming == "sgm"
    if kind == "middle_block":
        return 10 + number if sgm else 12
    return {"input_blocks": 1 if sgm else 0, "output_blocks": 13}[kind] + number


def layer_options(spec: NetworkSpec, target: Target, weight: torch.Tensor) -> NetworkSpec:
    """The network's options for one layer: a LyCORIS preset's block maps may give it its own algorithm, rank …"""
    if spec.lycoris is None or not spec.lycoris.chooses(target):
        return spec
    return spec.for_layer(spec.lycoris.options(target), has_kernel(weight.shape))


def _rank_and_alpha(target: Target, weight: torch.Tensor, spec: NetworkSpec, naming: str) -> tuple[int, float]:
    """sd-scripts' rule: Linear and 1×1 convs use dim/alpha, k×k convs conv_dim/conv_alpha. In its block mode
    (``spec.per_block``) a UNet layer takes its block's entry of each list given (conv_block_alphas only with
    conv_block_dims); without it the lists are not read."""
    is_kxk = has_kernel(weight.shape)
    if is_kxk:
        dim, alpha = spec.conv_dim or 0, 1.0 if spec.conv_alpha is None else spec.conv_alpha
        dims, alphas = spec.conv_block_dims, spec.conv_block_alphas if spec.conv_block_dims is not None else None
    else:
        dims, alphas, dim, alpha = spec.block_dims, spec.block_alphas, spec.dim, spec.alpha
    index = block_index(target, naming) if spec.per_block else None
    if index is None:
        return dim, alpha
    for values in (dims, alphas):
        if values is not None and len(values) != BLOCK_COUNT[naming]:
            raise UserError(f"network_args block lists need {BLOCK_COUNT[naming]} values for this model, got {len(values)}")
    return dims[index] if dims is not None else dim, alphas[index] if alphas is not None else alpha


def block_lr_weights_for(config, spec: NetworkSpec) -> list[float] | None:
    """sd-scripts' per-block learning-rate multipliers from network_args (SD: mid is one block, SDXL: three)."""
    sgm = config.lora_unet_naming == "sgm"
    per_side = len(config.unet.channel_mult) * (config.unet.num_res_blocks + 1)
    return block_lr_weights(dict(spec.network_args), per_side, 3 if sgm else 1, sgm)


def _changed_forward(module: NetworkModule, layer: nn.Module, layer_forward):
    """The layer's forward with ``module``'s change: a closure, not a ``functools.partial``, because dynamo before
    torch 2.2 (the WebUI's 2.1) cannot call a partial and would cut a ``--torch_compile`` graph at every layer."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return module.layer_output(layer, layer_forward, x)
    return forward


class LoRANetwork(nn.ModuleDict):
    """Trainable modules by Kohya name; ``apply_to`` makes each its layer's forward, ``remove`` restores the layers."""

    def __init__(self, spec: NetworkSpec, modules: dict[str, NetworkModule], components: dict[str, nn.Module], config=None):
        super().__init__(modules)
        self.spec = spec
        self.config = config
        self._components = components
        self._handles: list = []

    def parameter_groups(self, learning_rate: float, text_encoder_lr: float | None = None, unet_lr: float | None = None) -> list[dict]:
        """Optimizer groups as sd-scripts makes them (text encoder / UNet rates, block rates, LoRA+)."""
        unet_plus, te_plus = self.spec.loraplus_ratios()
        weights = block_lr_weights_for(self.config, self.spec) if self.config is not None else None
        naming = self.config.lora_unet_naming if self.config is not None else "diffusers"
        return parameter_groups(self, learning_rate, text_encoder_lr, unet_lr, weights,
                                lambda m: block_index(m.target, naming), unet_plus, te_plus)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """What the network file stores, by ``<Kohya name>.<suffix>`` (a module's trained scalar folded in)."""
        return {f"{name}.{key}": tensor for name, module in self.items() for key, tensor in module.file_tensors().items()}

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.values():
            if module.multiplier != multiplier:  # called every batch: setting a module attribute is not free
                module.multiplier = multiplier

    def apply_to(self) -> LoRANetwork:
        self.remove()
        for module in self.values():
            target = module.target
            layer = self._components[target.component].get_submodule(target.module)
            if target.rows is not None:
                index = target.rows[0] // (target.rows[1] - target.rows[0])
                layer.in_projection_adapters[index] = module.changed_output
                self._handles.append((layer.in_projection_adapters, index))
            else:  # the layer's forward replaced, as sd-scripts does: a hook could not skip the base product
                self._handles.append((layer, layer.__dict__.get("forward")))
                layer.forward = _changed_forward(module, layer, layer.forward)
        return self

    def remove(self) -> None:
        for holder, previous in reversed(self._handles):
            if isinstance(holder, dict):  # a fused in-projection's adapters, by index
                holder.pop(previous, None)
            elif previous is None:
                del holder.forward  # the class's forward again
            else:
                holder.forward = previous
        self._handles.clear()

    def text_encoder_modules(self) -> list[NetworkModule]:
        return [m for m in self.values() if m.target.is_text_encoder]

    def unet_modules(self) -> list[NetworkModule]:
        return [m for m in self.values() if not m.target.is_text_encoder]


def create_network(config, unet: nn.Module | None, text_encoders, spec: NetworkSpec,
                   train_unet: bool = True, train_text_encoder: bool = True) -> LoRANetwork:
    """Modules on every target sd-scripts would give one, text encoders first (sd-scripts' saving order)."""
    components = model_components(config, unet, text_encoders)
    targets = model_targets(config, unet if train_unet else None, text_encoders if train_text_encoder else None)
    lr_weights = block_lr_weights_for(config, spec)
    modules = {}
    for name, target in targets.items():
        if not targeted(target, spec.lycoris, spec.with_convs, spec.train_norm):
            continue
        index = block_index(target, config.lora_unet_naming)
        if lr_weights is not None and index is not None and lr_weights[index] == 0:
            continue  # sd-scripts: a block with learning rate 0 gets no module at all
        layer, weight, conv = layer_and_weight(target, components[target.component])
        bias = getattr(layer, target.bias or "", None)
        if target.group == NORM:
            modules[name] = NetworkModule.fresh_norm(target, weight, bias is not None, spec, norm_function(layer))
            continue
        layer_spec = layer_options(spec, target, weight)
        rank, alpha = _rank_and_alpha(target, weight, layer_spec, config.lora_unet_naming)
        if rank <= 0:
            continue
        if layer_spec.algorithm == "dylora" and rank % layer_spec.unit:
            raise UserError(f"{name}: DyLoRA's rank {rank} is not a multiple of its unit (block_size) "
                            f"{layer_spec.unit}: change network_dim or the unit")
        stored_shape = None
        if config.kohya_conv_projections and target.module.endswith(("proj_in", "proj_out")) and weight.dim() == 2:
            stored_shape = torch.Size((*weight.shape, 1, 1))
        bias_shape = None if bias is None else torch.Size((weight.shape[0],))  # a fused q/k/v's rows: its part
        modules[name] = NetworkModule.fresh(target, weight, conv, rank, alpha, layer_spec, stored_shape, bias_shape)
    if not modules:
        raise UserError("the network has no module: train the UNet or a text encoder, and give network_dim > 0")
    return LoRANetwork(spec, modules, components, config)


def network_from_file(config, unet: nn.Module | None, text_encoders, network: NetworkFile, spec: NetworkSpec | None = None) -> LoRANetwork:
    """A file's modules applied to the model (unmerged: preview, or training on from ``--network_weights``).

    Any algorithm works; modules come out under their Kohya names whatever naming the file used.
    """
    components = model_components(config, unet, text_encoders)
    targets = model_targets(config, unet, text_encoders)
    report = match_network(network, targets, lambda t: layer_and_weight(t, components[t.component])[1], config.label)
    if not report.ok:
        raise UserError(report.message())
    modules = {}
    for match in report.matched:
        layer, weight, conv = layer_and_weight(match.target, components[match.target.component])
        layer_spec = layer_options(spec, match.target, weight) if spec is not None else None
        modules[match.target.name] = NetworkModule(match.target, weight, conv, match.tensors, layer_spec, norm_function(layer))
    return LoRANetwork(spec or NetworkSpec(), modules, components, config)


# --- saving ----------------------------------------------------------------------------------------------------


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` (sha256 of the tensor-data section) and ``sshs_legacy_hash`` (8 hex of the sha256 of
    bytes 1 MiB … 1 MiB + 64 KiB of the file serialised with only the ss_* metadata), as sd-scripts computes them."""
    data = serialize(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(data[8 + header :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
    }


# sd-scripts' names for each config (sai_model_spec.determine_architecture, get_model_version_str_for_sd1_sd2): only
# SD2 has an architecture of its own for v-prediction; an SDXL file must keep its sdxl_ version whatever it predicts,
# since the WebUI tells SDXL networks by that prefix
MODELSPEC_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd1-v": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                          "sd2-v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base",
                          "sdxl-v": "stable-diffusion-xl-v1-base"}
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd1-v": "sd_v1_v", "sd2": "sd_v2", "sd2-v": "sd_v2_v", "sdxl": "sdxl_base_v1-0",
                      "sdxl-v": "sdxl_base_v1-0"}


def base_metadata(config, spec: NetworkSpec, title: str, resolution: tuple[int, int] | None = None) -> dict[str, str]:
    """The keys every network file needs to be recognised (sd-scripts' ``--no_metadata`` minimum + modelspec)."""
    v2 = config.name.startswith("sd2")
    width, height = resolution or (config.resolution, config.resolution)
    metadata = {
        "ss_v2": str(v2),
        "ss_base_model_version": BASE_MODEL_VERSION[config.name],
        "ss_network_module": spec.network_module,
        "ss_network_dim": str(spec.dim),
        "ss_network_alpha": str(float(spec.alpha)),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[config.name] + "/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if config.lora_unet_naming == "sgm" else "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if config.prediction_type == "v_prediction" else "epsilon",
    }
    if spec.metadata_args() is not None:
        metadata["ss_network_args"] = spec.metadata_args()
    return metadata


SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "float": torch.float32}


def save_network(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str], dtype: str = "fp16") -> Path:
    """Write a network file atomically with sd-scripts' hashes added; floating tensors saved as ``dtype``."""
    if dtype not in SAVE_DTYPES:
        raise UserError(f"save precision {dtype!r} is not one of {', '.join(SAVE_DTYPES)}")
    cast = {k: (v.detach().to("cpu", SAVE_DTYPES[dtype]) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in tensors.items()}
    metadata = {**metadata, **kohya_hashes(cast, metadata)}
    return save_safetensors(cast, path, metadata)
