"""What the Train tab shows a user, pinned where a mutation review of its handlers (``app/ui/train_tab.py``) and the
live view (``app/ui/live.py``) found nothing noticing a change: the progress line, the loss plot, the boxes a poll
fills, the messages of Start, Validate, Check, the job buttons, the import and the exports."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from lora_trainer.app import presets
from lora_trainer.app.services import Services
from lora_trainer.app.settings import AppSettings
from lora_trainer.app.ui import train_tab
from lora_trainer.app.ui.live import loss_plot, progress_text, view_of
from lora_trainer.tiny_model.demo import SAMPLE_DATASET
from test_train_tab import FAKE_TRAINER, GUI_SAVE, FakeHost, form

STEPS = [{"event": "start"}, *({"event": "step", "step": s, "total": 10, "epoch": 1, "loss": 1.0 / s, "average": 0.5,
                                "lr": [1e-4], "seconds": 0.5} for s in range(1, 5))]


# --- the live view ---------------------------------------------------------------------------------------------------

def test_the_trainers_warnings_show_under_the_progress_line_the_latest_five():
    """The trainer says what it changed or could not do as warning events (a file another program held saved under
    another name, a sample prompt that failed, an earlier run's files moved aside): the view kept them and the tab
    never showed them."""
    held = ("star.safetensors is held by another program. Saved as star (1).safetensors instead: rename it once that "
            "program lets go of the file")
    text = progress_text(view_of([*STEPS, {"event": "warning", "message": held}], "running"))
    assert text.startswith("**running** · step 4/10") and f"\n\n⚠ {held}" in text
    failed = [{"event": "warning", "message": f"sample prompt {n} at step 4 failed (OSError: disk full)"}
              for n in range(1, 9)]
    for status in ("running", "paused", "finished"):
        text = progress_text(view_of([*STEPS, *failed], status))
        assert [line for line in text.split("\n\n") if line.startswith("⚠")] == [
            f"⚠ sample prompt {n} at step 4 failed (OSError: disk full)" for n in range(4, 9)], text
        assert "3 earlier warnings are in the job's events.jsonl (its folder)" in text


def test_an_sd_scripts_backend_run_shows_its_average_loss_in_the_progress_line():
    """sd-scripts prints only its running average (avr_loss), which the plot drew and the progress line left out: a
    --backend run showed no loss number at all."""
    steps = [{"event": "step", "step": s, "total": 6, "epoch": 1, "average": 0.5 / s, "seconds": 1.0} for s in (1, 2)]
    text = progress_text(view_of([{"event": "start", "backend": "sd-scripts"}, *steps], "running"))
    assert "step 2/6 (33%) · epoch 1 · 1.00 it/s · ETA 0:04 · avg loss 0.2500" in text, text


def test_the_eta_goes_at_the_pace_since_the_first_step_saves_and_samples_included():
    """A step's own seconds leave out what falls due between steps (a save, a sample): the time left is read from
    the steps' times since the first, 1 s a step here where each step alone took 0.5 s."""
    steps = [{"event": "step", "step": s, "total": 100, "loss": 0.1, "seconds": 0.5, "time": 1000.0 + (s - 1)}
             for s in range(1, 6)]
    view = view_of(steps, "running")
    assert view.eta_seconds == 95.0 and "2.00 it/s · ETA 1:35" in progress_text(view)


def test_the_speed_follows_the_latest_steps_at_a_fifth_each():
    """it/s is an average of the step times from the second on, the latest step weighing a fifth."""
    times = [60.0, 0.5, 1.0]  # the first warms up; 0.8 × 0.5 + 0.2 × 1.0 = 0.6 s a step
    view = view_of([{"event": "step", "step": s, "total": 10, "loss": 0.1, "seconds": seconds}
                    for s, seconds in enumerate(times, 1)], "running")
    assert "1.67 it/s" in progress_text(view)


def test_the_progress_line_shows_the_current_loss_average_and_memory():
    events = [{"event": "step", "step": s, "total": 10, "epoch": 1, "loss": 1.0 / s, "average": 0.9 - 0.1 * s,
               "lr": [1e-4], "memory_mib": 1024.0 * s} for s in range(1, 4)]
    text = progress_text(view_of(events, "running"))
    assert "loss 0.3333 (avg 0.6000)" in text and "memory 3.0 GiB" in text, text
    assert "memory 3.0 GiB" in progress_text(view_of([{**events[-1], "memory_mib": 3072.0}], "running"))


def _polyline_points(svg: str) -> dict[str, list[tuple[float, float]]]:
    return {name: [tuple(map(float, point.split(","))) for point in points.split()]
            for name, points in re.findall(r'<polyline class="(\w+)"[^>]* points="([^"]+)"', svg)}


def test_the_plots_step_axis_runs_to_the_runs_last_step_not_the_current_one():
    """At step 4 of 10 the curve covers 40 % of the plot's width, so the width left shows the steps left."""
    svg = loss_plot(view_of(STEPS, "running"))
    left, right = 36, 640 - 8
    assert [x for x, _ in _polyline_points(svg)["loss"]] == [round(left + (right - left) * s / 10, 1) for s in (1, 2, 3, 4)]
    assert "step 0 … 10" in svg


def test_the_plots_legend_matches_its_colours():
    """The legend says light: loss, dark: average."""
    svg = loss_plot(view_of(STEPS, "running"))
    colours = dict(re.findall(r'<polyline class="(\w+)"[^>]* stroke="#(\w{6})"', svg))

    def lightness(colour: str) -> int:
        return sum(int(colour[i:i + 2], 16) for i in (0, 2, 4))

    assert "light: loss  dark: average" in svg and lightness(colours["loss"]) > lightness(colours["average"])


def test_a_run_of_5000_steps_draws_at_most_two_points_a_pixel_column():
    """Each poll sends the plot to every open Train tab: a few thousand steps are thinned too, not only 90,000."""
    view = view_of([{"event": "step", "step": s, "total": 5000, "loss": 0.1 + (s % 7) / 60} for s in range(1, 5001)],
                   "running")
    assert len(_polyline_points(loss_plot(view))["loss"]) <= 2 * (640 - 8 - 36) + 1


def test_a_stopped_job_notifies_as_a_finished_one_does_and_a_running_one_does_not(services):
    job = services.store.add("star", {})
    assert train_tab.end_notice(job) == ""  # queued
    for status in ("running", "stopped", "finished"):
        job = services.store.update(job.id, status=status)
        assert train_tab.end_notice(job) == ("" if status == "running" else f"Job {job.id} (star) {status}")


def test_the_progress_bar_is_as_wide_as_the_steps_done():
    assert 'style="width:40.0%"' in train_tab.progress_html(view_of(STEPS, "running"))


# --- the poll: what the boxes hold -------------------------------------------------------------------------------------

@pytest.fixture
def services(tmp_path):
    settings = AppSettings(lora_folder=tmp_path / "Lora", data_folder=tmp_path / "data",
                           dataset_roots=[SAMPLE_DATASET, tmp_path / "sets"], unload_checkpoint_while_training=False)
    services = Services.create(settings, FakeHost(), start=False,
                               command=lambda job: [sys.executable, "-c", FAKE_TRAINER, str(job.config_path)])
    yield services
    services.close()


def _job_with_events(services: Services, name: str, events: list[dict], status: str = "running"):
    job = services.store.add(name, {})
    job.events_path.write_text("".join(json.dumps(event) + "\n" for event in events), encoding="utf-8")
    return services.store.update(job.id, status=status)


def _poll(services, views, picked) -> dict:
    names = ("job", "progress", "bar", "plot", "samples", "files", "jobs", "ended")
    return dict(zip(names, train_tab.poll(services, views, picked)))


def test_polls_list_each_saved_file_and_loss_once(services):
    """A poll reads the events written since the last one: a page open for a while must not list a file twice."""
    _, job_id = train_tab.submit(services, form())
    services.runner.run_next()
    views, picked = train_tab.LiveViews(), train_tab.Picked()
    for _ in range(3):
        shown = _poll(services, views, picked)
    saved = str(services.settings.lora_folder / "star.safetensors")
    assert shown["files"]["choices"] == [saved] and len(_polyline_points(shown["plot"])["loss"]) == 4
    assert "step 4/4 (100%)" in shown["progress"] and shown["ended"] == f"Job {job_id} (star) finished"


def test_with_nothing_picked_the_running_job_shows_not_the_newest_queued_one(services):
    running = train_tab.submit(services, form())[1]
    queued = train_tab.submit(services, form(output_name="star2"))[1]
    services.store.update(running, status="running")
    shown = _poll(services, train_tab.LiveViews(), train_tab.Picked())
    assert shown["job"]["value"] == f"{running}: star (running)" and shown["progress"].startswith("**running**")
    assert shown["job"]["choices"] == [f"{queued}: star2 (queued)", f"{running}: star (running)"]
    assert [row[:3] for row in shown["jobs"].values.tolist()] == [[queued, "star2", "queued"], [running, "star", "running"]]
    assert list(shown["jobs"].columns) == train_tab.JOB_COLUMNS


def test_the_job_table_keeps_its_column_names_without_jobs(services):
    shown = _poll(services, train_tab.LiveViews(), train_tab.Picked())
    assert shown["progress"] == "No jobs yet: fill the form and press Start."
    assert list(shown["jobs"].columns) == train_tab.JOB_COLUMNS and shown["jobs"].empty


def test_the_newest_saved_file_and_the_latest_eight_samples_show(services):
    saved = [f"/loras/star-{epoch:06d}.safetensors" for epoch in (1, 2, 3)]
    samples = [f"/loras/sample/star_e{epoch:06d}.png" for epoch in range(1, 11)]
    job = _job_with_events(services, "star", [*({"event": "saved", "path": path} for path in saved),
                                              *({"event": "sample", "path": path} for path in samples)])
    shown = _poll(services, train_tab.LiveViews(), train_tab.Picked())
    assert shown["job"]["value"] == f"{job.id}: star (running)"
    assert shown["files"] == {**shown["files"], "choices": saved, "value": saved[-1]}
    assert shown["samples"] == samples[2:]


def test_a_job_picked_after_a_file_was_shows_its_own_newest_file(services):
    """A run of the same name writes the same file names: the file picked in the earlier job's list must not stay
    picked in the new one's, where the newest is shown."""
    saved = [{"event": "saved", "path": f"/loras/star-{epoch:06d}.safetensors"} for epoch in (1, 2)]
    first = _job_with_events(services, "star", saved, "finished")
    second = _job_with_events(services, "star", saved, "finished")
    views, picked = train_tab.LiveViews(), train_tab.Picked()
    picked.choose_job(train_tab.job_label(first))
    _poll(services, views, picked)
    picked.file = "/loras/star-000001.safetensors"  # the user's pick in the first job's list
    _poll(services, views, picked)
    picked.choose_job(train_tab.job_label(second))
    assert _poll(services, views, picked)["files"]["value"] == "/loras/star-000002.safetensors"


# --- Validate, Start and Check --------------------------------------------------------------------------------------

def _damaged_copy(services, tmp_path, damaged: int) -> Path:
    folder = tmp_path / "sets" / "stars"
    shutil.copytree(SAMPLE_DATASET, folder)
    for image in sorted(folder.rglob("*.png"))[:damaged]:
        image.write_bytes(b"not a png")
    return folder


def test_a_dataset_with_damaged_images_cannot_start_and_validate_names_three_of_them(services, tmp_path):
    folder = _damaged_copy(services, tmp_path, 4)
    text = train_tab.validation_text(services, form(dataset=str(folder)))
    assert text.startswith("**Cannot start:** 10_zkstar/star_000.png: "), text
    assert [name for name in (f"10_zkstar/star_00{n}.png:" for n in range(4)) if name in text] == [
        "10_zkstar/star_000.png:", "10_zkstar/star_001.png:", "10_zkstar/star_002.png:"]
    message, job_id = train_tab.submit(services, form(dataset=str(folder)))
    assert (message, job_id) == (text, None) and services.store.all() == []


def test_start_says_where_the_job_goes_and_what_the_preset_weights_its_card(services):
    message, job_id = train_tab.submit(services, form(preset="style"))
    assert message.startswith(f"Job {job_id} (star) starting.\n\n") and "16 images" in message
    card = json.loads((services.store.get(job_id).folder / "card.json").read_text(encoding="utf-8"))
    assert card == {"preferred_weight": presets.PRESETS["style"].preferred_weight} != {"preferred_weight": 0.7}


def test_check_says_a_folder_outside_the_allowed_ones_and_reads_the_tiers_batch_size_when_the_field_is_empty(
        services, tmp_path):
    assert train_tab.check_dataset_text(services, form(dataset=str(tmp_path))).startswith(
        f"error: dataset folder: {tmp_path} is outside the allowed folders")
    text = train_tab.check_dataset_text(services, form(batch_size=None, tier="6 GB"))
    assert "batch size 1" in text and "steps per epoch at batch size 1: 160" in text, text


def test_the_sample_prompt_is_drawn_at_the_training_width_and_height_unless_it_gives_one(services):
    options, _ = train_tab.job_options(services, form(resolution="768,512", sample_prompt="zkstar\nzkstar, smiling --h 640"))
    assert Path(options["sample_prompts"]).read_text(encoding="utf-8").splitlines() == [
        "zkstar --w 768 --h 512", "zkstar, smiling --h 640"]


# --- the job buttons ------------------------------------------------------------------------------------------------

def test_resume_without_a_job_picked_resumes_the_newest_paused_stopped_or_interrupted_one(services):
    older, newer, finished = (train_tab.submit(services, form())[1] for _ in range(3))
    for _ in range(3):
        services.runner.run_next()
    services.store.update(older, status="interrupted")
    services.store.update(newer, status="stopped")
    assert services.store.get(finished).status == "finished" and services.store.get(finished).last_state
    text, resumed = train_tab.job_action(services, "resume", None)
    assert text.startswith(f"Job {resumed} resumes job {newer} from its last state."), text


def test_stop_of_a_queued_job_says_it_is_stopped_and_save_and_sample_say_what_comes(services):
    _, queued = train_tab.submit(services, form())
    assert train_tab.job_action(services, "stop", queued) == (f"Job {queued} is stopped.", queued)
    running = services.store.update(train_tab.submit(services, form())[1], status="running").id
    assert train_tab.job_action(services, "save", running) == (f"Job {running}: saving after the current step.", running)
    assert train_tab.job_action(services, "sample", running) == (
        f"Job {running}: drawing samples after the current step.", running)


def _handler(blocks, elem_id: str, trigger: str = "click"):
    """The function gradio runs for ``elem_id``'s ``trigger`` (gradio 3 lists them, gradio 4 keys them by id)."""
    config = blocks.get_config_file() if hasattr(blocks, "get_config_file") else blocks.config
    elem_ids = {component["id"]: component.get("props", {}).get("elem_id") for component in config["components"]}
    for index, dependency in enumerate(config["dependencies"]):
        for target in dependency["targets"]:
            target, event = target if isinstance(target, (list, tuple)) else (target, dependency.get("trigger"))
            if elem_ids.get(target) == elem_id and event == trigger:
                functions = blocks.fns
                return (functions[dependency["id"]] if isinstance(functions, dict) else functions[index]).fn
    raise AssertionError(f"no {trigger} handler on {elem_id}")


def test_start_and_resume_make_the_live_view_follow_the_job_they_made(services):
    """Not the running job, which the view shows with nothing picked: the one the button queued."""
    running = services.store.update(train_tab.submit(services, form(output_name="other"))[1], status="running").id
    blocks, picked, views = train_tab.build(services), train_tab.Picked(), train_tab.LiveViews()
    message, label = _handler(blocks, "lora_trainer_start")(*form().values(), picked)
    started = train_tab.job_id_of(label)
    assert label == f"{started}: star (queued)" and message.startswith(f"Job {started} (star) queued behind 1 job(s).")
    assert _poll(services, views, picked)["job"]["value"] == label
    services.runner.run_next()
    services.store.update(started, status="paused")
    message, label = _handler(blocks, "lora_trainer_resume")(f"{started}: star (paused)", picked)
    resumed = train_tab.job_id_of(label)
    assert message.startswith(f"Job {resumed} resumes job {started} from its last state.")
    assert label == f"{resumed}: star (queued)"
    shown = _poll(services, views, picked)
    assert shown["job"]["value"] == label and shown["progress"].startswith("**queued**") and resumed != running


def test_the_exports_are_named_after_the_run_and_the_message_names_the_file(services):
    blocks = train_tab.build(services)
    path, _, message = _handler(blocks, "lora_trainer_export_kohya")(*form(output_name="zk star").values())
    assert Path(path) == services.settings.data_folder / "exports" / "zk star.toml" and message == f"Written {path}"
    assert Path(path).is_file()
    path, _, message = _handler(blocks, "lora_trainer_export_preset")(*form(output_name="zk star").values())
    assert Path(path).name == "zk star.preset.toml" and message == f"Written {path}"
    _, command, notes = _handler(blocks, "lora_trainer_show_command")(*form(extra='device = "cpu"').values())
    assert command.startswith("accelerate launch train_network.py")
    assert notes == "**Note:** --device left out (this trainer's own: sd-scripts has no such option)"


# --- the import -----------------------------------------------------------------------------------------------------

def test_an_import_that_fails_leaves_every_field_and_says_why(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("learning_rate = = 1\n", encoding="utf-8")
    values = train_tab.import_into_form(str(broken))
    assert len(values) == len(train_tab.IMPORTED_FIELDS) and values[-1].startswith("error: ")
    assert all(isinstance(value, dict) and "value" not in value for value in values[:-1])


def test_a_kohya_toml_with_steps_and_epochs_keeps_its_epochs(tmp_path):
    """sd-scripts' epochs win over steps: only a file counting steps alone clears the Epochs field."""
    config = tmp_path / "run.toml"
    config.write_text("max_train_steps = 320\nmax_train_epochs = 4\n", encoding="utf-8")
    values = train_tab.import_into_form(str(config))
    assert values[train_tab.IMPORTED_FIELDS.index("epochs")] == 4 and "Epochs is cleared" not in values[-1]


def test_a_kohya_gui_file_without_a_switch_gets_the_presets(tmp_path):
    """Only a switch the file sets false stays off; one it does not hold (an older GUI's save) is the preset's."""
    config = tmp_path / "gui.json"
    config.write_text(json.dumps({k: v for k, v in GUI_SAVE.items() if k != "shuffle_caption"}), encoding="utf-8")
    said = train_tab.import_into_form(str(config), "character")[-1]
    assert "The character preset adds what the file leaves out: " in said and "shuffle_caption = True" in said, said
