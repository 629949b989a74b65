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
from lora_trainer.networks.network import create_network
from lora_trainer.networks.spec import spec_from_kohya

LYCORIS_RUN = json.loads((Path(__file__).parent / "data" / "lycoris-preset-modules-tiny-sd15.json").read_text(encoding="utf-8"))
# preset files (blocks; regex names with exclusions and keys left to the full preset; fnmatch patterns) and the
# modules lycoris-lora made from each on sd-scripts' SD1 model
LYCORIS_FILES = json.loads((Path(__file__).parent / "data" / "lycoris-preset-files-tiny-sd15.json").read_text(encoding="utf-8"))["files"]


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
    with pytest.raises(UserError, match="preset=… is a LyCORIS option"):
        spec_from_kohya("networks.lora", 4, 1, ["preset=attn-mlp"])
    with pytest.raises(UserError, match="preset=ia3: LyCORIS's ia3 preset sets an algorithm per layer"):
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
    ('module_algo_map = { CrossAttention = { algo = "lokr" } }', "not supported: module_algo_map .per-block algorithms"),
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
