"""--fp8_base: the frozen base weights take one byte each and the model still computes what it computed."""

from __future__ import annotations

import torch
from torch import nn

from lora_trainer.models.checkpoint import load_checkpoint
from lora_trainer.models.fp8 import FP8, store_in_fp8
from lora_trainer.models.unet import SDXL_UNET, UNetModel
from lora_trainer.networks.naming import unet_targets
from lora_trainer.tiny_model.build import TINY_MODEL_PATH


def test_a_full_size_sdxl_unet_in_bf16_halves_to_under_two_and_a_half_gib():
    with torch.device("meta"):
        unet = UNetModel(SDXL_UNET).to(torch.bfloat16)
    before = sum(p.numel() * p.element_size() for p in unet.parameters())
    saved = store_in_fp8(unet)
    after = sum(p.numel() * p.element_size() for p in unet.parameters())
    assert before - after == saved
    assert before > 4.7 * 2**30 and after < 2.4 * 2**30
    # norms keep their precision: they set the precision the UNet computes in
    assert unet.out[0].weight.dtype == torch.bfloat16 and unet.out[2].weight.dtype == FP8


def test_the_tiny_model_in_fp8_predicts_nearly_the_same_noise_and_passes_gradients_to_its_inputs():
    model = load_checkpoint(TINY_MODEL_PATH)
    unet = model.unet.requires_grad_(False)
    keys = list(unet.state_dict())
    torch.manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, model.config.unet.context_dim)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        full = unet(x, t, context)
    classes = {t.name: t.sd_scripts_blocks[-1] for t in unet_targets(model.config, unet)}
    store_in_fp8(unet)
    assert list(unet.state_dict()) == keys  # same names: networks and files find the same layers
    assert all(layer.weight.dtype == FP8 for layer in unet.modules() if isinstance(layer, (nn.Linear, nn.Conv2d)))
    # LyCORIS presets still find the layers by their class (Linear, Conv2d), not by the fp8 subclass
    assert {t.name: t.sd_scripts_blocks[-1] for t in unet_targets(model.config, unet)} == classes
    context.requires_grad_(True)  # a text-encoder LoRA learns through the UNet's frozen fp8 layers
    fp8 = unet(x, t, context)
    relative = ((fp8 - full).norm() / full.norm()).item()
    assert 0 < relative < 0.1
    fp8.square().mean().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0


def test_fp8_layers_keep_only_their_fp8_weight_for_backward_and_give_the_same_gradients():
    """The upcast copy of each frozen weight was kept for the input's gradient: until backward every layer was held
    twice (fp8 and 16 bits), so --fp8_base without gradient checkpointing took more memory than no fp8 (a review
    measured 550 against 129 MiB kept a step on a small SD1 model). Now only the fp8 weight (and the input) is kept."""
    import copy

    from lora_trainer.models.common import Conv2d, PointwiseConv2d
    from lora_trainer.models.fp8 import to_fp8

    torch.manual_seed(0)
    for layer, shape in ((nn.Linear(64, 96), (3, 10, 64)), (Conv2d(16, 24, 3, padding=1), (2, 16, 12, 12)),
                         (PointwiseConv2d(16, 24), (2, 16, 8, 8))):
        upcast = copy.deepcopy(layer).requires_grad_(False)  # the same fp8-rounded weights, stored in bf16
        upcast.weight.data, upcast.bias.data = to_fp8(upcast.weight).to(torch.bfloat16), upcast.bias.to(torch.bfloat16)
        store_in_fp8(nn.Sequential(layer))
        layer.requires_grad_(False)
        x = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.dtype) or t, lambda t: t):
            out = layer(x)
        assert kept == [FP8], (type(layer).__name__, kept)
        out.square().sum().backward()
        gradient, x.grad = x.grad, None
        expected = upcast(x)
        expected.square().sum().backward()
        assert torch.equal(out, expected) and torch.equal(gradient, x.grad)
