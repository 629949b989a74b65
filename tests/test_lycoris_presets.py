"""``lycoris.kohya`` with LyCORIS presets trains exactly the layers LyCORIS would on sd-scripts' models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference import REFERENCE, TINY_KOHYA_CHECKPOINT
from safetensors import safe_open

from lora_trainer.errors import UserError
from lora_trainer.models.checkpoint import build_models, load_checkpoint
from lora_trainer.models.configs import FULL_SIZE
from lora_trainer.networks.lycoris_presets import LYCORIS_PRESETS
from lora_trainer.networks.files import read_network
from lora_trainer.networks.network import create_network, network_from_file, save_network
from lora_trainer.training.options import options_from
from lora_trainer.networks.spec import lycoris_reading_notes, spec_from_kohya

LYCORIS_RUN = json.loads((Path(__file__).parent / "data" / "lycoris-preset-modules-tiny-sd15.json").read_text(encoding="utf-8"))
# preset files (blocks; regex names with exclusions and keys left to the full preset; fnmatch patterns) and the
# modules lycoris-lora made from each on sd-scripts' SD1 model
LYCORIS_FILES = json.loads((Path(__file__).parent / "data" / "lycoris-preset-files-tiny-sd15.json").read_text(encoding="utf-8"))["files"]
# preset files with block maps (module_algo_map by class, name_algo_map by path), and what lycoris-lora saved from each
# on sd-scripts' SD1 model: every module's class and every tensor's shape (alpha's value)
LYCORIS_MAPS = json.loads((Path(__file__).parent / "data" / "lycoris-preset-maps-tiny-sd15.json").read_text(encoding="utf-8"))
# LyCORIS options (use_tucker, train_norm, unbalanced_factorization, bypass_mode, rs_lora) and what lycoris-lora saved
LYCORIS_OPTIONS = json.loads((Path(__file__).parent / "data" / "lycoris-options-tiny-sd15.json").read_text(encoding="utf-8"))["runs"]
LYCORIS_CLASS = {"lora": "LoConModule", "loha": "LohaModule", "lokr": "LokrModule", "dylora": "DyLoraModule",
                 "norm": "NormModule", "full": "FullModule", "ia3": "IA3Module", "diag-oft": "DiagOFTModule",
                 "glora": "GLoRAModule", "boft": "ButterflyOFTModule"}


@pytest.fixture(scope="module")
def tiny_kohya():
    return load_checkpoint(TINY_KOHYA_CHECKPOINT, dtype=torch.float32)


def network(model, *args: str, dim: int = 4, alpha: float = 4):
    return create_network(model.config, model.unet, model.text_encoders, spec_from_kohya("lycoris.kohya", dim, alpha, list(args)))


@pytest.mark.parametrize("preset", sorted(LYCORIS_PRESETS))
def test_each_preset_has_the_modules_lycoris_creates_on_sd_scripts_sd1_model(tiny_kohya, preset):
    assert sorted(network(tiny_kohya, "algo=locon", f"preset={preset}")) == LYCORIS_RUN["presets"][preset]


@pytest.mark.parametrize("algo", ["locon", "loha"])
def test_the_attn_mlp_fixture_run_has_our_keys_and_shapes(tiny_kohya, algo):
    """sd-scripts' own run: ``--network_args algo=… conv_dim=2 conv_alpha=1 preset=attn-mlp`` (convs off there)."""
    ours = network(tiny_kohya, f"algo={algo}", "conv_dim=2", "conv_alpha=1", "preset=attn-mlp")
    shapes = {f"{name}.{key}": tuple(t.shape) for name, module in ours.items() for key, t in module.file_tensors().items()}
    with safe_open(str(REFERENCE / "kohya-fixtures" / "lora-lycoris" / f"tiny_{algo}.safetensors"), "pt") as handle:
        assert shapes == {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def test_without_a_preset_lycoris_trains_its_full_preset_with_convs_at_the_network_dim(tiny_kohya):
    modules = network(tiny_kohya, "algo=locon", dim=8, alpha=2)
    assert sorted(modules) == LYCORIS_RUN["presets"]["full"]
    conv = modules["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv.lora_down.weight.shape[0] == 8 and float(conv.alpha) == 2.0  # LyCORIS: conv_dim/alpha default to dim/alpha
    assert "lora_unet_conv_in" in modules and "lora_unet_time_embedding_linear_1" in modules


def test_sdxl_full_preset_is_sd_scripts_conv_lora_layout_since_its_unet_has_no_named_embedding_layers():
    config = FULL_SIZE["sdxl"]
    unet, text_encoders, _ = build_models(config)  # meta device
    full = create_network(config, unet, text_encoders, spec_from_kohya("lycoris.kohya", 4, 1, ["algo=locon"]))
    listed = {line.split("\\t")[0].split(".")[0] for line in (REFERENCE / "kohya-lora-keys-sdxl-conv.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#")}
    assert set(full) == listed


def test_presets_are_refused_outside_lycoris_and_unknown_ones_are_named():
    with pytest.raises(UserError, match="preset=…: LyCORIS options, which networks.lora would ignore"):
        spec_from_kohya("networks.lora", 4, 1, ["preset=attn-mlp"])
    # sd-scripts' networks.lora and networks.dylora never read dropout=: it trained with dropout here, silently
    for module, instead in (("networks.lora", r"its dropout is --network_dropout 0\.1"),
                            ("networks.dylora", "sd-scripts' DyLoRA has no neuron dropout")):
        with pytest.raises(UserError, match=rf"dropout=…: LyCORIS options, which {module} would ignore \({instead}\)"):
            spec_from_kohya(module, 4, 1, ["dropout=0.1"])
    assert spec_from_kohya("lycoris.kohya", 4, 1, ["algo=locon", "dropout=0.1"]).dropout == 0.1
    with pytest.raises(UserError, match="preset=ia3: .* choose no layer of an SD model"):
        spec_from_kohya("lycoris.kohya", 4, 1, ["preset=ia3"])
    with pytest.raises(UserError, match="preset=atn-mlp: not a LyCORIS preset .full, full-lin, attn-mlp"):
        spec_from_kohya("lycoris.kohya", 4, 1, ["preset=atn-mlp"])


@pytest.mark.parametrize("file_name", sorted(LYCORIS_FILES))
def test_each_preset_file_has_the_modules_lycoris_creates_from_it(tiny_kohya, tmp_path, file_name):
    preset = tmp_path / "预设 Vorlagen" / file_name
    preset.parent.mkdir()
    preset.write_text(LYCORIS_FILES[file_name]["toml"], encoding="utf-8")
    assert sorted(network(tiny_kohya, "algo=locon", f"preset={preset}")) == LYCORIS_FILES[file_name]["modules"]


def test_a_preset_file_without_convolutions_gives_none_even_with_a_conv_dim(tiny_kohya, tmp_path):
    preset = tmp_path / "linear.toml"
    preset.write_text('enable_conv = false\nunet_target_module = ["ResnetBlock2D"]\ntext_encoder_target_module = []\n', encoding="utf-8")
    modules = network(tiny_kohya, "algo=locon", "conv_dim=8", f"preset={preset}")
    assert modules and all(m.lora_down.weight.dim() == 2 or m.lora_down.weight.shape[2:] == (1, 1) for m in modules.values())
    assert "lora_unet_down_blocks_1_resnets_0_time_emb_proj" in modules


@pytest.mark.parametrize("content, message", [
    ('unet_target_module = ["UNet2DConditionModel"]', "lists the model root UNet2DConditionModel"),
    ('module_algo_map = ["CrossAttention"]', "module_algo_map must be a table of tables"),
    ('[module_algo_map.CrossAtention]\ndim = 2', "module_algo_map lists CrossAtention, no block of an SD model"),
    ('[module_algo_map.CrossAttention]\nalgo = "tlora"', r"\[module_algo_map.CrossAttention\] algo = 'tlora' is not trained here"),
    ('[module_algo_map.CrossAttention]\ndim = "8"', "dim must be a whole number"),
    ('[module_algo_map.CrossAttention]\ndim = 0', "dim must be at least 1"),
    ('[module_algo_map.CrossAttention]\nalpha = 0', "alpha = 0: LyCORIS reads it as unset"),
    ('[module_algo_map.CrossAttention]\nweight_decompose = "yes"', "weight_decompose must be true or false"),
    ('[module_algo_map.CrossAttention]\ndropout = 0.1', "dropout: LyCORIS stops with a dropout in a block map"),
    ('[module_algo_map.CrossAttention]\nwd_on_output = false', "wd_on_output: LyCORIS applies network_args' wd_on_output"),
    ('[module_algo_map.CrossAttention]\nbypass_mode = true', "bypass_mode is not supported in a block map"),
    ('[name_algo_map."down_blocks.(0"]\ndim = 2', "name_algo_map 'down_blocks.\\(0' is not a regular expression"),
    ('unet_target_module = ["Transfomer2DModel"]', "unet_target_module lists Transfomer2DModel, no block of an SD model"),
    ('text_encoder_target_module = ["Transformer2DModel"]', "text_encoder_target_module lists Transformer2DModel"),
    ('unet_target_modules = ["Transformer2DModel"]', "unknown keys: unet_target_modules"),
    ("enable_conv = 'yes'", "enable_conv must be true or false"),
    ('unet_target_name = ["down_blocks.(0"]', "is not a regular expression"),
    ("enable_conv = = true", "not valid TOML"),
])
def test_bad_preset_files_are_refused_naming_the_file_and_the_key(tmp_path, content, message):
    preset = tmp_path / "mein Preset.toml"
    preset.write_text(content + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=message) as error:
        spec_from_kohya("lycoris.kohya", 4, 1, [f"preset={preset}"])
    assert "mein Preset.toml" in str(error.value)
    with pytest.raises(UserError, match="cannot read the preset file"):
        spec_from_kohya("lycoris.kohya", 4, 1, [f"preset={tmp_path / 'missing.toml'}"])


@pytest.mark.parametrize("file_name", sorted(LYCORIS_MAPS["files"]))
def test_block_maps_give_each_layer_the_algorithm_and_tensors_lycoris_gives_it(tiny_kohya, tmp_path, file_name):
    expected = LYCORIS_MAPS["files"][file_name]
    preset = tmp_path / "Blöcke 配置" / file_name
    preset.parent.mkdir()
    preset.write_text(expected["toml"], encoding="utf-8")
    ours = network(tiny_kohya, *expected["network_args"], f"preset={preset}")
    assert saved_like_lycoris(ours) == expected["modules"]


def saved_like_lycoris(modules) -> dict[str, str]:
    """Each module as the fixtures write it: its LyCORIS class, then suffix=shape (alpha=value) per tensor."""
    def tensor(key, t):
        return f"{key}={float(t)}" if t.dim() == 0 else f"{key}={'x'.join(map(str, t.shape))}"
    return {name: " ".join([LYCORIS_CLASS[module.algorithm], *sorted(tensor(k, t) for k, t in module.file_tensors().items())])
            for name, module in modules.items()}


@pytest.mark.parametrize("run", sorted(LYCORIS_OPTIONS))
def test_lycoris_options_give_the_modules_and_tensors_lycoris_saves(tiny_kohya, run):
    expected = LYCORIS_OPTIONS[run]
    dims = [int(a.split("=")[1]) for a in expected["network_args"] if a.startswith("network_dim=")]
    args = [a for a in expected["network_args"] if not a.startswith("network_dim=")]
    assert saved_like_lycoris(network(tiny_kohya, *args, dim=dims[0] if dims else 4)) == expected["modules"]


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_rs_lora_scales_by_the_square_root_of_the_rank_and_stores_alpha_so_readers_agree(tiny_kohya, algo):
    modules = network(tiny_kohya, f"algo={algo}", "rs_lora=True", "preset=attn-only", "factor=2", dim=4, alpha=4)
    assert {float(m.alpha) for m in modules.values()} == {8.0}  # α·√r, as lycoris-lora 4.1.3 saves it (4, 4 → 8)
    assert {m.lora_scale for m in modules.values() if algo == "locon"} <= {2.0}  # α/√r in training
    with pytest.raises(UserError, match="DyLoRA keeps the α/r scale"):
        spec_from_kohya("lycoris.kohya", 4, 4, ["algo=dylora", "rs_lora=True"])


def test_boft_names_the_dim_a_layer_width_needs(tiny_kohya):
    with pytest.raises(UserError, match="96 output channels cannot be split .* at most network_dim/conv_dim = 4 .*at least 6"):
        network(tiny_kohya, "algo=boft", "preset=attn-only", dim=4)


def test_tucker_and_dropout_options_are_checked_against_the_algorithm():
    assert spec_from_kohya("lycoris.kohya", 4, 4, ["use_conv_cp=True"]).tucker  # LyCORIS's older names
    assert not spec_from_kohya("lycoris.kohya", 4, 4, ["use_tucker=False"]).tucker
    with pytest.raises(UserError, match="disable_conv_cp: LyCORIS reads it from network_args as text"):
        spec_from_kohya("lycoris.kohya", 4, 4, ["disable_conv_cp=False"])
    with pytest.raises(UserError, match="DyLoRA has no Tucker form"):
        spec_from_kohya("lycoris.kohya", 4, 4, ["algo=dylora", "use_tucker=True"])
    with pytest.raises(UserError, match="algo=loha has no neuron dropout"):
        spec_from_kohya("lycoris.kohya", 4, 4, ["algo=loha"], network_dropout=0.1)
    with pytest.raises(UserError, match="algo=glora: rs_lora apply to lora, loha and lokr only"):
        spec_from_kohya("lycoris.kohya", 4, 4, ["algo=glora", "rs_lora=True"])  # LyCORIS would scale by α/√r, save α
    with pytest.raises(UserError, match="train_t5xxl=True: an SD model has no T5 encoder"):
        spec_from_kohya("lycoris.kohya", 4, 4, ["train_t5xxl=True"])
    assert spec_from_kohya("lycoris.kohya", 4, 4, ["train_t5xxl=False"]).algorithm == "lora"
    with pytest.raises(UserError, match="use_scalar: LyCORIS's dylora has no trained scalar"):
        spec_from_kohya("lycoris.kohya", 4, 4, ["algo=dylora", "use_scalar=True"])
    with pytest.raises(UserError, match="use_tucker=…: LyCORIS options, which networks.lora would ignore"):
        spec_from_kohya("networks.lora", 4, 4, ["use_tucker=True"])


def test_switches_read_as_lycoris_4_1_3_reads_them_and_the_surprising_readings_are_said():
    """The same network as sd-scripts with lycoris-lora builds from the same args (the Kohya GUI's LoKr passes
    use_cp=False beside use_tucker, and decompose_both=False, into every run): LyCORIS's `use_conv_cp or use_cp or
    use_tucker` stops at the first text given, its decompose_both is the text itself (any text is true), and its
    str_bool takes anything but "false" for true."""
    gui_lokr = ["algo=lokr", "use_tucker=True", "use_cp=False", "decompose_both=False"]
    spec = spec_from_kohya("lycoris.kohya", 4, 4, gui_lokr)
    assert not spec.tucker and spec.decompose_both
    notes = lycoris_reading_notes(gui_lokr)
    assert "use_tucker=True is not used: LyCORIS reads use_cp=False, given too, as its answer" in notes[0]
    assert "decompose_both=False decomposes both LoKr factors all the same" in notes[1]
    assert spec_from_kohya("lycoris.kohya", 4, 4, ["algo=lokr", "use_tucker=True"]).tucker
    assert lycoris_reading_notes(["algo=lokr", "use_tucker=True"]) == []
    assert spec_from_kohya("lycoris.kohya", 4, 4, ["use_scalar=0"]).use_scalar


def test_a_block_mapped_network_trains_on_from_its_file_with_each_layer_as_it_was(tiny_kohya, tmp_path):
    """``--network_weights`` with the same preset: a layer the map made DyLoRA goes on as DyLoRA (its rank slicing)."""
    preset = tmp_path / "names.toml"
    preset.write_text(LYCORIS_MAPS["files"]["maps_names.toml"]["toml"], encoding="utf-8")
    args = [*LYCORIS_MAPS["files"]["maps_names.toml"]["network_args"], f"preset={preset}"]
    made = network(tiny_kohya, *args)
    path = save_network({k: v for name, m in made.items() for k, v in
                         ((f"{name}.{key}", t) for key, t in m.file_tensors().items())}, tmp_path / "mixed.safetensors", {})
    spec = spec_from_kohya("lycoris.kohya", 4, 4, args)
    again = network_from_file(tiny_kohya.config, tiny_kohya.unet, tiny_kohya.text_encoders, read_network(path), spec)
    assert {n: m.algorithm for n, m in again.items()} == {n: m.algorithm for n, m in made.items()}
    assert again["lora_unet_time_embedding_linear_1"].algorithm == "dylora"
    assert again["lora_unet_time_embedding_linear_1"].unit == 2


@pytest.mark.parametrize("entry, refused", [("weight_decompose = true", "DoRA"), ('algo = "diag-oft"', "diag-oft")])
def test_scale_weight_norms_is_refused_when_a_block_map_adds_what_it_cannot_limit(tmp_path, entry, refused):
    preset = tmp_path / "map.toml"
    preset.write_text(f"[module_algo_map.FeedForward]\n{entry}\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"not with {refused}"):
        options_from({"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d", "scale_weight_norms": 1.0,
                      "network_module": "lycoris.kohya", "network_args": ["algo=lora", f"preset={preset}"]})


def test_lycoris_dylora_ranks_come_in_blocks_of_four_unless_told(tiny_kohya):
    assert spec_from_kohya("lycoris.kohya", 8, 8, ["algo=dylora"]).unit == 4  # LyCORIS's default block_size
    assert spec_from_kohya("networks.dylora", 8, 8, []).unit == 1  # sd-scripts' default unit
    with pytest.raises(UserError, match="rank 6 is not a multiple of its unit .block_size. 4"):
        network(tiny_kohya, "algo=dylora", "preset=attn-only", dim=6)


def test_lycoris_algorithms_newer_than_the_one_implemented_are_named_as_such():
    with pytest.raises(UserError, match="'abba' is a LyCORIS algorithm newer than lycoris-lora 4.1.3.*choose one of lora"):
        spec_from_kohya("lycoris.kohya", 4, 1, ["algo=abba"])


def test_t_lora_is_refused_for_what_its_files_cannot_do():
    """T-LoRA is in LyCORIS 4.1.3, but no WebUI or ComfyUI loader reads its files (network-formats.md)."""
    with pytest.raises(UserError, match="'tlora' .T-LoRA, LyCORIS 4.1.3. is not trained here: its files .* load in "
                                        "neither the WebUI nor ComfyUI; choose one of lora"):
        spec_from_kohya("lycoris.kohya", 4, 1, ["algo=tlora"])
