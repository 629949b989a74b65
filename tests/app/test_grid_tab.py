"""The Prompt-Lora-Grid tab's handlers, called as the buttons call them, on a host that records its calls."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_trainer.app.ui import grid_tab
from lora_trainer.grid.bench import make_epoch_files

SETTINGS = dict(prompt="zkstar", negative="", seed=5, sampler="Euler", steps=4, width=64, height=64, cfg=5.0, checkpoint="")


@pytest.fixture
def run(services):
    make_epoch_files(services.settings.lora_folder, "tinylora", epochs=2)
    return "tinylora"


def generate(services, run, x_kind="strength", x_values="0.5-1.0 (+0.5)", y_kind="epoch", y_values="", strength=1.0,
             confirmed=False, session=None, **changes):
    values = {**SETTINGS, **changes}
    tab = {"session": session} if session is not None else {}
    return grid_tab.generate_grid(services, run, x_kind, x_values, y_kind, y_values, strength, values["prompt"],
                                  values["negative"], values["seed"], values["sampler"], values["steps"], values["width"],
                                  values["height"], values["cfg"], values["checkpoint"], True, confirmed, **tab)


def test_runs_are_listed_and_an_epoch_by_strength_grid_goes_through_the_host(services, fake_host, run):
    assert grid_tab.training_runs(services) == ["tinylora"]
    lora = services.settings.lora_folder
    shutil.copy(lora / "tinylora.safetensors", lora / "tinylora-step00000185.safetensors")  # a --save_every_n_steps file
    assert grid_tab.training_runs(services) == ["tinylora"]  # part of the run, not a run of its own
    (lora / "tinylora-step00000185.safetensors").unlink()
    assert "epoch 1 (10 steps) — val loss 0.1500" in grid_tab.run_summary(services, run)
    path, cells, losses, epochs, status = generate(services, run)
    assert Path(path).is_file() and Path(path).parent == services.settings.grids_folder
    prompts = [settings.prompt for settings, _ in fake_host.generated]
    # the baseline is the same image in every row: generated once
    assert prompts == ["zkstar", "zkstar <lora:tinylora-000001:0.5>", "zkstar <lora:tinylora-000001:1>",
                       "zkstar <lora:tinylora:0.5>", "zkstar <lora:tinylora:1>"]
    assert {settings.seed for settings, _ in fake_host.generated} == {5}
    assert len(cells) == 6 and "Grid saved" in status
    assert losses.values.tolist()[0][0] == "tinylora-000001" and losses.values.tolist()[0][3] == "★ recommended"
    assert epochs["value"].endswith("tinylora-000001.safetensors") and len(epochs["choices"]) == 2
    # the run's own tag in the prompt (from txt2img, or the Prompt S/R habit) is taken out, and the status says so
    status = generate(services, run, prompt="zkstar <lora:tinylora:0.8>")[4]
    assert "took <lora:tinylora:0.8> out of the prompt" in status, status


def test_a_run_given_as_a_lora_tag_draws_at_its_weight_once_the_strength_field_is_cleared(services, fake_host, run):
    """The tab always sent a strength (1 when the field was cleared), so a pasted <lora:name:0.7> was refused with
    "give one of them" whatever the user did."""
    status = generate(services, "<lora:tinylora:0.7>", x_kind="seed", x_values="5", y_kind="epoch", strength=1.0)[4]
    assert status == "⚠ strength: 1, and <lora:tinylora:0.7> says 0.7: give one of them and leave the other out"
    assert "Grid saved" in generate(services, "<lora:tinylora:0.7>", x_kind="seed", x_values="5", y_kind="epoch",
                                    strength=None)[4]
    assert [settings.prompt for settings, _ in fake_host.generated][1:] == [
        "zkstar <lora:tinylora-000001:0.7>", "zkstar <lora:tinylora:0.7>"]


def test_mistakes_and_interrupts_are_reported_in_the_status(services, fake_host, run):
    assert "does not occur in the prompt" in generate(services, run, x_kind="prompt", x_values="cat, dog")[4]
    assert "no LoRA named" in generate(services, "nosuch")[4]
    assert generate(services, run, width=100)[4] == "⚠ Width: 100 is not a multiple of 8 (the image's sides must be); give 96 or 104"
    assert not fake_host.generated  # refused before the first image
    fake_host.interrupt_after = 2
    assert generate(services, run)[4].startswith("Interrupted")
    assert grid_tab.interrupt(services, {}) == "No grid of this tab is being generated: nothing to interrupt."


def test_labels_no_installed_font_draws_are_said_in_the_status(services, fake_host, run, monkeypatch):
    """The tab said "Grid saved" over a grid of boxes: only the server's log (once a process) said why."""
    from lora_trainer.grid import render

    monkeypatch.setattr(render, "system_fallback_fonts", lambda: ())
    monkeypatch.setattr(render, "_said_no_font", ["an earlier grid's labels"])
    status = generate(services, run, x_kind="prompt", x_values="蓝色背景, 红色背景", prompt="zkstar, 蓝色背景")[4]
    assert "Grid saved" in status and "⚠ no font installed here draws 蓝色背景红 of the grid's labels" in status, status


def test_promote_writes_the_file_and_the_preferred_weight(services, fake_host, run):
    assert grid_tab.preferred_weight(services, run) == 1.0  # no card yet
    (services.settings.lora_folder / "tinylora.json").write_text('{"preferred weight": 0.7}', encoding="utf-8")
    assert grid_tab.preferred_weight(services, run) == 0.7  # the preset's card weight is Promote's default
    epoch_file = str(services.settings.lora_folder / "tinylora-000001.safetensors")
    message = grid_tab.promote_epoch(services, epoch_file, "", 0.8)
    target = services.settings.lora_folder / "tinylora.safetensors"
    assert "Promoted" in message and target.read_bytes() == Path(epoch_file).read_bytes()
    assert json.loads(target.with_suffix(".json").read_text(encoding="utf-8"))["preferred weight"] == 0.8
    assert ("refresh_loras", ()) in fake_host.calls
    assert "Generate a grid first" in grid_tab.promote_epoch(services, "", "", 1.0)


def test_the_tab_builds_with_the_host_defaults_and_samplers(services, fake_host):
    import gradio as gr

    with gr.Blocks() as demo:
        assert grid_tab.build(services) is not None
    assert ("generation_defaults", ()) in fake_host.calls
    sampler = next(b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Sampler")
    names = [c[0] if isinstance(c, tuple) else c for c in sampler.choices]  # gradio 4 keeps (name, value) pairs
    assert names == ["Euler a", "Euler", "DPM++ 2M Karras"]  # the host's list, its default sampler first


def test_axis_values_are_split_and_ranged_as_the_xyz_plot_does(services, fake_host, run):
    """Quoted values keep their commas (every axis), the epoch and seed axes take whole-number ranges, and Prompt S/R
    replaces in the negative prompt too."""
    status = generate(services, run, x_kind="prompt", x_values='"1girl, standing", "1girl, sitting"', y_values="2",
                      prompt="1girl, standing, park", negative="blurry, 1girl, standing")[4]
    assert "Grid saved" in status
    sent = [(settings.prompt, settings.negative_prompt) for settings, _ in fake_host.generated]
    assert sent[-1] == ("1girl, sitting, park <lora:tinylora:1>", "blurry, 1girl, sitting")
    fake_host.calls.clear()
    assert "Grid saved" in generate(services, run, x_values='"0.5"', y_values="1-2")[4]
    assert [settings.prompt for settings, _ in fake_host.generated][1:] == [
        "zkstar <lora:tinylora-000001:0.5>", "zkstar <lora:tinylora:0.5>"]
    fake_host.calls.clear()
    assert "Grid saved" in generate(services, run, x_kind="seed", x_values="3-9 [3], 20-22 (+2)", y_values="2")[4]
    assert [settings.seed for settings, _ in fake_host.generated] == [5, 3, 6, 9, 20, 22]
    fake_host.calls.clear()
    status = generate(services, run, x_kind="prompt", x_values="smile, frown", y_values="2", negative="smile")[4]
    assert "Grid saved" in status and fake_host.generated[-1][0].negative_prompt == "frown"


def test_a_decimal_comma_and_numbers_no_lora_takes_are_refused(services, fake_host, run):
    assert "for 0.8 write a point (0.8)" in generate(services, run, x_values="0,8")[4]
    assert "'nan' is not a strength" in generate(services, run, x_values="0.5, nan")[4]
    assert "'inf' is not a strength" in generate(services, run, x_values="inf")[4]
    assert not fake_host.generated


def test_seed_minus_one_is_drawn_once_per_value_and_shown(services, fake_host, run):
    path, _, _, _, status = generate(services, run, x_kind="seed", x_values="-1, -1", y_values="2")
    seeds = [settings.seed for settings, _ in fake_host.generated][1:]  # after the baseline
    assert len(set(seeds)) == 2 and -1 not in seeds
    from PIL import Image

    assert f'Grid X Values: "-1, -1", Grid Fixed X Values: "{seeds[0]}, {seeds[1]}"' in Image.open(path).text["parameters"]


def test_strength_zero_where_no_axis_sets_it_stays_zero(services, fake_host, run):
    assert "Grid saved" in generate(services, run, x_kind="seed", x_values="1", y_values="2", strength=0)[4]
    assert fake_host.generated[-1][0].prompt == "zkstar <lora:tinylora:0>"


def test_a_grid_over_the_megapixel_limit_is_refused_before_any_image(services, fake_host, run):
    status = generate(services, run, x_values="0-1 [100]", width=1024, height=1024, confirmed=True)[4]
    assert "2 × 101 images of 1024×1024: 212 megapixels, over the limit of 200" in status
    assert not fake_host.generated
    fake_host.max_image_megapixels = lambda: 0.01  # the WebUI's "Maximum image size", lowered
    assert "over the limit of 0.01" in generate(services, run)[4]


def test_interrupt_stops_the_grid_of_the_tab_that_pressed_it(services, fake_host, run):
    tab_a, tab_b = {}, {}
    generate_cell = fake_host.generate
    pressed = []

    def generate_pressing(settings, checkpoint=None, progress=None):
        if not pressed:  # during tab A's first cell
            pressed.append(grid_tab.interrupt(services, tab_b))  # tab B has no grid running: A's goes on
        return generate_cell(settings, checkpoint, progress)

    fake_host.generate = generate_pressing
    assert "Grid saved" in generate(services, run, session=tab_a)[4] and pressed[0].startswith("No grid")
    assert len(fake_host.generated) == 5 and tab_a == {}

    fake_host.calls.clear()
    pressed.clear()

    def generate_pressing(settings, checkpoint=None, progress=None):
        if not pressed:
            pressed.append(grid_tab.interrupt(services, tab_a))  # tab A's own Interrupt
            pressed.append(generate(services, run, x_values="1", y_values="2", session=tab_b)[4])  # B's Generate
        return generate_cell(settings, checkpoint, progress)

    fake_host.generate = generate_pressing
    status = generate(services, run, session=tab_a)[4]
    assert pressed[0].startswith("Interrupting") and "Grid saved" in pressed[1]  # B's grid ran, A's flag stayed
    assert status.startswith("Interrupted after 1 of 5 distinct images")


def test_a_tab_without_a_grid_stops_another_tabs_grid_when_pressed_twice(services, fake_host, run):
    """A grid started in a tab since reloaded (its stop flag gone with the page) held the generator until it ended."""
    generate_cell, pressed, other_tab = fake_host.generate, [], {}

    def generate_pressing(settings, checkpoint=None, progress=None):
        if not pressed:  # during the first cell, a reloaded tab presses Interrupt twice
            pressed.append(grid_tab.interrupt(services, other_tab))
            pressed.append(grid_tab.interrupt(services, other_tab))
        return generate_cell(settings, checkpoint, progress)

    fake_host.generate = generate_pressing
    status = generate(services, run, session={})[4]
    assert "press Interrupt again within 10 s to stop it" in pressed[0]
    assert pressed[1].startswith("Interrupting the grid another tab started")
    assert status.startswith("Interrupted after 1 of 5 distinct images")
    assert grid_tab.interrupt(services, other_tab) == "No grid of this tab is being generated: nothing to interrupt."


def test_the_apps_exit_stops_a_tabs_grid_after_the_image_being_drawn(services, fake_host, run):
    """Ctrl-C or SIGTERM to the app while a tab drew a grid: its worker thread, which Python waits for, drew every
    image left before the app could exit."""
    generate_cell, said = fake_host.generate, []

    def generate_exiting(settings, checkpoint=None, progress=None):
        if not said:  # the app is told to stop during the first image
            said.extend(grid_tab.stop_every_grid(services.settings.grids_folder))
        return generate_cell(settings, checkpoint, progress)

    fake_host.generate = generate_exiting
    path, _, _, _, status = generate(services, run, session={})
    assert status.startswith("Interrupted after 1 of 5 distinct images") and Path(path).is_file()
    assert said == [f"a Grid tab's grid stops after the image being drawn, then saves the images drawn by then (if any) in "
                    f"{services.settings.grids_folder}"]
    assert grid_tab.stop_every_grid(services.settings.grids_folder) == []  # none drawing: nothing to say


def test_a_grid_left_on_the_current_model_is_checked_against_the_model_the_host_has_loaded(services, fake_host):
    """The tab passed no current checkpoint: an SDXL LoRA on the loaded SD1 model drew every cell as the baseline."""
    import torch
    from safetensors.torch import save_file

    from lora_trainer.tiny_model.build import TINY_MODEL_PATH

    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": torch.ones(())},
              str(services.settings.lora_folder / "xl.safetensors"))
    fake_host.loaded_checkpoint = TINY_MODEL_PATH
    status = generate(services, "xl", x_values="1", y_kind="seed", y_values="1")[4]
    assert "xl.safetensors is an SDXL LoRA and the checkpoint tiny-sd.safetensors is SD1" in status
    assert not fake_host.generated


def test_a_run_renamed_after_training_is_one_run_in_the_list_and_promote_suggests_its_name(services, fake_host):
    """char_v2 (trained as char) was listed beside char-000001 … as runs of their own, and Promote suggested 'char'."""
    lora = services.settings.lora_folder
    make_epoch_files(lora, "char", epochs=3)
    (lora / "char.safetensors").rename(lora / "char_v2.safetensors")
    assert grid_tab.training_runs(services) == ["char_v2"]
    message = grid_tab.promote_epoch(services, str(lora / "char-000002.safetensors"), "", 0.8)
    assert f"to {lora / 'char_v2.safetensors'}" in message, message


def test_the_grid_finds_runs_as_the_host_lists_loras(services):
    """The WebUI's "Load models/files in hidden directories" off: <lora:x> does not see Lora/.old/x, so neither may
    the grid (it read that file's epochs and drew the images with another x)."""
    import torch
    from safetensors.torch import save_file

    hidden = services.settings.lora_folder / ".old" / "x.safetensors"
    hidden.parent.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(hidden))
    assert grid_tab.library_of(services).resolve("x") == hidden  # the WebUI's default, and the standalone app's
    services.host.list_hidden_files = False
    assert grid_tab.library_of(services).resolve("x") is None
