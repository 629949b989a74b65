"""Noise schedule, sigma lists and samplers: parity with diffusers, the WebUI's definitions, and a Gaussian check.

Spacing configs matched (documented in the code too):
* "Euler"/"Euler a" run on k-diffusion's ``get_sigmas`` (timesteps linspace(999, 0, n), sigma interpolated in
  log-sigma).  diffusers' Euler schedulers with ``timestep_spacing="linspace"`` interpolate sigma linearly, so
  the two agree only when every timestep is a whole number (n = 10, 28, ... for T = 1000); parity runs use such n,
  or hand our sigma list to diffusers through ``set_timesteps(sigmas=...)``.
* Karras lists agree with diffusers' ``use_karras_sigmas=True`` for any n (same sigma_min/sigma_max, rho 7).
  DPMSolverMultistep rounds the *model's* timestep for Karras sigmas while k-diffusion passes the fractional one;
  the harness feeds the toy model the unrounded timestep of the same sigma so the solver maths is compared.
* DDIM: the WebUI's table ``range(0, 1000, 1000 // n) + 1`` equals diffusers' DDIM ``timestep_spacing="leading",
  steps_offset=1`` when n divides 1000; parity runs on diffusers' timesteps with both ``set_alpha_to_one`` values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lora_trainer.sampling.samplers import (
    SAMPLERS,
    STAND_INS,
    get_sampler,
    is_stand_in,
    sample_ddim,
    sample_dpmpp_2s_ancestral,
    sample_euler,
    sample_euler_ancestral,
    sampler_name,
    seeded_noise_sampler,
    sigmas_for,
)
from lora_trainer.sampling.schedule import (
    Denoiser,
    NoiseSchedule,
    cfg_denoiser,
    ddim_timesteps,
    make_denoiser,
    sigmas_ddim,
    sigmas_karras,
    sigmas_normal,
)

diffusers = pytest.importorskip("diffusers")

# diffusers 0.42 calls np.array(tensor, copy=False) while building its tables; harmless, but noisy on numpy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SD = NoiseSchedule()
SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, smooth, nonlinear 'UNet': output depends on the scaled latent and the (float) timestep."""
    tt = t.float().view(-1, 1, 1, 1) / 1000
    return torch.tanh(x * (0.5 + tt)) + 0.3 * torch.sin(2 * x + 3 * tt)


def noise(seed: int = 0, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run_diffusers(scheduler, x, model_t=None):
    """The standard diffusers loop; ``model_t(i, t)`` overrides the timestep handed to the toy model."""
    for i, t in enumerate(scheduler.timesteps):
        inp = scheduler.scale_model_input(x, t)
        tm = float(model_t(i, t)) if model_t else float(t)
        out = toy_model(inp, torch.full((x.shape[0],), tm))
        x = scheduler.step(out, t, x).prev_sample
    return x


def assert_close(ours, theirs, rtol=1e-4, atol=1e-4):
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=rtol, atol=atol)


# ---- schedule -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["scaled_linear", "linear"])
def test_alphas_cumprod_match_diffusers_and_ldm(kind):
    schedule = NoiseSchedule(kind=kind)
    ddpm = diffusers.DDPMScheduler(**{**SD_CONFIG, "beta_schedule": kind})
    assert schedule.alphas_cumprod.dtype == torch.float32
    assert_close(schedule.alphas_cumprod, ddpm.alphas_cumprod, rtol=2e-5, atol=1e-7)
    assert_close(schedule.betas, ddpm.betas, rtol=1e-5, atol=1e-9)
    # LDM's make_beta_schedule: float64 maths, then float32 buffers (what SD checkpoints carry)
    if kind == "scaled_linear":
        betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    else:
        betas = np.linspace(0.00085, 0.012, 1000, dtype=np.float64)
    assert torch.equal(schedule.alphas_cumprod, torch.from_numpy(np.cumprod(1 - betas)).float())


def test_zero_terminal_snr_matches_diffusers_rescale():
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    schedule = NoiseSchedule(zero_terminal_snr=True)
    betas64 = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    reference = torch.cumprod(1 - rescale_zero_terminal_snr(betas64), 0)
    assert_close(schedule.alphas_cumprod.double(), reference, rtol=1e-5, atol=1e-9)
    assert schedule.alphas_cumprod[-1] == 0 and schedule.betas[-1] == 1
    assert schedule.alphas_cumprod[0] == SD.alphas_cumprod[0]  # the first step keeps its SNR
    # sigma_max stays finite with the WebUI's terminal alpha-bar
    assert math.isfinite(schedule.sigma_max) and 4500 < schedule.sigma_max < 4540
    assert schedule.snr(torch.tensor([999])).item() == 0
    # the diffusers scheduler with the flag agrees as well
    ddpm = diffusers.DDPMScheduler(**SD_CONFIG, rescale_betas_zero_snr=True)
    assert_close(schedule.alphas_cumprod, ddpm.alphas_cumprod, rtol=1e-4, atol=1e-7)


def test_snr_matches_diffusers_compute_snr():
    from diffusers.training_utils import compute_snr

    timesteps = torch.tensor([0, 1, 250, 500, 998, 999])
    assert_close(SD.snr(timesteps), compute_snr(diffusers.DDPMScheduler(**SD_CONFIG), timesteps), rtol=1e-4)


def test_sigma_t_conversions():
    t = torch.arange(1000).float()
    assert_close(SD.t_to_sigma(t), SD.sigmas, rtol=1e-6, atol=0)  # exp(log(sigma)): within an ulp, as k-diffusion
    assert torch.equal(SD.sigma_to_t(SD.sigmas), t)
    fractional = torch.tensor([0.0, 0.25, 10.5, 500.75, 998.999, 999.0])
    assert_close(SD.sigma_to_t(SD.t_to_sigma(fractional)), fractional, rtol=0, atol=2e-3)
    # same interpolation as diffusers' (k-diffusion's) _sigma_to_t, including clamping outside the table
    euler = diffusers.EulerDiscreteScheduler(**SD_CONFIG)
    log_sigmas = np.log(SD.sigmas.numpy())
    probe = np.array([0.01, 0.0292, 0.05, 0.3, 1.0, 3.7, 14.0, 14.6146, 20.0], dtype=np.float32)
    theirs = np.array([euler._sigma_to_t(s, log_sigmas) for s in probe]).reshape(-1)
    assert_close(SD.sigma_to_t(torch.from_numpy(probe)), torch.from_numpy(theirs).float(), rtol=0, atol=1e-3)
    # interpolation is in log-sigma
    mid = SD.t_to_sigma(torch.tensor(10.5))
    assert_close(mid, (SD.sigmas[10] * SD.sigmas[11]).sqrt(), rtol=1e-6, atol=0)


# ---- sigma lists ----------------------------------------------------------------------------------------------


def kdiffusion_get_sigmas(n: int) -> torch.Tensor:
    """k-diffusion DiscreteSchedule.get_sigmas(n) restated in float64 from our float32 sigma table."""
    log_sigmas = np.log(SD.sigmas.double().numpy())
    t = np.linspace(999, 0, n)
    lo, hi, w = np.floor(t).astype(int), np.ceil(t).astype(int), t - np.floor(t)
    return torch.from_numpy(np.append(np.exp((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]), 0.0))


@pytest.mark.parametrize("n", [1, 2, 10, 20, 28, 30, 50])
def test_normal_sigmas_follow_kdiffusion(n):
    ours = sigmas_normal(SD, n)
    assert ours.shape == (n + 1,) and ours[-1] == 0 and abs(ours[0] / SD.sigmas[-1] - 1) < 1e-6
    assert_close(ours.double(), kdiffusion_get_sigmas(n), rtol=1e-5, atol=0)
    assert torch.equal(sigmas_for("Euler", SD, n), ours) and torch.equal(sigmas_for("Euler a", SD, n), ours)


@pytest.mark.parametrize("n", [10, 28])
def test_normal_sigmas_equal_diffusers_linspace_on_whole_timesteps(n):
    euler = diffusers.EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing="linspace")
    euler.set_timesteps(n)
    assert_close(sigmas_normal(SD, n), euler.sigmas, rtol=2e-5, atol=0)


def test_normal_sigmas_differ_from_diffusers_on_fractional_timesteps():
    """Documented difference: diffusers interpolates sigma linearly, k-diffusion/WebUI in log-sigma."""
    euler = diffusers.EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing="linspace")
    euler.set_timesteps(20)
    ours = sigmas_normal(SD, 20)
    assert_close(ours, euler.sigmas, rtol=1e-3, atol=0)  # close...
    assert (ours[1:-1] - euler.sigmas[1:-1]).abs().max() > 1e-5  # ...but not the same definition


@pytest.mark.parametrize("n", [1, 2, 5, 20, 30])
def test_karras_sigmas_equal_diffusers(n):
    ours = sigmas_for("DPM++ 2M Karras", SD, n)
    assert torch.equal(ours, sigmas_karras(SD.sigma_min, SD.sigma_max, n))
    assert torch.equal(sigmas_for("DPM++ 2S a Karras", SD, n), ours)
    assert abs(ours[0] / SD.sigma_max - 1) < 1e-6  # the schedule's own range, as the WebUI's "... Karras"
    if n == 1:
        return  # diffusers' Euler reads sigma_max off its 1-step linspace table (t = 0) and starts at sigma_min
    assert abs(ours[-2] / SD.sigma_min - 1) < 1e-6
    euler = diffusers.EulerDiscreteScheduler(**SD_CONFIG, use_karras_sigmas=True)
    euler.set_timesteps(n)
    assert_close(ours, euler.sigmas, rtol=2e-5, atol=0)
    dpm = diffusers.DPMSolverMultistepScheduler(**SD_CONFIG, use_karras_sigmas=True)
    dpm.set_timesteps(n)
    assert_close(ours, dpm.sigmas, rtol=2e-5, atol=0)


def test_karras_formula():
    sigmas = sigmas_karras(0.1, 10.0, 4, rho=7.0)
    ramp = np.linspace(0, 1, 4)
    expected = (10.0 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    assert_close(sigmas.double(), torch.from_numpy(np.append(expected, 0.0)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", list(range(1, 61)) + [100, 999, 1000])
def test_ddim_timesteps_are_the_webuis(n):
    # modules/sd_samplers_timesteps.py CompVisSampler.get_timesteps (no discarded sigma)
    webui = torch.clip(torch.asarray(list(range(0, 1000, 1000 // n))) + 1, 0, 999)
    assert torch.equal(ddim_timesteps(SD, n), webui)
    # the WebUI steps from each entry to the one below, so t = 1 is never evaluated
    sigmas = sigmas_ddim(SD, n)
    evaluated = webui[1:].flip(0) if len(webui) > 1 else webui
    assert torch.equal(sigmas, torch.cat([SD.sigmas[evaluated], torch.zeros(1)]))
    assert torch.equal(sigmas_for("DDIM", SD, n), sigmas)


@pytest.mark.parametrize("n", [4, 10, 20, 50])
def test_ddim_timesteps_equal_diffusers_leading_when_steps_divide_1000(n):
    ddim = diffusers.DDIMScheduler(**SD_CONFIG, timestep_spacing="leading", steps_offset=1)
    ddim.set_timesteps(n)
    assert torch.equal(ddim_timesteps(SD, n), ddim.timesteps.flip(0))


def test_bad_step_counts():
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps"):
            sigmas_for("Euler", SD, bad)


# ---- denoisers and CFG ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_make_denoiser_scalings_and_timesteps(prediction):
    seen = {}

    def model_fn(x_in, timesteps, context):
        seen["x_in"], seen["t"], seen["context"] = x_in, timesteps, context
        return toy_model(x_in, timesteps)

    x, sigma = noise(1) * 3, torch.tensor([2.5, 0.7])
    x0 = make_denoiser(model_fn, SD, prediction)(x, sigma, context="c")
    assert seen["context"] == "c" and seen["t"].dtype == torch.float32 and seen["t"].shape == (2,)
    assert_close(seen["t"], SD.sigma_to_t(sigma), rtol=0, atol=0)
    s = sigma.view(-1, 1, 1, 1)
    assert_close(seen["x_in"], x / (s**2 + 1).sqrt(), rtol=1e-6, atol=1e-6)
    out = toy_model(seen["x_in"], seen["t"])
    # the DDPM-space formulas: x_t = sqrt(abar) x0 + sqrt(1-abar) eps, v = sqrt(abar) eps - sqrt(1-abar) x0
    a, b = 1 / (s**2 + 1).sqrt(), s / (s**2 + 1).sqrt()
    x_t = seen["x_in"]
    expected = (x_t - b * out) / a if prediction == "epsilon" else a * x_t - b * out
    assert_close(x0, expected, rtol=1e-5, atol=1e-5)
    # a scalar sigma is broadcast to every row
    make_denoiser(model_fn, SD, prediction)(x, 1.5, context=None)
    assert torch.equal(seen["t"], SD.sigma_to_t(torch.tensor([1.5, 1.5])))


def test_denoiser_rejects_unknown_prediction():
    with pytest.raises(ValueError, match="v_prediction"):
        Denoiser("sample")


def test_cfg_combination_batches_cond_and_uncond():
    calls = []

    def denoise(x, sigma, context, y=None, extra=None):
        calls.append((x.shape[0], sigma.clone(), context.clone(), extra))
        return x * 0.5 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + (0 if y is None else y.view(-1, 1, 1, 1))

    x = noise(2)
    cond = {"context": torch.full((2, 3, 5), 2.0), "y": torch.tensor([1.0, -1.0]), "extra": None}
    uncond = {"context": torch.zeros(1, 3, 5), "y": torch.tensor([0.0, 0.0]), "extra": None}
    guided = cfg_denoiser(denoise, cond, uncond, 7.5)
    out = guided(x, torch.tensor(3.0))
    assert len(calls) == 1 and calls[0][0] == 4 and torch.equal(calls[0][1], torch.full((4,), 3.0))
    assert torch.equal(calls[0][2][:2], cond["context"]) and torch.equal(calls[0][2][2:], torch.zeros(2, 3, 5))
    c = x * 0.5 + 2.0 + cond["y"].view(-1, 1, 1, 1)
    u = x * 0.5
    assert_close(out, u + 7.5 * (c - u), rtol=1e-6, atol=1e-6)
    # scale 1 is the cond prediction alone, without running uncond
    calls.clear()
    assert_close(cfg_denoiser(denoise, cond, uncond, 1.0)(x, 3.0), c, rtol=1e-6, atol=1e-6)
    assert len(calls) == 1 and calls[0][0] == 2
    with pytest.raises(ValueError, match="same keys"):
        cfg_denoiser(denoise, cond, {"context": uncond["context"]}, 5.0)


# ---- sampler parity with diffusers ----------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [10, 28])
def test_euler_matches_diffusers(prediction, n):
    scheduler = diffusers.EulerDiscreteScheduler(**SD_CONFIG, prediction_type=prediction, timestep_spacing="linspace")
    scheduler.set_timesteps(n)
    start = noise(3)
    theirs = run_diffusers(scheduler, start * scheduler.init_noise_sigma)
    sigmas = sigmas_for("Euler", SD, n)
    ours = get_sampler("Euler").function(make_denoiser(toy_model, SD, prediction), start * sigmas[0], sigmas)
    assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule_kind", ["normal-20", "karras-15"])
def test_euler_matches_diffusers_on_any_sigma_list(prediction, schedule_kind):
    kind, n = schedule_kind.split("-")
    n = int(n)
    scheduler = diffusers.EulerDiscreteScheduler(**SD_CONFIG, prediction_type=prediction)
    if kind == "karras":
        scheduler = diffusers.EulerDiscreteScheduler(**SD_CONFIG, prediction_type=prediction, use_karras_sigmas=True)
        scheduler.set_timesteps(n)
        sigmas = sigmas_for("DPM++ 2M Karras", SD, n)
    else:
        sigmas = sigmas_normal(SD, n)
        scheduler.set_timesteps(sigmas=sigmas.tolist())
    start = noise(4)
    theirs = run_diffusers(scheduler, start * scheduler.sigmas[0])
    ours = sample_euler(make_denoiser(toy_model, SD, prediction), start * sigmas[0], sigmas)
    assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_euler_ancestral_matches_diffusers_with_the_same_noise(prediction, monkeypatch):
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as module

    n = 10
    injected = [noise(100 + i) for i in range(n)]
    stream = iter(injected)
    monkeypatch.setattr(module, "randn_tensor", lambda *args, **kwargs: next(stream))
    scheduler = diffusers.EulerAncestralDiscreteScheduler(
        **SD_CONFIG, prediction_type=prediction, timestep_spacing="linspace"
    )
    scheduler.set_timesteps(n)
    start = noise(5)
    theirs = run_diffusers(scheduler, start * scheduler.init_noise_sigma)

    ours_stream = iter(injected)
    calls = []

    def noise_sampler(sigma, sigma_next):
        calls.append((float(sigma), float(sigma_next)))
        return next(ours_stream)

    sigmas = sigmas_for("Euler a", SD, n)
    denoise = make_denoiser(toy_model, SD, prediction)
    ours = get_sampler("Euler a").function(denoise, start * sigmas[0], sigmas, noise_sampler=noise_sampler)
    assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert len(calls) == n - 1  # no noise is drawn for the last step to sigma 0 (k-diffusion / WebUI)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [10, 20])
def test_dpmpp_2m_karras_matches_diffusers(prediction, n):
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **SD_CONFIG,
        prediction_type=prediction,
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_karras_sigmas=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(n)
    start = noise(6)
    # diffusers rounds the model's timestep for Karras sigmas; give the toy model the unrounded one instead
    theirs = run_diffusers(scheduler, start.clone(), model_t=lambda i, t: SD.sigma_to_t(scheduler.sigmas[i]))
    sigmas = sigmas_for("DPM++ 2M Karras", SD, n)
    denoise = make_denoiser(toy_model, SD, prediction)
    # diffusers starts from the unit noise as a DDPM latent: sigma space is noise * sqrt(1 + sigma_max^2)
    ours = get_sampler("dpmpp_2m_karras").function(denoise, start * (1 + sigmas[0] ** 2).sqrt(), sigmas)
    assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("alpha_to_one", [False, True])
def test_ddim_matches_diffusers(prediction, alpha_to_one):
    n = 20
    scheduler = diffusers.DDIMScheduler(
        **SD_CONFIG,
        prediction_type=prediction,
        timestep_spacing="leading",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=alpha_to_one,
    )
    scheduler.set_timesteps(n)
    start = noise(7)
    theirs = run_diffusers(scheduler, start.clone())
    final = 0.0 if alpha_to_one else float(SD.sigmas[0])
    sigmas = torch.cat([SD.sigmas[scheduler.timesteps], torch.tensor([final])])
    denoise = make_denoiser(toy_model, SD, prediction)
    ours = sample_ddim(denoise, get_sampler("DDIM").initial_latent(start, sigmas), sigmas)
    ours_ddpm_latent = ours / math.sqrt(1 + final**2)
    assert_close(ours_ddpm_latent, theirs, rtol=1e-4, atol=1e-4)


def test_ddim_is_the_euler_step_in_sigma_space():
    sigmas = sigmas_for("DDIM", SD, 25)
    denoise = make_denoiser(toy_model, SD, "epsilon")
    start = noise(8) * sigmas[0]
    assert_close(sample_ddim(denoise, start, sigmas), sample_euler(denoise, start, sigmas), rtol=1e-5, atol=1e-5)


# ---- analytic check: Gaussian data ---------------------------------------------------------------------------

# Data ~ N(MU, S^2), about the spread of SD latents.  The exact denoiser is the posterior mean
# MU + S^2 / (S^2 + sigma^2) (x - MU), so a correct sampler must turn noise into N(MU, S^2) up to its own
# discretisation error: 2nd-order samplers are within 1-2% at 30 steps; 1st-order ones (Euler, Euler a, DDIM) lose
# 5-10% of the std at 30 steps (the same happens with diffusers' Euler) and converge like 1/steps.
MU, S = 0.25, 1.0
FIRST_ORDER = {"Euler", "Euler a", "DDIM"}


def gaussian_model(prediction: str):
    """A perfect 'UNet' for N(MU, S^2) data, answering in eps or v from the scaled latent and float timestep."""

    def model_fn(x_in, t):
        sigma = SD.t_to_sigma(t).double().view(-1, 1, 1, 1)
        x = x_in.double() * (sigma**2 + 1).sqrt()
        x0 = MU + S**2 / (S**2 + sigma**2) * (x - MU)
        eps = (x - x0) / sigma
        if prediction == "epsilon":
            return eps.float()
        a, b = 1 / (sigma**2 + 1).sqrt(), sigma / (sigma**2 + 1).sqrt()
        return (a * eps - b * x0).float()

    return model_fn


def sample_gaussian(name: str, prediction: str, steps: int):
    """Run a sampler from N(0, sigma_max^2) noise; also return where the exact ODE would map each sample."""
    spec = get_sampler(name)
    sigmas = sigmas_for(name, SD, steps)
    x_T = spec.initial_latent(noise(9, (4, 4, 32, 32)), sigmas)
    denoise = make_denoiser(gaussian_model(prediction), SD, prediction)
    out = spec.function(denoise, x_T, sigmas, noise_sampler=seeded_noise_sampler(x_T, 1234))
    s0 = float(sigmas[0])
    exact = MU + (x_T - MU) * S / math.sqrt(S**2 + s0**2)  # the probability-flow ODE of a Gaussian is affine
    return out, exact


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_recover_a_gaussian(name, prediction):
    steps = 120 if name in FIRST_ORDER else 30
    out, exact = sample_gaussian(name, prediction, steps)
    assert abs(out.mean().item() - MU) < 0.03 * S, (name, out.mean().item())
    assert abs(out.std().item() / S - 1) < 0.03, (name, out.std().item())
    if not get_sampler(name).ancestral:
        deviation = (out - exact).abs().max().item()
        assert deviation < (0.06 if name in FIRST_ORDER else 0.03) * S, (name, deviation)


@pytest.mark.parametrize("name", sorted(FIRST_ORDER))
def test_first_order_samplers_at_30_steps_converge_like_one_over_steps(name):
    errors = {}
    for steps in (30, 120):
        out, _ = sample_gaussian(name, "epsilon", steps)
        errors[steps] = abs(out.std().item() / S - 1)
    assert errors[30] < 0.12, errors
    assert errors[120] < 0.4 * errors[30], errors


# ---- noise, callbacks, names ----------------------------------------------------------------------------------


def toy_denoise(x, sigma):
    return torch.tanh(x / (1 + sigma.view(-1, 1, 1, 1)))


@pytest.mark.parametrize("function", [sample_euler_ancestral, sample_dpmpp_2s_ancestral])
def test_seeded_ancestral_sampling_is_reproducible(function):
    sigmas = sigmas_karras(0.03, 14.6, 8)
    x = noise(10) * sigmas[0]
    a = function(toy_denoise, x, sigmas, noise_sampler=seeded_noise_sampler(x, 42))
    b = function(toy_denoise, x, sigmas, noise_sampler=seeded_noise_sampler(x, 42))
    c = function(toy_denoise, x, sigmas, noise_sampler=seeded_noise_sampler(x, 43))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # image i of a batch uses seed + i, so results do not depend on the batch: row 1 of seed 42 = row 0 of seed 43
    single = function(toy_denoise, x[1:], sigmas, noise_sampler=seeded_noise_sampler(x[1:], 43))
    assert torch.equal(a[1:], single)


def test_seeded_noise_continues_the_initial_noise_stream():
    """WebUI ImageRNG: one CPU generator per image yields its initial latent, then the ancestral noise."""
    x = torch.zeros(2, 4, 8, 8)
    sampler = seeded_noise_sampler(x, 7)
    first, second = sampler(torch.tensor(1.0), torch.tensor(0.5)), sampler(torch.tensor(0.5), torch.tensor(0.2))
    for row in range(2):
        stream = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(7 + row))
        assert torch.equal(first[row], stream[1]) and torch.equal(second[row], stream[2])
    fresh = seeded_noise_sampler(x, 7, after_initial_noise=False)(torch.tensor(1.0), torch.tensor(0.5))
    assert torch.equal(fresh[0], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_reports_every_step(name):
    spec = get_sampler(name)
    sigmas = sigmas_for(name, SD, 6)
    seen = []
    x = noise(11) * sigmas[0]
    out = spec.function(toy_denoise, x, sigmas, noise_sampler=seeded_noise_sampler(x, 0),
                        callback=lambda step, total, latent, x0: seen.append((step, total, latent.shape, x0.shape)))
    total = len(sigmas) - 1
    assert [s[:2] for s in seen] == [(i, total) for i in range(1, total + 1)]
    assert all(shape == x.shape for _, _, a, b in seen for shape in (a, b))
    assert torch.isfinite(out).all()


def test_sampler_names_and_aliases():
    assert list(SAMPLERS) == ["Euler", "Euler a", "DPM++ 2M Karras", "DPM++ 2S a Karras", "DDIM"]
    cases = {
        "euler": "Euler", "EULER": "Euler", "k_euler": "Euler",
        "euler_a": "Euler a", "k_euler_a": "Euler a", "Euler A": "Euler a", "euler_ancestral": "Euler a",
        "dpmpp_2m_karras": "DPM++ 2M Karras", "dpm++ 2m karras": "DPM++ 2M Karras", "k_dpmpp_2m_ka": "DPM++ 2M Karras",
        "dpmpp_2s_a_karras": "DPM++ 2S a Karras", "k_dpmpp_2s_a_ka": "DPM++ 2S a Karras",
        "ddim": "DDIM", "DDIM": "DDIM",
    }
    for alias, canonical in cases.items():
        assert get_sampler(alias).name == canonical == sampler_name(alias), alias
        assert not is_stand_in(alias)
    # every sd-scripts --sample_sampler choice is accepted
    sd_scripts = ["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                  "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"]
    for name in sd_scripts:
        assert get_sampler(name).name in SAMPLERS
        assert is_stand_in(name) == (name in STAND_INS)
    assert get_sampler("dpmsolver++").name == "DPM++ 2M Karras"


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError) as error:
        get_sampler("Euler b")
    message = str(error.value)
    assert "'Euler b'" in message
    for name in SAMPLERS:
        assert name in message
    with pytest.raises(ValueError):
        sigmas_for("DPM++ 2M", SD, 20)  # ambiguous across WebUI versions (Uniform before 1.9, Karras after)
