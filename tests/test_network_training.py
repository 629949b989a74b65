"""Trainable networks: step 0 changes nothing, and what the hooked model computes is what the saved file merges to."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from reference import REFERENCE
from safetensors import safe_open

from lora_trainer.models.checkpoint import build_models
from lora_trainer.models.configs import SD2, SDXL
from lora_trainer.networks.apply import MergedNetworks, Strength
from lora_trainer.networks.files import read_network
from lora_trainer.networks.lycoris_presets import LYCORIS_PRESETS
from lora_trainer.networks.network import base_metadata, block_index, create_network, kohya_hashes, save_network
from lora_trainer.networks.spec import NetworkSpec, spec_from_kohya
from lora_trainer.tiny_model.build import TINY_MODEL_PATH, tiny_config, tiny_like
from lora_trainer.train_network import main as train_main
from lora_trainer.training.events import read_events

SD1_TINY = tiny_config()


CONFIGS = {"sd1": SD1_TINY, "sd2": tiny_like(SD2), "sdxl": tiny_like(SDXL)}
SPECS = {
    "lora": NetworkSpec(dim=4, alpha=2),
    "locon": NetworkSpec(dim=4, alpha=2, conv_dim=2, conv_alpha=1),
    "loha": NetworkSpec(algorithm="loha", dim=2, alpha=1, conv_dim=2),
    "lokr": NetworkSpec(algorithm="lokr", dim=2, alpha=1, conv_dim=2, factor=4),
    "dylora": NetworkSpec(algorithm="dylora", dim=4, alpha=4, unit=2),
    "dora": NetworkSpec(dim=4, alpha=2, dora=True),
    # k×k convolutions as a Tucker core between 1×1 factors (LyCORIS use_tucker): LoCon through its three
    # convolutions, LoHa through ΔW
    # LyCORIS train_norm: the GroupNorm/LayerNorm layers inside the preset's blocks shift their γ and β
    "norms": NetworkSpec(dim=2, alpha=1, network_module="lycoris.kohya", preset="attn-mlp",
                         lycoris=LYCORIS_PRESETS["attn-mlp"], train_norm=True),
    "full": NetworkSpec(algorithm="full", network_module="lycoris.kohya", preset="attn-only",
                        lycoris=LYCORIS_PRESETS["attn-only"]),
    # LyCORIS's other trainable algorithms, on the attention layers
    "ia3": NetworkSpec(algorithm="ia3", network_module="lycoris.kohya", preset="attn-only", lycoris=LYCORIS_PRESETS["attn-only"]),
    "diag-oft": NetworkSpec(algorithm="diag-oft", dim=4, constraint=0.5, rescaled=True, network_module="lycoris.kohya",
                            preset="attn-only", lycoris=LYCORIS_PRESETS["attn-only"]),
    "boft": NetworkSpec(algorithm="boft", dim=8, constraint=0.25, rescaled=True, network_module="lycoris.kohya",
                        preset="attn-only", lycoris=LYCORIS_PRESETS["attn-only"]),
    "glora": NetworkSpec(algorithm="glora", dim=2, alpha=1, network_module="lycoris.kohya", preset="attn-mlp",
                         lycoris=LYCORIS_PRESETS["attn-mlp"]),
    # LyCORIS use_scalar: ΔW times a trained scalar, folded into a factor in the file
    "lora-scalar": NetworkSpec(dim=4, alpha=2, conv_dim=2, use_scalar=True, network_module="lycoris.kohya"),
    "loha-scalar": NetworkSpec(algorithm="loha", dim=2, alpha=1, use_scalar=True, network_module="lycoris.kohya"),
    "locon-tucker": NetworkSpec(dim=4, alpha=2, conv_dim=2, conv_alpha=1, tucker=True),
    "loha-tucker": NetworkSpec(algorithm="loha", dim=2, alpha=1, conv_dim=2, tucker=True),
    # a LyCORIS preset with block maps: LoKr attention, LoHa feed-forward with DoRA, LoRA elsewhere, in one network
    "mixed": NetworkSpec(dim=2, alpha=1, conv_dim=2, conv_alpha=1, network_module="lycoris.kohya", preset="maps.toml",
                         lycoris=dataclasses.replace(LYCORIS_PRESETS["full"], module_options=(
                             ("CrossAttention", (("algorithm", "lokr"), ("factor", 4))),
                             ("FeedForward", (("algorithm", "loha"), ("dora", True))),
                             ("ResnetBlock2D", (("dim", 4),))))),
}


def _models(name: str):
    torch.manual_seed(0)
    config = CONFIGS[name]
    unet, text_encoders, _ = build_models(config, device="cpu")
    for module in (unet, *text_encoders):
        module.eval()
    return config, unet, text_encoders


def _inputs(config):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49408, (2, 77), generator=generator)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    y = None if config.unet.adm_in_channels is None else torch.randn(2, config.unet.adm_in_channels, generator=generator)
    return ids, x, y


@torch.no_grad()
def _outputs(config, unet, text_encoders):
    ids, x, y = _inputs(config)
    hidden = [encoder(ids).hidden for encoder in text_encoders]
    context = torch.cat(hidden, dim=-1)
    return [*hidden, unet(x, torch.tensor([10, 500]), context, y)]


@pytest.mark.parametrize("algorithm", SPECS)
def test_a_fresh_network_changes_nothing_at_step_zero(algorithm):
    config, unet, text_encoders = _models("sd1")
    before = _outputs(config, unet, text_encoders)
    network = create_network(config, unet, text_encoders, SPECS[algorithm]).apply_to()
    after = _outputs(config, unet, text_encoders)
    for b, a in zip(before, after):
        if algorithm in ("dora", "mixed"):  # the magnitude divides by ‖W‖ + eps: equal up to float32 rounding through the UNet
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, b)
    assert len(network.unet_modules()) > 0 and len(network.text_encoder_modules()) > 0
    if algorithm == "mixed":
        assert {m.algorithm for m in network.values()} == {"lora", "loha", "lokr"}
    if algorithm.endswith("tucker"):
        assert any(key.endswith(("lora_mid.weight", "hada_t1")) for key in network.state_dict())
    if algorithm == "norms":
        assert {m.algorithm for m in network.values()} == {"lora", "norm"}
    if algorithm.endswith("scalar"):
        assert all(float(m.scalar) == 0 for m in network.values()) and "scalar" not in " ".join(network.file_tensors())


@pytest.mark.parametrize("model", CONFIGS)
@pytest.mark.parametrize("algorithm", SPECS)
def test_trained_network_saved_and_merged_gives_the_same_outputs_as_its_forward_hooks(tmp_path, model, algorithm):
    config, unet, text_encoders = _models(model)
    network = create_network(config, unet, text_encoders, SPECS[algorithm])
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1 + (1.0 if name.endswith("dora_scale") else 0.0))
    if algorithm == "mixed":
        assert {m.algorithm for m in network.values()} == {"lora", "loha", "lokr"}
    network.eval().apply_to()
    hooked = _outputs(config, unet, text_encoders)
    network.remove()
    base = _outputs(config, unet, text_encoders)

    path = save_network(network.file_tensors(), tmp_path / f"{algorithm}.safetensors", base_metadata(config, network.spec, algorithm), "fp32")
    merged = MergedNetworks.for_model(config, unet, text_encoders)
    (report,) = merged.set_networks([(read_network(path), Strength(1.0))])
    assert report.unmatched == [] and len(report.matched) == len(network)
    for h, m, b in zip(hooked, _outputs(config, unet, text_encoders), base):
        assert not torch.allclose(h, b)  # the network does something ...
        assert_close_at_scale(m, h, 1e-4, floor=1e-5)  # ... and the file merges to exactly that
    merged.restore()
    for b, r in zip(base, _outputs(config, unet, text_encoders)):
        assert torch.equal(b, r)


def _step_through(config, unet, text_encoders, network, merge_below: int):
    """Outputs, the network's gradients and the FLOPs of one training forward and backward, with LoRAs on products
    below ``merge_below`` multiply-adds run through their merged weight."""
    from torch.utils.flop_counter import FlopCounterMode

    for module in network.values():
        module.merge_below = merge_below
    network.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # DyLoRA draws its ranks from torch's generator
    with FlopCounterMode(display=False) as counter:
        outputs = _outputs_with_grad(config, unet, text_encoders)
        sum(o.square().mean() for o in outputs).backward()
    gradients = {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}  # DyLoRA: its block
    return outputs, gradients, counter.get_total_flops()


def _outputs_with_grad(config, unet, text_encoders):
    ids, x, y = _inputs(config)
    hidden = [encoder(ids).hidden for encoder in text_encoders]
    return [*hidden, unet(x, torch.tensor([10, 500]), torch.cat(hidden, dim=-1), y)]


def assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, fraction: float, floor: float,
                          msg: str | None = None) -> None:
    """Equal up to fp32 rounding: within ``fraction`` of ``expected``'s largest magnitude, plus ``floor`` for a tensor
    that is rounding noise itself (a gradient of ≈ 1e-12). The two paths sum in different orders, and each torch
    version's kernels in their own (the WebUI's torch 2.1 differs by ≈ 1e-5 of the outputs' scale and by ≈ 1e-3 of a
    gradient's); a real error (a wrong scale, a missing path) is far larger."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=floor + fraction * scale, msg=msg)


@pytest.mark.parametrize("model, algorithm", [("sd1", "locon"), ("sd2", "lora"), ("sd1", "dylora"), ("sdxl", "lora-scalar")])
def test_a_small_layers_lora_through_its_merged_weight_trains_exactly_as_through_its_factors(model, algorithm):
    """Small products take the merged weight W + s·up·down (fewer products: faster on a tiny model); the output and
    every gradient are the factored LoRA's, for Linear, 1×1 and 3×3 convolutions, DyLoRA and LyCORIS's scalar."""
    config, unet, text_encoders = _models(model)
    network = create_network(config, unet, text_encoders, SPECS[algorithm])
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    network.train().apply_to()
    factored, factored_grads, factored_flops = _step_through(config, unet, text_encoders, network, merge_below=0)
    merged, merged_grads, merged_flops = _step_through(config, unet, text_encoders, network, merge_below=2**40)
    assert merged_flops != factored_flops  # the shortcut was taken
    for f, m in zip(factored, merged):
        assert_close_at_scale(m, f, 1e-4, floor=1e-5)
    assert merged_grads.keys() == factored_grads.keys()
    for name, gradient in factored_grads.items():
        # a scalar's gradient is one sum over its whole layer, whose terms largely cancel: rounding weighs more there
        fraction = 1e-2 if name.endswith(".scalar") else 2e-3
        assert_close_at_scale(merged_grads[name], gradient, fraction, floor=1e-6, msg=name)
    network.remove()
    assert not any("forward" in vars(layer) for part in (unet, *text_encoders) for layer in part.modules())


def test_saved_file_carries_metadata_and_the_hashes_sd_scripts_computes(tmp_path):
    config, unet, text_encoders = _models("sd1")
    network = create_network(config, unet, text_encoders, NetworkSpec(dim=4, alpha=1))
    path = save_network(network.state_dict(), tmp_path / "x.safetensors", base_metadata(config, network.spec, "x"), "fp16")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_network_dim"] == "4"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert kohya_hashes(tensors, metadata)["sshs_model_hash"] == metadata["sshs_model_hash"]
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary file left behind


def test_hashes_equal_the_ones_sd_scripts_wrote_into_its_own_files():
    for relative in ("lora-baseline/tinylora.safetensors", "lora-toml-variant/tinylora_toml.safetensors"):
        with safe_open(str(REFERENCE / "kohya-fixtures" / relative), "pt") as handle:
            metadata = handle.metadata()
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        hashes = kohya_hashes(tensors, metadata)
        assert hashes == {"sshs_model_hash": metadata["sshs_model_hash"], "sshs_legacy_hash": metadata["sshs_legacy_hash"]}


def test_learning_rate_groups_follow_sd_scripts_text_encoder_unet_blocks_and_loraplus():
    config, unet, text_encoders = _models("sd1")
    plain = create_network(config, unet, text_encoders, NetworkSpec())
    groups = {g["description"]: g for g in plain.parameter_groups(1e-4, text_encoder_lr=5e-5)}
    assert set(groups) == {"textencoder", "unet"}
    assert groups["textencoder"]["lr"] == 5e-5 and groups["unet"]["lr"] == 1e-4
    assert {g["description"] for g in plain.parameter_groups(1e-4, text_encoder_lr=0)} == {"unet"}  # UNet only

    # down blocks off (zeros), the rest at 1: only output/middle blocks get modules and groups
    args = {"down_lr_weight": "zeros", "up_lr_weight": "1,1,1,1,1,1,1,1,1,1,1,0.5", "loraplus_lr_ratio": "4"}
    network = create_network(config, unet, text_encoders, NetworkSpec(network_args=tuple(args.items())))
    assert not any(m.target.module.startswith("input_blocks.") for m in network.unet_modules())
    groups = {g["description"]: g for g in network.parameter_groups(1e-4)}
    assert groups["unet_block24"]["lr"] == pytest.approx(0.5e-4)  # OUT11
    assert groups["unet_block24 plus"]["lr"] == pytest.approx(4 * 0.5e-4)
    assert groups["textencoder plus"]["lr"] == pytest.approx(4e-4)
    assert not any(d.startswith("unet_block") and int(d.split()[0][10:]) < 12 for d in groups)


def test_layers_outside_the_blocks_keep_the_unet_rate_when_block_rates_are_given():
    """A LyCORIS preset trains the time embedding and conv_out, which have no block (spec_from_kohya refuses block
    rates under lycoris.kohya, which never reads them; a spec made otherwise must still give its groups)."""
    config, unet, text_encoders = _models("sd1")
    spec = NetworkSpec(network_module="lycoris.kohya", preset="full", lycoris=LYCORIS_PRESETS["full"], conv_dim=2,
                       network_args=(("down_lr_weight", "zeros+0.5"),))
    network = create_network(config, unet, text_encoders, spec)
    groups = {g["description"]: g for g in network.parameter_groups(1e-4)}
    assert groups["unet"]["lr"] == 1e-4 and groups["unet_block1"]["lr"] == pytest.approx(0.5e-4)
    outside = {id(p) for m in network.unet_modules() if block_index(m.target, "diffusers") is None for p in m.parameters()}
    assert outside and outside == {id(p) for p in groups["unet"]["params"]}


def _unet_alphas(network, kxk: bool) -> dict[str, float]:
    return {name: float(m.alpha) for name, m in network.items()
            if not m.target.is_text_encoder and (m.lora_down.weight.dim() == 4 and m.lora_down.weight.shape[-1] == 3) == kxk}


def test_block_lists_are_read_as_sd_scripts_reads_them_whenever_block_dims_or_block_rates_are_given():
    """sd-scripts' block mode: block_alphas apply with block learning rates alone (block_dims then all network_dim),
    and without either the conv block lists are not read, so no 3×3 convolution trains without conv_dim."""
    config, unet, text_encoders = _models("sd1")
    alphas = ",".join(str(i + 1) for i in range(25))
    spec = spec_from_kohya("networks.lora", 4, 1, ["mid_lr_weight=1", f"block_alphas={alphas}", "conv_dim=2"])
    network = create_network(config, unet, text_encoders, spec)
    blocks = {name: block_index(m.target, "diffusers") for name, m in network.items() if not m.target.is_text_encoder}
    assert _unet_alphas(network, kxk=False) == {name: blocks[name] + 1.0 for name in _unet_alphas(network, kxk=False)}
    assert set(_unet_alphas(network, kxk=True).values()) == {1.0}  # conv_alpha: conv_block_alphas not given
    assert all(float(m.alpha) == 1.0 for m in network.text_encoder_modules())

    convs = ",".join(["2"] * 25)
    alone = create_network(config, unet, text_encoders, spec_from_kohya("networks.lora", 4, 1, [f"conv_block_dims={convs}"]))
    assert not _unet_alphas(alone, kxk=True) and _unet_alphas(alone, kxk=False)
    by_block = create_network(config, unet, text_encoders, spec_from_kohya("networks.lora", 4, 1, [f"conv_block_dims={convs}",
                                                                                                     "up_lr_weight=linear"]))
    assert _unet_alphas(by_block, kxk=True)


@pytest.mark.parametrize("network_module, args, plus", [
    ("lycoris.kohya", ["algo=dylora", "block_size=2", "preset=attn-mlp", "loraplus_lr_ratio=16"], False),
    ("networks.dylora", ["unit=2", "loraplus_lr_ratio=16"], True)])
def test_loraplus_raises_dylora_up_weights_where_the_network_library_does(network_module, args, plus):
    """sd-scripts' DyLoRA raises its lora_B (up) weights; LyCORIS's DyLoRA keeps them in up_list, which its LoRA+
    (``"lora_up" in name``) never picks."""
    config, unet, text_encoders = _models("sd1")
    spec = spec_from_kohya(network_module, 4, 4, args)
    groups = {g["description"] for g in create_network(config, unet, text_encoders, spec).parameter_groups(1e-4)}
    assert groups == ({"textencoder", "textencoder plus", "unet", "unet plus"} if plus else {"textencoder", "unet"})


def test_a_loaded_alpha_sets_the_scale_the_hooks_apply():
    """Weights loaded onto a network (--network_weights, a resumed state) bring their own alpha; the forward uses it."""
    unet, text_encoders, _ = build_models(SD1_TINY)
    for module in [unet, *text_encoders]:
        module.to_empty(device="cpu")
        for parameter in module.parameters():
            torch.nn.init.normal_(parameter, std=0.02)
    network = create_network(SD1_TINY, unet, text_encoders, NetworkSpec(dim=4, alpha=4))
    name, module = next((n, m) for n, m in network.items() if n.startswith("lora_unet"))
    torch.nn.init.normal_(module.lora_up.weight, std=0.1)
    x = torch.randn(2, module.lora_down.weight.shape[1]) if module.conv is None else torch.randn(1, module.lora_down.weight.shape[1], 4, 4)
    change = lambda: module.changed_output(x, torch.zeros(len(x), module.lora_up.weight.shape[0], *x.shape[2:]))
    before = change()
    state = {k: v.clone() for k, v in network.state_dict().items()}
    state[f"{name}.alpha"] = torch.tensor(1.0)  # α 1 with rank 4: a quarter of the change
    network.load_state_dict(state)
    assert module.lora_scale == 0.25
    assert torch.allclose(change(), before / 4)


def _trained_text_encoder_module(network_module: str, **options):
    """A text-encoder LoRA module with random weights, in training mode, under ``network_module``'s dropouts."""
    config, unet, text_encoders = _models("sd1")
    spec = NetworkSpec(dim=8, alpha=8, network_module=network_module, **options)
    network = create_network(config, None, text_encoders, spec, train_unet=False)
    module = next(iter(network.values()))
    torch.manual_seed(3)
    with torch.no_grad():
        module.lora_up.weight.normal_()
    return module.train()


def _rank_contributions(module, x):
    """Each rank's part of the module's change for input ``x``: [rank, *output shape]."""
    down, up = module.lora_down.weight, module.lora_up.weight
    return torch.stack([torch.outer(x @ down[k], up[:, k]) for k in range(down.shape[0])]) * module.lora_scale


@pytest.mark.parametrize("network_module, kept_weight, shared", [("networks.lora", 2.0, False), ("lycoris.kohya", 1.0, True)])
def test_rank_dropout_drops_ranks_as_the_network_library_does(network_module, kept_weight, shared):
    """sd-scripts drops ranks per sample and scales the kept ones by 1/(1-p); LyCORIS one set for the batch, unscaled."""
    module = _trained_text_encoder_module(network_module, rank_dropout=0.5)
    row = torch.randn(5, module.lora_down.weight.shape[1])
    x = row.expand(4, *row.shape)
    with torch.no_grad():
        changed = module.changed_output(x, torch.zeros(4, 5, module.lora_up.weight.shape[0]))
        parts = _rank_contributions(module, row).flatten(1).T  # [outputs, rank]
    weights = [torch.linalg.lstsq(parts, sample.flatten()).solution for sample in changed]
    for w in weights:  # every rank is either dropped or kept with the library's weight
        assert torch.allclose(torch.minimum(w.abs(), (w - kept_weight).abs()), torch.zeros_like(w), atol=1e-3)
    assert all(torch.equal(changed[0], other) for other in changed[1:]) == shared


@pytest.mark.parametrize("network_module", ["networks.lora", "lycoris.kohya"])
def test_dropout_is_on_the_ranks_in_sd_scripts_and_on_the_output_in_lycoris(network_module):
    module = _trained_text_encoder_module(network_module, dropout=0.5)
    x = torch.randn(2, 5, module.lora_down.weight.shape[1])
    zero = torch.zeros(2, 5, module.lora_up.weight.shape[0])
    with torch.no_grad():
        dropped = module.changed_output(x, zero)
        full = module.eval().changed_output(x, zero)
    ratio = dropped / full
    on_output = bool(((ratio - 0).abs() < 1e-4).logical_or((ratio - 2).abs() < 1e-4).all())  # each value 0 or 2×
    assert on_output == (network_module == "lycoris.kohya")


def test_rank_dropout_on_loha_drops_whole_output_channels_of_its_change_as_lycoris_does():
    config, unet, text_encoders = _models("sd1")
    spec = NetworkSpec(algorithm="loha", dim=4, alpha=4, rank_dropout=0.5, network_module="lycoris.kohya")
    module = next(iter(create_network(config, None, text_encoders, spec, train_unet=False).values()))
    with torch.no_grad():
        module.hada_w2_a.normal_()
    x = torch.randn(2, 5, module.hada_w1_b.shape[1])
    zero = torch.zeros(2, 5, module.hada_w1_a.shape[0])
    with torch.no_grad():
        dropped = module.train().changed_output(x, zero)
        full = module.eval().changed_output(x, zero)
    kept = torch.isclose(dropped, full, atol=1e-6).flatten(0, 1).all(dim=0)
    gone = (dropped.abs() < 1e-9).flatten(0, 1).all(dim=0)
    assert bool((kept | gone).all()) and kept.any() and gone.any()


def test_a_dylora_step_moves_only_the_block_of_ranks_it_trained_as_sd_scripts_per_rank_parameters_do():
    """sd-scripts' DyLoRA holds a parameter per rank and trains one block per step: the other ranks get no gradient,
    so AdamW moves them neither by momentum from earlier steps nor by weight decay."""
    config, unet, text_encoders = _models("sd1")
    spec = NetworkSpec(algorithm="dylora", network_module="networks.dylora", dim=4, alpha=4, unit=1)
    network = create_network(config, None, text_encoders, spec, train_unet=False).train().apply_to()
    modules = list(network.values())
    with torch.no_grad():
        for module in modules:  # up starts at zero: give every rank a gradient path
            module.lora_up.load_state_dict({"weight": torch.randn(module.lora_up.weight.shape) * 0.1})
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2, weight_decay=0.1)
    ids, _, _ = _inputs(config)
    torch.manual_seed(0)
    moved_blocks = []
    for _ in range(6):
        before = [m.lora_down.weight.detach().clone() for m in modules]
        text_encoders[0](ids).hidden.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for module, old in zip(modules, before):
            moved = (module.lora_down.weight.detach() != old).any(dim=1).nonzero().flatten().tolist()
            assert len(moved) == 1  # one rank (unit 1) per step, however many moved before
            moved_blocks.append(moved[0])
    assert len(set(moved_blocks)) > 1  # the block is drawn anew each step
    network.remove()


@pytest.mark.parametrize("family, prediction, version, architecture", [
    ("SD1", "epsilon", "sd_v1", "stable-diffusion-v1"), ("SD1", "v_prediction", "sd_v1_v", "stable-diffusion-v1"),
    ("SD2", "epsilon", "sd_v2", "stable-diffusion-v2-512"), ("SD2", "v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v"),
    ("SDXL", "epsilon", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
    ("SDXL", "v_prediction", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
])
def test_files_name_their_base_model_as_sd_scripts_does(family, prediction, version, architecture):
    """sd-scripts' get_model_version_str_for_sd1_sd2 and determine_architecture; the WebUI lists a network as SDXL by
    the sdxl_ prefix, so a v-prediction SDXL LoRA (NoobAI-XL v-pred) must keep it."""
    from lora_trainer.models import configs
    from lora_trainer.networks.network import base_metadata
    from lora_trainer.networks.spec import NetworkSpec

    config = getattr(configs, family).with_prediction(prediction)
    metadata = base_metadata(config, NetworkSpec(), "title")
    assert (metadata["ss_base_model_version"], metadata["modelspec.architecture"]) == (version, architecture + "/lora")
    assert metadata["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")


def _one_step(tmp_path, out, *extra: str) -> int:
    """One step of the tiny model on the sample dataset (networks.lora, dim 4, unless ``extra`` says otherwise)."""
    data = tmp_path / "data"
    if not data.exists():
        shutil.copytree(Path(__file__).resolve().parents[1] / "lora_trainer" / "assets" / "sample-dataset" / "10_zkstar",
                        data / "1_zkstar")
    return train_main([
        "--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", str(data), "--output_dir", str(out),
        "--output_name", "star", "--resolution", "64", "--train_batch_size", "4", "--max_train_steps", "1",
        "--caption_extension", ".txt", "--max_data_loader_n_workers", "0", "--network_module", "networks.lora",
        "--network_dim", "4", "--learning_rate", "1e-4", *extra])


def test_a_run_says_the_block_lists_it_does_not_use_and_its_steps_carry_the_loraplus_rate(tmp_path):
    """Two groups, unet and unet plus: the LoRA+ rate is in the step events all the same; conv_block_dims without
    block_dims or block rates is said unused (sd-scripts trains no 3×3 convolution from it)."""
    assert _one_step(tmp_path, tmp_path / "out", "--network_train_unet_only", "--network_args", "loraplus_unet_lr_ratio=4",
                     "conv_block_dims=" + ",".join(["2"] * 25)) == 0
    events = read_events(tmp_path / "out" / "star.events.jsonl")[0]
    step = next(e for e in events if e["event"] == "step")
    assert step["lr_groups"] == {"unet": 1e-4, "unet plus": 4e-4}
    assert any(e["message"].startswith("network_args conv_block_dims: not used without block_dims or a block learning "
                                       "rate") for e in events if e["event"] == "warning")
    with safe_open(str(tmp_path / "out" / "star.safetensors"), "pt") as handle:
        assert not [key for key in handle.keys() if key.endswith("lora_down.weight") and len(handle.get_slice(key).get_shape()) == 4
                    and handle.get_slice(key).get_shape()[-1] == 3]


def test_a_lokr_file_split_by_another_factor_is_refused_naming_the_factor_not_the_dim(tmp_path, capsys):
    lokr = ("--network_module", "lycoris.kohya", "--network_dim", "8")
    assert _one_step(tmp_path, tmp_path / "a", *lokr, "--network_args", "algo=lokr", "preset=attn-only", "factor=4") == 0
    assert _one_step(tmp_path, tmp_path / "b", *lokr, "--network_weights", str(tmp_path / "a" / "star.safetensors"),
                     "--network_args", "algo=lokr", "preset=attn-only", "factor=2") == 2
    said = capsys.readouterr().err
    assert ("its LoKr factors split the layers otherwise than this run's network_args factor and decompose_both (the "
            "file was trained with factor=4); give the file's, or add --dim_from_weights") in said
    assert "--network_dim" not in said
    # the same factor at another rank: the rank axis of the factors differs, which --network_dim sets
    assert _one_step(tmp_path, tmp_path / "c", "--network_module", "lycoris.kohya", "--network_dim", "2", "--network_weights",
                     str(tmp_path / "a" / "star.safetensors"), "--network_args", "algo=lokr", "preset=attn-only",
                     "factor=4") == 2
    said = capsys.readouterr().err
    assert "this run has --network_dim 2; set the file's --network_dim" in said and "LoKr factors" not in said
