"""CLIP text encoders: OpenAI CLIP ViT-L/14 (SD1, SDXL te1) and OpenCLIP ViT-H / ViT-bigG (SD2, SDXL te2).

Two parameter layouts, each the one its checkpoints use: ``hf_clip`` (``text_model.encoder.layers.N.self_attn.q_proj``,
as SD1 files store transformers' CLIPTextModel) and ``open_clip`` (``transformer.resblocks.N.attn.in_proj_weight``,
as SD2/SDXL files store OpenCLIP). Both compute the same pre-norm causal transformer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .common import CheckpointedModel

LAYOUTS = ("hf_clip", "open_clip")
ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class TextEncoderConfig:
    layout: str = "hf_clip"  # "hf_clip" | "open_clip"
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"  # OpenAI CLIP: quick_gelu; OpenCLIP ViT-H/bigG: gelu
    projection_dim: int | None = None
    eos_id: int = 49407

    def __post_init__(self):
        # A typo here would otherwise build the other layout (or the other activation) without a word.
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown text encoder layout {self.layout!r}: use one of {', '.join(LAYOUTS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown text encoder activation {self.activation!r}: use one of {', '.join(ACTIVATIONS)}")


CLIP_VIT_L = TextEncoderConfig()
OPENCLIP_VIT_H = TextEncoderConfig(layout="open_clip", width=1024, layers=24, heads=16, mlp_width=4096,
                                   activation="gelu", projection_dim=1024)
OPENCLIP_VIT_BIGG = TextEncoderConfig(layout="open_clip", width=1280, layers=32, heads=20, mlp_width=5120,
                                      activation="gelu", projection_dim=1280)


LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature; SD never uses it, but files carry it


class TextEncoderOutput(NamedTuple):
    hidden: torch.Tensor  # [B, 77, width]: the states the UNet attends to
    pooled: torch.Tensor  # [B, projection or width]: the sentence vector (SDXL's y, CLIP's text embedding)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _activation(name: str):
    return quick_gelu if name == "quick_gelu" else F.gelu


def first_eos_positions(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of the first end-of-text token in each row (prompts may be padded with more EOS); 0 if there is none."""
    return (input_ids == eos_id).int().argmax(dim=-1)


def pool_at_eos(states: torch.Tensor, input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The state at the first end-of-text token of each row, as transformers and sd-scripts pool."""
    return states[torch.arange(states.shape[0], device=states.device), first_eos_positions(input_ids, eos_id)]


# --- the shared forward ------------------------------------------------------------------------------------


class TextTransformer(CheckpointedModel):
    """The shared forward: embed, run every layer, keep the requested one, pool from the last."""

    layout: str  # the config layout whose names this class stores
    config: TextEncoderConfig

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        if config.layout != self.layout:
            raise ValueError(f"{type(self).__name__} stores the {self.layout} layout, but the config asks for {config.layout}")
        self.config = config

    def _embed(self, input_ids):  # pragma: no cover - defined by each layout
        raise NotImplementedError

    def _layers(self) -> nn.ModuleList:  # pragma: no cover
        raise NotImplementedError

    def _final_norm(self, x):  # pragma: no cover
        raise NotImplementedError

    def _project(self, pooled):  # pragma: no cover
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, skip_layers: int = 0, final_norm: bool = True) -> TextEncoderOutput:
        """``skip_layers=0``: output of the last layer; 1: the penultimate (the WebUI's "clip skip 2"), …

        ``pooled`` always comes from the last layer (final norm, first EOS, projection), whatever is skipped:
        that is what SDXL was trained with and what transformers returns.
        """
        layers = self._layers()
        if not 0 <= skip_layers < len(layers):
            raise ValueError(
                f"clip skip out of range: skip_layers={skip_layers}, but this text encoder has {len(layers)} layers "
                f"(0 <= skip_layers < {len(layers)})"
            )
        keep = len(layers) - skip_layers
        x = self._embed(input_ids)
        hidden = x
        for index, layer in enumerate(layers):  # no start=: dynamo before torch 2.4 breaks the graph on it
            x = self.run_block(layer, x)
            if index + 1 == keep:
                hidden = x
        last = self._final_norm(x)
        if final_norm:
            hidden = last if skip_layers == 0 else self._final_norm(hidden)
        pooled = self._project(pool_at_eos(last, input_ids, self.config.eos_id))
        return TextEncoderOutput(hidden, pooled)


# --- hf_clip layout ----------------------------------------------------------------------------------------


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)
        self.activation = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width)
        self.self_attn = CLIPAttention(config.width, config.heads)
        self.layer_norm2 = nn.LayerNorm(config.width)
        self.mlp = CLIPMLP(config.width, config.mlp_width, config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)
        # Persistent because SD1 checkpoints carry it; int64, which .to(dtype) leaves alone.
        # (torch.arange on the meta device would import torch's symbolic-shape machinery: empty, then fill when real)
        position_ids = torch.empty(1, config.max_positions, dtype=torch.int64)
        if not position_ids.is_meta:
            position_ids[0] = torch.arange(config.max_positions)
        self.register_buffer("position_ids", position_ids, persistent=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width)


class CLIPTextModel(TextTransformer):
    """transformers' CLIPTextModel(WithProjection) layout: ``text_model.*`` (+ ``text_projection`` Linear)."""

    layout = "hf_clip"

    def __init__(self, config: TextEncoderConfig):
        super().__init__(config)
        self.text_model = CLIPTextTransformer(config)
        has_projection = config.projection_dim is not None
        self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False) if has_projection else None

    def _embed(self, input_ids):
        return self.text_model.embeddings(input_ids)

    def _layers(self):
        return self.text_model.encoder.layers

    def _final_norm(self, x):
        return self.text_model.final_layer_norm(x)

    def _project(self, pooled):
        return pooled if self.text_projection is None else self.text_projection(pooled)


# --- open_clip layout --------------------------------------------------------------------------------------


class OpenCLIPAttention(nn.Module):
    """nn.MultiheadAttention's parameters (fused ``in_proj_weight`` [3C, C]), computed through our attention()."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        if self.in_proj_weight.device.type != "meta":
            nn.init.xavier_uniform_(self.in_proj_weight)
            nn.init.zeros_(self.in_proj_bias)
        # Trainable networks on q, k or v (index 0, 1, 2): Kohya names them q_proj/k_proj/v_proj, which are rows
        # of the fused projection here. Each maps (input, part) to the changed part. Not a module: not saved.
        self.in_projection_adapters: dict[int, object] = {}

    def in_projection(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one place q, k and v are made."""
        parts = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if not self.in_projection_adapters:
            return parts
        return tuple(self.in_projection_adapters[i](x, part) if i in self.in_projection_adapters else part
                     for i, part in enumerate(parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(attention(*self.in_projection(x), self.heads, causal=True))


class OpenCLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, mlp_width)
        self.c_proj = nn.Linear(mlp_width, width)
        self.activation = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width)
        self.attn = OpenCLIPAttention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width)
        self.mlp = OpenCLIPMLP(config.width, config.mlp_width, config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))


class OpenCLIPTextModel(TextTransformer):
    """OpenCLIP's text tower: ``token_embedding``, ``positional_embedding``, ``transformer.resblocks``, ``ln_final``.

    ``text_projection`` ([width, projection], applied as ``x @ P``) exists only when ``projection_dim`` is set;
    ``logit_scale`` always, since SD2/SDXL files carry it although nothing here uses it.
    """

    layout = "open_clip"

    def __init__(self, config: TextEncoderConfig):
        super().__init__(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.max_positions, config.width))
        self.transformer = OpenCLIPTransformer(config)
        self.ln_final = nn.LayerNorm(config.width)
        if config.projection_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(config.width, config.projection_dim))
        else:
            self.register_parameter("text_projection", None)
        self.logit_scale = nn.Parameter(torch.empty(()))
        if self.positional_embedding.device.type != "meta":
            nn.init.normal_(self.positional_embedding, std=0.01)
            if self.text_projection is not None:
                nn.init.normal_(self.text_projection, std=config.width**-0.5)
            nn.init.constant_(self.logit_scale, LOGIT_SCALE_INIT)

    def _embed(self, input_ids):
        return self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]

    def _layers(self):
        return self.transformer.resblocks

    def _final_norm(self, x):
        return self.ln_final(x)

    def _project(self, pooled):
        return pooled if self.text_projection is None else pooled @ self.text_projection


_MODEL_CLASSES = {"hf_clip": CLIPTextModel, "open_clip": OpenCLIPTextModel}


def build_text_encoder(config: TextEncoderConfig) -> TextTransformer:
    return _MODEL_CLASSES[config.layout](config)


# --- transformers naming -----------------------------------------------------------------------------------
#
# transformers' names are always handled in their on-disk form, ``text_model.*`` (+ ``text_projection.weight``):
# Diffusers folders, Kohya's LoRA names and CLIPTextModelWithProjection use it. transformers 5 drops that level
# from a bare CLIPTextModel's state dict, so such names are given it back on the way in.

_POSITION_IDS = "text_model.embeddings.position_ids"  # a buffer: rebuilt, never converted
_BARE_CLIP_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
_HF_LAYER_PARTS = ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                   "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_OPEN_CLIP_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


class _Tensor(NamedTuple):
    """One of our tensors and the transformers tensor(s) it is made of."""

    ours: str
    theirs: tuple[str, ...]
    how: str = "same"  # "same" | "transposed" (Linear weight vs x @ P) | "stacked" (q, k, v fused along dim 0)


def _tensor_table(config: TextEncoderConfig) -> list[_Tensor]:
    """Every converted tensor of ``config``'s model; buffers and ``logit_scale`` are handled apart."""
    if config.layout == "hf_clip":
        names = [
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            *(f"text_model.encoder.layers.{i}.{part}.{kind}"
              for i in range(config.layers) for part in _HF_LAYER_PARTS for kind in ("weight", "bias")),
            "text_model.final_layer_norm.weight",
            "text_model.final_layer_norm.bias",
        ]
        if config.projection_dim is not None:
            names.append("text_projection.weight")
        return [_Tensor(name, (name,)) for name in names]

    table = [
        _Tensor("token_embedding.weight", ("text_model.embeddings.token_embedding.weight",)),
        _Tensor("positional_embedding", ("text_model.embeddings.position_embedding.weight",)),
    ]
    for i in range(config.layers):
        hf, ours = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            table += [_Tensor(f"{ours}{our_part}.{kind}", (f"{hf}{hf_part}.{kind}",))
                      for hf_part, our_part in _OPEN_CLIP_LAYER_PARTS.items()]
            table.append(_Tensor(f"{ours}attn.in_proj_{kind}",
                                 tuple(f"{hf}self_attn.{p}_proj.{kind}" for p in "qkv"), "stacked"))
    table += [
        _Tensor("ln_final.weight", ("text_model.final_layer_norm.weight",)),
        _Tensor("ln_final.bias", ("text_model.final_layer_norm.bias",)),
    ]
    if config.projection_dim is not None:
        table.append(_Tensor("text_projection", ("text_projection.weight",), "transposed"))
    return table


def _with_text_model_level(name: str) -> str:
    return "text_model." + name if name.startswith(_BARE_CLIP_ROOTS) else name


def _check_names(given, known: set[str], needed: set[str], config: TextEncoderConfig, side: str) -> None:
    """Refuse names we do not know (a vision tower, another layout) before reporting missing ones."""
    unexpected = sorted(set(given) - known)
    if unexpected:
        raise ValueError(
            f"unexpected tensor names for the {config.layout} layout text encoder in {side} naming "
            f"({len(unexpected)}, e.g. {', '.join(unexpected[:3])}): not this layout's CLIP text encoder"
        )
    missing = sorted(needed - set(given))
    if missing:
        raise ValueError(
            f"missing tensors for the {config.layout} layout text encoder with {config.layers} layers in {side} naming "
            f"({len(missing)}, e.g. {', '.join(missing[:3])})"
        )


def text_encoder_from_transformers(state_dict: dict[str, torch.Tensor], config: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel(WithProjection) state dict, bare or under ``text_model.``, in our layout."""
    state = {_with_text_model_level(k): v for k, v in state_dict.items()}
    table = _tensor_table(config)
    needed = {name for entry in table for name in entry.theirs}
    optional = {_POSITION_IDS} | ({"logit_scale"} if config.layout == "open_clip" else set())
    _check_names(state, needed | optional, needed, config, "transformers")

    converted = {}
    for entry in table:
        parts = [state[name] for name in entry.theirs]
        if entry.how == "stacked":
            converted[entry.ours] = torch.cat(parts)
        elif entry.how == "transposed":
            converted[entry.ours] = parts[0].T.contiguous()
        else:
            converted[entry.ours] = parts[0]
    if config.layout == "hf_clip":
        # Old files store float position ids (76.9999…) that index the wrong row once cast: rebuild the exact range.
        converted[_POSITION_IDS] = torch.arange(config.max_positions, dtype=torch.int64).unsqueeze(0)
    else:
        dtype = converted["token_embedding.weight"].dtype
        converted["logit_scale"] = state.get("logit_scale", torch.tensor(LOGIT_SCALE_INIT, dtype=dtype)).reshape(())
    return converted


def text_encoder_to_transformers(state_dict: dict[str, torch.Tensor], config: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """Our layout in transformers' on-disk names (``text_model.*``), without ``position_ids`` or ``logit_scale``."""
    table = _tensor_table(config)
    needed = {entry.ours for entry in table}
    optional = {_POSITION_IDS} if config.layout == "hf_clip" else {"logit_scale"}
    _check_names(state_dict, needed | optional, needed, config, "our")

    converted = {}
    for entry in table:
        tensor = state_dict[entry.ours]
        if entry.how == "stacked":
            # Cloned so the three are separate tensors: safetensors refuses to save views of one storage.
            converted.update({name: part.clone() for name, part in zip(entry.theirs, tensor.chunk(len(entry.theirs)))})
        elif entry.how == "transposed":
            converted[entry.theirs[0]] = tensor.T.contiguous()
        else:
            converted[entry.theirs[0]] = tensor
    return converted
