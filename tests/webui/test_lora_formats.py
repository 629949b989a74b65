"""Every network format goes through the WebUI hook (activate → process_images → next activate) to the weights our
merging core computes, and where LyCORIS's own numbers exist (shared/reference/network-fixtures) to those numbers;
a prompt without the tag gives the checkpoint's bits back."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from reference import REFERENCE
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.models import checkpoint
from lora_trainer.models.checkpoint import ARCHITECTURE_METADATA_KEY, architecture_overrides, build_models
from lora_trainer.networks.apply import MergedNetworks, Strength
from lora_trainer.networks.files import read_network
from lora_trainer.networks.naming import NORM, model_targets
from lora_trainer.networks.network import base_metadata, create_network, save_network
from lora_trainer.networks.spec import NetworkSpec
from lora_trainer.safe_io import save_safetensors
from tests.webui.conftest import (assert_merged_like_the_core, assert_restored, core_merge, pixels, txt2img,
                                  tiny_sdxl_config, txt2img_watching_weights, use_checkpoint, webui_parameters)

FIXTURES = REFERENCE / "network-fixtures"
SD1_CASES = sorted(p.name.removesuffix(".expected.safetensors") for p in FIXTURES.glob("*.expected.safetensors")
                   if not p.name.startswith("lora_sdxl"))

SPECS = {
    "locon": NetworkSpec(dim=4, alpha=2, conv_dim=2, conv_alpha=1),
    "loha": NetworkSpec(algorithm="loha", dim=2, alpha=1, conv_dim=2),
    "lokr": NetworkSpec(algorithm="lokr", dim=2, alpha=1, conv_dim=2, factor=4),
    "dora": NetworkSpec(dim=4, alpha=2, dora=True),
}


# --- formats our trainer writes, on the tiny model ---------------------------------------------------------------


@pytest.mark.parametrize("kind", SPECS)
def test_the_hook_merges_each_trained_format_to_what_the_core_computes(webui, tiny_model, lora_folder, kind):
    config = tiny_model.config
    network = create_network(config, tiny_model.unet, tiny_model.text_encoders, SPECS[kind])
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    path = lora_folder / f"format_{kind}.safetensors"
    save_network(network.state_dict(), path, base_metadata(config, network.spec, path.stem), "fp32")
    saved = read_network(path)
    before = webui_parameters(webui.shared.sd_model)
    try:
        _, during = txt2img_watching_weights(webui, f"a red circle <lora:format_{kind}:0.7:0.4>")
    finally:
        path.unlink()  # the folder is shared by the session's tests, which list it
    want = core_merge(tiny_model, saved, Strength(0.7, 0.4))
    assert_merged_like_the_core(during, want, kind)
    assert any(not torch.equal(during[k], before[k]) for k in want if k.startswith(config.unet_prefix))
    txt2img(webui, "a red circle", size=32)
    assert_restored(webui, before)


def test_a_norm_layer_network_changes_the_image_as_the_core_merges_it_and_restores(webui, tiny_model, tmp_path):
    """LyCORIS ``train_norm`` files (w_norm/b_norm on GroupNorm and LayerNorm, no fixture exists for them)."""
    config = tiny_model.config
    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for name, target in model_targets(config, tiny_model.unet, tiny_model.text_encoders).items():
        if target.group == NORM:
            module = (tiny_model.unet if not target.is_text_encoder else tiny_model.text_encoders[0]).get_submodule(target.module)
            tensors[f"{name}.w_norm"] = torch.randn(module.weight.shape, generator=generator) * 0.2
            tensors[f"{name}.b_norm"] = torch.randn(module.bias.shape, generator=generator) * 0.2
    folder = tmp_path / "norm"
    save_safetensors(tensors, folder / "norms.safetensors", {"ss_base_model_version": "sd_v1", "ss_network_module": "lycoris.kohya"})
    webui.shared.opts.data["lora_trainer_output_folder"] = str(folder)
    before = webui_parameters(webui.shared.sd_model)
    _, base = txt2img(webui, "a red circle")
    with_norms, during = txt2img_watching_weights(webui, "a red circle <lora:norms:0.8>")
    want = core_merge(tiny_model, read_network(folder / "norms.safetensors"), Strength(0.8))
    assert_merged_like_the_core(during, want, "norm")
    assert any(k.endswith("norm1.weight") and not torch.equal(during[k], before[k]) for k in want)
    assert np.abs(pixels(with_norms) - pixels(base)).sum() > 0
    _, after = txt2img(webui, "a red circle")
    assert_restored(webui, before)
    assert np.array_equal(pixels(after), pixels(base))


# --- every LyCORIS fixture, on a checkpoint shaped like the fixtures' toy model ------------------------------------

# Where the fixtures' toy model (Diffusers names) has each layer in an SD1 checkpoint (LDM names), written out here
# rather than taken from our naming code, so a naming mistake cannot hide itself.
_LDM_PATHS = (
    ("text_encoder.", "cond_stage_model.transformer."),
    ("unet.conv_in.", "model.diffusion_model.input_blocks.0.0."),
    ("unet.down_blocks.0.resnets.0.conv1.", "model.diffusion_model.input_blocks.1.0.in_layers.2."),
    ("unet.down_blocks.0.resnets.0.time_emb_proj.", "model.diffusion_model.input_blocks.1.0.emb_layers.1."),
    ("unet.down_blocks.0.resnets.0.conv2.", "model.diffusion_model.input_blocks.1.0.out_layers.3."),
    ("unet.down_blocks.0.resnets.0.conv_shortcut.", "model.diffusion_model.input_blocks.1.0.skip_connection."),
    ("unet.down_blocks.0.attentions.0.", "model.diffusion_model.input_blocks.1.1."),
    ("unet.down_blocks.0.downsamplers.0.conv.", "model.diffusion_model.input_blocks.3.0.op."),
    ("unet.mid_block.attentions.0.transformer_blocks.", "model.diffusion_model.middle_block.1.transformer_blocks."),
)
# The toy model's layers no SD1 UNet can have: a Linear proj_in/out beside conv ones, an up block narrower than its
# skip input, conv_out from 16 channels while the first level has 32. The fixture files lose these modules.
_NOT_IN_AN_SD1_UNET = ("lora_unet_conv_out", "lora_unet_mid_block_attentions_0_proj_", "lora_unet_up_blocks_")


def ldm_key(fixture_key: str) -> str | None:
    return next((ldm + fixture_key[len(d):] for d, ldm in _LDM_PATHS if fixture_key.startswith(d)), None)


def fixture_expected(case: str):
    with safe_open(str(FIXTURES / f"{case}.expected.safetensors"), "pt") as handle:
        answer_key = json.loads(handle.metadata()["lora_name_to_module"])
    return load_file(FIXTURES / f"{case}.expected.safetensors"), answer_key


def _random_checkpoint_state(config, vae) -> dict:
    """A seeded random checkpoint of ``config`` (with the tiny model's VAE) as a single-file state dict."""
    torch.manual_seed(0)
    unet, text_encoders, _ = build_models(config, device="cpu")
    state = {config.unet_prefix + k: v for k, v in unet.state_dict().items()}
    state |= {slot.prefix + k: v for slot, te in zip(config.text_encoders, text_encoders) for k, v in te.state_dict().items()}
    return state | {config.vae_prefix + k: v for k, v in vae.state_dict().items()}


@pytest.fixture(scope="session")
def fixture_shaped_checkpoint(tmp_path_factory, tiny_model):
    """An SD1-layout checkpoint at the fixtures' widths (TE 16 wide, 2 layers, MLP 64; UNet 16 channels, two levels of
    32, attention on the first, context 16) whose fixture-targeted layers hold the fixtures' base weights; the tiny
    model's VAE. Two levels: 32×32 images, cheap to generate."""
    slot = tiny_model.config.text_encoders[0]
    config = dataclasses.replace(
        tiny_model.config,
        unet=dataclasses.replace(tiny_model.config.unet, model_channels=16, channel_mult=(2, 2), transformer_depth=(1, 0),
                                 context_dim=16, num_heads=4, norm_groups=8),
        text_encoders=(dataclasses.replace(slot, config=dataclasses.replace(slot.config, width=16, layers=2, heads=2, mlp_width=64)),),
    )
    state = _random_checkpoint_state(config, tiny_model.vae)
    expected, _ = fixture_expected("lora")
    for key, tensor in expected.items():
        if key.endswith((".weight", ".bias")) and ldm_key(key) is not None:
            assert state[ldm_key(key)].shape == tensor.shape, key
            state[ldm_key(key)] = tensor
    path = tmp_path_factory.mktemp("checkpoints") / "fixture shaped.safetensors"
    return save_safetensors(state, path, {ARCHITECTURE_METADATA_KEY: json.dumps(architecture_overrides(config))})


def test_every_lycoris_fixture_through_the_hook_gives_lycoris_deltas_at_both_strengths_and_restores(
        webui, fixture_shaped_checkpoint, tmp_path):
    """One WebUI session, one file after the other (as a user switching LoRAs): at each strength the layers the file
    targets change by LyCORIS's ΔW and as our core merges them, every other weight keeps the checkpoint's bits."""
    folder = tmp_path / "fixtures"
    webui.shared.opts.data["lora_trainer_output_folder"] = str(folder)
    use_checkpoint(webui, fixture_shaped_checkpoint)
    before = webui_parameters(webui.shared.sd_model)
    reference = copy.deepcopy(webui.shared.sd_model.stub_model)  # before any merge: what the core starts from
    core = MergedNetworks.for_model(reference.config, reference.unet, reference.text_encoders)
    core_state = dict(reference.unet.named_parameters(prefix=reference.config.unet_prefix.rstrip(".")))
    core_state |= dict(reference.text_encoders[0].named_parameters(prefix=reference.config.text_encoders[0].prefix.rstrip(".")))
    assert set(core_state) <= set(before)

    for case in SD1_CASES:
        expected, answer_key = fixture_expected(case)
        network = read_network(FIXTURES / f"{case}.safetensors")
        kept = {name: tensors for name, tensors in network.modules.items() if not name.startswith(_NOT_IN_AN_SD1_UNET)}
        assert len(kept) >= len(network.modules) - 8 and len(kept) >= 10, case
        state = {f"{name}.{suffix}": t for name, tensors in kept.items() for suffix, t in tensors.items()}
        save_safetensors(state, folder / f"fx_{case}.safetensors", network.metadata)
        for name in kept:  # the fixture's toy model and this checkpoint start from the same weights
            assert torch.equal(before[ldm_key(answer_key[name] + ".weight")], expected[answer_key[name] + ".weight"]), (case, name)
        changed = {ldm_key(answer_key[name] + ".weight") for name in kept}
        changed |= {ldm_key(answer_key[name] + ".bias") for name in kept if f"{answer_key[name]}.delta_bias" in expected}
        reread = read_network(folder / f"fx_{case}.safetensors")

        for strength, suffix in ((1.0, ""), (0.5, "@0.5")):  # 1 → 0.5: the hook's in-place strength change
            _, during = txt2img_watching_weights(webui, f"a red circle <lora:fx_{case}:{strength}>", size=32)
            assert webui.extra_networks.extra_network_registry["lora"].warnings == []
            for name in kept:
                path = answer_key[name]
                kinds = [("weight", "delta")] + ([("bias", "delta_bias")] if f"{path}.delta_bias" in expected else [])
                for kind, delta in kinds:
                    got = during[ldm_key(f"{path}.{kind}")].double() - before[ldm_key(f"{path}.{kind}")].double()
                    want = expected[f"{path}.{delta}{suffix}"].double()
                    assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-7, (case, name, kind, strength)
            assert all(torch.equal(during[k], v) for k, v in before.items() if k not in changed), (case, "untouched layers")
            core.set_networks([(reread, Strength(strength))])
            assert_merged_like_the_core(during, core_state, (case, strength))

    txt2img(webui, "a red circle", size=32)
    assert_restored(webui, before)


# --- the SDXL fixture: CLIP-L and OpenCLIP (fused q/k/v in the WebUI's nn.MultiheadAttention) -------------------

_OPEN_CLIP = "conditioner.embedders.1.model.transformer.resblocks."
_SDXL_PATHS = (
    ("text_encoder.", "conditioner.embedders.0.transformer."),
    ("unet.", "model.diffusion_model."),
)
_SDXL_OPEN_CLIP_PARTS = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
# The toy model's feed-forwards are 2× wide (our UNet's are 4×) and its first output block narrower than its skip input.
_NOT_IN_AN_SDXL_UNET = ("lora_unet_output_blocks_0_0_", "lora_unet_input_blocks_1_1_transformer_blocks_0_ff_",
                        "lora_unet_middle_block_1_transformer_blocks_0_ff_")


def sdxl_ldm_key(fixture_key: str) -> tuple[str, slice | None]:
    """Checkpoint key (and rows of it) of a fixture tensor; OpenCLIP's q/k/v are rows of the fused in_proj."""
    if fixture_key.startswith("text_encoder_2.text_model.encoder.layers."):
        layer, part = fixture_key.removeprefix("text_encoder_2.text_model.encoder.layers.").split(".", 1)
        module, kind = part.rsplit(".", 1)
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            index = "qkv".index(module[len("self_attn.")])
            return f"{_OPEN_CLIP}{layer}.attn.in_proj_{kind}", slice(index * 32, (index + 1) * 32)
        return f"{_OPEN_CLIP}{layer}.{_SDXL_OPEN_CLIP_PARTS[module]}.{kind}", None
    return next(ldm + fixture_key[len(d):] for d, ldm in _SDXL_PATHS if fixture_key.startswith(d)), None


@pytest.fixture(scope="session")
def fixture_shaped_sdxl_checkpoint(tmp_path_factory, tiny_model):
    """SDXL's layout at the SDXL fixture's widths (CLIP-L 16, OpenCLIP 32, UNet 16 channels, two levels of 32 with
    attention, one ResBlock each, context 48), the fixture's base weights in the layers it targets."""
    xl = tiny_sdxl_config(tiny_model.config)
    te1, te2 = xl.text_encoders
    config = dataclasses.replace(
        xl,
        unet=dataclasses.replace(xl.unet, model_channels=16, channel_mult=(2, 2), num_res_blocks=1, transformer_depth=(1, 1),
                                 context_dim=48, norm_groups=8),
        text_encoders=(dataclasses.replace(te1, config=dataclasses.replace(te1.config, width=16)), te2),
    )
    state = _random_checkpoint_state(config, tiny_model.vae)
    expected, _ = fixture_expected("lora_sdxl")
    for key, tensor in expected.items():
        if key.endswith((".weight", ".bias")):
            target, rows = sdxl_ldm_key(key)
            if state[target][rows or slice(None)].shape == tensor.shape:  # the toy model's misfits stay random
                state[target][rows or slice(None)] = tensor
    path = tmp_path_factory.mktemp("checkpoints") / "fixture shaped sdxl.safetensors"
    return save_safetensors(state, path, {ARCHITECTURE_METADATA_KEY: json.dumps(architecture_overrides(config))})


def test_the_sdxl_lycoris_fixture_through_the_hook_changes_openclips_fused_rows_by_lycoris_deltas(
        webui, fixture_shaped_sdxl_checkpoint, tmp_path):
    """LyCORIS's own ΔW for lora_te2_…_q_proj/k_proj/v_proj lands on the q/k/v rows of the WebUI's fused in_proj."""
    expected, answer_key = fixture_expected("lora_sdxl")
    network = read_network(FIXTURES / "lora_sdxl.safetensors")
    kept = {name: tensors for name, tensors in network.modules.items() if not name.startswith(_NOT_IN_AN_SDXL_UNET)}
    assert len(kept) == 49 and sum(name.startswith("lora_te2_") for name in kept) == 12
    folder = tmp_path / "fixtures"
    save_safetensors({f"{n}.{s}": t for n, ts in kept.items() for s, t in ts.items()}, folder / "fx_lora_sdxl.safetensors",
                     network.metadata)
    webui.shared.opts.data["lora_trainer_output_folder"] = str(folder)
    use_checkpoint(webui, fixture_shaped_sdxl_checkpoint)
    assert type(webui.shared.sd_model.get_submodule("conditioner.embedders.1.wrapped.model.transformer.resblocks.0.attn")) \
        is torch.nn.MultiheadAttention
    before = webui_parameters(webui.shared.sd_model)
    ours = checkpoint.load_checkpoint(fixture_shaped_sdxl_checkpoint)  # our own model of it: what the core merges into
    for strength, suffix in ((1.0, ""), (0.5, "@0.5")):
        _, during = txt2img_watching_weights(webui, f"a red circle <lora:fx_lora_sdxl:{strength}>", size=32)
        assert webui.extra_networks.extra_network_registry["lora"].warnings == []
        for name in kept:
            key, rows = sdxl_ldm_key(answer_key[name] + ".weight")
            rows = rows or slice(None)
            assert torch.equal(before[key][rows], expected[answer_key[name] + ".weight"]), name
            got = during[key][rows].double() - before[key][rows].double()
            want = expected[f"{answer_key[name]}.delta{suffix}"].double()
            assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-7, (name, strength)
        assert_merged_like_the_core(during, core_merge(ours, read_network(folder / "fx_lora_sdxl.safetensors"), Strength(strength)),
                                    ("lora_sdxl", strength))
    txt2img(webui, "a red circle", size=32)
    assert_restored(webui, before)
