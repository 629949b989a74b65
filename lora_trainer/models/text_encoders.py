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
        self.register_buffer("position_ids", torch.arange(config.max_positions).unsqueeze(0), persistent=True)

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


class TextTransformer(CheckpointedModel):
    """The shared forward: embed, run every layer, keep the requested one, pool from the last."""

    config: TextEncoderConfig

    def _embed(self, input_ids):  # pragma: no cover - defined by each layout
        raise NotImplementedError

    def _layers(self) -> nn.ModuleList:  # pragma: no cover
        raise NotImplementedError

    def _final_norm(self, x):  # pragma: no cover
        raise NotImplementedError

    def _project(self, pooled):
        return pooled

    def forward(self, input_ids: torch.Tensor, skip_layers: int = 0, final_norm: bool = True) -> TextEncoderOutput:
        """``skip_layers=0``: output of the last layer; 1: the penultimate (the WebUI's "clip skip 2"), …"""
        layers = self._layers()
        if not 0 <= skip_layers < len(layers):
            raise ValueError(f"cannot skip {skip_layers} of {len(layers)} text encoder layers")
        x = self._embed(input_ids)
        keep = len(layers) - skip_layers
        hidden = None
        for index, layer in enumerate(layers, start=1):
            x = self.run_block(layer, x)
            if index == keep:
                hidden = x
        if final_norm:
            hidden = self._final_norm(hidden)
        pooled = self._project(pool_at_eos(self._final_norm(x), input_ids, self.config.eos_id))
        return TextEncoderOutput(hidden, pooled)


class CLIPTextModel(TextTransformer):
    """transformers' CLIPTextModel(WithProjection) layout: ``text_model.*`` (+ ``text_projection`` Linear)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    def _embed(self, input_ids):
        return self.text_model.embeddings(input_ids)

    def _layers(self):
        return self.text_model.encoder.layers

    def _final_norm(self, x):
        return self.text_model.final_layer_norm(x)

    def _project(self, pooled):
        return self.text_projection(pooled) if self.config.projection_dim is not None else pooled


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

    def in_projection(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one place q, k and v are made: Kohya LoRAs name them separately (q_proj/k_proj/v_proj) and hook here."""
        return F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)

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
    """OpenCLIP's text tower: ``token_embedding``, ``positional_embedding``, ``transformer.resblocks``, ``ln_final``."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.max_positions, config.width))
        self.transformer = OpenCLIPTransformer(config)
        self.ln_final = nn.LayerNorm(config.width)
        self.text_projection = nn.Parameter(torch.empty(config.width, config.projection_dim or config.width))
        self.logit_scale = nn.Parameter(torch.empty(()))
        if self.positional_embedding.device.type != "meta":
            nn.init.normal_(self.positional_embedding, std=0.01)
            nn.init.normal_(self.text_projection, std=config.width**-0.5)
            nn.init.constant_(self.logit_scale, LOGIT_SCALE_INIT)

    def _embed(self, input_ids):
        return self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]

    def _layers(self):
        return self.transformer.resblocks

    def _final_norm(self, x):
        return self.ln_final(x)

    def _project(self, pooled):
        return pooled @ self.text_projection


def build_text_encoder(config: TextEncoderConfig) -> TextTransformer:
    return CLIPTextModel(config) if config.layout == "hf_clip" else OpenCLIPTextModel(config)


# --- transformers naming -----------------------------------------------------------------------------------

_OPEN_CLIP_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def text_encoder_from_transformers(state_dict: dict[str, torch.Tensor], config: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel(WithProjection) state dict (Diffusers folders' layout) in our layout."""
    if config.layout == "hf_clip":
        converted = {k: v for k, v in state_dict.items() if k.startswith(("text_model.", "text_projection."))}
        converted.setdefault("text_model.embeddings.position_ids", torch.arange(config.max_positions).unsqueeze(0))
        return converted
    converted = {
        "token_embedding.weight": state_dict["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state_dict["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state_dict["text_model.final_layer_norm.weight"],
        "ln_final.bias": state_dict["text_model.final_layer_norm.bias"],
        "logit_scale": state_dict.get("logit_scale", torch.tensor(LOGIT_SCALE_INIT)),
    }
    if "text_projection.weight" in state_dict:
        converted["text_projection"] = state_dict["text_projection.weight"].T.contiguous()
    else:
        converted["text_projection"] = torch.eye(config.width)
    for i in range(config.layers):
        hf, ours = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for hf_part, our_part in _OPEN_CLIP_LAYER_PARTS.items():
            for kind in ("weight", "bias"):
                converted[f"{ours}{our_part}.{kind}"] = state_dict[f"{hf}{hf_part}.{kind}"]
        for kind in ("weight", "bias"):
            converted[f"{ours}attn.in_proj_{kind}"] = torch.cat(
                [state_dict[f"{hf}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
    return converted


def text_encoder_to_transformers(state_dict: dict[str, torch.Tensor], config: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """Our layout back to transformers' names (the inverse of ``text_encoder_from_transformers``)."""
    if config.layout == "hf_clip":
        return dict(state_dict)
    converted = {
        "text_model.embeddings.token_embedding.weight": state_dict["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state_dict["positional_embedding"],
        "text_model.final_layer_norm.weight": state_dict["ln_final.weight"],
        "text_model.final_layer_norm.bias": state_dict["ln_final.bias"],
        "text_projection.weight": state_dict["text_projection"].T.contiguous(),
        "logit_scale": state_dict["logit_scale"],
    }
    for i in range(config.layers):
        hf, ours = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for hf_part, our_part in _OPEN_CLIP_LAYER_PARTS.items():
            for kind in ("weight", "bias"):
                converted[f"{hf}{hf_part}.{kind}"] = state_dict[f"{ours}{our_part}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = state_dict[f"{ours}attn.in_proj_{kind}"].chunk(3)
            converted.update({f"{hf}self_attn.q_proj.{kind}": q, f"{hf}self_attn.k_proj.{kind}": k, f"{hf}self_attn.v_proj.{kind}": v})
    return converted
