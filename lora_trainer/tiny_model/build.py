"""Build our tiny base model on CPU: synthetic shapes -> tiny VAE -> tiny SD1-layout UNet + CLIP text encoder.

The result is a single-file SD1 checkpoint (fp16, about 13 MB) with SD1.5's block structure (4 levels, 2 ResBlocks
each, attention on the first three, a CLIP text encoder with the full vocabulary), so every code path that loads,
samples, trains and names LoRAs for SD1 runs on it unchanged. Seeded: the same
settings give the same file on the same torch version.

    python -m lora_trainer build-tiny-model [--out FILE] [--quick]
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.checkpoint import ARCHITECTURE_METADATA_KEY, architecture_overrides
from ..models.configs import SD1, ModelConfig
from ..models.prompt import tokenize_prompt
from ..models.text_encoders import build_text_encoder
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNetModel
from ..models.vae import AutoencoderKL, VAEConfig
from ..safe_io import save_safetensors
from .shapes import random_scene, render, training_caption

TINY_MODEL_PATH = Path(__file__).resolve().parents[1] / "assets" / "tiny-sd" / "tiny-sd.safetensors"
EMBEDDED_TITLE = "tiny-sd (embedded demo model)"  # its title in the standalone app's checkpoint list


def bundled_model(name: str | Path | None) -> Path | None:
    """The bundled tiny model's file where ``name`` is one of its names: ``tiny-sd``, or its title in the app's list
    (a job posted over the API names it so); None for anything else, and for a file or folder of that name here."""
    text = str(name).strip() if name is not None else ""
    if text.lower() not in ("tiny-sd", EMBEDDED_TITLE) or Path(text).exists():
        return None
    return TINY_MODEL_PATH


def tiny_config(scaling_factor: float = 1.0) -> ModelConfig:
    """SD1's topology (4 levels, 2 ResBlocks each, attention on the first three) at toy widths, 64x64 pixels."""
    slot = SD1.text_encoders[0]
    text_encoder = dataclasses.replace(slot.config, width=32, layers=2, heads=2, mlp_width=128)
    return dataclasses.replace(
        SD1,
        unet=dataclasses.replace(SD1.unet, model_channels=32, channel_mult=(1, 2, 2, 3), context_dim=32, num_heads=4),
        text_encoders=(dataclasses.replace(slot, config=text_encoder),),
        vae=dataclasses.replace(SD1.vae, base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1, scaling_factor=scaling_factor),
        resolution=64,
    )


def tiny_like(config: ModelConfig) -> ModelConfig:
    """``config``'s layout (linear projections, OpenCLIP encoders, label embedding) at the tiny model's widths."""
    unet = dataclasses.replace(tiny_config().unet, use_linear_projection=config.unet.use_linear_projection, num_heads=4, head_dim=None,
                               context_dim=32 * len(config.text_encoders),
                               adm_in_channels=None if config.unet.adm_in_channels is None else 32 + 6 * 256)
    slots = tuple(dataclasses.replace(slot, config=dataclasses.replace(slot.config, width=32, layers=2, heads=2, mlp_width=64,
                                                                       projection_dim=32 if slot.config.projection_dim else None),
                                      kohya_layers=1 if slot.kohya_layers else None)
                  for slot in config.text_encoders)
    return dataclasses.replace(config, unet=unet, text_encoders=slots, resolution=64)


@dataclass
class BuildSettings:
    seed: int = 0
    images: int = 3000
    vae_steps: int = 1200
    vae_batch: int = 24
    unet_steps: int = 6000
    unet_batch: int = 48
    lr_vae: float = 1e-3
    lr_unet: float = 1e-3

    @classmethod
    def quick(cls) -> BuildSettings:
        """A few steps of each stage: proves the script runs, not that the model is good."""
        return cls(images=64, vae_steps=3, vae_batch=8, unet_steps=3, unet_batch=8)


def _log(message: str) -> None:
    print(f"[build-tiny-model] {message}", flush=True)


def _image_bank(settings: BuildSettings, size: int):
    rng = random.Random(settings.seed)
    scenes = [random_scene(rng) for _ in range(settings.images)]
    pixels = np.stack([np.asarray(render(scene, size), dtype=np.float32) for scene in scenes])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1
    return scenes, images


def _cosine(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(config: VAEConfig, images: torch.Tensor, settings: BuildSettings) -> AutoencoderKL:
    vae = AutoencoderKL(config).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr_vae, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    for step in range(settings.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_vae * _cosine(step, settings.vae_steps)
        batch = images[torch.randint(len(images), (settings.vae_batch,), generator=generator)]
        posterior = vae.encode(batch)
        reconstruction = vae.decode(posterior.sample(generator))
        kl = 0.5 * (posterior.mean.square() + posterior.logvar.exp() - 1 - posterior.logvar).mean()
        loss = F.mse_loss(reconstruction, batch) + 0.5 * F.l1_loss(reconstruction, batch) + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == settings.vae_steps - 1:
            _log(f"vae step {step + 1}/{settings.vae_steps} loss {loss.item():.4f}")
    return vae.eval()


@torch.no_grad()
def encode_bank(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(images[i : i + 256]).mean for i in range(0, len(images), 256)])


def train_unet(config: ModelConfig, latents: torch.Tensor, scenes, settings: BuildSettings):
    torch.manual_seed(settings.seed + 2)
    unet = UNetModel(config.unet).train()
    text_encoder = build_text_encoder(config.text_encoders[0].config).train()
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr_unet, weight_decay=1e-2)
    alphas_cumprod = config.schedule.alphas_cumprod
    tokenizer = CLIPTokenizer.default()
    slot = config.text_encoders[0]
    rng = random.Random(settings.seed + 3)
    generator = torch.Generator().manual_seed(settings.seed + 4)
    token_cache: dict[str, list[int]] = {}

    def tokens(caption: str) -> list[int]:
        if caption not in token_cache:
            token_cache[caption] = tokenize_prompt(caption, tokenizer, pad_id=slot.pad_id).tokens[0]
        return token_cache[caption]

    for step in range(settings.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_unet * _cosine(step, settings.unet_steps)
        index = torch.randint(len(latents), (settings.unet_batch,), generator=generator)
        x0 = latents[index]
        if rng.random() < 0.5:
            x0 = x0.flip(-1)  # shapes are symmetric and captions say nothing of left or right
        ids = torch.tensor([tokens(training_caption(scenes[i], rng)) for i in index.tolist()])
        timesteps = torch.randint(0, config.schedule.num_timesteps, (len(index),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = text_encoder(ids, skip_layers=slot.skip_layers, final_norm=slot.final_norm).hidden
        loss = F.mse_loss(unet(noisy, timesteps, context), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 250 == 0 or step == settings.unet_steps - 1:
            _log(f"unet step {step + 1}/{settings.unet_steps} loss {loss.item():.4f}")
    return unet.eval(), text_encoder.eval()


def build(out: str | Path = TINY_MODEL_PATH, settings: BuildSettings | None = None) -> Path:
    settings = settings or BuildSettings()
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    config = tiny_config()
    scenes, images = _image_bank(settings, config.resolution)
    _log(f"{len(images)} synthetic images of {config.resolution}x{config.resolution}")

    vae = train_vae(config.vae, images, settings)
    latents = encode_bank(vae, images)
    scaling_factor = float(1.0 / latents.std())  # as SD chose 0.18215: unit-variance latents for the UNet
    config = dataclasses.replace(config, vae=dataclasses.replace(config.vae, scaling_factor=scaling_factor))
    _log(f"latent scaling factor {scaling_factor:.5f}")

    unet, text_encoder = train_unet(config, latents * scaling_factor, scenes, settings)
    seconds = time.perf_counter() - started

    state = {}
    for prefix, module in [
        (config.unet_prefix, unet),
        (config.text_encoders[0].prefix, text_encoder),
        (config.vae_prefix, vae),
    ]:
        state.update({prefix + key: value for key, value in module.state_dict().items()})
    return save_tiny_model(out, state, config, settings, seconds)


def save_tiny_model(out, state, config: ModelConfig, settings: BuildSettings, seconds: float) -> Path:
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    metadata = {
        ARCHITECTURE_METADATA_KEY: json.dumps(architecture_overrides(config)),
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.title": "lora-trainer tiny shapes model",
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "lora_trainer.build": json.dumps({**dataclasses.asdict(settings), "seconds": round(seconds), "torch": torch.__version__}),
    }
    path = save_safetensors(tensors, out, metadata)
    _log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {seconds / 60:.1f} min")
    return path
