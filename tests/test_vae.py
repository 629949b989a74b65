"""The VAE: full-size layouts equal the real checkpoints', tiny configs compute what diffusers computes, and the
tiny kohya checkpoint's VAE loads and round-trips."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from reference import REFERENCE, TINY_KOHYA_CHECKPOINT, keys_under, shapes_of
from safetensors.torch import load_file

from lora_trainer.models.vae import (
    SD_VAE,
    SDXL_VAE,
    AutoencoderKL,
    DiagonalGaussian,
    VAEConfig,
    normalize_vae_state_dict,
    vae_from_diffusers,
)

PREFIX = "first_stage_model."


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize(("config", "reference"), [(SD_VAE, "sd15"), (SDXL_VAE, "sdxl")])
def test_full_size_vae_has_the_checkpoint_layout(config, reference):
    with torch.device("meta"):
        model = AutoencoderKL(config)
    assert shapes_of(model) == keys_under(f"{reference}-checkpoint-keys.txt", PREFIX)


def test_sd_and_sdxl_vaes_differ_only_in_scaling_factor():
    assert dataclasses.replace(SDXL_VAE, scaling_factor=SD_VAE.scaling_factor) == SD_VAE
    assert (SD_VAE.scaling_factor, SDXL_VAE.scaling_factor) == (0.18215, 0.13025)
    assert SD_VAE.downscale == 8


# --- parity with diffusers on tiny configs ---------------------------------------------------------------

TINY_CASES = {
    "two-levels": VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8),
    "three-levels": VAEConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2, norm_groups=8),
}


def diffusers_vae(config: VAEConfig, seed: int = 0):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    levels = len(config.channel_mult)
    torch.manual_seed(seed)
    model = DiffusersAutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.base_channels * m for m in config.channel_mult),
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        norm_num_groups=config.norm_groups,
    ).eval()
    with torch.no_grad():  # random everything (norms included) so every weight matters to the comparison
        for parameter in model.parameters():
            parameter.normal_(0, 0.1 if parameter.ndim > 1 else 0.3)
    return model


@pytest.mark.parametrize("case", TINY_CASES)
def test_tiny_vae_matches_diffusers(case):
    config = TINY_CASES[case]
    reference = diffusers_vae(config)
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(vae_from_diffusers(reference.state_dict()), strict=True)

    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 24, 40, generator=generator) * 2 - 1  # odd latent sizes exercise the padding
    z = torch.randn(2, 4, 5, 7, generator=generator)
    with torch.no_grad():
        expected = reference.encode(images).latent_dist
        posterior = ours.encode(images)
        decoded_expected = reference.decode(z).sample
        decoded = ours.decode(z)
    assert posterior.mean.shape == expected.mean.shape
    assert relative_error(posterior.mean, expected.mean) < 1e-4
    assert relative_error(posterior.logvar, expected.logvar) < 1e-4
    assert decoded.shape == decoded_expected.shape == (2, 3, 5 * config.downscale, 7 * config.downscale)
    assert relative_error(decoded, decoded_expected) < 1e-4


def test_older_diffusers_attention_names_convert_too():
    config = TINY_CASES["two-levels"]
    state = diffusers_vae(config).state_dict()
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state.items():
        for new, old in old_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[key] = value
    assert any(".proj_attn." in k for k in renamed)
    converted = vae_from_diffusers(renamed)
    expected = vae_from_diffusers(state)
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


# --- the tiny kohya checkpoint ---------------------------------------------------------------------------


def tiny_kohya_vae_config() -> VAEConfig:
    widths = json.loads((TINY_KOHYA_CHECKPOINT.parent / "tiny_sd15_config.json").read_text(encoding="utf-8"))
    return VAEConfig(base_channels=widths["vae_ch"], channel_mult=tuple(widths["vae_ch_mult"]))


@pytest.fixture(scope="module")
def tiny_kohya_vae() -> AutoencoderKL:
    state = load_file(TINY_KOHYA_CHECKPOINT)
    vae = AutoencoderKL(tiny_kohya_vae_config()).eval()
    vae.load_state_dict({k[len(PREFIX) :]: v.float() for k, v in state.items() if k.startswith(PREFIX)}, strict=True)
    return vae


def test_tiny_kohya_checkpoint_vae_round_trips_an_image(tiny_kohya_vae):
    image = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = tiny_kohya_vae.encode_latents(image, generator=torch.Generator().manual_seed(0))
        decoded = tiny_kohya_vae.decode_latents(latents)
    assert latents.shape == (1, 4, 8, 6) and torch.isfinite(latents).all()
    assert decoded.shape == image.shape and torch.isfinite(decoded).all()
    assert decoded.abs().max() <= 1.0


def load_png(path) -> torch.Tensor:
    from PIL import Image

    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1


def test_kohyas_cached_latents_are_samples_of_our_posterior(tiny_kohya_vae):
    """sd-scripts cached ``latent_dist.sample()`` of img_000 and of its mirror image with this checkpoint's VAE.

    A sample cannot be compared exactly, and this random VAE's posterior is wide (std ~ 1, means ~ 0.25 apart
    between images), so the check is statistical: each cached sample is a plausible N(0, 1) draw under our
    posterior of its own image, and likelier there than under our posterior of the mirror or of another image.
    """
    pytest.importorskip("PIL")
    fixtures = REFERENCE / "kohya-fixtures"
    cache = np.load(fixtures / "latent-cache-examples" / "img_000_0128x0128_sd.npz")
    image = load_png(fixtures / "dataset" / "train" / "10_shapes" / "img_000.png")
    other = load_png(fixtures / "dataset" / "train" / "10_shapes" / "img_001.png")
    with torch.no_grad():
        plain, mirrored, unrelated = (tiny_kohya_vae.encode(x) for x in (image, image.flip(-1), other))

    def nll(sample, posterior: DiagonalGaussian) -> float:
        z = (sample - posterior.mean) / posterior.std
        return (0.5 * z.square() + 0.5 * posterior.logvar).mean().item()

    cases = (("latents", plain, (mirrored, unrelated)), ("latents_flipped", mirrored, (plain, unrelated)))
    for key, own, others in cases:
        sample = torch.from_numpy(cache[key])[None]
        standardized = (sample - own.mean) / own.std
        assert standardized.shape == (1, 4, 16, 16)
        assert standardized.mean().abs() < 0.1 and 0.9 < standardized.std() < 1.1  # 1024 draws of N(0, 1)
        assert all(nll(sample, own) < nll(sample, wrong) - 0.02 for wrong in others)


# --- the posterior and the scaled-latent API -------------------------------------------------------------


def test_posterior_clamps_logvar_and_samples_reproducibly():
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 50.0)], dim=1)
    moments[:, 4, 0, 0] = -100.0
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar.max() == 20.0 and posterior.logvar.min() == -30.0
    assert torch.equal(posterior.std, torch.exp(0.5 * posterior.logvar))
    assert torch.equal(posterior.mode(), posterior.mean)
    a = posterior.sample(torch.Generator().manual_seed(3))
    b = posterior.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, posterior.mean)


def test_encode_and_decode_latents_apply_shift_and_scale():
    config = dataclasses.replace(TINY_CASES["two-levels"], scaling_factor=0.5, shift_factor=0.25)
    torch.manual_seed(0)
    vae = AutoencoderKL(config).eval()
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(images).mean
        torch.testing.assert_close(vae.encode_latents(images, sample=False), (mean - 0.25) * 0.5)
        latents = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(vae.decode_latents(latents), vae.decode(latents / 0.5 + 0.25).clamp(-1, 1))


# --- separate VAE files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_diffusers_state():
    return diffusers_vae(TINY_CASES["three-levels"]).state_dict()


def test_normalize_accepts_prefixed_ldm_keys_and_ignores_the_rest_of_a_checkpoint(tiny_diffusers_state):
    ours = vae_from_diffusers(tiny_diffusers_state)
    checkpoint = {PREFIX + k: v for k, v in ours.items()}
    checkpoint["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    checkpoint["cond_stage_model.transformer.text_model.final_layer_norm.bias"] = torch.zeros(8)
    normalized = normalize_vae_state_dict(checkpoint)
    assert normalized.keys() == ours.keys()


def test_normalize_accepts_bare_ldm_keys_and_drops_training_leftovers(tiny_diffusers_state):
    ours = vae_from_diffusers(tiny_diffusers_state)
    vae_file = dict(ours)
    vae_file["loss.logvar"] = torch.zeros(())
    vae_file["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    vae_file["model_ema.decay"] = torch.tensor(0.999)
    normalized = normalize_vae_state_dict(vae_file)
    assert normalized.keys() == ours.keys()
    AutoencoderKL(TINY_CASES["three-levels"]).load_state_dict(normalized, strict=True)
    # a tool that saved the mid-block attention as linear weights: reshaped back to 1x1 convs
    linear = {k: (v[:, :, 0, 0] if ".attn_1." in k and v.ndim == 4 else v) for k, v in ours.items()}
    assert {k: v.shape for k, v in normalize_vae_state_dict(linear).items()} == {k: v.shape for k, v in ours.items()}


def test_normalize_accepts_diffusers_keys(tiny_diffusers_state):
    normalized = normalize_vae_state_dict(dict(tiny_diffusers_state))
    model = AutoencoderKL(TINY_CASES["three-levels"])
    model.load_state_dict(normalized, strict=True)
    assert normalized["decoder.up.0.block.0.conv1.weight"].shape == (16, 32, 3, 3)  # full resolution, after reversal
    assert normalize_vae_state_dict({"state_dict": dict(tiny_diffusers_state)}).keys() == normalized.keys()
    broken = {**tiny_diffusers_state, "encoder.mid_block.attentions.0.to_qkv.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="to_qkv"):
        normalize_vae_state_dict(broken)


@pytest.mark.parametrize(
    "state",
    [
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "lora_unet_x.alpha": torch.zeros(())},
        {},
    ],
    ids=["unet", "empty"],
)
def test_normalize_refuses_what_is_not_a_vae(state):
    with pytest.raises(ValueError, match="not a VAE") as error:
        normalize_vae_state_dict(state)
    message = str(error.value)
    assert "expected" in message and "first_stage_model." in message
    assert "encoder.down.0.block.0.conv1.weight" in message and "encoder.down_blocks.0.resnets.0" in message
    if state:
        assert "found 2 tensors" in message and "model.diffusion_model.input_blocks.0.0.weight" in message


# --- training and precision ------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients():
    config = TINY_CASES["two-levels"]
    torch.manual_seed(0)
    model = AutoencoderKL(config).train()
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    calls = []
    # a pre-hook: non-reentrant checkpointing may stop recomputing a block before its forward returns
    model.encoder.mid.attn_1.register_forward_pre_hook(lambda *_: calls.append(1))

    def grads(checkpointing: bool):
        model.zero_grad()
        model.set_gradient_checkpointing(checkpointing)
        model(images, torch.Generator().manual_seed(0)).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads(False)
    assert len(calls) == 1
    checkpointed = grads(True)
    assert len(calls) == 3  # recomputed in backward: checkpointing is really on
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_is_close_to_fp32(dtype):
    config = TINY_CASES["three-levels"]
    torch.manual_seed(0)
    model = AutoencoderKL(config).eval()
    images = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        latents = model.encode_latents(images, torch.Generator().manual_seed(0))
        decoded = model.decode_latents(latents)
        model.to(dtype)
        half_latents = model.encode_latents(images, torch.Generator().manual_seed(0))
        half_decoded = model.decode_latents(half_latents)
    assert half_latents.dtype == dtype and half_decoded.dtype == dtype
    assert torch.isfinite(half_decoded.float()).all()
    assert relative_error(half_latents.float(), latents) < 0.05
    assert relative_error(half_decoded.float(), decoded) < 0.05
