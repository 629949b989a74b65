"""Noise, timesteps, targets and loss weights of a training step, as sd-scripts computes them, as pure functions.

Every random draw takes an explicit ``torch.Generator``, so a seeded run is reproducible bit for bit on CPU and a
resumed run continues the same stream.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _randn(shape, generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(like.device, like.dtype)


def _rand(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, device=generator.device))


def pyramid_noise(noise: Tensor, generator: torch.Generator, iterations: int, discount: float) -> Tensor:
    """Multi-resolution noise: upsampled coarse noise added level by level, then rescaled to unit variance."""
    batch, channels, height, width = noise.shape
    for i in range(iterations):
        r = _rand(generator) * 2 + 2  # each level shrinks by a random factor in [2, 4)
        h, w = max(1, int(height / r**i)), max(1, int(width / r**i))
        coarse = _randn((batch, channels, h, w), generator, noise)
        noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**i
        if h == 1 or w == 1:
            break
    return noise / noise.std()


def training_noise(latents: Tensor, generator: torch.Generator, noise_offset: float | None = None,
                   noise_offset_random_strength: bool = False, adaptive_noise_scale: float | None = None,
                   multires_noise_iterations: int | None = None, multires_noise_discount: float = 0.3) -> Tensor:
    """The noise a step adds to its latents (sd-scripts: offset noise, adaptive offset, then pyramid noise)."""
    noise = _randn(latents.shape, generator, latents)
    if noise_offset:
        offset: float | Tensor = noise_offset * (_rand(generator) if noise_offset_random_strength else 1.0)
        if adaptive_noise_scale is not None:
            offset = torch.clamp(offset + adaptive_noise_scale * latents.mean(dim=(2, 3), keepdim=True).abs(), min=0.0)
        noise = noise + offset * _randn((latents.shape[0], latents.shape[1], 1, 1), generator, latents)
    if multires_noise_iterations:  # on top of the offset, as sd-scripts does both
        noise = pyramid_noise(noise, generator, multires_noise_iterations, multires_noise_discount)
    return noise


def perturbed_input(noise: Tensor, generator: torch.Generator, ip_noise_gamma: float | None = None,
                    random_strength: bool = False) -> Tensor:
    """The noise the input is noised with: ``noise`` plus input perturbation (``ip_noise_gamma``); the target stays
    ``noise``."""
    if not ip_noise_gamma:
        return noise
    gamma = ip_noise_gamma * (float(_rand(generator)) if random_strength else 1.0)
    return noise + gamma * _randn(noise.shape, generator, noise)


def sample_timesteps(batch: int, generator: torch.Generator, num_timesteps: int, min_timestep: int | None = None,
                     max_timestep: int | None = None) -> Tensor:
    low = 0 if min_timestep is None else min_timestep
    high = num_timesteps if max_timestep is None else max_timestep
    if low == high:
        return torch.full((batch,), low, dtype=torch.long)
    return torch.randint(low, high, (batch,), generator=generator, device=generator.device).long().cpu()


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.to(like.device, like.dtype).view(-1, *(1,) * (like.dim() - 1))


def add_noise(latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """DDPM forward process: √ᾱ·x0 + √(1−ᾱ)·ε."""
    abar = alphas_cumprod[timesteps]
    return _per_sample(abar.sqrt(), latents) * latents + _per_sample((1 - abar).sqrt(), latents) * noise


def velocity(latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The v-prediction target: √ᾱ·ε − √(1−ᾱ)·x0."""
    abar = alphas_cumprod[timesteps]
    return _per_sample(abar.sqrt(), latents) * noise - _per_sample((1 - abar).sqrt(), latents) * latents


def huber_threshold(timesteps: Tensor, schedule: str, c: float, scale: float, alphas_cumprod: Tensor) -> Tensor:
    if schedule == "constant":
        return torch.full(timesteps.shape, c * scale)
    if schedule == "exponential":
        return torch.exp(-(-math.log(c) / len(alphas_cumprod)) * timesteps.float()) * scale
    if schedule == "snr":
        abar = alphas_cumprod[timesteps]
        sigma = ((1 - abar) / abar).sqrt()
        return (1 - c) / (1 + sigma) ** 2 + c
    raise ValueError(f"huber schedule {schedule!r} is not one of constant, exponential, snr")


def elementwise_loss(prediction: Tensor, target: Tensor, loss_type: str, huber_c: Tensor | None = None) -> Tensor:
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    c = _per_sample(huber_c, prediction)
    if loss_type == "huber":
        return 2 * c * (torch.sqrt((prediction - target) ** 2 + c**2) - c)
    if loss_type == "smooth_l1":
        return 2 * (torch.sqrt((prediction - target) ** 2 + c**2) - c)
    raise ValueError(f"loss type {loss_type!r} is not one of l1, l2, huber, smooth_l1")


def masked(loss: Tensor, masks: Tensor | None) -> Tensor:
    """sd-scripts' ``apply_masked_loss``: the [B, H, W] pixel masks area-averaged to the latent grid, multiplied in
    (the mean over the image then counts masked-out latents as zero loss, as sd-scripts does)."""
    if masks is None:
        return loss
    grid = F.interpolate(masks[:, None].to(loss), size=loss.shape[2:], mode="area")
    return loss * grid


def loss_weights(timesteps: Tensor, all_snr: Tensor, v_prediction: bool, min_snr_gamma: float | None = None,
                 scale_v_pred_loss_like_noise_pred: bool = False, v_pred_like_loss: float | None = None,
                 debiased_estimation_loss: bool = False) -> Tensor:
    """Per-sample multipliers of the loss, applied in sd-scripts' order. ``all_snr``: the SNR of every timestep the
    weights read (``NoiseSchedule.loss_weighting_snr``, sd-scripts' ``all_snr``).

    ``v_pred_like_loss`` (loss + k·loss/scale) is a multiplier too: 1 + k/scale.
    """
    s = all_snr[timesteps].float()
    weight = torch.ones_like(s)
    if min_snr_gamma:
        clipped = torch.minimum(s, torch.full_like(s, min_snr_gamma))
        # at an SNR of 0 min(snr, γ)/snr → 1 (its limit), not 0/0
        weight = weight * (clipped / (s + 1) if v_prediction else torch.where(s > 0, clipped / s.clamp(min=1e-30), 1.0))
    capped = torch.minimum(s, torch.full_like(s, 1000.0))
    like_noise = capped / (capped + 1)
    if scale_v_pred_loss_like_noise_pred:
        weight = weight * like_noise
    if v_pred_like_loss:
        weight = weight * (1 + v_pred_like_loss / like_noise)
    if debiased_estimation_loss:
        weight = weight * (1 / (capped + 1) if v_prediction else 1 / capped.sqrt())
    return weight
