"""The UNet: full-size layouts equal the real checkpoints', and tiny configs compute what diffusers computes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from reference import keys_under, shapes_of

from lora_trainer.models.common import Conv2d
from lora_trainer.models.unet import (
    SD1_UNET,
    SD2_UNET,
    SDXL_UNET,
    UNetConfig,
    UNetModel,
    size_conditioning,
    unet_from_diffusers,
)


def meta_unet(config: UNetConfig) -> UNetModel:
    with torch.device("meta"):
        return UNetModel(config)


@pytest.mark.parametrize(("config", "reference"), [(SD1_UNET, "sd15"), (SDXL_UNET, "sdxl")])
def test_full_size_unet_has_the_checkpoint_layout(config, reference):
    assert shapes_of(meta_unet(config)) == keys_under(f"{reference}-checkpoint-keys.txt", "model.diffusion_model.")


def test_sd2_unet_is_sd1_with_linear_projections_and_openclip_context():
    """SD2's original config (v2-inference-v.yaml) differs from SD1 only in head width, context 1024 and linear proj."""
    sd1 = keys_under("sd15-checkpoint-keys.txt", "model.diffusion_model.")
    expected = {}
    for key, shape in sd1.items():
        if (".proj_in." in key or ".proj_out." in key) and key.endswith("weight"):
            shape = shape[:2]
        if ".attn2.to_k." in key or ".attn2.to_v." in key:
            shape = (shape[0], 1024)
        expected[key] = shape
    assert shapes_of(meta_unet(SD2_UNET)) == expected
    # heads follow the 64-wide head dim: 5, 10, 20 heads at 320, 640, 1280 channels
    model = meta_unet(SD2_UNET)
    assert model.input_blocks[1][1].transformer_blocks[0].attn1.heads == 5
    assert model.middle_block[1].transformer_blocks[0].attn1.heads == 20


# --- parity with diffusers on tiny configs ---------------------------------------------------------------

TINY = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, norm_groups=8)
TINY_CASES = {
    "sd1": (
        UNetConfig(**TINY, transformer_depth=(1, 1, 0), context_dim=24, num_heads=4),
        dict(
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24,
            attention_head_dim=4,  # diffusers' legacy name: this is the head COUNT for SD1
        ),
    ),
    "sd2": (
        UNetConfig(**TINY, transformer_depth=(1, 1, 0), context_dim=24, num_heads=None, head_dim=16, use_linear_projection=True),
        dict(
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24,
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
        ),
    ),
    "sdxl": (
        UNetConfig(
            **TINY,
            transformer_depth=(0, 2, 2),
            transformer_depth_middle=2,
            context_dim=24,
            num_heads=None,
            head_dim=16,
            use_linear_projection=True,
            adm_in_channels=16 + 6 * 256,
        ),
        dict(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=24,
            attention_head_dim=(2, 4, 4),
            transformer_layers_per_block=(1, 2, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=16 + 6 * 256,
        ),
    ),
}


def diffusers_unet(config: UNetConfig, extra: dict):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(config.model_channels * m for m in config.channel_mult),
        layers_per_block=config.num_res_blocks,
        norm_num_groups=config.norm_groups,
        **extra,
    ).eval()
    # diffusers zero-inits some output layers; randomise everything so every weight matters to the comparison
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.1 if parameter.ndim > 1 else 0.02)
    return model


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize("case", TINY_CASES)
@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_tiny_unet_matches_diffusers(case, size):
    config, extra = TINY_CASES[case]
    reference = diffusers_unet(config, extra)
    ours = UNetModel(config).eval()
    ours.load_state_dict(unet_from_diffusers(reference.state_dict(), config), strict=True)

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *size, generator=generator)
    timesteps = torch.tensor([999.0, 37.5])
    context = torch.randn(2, 11, 24, generator=generator)
    added = {}
    y = None
    if config.adm_in_channels:
        pooled = torch.randn(2, 16, generator=generator)
        time_ids = torch.tensor([[96.0, 160.0, 0.0, 8.0, 96.0, 128.0]] * 2)
        added = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        y = size_conditioning(pooled, (96, 160), (0, 8), (96, 128))
    with torch.no_grad():
        expected = reference(x, timesteps, encoder_hidden_states=context, **added).sample
        got = ours(x, timesteps, context, y)
    assert got.shape == expected.shape
    assert relative_error(got, expected) < 1e-4


def test_gradient_checkpointing_gives_the_same_gradients():
    config, _ = TINY_CASES["sd1"]
    torch.manual_seed(0)
    model = UNetModel(config).train()
    x = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 5, 24)
    t = torch.tensor([500.0])

    def grads(checkpointing: bool):
        model.zero_grad()
        model.set_gradient_checkpointing(checkpointing)
        model(x, t, context).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for plain, checkpointed in zip(grads(False), grads(True)):
        torch.testing.assert_close(plain, checkpointed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_is_close_to_fp32(dtype):
    config, _ = TINY_CASES["sd2"]
    torch.manual_seed(0)
    model = UNetModel(config).eval()
    x, context, t = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 24), torch.tensor([10.0])
    with torch.no_grad():
        full = model(x, t, context)
        half = model.to(dtype)(x.to(dtype), t, context.to(dtype)).float()
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert relative_error(half, full) < 0.05


def test_sdxl_unet_refuses_to_run_without_its_vector_conditioning():
    config, _ = TINY_CASES["sdxl"]
    model = UNetModel(dataclasses.replace(config))
    with pytest.raises(ValueError, match="size_conditioning"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 3, 24))


def _kernels(run) -> set[str]:
    with torch.profiler.profile() as profile:
        run()
    return {event.name for event in profile.events()}


@pytest.mark.parametrize(("stride", "padding", "bias"), [(1, 1, True), (2, 1, False), (2, 0, True)])
def test_small_cpu_convolution_takes_the_im2col_kernel_and_computes_what_conv2d_does(stride, padding, bias):
    """The 3×3 convolutions of a small model skip oneDNN's per-call setup, forward and backward, with the same result."""
    torch.manual_seed(0)
    layer = Conv2d(8, 6, 3, stride=stride, padding=padding, bias=bias)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    ours = layer(x)
    kernels = _kernels(lambda: layer(x).sum().backward())
    expected_input = x.detach().clone().requires_grad_()
    expected = F.conv2d(expected_input, layer.weight, layer.bias, stride, padding)
    gradient = torch.randn_like(expected)
    ours_grads = torch.autograd.grad(ours, [x, *layer.parameters()], gradient)
    expected_grads = torch.autograd.grad(expected, [expected_input, *layer.parameters()], gradient)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(ours_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "aten::_slow_conv2d_forward" in kernels and "aten::_slow_conv2d_backward" in kernels
    assert "aten::mkldnn_convolution" not in kernels


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_large_cpu_convolution_stays_on_onednn():
    layer = Conv2d(64, 64, 3, padding=1)
    x = torch.randn(1, 64, 64, 64)
    with torch.no_grad():
        kernels = _kernels(lambda: layer(x))
    assert "aten::mkldnn_convolution" in kernels and "aten::_slow_conv2d_forward" not in kernels


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_a_small_convolution_over_a_large_batch_stays_on_onednn():
    """torch's im2col kernel unfolds one sample at a time: 8 images with guidance (a batch of 16) generated 16 % slower
    through it, while the same layer over a training batch of 2 is cheaper there."""
    layer = Conv2d(32, 32, 3, padding=1)
    with torch.no_grad():
        large = _kernels(lambda: layer(torch.randn(16, 32, 4, 4)))
        small = _kernels(lambda: layer(torch.randn(2, 32, 4, 4)))
    assert "aten::mkldnn_convolution" in large and "aten::_slow_conv2d_forward" not in large
    assert "aten::_slow_conv2d_forward" in small
