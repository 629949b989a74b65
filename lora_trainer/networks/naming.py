"""Which layers of a model a LoRA can target, and every name files on disk use for them.

sd-scripts names a module ``<prefix>_<module path with . → _>``, with the module path of the model *it* trains:
a Diffusers UNet for SD1/SD2, the original SGM UNet for SDXL, transformers' CLIPTextModel for every text encoder.
Our models keep the original checkpoint names (as the WebUI's do), so the Kohya names are built here, once,
from our own module names; the same table answers for the other namings people have on disk (Diffusers/PEFT,
the WebUI's compvis-style names, ComfyUI's SGM names for SD1). Because ``.`` → ``_`` is lossy, names are only
ever built, never parsed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from ..models.configs import ModelConfig
from ..models.text_encoders import CLIPMLP, CLIPAttention, OpenCLIPAttention, OpenCLIPMLP
from ..models.unet import (DIFFUSERS_RESNET_PARTS, GEGLU, BasicTransformerBlock, CrossAttention, Downsample, FeedForward,
                           ResBlock, SpatialTransformer, Upsample, unet_to_diffusers_names)

UNET = "lora_unet"

# Which targets a network covers: "attention" = sd-scripts' default (Transformer blocks and text encoders),
# "conv" = ResBlocks, down- and upsamplers (LoCon, added by ``conv_dim``), "other" = the remaining Linear/Conv2d
# layers (conv_in/out, time and label embeddings: LyCORIS presets), "norm" = norm layers (LyCORIS train_norm).
# We train the first two, as sd-scripts does; files that touch the others still load.
ATTENTION, CONV, OTHER, NORM = "attention", "conv", "other", "norm"
_NORMS = (nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Target:
    """One layer a network may change."""

    name: str  # the Kohya name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    component: str  # "lora_unet" or the text encoder's Kohya prefix (lora_te, lora_te1, lora_te2)
    module: str  # our module path inside that component
    parameter: str = "weight"  # the parameter the delta changes ("in_proj_weight" for OpenCLIP's fused q/k/v)
    bias: str | None = "bias"
    rows: tuple[int, int] | None = None  # the rows of ``parameter`` this target owns (fused q/k/v)
    group: str = ATTENTION
    block: str = "BASE"  # block-weight label as the block-weight extension names it: BASE (text encoders), IN00…, M00, OUT00…
    aliases: frozenset[str] = field(default_factory=frozenset)  # other names files use, in canonical form
    # The model sd-scripts trains, which LyCORIS presets name layers by: this layer's module path there (the Kohya
    # name is the prefix + this path with . → _), and the (class name, module path) of the blocks around it there,
    # outermost first, ending with the layer itself (Linear, Conv2d …).
    sd_scripts_path: str = ""
    sd_scripts_blocks: tuple[tuple[str, str], ...] = ()

    @property
    def is_text_encoder(self) -> bool:
        return self.component != UNET


def canonical(name: str) -> str:
    """A module name in any naming, with the Diffusers/PEFT root prefixes turned into Kohya's and dots into _."""
    for peft_root, kohya in (("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te_"), ("unet.", "lora_unet_")):
        if name.startswith(peft_root):
            name = kohya + name[len(peft_root):]
            break
    return name.replace(".", "_")


def _underscored(path: str) -> str:
    return path.replace(".", "_")


# --- UNet ----------------------------------------------------------------------------------------------------


def _block_label(ldm_path: str) -> str:
    match = re.match(r"(input_blocks|output_blocks)\.(\d+)\.", ldm_path)
    if match:
        return ("IN" if match.group(1) == "input_blocks" else "OUT") + f"{int(match.group(2)):02d}"
    return "M00" if ldm_path.startswith("middle_block.") else ""  # time/label embedding, out: in no block


def _diffusers_path(ldm_path: str, prefixes: dict[str, str]) -> str | None:
    parts = ldm_path.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            rest = ".".join(parts[cut:])
            diffusers = prefixes[head]
            if ".resnets." in diffusers:
                rest = {ldm: name for name, ldm in DIFFUSERS_RESNET_PARTS.items()}.get(rest, rest)
            return ".".join(p for p in (diffusers, rest) if p)
    return None


def _unet_modules(unet: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(path, group, layer) for every Linear/Conv2d and norm layer, grouped by the block that owns it."""
    owners = {}
    for path, module in unet.named_modules():
        if isinstance(module, SpatialTransformer):
            owners[path] = ATTENTION
        elif isinstance(module, (ResBlock, Downsample, Upsample)):
            owners[path] = CONV
    for path, module in unet.named_modules():
        if isinstance(module, _NORMS):
            yield path, NORM, module
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            parts = path.split(".")
            heads = (".".join(parts[:cut]) for cut in range(len(parts) - 1, 0, -1))
            yield path, next((owners[h] for h in heads if h in owners), OTHER), module


# sd-scripts' class names for our UNet blocks (its SD1/SD2 and SDXL UNets name them alike)
_SD_SCRIPTS_UNET_CLASSES = {SpatialTransformer: "Transformer2DModel", BasicTransformerBlock: "BasicTransformerBlock",
                            CrossAttention: "CrossAttention", FeedForward: "FeedForward", GEGLU: "GEGLU",
                            ResBlock: "ResnetBlock2D", Downsample: "Downsample2D", Upsample: "Upsample2D"}


def _sd1_container(source: str, with_attention: set[str]) -> tuple[str, str] | None:
    """The Diffusers down/mid/up block (class, path) that holds a layer of sd-scripts' SD1/SD2 UNet."""
    match = re.match(r"(down_blocks|up_blocks)\.\d+|mid_block", source)
    if match is None:
        return None
    path = match.group(0)
    if path == "mid_block":
        return "UNetMidBlock2DCrossAttn", path
    kind = "Down" if path.startswith("down") else "Up"
    return (f"CrossAttn{kind}Block2D" if path in with_attention else f"{kind}Block2D"), path


def _sd_scripts_unet_blocks(path: str, source: str, blocks: dict[str, str], prefixes: dict[str, str] | None,
                            with_attention: set[str]) -> list[tuple[str, str]]:
    """(class, path) in sd-scripts' UNet of the blocks around the layer at our ``path`` (``source`` there)."""
    found = []
    container = _sd1_container(source, with_attention) if prefixes is not None else None
    if container is not None:
        found.append(container)
    parts = path.split(".")
    for cut in range(1, len(parts)):
        head = ".".join(parts[:cut])
        if head in blocks:
            # a block's own path, or the layer's path less the levels below the block (a sampler's conv: op → conv)
            there = _diffusers_path(head, prefixes) if prefixes is not None else head
            found.append((blocks[head], there or source.rsplit(".", len(parts) - cut)[0]))
    if prefixes is not None and source.startswith("time_embedding."):
        found.append(("TimestepEmbedding", "time_embedding"))  # a class in sd-scripts' SD1/SD2 UNet, not in its SDXL one
    return found


def unet_targets(config: ModelConfig, unet: nn.Module) -> list[Target]:
    prefixes = unet_to_diffusers_names(config.unet)
    blocks = {path: _SD_SCRIPTS_UNET_CLASSES[type(m)] for path, m in unet.named_modules() if type(m) in _SD_SCRIPTS_UNET_CLASSES}
    layers = list(_unet_modules(unet))
    diffusers_paths = {path: _diffusers_path(path, prefixes) for path, _, _ in layers}
    with_attention = {d.split(".attentions.")[0] for d in diffusers_paths.values() if d and ".attentions." in d}
    targets = []
    for path, group, layer in layers:
        diffusers = diffusers_paths[path]
        sgm = f"{UNET}_{_underscored(path)}"
        by_diffusers = f"{UNET}_{_underscored(diffusers)}" if diffusers else None
        by_sgm = config.lora_unet_naming == "sgm" or by_diffusers is None
        name = sgm if by_sgm else by_diffusers
        aliases = {sgm, f"diffusion_model_{_underscored(path)}"}
        if by_diffusers:
            aliases |= {by_diffusers, f"lycoris_{_underscored(diffusers)}"}
        source = path if by_sgm else diffusers
        # sd-scripts' SD1 UNet has 1×1 convolutions where ours has Linear projections
        conv_there = config.kohya_conv_projections and path.endswith(("proj_in", "proj_out"))
        layer_class = "Conv2d" if conv_there else torch_class_name(layer)
        sd_scripts_blocks = _sd_scripts_unet_blocks(path, source, blocks, None if by_sgm else prefixes, with_attention)
        targets.append(Target(name, UNET, path, group=group, block=_block_label(path), aliases=frozenset(aliases - {name}),
                              sd_scripts_path=source, sd_scripts_blocks=(*sd_scripts_blocks, (layer_class, source))))
    return targets


def torch_class_name(layer: nn.Module) -> str:
    """The torch.nn class a layer is (``Linear``, ``Conv2d``, ``GroupNorm`` …), as LyCORIS presets name it, also for our
    subclasses of it (a 1×1 ``PointwiseConv2d``, the ``--fp8_base`` layers)."""
    return next(cls.__name__ for cls in type(layer).__mro__ if cls.__module__.startswith("torch.nn."))


# --- text encoders -------------------------------------------------------------------------------------------

_OPEN_CLIP_TO_HF = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPEN_CLIP_NORMS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2"}


def _text_encoder_modules(encoder: nn.Module) -> Iterator[tuple[str, str, str, tuple[int, int] | None, str]]:
    """(our module path, transformers path, parameter, rows, group) of every Linear sd-scripts targets in a text
    encoder, and of its norm layers."""
    for owner_path, owner in encoder.named_modules():
        if isinstance(owner, nn.LayerNorm):
            if owner_path == "ln_final":
                yield owner_path, "text_model.final_layer_norm", "weight", None, NORM
            elif owner_path.rsplit(".", 1)[-1] in _OPEN_CLIP_NORMS:
                layer = re.search(r"resblocks\.(\d+)\.", owner_path).group(1)
                hf = _OPEN_CLIP_NORMS[owner_path.rsplit(".", 1)[-1]]
                yield owner_path, f"text_model.encoder.layers.{layer}.{hf}", "weight", None, NORM
            else:
                yield owner_path, owner_path, "weight", None, NORM
        elif isinstance(owner, (CLIPAttention, CLIPMLP)):
            for child_path, child in owner.named_children():
                if isinstance(child, nn.Linear):
                    path = f"{owner_path}.{child_path}"
                    yield path, path, "weight", None, ATTENTION
        elif isinstance(owner, OpenCLIPAttention):
            layer = re.search(r"resblocks\.(\d+)\.", owner_path + ".").group(1)
            width = owner.out_proj.in_features
            for index, part in enumerate("qkv"):
                yield (owner_path, f"text_model.encoder.layers.{layer}.self_attn.{part}_proj", "in_proj_weight",
                       (index * width, (index + 1) * width), ATTENTION)
            yield f"{owner_path}.out_proj", f"text_model.encoder.layers.{layer}.self_attn.out_proj", "weight", None, ATTENTION
        elif isinstance(owner, OpenCLIPMLP):
            layer = re.search(r"resblocks\.(\d+)\.", owner_path + ".").group(1)
            for child_path in ("c_fc", "c_proj"):
                hf = _OPEN_CLIP_TO_HF[f"mlp.{child_path}"]
                yield f"{owner_path}.{child_path}", f"text_model.encoder.layers.{layer}.{hf}", "weight", None, ATTENTION


def _sd_scripts_text_encoder_blocks(hf_path: str) -> tuple[tuple[str, str], ...]:
    """(class, path) in transformers' CLIP text model (sd-scripts' for every text encoder) of the blocks around a
    layer. Its attention class is CLIPSdpaAttention or CLIPAttention by transformers' version: both are named."""
    match = re.match(r"(text_model\.encoder\.layers\.\d+)\.(self_attn|mlp)\.", hf_path)
    if not match:
        return ()
    layer, part = match.group(1), f"{match.group(1)}.{match.group(2)}"
    owners = [("CLIPAttention", part), ("CLIPSdpaAttention", part)] if match.group(2) == "self_attn" else [("CLIPMLP", part)]
    return (("CLIPTextTransformer", "text_model"), ("CLIPEncoder", "text_model.encoder"), ("CLIPEncoderLayer", layer), *owners)


def text_encoder_targets(config: ModelConfig, index: int, encoder: nn.Module) -> list[Target]:
    slot = config.text_encoders[index]
    prefix = slot.kohya_name
    # Files for one-encoder models sometimes say lora_te1 (SDXL habits), SDXL files for CLIP-L sometimes lora_te.
    other_prefixes = {"lora_te": ("lora_te1",), "lora_te1": ("lora_te",)}.get(prefix, ())
    # The WebUI's compvis names: SD1 "transformer_text_model…", SDXL "0_transformer_text_model…", OpenCLIP "model_…".
    compvis_root = {"lora_te1": "0_", "lora_te2": "1_"}.get(prefix, "")
    targets = []
    for path, hf_path, parameter, rows, group in _text_encoder_modules(encoder):
        layer = re.search(r"layers\.(\d+)\.", hf_path)
        if slot.kohya_layers is not None and layer and int(layer.group(1)) >= slot.kohya_layers:
            continue
        name = f"{prefix}_{_underscored(hf_path)}"
        aliases = {f"{p}_{_underscored(hf_path)}" for p in other_prefixes}
        if slot.config.layout == "hf_clip":
            aliases.add(f"{compvis_root}transformer_{_underscored(hf_path)}")
        elif rows is None:
            aliases.add(f"{compvis_root}model_{_underscored(path)}")
        bias = "in_proj_bias" if rows else "bias"
        layer_class = "LayerNorm" if group == NORM else "Linear"
        targets.append(Target(name, prefix, path, parameter, bias, rows, group, "BASE", frozenset(aliases), hf_path,
                              (*_sd_scripts_text_encoder_blocks(hf_path), (layer_class, hf_path))))
    return targets


def model_targets(config: ModelConfig, unet: nn.Module | None, text_encoders) -> dict[str, Target]:
    """Every target of a model, by Kohya name. ``unet`` or ``text_encoders`` may be None (not loaded)."""
    targets = []
    for index, encoder in enumerate(text_encoders or ()):
        targets += text_encoder_targets(config, index, encoder)
    if unet is not None:
        targets += unet_targets(config, unet)
    by_name = {t.name: t for t in targets}
    if len(by_name) != len(targets):
        raise AssertionError("two targets share a Kohya name")
    return by_name


def model_components(config: ModelConfig, unet: nn.Module | None, text_encoders) -> dict[str, nn.Module]:
    """Target.component → the module its paths are relative to."""
    components = {UNET: unet} if unet is not None else {}
    components |= {slot.kohya_name: encoder for slot, encoder in zip(config.text_encoders, text_encoders or ())}
    return components


def alias_table(targets: dict[str, Target]) -> dict[str, Target]:
    """Canonical name (any naming) → target; Kohya names win over aliases when both could apply."""
    table = {}
    for target in targets.values():
        for alias in target.aliases:
            table.setdefault(alias, target)
    for target in targets.values():
        table[target.name] = target
    return table
