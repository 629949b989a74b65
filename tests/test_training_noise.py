"""The noise, targets and loss weights of a training step are sd-scripts' (diffusers' DDPM scheduler as reference)."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.sampling.schedule import NoiseSchedule
from lora_trainer.training import noise as N

ABAR = NoiseSchedule().alphas_cumprod
SNR = NoiseSchedule().loss_weighting_snr


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_forward_process_and_velocity_equal_diffusers_ddpm_scheduler():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              clip_sample=False)
    scheduler.alphas_cumprod = ABAR.clone()  # same table: diffusers builds it in float32 arithmetic
    latents, noise = torch.randn(4, 4, 8, 8, generator=_generator(1)), torch.randn(4, 4, 8, 8, generator=_generator(2))
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(N.add_noise(latents, noise, t, ABAR), scheduler.add_noise(latents, noise, t))
    torch.testing.assert_close(N.velocity(latents, noise, t, ABAR), scheduler.get_velocity(latents, noise, t))


def test_same_generator_same_noise_and_timesteps():
    latents = torch.randn(2, 4, 8, 8)
    assert torch.equal(N.training_noise(latents, _generator(), 0.1), N.training_noise(latents, _generator(), 0.1))
    assert torch.equal(N.sample_timesteps(8, _generator(), 1000), N.sample_timesteps(8, _generator(), 1000))
    assert not torch.equal(N.sample_timesteps(8, _generator(0), 1000), N.sample_timesteps(8, _generator(1), 1000))


def test_noise_offset_shifts_whole_channels_and_timestep_range_is_respected():
    latents = torch.zeros(64, 4, 16, 16)
    plain = N.training_noise(latents, _generator(), None)
    offset = N.training_noise(latents, _generator(), 5.0)
    # a per-channel constant of std 5 on top of unit noise: channel means spread out by about 5
    assert plain.mean(dim=(2, 3)).std() < 0.2 and 3.5 < offset.mean(dim=(2, 3)).std() < 6.5
    t = N.sample_timesteps(1000, _generator(), 1000, min_timestep=200, max_timestep=300)
    assert t.min() >= 200 and t.max() < 300
    assert torch.equal(N.sample_timesteps(3, _generator(), 1000, 500, 500), torch.tensor([500, 500, 500]))


def test_pyramid_noise_has_unit_variance_and_is_spatially_correlated_unlike_white_noise():
    latents = torch.zeros(8, 4, 32, 32)
    pyramid = N.training_noise(latents, _generator(), multires_noise_iterations=6, multires_noise_discount=0.8)
    white = N.training_noise(latents, _generator())

    def neighbour_correlation(x):
        return torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1].item()

    assert abs(pyramid.std().item() - 1) < 1e-4
    assert neighbour_correlation(pyramid) > 0.15 and abs(neighbour_correlation(white)) < 0.05


def test_min_snr_weights_follow_the_paper_for_eps_and_v():
    t = torch.tensor([10, 300, 900])
    snr = ABAR[t] / (1 - ABAR[t])
    eps = N.loss_weights(t, SNR, v_prediction=False, min_snr_gamma=5.0)
    v = N.loss_weights(t, SNR, v_prediction=True, min_snr_gamma=5.0)
    torch.testing.assert_close(eps, torch.clamp(snr, max=5.0) / snr)
    torch.testing.assert_close(v, torch.clamp(snr, max=5.0) / (snr + 1))
    assert eps[0] < 0.1 and eps[2] == pytest.approx(1.0)  # easy (low-noise) steps are down-weighted


def test_debiased_and_v_like_weights():
    t = torch.tensor([50, 700])
    snr = torch.clamp(ABAR[t] / (1 - ABAR[t]), max=1000)
    torch.testing.assert_close(N.loss_weights(t, SNR, False, debiased_estimation_loss=True), 1 / snr.sqrt())
    scale = snr / (snr + 1)
    torch.testing.assert_close(N.loss_weights(t, SNR, False, v_pred_like_loss=0.5), 1 + 0.5 / scale)


def test_huber_losses_behave_like_l2_for_small_errors_and_l1_for_large_ones():
    prediction = torch.tensor([[0.001, 10.0]]).view(1, 2, 1, 1)
    target = torch.zeros_like(prediction)
    c = torch.tensor([0.1])
    huber = N.elementwise_loss(prediction, target, "huber", c).flatten()
    assert huber[0] == pytest.approx(0.001**2, rel=1e-2)  # 2c(√(x²+c²) − c) ≈ x² for |x| ≪ c
    assert huber[1] == pytest.approx(2 * 0.1 * (10 - 0.1), rel=1e-3)  # ≈ 2c|x| for |x| ≫ c
    thresholds = N.huber_threshold(torch.tensor([0, 999]), "snr", 0.1, 1.0, ABAR)
    assert thresholds[0] > 0.9 and thresholds[1] == pytest.approx(0.1, abs=1e-2)  # c at pure noise


def test_offset_and_pyramid_noise_both_apply_when_both_are_asked_for():
    """sd-scripts adds the offset, then builds the pyramid on that noise: asking for both must not drop one."""
    latents = torch.randn(2, 4, 16, 16)
    both = N.training_noise(latents, _generator(), noise_offset=0.1, multires_noise_iterations=6)
    offset_only = N.training_noise(latents, _generator(), noise_offset=0.1)
    generator = _generator()
    by_hand = N.pyramid_noise(N.training_noise(latents, generator, noise_offset=0.1), generator, 6, 0.3)
    assert not torch.equal(both, offset_only) and torch.equal(both, by_hand)


def test_huber_thresholds_follow_sd_scripts_schedules():
    """sd-scripts' ``get_huber_threshold_if_needed``: constant c·scale; exponential exp(−(−ln c / T)·t)·scale, so
    scale at t = 0 falling to c·scale at t = T; snr (1 − c)/(1 + σ)² + c, where huber_scale plays no part."""
    c, scale = 0.1, 2.0
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(N.huber_threshold(t, "constant", c, scale, ABAR), torch.full((3,), c * scale))
    exponential = N.huber_threshold(t, "exponential", c, scale, ABAR)
    torch.testing.assert_close(exponential, scale * c ** (t.double() / 1000), check_dtype=False)
    sigma = ((1 - ABAR[t].double()) / ABAR[t].double()).sqrt()
    by_snr = (1 - c) / (1 + sigma) ** 2 + c
    torch.testing.assert_close(N.huber_threshold(t, "snr", c, scale, ABAR), by_snr, check_dtype=False)
    torch.testing.assert_close(N.huber_threshold(t, "snr", c, 1.0, ABAR), by_snr, check_dtype=False)


def test_timesteps_cover_the_whole_schedule_when_no_bound_is_given():
    """sd-scripts draws randint(0, T): every timestep from 0 to T − 1, the purest noise included."""
    t = N.sample_timesteps(20000, _generator(), 1000)
    assert t.min() == 0 and t.max() == 999


def test_input_perturbation_adds_gamma_times_fresh_noise_and_random_strength_scales_gamma():
    """--ip_noise_gamma: the input is noised with ε + γ·ε' (the target stays ε); with random strength γ·u, u ~ U[0, 1)."""
    noise = torch.randn(2, 4, 8, 8, generator=_generator(5))
    reference = _generator()
    perturbed = N.perturbed_input(noise, _generator(), 0.5)
    torch.testing.assert_close(perturbed, noise + 0.5 * torch.randn(noise.shape, generator=reference))
    reference = _generator()
    strength = 0.5 * float(torch.rand((), generator=reference))
    random = N.perturbed_input(noise, _generator(), 0.5, random_strength=True)
    torch.testing.assert_close(random, noise + strength * torch.randn(noise.shape, generator=reference))
    assert N.perturbed_input(noise, _generator(), None) is noise


def test_adaptive_noise_offset_grows_with_the_size_of_each_channels_mean_whatever_its_sign():
    """sd-scripts' ``apply_noise_offset``: offset + scale·|mean of the channel| (clamped at 0) times one draw per
    channel; a dark latent (negative mean) gets a larger offset, not a smaller one."""
    latents = torch.full((2, 4, 8, 8), -1.0)
    reference = _generator()
    white = torch.randn(latents.shape, generator=reference)
    per_channel = torch.randn((2, 4, 1, 1), generator=reference)
    got = N.training_noise(latents, _generator(), noise_offset=0.1, adaptive_noise_scale=0.5)
    torch.testing.assert_close(got, white + (0.1 + 0.5 * 1.0) * per_channel)


def test_pyramid_noise_adds_each_coarser_level_weighted_by_the_next_power_of_the_discount():
    """sd-scripts' ``pyramid_noise_like``: level i (shrunk by a random r ∈ [2, 4) to the i-th power) is upsampled
    and added times discount**i, so the full-size level 0 counts fully; then the sum is rescaled to unit std."""
    latents = torch.zeros(1, 1, 16, 16)
    reference = _generator()
    white = torch.randn(latents.shape, generator=reference)
    torch.rand((), generator=reference)  # level 0's factor: r**0 = 1 whatever it is
    level0 = torch.randn(latents.shape, generator=reference)
    r = float(torch.rand((), generator=reference)) * 2 + 2
    size = int(16 / r)
    level1 = torch.nn.functional.interpolate(torch.randn((1, 1, size, size), generator=reference), size=(16, 16),
                                             mode="bilinear")
    by_hand = white + level0 + 0.3 * level1
    got = N.training_noise(latents, _generator(), multires_noise_iterations=2, multires_noise_discount=0.3)
    torch.testing.assert_close(got, by_hand / by_hand.std())
