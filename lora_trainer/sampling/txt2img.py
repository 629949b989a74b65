"""Our own txt2img: prompt -> conditioning -> seeded noise -> sampler -> VAE -> PIL images with WebUI infotext.

Used for samples during training, standalone grids and ``python -m lora_trainer generate``.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..models.checkpoint import StableDiffusion
from ..models.conditioning import encode_prompts
from ..models.prompt import split_extra_networks
from ..models.unet import size_conditioning
from ..errors import UserError
from .samplers import get_sampler, seeded_noise_sampler
from .schedule import cfg_denoiser, make_denoiser


@dataclass
class GenerationSettings:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "Euler a"
    cfg_scale: float = 7.0
    seed: int = -1  # -1: pick one at random (and report it)
    width: int = 512
    height: int = 512
    batch_size: int = 1
    clip_skip: int = 1
    extra_infotext: dict[str, str] = field(default_factory=dict)
    scheduler: str = ""  # the WebUI's "Schedule type" (its samplers name it apart since 1.9); "" = the sampler's own

    def resolved_seed(self) -> int:
        return self.seed if self.seed >= 0 else random.randrange(2**32)


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    infotext: str


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The WebUI's CPU random source: one generator per image, seeded with that image's seed."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def latents_to_images(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] NCHW tensors to 8-bit RGB images."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


@torch.no_grad()
def txt2img(
    model: StableDiffusion,
    settings: GenerationSettings,
    callback: Callable[[int, int], None] | None = None,
    model_info: dict[str, str] | None = None,
) -> list[GeneratedImage]:
    """Generate ``settings.batch_size`` images; image i uses seed ``seed + i`` exactly as the WebUI does."""
    if model.vae is None:
        raise UserError(f"{model.path} has no VAE baked in: give one with --vae FILE to decode images.")
    if settings.width % 8 or settings.height % 8:
        raise UserError(f"image size {settings.width}x{settings.height} must be a multiple of 8 on both sides.")
    try:
        sampler = get_sampler(settings.sampler)
    except ValueError as error:
        raise UserError(str(error)) from error
    config = model.config
    device = next(model.unet.parameters()).device
    dtype = next(model.unet.parameters()).dtype
    seed = settings.resolved_seed()
    count = settings.batch_size

    # one call, so encode_prompts pads prompt and negative prompt to the same number of chunks
    # extra-network tags (<lora:…>) are instructions, not words: the WebUI strips them before encoding too
    prompt, negative = (split_extra_networks(p)[0] for p in (settings.prompt, settings.negative_prompt))
    both = encode_prompts(config, model.text_encoders, [prompt] * count + [negative] * count, settings.clip_skip)
    cond, uncond = both.split(count)

    def unet_conditioning(c):
        arguments = {"context": c.context.to(device, dtype)}
        if config.needs_size_conditioning:
            size = (settings.height, settings.width)
            arguments["y"] = size_conditioning(c.pooled.to(device, dtype), size, (0, 0), size)
        return arguments

    def model_fn(x, timesteps, context, y=None):
        return model.unet(x.to(dtype), timesteps, context, y).float()

    denoise = make_denoiser(model_fn, config.schedule, config.prediction_type)
    guided = cfg_denoiser(denoise, unet_conditioning(cond), unet_conditioning(uncond), settings.cfg_scale)

    latent_shape = (config.unet.in_channels, settings.height // 8, settings.width // 8)
    noise = torch.cat([initial_noise(seed + i, (1, *latent_shape)) for i in range(count)]).to(device)
    sigmas = sampler.sigmas(config.schedule, settings.steps).to(device)
    x = sampler.initial_latent(noise, sigmas)
    progress = (lambda step, total, *_: callback(step, total)) if callback else None
    latents = sampler.function(guided, x, sigmas, noise_sampler=seeded_noise_sampler(x, seed), callback=progress)

    vae_dtype = next(model.vae.parameters()).dtype
    images = latents_to_images(model.vae.decode_latents(latents.to(vae_dtype)))
    info = {**(model_info or {}), **settings.extra_infotext}
    named = dataclasses.replace(settings, sampler=sampler.name)
    return [GeneratedImage(image, seed + i, infotext(named, seed + i, info)) for i, image in enumerate(images)]


def model_infotext(path: Path) -> dict[str, str]:
    """The infotext's ``Model hash`` and ``Model`` of the checkpoint at ``path``, as the WebUI writes them; a Diffusers
    folder, which has no one file to hash, by its name alone."""
    from ..hashing import short_hash

    path = Path(path)
    return {"Model hash": short_hash(path), "Model": path.stem} if path.is_file() else {"Model": path.name}


def infotext(settings: GenerationSettings, seed: int, model_info: dict[str, str]) -> str:
    """The WebUI's ``parameters`` text, so PNG Info, civitai and the X/Y/Z plot read our images like theirs."""
    fields = {
        "Steps": settings.steps,
        "Sampler": settings.sampler,
        "CFG scale": f"{settings.cfg_scale:g}",
        "Seed": seed,
        "Size": f"{settings.width}x{settings.height}",
        **model_info,
        "Clip skip": settings.clip_skip if settings.clip_skip > 1 else None,
    }
    parameters = ", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None)
    lines = [settings.prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    lines.append(parameters)
    return "\n".join(lines)


def write_png(image: Image.Image, path: Path, infotext: str) -> Path:
    """A PNG whose ``parameters`` text chunk holds the WebUI infotext (PNG Info reads it), written atomically."""
    from PIL.PngImagePlugin import PngInfo

    from ..safe_io import atomic_path

    info = PngInfo()
    info.add_text("parameters", infotext)
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG", pnginfo=info)
    return path
