"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), with the original LDM parameter names.

``AutoencoderKL().state_dict()`` keys equal a single-file checkpoint's ``first_stage_model.*`` keys with the prefix
stripped, so weights load without renaming. SD1, SD2 and SDXL share the architecture; they differ only in the
``scaling_factor`` that brings latents to roughly unit variance for the UNet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .common import CheckpointedModel, Conv2d, PointwiseConv2d


@dataclass(frozen=True)
class VAEConfig:
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one level per entry; every level but the last halves the size
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for every Stable Diffusion VAE)."""
        return 2 ** (len(self.channel_mult) - 1)


SD_VAE = VAEConfig()
SDXL_VAE = VAEConfig(scaling_factor=0.13025)


# --- the posterior ----------------------------------------------------------------------------------------


class DiagonalGaussian:
    """q(z|x): a Gaussian with diagonal covariance, from the encoder's [mean | logvar] channels."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # LDM clamps so that exp() can neither overflow nor underflow to an all-zero std.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Noise drawn in fp32 so one seed gives the same latents whatever the VAE's precision.
        device = generator.device if generator is not None else self.mean.device  # a CPU generator serves a GPU VAE
        return self.sample_with(torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32))

    def sample_with(self, noise: torch.Tensor) -> torch.Tensor:
        """mean + std · noise, for noise drawn elsewhere (e.g. for a whole batch of which these are some rows)."""
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean


# --- blocks -----------------------------------------------------------------------------------------------


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a skip (a 1x1 ``nin_shortcut`` when the width changes); no time embedding."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = PointwiseConv2d(in_channels, out_channels) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1-conv projections as in LDM."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = PointwiseConv2d(channels, channels)
        self.k = PointwiseConv2d(channels, channels)
        self.v = PointwiseConv2d(channels, channels)
        self.proj_out = PointwiseConv2d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = [conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v)]
        h = attention(q, k, v, heads=1)
        h = h.transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding only right and bottom: LDM's asymmetric padding, which the weights expect."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock - AttnBlock - ResnetBlock at the lowest resolution (``mid.block_1``, ``attn_1``, ``block_2``)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, h: torch.Tensor, run_block=None) -> torch.Tensor:
        run = run_block or _call
        for block in (self.block_1, self.attn_1, self.block_2):
            h = run(block, h)
        return h


class Level(nn.Module):
    """One resolution of the encoder (``down.N``) or decoder (``up.N``): res blocks, then an optional resampler.

    LDM gives every level an ``attn`` list; it is empty in every Stable Diffusion VAE, so it is left out (it
    holds no parameters, and the state-dict names stay the same).
    """

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    @property
    def resample(self) -> nn.Module | None:
        return getattr(self, self.resample_name, None)

    def forward(self, h: torch.Tensor, run_block=None) -> torch.Tensor:
        run = run_block or _call
        for block in self.block:
            h = run(block, h)
        resample = self.resample
        return resample(h) if resample is not None else h


def _call(block, *args):
    return block(*args)


class Encoder(nn.Module):
    """Image -> [mean | logvar] of the latent, 2**(levels-1) times smaller per side."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        groups, levels = config.norm_groups, len(config.channel_mult)
        widths = [config.base_channels * m for m in config.channel_mult]
        self.conv_in = Conv2d(config.in_channels, config.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        channels = config.base_channels
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(channels, width, groups))
                channels = width
            downsample = Downsample(channels) if level != levels - 1 else None
            self.down.append(Level(blocks, downsample, "downsample"))
        self.mid = MidBlock(channels, groups)
        self.norm_out = _group_norm(channels, groups)
        self.conv_out = Conv2d(channels, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, run_block=None) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h, run_block)
        h = self.mid(h, run_block)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image. ``up`` is indexed like ``down`` (``up.0`` is full resolution) and run from the last index."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        groups, levels = config.norm_groups, len(config.channel_mult)
        widths = [config.base_channels * m for m in config.channel_mult]
        channels = widths[-1]
        self.conv_in = Conv2d(config.z_channels, channels, 3, padding=1)
        self.mid = MidBlock(channels, groups)
        up = []
        for level in reversed(range(levels)):
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(channels, widths[level], groups))
                channels = widths[level]
            upsample = Upsample(channels) if level != 0 else None
            up.insert(0, Level(blocks, upsample, "upsample"))
        self.up = nn.ModuleList(up)
        self.norm_out = _group_norm(channels, groups)
        self.conv_out = Conv2d(channels, config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, run_block=None) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid(h, run_block)
        for level in reversed(self.up):
            h = level(h, run_block)
        return self.conv_out(F.silu(self.norm_out(h)))


# --- the model --------------------------------------------------------------------------------------------


class AutoencoderKL(CheckpointedModel):
    """Encodes images in [-1, 1] to the latents the UNet works on, and decodes them back."""

    def __init__(self, config: VAEConfig = SD_VAE):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """Images (B, 3, H, W) in [-1, 1] -> the posterior over raw (unscaled) latents."""
        moments = self.encoder(images.to(self.dtype), self.run_block)
        return DiagonalGaussian(self.quant_conv(moments))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw (unscaled) latents -> images, roughly in [-1, 1] but not clamped."""
        return self.decoder(self.post_quant_conv(z.to(self.dtype)), self.run_block)

    def encode_latents(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """Images in [-1, 1] -> latents as the UNet sees them: a posterior sample (or its mean), shifted and scaled."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet-space latents -> images clamped to [-1, 1]."""
        z = latents.to(self.dtype) / self.config.scaling_factor + self.config.shift_factor
        return self.decode(z).clamp(-1.0, 1.0)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction through a posterior sample (what the VAE is trained on)."""
        return self.decode(self.encode(images).sample(generator))


# --- state-dict conversion --------------------------------------------------------------------------------

_DIFFUSERS_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # diffusers < 0.15 (still inside many .bin VAEs)
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_DIFFUSERS_TOP = {
    "conv_norm_out": "norm_out",
    "mid_block.resnets.0": "mid.block_1",
    "mid_block.resnets.1": "mid.block_2",
}
_LDM_ATTENTION_WEIGHT = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_LDM_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def vae_from_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to our (LDM) names; linear attention weights become 1x1 convs.

    Diffusers numbers the decoder's ``up_blocks`` in execution order (lowest resolution first); LDM numbers
    ``decoder.up`` by resolution like the encoder, so the decoder index is reversed. The level count is read off
    the keys, so any depth converts without a config.
    """
    decoder_levels = 1 + max(
        (int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1
    )
    converted = {}
    for key, tensor in state_dict.items():
        new_key = _convert_diffusers_vae_key(key, decoder_levels)
        if _LDM_ATTENTION_WEIGHT.match(new_key) and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        converted[new_key] = tensor
    return converted


def _convert_diffusers_vae_key(key: str, decoder_levels: int) -> str:
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        raise KeyError(f"unexpected diffusers VAE key {key!r}")
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(.*)$", rest):
        kind, index, tail = m.groups()
        level = int(index) if kind == "down" else decoder_levels - 1 - int(index)
        tail = re.sub(r"^resnets\.(\d+)\.", r"block.\1.", tail)
        tail = re.sub(r"^(downsamplers|upsamplers)\.0\.", lambda s: s.group(1)[:-2] + ".", tail)
        rest = f"{kind}.{level}.{tail}"
    elif m := re.match(r"mid_block\.attentions\.0\.(.*)\.(weight|bias)$", rest):
        name, param = m.groups()
        if name not in _DIFFUSERS_ATTENTION:
            raise KeyError(f"unexpected diffusers VAE key {key!r}")
        rest = f"mid.attn_1.{_DIFFUSERS_ATTENTION[name]}.{param}"
    else:
        for old, new in _DIFFUSERS_TOP.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
    rest = rest.replace(".conv_shortcut.", ".nin_shortcut.")
    return f"{part}.{rest}"


def vae_layout(keys) -> str | None:
    """"diffusers" or "ldm" for a VAE's tensor names (the ``first_stage_model.`` prefix taken off), None for
    anything else: read from a file's header, before its tensors."""
    keys = [k.removeprefix("first_stage_model.") for k in keys]
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in keys):
        return "ldm"
    return None


def normalize_vae_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring a standalone VAE file's tensors to our keys, whatever layout it was saved in.

    Accepted: LDM keys with the ``first_stage_model.`` prefix (e.g. a whole checkpoint), LDM keys without it
    (``*.vae.safetensors``/``.vae.pt``; training leftovers such as ``loss.*`` and ``model_ema.*`` are dropped),
    and diffusers ``AutoencoderKL`` keys. A ``.pt`` pickle's outer ``{"state_dict": …}`` is unwrapped.
    """
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    keys = list(state_dict)
    layout = vae_layout(keys)
    if layout == "diffusers":
        try:
            return vae_from_diffusers({k: v for k, v in state_dict.items() if k.startswith(_LDM_PARTS)})
        except KeyError as error:
            raise ValueError(f"diffusers VAE keys with an unknown part: {error.args[0]}") from error
    if layout == "ldm":
        converted = {}
        for key, tensor in state_dict.items():
            if not key.startswith(_LDM_PARTS):
                continue
            if _LDM_ATTENTION_WEIGHT.match(key) and tensor.ndim == 2:  # saved by a tool that kept linear attention
                tensor = tensor.reshape(*tensor.shape, 1, 1)
            converted[key] = tensor
        return converted
    shown = ", ".join(repr(k) for k in sorted(keys)[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    found = f"found {len(keys)} tensors ({shown})" if keys else "found no tensors"
    raise ValueError(
        f"this is not a VAE: {found}; expected original (LDM) VAE keys such as 'encoder.down.0.block.0.conv1.weight' "
        "(optionally prefixed 'first_stage_model.') or diffusers AutoencoderKL keys such as "
        "'encoder.down_blocks.0.resnets.0.conv1.weight'."
    )
