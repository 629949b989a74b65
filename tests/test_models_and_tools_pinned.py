"""Behaviour a mutation review of model loading, the LoRA tools and the sd-scripts translation found unpinned.

Each test holds one rule against its reference: the WebUI's or ComfyUI's reading of a checkpoint, sd-scripts'
formulas and command line, or the Kohya GUI's translation of its own settings.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import toml
import torch
from torch import nn

from lora_trainer.errors import UserError
from lora_trainer.grid.plan import lora_tag
from lora_trainer.models import checkpoint
from lora_trainer.models.checkpoint import TensorSource, UnknownArchitecture, build_models, detect_architecture, open_tensors
from lora_trainer.models.configs import SD1, SD2, SDXL
from lora_trainer.networks.activation import LoraLibrary, merge_prompt_loras, parse_lora_call
from lora_trainer.networks.apply import MergedNetworks, Strength
from lora_trainer.networks.block_weights import block_layouts
from lora_trainer.networks.files import group_tensors
from lora_trainer.networks.naming import Target
from lora_trainer.networks.tools.bake import bake
from lora_trainer.networks.tools.inspect import base_model_of, block_of, rank_and_alpha
from lora_trainer.networks.tools.merge import merge_networks
from lora_trainer.networks.tools.resize import dynamic_rank, resize, resize_network
from lora_trainer.networks.tools.shared import low_rank
from lora_trainer.safe_io import save_safetensors
from lora_trainer.train_network import main as train_main
from lora_trainer.training.events import read_events
from lora_trainer.training.kohya_gui import options_from_gui
from lora_trainer.training.sd_scripts_backend import absolute_dataset_config


# --- checkpoints: what a file is ------------------------------------------------------------------------------


def shapes_of_config(config, drop: tuple[str, ...] = ()) -> TensorSource:
    """A file's header as ``config``'s models would write it (built on the meta device: no memory)."""
    unet, text_encoders, vae = build_models(config)
    parts = [(config.unet_prefix, unet), (config.vae_prefix, vae)]
    parts += [(slot.prefix, encoder) for slot, encoder in zip(config.text_encoders, text_encoders)]
    shapes = {prefix + k: tuple(v.shape) for prefix, module in parts for k, v in module.state_dict().items()}
    shapes = {k: v for k, v in shapes.items() if not k.startswith(drop)} if drop else shapes
    return TensorSource(Path(f"{config.name}.safetensors"), shapes, {k: torch.float16 for k in shapes}, None, {})


def test_an_sd2_file_without_its_text_encoder_is_still_sd2_by_its_linear_proj_in():
    """SD2's UNet alone (a pruned file, a UNet-only merge) is told from SD1's by its linear proj_in, as the reason says:
    read as SD1 it would get SD1's heads and sd-scripts no --v2."""
    config, reason = detect_architecture(shapes_of_config(SD2, drop=("cond_stage_model.",)))
    assert config.name == "sd2" and config.unet == SD2.unet
    assert "linear proj_in" in reason


def test_text_encoder_heads_and_projection_of_a_non_standard_width_are_read_from_the_shapes():
    """A text encoder of another width has CLIP's 64-wide heads (width // 64); OpenCLIP's text_projection is
    [width, projection] (applied as x @ P), so its projection width is the second dimension."""
    clip, openclip = SDXL.text_encoders
    wide_clip = dataclasses.replace(clip.config, width=512, heads=8, mlp_width=2048, projection_dim=None)
    narrow_openclip = dataclasses.replace(openclip.config, width=256, heads=4, mlp_width=1024, layers=4, projection_dim=96)
    config = dataclasses.replace(SDXL, text_encoders=(dataclasses.replace(clip, config=wide_clip),
                                                      dataclasses.replace(openclip, config=narrow_openclip)))
    read, _ = detect_architecture(shapes_of_config(config))
    assert [slot.config for slot in read.text_encoders] == [wide_clip, narrow_openclip]


def test_an_sdxl_refiner_is_refused_by_name():
    """The refiner has SDXL's size conditioning but only OpenCLIP bigG, stored as conditioner.embedders.0.model."""
    source = shapes_of_config(SDXL, drop=("conditioner.",))
    big_g = shapes_of_config(SDXL).shapes
    source.shapes.update({k.replace("embedders.1.", "embedders.0."): v for k, v in big_g.items()
                          if k.startswith("conditioner.embedders.1.") and "ln_final" not in k})
    with pytest.raises(UnknownArchitecture, match="SDXL refiner, which is not supported: use an SDXL base model"):
        detect_architecture(source)


def test_a_yaml_beside_an_sd2_file_that_does_not_say_v_makes_it_epsilon_without_a_test_forward(tmp_path, monkeypatch):
    """The WebUI takes the .yaml beside a checkpoint as its config: without ``parameterization: "v"`` it is an eps model
    (v2-inference.yaml), and the test forward is not run."""
    forwards = []
    monkeypatch.setattr(checkpoint, "_responds_like_v_prediction", lambda source, config: forwards.append(1) or True)
    path = tmp_path / "sd2-base.safetensors"
    path.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n", encoding="utf-8")
    config, _, notes, _ = checkpoint.identify(shapes_of_config(SD2), path)
    assert config == SD2 and forwards == []
    assert "prediction type epsilon (from sd2-base.yaml)" in notes


def test_the_test_forward_is_run_on_full_size_sd2_only(monkeypatch):
    """The WebUI's test is calibrated on SD2's own weights; on an SD2-shaped model of other widths (a tiny test model)
    its answer means nothing: such a file without a declared type is read as epsilon."""
    monkeypatch.setattr(checkpoint, "_responds_like_v_prediction", lambda source, config: True)
    narrow = dataclasses.replace(SD2, unet=dataclasses.replace(SD2.unet, model_channels=64))
    config, _, notes, _ = checkpoint.identify(shapes_of_config(narrow), Path("/nonexistent/narrow.safetensors"))
    assert config.prediction_type == "epsilon" and not any("test forward" in note for note in notes)


def test_a_peft_lora_given_as_base_model_is_named_as_a_lora(tmp_path):
    """Diffusers/PEFT LoRAs (lora_A/lora_B keys) are networks too: the message says where such a file goes."""
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    path = save_safetensors({f"{layer}.lora_A.weight": torch.zeros(4, 320), f"{layer}.lora_B.weight": torch.zeros(320, 4)},
                            tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(UnknownArchitecture, match=r"it looks like a LoRA/LyCORIS network \(put it in models/Lora\)"):
        detect_architecture(checkpoint.open_tensors(path))


def test_the_ztsnr_marker_changes_the_schedule_of_v_prediction_files_only():
    """ComfyUI reads ``ztsnr`` only beside ``v_pred`` (supported_models: zsnr inside the v-prediction branch); a file
    that carries it and declares epsilon keeps the ordinary schedule."""
    source = shapes_of_config(SD1)
    source.shapes["ztsnr"] = (0,)
    source.metadata["modelspec.prediction_type"] = "epsilon"
    config, _, notes, _ = checkpoint.identify(source, Path("/nonexistent/eps.safetensors"))
    assert config == SD1 and not config.schedule.zero_terminal_snr
    assert not any("zero terminal SNR" in note for note in notes)
    del source.metadata["modelspec.prediction_type"]
    source.shapes["v_pred"] = (0,)
    config, _, notes, _ = checkpoint.identify(source, Path("/nonexistent/v.safetensors"))
    assert config.prediction_type == "v_prediction" and config.schedule.zero_terminal_snr
    assert "prediction type v_prediction (the file's v_pred marker)" in notes


# --- merged networks: what is kept, what is let go ---------------------------------------------------------------


def one_layer_model():
    """A model of two Linear layers: ``inner`` in an input block (IN01), ``out`` in none (the UNet's output conv)."""
    model = nn.Module()
    model.inner, model.out = nn.Linear(4, 4), nn.Linear(4, 4)
    targets = {name: Target(name, "lora_unet", path, block=block)
               for name, path, block in (("lora_unet_inner", "inner", "IN01"), ("lora_unet_out", "out", ""))}
    return model, MergedNetworks(targets, {"lora_unet": model})


def lora_file(*names: str, value: float = 1.0):
    """A rank-1 LoRA on each named layer with ΔW = value · ones (α = rank: scale 1)."""
    tensors = {}
    for name in names:
        tensors |= {f"{name}.lora_down.weight": torch.ones(1, 4), f"{name}.lora_up.weight": torch.full((4, 1), value),
                    f"{name}.alpha": torch.tensor(1.0)}
    return group_tensors(tensors)


def test_a_layer_no_network_touches_any_more_lets_its_copy_go_and_restore_lets_every_copy_go():
    model, merged = one_layer_model()
    network = lora_file("lora_unet_inner")
    original = model.inner.weight.detach().clone()
    merged.set_networks([(network, Strength(1.0))])
    assert merged.held_bytes() > 0
    merged.set_networks([])
    assert torch.equal(model.inner.weight, original) and merged.held_bytes() == 0
    merged.set_networks([(network, Strength(1.0))])
    merged.restore()
    assert torch.equal(model.inner.weight, original) and merged.held_bytes() == 0


def test_after_a_restore_networks_apply_to_the_weights_the_layers_hold_then():
    """The WebUI loads another checkpoint into the same modules after a restore: a LoRA applied next changes those
    weights, not the ones the layers held before."""
    model, merged = one_layer_model()
    network = lora_file("lora_unet_inner", value=0.5)
    merged.set_networks([(network, Strength(1.0))])
    merged.restore()
    with torch.no_grad():
        model.inner.weight.fill_(2.0)  # the other checkpoint's weights
    merged.set_networks([(network, Strength(1.0))])
    assert torch.equal(model.inner.weight, torch.full((4, 4), 2.5))
    merged.restore()
    assert torch.equal(model.inner.weight, torch.full((4, 4), 2.0))


def test_block_weights_leave_a_layer_in_no_block_at_the_networks_strength():
    """The block-weight extension weights the blocks it names; a layer outside every block (the UNet's time embedding,
    its output conv: a LyCORIS "full" file trains them) keeps the tag's strength."""
    model, merged = one_layer_model()
    before = {name: layer.weight.detach().clone() for name, layer in (("inner", model.inner), ("out", model.out))}
    merged.set_networks([(lora_file("lora_unet_inner", "lora_unet_out"), Strength(0.5, blocks={"BASE": 1.0, "IN01": 0.0}))])
    assert torch.equal(model.inner.weight, before["inner"])
    assert torch.allclose(model.out.weight, before["out"] + 0.5)


# --- <lora:…> tags and the files they name ---------------------------------------------------------------------------


class RecordingModel:
    """Stands in for ``MergedNetworks``: every network fits, and what would be merged is recorded."""

    def __init__(self):
        self.wanted = None

    def check(self, network):
        return SimpleNamespace(ok=True)

    def set_networks(self, wanted):
        self.wanted = wanted


def lora_folder(tmp_path: Path, *stems: str, metadata=None) -> LoraLibrary:
    tensors = {"lora_unet_layer.lora_down.weight": torch.ones(1, 4), "lora_unet_layer.lora_up.weight": torch.ones(4, 1)}
    for stem in stems:
        save_safetensors(tensors, tmp_path / f"{stem}.safetensors", metadata or {})
    return LoraLibrary([tmp_path])


def test_a_unet_weight_of_zero_is_zero_and_a_text_encoder_weight_of_zero_leaves_the_unet_on(tmp_path):
    """<lora:x:1:0> has no UNet change (a grid cannot draw it at one strength); <lora:x:0:1> changes the UNet only, so
    it is merged: only both at 0 (or dyn=0) leave the LoRA out."""
    assert parse_lora_call(["x", "1", "0"]).unet_multiplier == 0.0
    with pytest.raises(UserError, match="sets more than one strength"):
        lora_tag("<lora:x:1:0>")
    assert parse_lora_call(["x", "0", "1"]).has_effect and not parse_lora_call(["x", "0", "0"]).has_effect
    model = RecordingModel()
    used, skipped = merge_prompt_loras("a cat <lora:style:0:1>", lora_folder(tmp_path, "style"), model, SD1)
    assert [name for name, _ in used] == ["style"] and not skipped
    ((_, strength),) = model.wanted
    assert (strength.te, strength.unet) == (0.0, 1.0)


def test_run_at_epoch_finds_sd_scripts_numbered_files_by_their_names(tmp_path):
    """sd-scripts names epoch files <name>-000002 (six digits): ``cats@e2`` is that file, metadata or not."""
    library = lora_folder(tmp_path, "cats-000001", "cats-000002")
    assert library.resolve("cats@e2") == tmp_path / "cats-000002.safetensors"


def test_a_block_weight_preset_takes_the_blocks_of_the_model_it_is_merged_into(tmp_path):
    """``lbw=ALL`` on an SDXL model is the preset over SDXL's 20 blocks, not SD1's 26."""
    model = RecordingModel()
    merge_prompt_loras("<lora:style:1:lbw=ALL>", lora_folder(tmp_path, "style"), model, SDXL)
    ((_, strength),) = model.wanted
    assert tuple(strength.blocks) == block_layouts(SDXL.unet)[0]


# --- resize, merge, inspect, bake ------------------------------------------------------------------------------------


def lora_with_singular_values(values, alpha, shape=(16, 12), name="lora_unet_layer", seed=0) -> dict[str, torch.Tensor]:
    """A Linear LoRA whose unscaled up @ down has exactly these singular values."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(shape[0], len(values), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], len(values), generator=generator, dtype=torch.float64))
    up, down = u * torch.tensor(values, dtype=torch.float64), v.T
    return {f"{name}.lora_up.weight": up.float(), f"{name}.lora_down.weight": down.float(),
            f"{name}.alpha": torch.tensor(alpha)}


def test_sv_ratio_keeps_the_values_strictly_above_the_largest_over_the_ratio():
    """sd-scripts' index_sv_ratio: sum(S > S[0] / ratio); a value exactly at the bound is dropped."""
    assert dynamic_rank(torch.tensor([8.0, 4.0, 2.0, 1.0]), "sv_ratio", 4) == 2
    assert dynamic_rank(torch.tensor([8.0, 4.0, 2.0, 1.0]), "sv_ratio", 4.01) == 3


def test_resize_puts_the_singular_values_into_up_as_sd_scripts_does():
    """extract_linear: up = U·diag(S), down = Vh: down's rows are orthonormal, up's columns as long as S."""
    result = resize_network(group_tensors(lora_with_singular_values([8.0, 4.0, 2.0, 1.0], alpha=4.0)), 2)
    up, down = result.tensors["lora_unet_layer.lora_up.weight"], result.tensors["lora_unet_layer.lora_down.weight"]
    assert torch.allclose(up.norm(dim=0), torch.tensor([8.0, 4.0]), atol=1e-5)
    assert torch.allclose(down @ down.T, torch.eye(2), atol=1e-5)


def test_resize_writes_the_last_modules_alpha_and_makes_an_untrained_module_rank_one(tmp_path):
    """sd-scripts' resize_lora.py: ss_network_alpha is the new alpha of the last module it resized (files list their
    keys sorted); a module whose ΔW is zero (largest singular value ≤ 1e-6) becomes rank 1, alpha = its scale × 1."""
    tensors = lora_with_singular_values([4.0, 3.0, 2.0, 1.0], alpha=2.0, name="lora_unet_a")  # scale 0.5
    tensors |= lora_with_singular_values([4.0, 3.0, 2.0, 1.0], alpha=4.0, name="lora_unet_b", seed=1)  # scale 1
    tensors |= {k.replace("lora_unet_a", "lora_unet_c"): (torch.zeros_like(v) if "lora_up" in k else v.clone())
                for k, v in tensors.items() if k.startswith("lora_unet_a")}  # untrained, scale 0.5
    save_safetensors(tensors, tmp_path / "in.safetensors")
    result = resize(tmp_path / "in.safetensors", tmp_path / "out.safetensors", rank=2, precision="fp32")
    assert [(m.name, m.new_rank, m.new_alpha) for m in result.modules] == [
        ("lora_unet_a", 2, 1.0), ("lora_unet_b", 2, 2.0), ("lora_unet_c", 1, 0.5)]
    assert result.metadata["ss_network_alpha"] == "0.5"


def test_an_svd_merge_gives_three_by_three_convolutions_their_own_rank_and_says_it_as_sd_scripts_does():
    """svd_merge_lora.py: --new_conv_rank for 3×3 convolutions, --new_rank for the rest, alpha = rank; its metadata
    gives the rank as both dim and alpha."""
    generator = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_conv.lora_down.weight": torch.randn(8, 8, 3, 3, generator=generator),
               "lora_unet_conv.lora_up.weight": torch.randn(8, 8, 1, 1, generator=generator),
               "lora_unet_linear.lora_down.weight": torch.randn(8, 8, generator=generator),
               "lora_unet_linear.lora_up.weight": torch.randn(8, 8, generator=generator)}
    result = merge_networks([(group_tensors(tensors), 1.0)], mode="svd", rank=4, conv_rank=2)
    assert result.tensors["lora_unet_conv.lora_down.weight"].shape == (2, 8, 3, 3)
    assert result.tensors["lora_unet_linear.lora_down.weight"].shape == (4, 8)
    assert float(result.tensors["lora_unet_conv.alpha"]) == 2.0 and float(result.tensors["lora_unet_linear.alpha"]) == 4.0
    same_rank = merge_networks([(group_tensors(tensors), 1.0)], mode="svd", rank=3, conv_rank=3)
    assert same_rank.metadata["ss_network_dim"] == same_rank.metadata["ss_network_alpha"] == "3"


def test_the_quantile_clamp_holds_both_factors_as_sd_scripts_clamps_them():
    """hi = quantile(cat(U·S, Vh), q); U and Vh both clamped to [-hi, hi]."""
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(16, 12, generator=generator) * 10  # large singular values: U·S holds the outliers
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    up, down = u[:, :4] * s[:4], vh[:4]
    limit = float(torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.9))
    assert float(up.abs().max()) > limit  # the clamp has something to do on up
    factors = low_rank(delta, 4, clamp_quantile=0.9)
    assert torch.equal(factors.up, up.clamp(-limit, limit)) and torch.equal(factors.down, down.clamp(-limit, limit))


def test_inspect_reads_alpha_as_the_rank_where_a_file_has_no_alpha_and_the_base_model_from_the_text_encoder_width():
    """A module without an alpha tensor has scale 1 (alpha = rank, as sd-scripts and the WebUI read it); without
    metadata, a text encoder of width 768 is SD1's CLIP ViT-L, 1024 SD2's OpenCLIP ViT-H."""
    def te_lora(width):
        return group_tensors({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, width),
                              "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(width, 4)})

    assert rank_and_alpha(te_lora(768)) == (4, 4.0)
    assert base_model_of(te_lora(768)) == ("SD1", "key names and text-encoder width 768")
    assert base_model_of(te_lora(1024)) == ("SD2", "key names and text-encoder width 1024")


def test_inspect_puts_a_downsampler_into_the_input_block_the_webui_numbers_it():
    """SD1's down_blocks.N.downsamplers.0 is LDM's input_blocks.3(N+1) (conv_in is IN00, each level two ResBlocks)."""
    assert block_of("lora_unet_down_blocks_0_downsamplers_0_conv") == "IN03"
    assert block_of("lora_unet_down_blocks_2_downsamplers_0_conv") == "IN09"
    assert block_of("lora_unet_down_blocks_1_attentions_1_proj_in") == "IN05"


def test_a_baked_checkpoint_records_the_unet_strength_a_single_weight_gives(tmp_path):
    """Strength(0.5) is <lora:x:0.5>: 0.5 on both sides, and the record says so."""
    from reference import REFERENCE, TINY_KOHYA_CHECKPOINT  # skips this test alone where the reference facts are absent

    lora = REFERENCE / "kohya-fixtures" / "lora-baseline" / "tinylora.safetensors"
    bake(TINY_KOHYA_CHECKPOINT, [(lora, Strength(0.5))], tmp_path / "baked.safetensors", precision="fp32")
    record = json.loads(open_tensors(tmp_path / "baked.safetensors").metadata["lora_trainer.baked"])
    assert record == [{"name": "tinylora", "te": 0.5, "unet": 0.5}]


# --- sd-scripts as the backend -----------------------------------------------------------------------------------


def test_sd_scripts_runs_its_sdxl_script_for_an_sdxl_file_with_its_options_in_config_file(tiny_sdxl, tmp_path):
    """The command is exactly [python, <checkout>/sdxl_train_network.py, --config_file, <toml>]: train_network.py
    refuses an SDXL checkpoint."""
    checkout = tmp_path / "sd-scripts"
    checkout.mkdir()
    for script in ("train_network.py", "sdxl_train_network.py"):
        (checkout / script).write_text("import sys; print(sys.argv[0])\n", encoding="utf-8")
    assert train_main(["--backend", f"sd-scripts={checkout}", "--pretrained_model_name_or_path", str(tiny_sdxl),
                       "--train_data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
                       "--output_name", "star", "--max_train_epochs", "1"]) == 0
    events, _ = read_events(tmp_path / "out" / "star.events.jsonl")
    command = next(e["command"] for e in events if e["event"] == "start")
    assert command[:3] == [sys.executable, str(checkout / "sdxl_train_network.py"), "--config_file"] and len(command) == 4
    assert Path(command[3]).suffix == ".toml" and Path(command[3]).is_file()


def test_a_dataset_configs_metadata_file_reaches_sd_scripts_absolute(tmp_path, monkeypatch):
    """sd-scripts runs in its checkout: a fine-tuning subset's relative metadata_file (like its image_dir) would be
    looked for there."""
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "dataset.toml"
    source.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "images"\nmetadata_file = "meta.json"\n'
                      'conditioning_data_dir = "hints"\n', encoding="utf-8")
    copy = toml.loads(absolute_dataset_config(source, tmp_path / "copy.toml").read_text(encoding="utf-8"))
    subset = copy["datasets"][0]["subsets"][0]
    assert subset == {"image_dir": str(tmp_path / "images"), "metadata_file": str(tmp_path / "meta.json"),
                      "conditioning_data_dir": str(tmp_path / "hints")}


# --- the Kohya GUI's settings file ------------------------------------------------------------------------------


def gui_options(**data) -> tuple[dict, list[str]]:
    notes: list[str] = []
    return options_from_gui({"LoRA_type": "Standard", "optimizer": "AdamW", **data}, notes), notes


def test_gui_learning_rates_of_zero_for_both_parts_train_both_as_lora_gui_decides():
    """lora_gui.resolve_network_train_flags: unet_only = te == 0 and unet != 0, te_only = te != 0 and unet == 0; with
    both 0 neither flag is set (sd-scripts then trains both at learning_rate)."""
    both_zero, _ = gui_options(text_encoder_lr=0, unet_lr=0)
    assert both_zero["network_train_unet_only"] is False and both_zero["network_train_text_encoder_only"] is False
    te_only, _ = gui_options(text_encoder_lr=1e-4, unet_lr=0)
    assert te_only["network_train_unet_only"] is False and te_only["network_train_text_encoder_only"] is True


def test_gui_lycoris_args_take_the_guis_default_preset_and_its_constrain_field():
    """The GUI's LyCORIS Preset dropdown defaults to "full"; Diag-OFT's constraint comes from the GUI's field
    "constrain" (lora_gui.py: constraint={constrain})."""
    options, _ = gui_options(LoRA_type="LyCORIS/Diag-OFT", constrain=0.5)
    assert options["network_args"][:2] == ["preset=full", "algo=diag-oft"]
    assert "constraint=0.5" in options["network_args"]


def test_gui_sdxl_switches_apply_to_sdxl_only_and_its_argument_text_is_split_as_the_gui_splits_it():
    """lora_gui.py: no_half_vae = sdxl and sdxl_no_half_vae; optimizer_args = text.replace('"', "").split()."""
    options, _ = gui_options(sdxl=False, sdxl_no_half_vae=True, optimizer_args='"betas=0.9,0.99" weight_decay=0.01')
    assert "no_half_vae" not in options
    assert options["optimizer_args"] == ["betas=0.9,0.99", "weight_decay=0.01"]


def test_a_gui_file_without_a_scheduler_trains_sd_scripts_constant_schedule_without_its_warmup():
    """No lr_scheduler: sd-scripts' default, constant, which takes no warm-up (its get_scheduler_fix refuses one), so
    the lr_warmup share is not passed, as the GUI zeroes it for constant."""
    options, _ = gui_options(lr_warmup=10)
    assert "lr_scheduler" not in options and "lr_warmup_steps" not in options
    cosine, _ = gui_options(lr_warmup=10, lr_scheduler="cosine")
    assert cosine["lr_warmup_steps"] == "10%"
