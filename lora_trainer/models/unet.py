"""The latent-diffusion UNet of SD1.x, SD2.x and SDXL, with the original LDM/SGM parameter names.

Parameter names equal the single-file checkpoint's ``model.diffusion_model.*`` keys (prefix stripped), so the
weights load without renaming and LoRA names derive from the modules themselves. Version differences are data
in ``UNetConfig``; the blocks below never ask which version they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .common import CheckpointedModel, Conv2d, PointwiseConv2d


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # per level; 0 = no attention at that level
    transformer_depth_middle: int = 1
    context_dim: int = 768
    num_heads: int | None = 8  # SD1 fixes the head count ...
    head_dim: int | None = None  # ... SD2/SDXL fix the head width
    use_linear_projection: bool = False  # SD2/SDXL: Linear proj_in/proj_out instead of 1x1 convs
    adm_in_channels: int | None = None  # SDXL: pooled text + size/crop embeddings -> label_emb
    norm_groups: int = 32

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def heads_for(self, channels: int) -> int:
        return self.num_heads if self.num_heads is not None else channels // self.head_dim


SD1_UNET = UNetConfig()
SD2_UNET = UNetConfig(context_dim=1024, num_heads=None, head_dim=64, use_linear_projection=True)
SDXL_UNET = UNetConfig(
    channel_mult=(1, 2, 4),
    transformer_depth=(0, 2, 10),
    transformer_depth_middle=10,
    context_dim=2048,
    num_heads=None,
    head_dim=64,
    use_linear_projection=True,
    adm_in_channels=2816,
)


# --- pure functions ---------------------------------------------------------------------------------------


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def size_conditioning(
    pooled_text: torch.Tensor,
    original_size: tuple[int, int],
    crop_top_left: tuple[int, int],
    target_size: tuple[int, int],
) -> torch.Tensor:
    """SDXL's ``y`` vector: pooled text embedding + 256-d embeddings of (orig h, w, crop top, left, target h, w)."""
    sizes = torch.tensor([*original_size, *crop_top_left, *target_size], device=pooled_text.device)
    size_embedding = timestep_embedding(sizes, 256).flatten()
    size_embedding = size_embedding.to(pooled_text.dtype).expand(pooled_text.shape[0], -1)
    return torch.cat([pooled_text, size_embedding], dim=-1)


# --- blocks -----------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between and a skip connection."""

    def __init__(self, channels: int, out_channels: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = PointwiseConv2d(channels, out_channels) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention; keys and values come from ``context`` (cross) or from ``x`` itself (self)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection gives both the value and its gate."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention on the text, feed-forward; each pre-normed and residual."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Flattens the feature map to tokens, runs ``depth`` transformer blocks, and adds the result back."""

    def __init__(self, channels: int, depth: int, config: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(config.norm_groups, channels, eps=1e-6)
        if config.use_linear_projection:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_in = PointwiseConv2d(channels, channels)
            self.proj_out = PointwiseConv2d(channels, channels)
        self.linear_projection = config.use_linear_projection
        heads = config.heads_for(channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, config.context_dim, heads) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor, run_block=None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context) if run_block is None else run_block(block, h, context)  # "is None": dynamo < 2.2 cannot test a method
        if self.linear_projection:
            h = self.proj_out(h)
        h = h.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        if not self.linear_projection:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # An explicit size keeps latents whose sides are not multiples of 8 aligned with their skip connections.
        if size is None:
            x = F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)
        else:
            x = F.interpolate(x.float(), size=size, mode="nearest").to(x.dtype)
        return self.conv(x)


class UNetStage(nn.ModuleList):
    """One entry of ``input_blocks``/``output_blocks``: [ResBlock | Downsample | conv_in][, SpatialTransformer][, Upsample].

    The numeric child names (``input_blocks.1.0``, ``.1``, ``.2``) are the LDM checkpoint's.
    """


# --- the model --------------------------------------------------------------------------------------------


class UNetModel(CheckpointedModel):
    """Predicts the noise (or v) in a latent from the timestep, the text context and, for SDXL, a vector ``y``."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        mc, emb_dim, groups = config.model_channels, config.time_embed_dim, config.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if config.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(config.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        self.input_blocks = nn.ModuleList([UNetStage([Conv2d(config.in_channels, mc, 3, padding=1)])])
        skip_channels = [mc]
        channels = mc
        levels = len(config.channel_mult)
        for level, mult in enumerate(config.channel_mult):
            depth = config.transformer_depth[level]
            for _ in range(config.num_res_blocks):
                stage = [ResBlock(channels, mc * mult, emb_dim, groups)]
                channels = mc * mult
                if depth:
                    stage.append(SpatialTransformer(channels, depth, config))
                self.input_blocks.append(UNetStage(stage))
                skip_channels.append(channels)
            if level != levels - 1:
                self.input_blocks.append(UNetStage([Downsample(channels)]))
                skip_channels.append(channels)

        self.middle_block = UNetStage(
            [
                ResBlock(channels, channels, emb_dim, groups),
                SpatialTransformer(channels, config.transformer_depth_middle, config),
                ResBlock(channels, channels, emb_dim, groups),
            ]
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            depth = config.transformer_depth[level]
            for index in range(config.num_res_blocks + 1):
                stage = [ResBlock(channels + skip_channels.pop(), mc * mult, emb_dim, groups)]
                channels = mc * mult
                if depth:
                    stage.append(SpatialTransformer(channels, depth, config))
                if level and index == config.num_res_blocks:
                    stage.append(Upsample(channels))
                self.output_blocks.append(UNetStage(stage))

        self.out = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), Conv2d(channels, config.out_channels, 3, padding=1))

    def _run_stage(self, stage: UNetStage, h, emb, context, upsample_size=None):
        for layer in stage:
            if isinstance(layer, ResBlock):
                h = self.run_block(layer, h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, self.run_block)
            elif isinstance(layer, Upsample):
                h = layer(h, upsample_size)
            else:
                h = layer(h)
        return h

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        dtype = self.out[0].weight.dtype  # the last norm's: the compute precision even when weights are fp8 (--fp8_base)
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if self.config.adm_in_channels is not None:
            if y is None:
                raise ValueError("this UNet (SDXL) needs the vector conditioning y: see size_conditioning()")
            emb = emb + self.label_emb(y.to(dtype))
        context = context.to(dtype)

        h = x.to(dtype)
        skips = []
        for stage in self.input_blocks:
            h = self._run_stage(stage, h, emb, context)
            skips.append(h)
        h = self._run_stage(self.middle_block, h, emb, context)
        for stage in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            upsample_size = skips[-1].shape[-2:] if skips else None
            h = self._run_stage(stage, h, emb, context, upsample_size)
        return self.out(h)


# --- Diffusers naming -------------------------------------------------------------------------------------


def _diffusers_unet_name_map(config: UNetConfig) -> dict[str, str]:
    """Module-prefix map diffusers ``UNet2DConditionModel`` → LDM, built from the config's layout."""
    names = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    per_level = config.num_res_blocks + 1
    levels = len(config.channel_mult)
    for level in range(levels):
        for i in range(config.num_res_blocks):
            stage = 1 + level * per_level + i
            names[f"down_blocks.{level}.resnets.{i}"] = f"input_blocks.{stage}.0"
            names[f"down_blocks.{level}.attentions.{i}"] = f"input_blocks.{stage}.1"
        if level != levels - 1:
            names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{(level + 1) * per_level}.0.op"
    for up in range(levels):
        has_attention = config.transformer_depth[levels - 1 - up] > 0
        for i in range(per_level):
            names[f"up_blocks.{up}.resnets.{i}"] = f"output_blocks.{up * per_level + i}.0"
            names[f"up_blocks.{up}.attentions.{i}"] = f"output_blocks.{up * per_level + i}.1"
        if up != levels - 1:
            names[f"up_blocks.{up}.upsamplers.0"] = f"output_blocks.{up * per_level + per_level - 1}.{2 if has_attention else 1}"
    return names


DIFFUSERS_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_from_diffusers(state_dict: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to our (LDM) parameter names."""
    prefixes = _diffusers_unet_name_map(config)
    converted = {}
    for key, tensor in state_dict.items():
        converted[_convert_unet_key(key, prefixes)] = tensor
    return converted


def _convert_unet_key(key: str, prefixes: dict[str, str]) -> str:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            rest = parts[cut:]
            if ".resnets." in head and rest[0] in DIFFUSERS_RESNET_PARTS:
                rest = DIFFUSERS_RESNET_PARTS[rest[0]].split(".") + rest[1:]
            return ".".join([prefixes[head], *rest])
    raise KeyError(f"unexpected diffusers UNet key {key!r}")


def unet_to_diffusers_names(config: UNetConfig) -> dict[str, str]:
    """Module-prefix map LDM → diffusers, for tools that need diffusers-style names (Kohya SD1/SD2 LoRA names)."""
    return {ldm: diffusers for diffusers, ldm in _diffusers_unet_name_map(config).items()}
