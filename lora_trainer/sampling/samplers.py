"""Samplers as pure functions over a denoiser, in k-diffusion's form (what the WebUI's samplers are).

Every sampler is ``sampler(denoise, x, sigmas, noise_sampler=None, callback=None) -> x`` where

* ``denoise(x, sigma_batch) -> x0`` (see ``schedule.make_denoiser`` / ``schedule.cfg_denoiser``),
* ``x`` is the starting latent in sigma space (noise times ``sigmas[0]``, see ``SamplerSpec.initial_latent``),
* ``sigmas`` is a descending list ending in 0 (one step per pair), from ``sigmas_for``,
* ``noise_sampler(sigma, sigma_next) -> Tensor`` gives the fresh noise of ancestral steps (``seeded_noise_sampler``),
* ``callback(step, total, x, x0)`` runs after each step with ``step`` counting from 1 to ``total``.

Step coefficients are computed in float64 from the sigma list read once (a single device sync per run).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .schedule import NoiseSchedule, sigmas_ddim, sigmas_karras_for, sigmas_normal

Denoise = Callable[[Tensor, Tensor], Tensor]
NoiseSampler = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, int, Tensor, Tensor], None]
SamplerFunction = Callable[..., Tensor]


def _values(sigmas: Tensor) -> list[float]:
    values = [float(s) for s in torch.as_tensor(sigmas).detach().double().cpu().reshape(-1)]
    if len(values) < 2:
        raise ValueError("a sigma list needs at least two entries (the start and the final 0)")
    return values


def _sigma_batch(x: Tensor, sigma: float) -> Tensor:
    return torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)


def _default_noise(x: Tensor) -> NoiseSampler:
    """Unseeded fallback: torch's global generator (use ``seeded_noise_sampler`` for reproducible images)."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part down to ``sigma_down`` and fresh noise of std ``sigma_up``.

    ``sigma_down^2 + sigma_up^2 = sigma_next^2``, so the marginal noise level after the step is sigma_next; eta 0
    gives the deterministic (DDIM-like) step, eta 1 the DDPM-like one.
    """
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


@torch.no_grad()
def sample_euler(
    denoise: Denoise,
    x: Tensor,
    sigmas: Tensor,
    noise_sampler: Optional[NoiseSampler] = None,
    callback: Optional[Callback] = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE ``dx/dsigma = (x - x0) / sigma`` (k-diffusion, no churn)."""
    s = _values(sigmas)
    total = len(s) - 1
    for i in range(total):
        x0 = denoise(x, _sigma_batch(x, s[i]))
        x = x + (x - x0) * ((s[i + 1] - s[i]) / s[i])
        if callback is not None:
            callback(i + 1, total, x, x0)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoise: Denoise,
    x: Tensor,
    sigmas: Tensor,
    noise_sampler: Optional[NoiseSampler] = None,
    callback: Optional[Callback] = None,
    eta: float = 1.0,
) -> Tensor:
    """Euler down to sigma_down, then fresh noise up to sigma_next ("Euler a").

    No noise is drawn on the final step to sigma 0, so the noise stream lines up with the WebUI's.
    """
    noise_sampler = noise_sampler or _default_noise(x)
    s = _values(sigmas)
    total = len(s) - 1
    for i in range(total):
        x0 = denoise(x, _sigma_batch(x, s[i]))
        down, up = ancestral_step(s[i], s[i + 1], eta)
        x = x + (x - x0) * ((down - s[i]) / s[i])
        if s[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * up
        if callback is not None:
            callback(i + 1, total, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoise,
    x: Tensor,
    sigmas: Tensor,
    noise_sampler: Optional[NoiseSampler] = None,
    callback: Optional[Callback] = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), data-prediction multistep in lambda = -log(sigma).

    First step and the final step to sigma 0 are first order; the others extrapolate x0 linearly from the
    previous step's x0 (the k-diffusion variant, which equals diffusers' ``midpoint`` 2nd-order update).
    """
    s = _values(sigmas)
    total = len(s) - 1
    previous_x0: Optional[Tensor] = None
    previous_h = 0.0
    for i in range(total):
        x0 = denoise(x, _sigma_batch(x, s[i]))
        if s[i + 1] == 0:
            x = x0
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            estimate = x0
            if previous_x0 is not None:
                half_ratio = 0.5 * h / previous_h  # 1 / (2 r), r = h_previous / h
                estimate = (1 + half_ratio) * x0 - half_ratio * previous_x0
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * estimate
            previous_h = h
        previous_x0 = x0
        if callback is not None:
            callback(i + 1, total, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoise: Denoise,
    x: Tensor,
    sigmas: Tensor,
    noise_sampler: Optional[NoiseSampler] = None,
    callback: Optional[Callback] = None,
    eta: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2S) single-step midpoint solver down to sigma_down, then ancestral noise ("DPM++ 2S a").

    Two model calls per step (midpoint at sqrt(sigma * sigma_down)); the final step to 0 is one Euler call.
    """
    noise_sampler = noise_sampler or _default_noise(x)
    s = _values(sigmas)
    total = len(s) - 1
    for i in range(total):
        x0 = denoise(x, _sigma_batch(x, s[i]))
        down, up = ancestral_step(s[i], s[i + 1], eta)
        if down == 0:
            x = x0
        else:
            h = math.log(s[i]) - math.log(down)
            mid = math.sqrt(s[i] * down)  # lambda halfway between lambda(sigma) and lambda(sigma_down)
            x_mid = (mid / s[i]) * x - math.expm1(-h / 2) * x0
            x0 = denoise(x_mid, _sigma_batch(x, mid))
            x = (down / s[i]) * x - math.expm1(-h) * x0
        if s[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * up
        if callback is not None:
            callback(i + 1, total, x, x0)
    return x


@torch.no_grad()
def sample_ddim(
    denoise: Denoise,
    x: Tensor,
    sigmas: Tensor,
    noise_sampler: Optional[NoiseSampler] = None,
    callback: Optional[Callback] = None,
) -> Tensor:
    """Deterministic DDIM (eta 0) written in sigma space: keep x0 and eps, move to the next noise level.

    With ``x = x0 + sigma * eps`` the DDIM update ``sqrt(abar') x0 + sqrt(1 - abar') eps`` divided by
    ``sqrt(abar')`` is ``x0 + sigma' * eps``: given the sigmas of DDIM's timesteps this is exactly DDIM (and the
    same step as Euler, Karras et al. 2022).  Ending on sigma(t=0) instead of 0 gives diffusers' DDIM with
    ``set_alpha_to_one=False`` (then multiply by ``sqrt(abar_0)`` to get its latent).
    """
    s = _values(sigmas)
    total = len(s) - 1
    for i in range(total):
        x0 = denoise(x, _sigma_batch(x, s[i]))
        x = x0 + (x - x0) * (s[i + 1] / s[i])
        if callback is not None:
            callback(i + 1, total, x, x0)
    return x


def seeded_noise_sampler(x: Tensor, seed: int, *, after_initial_noise: bool = True) -> NoiseSampler:
    """Reproducible ancestral noise: row i draws from a CPU ``torch.Generator`` seeded with ``seed + i``.

    This is the WebUI's scheme (modules/rng.py ImageRNG with "RNG source: CPU", eta noise seed delta 0): each
    image's generator first yields its initial latent noise and then, continuing the same stream, the noise of
    every ancestral step.  ``after_initial_noise`` skips one latent's worth of draws to stand for that initial
    noise (drawn elsewhere with ``torch.Generator().manual_seed(seed + i)``); results do not depend on batch size.
    """
    row_shape = tuple(x.shape[1:])
    generators = [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(x.shape[0])]
    if after_initial_noise:
        for generator in generators:
            torch.randn(row_shape, generator=generator)

    def noise(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        rows = [torch.randn(row_shape, generator=generator) for generator in generators]
        return torch.stack(rows).to(device=x.device, dtype=x.dtype)

    return noise


# ---- registry -------------------------------------------------------------------------------------------------

SIGMA_SCHEDULES: dict[str, Callable[[NoiseSchedule, int], Tensor]] = {
    "normal": sigmas_normal,  # k-diffusion get_sigmas: the WebUI's "Uniform"/"Automatic" for Euler, Euler a
    "karras": sigmas_karras_for,
    "ddim": sigmas_ddim,
}


@dataclass(frozen=True)
class SamplerSpec:
    """One WebUI sampler: its function and which sigma list it runs on."""

    name: str
    function: SamplerFunction
    schedule: str
    ancestral: bool = False

    def sigmas(self, schedule: NoiseSchedule, steps: int) -> Tensor:
        return SIGMA_SCHEDULES[self.schedule](schedule, steps)

    def initial_latent(self, noise: Tensor, sigmas: Tensor) -> Tensor:
        """Unit noise scaled to the first sigma-space latent, as the WebUI starts each sampler.

        k-diffusion samplers start from ``noise * sigma_max``; the WebUI's DDIM starts from the unit noise as a
        DDPM latent, which in sigma space is ``noise * sqrt(1 + sigma_max^2)`` (0.2% larger at sigma 14.6).
        """
        first = float(sigmas[0])
        return noise * (math.sqrt(1 + first**2) if self.schedule == "ddim" else first)


SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec("Euler", sample_euler, "normal"),
        SamplerSpec("Euler a", sample_euler_ancestral, "normal", ancestral=True),
        SamplerSpec("DPM++ 2M Karras", sample_dpmpp_2m, "karras"),
        SamplerSpec("DPM++ 2S a Karras", sample_dpmpp_2s_ancestral, "karras", ancestral=True),
        SamplerSpec("DDIM", sample_ddim, "ddim"),
    )
}

# Other spellings of the same samplers: the WebUI's own aliases (k_euler_a, k_dpmpp_2m_ka, ...) and snake_case
# (euler_a, dpmpp_2m_karras).  Matching ignores case, spaces, "_" and "-", and reads "++" as "pp".
ALIASES: dict[str, str] = {
    "k_euler": "Euler",
    "euler_ancestral": "Euler a",
    "k_euler_a": "Euler a",
    "k_euler_ancestral": "Euler a",
    "k_dpmpp_2m_ka": "DPM++ 2M Karras",
    "dpmpp_2m_ka": "DPM++ 2M Karras",
    "k_dpmpp_2s_a_ka": "DPM++ 2S a Karras",
    "dpmpp_2s_a_ka": "DPM++ 2S a Karras",
    "dpmpp_2s_ancestral_karras": "DPM++ 2S a Karras",
}

# sd-scripts' --sample_sampler names (ddim, euler, euler_a, k_euler, k_euler_a match above).  The rest are
# samplers we do not implement; rather than reject a kohya config we run the closest one we have (sd-scripts
# itself falls back to DDIM for names it does not know).  ``is_stand_in`` tells the caller to say so.
STAND_INS: dict[str, str] = {
    "dpmsolver++": "DPM++ 2M Karras",  # same solver; sd-scripts runs it on diffusers' default (non-Karras) spacing
    "dpmsolver": "DPM++ 2M Karras",
    "dpmsingle": "DPM++ 2M Karras",
    "lms": "Euler",
    "k_lms": "Euler",
    "heun": "Euler",
    "dpm_2": "Euler",
    "k_dpm_2": "Euler",
    "pndm": "DDIM",
    "ddpm": "Euler a",
    "dpm_2_a": "Euler a",
    "k_dpm_2_a": "Euler a",
}


# sd-scripts' own --sample_sampler choices (its command line refuses any other name; a TOML it does not check)
SD_SCRIPTS_SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                       "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
_SD_SCRIPTS_NAME = {"Euler": "euler", "Euler a": "euler_a", "DDIM": "ddim", "DPM++ 2M Karras": "dpmsolver++",
                    "DPM++ 2S a Karras": "k_dpm_2_a"}


def sd_scripts_sampler(name: str) -> str:
    """The sd-scripts name for a sampler given in any accepted spelling: itself when sd-scripts has it, else the one
    sd-scripts runs closest to ours (its DPM++ 2M without Karras spacing, its DPM2 a for DPM++ 2S a)."""
    return name if name in SD_SCRIPTS_SAMPLERS else _SD_SCRIPTS_NAME[sampler_name(name)]


_SD_SCRIPTS_STAND_INS = {"DPM++ 2M Karras": "dpmsolver++ (DPM++ 2M without Karras spacing)",
                         "DPM++ 2S a Karras": "k_dpm_2_a (DPM2 a)"}


def sd_scripts_stand_in(name: str) -> str | None:
    """What sd-scripts draws with for a sampler it does not have (``sd_scripts_sampler``'s closest), to be said; None
    where it has the sampler itself."""
    return None if name in SD_SCRIPTS_SAMPLERS else _SD_SCRIPTS_STAND_INS.get(sampler_name(name))


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower().replace("++", "pp"))


_LOOKUP: dict[str, str] = {
    **{_key(alias): name for alias, name in STAND_INS.items()},
    **{_key(alias): name for alias, name in ALIASES.items()},
    **{_key(name): name for name in SAMPLERS},
}
_STAND_IN_KEYS = frozenset(_key(alias) for alias in STAND_INS)


def sampler_name(name: str) -> str:
    """The WebUI name for any accepted spelling ("euler_a" -> "Euler a"), for infotext and UI; ValueError if none."""
    canonical = _LOOKUP.get(_key(name))
    if canonical is None:
        raise ValueError(
            f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)} "
            f"(also accepted: {', '.join(ALIASES)}, lower-case/snake_case forms such as euler_a or "
            f"dpmpp_2m_karras, and sd-scripts' {', '.join(STAND_INS)} which run the closest sampler above)"
        )
    return canonical


def is_stand_in(name: str) -> bool:
    """True for sd-scripts names we accept but run with a different (closest) sampler."""
    return _key(name) in _STAND_IN_KEYS


def get_sampler(name: str) -> SamplerSpec:
    """The sampler for a WebUI name or any accepted alias; ValueError listing the valid names otherwise."""
    return SAMPLERS[sampler_name(name)]


def sigmas_for(name: str, schedule: NoiseSchedule, steps: int) -> Tensor:
    """The sigma list (descending, ending in 0) the named sampler runs ``steps`` steps on."""
    return get_sampler(name).sigmas(schedule, steps)


__all__ = [
    "ALIASES",
    "SAMPLERS",
    "SIGMA_SCHEDULES",
    "STAND_INS",
    "SamplerSpec",
    "ancestral_step",
    "get_sampler",
    "is_stand_in",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_dpmpp_2s_ancestral",
    "sample_euler",
    "sample_euler_ancestral",
    "sampler_name",
    "seeded_noise_sampler",
    "sigmas_for",
]
