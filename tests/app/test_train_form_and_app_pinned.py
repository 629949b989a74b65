"""What the Train tab's form, presets and estimate, the Lora card and the standalone app give a user, pinned where a
mutation review found nothing that noticed a change: the command and options the form builds, the estimate's numbers
against a hand computation, the card's fields as the WebUI reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_trainer.app import presets
from lora_trainer.app.estimate import Estimate, minutes, network_gib, planned_from_batches, vram_gib, warnings_for
from lora_trainer.app.form import form_to_options
from lora_trainer.training.lr_schedules import resolve_warmup
from lora_trainer.training.options import options_from

FORM = {"checkpoint": "base.safetensors", "dataset": "d"}
BASE = {"pretrained_model_name_or_path": "m", "train_data_dir": "d"}
GIB = 2**30


def command(preset: str, tier: str = presets.NO_TIER, sdxl: bool = False, **form) -> str:
    return presets.sd_scripts_command(form_to_options({**FORM, **form}, preset, tier, sdxl), sdxl)[0] + " "


def options(**values):
    return options_from({**BASE, **values})


# --- presets: what the command says ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_each_presets_command_does_what_its_guidance_tells_the_user(name):
    """The guidance says "trigger word first (keep_tokens 1)", "no flips", "clip skip 2": the command must do it."""
    guidance, line = presets.PRESETS[name].guidance, command(name)
    assert ("--keep_tokens 1 " in line) == (name != "style"), line  # a style has no trigger word to keep first
    if "trigger" in guidance:
        assert "--keep_tokens 1 " in line
    assert ("--flip_aug " in line) == (name in ("style", "concept", "clothing")), line  # the same subject mirrored
    if "no flips" in guidance:
        assert "--flip_aug" not in line
    assert ("--clip_skip 2 " in line) == ("clip skip 2" in guidance), line


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_every_preset_warms_up_over_a_twentieth_of_the_run(name):
    """sd-scripts reads a warm-up below 1 as a share of the run's steps: 5 % of 1000 steps is 50."""
    line = command(name)
    assert "--lr_scheduler cosine --lr_warmup_steps 0.05 " in line, line
    assert resolve_warmup(presets.preset_options(name)["lr_warmup_steps"], 1000) == 50


@pytest.mark.parametrize("tier, precision", [("6 GB", "fp16"), ("8 GB", "fp16"), ("12 GB", "fp16"), ("16 GB", "bf16"),
                                             ("24 GB", "bf16")])
def test_the_tiers_precision_and_sdxls_vae_in_the_command(tier, precision):
    """fp16 on the smaller cards (GTX 10/16 and RTX 20 cards have no bf16), with SDXL's VAE kept in fp32 there (it
    overflows in fp16); bf16 from 16 GB, where it needs no such switch."""
    for sdxl in (False, True):
        line = command("character", tier, sdxl)
        assert f"--mixed_precision {precision} " in line, line
        assert ("--no_half_vae" in line) == (sdxl and precision == "fp16"), line


def test_a_preset_file_without_a_weight_reads_as_the_webuis_default_strength(tmp_path):
    path = tmp_path / "mine.preset.toml"
    path.write_text('[preset]\ntitle = "Mine"\n[options]\nnetwork_dim = 8\n', encoding="utf-8")
    loaded = presets.read_preset_file(path)
    assert (loaded.title, loaded.preferred_weight, loaded.options) == ("Mine", 1.0, {"network_dim": 8})


def test_a_dataset_toml_imported_by_a_relative_path_is_trained_from_its_absolute_path(tmp_path, monkeypatch):
    """The job runs in its own folder: a relative dataset_config would name a file there, not the one imported."""
    (tmp_path / "dataset.toml").write_text('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "img"\n',
                                           encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert presets.import_kohya_toml("dataset.toml") == {"dataset_config": str((tmp_path / "dataset.toml").resolve())}


# --- the form --------------------------------------------------------------------------------------------------

def test_save_and_sample_every_n_epochs_reach_their_own_options():
    values = form_to_options({**FORM, "save_every_n_epochs": 2, "sample_every_n_epochs": "3"}, "style")
    assert (values["save_every_n_epochs"], values["sample_every_n_epochs"]) == (2, 3)


def test_blank_fields_keep_the_presets_values_and_send_no_empty_option():
    """A cleared Epochs box kept nothing: without the preset's epochs the run took sd-scripts' 1600 steps."""
    values = form_to_options({**FORM, "epochs": "", "batch_size": "", "output_name": "", "resolution": "", "seed": "",
                              "optimizer": "", "network_alpha": ""}, "character")
    assert (values["max_train_epochs"], values["train_batch_size"], values["resolution"], values["seed"],
            values["optimizer_type"], values["network_alpha"]) == (10, 2, "512", 42, "AdamW", 16)
    assert "output_name" not in values and "" not in values.values()



def test_spaces_pasted_around_the_forms_text_are_not_part_of_the_options():
    """" constant " kept the preset's warm-up, which sd-scripts' constant schedule refuses."""
    values = form_to_options({"checkpoint": " base.safetensors ", "dataset": " d ", "resolution": " 768 ",
                              "optimizer": " AdamW8bit ", "scheduler": " constant ", "output_name": " star "}, "style")
    assert ({name: values[name] for name in ("pretrained_model_name_or_path", "train_data_dir", "resolution",
                                              "optimizer_type", "lr_scheduler", "output_name")} ==
            {"pretrained_model_name_or_path": "base.safetensors", "train_data_dir": "d", "resolution": "768",
             "optimizer_type": "AdamW8bit", "lr_scheduler": "constant", "output_name": "star"})
    assert "lr_warmup_steps" not in values
    options_from(values)


def test_the_unet_rate_typed_is_the_runs_learning_rate_in_the_command_and_the_files_metadata():
    """sd-scripts writes --learning_rate as ss_learning_rate, which the Lora card's summary shows: the preset's 1e-4
    stayed there beside a typed UNet rate of 5e-4."""
    line = command("character", unet_lr=5e-4, text_encoder_lr=1e-4)
    assert "--learning_rate 0.0005 " in line and "--unet_lr 0.0005 --text_encoder_lr 0.0001 " in line, line


@pytest.mark.parametrize("dim, alpha, args", [(16, 8, "conv_dim=8 conv_alpha=4"), (32, 32, "conv_dim=16 conv_alpha=16"),
                                              (1, 1, "conv_dim=1 conv_alpha=1")])
def test_locon_trains_the_convolutions_at_half_the_networks_rank_and_alpha(dim, alpha, args):
    line = command("concept", algorithm="LoCon", network_dim=dim, network_alpha=alpha)
    assert f"--network_module lycoris.kohya --network_dim {dim} " in line
    assert f" --network_args algo=locon {args} " in line, line



def test_a_resolution_above_the_presets_bucket_range_widens_it_as_sd_scripts_requires():
    """sd-scripts refuses a max_bucket_reso below the resolution ("max_bucket_reso must be equal or greater")."""
    assert "--max_bucket_reso 1536 " in command("style", resolution="1536,1024")
    assert "--min_bucket_reso 128 " in command("style", resolution="128")


def test_a_kohya_dylora_without_a_unit_imports_with_sd_scripts_unit_1_not_the_forms_own():
    """sd-scripts' DyLoRA trains unit 1 when none is given; the form picks 4 for a new rank-8 network."""
    from lora_trainer.app.form import algorithm_of

    name, rest = algorithm_of("networks.dylora", None, 8)
    assert (name, rest) == ("DyLoRA", ["unit=1"])
    imported = form_to_options({**FORM, "algorithm": name, "network_dim": 8, "extra": f"network_args = {json.dumps(rest)}"},
                               "concept")
    assert imported["network_args"] == ["unit=1"]
    assert form_to_options({**FORM, "algorithm": "DyLoRA", "network_dim": 8}, "concept")["network_args"] == ["unit=4"]


# --- the estimate, against a hand computation ---------------------------------------------------------------------

def test_steps_per_epoch_and_epochs_round_up_as_sd_scripts_counts_them():
    """sd-scripts: ceil(batches / gradient accumulation) steps per epoch; epochs = ceil(max_train_steps / that)."""
    assert planned_from_batches(41, options(gradient_accumulation_steps=4, max_train_epochs=3)) == (11, 3, 33)
    assert planned_from_batches(30, options(max_train_steps=100)) == (30, 4, 100)


def test_the_vram_estimate_of_an_sd1_run_by_hand():
    """fp16 weights (UNet and the rest 1.87, text encoder 0.23 GiB) + activations (1.15 GiB an image at 512 px, × 2)
    + the VAE encoding each batch (latents not cached: 0.5) + the text encoder's activations (0.1) + the network
    ((423,936 + 165,888) parameters a rank × 16 at 4 + 4 + 8 bytes under AdamW) + the CUDA context (0.8)."""
    run = options(resolution="512", train_batch_size=2, mixed_precision="fp16", cache_latents=False, network_dim=16)
    by_hand = (1.87 + 0.23) + (1.15 * 2 + 0.5 + 0.1) + 589_824 * 16 * 16 / GIB + 0.8
    assert vram_gib(run) == round(by_hand, 1) == 5.9


def test_fp8_for_the_unet_alone_keeps_the_sdxl_text_encoders_at_16_bits():
    """--fp8_base_unet: the UNet's Linear/Conv weights in one byte (0.55 of its 6.9 GiB), both text encoders (1.53 GiB)
    as they were; with checkpointing a quarter of the 7 GiB of activations of a 1024 px image."""
    run = options(resolution="1024", train_batch_size=1, mixed_precision="bf16", fp8_base=True, fp8_base_unet=True,
                  gradient_checkpointing=True, cache_latents=True, network_train_unet_only=True, network_dim=8)
    by_hand = (6.9 * 0.55 + 1.53) + 7.0 * 0.25 + 2_659_840 * 8 * 16 / GIB + 0.8
    assert vram_gib(run, "sdxl") == round(by_hand, 1) == 8.2


def test_the_networks_memory_by_hand_for_loha_lion_and_a_text_encoder_only_run():
    sd1 = 423_936 + 165_888  # parameters a rank: UNet + text encoder
    loha = options(network_module="lycoris.kohya", network_args=["algo=loha"], network_dim=8)
    # the convolutions at the network's dim (626,880 a rank), and two pairs of factors where LoRA has one
    assert network_gib(loha) == pytest.approx((sd1 + 626_880) * 8 * 2 * (4 + 4 + 8) / GIB)
    assert network_gib(options(network_dim=4, optimizer_type="Lion")) == pytest.approx(sd1 * 4 * (4 + 4 + 4) / GIB)
    text_encoder_only = options(network_dim=4, network_train_text_encoder_only=True)
    assert network_gib(text_encoder_only) == pytest.approx(165_888 * 4 * 16 / GIB)


def test_the_time_estimate_by_hand():
    """0.45 s a 512 px image on a mid-range GPU, 1.3 × that with gradient checkpointing (the activations computed
    again); SDXL 1.6 s a 1024 px image."""
    assert minutes(1000, options(resolution="512", train_batch_size=2, gradient_checkpointing=True)) == pytest.approx(19.5)
    assert minutes(1000, options(resolution="512", train_batch_size=2)) == pytest.approx(15.0)
    assert minutes(600, options(resolution="1024"), "sdxl") == pytest.approx(16.0)


@pytest.mark.parametrize("minutes_, shown", [(89.4, "89 min"), (90, "1.5 h"), (150, "2.5 h")])
def test_the_estimate_says_minutes_up_to_an_hour_and_a_half_then_hours(minutes_, shown):
    lines = Estimate(20, 200, 100, 10, 1000, 5.94, minutes_).lines()
    assert lines == ["20 images → 200 samples per epoch (with repeats) → 100 steps per epoch × 10 epochs = 1000 steps",
                     f"Estimated VRAM ≈ 5.9 GiB; time ≈ {shown} on a mid-range GPU"]


def test_no_warning_at_the_limits_a_user_may_choose_and_one_just_past_each():
    """alpha = dim (scale 1), 5 images, 100 steps, a batch of all the images, a file at the last epoch: all fine."""
    limits = dict(network_dim=16, network_alpha=16, resolution="512", train_batch_size=5, save_every_n_epochs=10)
    assert warnings_for(options(**limits), images=5, total_steps=100, epochs=10) == []
    past = {"network_alpha": 17, "train_batch_size": 6, "save_every_n_epochs": 11}
    for name, value in past.items():
        assert len(warnings_for(options(**{**limits, name: value}), images=5, total_steps=100, epochs=10)) == 1, name
    assert warnings_for(options(**{**limits, "train_batch_size": 4}), images=4, total_steps=100, epochs=10) == [
        "only 4 image(s): 5–20 varied images give a LoRA that generalises"]
    assert len(warnings_for(options(**limits), images=5, total_steps=99, epochs=10)) == 1


# --- the Lora card (the WebUI's user metadata) ----------------------------------------------------------------------

@pytest.mark.parametrize("written, shown", [
    ({"ss_base_model_version": "sd_v1", "ss_v2": "False"}, "SD1"),
    ({"ss_base_model_version": "sd_v1_v", "ss_v2": "False"}, "SD1"),  # an SD1 v-prediction base
    ({"ss_base_model_version": "sd_v2", "ss_v2": "True"}, "SD2"), ({"ss_base_model_version": "sd_v2_v", "ss_v2": "True"}, "SD2"),
    ({"ss_v2": "True"}, "SD2"), ({"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}, "SDXL"),
    ({"ss_network_module": "networks.lora"}, "SD1"), ({}, "Unknown")])
def test_the_cards_sd_version_is_the_one_the_webui_tells_from_the_file(written, shown):
    """The card's "sd version" overrides the version the WebUI reads from the file (ss_base_model_version sdxl_… →
    SDXL, ss_v2 → SD2, any other metadata → SD1), and its Lora tab filters on it: an SD1 v-prediction run (sd_v1_v)
    got "Unknown", shown under SDXL models and hidden where "Hide networks of unknown versions" is set for SD1."""
    from lora_trainer.app.user_metadata import card_metadata

    assert card_metadata(written, {})["sd version"] == shown


CARD_METADATA = {"ss_tag_frequency": json.dumps({"10_zkstar": {"zkstar": 16, "yellow star": 16, "blue background": 5}}),
                 "ss_dataset_dirs": json.dumps({"10_zkstar": {"n_repeats": 10, "img_count": 16}}), "ss_v2": "False",
                 "ss_base_model_version": "sd_v1", "ss_num_train_images": "160", "ss_learning_rate": "0.0001"}


def lora_file(path, metadata=CARD_METADATA):
    import torch

    from lora_trainer.safe_io import save_safetensors

    return save_safetensors({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, path, metadata)


def read_card(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_card_holds_the_fields_the_webuis_card_editor_reads_and_saves(tmp_path):
    """ui_edit_user_metadata.py: description, sd version, activation text, preferred weight, negative text, notes."""
    from lora_trainer.app.user_metadata import WROTE, write_card_metadata

    card = read_card(write_card_metadata(lora_file(tmp_path / "star.safetensors"), {"epochs": 2, "steps": 20}, 0.7))
    assert set(card) == {"description", "sd version", "activation text", "preferred weight", "negative text", "notes", WROTE}
    assert (card["sd version"], card["activation text"], card["preferred weight"], card["negative text"]) == (
        "SD1", "zkstar, yellow star", 0.7, "")


def test_a_card_saved_by_notepad_with_a_byte_order_mark_keeps_what_the_user_typed(tmp_path):
    from lora_trainer.app.user_metadata import write_card_metadata

    lora = lora_file(tmp_path / "star.safetensors")
    (tmp_path / "star.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"activation text": "my words, 星"}).encode("utf-8"))
    assert read_card(write_card_metadata(lora, {}))["activation text"] == "my words, 星"


@pytest.mark.parametrize("text", ["[]", "null", "{broken"])
def test_a_card_file_that_holds_no_card_is_replaced_by_one(tmp_path, text):
    from lora_trainer.app.user_metadata import write_card_metadata

    lora = lora_file(tmp_path / "star.safetensors")
    (tmp_path / "star.json").write_text(text, encoding="utf-8")
    assert read_card(write_card_metadata(lora, {}))["activation text"] == "zkstar, yellow star"


def test_the_card_goes_beside_the_runs_last_file_with_the_weight_its_first_job_chose(services):
    """A resumed job is a new job: its card takes the preset's weight from the job it resumed, and goes beside the
    final file, not the first epoch's."""
    from lora_trainer.app.services import write_card_hints

    folder = services.settings.lora_folder
    folder.mkdir(parents=True, exist_ok=True)
    epoch, final = (lora_file(folder / name) for name in ("star-000001.safetensors", "star.safetensors"))
    first = services.store.add("star", {})
    write_card_hints(first, 0.45)
    resumed = services.store.add("star", {}, resumed_from=first.id)
    services.runner.on_event(resumed, {"event": "end", "files": [str(epoch), str(final)], "epochs": 2, "steps": 20})
    assert not (folder / "star-000001.json").exists()
    assert read_card(folder / "star.json")["preferred weight"] == 0.45


def test_the_hosts_lora_list_is_listed_again_for_a_file_saved_into_its_folder_only(services, tmp_path):
    """An API job may write elsewhere (its output_dir); listing the WebUI's LoRAs again for each such file is a scan of
    the Lora folder for nothing."""
    elsewhere = tmp_path / "elsewhere"
    services.runner.on_event(None, {"event": "saved", "path": str(elsewhere / "star-000001.safetensors")})
    assert ("refresh_loras", ()) not in services.host.calls
    services.runner.on_event(None, {"event": "saved", "path": str(services.settings.lora_folder / "star.safetensors")})
    assert services.host.calls.count(("refresh_loras", ())) == 1


@pytest.mark.parametrize("unload", [True, False])
def test_the_checkpoint_leaves_the_gpu_while_training_only_where_the_setting_says_so(services, unload):
    """Settings → LoRA Trainer "Unload the checkpoint from the GPU while training": off, the WebUI keeps generating beside the run."""
    services.settings.unload_checkpoint_while_training = unload
    for status in ("running", "finished"):
        services.runner.on_event(None, {"event": "job", "status": status})
    gpu = [name for name, _ in services.host.calls if name in ("release_gpu", "restore_gpu")]
    assert gpu == (["release_gpu", "restore_gpu"] if unload else [])


# --- the standalone app ---------------------------------------------------------------------------------------------

def test_the_apps_folders_come_from_its_command_line_resolved_where_it_was_started(tmp_path, monkeypatch):
    """Finished LoRAs go to <data>/Lora unless --lora-dir says otherwise; the checkpoint and dataset folders given
    are the ones the Train tab lists and allows."""
    import argparse

    from lora_trainer.app.standalone import add_ui_command, settings_from

    parser = argparse.ArgumentParser()
    add_ui_command(parser.add_subparsers())
    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    settings = settings_from(parser.parse_args(["ui", "--data", "run", "--checkpoint-dir", "models", "--dataset-root", "sets"]))
    assert (settings.data_folder, settings.lora_folder) == (here / "run", here / "run" / "Lora")
    assert settings.checkpoint_folders == [here / "models"] and settings.dataset_roots[0] == here / "sets"
    assert settings_from(parser.parse_args(["ui", "--data", "run", "--lora-dir", "loras"])).lora_folder == here / "loras"


def test_the_apps_checkpoint_list_holds_each_safetensors_and_ckpt_below_its_folders_by_relative_path(tmp_path):
    """As the WebUI's list: files in subfolders titled by their path below the folder, .ckpt files too."""
    from lora_trainer.app.standalone_host import StandaloneHost
    from lora_trainer.tiny_model.build import EMBEDDED_TITLE

    (tmp_path / "SDXL").mkdir()
    for name in ("SDXL/base.safetensors", "old.ckpt", "notes.txt", "old.yaml"):
        (tmp_path / name).write_bytes(b"")
    titles = StandaloneHost([tmp_path], []).checkpoints()
    assert titles == {EMBEDDED_TITLE: titles[EMBEDDED_TITLE], "old.ckpt": tmp_path / "old.ckpt",
                      "SDXL/base.safetensors": tmp_path / "SDXL" / "base.safetensors"}


def test_a_ckpt_default_checkpoint_draws_at_512_px_without_being_unpickled_to_ask(tmp_path):
    from lora_trainer.app.standalone_host import StandaloneHost

    (tmp_path / "old.ckpt").write_bytes(b"")  # unreadable: unpickling it would fail (or run its code)
    defaults = StandaloneHost([], [], default_checkpoint=tmp_path / "old.ckpt").generation_defaults()
    assert (defaults.width, defaults.height) == (512, 512)


def test_a_generation_without_a_checkpoint_keeps_the_one_the_last_generation_loaded(tmp_path):
    """The Grid tab without a checkpoint axis draws on the model loaded, not the app's default."""
    import shutil

    from lora_trainer.app.standalone_host import StandaloneHost
    from lora_trainer.sampling.txt2img import GenerationSettings
    from lora_trainer.tiny_model.build import TINY_MODEL_PATH

    other = shutil.copy(TINY_MODEL_PATH, tmp_path / "other.safetensors")
    host = StandaloneHost([tmp_path], [])
    settings = GenerationSettings("zkstar", steps=1, sampler="Euler", seed=3, width=64, height=64)
    host.generate(settings, "other.safetensors")
    image = host.generate(settings)
    assert host.loaded_checkpoint == other.resolve() and "Model: other" in image.infotext


# --- the API's grid queue -------------------------------------------------------------------------------------------

@pytest.fixture
def gated_grids(tmp_path, monkeypatch):
    """A GridQueue whose grids draw nothing; each waits for ``gate`` and is recorded in ``drawn`` as it starts."""
    import threading
    import types

    import lora_trainer.grid.plan as plan_module
    from lora_trainer.app.grid_queue import GridQueue

    gate, drawn = threading.Event(), []

    def run_grid(host, plan, folder, progress, should_stop):
        drawn.append(plan.name)
        assert gate.wait(20)
        return types.SimpleNamespace(path=Path(folder) / "grid.png", stopped=False, warnings=[])

    monkeypatch.setattr(plan_module, "run_grid", run_grid)
    monkeypatch.setattr(plan_module, "unfinished_images", lambda result, plan: None)
    queue = GridQueue(object(), tmp_path / "grids")
    queue.gate, queue.drawn = gate, drawn
    yield queue
    gate.set()
    queue.close()


def grid_plan(name: str, *keys: str):
    import types

    return types.SimpleNamespace(name=name, cells=[[types.SimpleNamespace(key=key) for key in keys]], best_epoch=None,
                                 notes=[])


def test_grids_asked_for_are_drawn_in_the_order_they_were_asked_for(gated_grids):
    import time

    grids = [gated_grids.submit(grid_plan(name, "a")) for name in ("first", "second", "third")]
    gated_grids.gate.set()
    deadline = time.time() + 20
    while any(grid.status != "finished" for grid in grids):
        assert time.time() < deadline
        time.sleep(0.01)
    assert gated_grids.drawn == ["first", "second", "third"]


def test_a_queued_grid_counts_each_image_once_though_cells_share_it(gated_grids):
    """Identical cells (the baseline column of each row) are drawn once: the progress a client sees before the grid
    starts counts the images it will draw."""
    gated_grids.submit(grid_plan("running", "a"))
    queued = gated_grids.submit(grid_plan("queued", "a", "b", "a", "b"))
    assert (queued.status, queued.done, queued.total) == ("queued", 0, 2)


# --- paths and extras -----------------------------------------------------------------------------------------------

def test_a_dataset_config_naming_a_relative_folder_is_refused_though_it_lies_below_the_current_folder(tmp_path, monkeypatch):
    """The trainer reads the config from its job folder: "img" there is not the folder the check found below the
    app's current folder (an allowed root when the app serves this machine only)."""
    from lora_trainer.app.paths import check_dataset_config_paths
    from lora_trainer.errors import UserError

    (tmp_path / "img").mkdir()
    config = tmp_path / "dataset.toml"
    config.write_text('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "img"\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="dataset_config: img in dataset.toml is relative; give absolute paths"):
        check_dataset_config_paths(config, [tmp_path], {})


@pytest.mark.parametrize("name", ["Pillow", "Torch", "xFormers", "safetensors"])
def test_an_extra_needing_a_webui_package_is_refused_however_pip_spells_its_name(name):
    """pip's report spells a distribution as its metadata does ("Pillow" before 10.1, "pillow" after)."""
    from lora_trainer.app.extras import missing_distributions
    from lora_trainer.errors import UserError

    report = {"install": [{"metadata": {"name": "bitsandbytes", "version": "0.45.0"}},
                          {"metadata": {"name": name, "version": "99.0"}}]}
    with pytest.raises(UserError, match=f"need {name} 99.0 .*never replaced or duplicated"):
        missing_distributions(report)
