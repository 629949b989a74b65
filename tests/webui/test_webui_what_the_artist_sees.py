"""What an artist sees in the WebUI: the LoRA applied and named, the X/Y/Z
axes' rewritten tags and lists, the grid form filled from txt2img."""

from __future__ import annotations

import shutil

import numpy as np
import torch

from tests.webui.conftest import pixels, txt2img, webui_parameters
from tests.webui.test_grid_prefill import build_page, click, values_of, write_ui_config


def _axis(w, label):
    return next(o for o in w.xyz.axis_options if o.label == f"[LoRA] {label}")


def _applied(w, label, prompt, x):
    p = w.processing.StableDiffusionProcessingTxt2Img(prompt=prompt)
    _axis(w, label).apply(p, x, [x])
    return p.prompt


def test_lora_hashes_name_the_lora_as_the_prompt_does(webui):
    """The WebUI writes the name the tag used (an alias), not the file's name."""
    p, _ = txt2img(webui, "a red circle <lora:dogs:1>")
    assert p.extra_generation_params["Lora hashes"].startswith("dogs: ")


def test_the_always_added_lora_takes_the_default_multiplier_and_is_not_added_to_a_prompt_naming_it(webui):
    _, half = txt2img(webui, "a red circle <lora:cats:0.5>")
    _, full = txt2img(webui, "a red circle <lora:cats:1>")
    webui.shared.opts.data.update(sd_lora="cats", extra_networks_default_multiplier=0.5)
    p, always = txt2img(webui, "a red circle")
    assert p.all_prompts[0].endswith("<lora:cats:0.5>") and np.array_equal(pixels(always), pixels(half))
    p, named = txt2img(webui, "a red circle <lora:cats:1>")
    assert p.all_prompts[0] == "a red circle <lora:cats:1>" and np.array_equal(pixels(named), pixels(full))


def test_a_checkpoint_loaded_into_the_same_model_keeps_its_new_weights(webui):
    """The WebUI loads a checkpoint of the same kind into the loaded model object: our backups are the old
    checkpoint's, and restoring them would mix it into the new one."""
    txt2img(webui, "a red circle <lora:cats:1>")
    model = webui.shared.sd_model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():  # another checkpoint's weights, over the merged ones
            parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * 0.01)
    loaded = webui_parameters(model)
    webui.script_callbacks.model_loaded_callback(model)
    txt2img(webui, "a red circle")
    after = webui_parameters(model)
    assert all(torch.equal(after[name], value) for name, value in loaded.items())


def test_a_lora_written_since_the_last_generation_is_found(webui, lora_folder):
    _, cats = txt2img(webui, "a red circle <lora:cats:1>")
    shutil.copyfile(lora_folder / "cats.safetensors", lora_folder / "fresh.safetensors")
    try:
        p, fresh = txt2img(webui, "a red circle <lora:fresh:1>")
        assert not p.comments and np.array_equal(pixels(fresh), pixels(cats))
    finally:
        (lora_folder / "fresh.safetensors").unlink()


def test_the_strength_axis_sets_both_weights_whatever_form_the_tag_gives_them(load_extension):
    w = load_extension()
    assert _applied(w, "Strength", "x <lora:cats:0.8:0.2:4>", 1.0) == "x <lora:cats:1:1:4>"  # dyn kept
    assert _applied(w, "Strength", "x <lora:cats:0.5:unet=0.2:te=0.3:dyn=2>", 1.0) == "x <lora:cats:1:dyn=2>"


def test_the_epoch_axis_follows_the_first_tags_run_and_finds_an_epoch_written_since(load_extension, lora_folder):
    w = load_extension()
    assert _applied(w, "Epoch", "x <lora:cats:1> <lora:dogs:0.5>", 1) == "x <lora:cats-000001:1> <lora:dogs:0.5>"
    shutil.copyfile(lora_folder / "cats-000001.safetensors", lora_folder / "cats-000003.safetensors")
    try:
        assert _applied(w, "Epoch", "x <lora:cats:1>", 3) == "x <lora:cats-000003:1>"
    finally:
        (lora_folder / "cats-000003.safetensors").unlink()


def test_the_name_axis_lists_files_added_since_in_alphabetical_order_whatever_their_case(load_extension, lora_folder):
    w = load_extension()
    assert _axis(w, "Name").choices()[0] == "cats"
    shutil.copyfile(lora_folder / "cats.safetensors", lora_folder / "Zeta.safetensors")
    try:
        assert _axis(w, "Name").choices() == ["cats", "cats-000001", "renamed_file", "xl_style", "Zeta"]
    finally:
        (lora_folder / "Zeta.safetensors").unlink()


def test_from_txt2img_takes_a_random_seed(load_extension):
    w = load_extension()
    demo, txt2img_fields = build_page(w)
    values = values_of(txt2img_fields)
    values[txt2img_fields["txt2img_seed"]._id] = -1  # the dice: random
    assert click(demo, "lora_trainer_grid_from_txt2img", values)["seed"] == -1


def test_a_ui_config_with_old_and_new_keys_and_a_bom_gives_the_newest_values(webui):
    """An upgraded WebUI keeps the older keys in ui-config.json beside the new ones; Windows editors add a BOM."""
    import json

    from lora_trainer.webui.host import WebUIHost

    path = write_ui_config(webui, {})
    path.write_text(json.dumps({"customscript/sampler.py/txt2img/Sampling steps/value": 28,
                                "txt2img/Sampling steps/value": 20}), encoding="utf-8-sig")
    assert WebUIHost().generation_defaults().steps == 28


def test_the_hires_pass_keeps_the_first_passs_lora_hashes(webui):
    p = webui.processing.StableDiffusionProcessingTxt2Img(prompt="a red circle <lora:cats:1>", seed=3, steps=1, width=64,
                                                          height=64, sampler_name="Euler", cfg_scale=5)
    p.is_hr_pass, p.lora_hashes = True, {"first_pass": "0123456789ab"}  # as after the first pass with another LoRA
    webui.processing.process_images(p)
    hashes = p.extra_generation_params["Lora hashes"]
    assert hashes.startswith("first_pass: 0123456789ab, cats: ")


def test_a_lora_in_the_output_folder_chosen_in_settings_is_found(webui, lora_folder, tmp_path):
    _, cats = txt2img(webui, "a red circle <lora:cats:1>")
    shutil.copyfile(lora_folder / "cats.safetensors", tmp_path / "elsewhere.safetensors")
    webui.shared.opts.data["lora_trainer_output_folder"] = str(tmp_path)
    p, elsewhere = txt2img(webui, "a red circle <lora:elsewhere:1>")
    assert not p.comments and np.array_equal(pixels(elsewhere), pixels(cats))


def test_checkpoints_of_ckpt_dir_are_the_trainers_too(load_extension, tmp_path):
    from lora_trainer.webui import extension

    w = load_extension()
    w.shared.cmd_opts.ckpt_dir = str(tmp_path)
    assert extension.app_settings().checkpoint_folders[-1] == tmp_path


def test_an_sd2_lora_fits_a_v_prediction_sd2_checkpoint():
    """LoRA metadata says SD2 for both SD2 kinds: the model's "SD2-v" must not refuse it."""
    from lora_trainer.models.configs import SD2
    from lora_trainer.webui.model_map import sd_version_of_config

    assert sd_version_of_config(SD2.with_prediction("v_prediction")) == "SD2"
