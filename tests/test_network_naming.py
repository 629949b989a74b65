"""Networks we create on our models have exactly sd-scripts' keys and shapes, and load what sd-scripts wrote."""

from __future__ import annotations

import ast
import dataclasses

import pytest
import torch
from reference import REFERENCE, TINY_KOHYA_CHECKPOINT

from lora_trainer.errors import UserError
from lora_trainer.models.checkpoint import build_models, load_checkpoint
from lora_trainer.models.configs import FULL_SIZE
from lora_trainer.networks.apply import MergedNetworks, Strength
from lora_trainer.networks.files import group_tensors, read_network
from lora_trainer.networks.naming import model_targets
from lora_trainer.networks.network import create_network
from lora_trainer.networks.spec import NetworkSpec, network_args_notes, spec_from_kohya


def kohya_list(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (REFERENCE / f"kohya-lora-keys-{name}.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            shapes[key] = tuple(ast.literal_eval(shape))
    return shapes


@pytest.mark.parametrize("model, listing, spec", [
    ("sd1", "sd15", NetworkSpec()),
    ("sd1", "sd15-conv", NetworkSpec(conv_dim=4)),
    ("sd2", "sd2", NetworkSpec()),
    ("sdxl", "sdxl", NetworkSpec()),
    ("sdxl", "sdxl-conv", NetworkSpec(conv_dim=4)),
])
def test_default_network_on_full_size_model_has_sd_scripts_keys_and_shapes(model, listing, spec):
    config = FULL_SIZE[model]
    unet, text_encoders, _ = build_models(config)  # meta device: no memory
    network = create_network(config, unet, text_encoders, spec)
    ours = {key: tuple(t.shape) for key, t in network.state_dict().items()}
    assert ours == kohya_list(listing)


@pytest.fixture(scope="module")
def tiny_kohya():
    return load_checkpoint(TINY_KOHYA_CHECKPOINT, dtype=torch.float32)


@pytest.mark.parametrize("relative", [
    "lora-baseline/tinylora.safetensors",
    "lora-toml-variant/tinylora_toml.safetensors",
    "lora-lycoris/tiny_locon.safetensors",
    "lora-lycoris/tiny_loha.safetensors",
])
def test_sd_scripts_outputs_load_onto_the_tiny_kohya_checkpoint_with_every_key_matched(tiny_kohya, relative):
    network = read_network(REFERENCE / "kohya-fixtures" / relative)
    merged = MergedNetworks.for_model(tiny_kohya.config, tiny_kohya.unet, tiny_kohya.text_encoders)
    report = merged.check(network)
    assert report.ok and report.unmatched == [] and network.unreadable_keys == []
    assert len(report.matched) == len(network.modules)


def test_diffusers_peft_names_and_webui_compvis_names_reach_the_same_layers():
    config = FULL_SIZE["sd1"]
    unet, text_encoders, _ = build_models(config)
    targets = model_targets(config, unet, text_encoders)
    merged = MergedNetworks(targets, {"lora_unet": unet, "lora_te": text_encoders[0]})
    down, up = torch.zeros(4, 320), torch.zeros(320, 4)
    files = {
        "kohya": {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
                  "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": up},
        "peft": {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": down,
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": up},
        "compvis": {"diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
                    "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": up},
        "sgm": {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
                "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": up},
    }
    for naming, tensors in files.items():
        report = merged.check(group_tensors(tensors))
        assert [m.target.module for m in report.matched] == ["input_blocks.1.1.transformer_blocks.0.attn1.to_q"], naming


def test_webui_compvis_names_of_an_sdxl_file_reach_each_text_encoders_own_layers():
    """The WebUI names SDXL's CLIP-L layers ``0_transformer_text_model_…`` and OpenCLIP's ``1_model_transformer_…``
    (its conditioner's embedders 0 and 1): each must land in its own encoder, not the other's or nowhere."""
    config = FULL_SIZE["sdxl"]
    unet, text_encoders, _ = build_models(config)
    merged = MergedNetworks(model_targets(config, unet, text_encoders),
                            {"lora_unet": unet, "lora_te1": text_encoders[0], "lora_te2": text_encoders[1]})
    compvis = group_tensors({
        "0_transformer_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
        "0_transformer_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4),
        "1_model_transformer_resblocks_0_mlp_c_fc.lora_down.weight": torch.zeros(4, 1280),
        "1_model_transformer_resblocks_0_mlp_c_fc.lora_up.weight": torch.zeros(5120, 4),
    })
    report = merged.check(compvis)
    assert report.unmatched == [] and report.problems == []
    assert sorted((m.target.component, m.target.module) for m in report.matched) == [
        ("lora_te1", "text_model.encoder.layers.0.mlp.fc1"), ("lora_te2", "transformer.resblocks.0.mlp.c_fc")]


def test_sdxl_network_on_sd1_model_is_refused_with_a_reason_and_the_model_is_untouched(tiny_kohya):
    sdxl_file = group_tensors({
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4),
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
    }, {"ss_base_model_version": "sdxl_base_v1-0"})
    before = {k: v.clone() for k, v in tiny_kohya.unet.state_dict().items()}
    merged = MergedNetworks.for_model(tiny_kohya.config, tiny_kohya.unet, tiny_kohya.text_encoders)
    with pytest.raises(UserError, match="SDXL network"):
        merged.set_networks([(sdxl_file, Strength(1.0))])
    assert all(torch.equal(before[k], v) for k, v in tiny_kohya.unet.state_dict().items())


def test_a_network_is_checked_once_while_it_lives_and_its_tensors_are_not_kept_after(tiny_kohya, monkeypatch):
    """The WebUI checks every LoRA of the prompt before each generation; a check computes every layer's ΔW shape."""
    import gc
    import weakref

    from lora_trainer.networks import apply, files

    checks = []
    monkeypatch.setattr(apply, "match_network",
                        lambda network, *rest: checks.append(network) or files.match_network(network, *rest))
    merged = MergedNetworks.for_model(tiny_kohya.config, tiny_kohya.unet, tiny_kohya.text_encoders)
    network = read_network(REFERENCE / "kohya-fixtures" / "lora-baseline/tinylora.safetensors")
    report = merged.check(network)
    assert merged.check(network) is report
    merged.set_networks([(network, Strength(0.5))])
    merged.set_networks([(network, Strength(1.0))])
    assert len(checks) == 1
    merged.restore()
    # a file read again (changed on disk) is a new object, and is checked again
    again = read_network(REFERENCE / "kohya-fixtures" / "lora-baseline/tinylora.safetensors")
    merged.check(again)
    assert len(checks) == 2
    tensor = weakref.ref(next(iter(next(iter(network.modules.values())).values())))
    del network, report, checks[:], again
    gc.collect()
    assert tensor() is None  # the remembered report went with its network


def test_broken_modules_are_named_nan_shape_and_unknown_suffix(tiny_kohya):
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    channels = tiny_kohya.unet.get_submodule("input_blocks.1.1.proj_in").weight.shape[0]
    broken = group_tensors({
        f"{name}.lora_down.weight": torch.full((4, channels, 1, 1), float("nan")),
        f"{name}.lora_up.weight": torch.zeros(channels, 4, 1, 1),
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, channels + 1, 1, 1),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(channels * 2, 4, 1, 1),
        "lora_unet_mid_block_attentions_0_proj_out.mystery": torch.zeros(3),
    })
    report = MergedNetworks.for_model(tiny_kohya.config, tiny_kohya.unet, tiny_kohya.text_encoders).check(broken)
    text = report.message()
    assert not report.ok
    assert f"{name}: NaN or Inf in lora_down.weight" in text
    assert any(p.startswith("lora_unet_mid_block_attentions_0_proj_in: ") and "input_blocks" not in p and "middle_block.1.proj_in" in p
               for p in report.problems), text
    assert "1 key no network algorithm reads: lora_unet_mid_block_attentions_0_proj_out.mystery" in text


def test_kohya_network_args_become_a_spec_and_unknown_ones_are_refused_by_name():
    spec = spec_from_kohya("lycoris.kohya", 8, 4, ["algo=loha", "conv_dim=4", "conv_alpha=2"])
    assert (spec.algorithm, spec.dim, spec.alpha, spec.conv_dim, spec.conv_alpha) == ("loha", 8, 4.0, 4, 2.0)
    assert spec.metadata_args() == '{"algo": "loha", "conv_dim": "4", "conv_alpha": "2"}'
    with pytest.raises(UserError, match="conv_dimm \\(did you mean conv_dim\\?\\)"):
        spec_from_kohya("networks.lora", 4, 1, ["conv_dimm=4"])
    with pytest.raises(UserError, match="network_module"):
        spec_from_kohya("networks.oft_magic", 4, 1, [])
    # sd-scripts splits at "=" without stripping: its lora.py never sees "conv_dim " and trains no conv layer, where
    # the stripped key trained them, and --print-kohya-command's line built that other network there
    with pytest.raises(UserError, match="sd-scripts reads its key as 'conv_dim ', spaces included, .* write conv_dim=4$"):
        spec_from_kohya("networks.lora", 4, 1, ["conv_dim = 4"])
    assert spec_from_kohya("networks.lora", 4, 1, ["conv_dim= 4"]).conv_dim == 4  # int(" 4") is 4 there too


def test_network_args_are_read_as_sd_scripts_splits_them():
    """sd-scripts splits each item at "=": an item without one stops it; networks.dylora trains DyLoRA, not LoRA."""
    assert spec_from_kohya("networks.dylora", 8, 1, ["unit=2"]).algorithm == "dylora"
    with pytest.raises(UserError, match="network_args item 'conv_dim' is not key=value"):
        spec_from_kohya("networks.lora", 4, 1, ["conv_dim"])


# (module, args, what is said): an arg the module's create_network never reads (sd-scripts 48d368fa networks/lora.py,
# networks/dylora.py; lycoris-lora 4.1.3 kohya.py) would build another network there than here
UNREAD_ARGS = [
    ("lycoris.kohya", ["algo=locon", "block_dims=" + ",".join(["4"] * 25)],
     "block_dims=4,.*: lycoris.kohya does not read it, so sd-scripts would build its network without it .LyCORIS trains "
     "every layer at network_dim/conv_dim"),
    ("lycoris.kohya", ["algo=locon", "preset=attn-mlp", "down_lr_weight=0.5"],
     "down_lr_weight=0.5: lycoris.kohya does not read it.*only networks.lora has block learning rates"),
    ("lycoris.kohya", ["algo=dylora", "unit=2"], "unit=2: lycoris.kohya does not read it.*LyCORIS's DyLoRA reads its "
                                                 "blocks of ranks from block_size"),
    ("networks.dylora", ["block_dims=" + ",".join(["4"] * 25)], "networks.dylora does not read it.*sd-scripts' DyLoRA "
                                                                "trains every layer at network_dim"),
    ("networks.dylora", ["rank_dropout=0.1", "module_dropout=0.1"],
     "module_dropout=0.1, rank_dropout=0.1: networks.dylora does not read them.*DyLoRA module has no dropout.; drop them"),
    ("networks.dylora", ["up_lr_weight=cosine"], "up_lr_weight=cosine: networks.dylora does not read it"),
    ("networks.dylora", ["block_size=2"], "block_size=…: LyCORIS options, which networks.dylora would ignore "
                                          ".sd-scripts' DyLoRA reads its blocks of ranks from unit."),
    ("networks.lora", ["unit=2"], "unit=2: networks.lora does not read it.*networks.dylora reads unit"),
    ("networks.lora", ["block_size=2"], "block_size=…: LyCORIS options, which networks.lora would ignore"),
]


@pytest.mark.parametrize("network_module, args, said", UNREAD_ARGS)
def test_each_network_module_refuses_the_args_it_does_not_read_naming_the_module_that_does(network_module, args, said):
    with pytest.raises(UserError, match=said):
        spec_from_kohya(network_module, 4, 1, args)


def test_networks_dylora_refuses_network_dropout_which_its_module_has_not():
    with pytest.raises(UserError, match="--network_dropout 0.1: networks.dylora does not read it .sd-scripts' DyLoRA "
                                        "module has no dropout"):
        spec_from_kohya("networks.dylora", 4, 1, ["unit=2"], network_dropout=0.1)
    assert spec_from_kohya("networks.lora", 4, 1, [], network_dropout=0.1).dropout == 0.1


@pytest.mark.parametrize("arg", ["down_lr_weight=0.5", "up_lr_weight=2"])
def test_a_single_number_for_down_or_up_block_rates_is_refused_as_sd_scripts_stops_on_it(arg):
    """It read as [0.5, 1 × 11]: IN00 alone, which has no layer, so nothing changed (sd-scripts stops on it)."""
    with pytest.raises(UserError, match=f"{arg}: give one weight per block, comma-separated .12 values, SDXL 9., or a "
                                        "preset .cosine, sine, linear, reverse_linear, zeros"):
        spec_from_kohya("networks.lora", 4, 1, [arg])
    with pytest.raises(UserError, match="mid_lr_weight=linear: give numbers"):
        spec_from_kohya("networks.lora", 4, 1, ["mid_lr_weight=linear"])
    assert spec_from_kohya("networks.lora", 4, 1, ["down_lr_weight=cosine+0.5", "mid_lr_weight=0.5"]).per_block


def test_block_lists_outside_sd_scripts_block_mode_are_said_unused():
    """sd-scripts reads block_alphas and the conv block lists only with block_dims or a block learning rate."""
    convs = ",".join(["2"] * 25)
    notes = network_args_notes(spec_from_kohya("networks.lora", 4, 1, [f"conv_block_dims={convs}"]))
    assert notes == ["network_args conv_block_dims: not used without block_dims or a block learning rate (down_lr_weight, "
                     "mid_lr_weight, up_lr_weight), as sd-scripts reads the block lists only then (the 3×3 convolutions "
                     "train only with conv_dim then); add block_dims to train by block"]
    assert network_args_notes(spec_from_kohya("networks.lora", 4, 1, [f"conv_block_dims={convs}", "mid_lr_weight=1"])) == []
    # the threshold alone starts no block mode in sd-scripts (parse_block_lr_kwargs: None without a weight list)
    threshold = spec_from_kohya("networks.lora", 4, 1, [f"conv_block_dims={convs}", "block_lr_zero_threshold=0.1"])
    assert not threshold.per_block and not threshold.with_convs and network_args_notes(threshold)
    with pytest.raises(UserError, match="sd-scripts' DyLoRA has no neuron dropout") as refused:
        spec_from_kohya("networks.dylora", 4, 1, ["dropout=0.1"])
    assert "--network_dropout" not in str(refused.value)  # which networks.dylora refuses too


@pytest.mark.parametrize("algo, said", [("loha", "the loha layers have none"), ("lokr", "the lokr layers have none"),
                                        ("ia3", "the ia3 layers"), ("dylora", "the dylora layers have none")])
def test_loraplus_on_a_lycoris_algorithm_without_lora_up_is_said_to_change_nothing(algo, said):
    notes = network_args_notes(spec_from_kohya("lycoris.kohya", 4, 1, [f"algo={algo}", "loraplus_lr_ratio=16"]))
    assert any(note.startswith("network_args loraplus_lr_ratio: LoRA+ raises the rate of the lora_up weights, and ")
               and said in note and note.endswith("so it changes nothing there") for note in notes), notes
    assert network_args_notes(spec_from_kohya("lycoris.kohya", 4, 1, ["algo=locon", "loraplus_lr_ratio=16"])) == []


# network_args as the Kohya GUI writes them for its LyCORIS types (lora_gui.py), with its defaults filled in
GUI_LYCORIS_ARGS = {
    "LyCORIS/LoCon": "preset=full conv_dim=1 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
                     "module_dropout=0 use_tucker=False use_scalar=False rank_dropout_scale=False algo=locon train_norm=False",
    "LyCORIS/LoKr": "preset=full conv_dim=1 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
                    "module_dropout=0 factor=-1 use_cp=False use_scalar=False decompose_both=False rank_dropout_scale=False "
                    "algo=lokr train_norm=False",
    "LyCORIS/iA3": "preset=full conv_dim=1 conv_alpha=1 train_on_input=True algo=ia3",
    "LyCORIS/GLoRA": "preset=full conv_dim=1 conv_alpha=1 use_tucker=False rank_dropout=0 module_dropout=0 "
                     "rank_dropout_scale=False algo=glora train_norm=False",
}


@pytest.mark.parametrize("gui_type", sorted(GUI_LYCORIS_ARGS))
def test_kohya_gui_lycoris_network_args_build_what_lycoris_builds_from_them(gui_type):
    """The GUI writes rank_dropout_scale and train_on_input into every such run; LyCORIS 4.1.3's create_network never
    reads them from network_args, so they are accepted and change nothing, as there."""
    args = GUI_LYCORIS_ARGS[gui_type].split()
    spec = spec_from_kohya("lycoris.kohya", 16, 8, args)
    without = spec_from_kohya("lycoris.kohya", 16, 8, [a for a in args if not a.startswith(("rank_dropout_scale=", "train_on_input="))])
    assert dataclasses.replace(spec, network_args=()) == dataclasses.replace(without, network_args=())
    assert not spec.ia3_on_input  # LyCORIS's iA3 from network_args trains the output side whatever the GUI says


@pytest.mark.parametrize("relative", ["lora-toml-variant/tinylora_toml.safetensors", "lora-lycoris/tiny_loha.safetensors"])
def test_a_file_as_forward_hooks_gives_the_same_output_as_merged(tiny_kohya, relative):
    from lora_trainer.networks.network import network_from_file

    model = tiny_kohya
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=generator)
    ids = torch.randint(0, 49408, (1, 77), generator=generator)

    @torch.no_grad()
    def outputs():
        hidden = model.text_encoders[0](ids).hidden
        return hidden, model.unet(x, torch.tensor([300]), hidden)

    network = read_network(REFERENCE / "kohya-fixtures" / relative)
    base = outputs()
    hooks = network_from_file(model.config, model.unet, model.text_encoders, network).eval().apply_to()
    hooks.set_multiplier(0.7)
    hooked = outputs()
    hooks.remove()
    assert all(torch.equal(b, o) for b, o in zip(base, outputs()))  # unhooking leaves nothing behind

    merged = MergedNetworks.for_model(model.config, model.unet, model.text_encoders)
    merged.set_networks([(network, Strength(0.7))])
    for h, m, b in zip(hooked, outputs(), base):
        assert not torch.allclose(h, b)
        torch.testing.assert_close(m, h, rtol=1e-4, atol=1e-5)
    merged.restore()


def test_block_weight_layouts_are_the_block_weight_extensions():
    from lora_trainer.networks.block_weights import block_layouts

    sd_every, sd_short = block_layouts(FULL_SIZE["sd1"].unet)
    xl_every, xl_short = block_layouts(FULL_SIZE["sdxl"].unet)
    assert sd_short == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12)))
    assert xl_short == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))
    assert (len(sd_every), len(xl_every)) == (26, 20)


def test_outd_preset_keeps_text_encoder_and_deep_output_blocks_and_drops_the_rest(tiny_kohya):
    from lora_trainer.networks.block_weights import parse_block_weights

    model = tiny_kohya
    weights = parse_block_weights("OUTD", model.config.unet)
    assert weights["BASE"] == 1 and weights["OUT03"] == 1 and weights["OUT07"] == 0 and weights["IN01"] == 0
    network = read_network(REFERENCE / "kohya-fixtures" / "lora-baseline" / "tinylora.safetensors")
    merged = MergedNetworks.for_model(model.config, model.unet, model.text_encoders)
    before = {"te": model.text_encoders[0].state_dict(), "unet": model.unet.state_dict()}
    before = {side: {k: v.clone() for k, v in state.items()} for side, state in before.items()}
    merged.set_networks([(network, Strength(1.0, blocks=weights))])
    changed = {k for k, v in model.unet.state_dict().items() if not torch.equal(v, before["unet"][k])}
    assert changed and all(k.startswith(("output_blocks.3.", "output_blocks.4.", "output_blocks.5.", "output_blocks.6.")) for k in changed)
    assert any(not torch.equal(v, before["te"][k]) for k, v in model.text_encoders[0].state_dict().items())
    merged.restore()
    with pytest.raises(UserError, match="takes 17"):
        parse_block_weights("1,0,1", model.config.unet)


def test_an_sdxl_file_whose_clip_l_names_fit_sd1_is_still_refused_whole():
    config = FULL_SIZE["sd1"]
    unet, text_encoders, _ = build_models(config)
    merged = MergedNetworks.for_model(config, unet, text_encoders)
    sdxl_file = group_tensors({
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),  # fits SD1's CLIP-L
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4),
    }, {"ss_base_model_version": "sdxl_base_v1-0"})
    report = merged.check(sdxl_file)
    assert len(report.matched) == 1 and not report.ok and "SDXL network" in report.message()
