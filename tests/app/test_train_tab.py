"""The Train tab under the WebUI's gradio (3.41.2) and Forge's (4.40.0): it builds, and the functions its buttons
call validate, submit, queue, stop, resume and follow jobs through Services (with a fake trainer command instead of
real training)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from lora_trainer.app.services import Services
from lora_trainer.app.settings import AppSettings
from lora_trainer.app.ui import build_tabs, train_tab
from lora_trainer.tiny_model.build import TINY_MODEL_PATH
from lora_trainer.tiny_model.demo import SAMPLE_DATASET
from lora_trainer.training.options import options_from

# A stand-in trainer: writes the events a short run writes, a saved file and a state, then exits.
FAKE_TRAINER = r"""
import json, pathlib, sys, toml
options = toml.load(sys.argv[1])
events = pathlib.Path(options["events_file"])
out = pathlib.Path(options["output_dir"]); out.mkdir(parents=True, exist_ok=True)
state = pathlib.Path.cwd() / "state"; state.mkdir(exist_ok=True)
for name in ("model.safetensors", "train_state.pt"):  # what a state folder holds (resuming checks for them)
    (state / name).write_bytes(b"")
lines = [{"event": "start"}] + [{"event": "step", "step": s, "total": 4, "epoch": 1, "loss": 0.5 / s, "average": 0.4,
          "lr": [1e-4], "seconds": 0.1} for s in range(1, 5)]
(out / (options["output_name"] + ".safetensors")).write_bytes(b"")
lines += [{"event": "saved", "path": str(out / (options["output_name"] + ".safetensors"))},
          {"event": "state", "action": "saved", "path": str(state)},
          {"event": "end", "files": [], "recommended_epoch": 1, "reason": "lowest validation loss"}]
with open(events, "a", encoding="utf-8") as f:
    for line in lines:
        f.write(json.dumps(line) + "\n")
"""


class FakeHost:
    name = "standalone"

    def checkpoints(self):
        return {"tiny-sd (embedded demo model)": TINY_MODEL_PATH}

    def generation_defaults(self):
        from lora_trainer.sampling.txt2img import GenerationSettings

        return GenerationSettings("zkstar", width=64, height=64)

    def sampler_names(self):
        return ["Euler a"]

    def sampler(self, name):
        return "Euler a" if name.lower() == "euler a" else None

    def scheduler_names(self):
        return []

    def refresh_loras(self):
        pass

    def release_gpu(self):
        pass

    def restore_gpu(self):
        pass


@pytest.fixture
def services(tmp_path):
    settings = AppSettings(lora_folder=tmp_path / "Lora", data_folder=tmp_path / "data", dataset_roots=[SAMPLE_DATASET],
                           unload_checkpoint_while_training=False)
    services = Services.create(settings, FakeHost(), start=False,
                               command=lambda job: [sys.executable, "-c", FAKE_TRAINER, str(job.config_path)])
    yield services
    services.close()


def form(**changes):
    values = {"checkpoint": "tiny-sd (embedded demo model)", "dataset": str(SAMPLE_DATASET), "preset": "character",
              "tier": "no limit", "algorithm": "LoRA", "output_name": "star", "epochs": 2, "batch_size": 4, "resolution": "64",
              "network_dim": 8, "network_alpha": 8, "unet_lr": 2e-3, "text_encoder_lr": 5e-4, "save_every_n_epochs": 1,
              "sample_every_n_epochs": 1, "sample_prompt": "zkstar", "optimizer": "AdamW", "scheduler": "constant", "extra": ""}
    return {**values, **changes}


def test_the_three_tabs_build_under_the_webuis_gradio(services):
    import gradio as gr

    tabs = build_tabs(services)
    assert [(title, elem_id) for _, title, elem_id in tabs] == [
        ("Train LoRA", "lora_trainer_train"), ("Dataset Tag Editor", "lora_trainer_tags"), ("Prompt-Lora-Grid", "lora_trainer_grid")]
    # AUTOMATIC1111 1.10 pins 3.41.2 (`.ci/run`), Forge 4.40.0 (`.ci/gradio4`)
    assert gr.__version__ in ("3.41.2", "4.40.0") and all(isinstance(blocks, gr.Blocks) for blocks, _, _ in tabs)
    shown = {getattr(block, "elem_id", None) for blocks, _, _ in tabs for block in blocks.blocks.values()}
    assert {"lora_trainer_start", "lora_trainer_tags_gallery", "lora_trainer_grid_generate"} <= shown


def test_form_becomes_the_options_the_job_runs_with(services):
    options, sdxl = train_tab.job_options(services, form())
    checked = options_from(options)
    assert not sdxl
    assert checked.pretrained_model_name_or_path == str(TINY_MODEL_PATH)
    assert checked.train_data_dir == str(SAMPLE_DATASET) and checked.output_dir == str(services.settings.lora_folder)
    assert (checked.max_train_epochs, checked.train_batch_size, checked.resolution) == (2, 4, "64")
    assert checked.unet_lr == 2e-3 and checked.text_encoder_lr == [5e-4]
    prompt = Path(checked.sample_prompts).read_text(encoding="utf-8")
    assert prompt.strip() == "zkstar --w 64 --h 64"  # samples at the training size unless the prompt says otherwise


def test_validation_shows_steps_and_refuses_bad_input(services, tmp_path):
    text = train_tab.validation_text(services, form())
    assert "16 images" in text and "× 2 epochs" in text
    assert "outside the allowed folders" in train_tab.validation_text(services, form(dataset=str(tmp_path)))
    assert "not a plain file name" in train_tab.validation_text(services, form(output_name="../evil"))
    assert "output name: empty; type a name" in train_tab.validation_text(services, form(output_name=" "))
    # an imported Kohya TOML's dataset_config: said for what it is, not "dataset folder: no path given"
    text = train_tab.validation_text(services, form(dataset="", extra='dataset_config = "datasets.toml"'))
    assert "Advanced: dataset_config is the Dataset field's to give: put the dataset TOML's path there" in text
    assert "16 images" in train_tab.validation_text(services, form(extra='dataset_config = ""'))  # empty: not given
    assert "does not exist" in train_tab.validation_text(services, form(checkpoint=str(services.settings.data_folder / "missing.safetensors")))
    assert "Advanced options" in train_tab.validation_text(services, form(extra="noise_offset = "))


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need a privilege on Windows")
def test_a_dataset_of_pictures_linked_from_elsewhere_is_counted_as_training_reads_it(tmp_path):
    """Training follows links as sd-scripts does: holding the Train tab's Check to the dataset roots refused such a
    dataset at Start ("no image sd-scripts would train on") and would estimate a partly linked one short."""
    photos, roots = tmp_path / "photos", tmp_path / "datasets"
    shutil.copytree(SAMPLE_DATASET / "10_zkstar", photos)
    (roots / "star" / "10_zkstar").mkdir(parents=True)
    for picture in photos.glob("*.png"):
        (roots / "star" / "10_zkstar" / picture.name).symlink_to(picture)
        shutil.copy(picture.with_suffix(".txt"), roots / "star" / "10_zkstar" / picture.with_suffix(".txt").name)
    settings = AppSettings(lora_folder=tmp_path / "Lora", data_folder=tmp_path / "data", dataset_roots=[roots],
                           unload_checkpoint_while_training=False)
    services = Services.create(settings, FakeHost(), start=False)
    try:
        assert "16 images" in train_tab.validation_text(services, form(dataset=str(roots / "star")))
    finally:
        services.close()


def test_a_kohya_dataset_toml_trains_from_the_dataset_field(services, tmp_path):
    """Kohya users keep their datasets in --dataset_config TOMLs; the tab refused them ("train that file from the
    command line"). Its subsets' repeats and its batch size count, as sd-scripts reads them."""
    concept = next(p for p in SAMPLE_DATASET.iterdir() if p.is_dir())
    config = tmp_path / "my datasets.toml"
    config.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nbatch_size = 2\nresolution = 64\n'
                      f'[[datasets.subsets]]\nimage_dir = "{concept.as_posix()}"\nnum_repeats = 3\n', encoding="utf-8")
    services.settings.dataset_roots.append(tmp_path)
    text = train_tab.validation_text(services, form(dataset=str(config), batch_size=4))
    assert "16 images → 48 samples per epoch (with repeats) → 24 steps per epoch" in text, text  # batch 2, not 4
    assert "Samples per epoch: 48" in train_tab.check_dataset_text(services, form(dataset=str(config)))
    message, job_id = train_tab.submit(services, form(dataset=str(config)))
    job = services.store.get(job_id)
    assert job.options["dataset_config"] == str(config.resolve()) and "train_data_dir" not in job.options, message
    values = train_tab.import_into_form(str(config))  # importing it fills the Dataset field and nothing else
    assert values[1] == str(config.resolve()) and values[-1].startswith("Imported my datasets.toml as the Dataset")
    assert all(isinstance(value, dict) for value in values[2:-1])
    elsewhere = tmp_path.parent / f"{tmp_path.name}-outside"
    elsewhere.mkdir()
    config.write_text(config.read_text(encoding="utf-8").replace(concept.as_posix(), elsewhere.as_posix()), encoding="utf-8")
    text = train_tab.validation_text(services, form(dataset=str(config)))
    assert text.startswith("**Cannot start:**") and "outside the allowed folders" in text


def test_dataset_check_shows_the_health_report(services):
    text = train_tab.check_dataset_text(services, form())
    assert "10_zkstar" in text and "Samples per epoch" in text


def test_dataset_check_without_buckets_knows_the_runs_random_crop_face_crop_and_latent_caching(services, tmp_path):
    """A larger image is an error only where training would stop on it: not with the preset's cached latents
    (resized like a bucket), nor with random_crop (a patch at its own size), nor where a face crop cuts around the
    face its name gives."""
    from PIL import Image

    services.settings.dataset_roots.append(tmp_path)
    folder = tmp_path / "chars"
    (folder / "10_zkchar").mkdir(parents=True)
    Image.new("RGB", (96, 80), (40, 90, 160)).save(folder / "10_zkchar" / "a.png")
    (folder / "10_zkchar" / "a.txt").write_text("zkchar", encoding="utf-8")
    checked = form(dataset=str(folder), resolution="64")
    assert "wrong-size" in train_tab.check_dataset_text(services, {**checked, "extra": "enable_bucket = false\ncache_latents = false"})
    assert "wrong-size" not in train_tab.check_dataset_text(services, {**checked, "extra": "enable_bucket = false"})
    text = train_tab.check_dataset_text(services, {**checked, "extra": "enable_bucket = false\ncache_latents = false\n"
                                                                        "random_crop = true"})
    assert "wrong-size" not in text and "Samples per epoch" in text
    for name in ("a.png", "a.txt"):  # sd-scripts' face-crop name: the run cuts the resolution around that face
        (folder / "10_zkchar" / name).rename(folder / "10_zkchar" / name.replace("a.", "a_48_40_20_20."))
    face_crop = {**checked, "extra": 'enable_bucket = false\ncache_latents = false\nface_crop_aug_range = "2.0,4.0"'}
    text = train_tab.check_dataset_text(services, face_crop)
    assert "wrong-size" not in text and "Samples per epoch" in text


def test_start_queues_a_second_job_and_the_live_view_follows_it(services):
    message, first = train_tab.submit(services, form())
    assert first is not None and "starting" in message
    message, second = train_tab.submit(services, form(output_name="star2"))
    assert "queued behind 1 job" in message
    assert [job.status for job in services.store.all()] == ["queued", "queued"]
    services.runner.run_next()
    finished = services.store.get(first)
    assert finished.status == "finished"
    assert json.loads((finished.folder / "card.json").read_text(encoding="utf-8")) == {"preferred_weight": 0.7}
    view = train_tab.LiveViews().view(finished)
    assert (view.step, view.total, view.recommended_epoch) == (4, 4, 1)
    assert view.files and view.files[0].endswith("star.safetensors")
    assert train_tab.end_notice(finished) == f"Job {first} (star) finished"
    assert train_tab.shown_job(services, None).id == second  # the newest when nothing runs


def test_start_of_a_job_named_as_a_queued_one_says_it_will_move_that_ones_files_aside(services):
    first = train_tab.submit(services, form())[1]
    message, second = train_tab.submit(services, form())
    assert second is not None and f"job {first} (queued) also writes the run 'star'" in message, message


def test_spaces_around_the_output_name_are_removed_and_said(services):
    """" star " became "star" without a word (the API says so): one looking for " star.safetensors" found nothing."""
    said = "Output name: ' star ' has spaces at its start or end: they were removed, and 'star' is used"
    assert f"**Note:** {said}" in train_tab.validation_text(services, form(output_name=" star "))
    message, job = train_tab.submit(services, form(output_name=" star "))
    assert services.store.get(job).options["output_name"] == "star" and said in message, message
    assert "has spaces" not in train_tab.validation_text(services, form(output_name="star"))
    # Advanced names the output: no spaces were removed from the field's name, whatever name is used
    assert "has spaces" not in train_tab.validation_text(services, form(output_name="star", extra='output_name = "other"'))


def test_the_sd_scripts_command_comes_with_what_runs_otherwise_there(services):
    """--print-kohya-command says what the line leaves out or sd-scripts runs otherwise; the tab showed the line
    alone. The runner's own options (a state_dir typed in Advanced: every job's states go to its folder) are not the
    user's to be told of."""
    states = services.settings.lora_folder / "states"
    values = form(algorithm="LoHa", extra=f'device = "cpu"\nstate_dir = "{states.as_posix()}"\n'
                                          'sample_sampler = "DPM++ 2M Karras"')
    options, sdxl = train_tab.job_options(services, values)
    command, notes = train_tab.equivalent_command(options, sdxl)
    assert command.startswith("accelerate launch train_network.py") and "\n" not in command
    assert notes.split("\n\n") == [
        "**Note:** --sample_sampler 'DPM++ 2M Karras': sd-scripts has no such sampler; it draws the samples with "
        "dpmsolver++ (DPM++ 2M without Karras spacing), so they differ from this trainer's",
        "**Note:** sd-scripts with lycoris-lora 4.1.3 stops on an SD1/SD2 model with preset=full (LyCORIS's default is "
        "full): it lists the time embedding twice (\"duplicated lora name\"); this trainer trains it once. To run it "
        "there, add preset=attn-mlp (or another preset) to --network_args",
        "**Note:** --device left out (this trainer's own: sd-scripts has no such option)"]
    assert train_tab.equivalent_command(train_tab.job_options(services, form())[0], False)[1] == ""


def test_the_sd_scripts_command_and_kohya_toml_of_an_sd2_checkpoint_tell_sd_scripts_v2(services, tmp_path):
    """sd-scripts detects no SD2 file (without --v2 its strict load fails) nor a v-prediction one: the tab's command
    and its Kohya TOML carry what this trainer reads from the file, as --print-kohya-command does."""
    from lora_trainer.app import presets
    from lora_trainer.bench import write_random_checkpoint
    from lora_trainer.models.configs import SD2
    from lora_trainer.tiny_model.build import tiny_like

    sd2 = write_random_checkpoint(tiny_like(SD2), tmp_path / "my sd2.safetensors")
    sd2.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n', encoding="utf-8")
    options, _ = train_tab.job_options(services, form())
    command, _ = train_tab.equivalent_command({**options, "pretrained_model_name_or_path": str(sd2)}, False)
    assert " --v2 " in command and " --v_parameterization" in command, command
    exported = presets.export_kohya_toml({**options, "pretrained_model_name_or_path": str(sd2)}, tmp_path / "sd2.toml")
    assert "v2 = true" in exported.read_text(encoding="utf-8") and "v_parameterization = true" in exported.read_text(
        encoding="utf-8")
    command, _ = train_tab.equivalent_command(options, False)  # the tiny SD1 model: told nothing
    assert "--v2" not in command and "--v_parameterization" not in command, command


def test_resume_of_a_job_named_as_a_queued_one_says_it_will_write_over_that_ones_files(services):
    _, paused = train_tab.submit(services, form())
    services.runner.run_next()
    services.store.update(paused, status="paused")
    queued = train_tab.submit(services, form())[1]
    text, resumed = train_tab.job_action(services, "resume", paused)
    assert f"Job {resumed} resumes job {paused} from its last state.\n\n**Note:** job {queued} (queued) also writes the " \
           "run 'star'" in text and "writes over the files of the same name it saved" in text, text


def test_stop_pause_resume_and_controls_say_what_happens(services):
    text, _ = train_tab.job_action(services, "resume", None)
    assert "Nothing to resume" in text
    _, job_id = train_tab.submit(services, form())
    text, _ = train_tab.job_action(services, "stop", job_id)  # still queued: removed from the queue
    assert services.store.get(job_id).status == "stopped"
    assert "works only while it runs" in train_tab.job_action(services, "save", job_id)[0]
    _, job_id = train_tab.submit(services, form())
    services.runner.run_next()
    services.store.update(job_id, status="interrupted")
    state = Path(services.store.get(job_id).last_state)
    state.rename(state.with_name(state.name + ".old"))  # killed between a state save's two renames: still resumable
    text, resumed = train_tab.job_action(services, "resume", None)
    assert resumed != job_id and f"resumes job {job_id}" in text
    assert services.store.get(resumed).options["resume"] == services.store.get(job_id).last_state
    # a selected job that saved no state (killed as it started) is said so; no other run is resumed in its place
    _, crashed = train_tab.submit(services, form())
    services.store.update(crashed, status="failed", last_state=None)
    text, shown = train_tab.job_action(services, "resume", crashed)
    assert f"job {crashed} saved no state to resume from" in text and shown == crashed
    assert len(services.store.all()) == 4  # no job was added


def test_stopping_an_sd_scripts_backend_job_does_not_claim_a_save(services):
    """sd-scripts is terminated at a stop: "saving first" was not so."""
    job = services.store.add("backend", {"backend": "sd-scripts=/opt/sd-scripts"})
    services.store.update(job.id, status="running")
    text, _ = train_tab.job_action(services, "pause", job.id)
    assert text == (f"Job {job.id}: pausing (frees the GPU): sd-scripts is ended now, without saving (it cannot save at "
                    "a stop); a resume goes on from the last state it saved.")


def installed_bitsandbytes(folder: Path) -> Path:
    """An extras folder holding (a stand-in for) bitsandbytes, as the Install extras button leaves it."""
    (folder / "bitsandbytes").mkdir(parents=True)
    (folder / "bitsandbytes" / "__init__.py").write_text("", encoding="utf-8")
    return folder


def test_a_gpu_memory_tier_sets_only_what_memory_decides_and_a_misfit_is_said(services, tmp_path):
    extras = installed_bitsandbytes(tmp_path / "extras")
    assert train_tab.tier_values("character", "6 GB", extras) == {"batch_size": 1, "optimizer": "AdamW8bit"}  # SD1's TE trains
    assert set(train_tab.tier_values("character", "24 GB")) == {"batch_size", "optimizer"}  # not epochs, rank, rates
    text = train_tab.validation_text(services, form(tier="6 GB", resolution="1024", batch_size=8))
    advice = text.split("above the 6 GB chosen as GPU memory: to fit, try ")[1]  # what the run does not use yet
    assert "a smaller --train_batch_size (now 8)" in advice and "--fp8_base" in advice
    assert "--gradient_checkpointing" not in advice and "--cache_latents" not in advice
    assert "above the" not in train_tab.validation_text(services, form(tier="24 GB"))


def test_a_tiers_8_bit_optimizer_without_bitsandbytes_becomes_adamw_and_a_job_asking_for_it_is_refused_at_once(
        tmp_path, monkeypatch):
    """The 6/8/12 GB tiers chose AdamW8bit; without bitsandbytes the job failed only when its turn came."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed beside the WebUI
    values = train_tab.tier_values("character", "8 GB", tmp_path / "extras")
    assert values["optimizer"] == "AdamW"
    assert values["guidance"].endswith("The 8 GB tier's AdamW8bit needs bitsandbytes, which is not installed: the "
                                       "optimizer is AdamW, whose moments take ≈ 0.11 GiB more on SD 1.5 (≈ 0.5 GiB on "
                                       "SDXL). Install bitsandbytes with Install extras (under Advanced) to choose "
                                       "AdamW8bit again.")
    settings = AppSettings(lora_folder=tmp_path / "Lora", data_folder=tmp_path / "data", dataset_roots=[SAMPLE_DATASET],
                           unload_checkpoint_while_training=False, extras_folder=tmp_path / "extras")
    services = Services.create(settings, FakeHost(), start=False, command=lambda job: [sys.executable, "-c", "pass"])
    try:
        text = train_tab.validation_text(services, form(optimizer="AdamW8bit"))
        assert text == ("**Cannot start:** --optimizer_type AdamW8bit needs the Python package bitsandbytes, which is "
                        "not installed: in the Train tab's Advanced, tick bitsandbytes among the optional trainer extras "
                        "and press Install extras, or choose AdamW, which needs none")
        installed_bitsandbytes(tmp_path / "extras")  # what the button does: the trainer's process will find it there
        assert "Cannot start" not in train_tab.validation_text(services, form(optimizer="AdamW8bit"))
    finally:
        services.close()


def test_the_guidance_is_the_chosen_tiers_not_an_earlier_ones(tmp_path, monkeypatch):
    """After the 6 GB tier said "AdamW8bit needs bitsandbytes", picking 16 GB (or installing bitsandbytes) left that
    sentence on screen: the tier's fill gave the guidance only when a package was missing."""
    from lora_trainer.app import presets

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed beside the WebUI
    settings = AppSettings(lora_folder=tmp_path / "Lora", data_folder=tmp_path / "data", dataset_roots=[SAMPLE_DATASET],
                           unload_checkpoint_while_training=False, extras_folder=tmp_path / "extras")
    services = Services.create(settings, FakeHost(), start=False, command=lambda job: [sys.executable, "-c", "pass"])
    try:
        filled = train_tab.Filled()
        shown = form(preset="style")
        assert "AdamW8bit needs bitsandbytes" in train_tab.fill_for_tier(services, {**shown, "tier": "6 GB"}, filled)["guidance"]
        values = train_tab.fill_for_tier(services, {**shown, "tier": "16 GB"}, filled)
        assert values["guidance"] == presets.PRESETS["style"].guidance
        train_tab.fill_for_tier(services, {**shown, "tier": "8 GB"}, filled)
        installed_bitsandbytes(tmp_path / "extras")  # Install extras pressed, then the tier picked again
        values = train_tab.fill_for_tier(services, {**shown, "tier": "6 GB"}, filled)
        assert values["guidance"] == presets.PRESETS["style"].guidance and values["optimizer"] == "AdamW8bit"
    finally:
        services.close()


def test_an_sdxl_tier_below_16_gb_trains_the_unet_only_with_cached_captions_whatever_rate_the_preset_filled(
        services, monkeypatch):
    """The form's text encoder rate (the preset's 5e-5) made the SDXL tiers train the text encoders, and with the tier's
    cached captions the run was refused."""
    monkeypatch.setattr(train_tab, "_is_sdxl", lambda path: True)
    options, sdxl = train_tab.job_options(services, form(tier="8 GB", text_encoder_lr=5e-5))
    assert sdxl and options["network_train_unet_only"] and options["cache_text_encoder_outputs"]
    assert "shuffle_caption" not in options
    text = train_tab.validation_text(services, form(tier="8 GB", text_encoder_lr=5e-5))
    assert "Cannot start" not in text and "above the 8 GB" not in text
    assert ("⚠ The 8 GB GPU memory tier trains SDXL's UNet only (the captions are encoded once, so the text encoders "
            "leave the GPU): the text encoder learning rate is not used. To train the text encoders, choose 16 GB or "
            "more, or add network_train_unet_only = false in Advanced") in text
    assert "UNet only" not in train_tab.validation_text(services, form(tier="8 GB", text_encoder_lr=0))
    # the text encoders alone, or shuffled captions asked for in Advanced: the tier's caching gives way
    options, _ = train_tab.job_options(services, form(tier="8 GB", unet_lr=0))
    assert options["network_train_text_encoder_only"] and "cache_text_encoder_outputs" not in options
    options, _ = train_tab.job_options(services, form(tier="8 GB", extra="shuffle_caption = true"))
    assert options["network_train_unet_only"] and "cache_text_encoder_outputs" not in options
    assert "Cannot start" not in train_tab.validation_text(services, form(tier="8 GB", unet_lr=0))


def test_an_sdxl_tier_below_16_gb_trains_a_dataset_toml_with_shuffled_captions_encoding_them_at_each_step(
        services, tmp_path, monkeypatch):
    """The tier's cached captions met a dataset TOML's shuffle_caption: Validate said Cannot start, for a run that
    trained before the tiers cached them. The caching gives way, as to shuffled captions typed in Advanced."""
    monkeypatch.setattr(train_tab, "_is_sdxl", lambda path: True)
    concept = next(p for p in SAMPLE_DATASET.iterdir() if p.is_dir())
    config = tmp_path / "datasets.toml"
    config.write_text(f'[general]\nshuffle_caption = true\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\n'
                      f'[[datasets.subsets]]\nimage_dir = "{concept.as_posix()}"\ncaption_dropout_rate = 0.1\n',
                      encoding="utf-8")
    services.settings.dataset_roots.append(tmp_path)
    options, _ = train_tab.job_options(services, form(tier="8 GB", dataset=str(config)))
    assert options["network_train_unet_only"] and "cache_text_encoder_outputs" not in options
    text = train_tab.validation_text(services, form(tier="8 GB", dataset=str(config)))
    assert not text.startswith("**Cannot start:**"), text
    assert ("⚠ The 8 GB GPU memory tier encodes the captions once, but shuffle_caption, caption_dropout_rate in the "
            "dataset TOML change them between steps: they are encoded at every step instead, with the text encoders on "
            "the GPU (the estimate counts them). To encode them once, turn them off in the dataset TOML") in text
    assert ("⚠ The 8 GB GPU memory tier trains SDXL's UNet only: the text encoder learning rate is not used.") in text
    message, job_id = train_tab.submit(services, form(tier="8 GB", dataset=str(config)))
    assert job_id is not None, message
    # the caching asked for in Advanced is refused, naming what varies
    text = train_tab.validation_text(services, form(tier="8 GB", dataset=str(config),
                                                    extra="cache_text_encoder_outputs = true"))
    assert text.startswith("**Cannot start:** --cache_text_encoder_outputs encodes each caption once, but "
                           "caption_dropout_rate, shuffle_caption change the captions between steps"), text
    # a TOML whose captions stay the same keeps the tier's caching, and Validate says nothing of it
    config.write_text(config.read_text(encoding="utf-8").replace("shuffle_caption = true", "shuffle_caption = false")
                      .replace("caption_dropout_rate = 0.1", "num_repeats = 1"), encoding="utf-8")
    options, _ = train_tab.job_options(services, form(tier="8 GB", dataset=str(config)))
    assert options["cache_text_encoder_outputs"]
    assert "encodes the captions once, but" not in train_tab.validation_text(services, form(tier="8 GB", dataset=str(config)))


class TwoCheckpointsHost(FakeHost):
    def __init__(self, sdxl: Path):
        self.sdxl = sdxl

    def checkpoints(self):
        return {"tiny-sd": TINY_MODEL_PATH, "tiny-sdxl": self.sdxl}


@pytest.fixture
def sdxl_services(tmp_path, tiny_sdxl):
    """The tab with an SD1 and an SDXL checkpoint to pick, and bitsandbytes for the tiers' AdamW8bit."""
    settings = AppSettings(lora_folder=tmp_path / "Lora", data_folder=tmp_path / "data", dataset_roots=[SAMPLE_DATASET],
                           unload_checkpoint_while_training=False, extras_folder=installed_bitsandbytes(tmp_path / "extras"))
    services = Services.create(settings, TwoCheckpointsHost(tiny_sdxl), start=False,
                               command=lambda job: [sys.executable, "-c", "pass"])
    yield services
    services.close()


def picked(services, shown: dict, filled, fill, **changes) -> dict:
    """The form after the user changes ``changes`` and the tab's fill handler for that change answers."""
    shown = {**shown, **changes}
    return {**shown, **{k: v for k, v in fill(services, shown, filled).items() if k != "guidance"}}


def test_the_preset_and_tier_fill_the_form_for_an_sdxl_checkpoint(sdxl_services):
    """The fill handlers filled SD1's values whatever the checkpoint: SDXL on 6 GB trained at 512 px and rank 32
    (5.8 GiB estimated), and typing the 1024 px the resolution warning asked for went above the card."""
    filled = train_tab.Filled()
    shown = picked(sdxl_services, form(), filled, train_tab.fill_for_preset, checkpoint="tiny-sdxl")  # the page loads
    assert (shown["resolution"], shown["network_dim"], shown["text_encoder_lr"]) == ("1024", 32, 5e-5)
    guidance = train_tab.fill_for_tier(sdxl_services, {**shown, "tier": "6 GB"}, train_tab.Filled(sdxl=True))["guidance"]
    assert "On 6 GB, SDXL trains at 640 px (its native size is 1024) and rank 4 at most" in guidance  # what it gives up
    guidance = train_tab.fill_for_checkpoint(sdxl_services, {**shown, "tier": "6 GB"}, train_tab.Filled("6 GB"))["guidance"]
    assert "On 6 GB, SDXL trains at 640 px" in guidance  # an SDXL checkpoint picked on 6 GB says it too
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_tier, tier="6 GB")
    assert (shown["resolution"], shown["network_dim"], shown["network_alpha"]) == ("640", 4, 2)
    assert (shown["batch_size"], shown["optimizer"], shown["text_encoder_lr"]) == (1, "AdamW8bit", 0)
    options, sdxl = train_tab.job_options(sdxl_services, shown)
    assert sdxl and options["cache_text_encoder_outputs"] and options["network_train_unet_only"] and options["fp8_base"]
    text = train_tab.validation_text(sdxl_services, shown)
    assert "Cannot start" not in text and "above the 6 GB" not in text and "The base model is SDXL" not in text
    assert "VRAM ≈ 5.4 GiB" in text, text  # a tenth of the 6 GB left for the desktop
    assert "leaves less than a tenth" not in text
    # what the guidance offers a card with nothing else on it: under the card, over the tenth the tiers keep free
    typed = train_tab.validation_text(sdxl_services, {**shown, "resolution": "768", "network_dim": 8, "network_alpha": 4})
    assert "The estimate leaves less than a tenth of the 6 GB card free" in typed and "above the 6 GB" not in typed
    # another tier, then an SD1 checkpoint: the preset's values for them, where the form still shows the fill's
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_tier, tier="16 GB")
    assert (shown["resolution"], shown["network_dim"], shown["text_encoder_lr"]) == ("1024", 32, 5e-5)
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_checkpoint, checkpoint="tiny-sd")
    assert (shown["resolution"], shown["network_dim"], shown["text_encoder_lr"]) == ("512", 32, 5e-5)
    # a rank and resolution typed stay, but for the 6 GB tier's cap, which an SDXL checkpoint picked then brings
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_tier, tier="6 GB", resolution="768", network_dim=24,
                   network_alpha=24)
    assert (shown["resolution"], shown["network_dim"], shown["network_alpha"]) == ("768", 24, 24)
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_checkpoint, checkpoint="tiny-sdxl")
    assert (shown["resolution"], shown["network_dim"], shown["network_alpha"], shown["text_encoder_lr"]) == ("768", 4, 4, 0)
    assert picked(sdxl_services, shown, filled, train_tab.fill_for_checkpoint, checkpoint="tiny-sdxl") == shown


def test_the_preset_and_tier_fill_sd1_values_for_an_sd1_checkpoint(sdxl_services):
    filled = train_tab.Filled()
    shown = picked(sdxl_services, form(), filled, train_tab.fill_for_preset, checkpoint="tiny-sd")
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_tier, tier="6 GB")
    assert (shown["resolution"], shown["network_dim"], shown["network_alpha"], shown["text_encoder_lr"]) == ("512", 32, 16, 5e-5)
    assert shown["batch_size"] == 1 and shown["optimizer"] == "AdamW8bit"
    assert picked(sdxl_services, shown, filled, train_tab.fill_for_tier, tier="8 GB")["batch_size"] == 2
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_tier, tier="6 GB")
    options, sdxl = train_tab.job_options(sdxl_services, shown)
    assert not sdxl and "cache_text_encoder_outputs" not in options and options["text_encoder_lr"] == [5e-5]


def test_a_preset_exported_at_sdxls_6_gb_tier_trains_an_sd1_checkpoint_with_that_checkpoints_tier(sdxl_services, tmp_path):
    """The exported preset carried the tier's fp8, cached captions, UNet only and 640 px: imported with an SD 1.5
    checkpoint, Advanced held them and Validate refused (--cache_text_encoder_outputs needs the UNet only)."""
    import toml

    from lora_trainer.app import presets

    filled = train_tab.Filled()
    shown = picked(sdxl_services, form(), filled, train_tab.fill_for_preset, checkpoint="tiny-sdxl")
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_tier, tier="6 GB", extra="max_grad_norm = 0.5")
    options, sdxl = train_tab.job_options(sdxl_services, shown)
    assert sdxl and options["fp8_base"] and options["cache_text_encoder_outputs"]  # the tier's, in the run
    path = presets.write_preset_file(train_tab.preset_file(shown, options, sdxl), tmp_path / "mine.preset.toml")
    values = train_tab.import_into_form(str(path))
    advanced = toml.loads(values[-2])
    assert not {"fp8_base", "cache_text_encoder_outputs", "gradient_checkpointing", "no_half_vae"} & set(advanced)
    assert advanced["max_grad_norm"] == 0.5  # what Advanced typed stays the file's
    imported = dict(zip(train_tab.IMPORTED_FIELDS, values))
    assert isinstance(imported["resolution"], dict) and isinstance(imported["network_dim"], dict)  # the form's kept
    sd1 = {**shown, "checkpoint": "tiny-sd", "tier": "6 GB", "resolution": "512", "network_dim": 32, "network_alpha": 16,
           "text_encoder_lr": 5e-5, "extra": values[-2]}
    options, sdxl = train_tab.job_options(sdxl_services, sd1)
    assert not sdxl and not options.get("fp8_base") and "cache_text_encoder_outputs" not in options
    assert "Cannot start" not in train_tab.validation_text(sdxl_services, sd1)
    # typed in Advanced, the same switches are the file's
    typed = {**shown, "extra": "fp8_base = true"}
    options, sdxl = train_tab.job_options(sdxl_services, typed)
    assert train_tab.preset_file(typed, options, sdxl).options["fp8_base"] is True


def test_a_preset_file_exported_before_with_a_tiers_switches_imports_without_them(tmp_path):
    """Files the tab exported before 2026-12-05 carry the tier's switches (here SDXL's 6 GB: fp8, cached captions,
    UNet only, checkpointing, fp16, AdamW8bit, batch 1): imported, they sat in Advanced over the tier chosen now."""
    import toml

    from lora_trainer.app import presets

    old = {**presets.preset_options("character", "6 GB", sdxl=True), "resolution": "768", "max_grad_norm": 0.5}
    path = presets.write_preset_file(presets.PresetFile("old", old), tmp_path / "old.preset.toml")
    values = train_tab.import_into_form(str(path))
    advanced = toml.loads(values[-2])
    assert not {"fp8_base", "cache_text_encoder_outputs", "gradient_checkpointing", "mixed_precision", "sdpa"} & set(advanced)
    assert advanced["max_grad_norm"] == 0.5
    assert "it carries a GPU memory tier's switches (cache_latents, cache_text_encoder_outputs, fp8_base" in values[-1]
    twelve = presets.write_preset_file(presets.PresetFile("12", presets.preset_options("character", "12 GB", sdxl=True)),
                                       tmp_path / "twelve.preset.toml")  # SDXL's 12 GB holds SD 1.5's 8 GB and more
    assert not {"fp8_base", "cache_text_encoder_outputs"} & set(toml.loads(train_tab.import_into_form(str(twelve))[-2]))
    plain = presets.write_preset_file(presets.PresetFile("plain", {**presets.preset_options("character"), "sdpa": True}),
                                      tmp_path / "plain.preset.toml")
    assert toml.loads(train_tab.import_into_form(str(plain))[-2])["sdpa"] is True  # no tier's whole set: kept


def test_an_imported_files_values_stay_when_its_checkpoint_changes_the_model(sdxl_services, tmp_path):
    """The import writes the Base checkpoint, whose change then refilled the imported values that equalled the SD1
    fill: an SDXL file's 512 px became 1024 (here 768), its text encoder rate 0 and its rank 32 became 16."""
    filled = train_tab.Filled()
    shown = picked(sdxl_services, form(), filled, train_tab.fill_for_preset, checkpoint="tiny-sd")
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_tier, tier="6 GB")
    assert (shown["resolution"], shown["network_dim"], shown["text_encoder_lr"]) == ("512", 32, 5e-5)  # SD1's fill
    config = tmp_path / "sdxl run.toml"
    config.write_text('pretrained_model_name_or_path = "tiny-sdxl"\nresolution = "512"\nnetwork_dim = 32\n'
                      'unet_lr = 1e-4\ntext_encoder_lr = 5e-5\n', encoding="utf-8")
    values = train_tab.import_into_form(str(config), "character", sdxl_services.settings)
    filled = train_tab.filled_after_import(sdxl_services, values, filled)  # the upload's last output, as build wires it
    shown = {**shown, **{field: value for field, value in zip(train_tab.IMPORTED_FIELDS, values)
                         if field in train_tab.FORM_FIELDS and not isinstance(value, dict)}}
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_checkpoint)  # the import changed the checkpoint
    assert (shown["checkpoint"], shown["resolution"], shown["network_dim"], shown["network_alpha"],
            shown["text_encoder_lr"]) == ("tiny-sdxl", "512", 32, 16, 5e-5)
    # another checkpoint picked leaves them too; a tier picked sets what the tier decides (SDXL's rank cap on 6 GB);
    # a preset picked fills them all again
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_checkpoint, checkpoint="tiny-sd")
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_checkpoint, checkpoint="tiny-sdxl")
    assert (shown["resolution"], shown["network_dim"], shown["text_encoder_lr"]) == ("512", 32, 5e-5)
    tiered = picked(sdxl_services, shown, filled, train_tab.fill_for_tier, tier="8 GB")
    assert (tiered["resolution"], tiered["network_dim"]) == ("512", 32)
    tiered = picked(sdxl_services, tiered, filled, train_tab.fill_for_tier, tier="6 GB")
    assert (tiered["resolution"], tiered["network_dim"], tiered["network_alpha"]) == ("512", 4, 2)
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_preset)
    assert (shown["resolution"], shown["network_dim"], shown["text_encoder_lr"]) == ("640", 4, 0)


@pytest.mark.parametrize("name, text", [
    ("sdxl run.toml", 'pretrained_model_name_or_path = "tiny-sdxl"\nlearning_rate = 1e-4\nnetwork_train_unet_only = true\n'),
    ("gui.json", '{"LoRA_type": "Standard", "pretrained_model_name_or_path": "tiny-sdxl", "learning_rate": 1e-4, '
                 '"unet_lr": 1e-4, "text_encoder_lr": 0}'),
    ("no checkpoint.toml", 'network_dim = 8\nunet_lr = 1e-4\ntext_encoder_lr = 0\n')])
def test_an_sd1_checkpoint_picked_after_an_import_brings_the_text_encoder_rate_back(sdxl_services, tmp_path, name, text):
    """Imported while SDXL's 6 GB tier trained its UNet only, a file training the UNet only kept the text encoder rate
    at 0 once an SD1 checkpoint was picked: SD1 trained its UNet only on 6 GB, where without the import the preset's
    rate came back."""
    filled = train_tab.Filled()
    shown = picked(sdxl_services, form(), filled, train_tab.fill_for_preset, checkpoint="tiny-sdxl")
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_tier, tier="6 GB")
    config = tmp_path / name
    config.write_text(text, encoding="utf-8")
    values = train_tab.import_into_form(str(config), "character", sdxl_services.settings)
    assert values[-1].startswith(f"Imported {name}."), values[-1]
    filled = train_tab.filled_after_import(sdxl_services, values, filled)
    shown = {**shown, **{field: value for field, value in zip(train_tab.IMPORTED_FIELDS, values)
                         if field in train_tab.FORM_FIELDS and not isinstance(value, dict)}}
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_checkpoint)  # the import's own checkpoint
    assert shown["text_encoder_lr"] == 0
    larger = picked(sdxl_services, shown, train_tab.Filled(**vars(filled)), train_tab.fill_for_tier, tier="16 GB")
    assert larger["text_encoder_lr"] == 0  # the file's UNet only stays for SDXL on a larger card
    assert train_tab.job_options(sdxl_services, {**larger, "resolution": "64"})[0]["network_train_unet_only"]
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_checkpoint, checkpoint="tiny-sd")
    assert shown["text_encoder_lr"] == 5e-5  # the character preset's
    options, sdxl = train_tab.job_options(sdxl_services, {**shown, "resolution": "64"})
    assert not sdxl and not options.get("network_train_unet_only") and options["text_encoder_lr"] == [5e-5]


@pytest.mark.parametrize("tier, batch, optimizer", [("8 GB", 1, "AdamW8bit"), ("16 GB", 2, "AdamW8bit")])
def test_an_sdxl_checkpoint_picked_after_sd1s_fill_takes_sdxls_batch_and_optimizer_for_the_tier(sdxl_services, tier,
                                                                                               batch, optimizer):
    """SD1's 8 GB fill (batch 2) and 16 GB fill (AdamW) stayed when an SDXL checkpoint was picked: 8.9 GiB on 8 GB,
    14.5 GiB on 16 GB, where SDXL's own fill for the tier fits (batch 1; AdamW8bit)."""
    filled = train_tab.Filled()
    shown = picked(sdxl_services, form(), filled, train_tab.fill_for_preset, checkpoint="tiny-sd", tier=tier)
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_checkpoint, checkpoint="tiny-sdxl")
    assert (shown["batch_size"], shown["optimizer"]) == (batch, optimizer)
    assert "above the" not in train_tab.validation_text(sdxl_services, shown)
    typed = picked(sdxl_services, {**form(), "batch_size": 3}, train_tab.Filled(), train_tab.fill_for_checkpoint,
                   checkpoint="tiny-sdxl", tier=tier)
    assert typed["batch_size"] == 3  # typed, not filled: it stays


def test_an_sd1_file_training_the_unet_only_keeps_it_when_imported_over_sdxl(sdxl_services, tmp_path):
    """The file's own choice for an SD1 checkpoint stays, where the SDXL tier's UNet only gives way."""
    filled = train_tab.Filled()
    shown = picked(sdxl_services, form(), filled, train_tab.fill_for_preset, checkpoint="tiny-sdxl")
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_tier, tier="6 GB")
    config = tmp_path / "sd1 run.toml"
    config.write_text('pretrained_model_name_or_path = "tiny-sd"\nunet_lr = 1e-4\ntext_encoder_lr = 0\n', encoding="utf-8")
    values = train_tab.import_into_form(str(config), "character", sdxl_services.settings)
    filled = train_tab.filled_after_import(sdxl_services, values, filled)
    shown = {**shown, **{field: value for field, value in zip(train_tab.IMPORTED_FIELDS, values)
                         if field in train_tab.FORM_FIELDS and not isinstance(value, dict)}}
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_checkpoint)  # the import's own checkpoint: SD1
    assert (shown["checkpoint"], shown["text_encoder_lr"]) == ("tiny-sd", 0)
    assert train_tab.job_options(sdxl_services, {**shown, "resolution": "64"})[0]["network_train_unet_only"]


def test_a_dataset_toml_imported_leaves_the_fill_to_the_checkpoint(sdxl_services, tmp_path):
    """Importing a dataset TOML writes the Dataset field only: the form's filled values stay the fill's."""
    filled = train_tab.Filled()
    shown = picked(sdxl_services, form(), filled, train_tab.fill_for_preset, checkpoint="tiny-sd")
    config = tmp_path / "dataset.toml"
    config.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{SAMPLE_DATASET.as_posix()}"\n', encoding="utf-8")
    filled = train_tab.filled_after_import(sdxl_services, train_tab.import_into_form(str(config)), filled)
    shown = picked(sdxl_services, shown, filled, train_tab.fill_for_checkpoint, checkpoint="tiny-sdxl")
    assert (shown["resolution"], shown["network_dim"], shown["text_encoder_lr"]) == ("1024", 32, 5e-5)


def test_the_checkpoint_is_read_once_for_the_fills(sdxl_services, monkeypatch):
    """Each preset, tier and checkpoint pick asks the checkpoint's architecture: a .ckpt is unpickled to tell."""
    import lora_trainer.models.checkpoint as checkpoint

    opened = []
    monkeypatch.setattr(checkpoint, "open_tensors", lambda path, real=checkpoint.open_tensors: opened.append(path) or real(path))
    train_tab._is_sdxl_file.cache_clear()
    filled = train_tab.Filled()
    shown = picked(sdxl_services, form(checkpoint="tiny-sdxl"), filled, train_tab.fill_for_preset)
    for tier in ("6 GB", "8 GB", "no limit"):
        shown = picked(sdxl_services, shown, filled, train_tab.fill_for_tier, tier=tier)
    assert len(opened) == 1


def test_the_page_load_fill_does_not_unpickle_a_ckpt(sdxl_services, tiny_sdxl, tmp_path, monkeypatch):
    """Each page load of the Train tab unpickled a legacy .ckpt named in the Base checkpoint field, the whole file, in
    the WebUI's process; it fills SD 1.5's values until a pick reads the file. A .safetensors header is still read,
    and a Diffusers folder's parts are looked at."""
    import torch
    from safetensors.torch import load_file

    import lora_trainer.models.checkpoint as checkpoint

    legacy = tmp_path / "tiny sdxl.ckpt"
    torch.save({"state_dict": load_file(str(tiny_sdxl))}, legacy, _use_new_zipfile_serialization=False)
    sdxl_services.settings.checkpoint_folders.append(tmp_path)
    real_open = checkpoint._open_pickle

    def refused(path):
        raise AssertionError(f"{path} unpickled at page load")

    monkeypatch.setattr(checkpoint, "_open_pickle", refused)
    train_tab._is_sdxl_file.cache_clear()
    shown = picked(sdxl_services, form(checkpoint=str(legacy)), train_tab.Filled(), train_tab.fill_at_page_load)
    assert (shown["resolution"], shown["text_encoder_lr"]) == ("512", 5e-5)
    shown = picked(sdxl_services, form(checkpoint="tiny-sdxl"), train_tab.Filled(), train_tab.fill_at_page_load)
    assert shown["resolution"] == "1024"
    diffusers = tmp_path / "xl-diffusers"  # a Diffusers SDXL folder, by its second text encoder (was SD 1.5's fill)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        (diffusers / part).mkdir(parents=True)
        (diffusers / part / "config.json").write_text("{}", encoding="utf-8")
    shown = picked(sdxl_services, form(checkpoint=str(diffusers)), train_tab.Filled(), train_tab.fill_at_page_load)
    assert shown["resolution"] == "1024"
    monkeypatch.setattr(checkpoint, "_open_pickle", real_open)  # a preset picked reads it
    shown = picked(sdxl_services, form(checkpoint=str(legacy)), train_tab.Filled(), train_tab.fill_for_preset)
    assert shown["resolution"] == "1024"


def test_a_run_above_the_gpus_memory_without_a_tier_is_warned_about(services, monkeypatch):
    """"no limit" trains fp32 without gradient checkpointing: SD1.5 at batch 2 is ≈ 17 GiB, and an 8 GB card heard
    nothing before the out-of-memory error."""
    monkeypatch.setattr(train_tab, "gpu_gib", lambda device: 8.0)
    text = train_tab.validation_text(services, form(tier="no limit", resolution="512", batch_size=2))
    assert "above this GPU's 8 GiB, and no GPU memory tier is chosen" in text
    assert "above this GPU" not in train_tab.validation_text(services, form(tier="no limit", resolution="64", batch_size=1))
    monkeypatch.setattr(train_tab, "gpu_gib", lambda device: None)  # no GPU: nothing to compare with
    assert "above this GPU" not in train_tab.validation_text(services, form(tier="no limit", resolution="512", batch_size=2))


def test_failed_job_shows_its_error(services):
    _, job_id = train_tab.submit(services, form())
    job = services.store.update(job_id, status="failed", message="CUDA out of memory")
    view = train_tab.LiveViews().view(job)
    assert view.error == "CUDA out of memory"


def test_import_fills_the_form_from_a_kohya_toml(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[model]\npretrained_model_name_or_path = "base.safetensors"\n[train]\nmax_train_epochs = 7\n'
                      'network_dim = 16\nnoise_offset = 0.05\n', encoding="utf-8")
    values = train_tab.import_into_form(str(config))
    assert values[0] == "base.safetensors" and values[3] == 7 and values[6] == 16
    assert "noise_offset = 0.05" in values[-2] and "Imported" in values[-1]
    # what the file leaves out is sd-scripts' default where a field shows it, and the preset's additions are named
    assert (values[12], values[13]) == ("AdamW", "constant")
    assert "The character preset adds what the file leaves out: " in values[-1] and "min_snr_gamma = 5" in values[-1]
    assert "network_dim" not in values[-1]  # a field the form shows is not the preset's to add


def test_import_fills_the_form_from_kohya_gui_settings(tmp_path):
    """The Kohya GUI's "Save config" JSON: its names (optimizer, max_resolution, epoch) land in the form's fields."""
    config = tmp_path / "my gui settings.json"
    config.write_text('{"LoRA_type": "Standard", "pretrained_model_name_or_path": "base.safetensors", "epoch": 6, '
                      '"max_train_epochs": "", "max_resolution": "768,768", "optimizer": "Prodigy", "network_dim": 32, '
                      '"noise_offset_type": "Original", "noise_offset": 0.05, "text_encoder_lr": 0, "unet_lr": 1.0}',
                      encoding="utf-8")
    values = train_tab.import_into_form(str(config))
    assert (values[0], values[3], values[5], values[6], values[12]) == ("base.safetensors", 6, "768,768", 32, "Prodigy")
    assert "noise_offset = 0.05" in values[-2] and values[9] == 0  # text encoder 0: the UNet only
    assert values[-1].startswith("Imported my gui settings.json.")
    config.write_text(config.read_text(encoding="utf-8").replace("}", ', "sample_prompts": "zkchar, smiling"}'),
                      encoding="utf-8")
    values = train_tab.import_into_form(str(config))
    assert values[15] == "zkchar, smiling" and "sample_prompts" not in values[-2]  # in the Sample prompt field


def imported_form(values: list, **changes) -> dict:
    """The form after an import (fields the import left alone keep the test form's values), then the user's edits."""
    filled = {field: value.get("value") if isinstance(value, dict) else value
              for field, value in zip(train_tab.IMPORTED_FIELDS, values)  # gr.update(): left as it was, unless it
              if field in train_tab.FORM_FIELDS and not (isinstance(value, dict) and "value" not in value)}  # clears
    return form(**{**filled, "checkpoint": form()["checkpoint"], "dataset": form()["dataset"], **changes})


def test_an_imported_files_values_show_in_the_fields_and_later_edits_of_those_fields_count(services, tmp_path):
    """Advanced wins over the fields, and an import put the file's network, text-encoder switch and sample prompts
    there: choosing LoHa, a text-encoder rate or other prompts afterwards changed nothing."""
    import toml

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zkstar on a table --w 64 --h 64\n", encoding="utf-8")
    config = tmp_path / "run.toml"
    config.write_text(f'network_module = "lycoris.kohya"\nnetwork_args = ["algo=locon", "conv_dim=2"]\nnetwork_dim = 8\n'
                      f'network_alpha = 4\nlearning_rate = 3e-4\nnetwork_train_unet_only = true\n'
                      f'sample_prompts = "{prompts.as_posix()}"\n', encoding="utf-8")
    values = train_tab.import_into_form(str(config))
    assert (values[8], values[9], values[14], values[15]) == (3e-4, 0, "LoCon", "zkstar on a table --w 64 --h 64")
    advanced = toml.loads(values[-2])
    assert advanced["network_args"] == ["conv_dim=2", "conv_alpha=4"]  # LyCORIS's conv alpha = the network's, kept
    assert not {"network_module", "network_train_unet_only", "learning_rate", "sample_prompts"} & set(advanced)
    as_imported, _ = train_tab.job_options(services, imported_form(values))
    assert as_imported["network_module"] == "lycoris.kohya" and as_imported["network_train_unet_only"] is True
    assert as_imported["network_args"] == ["algo=locon", "conv_dim=2", "conv_alpha=4"]
    edited, _ = train_tab.job_options(services, imported_form(values, algorithm="LoHa", text_encoder_lr=5e-5,
                                                              sample_prompt="zkstar in the sky"))
    assert edited["network_args"] == ["algo=loha", "conv_dim=2", "conv_alpha=4"]
    assert edited["network_train_unet_only"] is False and edited["text_encoder_lr"] == [5e-5]
    assert "zkstar in the sky" in Path(edited["sample_prompts"]).read_text(encoding="utf-8")


def test_a_network_that_is_no_algorithm_choice_stays_in_advanced_and_decides(services, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('network_module = "lycoris.kohya"\nnetwork_args = ["algo=lora", "preset=full"]\n', encoding="utf-8")
    values = train_tab.import_into_form(str(config))
    assert "stays in Advanced, which decides over the Algorithm buttons" in values[-1]
    options, _ = train_tab.job_options(services, imported_form(values, algorithm="LoHa"))
    assert options["network_module"] == "lycoris.kohya" and options["network_args"] == ["algo=lora", "preset=full"]


def test_on_forge_a_network_its_own_loader_would_not_apply_is_said_before_training(services, monkeypatch):
    """On Forge the extension leaves <lora:…> to Forge's loader, which skips Diag-OFT, BOFT and (IA)³ files whole and
    fails the generation on LoKr with use_tucker: hours of training that would show nothing there."""
    extra = 'network_module = "lycoris.kohya"\nnetwork_args = ["algo=diag-oft", "constraint=0.01"]'
    assert "Forge" not in train_tab.validation_text(services, form(extra=extra))  # the standalone app applies it
    monkeypatch.setattr(services.host, "name", "forge")
    assert "⚠ Forge's own LoRA loader does not apply diag-oft files" in train_tab.validation_text(services, form(extra=extra))
    tucker = 'network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "use_tucker=True", "conv_dim=4"]'
    assert "Forge fails the whole generation on LoKr files with use_tucker" in train_tab.validation_text(services, form(extra=tucker))
    assert "Forge" not in train_tab.validation_text(services, form(algorithm="LoKr"))


def test_a_unet_rate_of_0_trains_the_text_encoder_only_as_in_kohyas_gui(services):
    options, _ = train_tab.job_options(services, form(unet_lr=0))
    assert options["network_train_text_encoder_only"] is True and "unet_lr" not in options
    assert options_from(options).network_train_text_encoder_only
    text = train_tab.validation_text(services, form(unet_lr=0, text_encoder_lr=0))
    assert text.startswith("**Cannot start:**") and "both 0: nothing would train" in text


def test_an_imported_optimizer_or_scheduler_outside_the_lists_is_shown_as_imported(services, tmp_path):
    import warnings

    config = tmp_path / "run.toml"
    config.write_text('[train]\noptimizer_type = "AdEMAMix8bit"\nlr_scheduler = "cosine_with_min_lr"\n', encoding="utf-8")
    values = train_tab.import_into_form(str(config))
    boxes = {getattr(b, "elem_id", None): b for b in train_tab.build(services).blocks.values()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gradio 4 warns (and its page shows an empty box) for a value outside the choices
        assert boxes["lora_trainer_optimizer"].postprocess(values[12]) == "AdEMAMix8bit"
        assert boxes["lora_trainer_scheduler"].postprocess(values[13]) == "cosine_with_min_lr"


def test_extras_are_offered_only_where_a_private_folder_exists_and_install_there(services, tmp_path, monkeypatch):
    def elem_ids(blocks):
        return {getattr(b, "elem_id", None) for b in blocks.blocks.values()}

    assert "lora_trainer_install_extras" not in elem_ids(train_tab.build(services))  # standalone: no private folder
    services.settings.extras_folder = tmp_path / "extras"
    assert "lora_trainer_install_extras" in elem_ids(train_tab.build(services))
    ran, planned = [], {"install": [{"metadata": {"name": "prodigyopt", "version": "1.1.2"}}]}
    monkeypatch.setattr("lora_trainer.app.extras.subprocess.run",
                        lambda command, **_: ran.append(command) or type("Done", (), {"returncode": 0, "stdout": json.dumps(planned)})())
    assert "Installed prodigyopt==1.1.2 into" in train_tab.install_extras_text(services, ["prodigyopt"])
    assert ran[1][ran[1].index("--target") + 1] == str(tmp_path / "extras")
    planned = {"install": []}  # the WebUI's environment has it already
    assert train_tab.install_extras_text(services, ["prodigyopt"]).startswith("The WebUI's environment already has prodigyopt")
    assert train_tab.install_extras_text(services, []).startswith("error: choose at least one extra")


def test_a_poll_leaves_the_job_and_file_the_user_or_a_button_chose(services):
    """The live view reads what was picked from the session's Picked, never from the boxes: gradio 3 polls with the
    values the boxes had when the page loaded (a pick snapped back to the newest job every second)."""
    _, first = train_tab.submit(services, form())
    services.runner.run_next()
    services.store.update(first, status="interrupted")
    views, picked = train_tab.LiveViews(), train_tab.Picked()
    box, *_ = train_tab.poll(services, views, picked)
    assert box["value"] == f"{first}: star (interrupted)"  # nothing picked: the newest job
    _, resumed = train_tab.job_action(services, "resume", first)
    picked.choose_job(train_tab.job_label(services.store.get(resumed)))  # what Resume does beside its answer
    box, progress, *_ = train_tab.poll(services, views, picked)
    assert box["value"] == f"{resumed}: star (queued)" and "**queued**" in progress
    picked.choose_job(f"{first}: star (interrupted)")  # the user picks the older job while the new one runs
    services.runner.run_next()
    for _ in range(2):  # and it stays picked, poll after poll
        box, progress, _, _, _, files, *_ = train_tab.poll(services, views, picked)
        assert "**interrupted**" in progress
    assert "value" not in box
    picked.choose_job(f"{resumed}: star (finished)")
    box, progress, _, _, _, files, *_ = train_tab.poll(services, views, picked)
    assert box["value"] == f"{resumed}: star (finished)" and "**finished**" in progress  # the status shows in the box
    saved = files["choices"][-1]
    assert saved.endswith("star.safetensors") and picked.shown_file == saved  # the box holds the newest file
    picked.file = saved
    _, _, _, _, _, files, *_ = train_tab.poll(services, views, picked)
    assert "value" not in files  # the file the user picked stays picked


def test_what_start_would_refuse_is_said_by_validate_and_start_never_fails_without_a_sentence(services, tmp_path):
    """A folder of loose images (no <repeats>_<name> folder) passed Validate, then Start raised a bare error."""
    loose = SAMPLE_DATASET / next(p.name for p in SAMPLE_DATASET.iterdir() if p.is_dir())
    text = train_tab.validation_text(services, form(dataset=str(loose)))
    assert text.startswith("**Cannot start:**"), text
    message, job_id = train_tab.submit(services, form(dataset=str(loose)))
    assert message.startswith("**Cannot start:**") and job_id is None
    # a typed resolution the sample prompt cannot read: a sentence, not a ValueError
    assert "give \"512\" or \"768,512\"" in train_tab.validation_text(services, form(resolution="768x512"))


def test_paths_in_advanced_lie_in_the_allowed_folders_and_the_forms_own_are_set_by_the_form(services, tmp_path):
    """On a WebUI shared with --listen this tab is served to others: Advanced must not reach other folders, and a
    train_data_dir there would train another folder than the one Validate checked."""
    for extra, said in (('logging_dir = "/tmp/anywhere"', "outside the allowed folders"),
                        ('sample_prompts = "/etc/hostname"', "outside the allowed folders"),
                        (f'train_data_dir = "{tmp_path}"', "train_data_dir is set by Dataset folder")):
        text = train_tab.validation_text(services, form(extra=extra))
        assert text.startswith("**Cannot start:**") and said in text, (extra, text)


def test_an_sdxl_base_at_the_presets_512_px_is_warned_about(services, monkeypatch):
    """A resolution typed or imported for SD1 (512): an SDXL run there silently trained at 512. On 6 GB the tier's 640
    is what to set (1024 is above the card)."""
    monkeypatch.setattr(train_tab, "_is_sdxl", lambda path: True)
    assert "The base model is SDXL, which is trained at 1024 px, and Resolution is 512" in \
        train_tab.validation_text(services, form(resolution="512"))
    assert "trained at 1024 px" not in train_tab.validation_text(services, form(resolution="1024"))
    assert ("The base model is SDXL, which the 6 GB GPU memory tier trains at 640 px, and Resolution is 512: set 640 (or "
            "640,480 …)") in train_tab.validation_text(services, form(resolution="512", tier="6 GB"))
    assert "The base model is SDXL" not in train_tab.validation_text(services, form(resolution="640", tier="6 GB"))


def test_a_kohya_gui_file_s_off_values_stay_off_on_import(tmp_path):
    """The GUI saves shuffle_caption: false, min_snr_gamma: 0 … and leaves them out of sd-scripts' command; the
    preset turned them back on at Start (min_snr_gamma 5, shuffle_caption, save_state, a warm-up)."""
    import toml

    config = tmp_path / "gui.json"
    config.write_text('{"LoRA_type": "Standard", "pretrained_model_name_or_path": "base.safetensors", "epoch": 4, '
                      '"max_resolution": "512,512", "optimizer": "AdamW", "shuffle_caption": false, "keep_tokens": "0", '
                      '"min_snr_gamma": 0, "save_state": false, "lr_warmup": 0, "lr_scheduler": "cosine", "seed": ""}',
                      encoding="utf-8")
    values = train_tab.import_into_form(str(config))
    advanced = toml.loads(values[-2])
    assert advanced["shuffle_caption"] is False and advanced["save_state"] is False
    assert advanced["min_snr_gamma"] == 0 and advanced["keep_tokens"] == 0 and advanced["lr_warmup_steps"] == 0
    assert "seed" not in advanced  # "" is unset in the GUI too: the preset's seed may apply
    for option in ("min_snr_gamma", "shuffle_caption", "save_state", "keep_tokens", "lr_warmup_steps"):
        assert f"{option} =" not in values[-1].split("preset adds", 1)[-1] or "preset adds" not in values[-1]


def test_the_import_fills_the_components_its_values_are_for(services):
    """import_into_form answers by position: the upload's outputs must be those components in IMPORTED_FIELDS' order
    (the Algorithm and Sample prompt fields were added to both)."""
    blocks = train_tab.build(services)
    config = blocks.get_config_file() if hasattr(blocks, "get_config_file") else blocks.config
    elem_ids = {component["id"]: component.get("props", {}).get("elem_id") for component in config["components"]}
    upload = next(dep for dep in config["dependencies"]
                  if any(elem_ids.get(target[0] if isinstance(target, (list, tuple)) else target) == "lora_trainer_import"
                         for target in dep.get("targets", [])))
    short = {"network_dim": "dim", "network_alpha": "alpha", "text_encoder_lr": "te_lr",
             "save_every_n_epochs": "save_every", "sample_every_n_epochs": "sample_every"}
    assert [elem_ids[output] for output in upload["outputs"]] == [
        *(f"lora_trainer_{short.get(field, field)}" for field in train_tab.IMPORTED_FIELDS), None]  # and the Filled state
    assert upload["outputs"][-1] in upload["inputs"]  # the state the fill handlers read


# The GUI's own preset "SDXL - LoRA AI_Now ADamW v1.0" (presets/lora), as a user saves it from the GUI: with the
# folders every save has (another machine's), and its numbers as text
GUI_SAVE = {
    "LoRA_type": "Standard", "adaptive_noise_scale": 0, "additional_parameters": "", "block_alphas": "", "block_dims": "",
    "bucket_no_upscale": True, "bucket_reso_steps": 64, "cache_latents": True, "cache_latents_to_disk": True,
    "caption_extension": ".txt", "clip_skip": "1", "enable_bucket": True, "epoch": 160, "gradient_accumulation_steps": 1,
    "gradient_checkpointing": True, "keep_tokens": "0", "learning_rate": 0.0001, "logging_dir": "D:\\kohya\\logs",
    "lora_network_weights": "", "lr_scheduler": "constant", "lr_scheduler_num_cycles": "", "lr_warmup": 0,
    "max_resolution": "1024,1024", "max_train_epochs": "", "max_train_steps": "320", "min_snr_gamma": 0,
    "mixed_precision": "bf16", "model_list": "custom", "network_alpha": 256, "network_dim": 256,
    "noise_offset_type": "Original", "noise_offset": 0.0357, "optimizer": "AdamW", "optimizer_args": "",
    "output_dir": "D:\\kohya\\model", "output_name": "ai_now", "pretrained_model_name_or_path": "D:\\models\\sdxl.safetensors",
    "reg_data_dir": "", "save_every_n_epochs": 10, "save_precision": "bf16", "sdxl": True, "seed": "12345",
    "shuffle_caption": False, "text_encoder_lr": 0.0001, "train_batch_size": 1, "train_data_dir": "D:\\kohya\\img",
    "unet_lr": 0.0001, "xformers": "xformers",
}


def test_a_kohya_gui_save_imports_into_a_form_that_starts(services, tmp_path):
    """Every GUI save has output_dir: it landed in Advanced, and Start refused it ("output_dir is set by the Lora
    folder"); a file counting steps kept the form's epochs, which override steps (80 steps trained of 320)."""
    import toml

    config = tmp_path / "SDXL - LoRA AI_Now ADamW v1.0.json"
    config.write_text(json.dumps(GUI_SAVE, indent=2), encoding="utf-8")
    values = train_tab.import_into_form(str(config), "character", services.settings)
    said = values[-1]
    assert f"output_dir D:\\kohya\\model is not used: files go to the Lora folder {services.settings.lora_folder}" in said
    assert "logging_dir D:\\kohya\\logs is not used: it is outside the folders this tab may write to" in said
    assert "Epochs is cleared: the file counts max_train_steps = 320" in said
    advanced = toml.loads(values[-2])
    assert not {"output_dir", "logging_dir"} & set(advanced)
    assert advanced["seed"] == 12345 and advanced["max_train_steps"] == 320  # numbers, not the GUI's text
    epochs = values[train_tab.IMPORTED_FIELDS.index("epochs")]
    assert isinstance(epochs, dict) and "value" in epochs and epochs["value"] is None  # cleared, not left as it was
    imported = imported_form(values, resolution="64")
    assert imported["epochs"] is None
    text = train_tab.validation_text(services, imported)
    assert not text.startswith("**Cannot start:**"), text
    options, _ = train_tab.job_options(services, imported)
    assert options["max_train_steps"] == 320 and "max_train_epochs" not in options  # the preset's 10 epochs too
    assert options["output_dir"] == str(services.settings.lora_folder)
    # a number typed in Epochs afterwards counts, as sd-scripts' epochs win over steps
    assert train_tab.job_options(services, imported_form(values, resolution="64", epochs=3))[0]["max_train_epochs"] == 3


def test_validate_counts_the_regularisation_images_of_advanced_s_reg_data_dir(services):
    """The trainer adds the reg images up to the training samples (batches per epoch about doubled); Validate's
    step count left them out."""
    from PIL import Image

    reg = services.settings.data_folder / "reg" / "1_person"
    reg.mkdir(parents=True)
    for index in range(5):
        Image.new("RGB", (64, 64), (index * 40, 90, 160)).save(reg / f"{index}.png")
    plain = train_tab.validation_text(services, form())
    assert "160 samples per epoch (with repeats) → 40 steps per epoch × 2 epochs = 80 steps" in plain, plain
    text = train_tab.validation_text(services, form(extra=f'reg_data_dir = "{reg.parent.as_posix()}"'))
    assert ("320 samples per epoch (with repeats; 160 of them regularisation images) → 80 steps per epoch × 2 epochs "
            "= 160 steps") in text, text


def test_the_check_button_names_a_few_files_of_each_kind_of_finding(services, tmp_path):
    """The report box showed every size and every finding: thousands of lines for a folder of phone photos."""
    from PIL import Image

    folder = tmp_path / "mine"
    (folder / "10_zkstar").mkdir(parents=True)
    for index in range(8):  # 16×16 pictures: each is enlarged 4× to 64 px and said too small
        Image.new("RGB", (16, 16), (30 * index, 90, 160)).save(folder / "10_zkstar" / f"{index}.png")
    services.settings.dataset_roots.append(tmp_path)
    text = train_tab.check_dataset_text(services, form(dataset=str(folder)))
    assert text.count("too-small") == 6 and "too-small            … and 3 more (8 in all)" in text
