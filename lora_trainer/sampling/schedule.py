"""The DDPM noise schedule of Stable Diffusion and the pure functions built on it.

Everything here works on tensors and has no state beyond cached tables, so the trainer (timestep sampling, SNR
weights) and the samplers (sigma lists, denoisers) read the very same numbers.

Conventions, as in k-diffusion (what the WebUI's samplers run on):

* ``x`` lives in "sigma space": ``x = x0 + sigma * eps``.  The UNet sees ``c_in * x`` which is the DDPM latent
  ``sqrt(abar) * x0 + sqrt(1 - abar) * eps`` because ``sigma = sqrt((1 - abar) / abar)``.
* A *denoiser* maps ``(x, sigma) -> x0``; samplers only ever talk to denoisers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

SCHEDULE_KINDS = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# What the WebUI (modules/sd_models.py, rescale_zero_terminal_snr_abar) puts in place of the exact 0 that the
# zero-terminal-SNR rescale gives the last alpha-bar, so that sigma_max stays finite (sigma_max ~= 4518.9).
ZERO_SNR_TERMINAL_ALPHA_BAR = 4.8973451890853435e-08


@dataclass(frozen=True)
class NoiseSchedule:
    """Stable Diffusion's discrete schedule (1000 steps, "scaled_linear" betas 0.00085 .. 0.012).

    The tables are computed like the original LDM code: betas and the cumulative product in float64, then stored
    as float32 (the ``alphas_cumprod`` buffer of an SD checkpoint).  Sigmas are then derived from that float32
    buffer in float32, as k-diffusion's ``CompVisDenoiser`` does inside the WebUI, so sigma lists match it.
    """

    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    kind: str = "scaled_linear"
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"noise schedule kind {self.kind!r} is not one of {', '.join(SCHEDULE_KINDS)}")
        if self.num_timesteps < 2:
            raise ValueError(f"a noise schedule needs at least 2 timesteps, got {self.num_timesteps}")

    # ---- tables (float64 maths, float32 storage) -------------------------------------------------------------

    @cached_property
    def _betas64(self) -> np.ndarray:
        """The betas before any zero-terminal-SNR rescale."""
        n = self.num_timesteps
        if self.kind == "scaled_linear":
            return np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64) ** 2
        return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)

    @cached_property
    def _alphas_cumprod64(self) -> np.ndarray:
        abar = np.cumprod(1.0 - self._betas64)
        if self.zero_terminal_snr:
            abar = rescale_zero_terminal_snr(abar)
        return abar

    @cached_property
    def betas(self) -> Tensor:
        """float32 betas; with zero terminal SNR these are the rescaled ones (last beta is exactly 1)."""
        abar = self._alphas_cumprod64
        alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
        return torch.from_numpy(1.0 - alphas).float()

    @cached_property
    def alphas_cumprod(self) -> Tensor:
        """float32 alpha-bar per timestep (exactly 0 at the end with zero terminal SNR: pure noise there)."""
        return torch.from_numpy(self._alphas_cumprod64).float()

    @cached_property
    def loss_weighting_snr(self) -> Tensor:
        """The SNR of each timestep that min-SNR, v-prediction scaling and debiased estimation weigh the loss by. Those
        of the schedule before the zero-terminal-SNR rescale, as sd-scripts computes its ``all_snr`` before rescaling
        (kohya-ss/sd-scripts#1263): a run weighs its timesteps as sd-scripts' runs of the same options do, and the
        weights stay finite at the last timestep, whose rescaled SNR is 0."""
        abar = np.cumprod(1.0 - self._betas64) if self.zero_terminal_snr else self._alphas_cumprod64
        abar = abar.astype(np.float32).astype(np.float64)  # from the float32 table, as sd-scripts and the weights before
        return torch.from_numpy(abar / (1 - abar)).float()

    @cached_property
    def sigmas(self) -> Tensor:
        """float32 sigma per timestep, increasing; ``sqrt((1 - abar) / abar)`` computed in float32 like k-diffusion.

        With zero terminal SNR the last alpha-bar is replaced by the WebUI's tiny constant so sigma_max is finite.
        """
        abar = self.alphas_cumprod.clone()
        if self.zero_terminal_snr:
            abar[-1] = ZERO_SNR_TERMINAL_ALPHA_BAR
        return ((1 - abar) / abar) ** 0.5

    @cached_property
    def log_sigmas(self) -> Tensor:
        return self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @cached_property
    def _per_device(self) -> dict:
        return {}

    def _log_sigmas_on(self, device: torch.device) -> Tensor:
        """log_sigmas on ``device``, cached so a GPU sampling loop does not copy the table every step."""
        key = str(device)
        table = self._per_device.get(key)
        if table is None:
            table = self._per_device[key] = self.log_sigmas.to(device)
        return table

    # ---- conversions ------------------------------------------------------------------------------------------

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep of each sigma: linear interpolation in log-sigma between neighbouring table entries.

        Same rule as k-diffusion's ``DiscreteSchedule.sigma_to_t`` (quantize=False, the WebUI default), so the UNet
        sees the same float timesteps as in the WebUI.  Sigmas outside the table clamp to t = 0 or t = T - 1.
        """
        sigma = torch.as_tensor(sigma)
        log_sigmas = self._log_sigmas_on(sigma.device)
        log_sigma = sigma.float().log()
        # index of the last table entry <= log_sigma, kept inside [0, T - 2] so there is always a right neighbour
        low = torch.searchsorted(log_sigmas, log_sigma.reshape(-1).contiguous(), right=True).reshape(log_sigma.shape)
        low = (low - 1).clamp(0, len(log_sigmas) - 2)
        high = low + 1
        lo, hi = log_sigmas[low], log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * high

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at fractional timestep ``t``: log-sigma interpolated linearly between the two integer neighbours."""
        t = torch.as_tensor(t).float().clamp(0, self.num_timesteps - 1)
        log_sigmas = self._log_sigmas_on(t.device)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    def snr(self, timesteps: Tensor) -> Tensor:
        """Signal-to-noise ratio ``abar / (1 - abar)`` at integer timesteps (min-SNR / debiased loss weights).

        0 at the last timestep with zero terminal SNR; float32 on the device of ``timesteps``.
        """
        timesteps = torch.as_tensor(timesteps)
        abar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        return abar / (1 - abar)


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Algorithm 1 of "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al. 2023).

    Shifts and scales ``sqrt(abar)`` so the last step has zero signal while the first is unchanged.  Done on
    alpha-bar directly (the paper goes through betas; the two are the same maths), in float64.
    """
    root = np.sqrt(np.asarray(alphas_cumprod, dtype=np.float64))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    return root**2


# ---- sigma lists ---------------------------------------------------------------------------------------------


def _check_steps(n: int) -> int:
    if int(n) != n or n < 1:
        raise ValueError(f"the number of sampling steps must be a whole number >= 1, got {n!r}")
    return int(n)


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigmas_normal(schedule: NoiseSchedule, n: int) -> Tensor:
    """n sigmas at timesteps spread uniformly from T - 1 down to 0, then 0 (k-diffusion ``get_sigmas(n)``).

    The WebUI's default ("Automatic"/"Uniform") schedule for Euler and Euler a.  Fractional timesteps are mapped
    to sigma by log-sigma interpolation (diffusers' "linspace" interpolates sigma itself: equal only where the
    timesteps are whole numbers, e.g. n = 10 or 28 with T = 1000).
    """
    n = _check_steps(n)
    t = torch.linspace(schedule.num_timesteps - 1, 0, n)
    return _append_zero(schedule.t_to_sigma(t))


def sigmas_karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) schedule: n sigmas uniform in ``sigma ** (1 / rho)`` from sigma_max to sigma_min, then 0."""
    n = _check_steps(n)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho).float()


def sigmas_karras_for(schedule: NoiseSchedule, n: int, rho: float = 7.0) -> Tensor:
    """Karras sigmas between the schedule's own sigma_min and sigma_max, as the WebUI's "... Karras" samplers use."""
    return sigmas_karras(schedule.sigma_min, schedule.sigma_max, n, rho)


def ddim_timesteps(schedule: NoiseSchedule, n: int) -> Tensor:
    """The WebUI's DDIM timestep table: ``range(0, T, T // n) + 1`` clipped to T - 1, ascending ("leading").

    Note the table has more than n entries when n does not divide T (30 steps -> 31 entries), exactly as in the
    WebUI; ``sigmas_ddim`` turns it into the steps the WebUI really runs.
    """
    n = _check_steps(n)
    stride = max(schedule.num_timesteps // n, 1)
    return (torch.arange(0, schedule.num_timesteps, stride) + 1).clamp(0, schedule.num_timesteps - 1)


def sigmas_ddim(schedule: NoiseSchedule, n: int) -> Tensor:
    """Sigmas of the timesteps the WebUI's DDIM evaluates, descending, then 0.

    The WebUI (modules/sd_samplers_timesteps_impl.ddim) steps from each table entry to the one below and so
    never evaluates the smallest entry (t = 1): 20 steps evaluate t = 951, 901, ..., 51 (19 model calls) and
    finish at the noise level of t = 1.  We evaluate the same timesteps and finish at sigma 0 instead (the last
    step lands on the model's x0 rather than leaving sigma(1) ~= 0.04 of noise in).  With a single step the
    table has one entry, which is then evaluated (the WebUI would return the noise unchanged).
    """
    table = ddim_timesteps(schedule, n)
    evaluated = table[1:] if len(table) > 1 else table
    return _append_zero(schedule.sigmas[evaluated.flip(0)])


# ---- parameterisations and denoisers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Denoiser:
    """How a UNet output becomes an x0 estimate: ``x0 = c_skip * x + c_out * output`` with input ``c_in * x``.

    k-diffusion's scalings for a DDPM model (sigma_data = 1): epsilon -> c_skip 1, c_out -sigma; v_prediction ->
    c_skip 1/(sigma^2+1), c_out -sigma/sqrt(sigma^2+1).  c_in = 1/sqrt(sigma^2+1) for both turns sigma-space x back
    into the DDPM latent the model was trained on.
    """

    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction type {self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}"
            )

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) for sigma (any shape; broadcast it against x yourself)."""
        c_in = 1 / (sigma**2 + 1) ** 0.5
        if self.prediction_type == "epsilon":
            return torch.ones_like(sigma), -sigma, c_in
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in

    def x0(self, x: Tensor, sigma: Tensor, model_output: Tensor) -> Tensor:
        """x0 estimate from sigma-space ``x`` and the raw model output; ``sigma`` per batch row or scalar."""
        c_skip, c_out, _ = self.scalings(_rows(sigma, x))
        return c_skip * x + c_out * model_output


def _rows(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma as a (B, 1, 1, ...) tensor in x's dtype and device, from a scalar or one value per row."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _per_row(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma as a float32 (B,) tensor on x's device."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(-1)


def make_denoiser(
    model_fn: Callable[..., Tensor], schedule: NoiseSchedule, prediction_type: str = "epsilon"
) -> Callable[..., Tensor]:
    """Wrap a UNet call ``model_fn(x_scaled, timesteps, **cond)`` into ``denoise(x, sigma, **cond) -> x0``.

    ``timesteps`` are ``schedule.sigma_to_t(sigma)``: float32, one per batch row, fractional in general (the
    WebUI's k-diffusion samplers do the same; the UNet's sinusoidal embedding takes floats).
    """
    parameterisation = Denoiser(prediction_type)

    def denoise(x: Tensor, sigma: Tensor | float, **cond) -> Tensor:
        sigma = _per_row(sigma, x)
        c_skip, c_out, c_in = parameterisation.scalings(_rows(sigma, x))
        output = model_fn(x * c_in, schedule.sigma_to_t(sigma), **cond)
        return c_skip * x + c_out * output

    return denoise


def cfg_denoiser(
    denoise: Callable[..., Tensor],
    cond: Mapping[str, Tensor | None],
    uncond: Mapping[str, Tensor | None],
    scale: float,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)`` from one batched call of ``denoise``.

    ``cond``/``uncond`` are the keyword arguments of ``denoise`` (dicts of tensors with the same keys, batch-first;
    a batch of 1 is repeated to x's batch, ``None`` values pass through).  Both halves run in a single batch of
    2B, cond first, as the WebUI does; at scale 1 the result is the cond half alone, so uncond is skipped.
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    scale = float(scale)

    def fit(value: Tensor | None, batch: int) -> Tensor | None:
        if value is None or value.shape[0] == batch:
            return value
        if value.shape[0] == 1:
            return value.expand(batch, *value.shape[1:])
        raise ValueError(f"conditioning batch {value.shape[0]} does not match the latent batch {batch}")

    def guided(x: Tensor, sigma: Tensor | float) -> Tensor:
        batch = x.shape[0]
        sigma = _per_row(sigma, x)
        if scale == 1.0:
            return denoise(x, sigma, **{k: fit(v, batch) for k, v in cond.items()})
        both = {}
        for key in cond:
            c, u = fit(cond[key], batch), fit(uncond[key], batch)
            if (c is None) != (u is None):
                raise ValueError(f"conditioning {key!r} is None on one side of classifier-free guidance only")
            both[key] = None if c is None else torch.cat([c, u])
        x0 = denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), **both)
        x0_cond, x0_uncond = x0[:batch], x0[batch:]
        return x0_uncond + scale * (x0_cond - x0_uncond)

    return guided


__all__ = [
    "NoiseSchedule",
    "Denoiser",
    "PREDICTION_TYPES",
    "SCHEDULE_KINDS",
    "ZERO_SNR_TERMINAL_ALPHA_BAR",
    "cfg_denoiser",
    "ddim_timesteps",
    "make_denoiser",
    "rescale_zero_terminal_snr",
    "sigmas_ddim",
    "sigmas_karras",
    "sigmas_karras_for",
    "sigmas_normal",
]
