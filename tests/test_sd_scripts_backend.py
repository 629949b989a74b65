"""--backend sd-scripts=PATH: the same options run on a user's sd-scripts checkout, its console output read back
as our events. The checkout here is a stand-in that prints what sd-scripts' train_network.py prints (a real
tqdm "steps" bar with avr_loss, "epoch N/M", "saving checkpoint: FILE")."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import toml

from lora_trainer.errors import UserError
from lora_trainer.tiny_model.build import TINY_MODEL_PATH
from lora_trainer.train_network import main as train_main
from lora_trainer.training.events import read_events
from lora_trainer.training.sd_scripts_backend import checkout_of, event_from_line

STAND_IN = textwrap.dedent('''
    import argparse, os, sys, time, toml
    from pathlib import Path
    from tqdm import tqdm
    parser = argparse.ArgumentParser()
    parser.add_argument("--config_file")
    options = toml.loads(Path(parser.parse_args().config_file).read_text(encoding="utf-8"))
    Path("seen-options.toml").write_text(toml.dumps(options), encoding="utf-8")
    Path("seen-environment.toml").write_text(toml.dumps({name: os.environ.get(name, "(unset)") for name in
                                                         ("PYTHONPATH", "CUDA_VISIBLE_DEVICES")}), encoding="utf-8")
    if options.get("training_comment") == "crash":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if options.get("training_comment") == "oom":  # torch 2.5+ names its own class, in its module
        sys.exit("Traceback (most recent call last):\\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    if options.get("training_comment") in ("logged", "no data"):  # rich's log lines, wrapped at 80 columns
        print("2026-12-01 20:13:16 ERROR    Could not load image path / 画像を読み込めません:   train_util.py:6638")
        print("                             /data/1_star/a.png, error: cannot identify image file")
        print("                    INFO     done                                   train_network.py:12")
        sys.exit(1 if options["training_comment"] == "logged" else 0)
    if options.get("network_module") is None:  # sd-scripts: importlib.import_module(args.network_module)
        raise AttributeError("'NoneType' object has no attribute 'startswith'")
    out = Path(options["output_dir"]); out.mkdir(parents=True, exist_ok=True)
    epochs, per_epoch = options["max_train_epochs"], 3
    bar = tqdm(range(epochs * per_epoch), smoothing=0, desc="steps")
    for epoch in range(epochs):
        print(f"\\nepoch {epoch + 1}/{epochs}", flush=True)
        for step in range(per_epoch):
            bar.update(1)
            bar.set_postfix(avr_loss=0.5 / (epoch * per_epoch + step + 1))
        name = options["output_name"] + ("" if epoch + 1 == epochs else f"-{epoch + 1:06d}") + ".safetensors"
        (out / name).write_bytes(b"weights")
        print(f"\\nsaving checkpoint: {out / name}", flush=True)
''')

SAMPLE = Path(__file__).resolve().parents[1] / "lora_trainer" / "assets" / "sample-dataset" / "10_zkstar"


@pytest.fixture
def checkout(tmp_path) -> Path:
    folder = tmp_path / "sd scripts 检出"
    folder.mkdir()
    (folder / "train_network.py").write_text(STAND_IN, encoding="utf-8")
    return folder


def train(checkout: Path, out: Path, *extra: str) -> int:
    return train_main(["--backend", f"sd-scripts={checkout}", "--pretrained_model_name_or_path", str(TINY_MODEL_PATH),
                       "--train_data_dir", str(out / "data"), "--output_dir", str(out), "--output_name", "star",
                       "--max_train_epochs", "2", "--network_dim", "8", *extra])


def test_the_run_goes_to_sd_scripts_with_our_options_and_comes_back_as_events(checkout, tmp_path):
    assert train(checkout, tmp_path, "--save_state", "--state_dir", str(tmp_path / "states")) == 0
    seen = toml.loads((checkout / "seen-options.toml").read_text(encoding="utf-8"))
    assert seen["network_dim"] == 8 and seen["output_name"] == "star" and seen["save_state"]
    assert seen["network_module"] == "networks.lora"  # our default, which sd-scripts does not have
    assert not {"backend", "events_file", "state_dir"} & set(seen)  # ours: sd-scripts would refuse them
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert any("not in --state_dir" in e["message"] for e in events if e["event"] == "warning")
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 7)) and steps[0]["total"] == 6
    assert steps[-1]["average"] == pytest.approx(0.5 / 6, rel=1e-2)
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert [Path(e["path"]).name for e in events if e["event"] == "saved"] == ["star-000001.safetensors", "star.safetensors"]
    assert events[-1]["event"] == "end" and events[-1]["steps"] == 6 and len(events[-1]["files"]) == 2


def test_off_a_terminal_the_backend_run_prints_its_progress_from_what_sd_scripts_shows(checkout, tmp_path, capsys):
    """The job's trainer.log is no terminal: the progress lines there needed a step loss sd-scripts does not show, and
    the backend job failed at its first step with "unexpected KeyError"."""
    assert train(checkout, tmp_path) == 0
    console = capsys.readouterr().err
    assert "step 1/6 (epoch 1): average 0.500" in console and "step 6/6 (epoch 2): average 0.0833" in console
    assert "epoch 1 done at step 3: average loss 0.16700" in console


def test_captions_sd_scripts_misreads_are_said_before_it_runs(checkout, tmp_path):
    """A byte-order mark sd-scripts glues to the first tag (the trigger word) is read right here, but not there."""
    import shutil

    shutil.copytree(SAMPLE, tmp_path / "data" / "1_star")
    caption = next((tmp_path / "data" / "1_star").glob("*.txt"))
    caption.write_bytes("\ufeff".encode("utf-8") + caption.read_bytes())
    assert train(checkout, tmp_path, "--caption_extension", ".txt") == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert any(f"1 caption file(s) sd-scripts misreads, e.g. {caption}: it starts with a UTF-8 byte-order mark"
               in e["message"] for e in events if e["event"] == "warning")
    # a phone photo: turned upright here by its EXIF orientation, trained sideways there
    from PIL import Image

    photo = caption.with_suffix(".png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    Image.open(photo).convert("RGB").save(photo.with_suffix(".jpg"), exif=exif.tobytes())
    photo.unlink()
    assert train(checkout, tmp_path, "--caption_extension", ".txt") == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert any(f"1 picture(s) sd-scripts trains otherwise than this trainer, e.g. {photo.with_suffix('.jpg')}: it has "
               "an EXIF orientation, which sd-scripts ignores" in e["message"] for e in events if e["event"] == "warning")


def test_relative_paths_reach_sd_scripts_absolute_since_it_runs_in_its_checkout(checkout, tmp_path, monkeypatch):
    work = tmp_path / "my project"
    (work / "presets").mkdir(parents=True)
    (work / "presets" / "mine.toml").write_text('unet_target_module = ["Transformer2DModel"]\n', encoding="utf-8")
    (work / "dataset.toml").write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'images/stars'\n"
                                       "num_repeats = 2\n", encoding="utf-8")
    monkeypatch.chdir(work)
    assert train_main(["--backend", f"sd-scripts={checkout}", "--pretrained_model_name_or_path", str(TINY_MODEL_PATH),
                       "--dataset_config", "dataset.toml", "--output_dir", "out", "--output_name", "star", "--max_train_epochs", "1",
                       "--network_module", "lycoris.kohya", "--network_args", "algo=loha", "preset=presets/mine.toml",
                       "--network_weights", "start.safetensors"]) == 0
    seen = toml.loads((checkout / "seen-options.toml").read_text(encoding="utf-8"))
    assert seen["output_dir"] == str(work / "out")
    assert seen["network_weights"] == "start.safetensors"  # not here: left for sd-scripts to say so
    assert seen["network_args"] == ["algo=loha", f"preset={work / 'presets' / 'mine.toml'}"]
    dataset = toml.loads(Path(seen["dataset_config"]).read_text(encoding="utf-8"))  # a copy, beside the run's log
    assert dataset["datasets"][0]["subsets"][0] == {"image_dir": str(work / "images" / "stars"), "num_repeats": 2}
    assert dataset["datasets"][0]["resolution"] == 64 and (work / "dataset.toml").read_text(encoding="utf-8").count("images/stars")
    assert (work / "out" / "star.safetensors").is_file()


def test_an_sd_scripts_crash_is_an_error_event_with_its_message(checkout, tmp_path, capsys):
    assert train(checkout, tmp_path, "--training_comment", "crash") == 2
    assert "CUDA out of memory" in capsys.readouterr().err
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert events[-1] == {**events[-1], "event": "error"} and "RuntimeError" in events[-1]["message"]


def test_a_wrong_backend_is_refused_with_how_to_write_it(tmp_path):
    with pytest.raises(UserError, match="sd-scripts=PATH"):
        checkout_of("kohya")
    with pytest.raises(UserError, match="holds no train_network.py"):
        checkout_of(f"sd-scripts={tmp_path}")


def test_console_lines_sd_scripts_prints_become_events():
    assert event_from_line("steps:  40%|████      | 4/10 [00:02<00:03,  1.9it/s, avr_loss=0.0812]") == {
        "event": "step", "step": 4, "total": 10, "average": 0.0812}
    assert event_from_line("saving checkpoint: D:\\我的 LoRA\\star-000002.safetensors") == {
        "event": "saved", "path": "D:\\我的 LoRA\\star-000002.safetensors"}
    assert event_from_line("epoch 3/10") == {"event": "epoch", "epoch": 2, "epochs": 10}  # epoch 2 is done
    assert event_from_line("steps:   0%|          | 0/10 [00:00<?, ?it/s]") is None
    assert event_from_line("prepare optimizer, data loader etc.") is None


# Console lines captured from the real kohya-ss/sd-scripts (commit 48d368fa, train_network.py, CPU, tiny model,
# --validation_split 0.25 --validate_every_n_steps 5). Each step is drawn twice: progress_bar.update(1) with the
# previous avr_loss, then set_postfix with its own; validation bars have their own 1..N counter and end in ESC[A.
REAL_CONSOLE = [
    "steps:   0%|          | 0/60 [00:00<?, ?it/s]",
    "epoch 1/1",
    "",
    "2026-12-01 20:13:16 INFO     epoch is incremented.             train_util.py:784",
    "                             current_epoch: 0, epoch: 1                         ",
    "steps:   2%|▏         | 1/60 [00:00<00:37,  1.57it/s]",
    "steps:   2%|▏         | 1/60 [00:00<00:37,  1.57it/s, avr_loss=1.14]",
    "steps:   3%|▎         | 2/60 [00:01<00:31,  1.83it/s, avr_loss=1.14]",
    "steps:   3%|▎         | 2/60 [00:01<00:31,  1.83it/s, avr_loss=1.12]",
    "steps:   8%|▊         | 5/60 [00:02<00:26,  2.07it/s, avr_loss=1.12]",
    "steps:   8%|▊         | 5/60 [00:02<00:26,  2.07it/s, avr_loss=1.17]",
    "",
    "validation steps:   0%|          | 0/8 [00:00<?, ?it/s]\x1b[A",
    "validation steps:  75%|███████▌  | 6/8 [00:00<00:00,  7.01it/s]\x1b[A",
    "validation steps:  75%|███████▌  | 6/8 [00:00<00:00,  7.01it/s, val_avg_loss=1.16, timestep=200]\x1b[A",
    "validation steps: 100%|██████████| 8/8 [00:01<00:00,  6.76it/s, val_avg_loss=1.15, timestep=800]\x1b[A",
    "steps:  10%|█         | 6/60 [00:02<00:26,  2.08it/s, avr_loss=1.17]",
    "steps:  10%|█         | 6/60 [00:02<00:26,  2.08it/s, avr_loss=1.16]",
    "steps:  12%|█▏        | 7/60 [00:03<00:25,  2.05it/s, avr_loss=1.15]",  # fast runs: update's draw is skipped
    "steps: 100%|██████████| 60/60 [00:28<00:00,  2.12it/s, avr_loss=1.13]",
    "epoch validation steps: 100%|██████████| 8/8 [00:01<00:00,  7.41it/s, val_epoch_avg_loss=1.14, timestep=800]\x1b[A",
    "saving checkpoint: {out}/val.safetensors",
    "2026-12-01 20:14:01 INFO     model saved.                  train_network.py:1729",
    "steps: 100%|██████████| 60/60 [00:28<00:00,  2.12it/s, avr_loss=1.13]",
]

REPLAY = textwrap.dedent('''
    import argparse, json, os, sys, time, toml
    from pathlib import Path
    parser = argparse.ArgumentParser()
    parser.add_argument("--config_file")
    options = toml.loads(Path(parser.parse_args().config_file).read_text(encoding="utf-8"))
    out = Path(options["output_dir"])
    Path(__file__).with_name("pid").write_text(str(os.getpid()), encoding="utf-8")
    for line in json.loads(Path(__file__).with_name("console.json").read_text(encoding="utf-8")):
        if line.startswith("@write "):  # a file sd-scripts (or the user) writes at this point
            Path(line[7:].format(out=out)).parent.mkdir(parents=True, exist_ok=True)
            Path(line[7:].format(out=out)).write_text("stop" if line.endswith("STOP") else "weights", encoding="utf-8")
        elif line.startswith("@mkdir "):  # a state folder as accelerate's save_state writes it
            state = Path(line[7:].format(out=out))
            state.mkdir(parents=True)
            for name in ("train_state.json", "model.safetensors"):
                (state / name).write_text("{}", encoding="utf-8")
        elif line == "@pause":  # let the trainer read everything printed so far
            time.sleep(1.5)
        elif line.startswith("@exit "):  # ends as a killed process would, without a word
            sys.exit(int(line[6:]))
        elif line == "@count":  # trains on quickly: lines wait in the pipe while a stop terminates it
            for i in range(31, 60):
                print(f"\\rsteps:  50%|█████     | {i}/60 [00:14<00:14,  2.1it/s, avr_loss=1.1]", flush=True); time.sleep(0.02)
            while True:
                time.sleep(0.2)
        elif line == "@hang":
            while True:
                print("steps:  50%|█████     | 30/60 [00:14<00:14,  2.1it/s, avr_loss=1.1]", flush=True); time.sleep(0.2)
        else:
            # tqdm redraws with "\\r"; sd-scripts prints its own lines as print(f"\\n...")
            sys.stdout.write("\\r" + line.format(out=out) if line.startswith("steps") else "\\n" + line.format(out=out) + "\\n")
            sys.stdout.flush()
''')


def replay(checkout: Path, lines: list[str]) -> Path:
    import json

    (checkout / "train_network.py").write_text(REPLAY, encoding="utf-8")
    (checkout / "console.json").write_text(json.dumps(lines), encoding="utf-8")
    return checkout


def test_real_sd_scripts_console_steps_carry_their_own_loss_and_validation_bars_are_not_steps(checkout, tmp_path):
    assert event_from_line(REAL_CONSOLE[14]) is None and event_from_line(REAL_CONSOLE[20]) is None
    assert train(replay(checkout, REAL_CONSOLE), tmp_path) == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    steps = [e for e in events if e["event"] == "step"]
    assert [(e["step"], e["total"], e.get("average")) for e in steps] == [
        (1, 60, 1.14), (2, 60, 1.12), (5, 60, 1.17), (6, 60, 1.16), (7, 60, 1.15), (60, 60, 1.13)]
    assert [e["event"] for e in events] == ["start", "warning"] + ["step"] * 6 + ["saved", "epoch", "end"]
    assert events[-1]["steps"] == 60 and events[-1]["files"] == [str(tmp_path / "val.safetensors")]
    assert (tmp_path / "star.events.sd-scripts.toml").is_file()  # the config it ran, beside its log


def test_a_stop_terminates_sd_scripts_keeps_its_files_and_ends_without_an_error(checkout, tmp_path):
    lines = ["epoch 1/3", "steps:  33%|███▎      | 20/60 [00:09<00:18,  2.1it/s, avr_loss=1.14]",
             "@write {out}/star-000001.safetensors", "saving checkpoint: {out}/star-000001.safetensors", "epoch 2/3",
             "@pause", "@write {out}/STOP", "@hang"]
    assert train(replay(checkout, lines), tmp_path, "--stop_file", str(tmp_path / "STOP")) == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert [e["event"] for e in events if e["event"] != "step"] == ["start", "warning", "saved", "epoch", "warning", "end"]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1]  # epoch 2 was cut short
    assert events[-1]["stopped"] is True and events[-1]["files"] == [str(tmp_path / "star-000001.safetensors")]
    assert (tmp_path / "star-000001.safetensors").is_file()
    assert not (tmp_path / "STOP").exists()  # obeyed and taken, as our trainer takes it: a resume would stop on it


def test_sample_now_then_pause_stops_sd_scripts_which_cannot_sample_on_request(tmp_path):
    """The control file's "sample" and "pause" within one step read as sample+stop: sd-scripts draws samples only
    when its options say, so its run obeys the stop alone (as it did when the stop took the sample's place)."""
    import time

    from lora_trainer.training.sd_scripts_backend import _asks_to_stop

    control = tmp_path / "STOP"
    started = time.time()
    for words, stops in (("sample\npause\n", True), ("stop\n", True), ("sample\n", False), ("save\n", False)):
        control.write_text(words, encoding="utf-8")
        assert _asks_to_stop(control, started) is stops, words


def test_after_a_stop_nothing_sd_scripts_printed_while_it_ended_becomes_an_event(checkout, tmp_path):
    lines = ["epoch 1/3", "steps:  33%|███▎      | 20/60 [00:09<00:18,  2.1it/s, avr_loss=1.14]", "@pause",
             "@write {out}/STOP", "@count"]
    assert train(replay(checkout, lines), tmp_path, "--stop_file", str(tmp_path / "STOP")) == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    stop = next(i for i, e in enumerate(events) if e["event"] == "warning" and "terminated" in e["message"])
    assert [e["event"] for e in events[stop + 1:]] == ["end"]  # the steps printed while it ended went to its log only
    assert events[-1]["steps"] == [e["step"] for e in events[:stop] if e["event"] == "step"][-1]


def test_an_sd_scripts_crash_is_one_error_event(checkout, tmp_path):
    assert train(checkout, tmp_path, "--training_comment", "crash") == 2
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert [e["event"] for e in events].count("error") == 1


def test_the_sd_scripts_command_is_told_the_version_and_prediction_this_trainer_detects(tmp_path, capsys):
    """sd-scripts does not detect SD2 (a missing --v2 fails its strict load) nor v-prediction (a missing
    --v_parameterization trains the wrong target): the printed command and the backend's config carry them."""
    from lora_trainer.bench import write_random_checkpoint
    from lora_trainer.models.configs import SD2
    from lora_trainer.tiny_model.build import tiny_like

    sd2 = write_random_checkpoint(tiny_like(SD2), tmp_path / "my sd2.safetensors")

    def printed(model: Path) -> str:
        assert train_main(["--pretrained_model_name_or_path", str(model), "--train_data_dir", "d",
                           "--print-kohya-command"]) == 0
        return capsys.readouterr().out

    assert " --v2" in printed(sd2) and "--v_parameterization" not in printed(sd2)
    sd2.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n', encoding="utf-8")
    assert " --v2" in printed(sd2) and " --v_parameterization" in printed(sd2)  # the WebUI's .yaml beside it
    assert "--v2" not in printed(TINY_MODEL_PATH) and "--v_parameterization" not in printed(TINY_MODEL_PATH)
    assert "--output_dir output --network_module networks.lora" in printed(TINY_MODEL_PATH)  # required there


def test_the_sd_scripts_command_is_told_the_schedule_of_a_ztsnr_marked_v_prediction_file(tiny_sdxl, tmp_path, capsys):
    """A v-prediction file with the ztsnr marker trains here on the zero-terminal-SNR schedule; sd-scripts, not told,
    trained it on the file's ordinary schedule. An epsilon file's marker changes nothing, as the loader reads it."""
    import torch
    from safetensors.torch import load_file

    from lora_trainer.safe_io import save_safetensors

    state = load_file(str(tiny_sdxl))

    def printed(model: Path, *more: str) -> str:
        assert train_main(["--pretrained_model_name_or_path", str(model), "--train_data_dir", "d",
                           "--print-kohya-command", *more]) == 0
        return capsys.readouterr().out

    v_marked = save_safetensors({**state, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, tmp_path / "v.safetensors")
    command = printed(v_marked)
    assert " --v_parameterization" in command and " --zero_terminal_snr" in command
    eps_marked = save_safetensors({**state, "ztsnr": torch.tensor([])}, tmp_path / "eps.safetensors")
    assert "--zero_terminal_snr" not in printed(eps_marked)
    command = printed(eps_marked, "--v_parameterization")  # v by the flag, as the loader takes it
    assert " --v_parameterization" in command and " --zero_terminal_snr" in command


@pytest.mark.parametrize("venv", ["venv/Scripts/python.exe", "venv/bin/python", ".venv/Scripts/python.exe",
                                  ".venv/bin/python"])
def test_the_checkout_runs_in_its_own_venv_as_its_installers_make_it(tmp_path, venv):
    """Kohya's setup makes venv; uv and many guides make .venv — on Windows under Scripts\\python.exe."""
    import sys

    from lora_trainer.training.sd_scripts_backend import python_of

    checkout = tmp_path / "sd-scripts"
    assert python_of(checkout) == sys.executable  # no venv: ours
    (tmp_path / venv).parent.mkdir(parents=True)
    (tmp_path / venv).write_bytes(b"")
    assert python_of(checkout) == sys.executable  # a venv that merely lies beside it (~/venv beside ~/sd-scripts): not it
    (tmp_path / "kohya_gui.py").write_text("", encoding="utf-8")
    assert python_of(checkout) == str(tmp_path / venv)  # the Kohya GUI's: kohya_ss/venv beside kohya_ss/sd-scripts
    (checkout / venv).parent.mkdir(parents=True)
    (checkout / venv).write_bytes(b"")
    assert python_of(checkout) == str(checkout / venv)  # its own first


# sd-scripts' lines around an epoch's state (--save_state): its file, then train_util's log line, then the folder
STATE_AT_EPOCH_1 = [
    "epoch 1/2", "steps:  50%|█████     | 3/6 [00:01<00:01,  2.1it/s, avr_loss=1.14]",
    "@write {out}/star-000001.safetensors", "saving checkpoint: {out}/star-000001.safetensors",
    "2026-12-01 20:13:17 INFO     saving state at epoch 1                   train_util.py:5942",
    "@mkdir {out}/star-000001-state", "epoch 2/2"]


def test_a_state_sd_scripts_saves_is_said_with_its_folder_and_a_stop_says_to_resume_from_it(checkout, tmp_path):
    """The runner resumes from the last state event's path: sd-scripts' "saving state" line alone gave none, so a
    paused backend job could not be resumed."""
    lines = [*STATE_AT_EPOCH_1, "@pause", "@write {out}/STOP", "@hang"]
    assert train(replay(checkout, lines), tmp_path, "--save_state", "--stop_file", str(tmp_path / "STOP")) == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    states = [e for e in events if e["event"] == "state"]
    assert states == [{**states[0], "action": "saved", "path": str(tmp_path / "star-000001-state"), "epoch": 1, "step": 3}]
    assert events[-1]["event"] == "end" and events[-1]["stopped"]
    assert "cannot save at a stop; resume from its last saved state, step 3" in events[-1]["message"]


def test_state_folders_are_named_as_sd_scripts_names_them():
    from lora_trainer.training.options import TrainOptions
    from lora_trainer.training.sd_scripts_backend import state_folder

    named, unnamed = TrainOptions(output_dir="/out", output_name="star"), TrainOptions(output_dir="/out")
    logged = "2026-12-01 20:13:17 INFO     saving state at step 120                 train_util.py:5964"
    assert state_folder(logged, named) == {"path": str(Path("/out/star-step00000120-state")), "step": 120}
    assert state_folder(logged, unnamed)["path"] == str(Path("/out/at-step00000120-state"))
    assert state_folder("INFO saving state at epoch 3", unnamed)["path"] == str(Path("/out/epoch-000003-state"))
    assert state_folder("INFO saving last state.", named) == {"path": str(Path("/out/star-state"))}
    assert state_folder("INFO removing old state: /out/star-000001-state", named) is None


def _runner(tmp_path):
    from lora_trainer.jobs.runner import JobRunner
    from lora_trainer.jobs.store import JobStore

    return JobRunner(JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs"), kill_after=60.0, poll=0.05)


def _job_options(checkout: Path, tmp_path: Path, **more) -> dict:
    (tmp_path / "data" / "1_zk").mkdir(parents=True, exist_ok=True)  # a job is checked for its images when submitted
    (tmp_path / "data" / "1_zk" / "a.png").write_bytes(b"")
    (tmp_path / "out").mkdir(exist_ok=True)
    return {"backend": f"sd-scripts={checkout}", "pretrained_model_name_or_path": str(TINY_MODEL_PATH),
            "train_data_dir": str(tmp_path / "data"), "resolution": "64", "output_dir": str(tmp_path / "out"),
            "output_name": "star", "max_train_epochs": 2, **more}


def _events_until(path: Path, kind: str, seconds: float = 60.0) -> list[dict]:
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        events = read_events(path)[0] if path.exists() else []
        if any(e["event"] == kind for e in events):
            return events
        assert not [e for e in events if e["event"] in ("error", "end")], events
        time.sleep(0.05)
    raise AssertionError(f"no {kind} event in {path} within {seconds} s")


def test_a_paused_backend_job_resumes_from_the_last_state_sd_scripts_saved(checkout, tmp_path):
    """The runner said "paused: resume continues from the saved state" and then refused to resume (no state)."""
    runner = _runner(tmp_path)
    job = runner.submit("backend", _job_options(replay(checkout, [*STATE_AT_EPOCH_1, "@hang"]), tmp_path, save_state=True))
    paused = _paused_after(runner, job, "state")
    assert paused.status == "paused" and paused.last_state == str(tmp_path / "out" / "star-000001-state")
    assert paused.message == "paused (sd-scripts cannot save at a stop; resume continues from its last saved state, step 3)"
    resumed = runner.resume(job.id)
    assert resumed.options["resume"] == str(tmp_path / "out" / "star-000001-state")


def _paused_after(runner, job, event: str):
    """The job run by the queue, paused once its events hold ``event``; its record after the runner let it go."""
    import threading

    thread = threading.Thread(target=runner.run_next)
    thread.start()
    _events_until(job.events_path, event)
    runner.stop(job.id, pause=True)
    thread.join(timeout=60)
    return runner.store.get(job.id)


def test_a_stopped_backend_job_without_a_state_does_not_claim_one(checkout, tmp_path):
    runner = _runner(tmp_path)
    lines = ["epoch 1/2", "steps:  50%|█████     | 3/6 [00:01<00:01,  2.1it/s, avr_loss=1.14]", "@hang"]
    job = runner.submit("backend", _job_options(replay(checkout, lines), tmp_path))
    stopped = _paused_after(runner, job, "step")
    assert stopped.status == "stopped" and "saved" not in stopped.message.split("(")[0]
    assert "sd-scripts cannot save at a stop, and it saved no state to resume from" in stopped.message
    with pytest.raises(UserError, match="saved no state to resume from"):
        runner.resume(job.id)


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM is a POSIX signal")
def test_sigterm_to_the_backend_ends_sd_scripts_too_and_says_the_steps_it_reached(checkout, tmp_path):
    """SIGTERM reached our wrapper alone: sd-scripts trained on, orphaned, and the end event said nothing was trained."""
    import signal
    import subprocess
    import sys

    lines = ["epoch 1/2", "steps:  50%|█████     | 3/6 [00:01<00:01,  2.1it/s, avr_loss=1.14]", "@hang"]
    replay(checkout, lines)
    wrapper = subprocess.Popen([sys.executable, "-m", "lora_trainer.train_network", "--backend", f"sd-scripts={checkout}",
                                "--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir",
                                str(tmp_path / "data"), "--output_dir", str(tmp_path), "--output_name", "star"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _events_until(tmp_path / "star.events.jsonl", "step")
        sd_scripts = int((checkout / "pid").read_text(encoding="utf-8"))
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=30) == 0
    finally:
        wrapper.kill()
    alive = True
    try:
        os.kill(sd_scripts, 0)
    except ProcessLookupError:
        alive = False
    if alive:
        os.kill(sd_scripts, signal.SIGKILL)
    assert not alive
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert [e["event"] for e in events].count("end") == 1
    assert events[-1] == {**events[-1], "event": "end", "stopped": True, "steps": 30}
    assert "nothing was trained" not in events[-1]["message"]
    assert any("interrupted: sd-scripts cannot stop gracefully" in e["message"] for e in events if e["event"] == "warning")


def test_a_stop_file_left_from_an_earlier_run_is_removed_and_said_not_obeyed(checkout, tmp_path):
    """It stopped the new run at sd-scripts' first console line; our own trainer drops such a leftover."""
    import time

    stop = tmp_path / "STOP"
    stop.write_text("pause\n", encoding="utf-8")
    os.utime(stop, (time.time() - 600, time.time() - 600))
    assert train(checkout, tmp_path, "--stop_file", str(stop)) == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert events[-1]["event"] == "end" and events[-1]["steps"] == 6 and "stopped" not in events[-1]
    assert f"{stop} held 'pause' from before this run started: removed, not obeyed" in [
        e["message"] for e in events if e["event"] == "warning"]
    assert not stop.exists()


def test_a_webui_sampler_name_reaches_sd_scripts_as_its_own_name_and_a_stand_in_is_said(checkout, tmp_path):
    """sd-scripts' TOML skips its --sample_sampler choices: "Euler a" written as such drew with DDIM, without a word."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a star\n", encoding="utf-8")
    assert train(checkout, tmp_path, "--sample_prompts", str(prompts), "--sample_sampler", "Euler a",
                 "--max_token_length", "75") == 0
    seen = toml.loads((checkout / "seen-options.toml").read_text(encoding="utf-8"))
    assert seen["sample_sampler"] == "euler_a" and "max_token_length" not in seen
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert not [e for e in events if e["event"] == "warning" and "--sample_sampler" in e["message"]]  # the same sampler there
    assert train(checkout, tmp_path, "--sample_prompts", str(prompts), "--sample_sampler", "DPM++ 2M Karras") == 0
    assert toml.loads((checkout / "seen-options.toml").read_text(encoding="utf-8"))["sample_sampler"] == "dpmsolver++"
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert "--sample_sampler 'DPM++ 2M Karras': sd-scripts has no such sampler; it draws the samples with dpmsolver++ " \
           "(DPM++ 2M without Karras spacing), so they differ from this trainer's" in [
               e["message"] for e in events if e["event"] == "warning"]


def test_an_sd_scripts_crash_says_why_for_dotted_exceptions_logged_errors_and_out_of_memory(checkout, tmp_path):
    """"sd-scripts exited with code 1" was all it said for torch.OutOfMemoryError or an error sd-scripts logged."""
    def error(comment: str) -> str:
        assert train(checkout, tmp_path, "--training_comment", comment) == 2
        events, _ = read_events(tmp_path / "star.events.jsonl")
        assert events[-1]["event"] == "error"
        return events[-1]["message"]

    oom = error("oom")
    assert oom.startswith("sd-scripts: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB; to fit, try "
                          "--gradient_checkpointing")
    assert error("logged") == ("sd-scripts exited with code 1 after logging: Could not load image path / 画像を読み込めません: "
                               f"/data/1_star/a.png, error: cannot identify image file; see {tmp_path / 'star.events.sd-scripts.log'}")
    assert error("no data").startswith("sd-scripts ended without training a step; it logged: Could not load image path")


def test_a_backend_job_with_a_wrong_checkout_is_refused_when_submitted(tmp_path):
    """It was queued and failed only when the queue reached it."""
    runner = _runner(tmp_path)
    for backend, said in (("kohya", "write --backend sd-scripts=PATH"),
                          (f"sd-scripts={tmp_path / 'nowhere'}", "holds no train_network.py")):
        with pytest.raises(UserError, match=said) as refused:
            runner.submit("backend", {**_job_options(tmp_path, tmp_path), "backend": backend})
        assert refused.value.field == "backend"  # the API's 400 names it
    assert runner.store.all() == []


def test_save_and_sample_are_refused_for_a_backend_job_as_sd_scripts_cannot_do_them_on_request(checkout, tmp_path):
    """They were accepted and silently ignored."""
    runner = _runner(tmp_path)
    job = runner.submit("backend", _job_options(checkout, tmp_path))
    runner.store.update(job.id, status="running")
    for command in ("save", "sample"):
        with pytest.raises(UserError, match=f"runs on sd-scripts \\(--backend\\), which cannot {command} on request"):
            runner.control(job.id, command)
    assert not job.stop_path.exists()


def test_the_kohya_gui_folder_is_pointed_to_its_sd_scripts_and_a_missing_module_says_where_to_install_it(checkout,
                                                                                                       tmp_path):
    """kohya_ss/ holds sd-scripts/ and venv/: kohya_ss said "holds no train_network.py" with no hint; kohya_ss/sd-scripts
    ran on our Python and failed on "No module named 'accelerate'" with nothing more."""
    import sys

    kohya_ss = tmp_path / "kohya_ss"
    (kohya_ss / "sd-scripts").mkdir(parents=True)
    (kohya_ss / "sd-scripts" / "train_network.py").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=f"use --backend sd-scripts={kohya_ss / 'sd-scripts'} "):
        checkout_of(f"sd-scripts={kohya_ss}")
    (checkout / "train_network.py").write_text("import accelerate_not_installed_here\n", encoding="utf-8")
    assert train(checkout, tmp_path) == 2
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert f"{checkout} has no venv (nor .venv, nor the Kohya GUI's beside it): sd-scripts runs with this trainer's Python, " \
           f"{sys.executable}, which needs sd-scripts' requirements" in [e["message"] for e in events if e["event"] == "warning"]
    assert events[-1]["message"].startswith("sd-scripts: ModuleNotFoundError: No module named 'accelerate_not_installed_here'; "
                                            f"install it into {sys.executable}, the Python that runs sd-scripts")


def test_device_becomes_the_gpus_sd_scripts_is_shown_and_our_package_folders_leave_its_pythonpath(checkout, tmp_path,
                                                                                                 monkeypatch):
    """--device was dropped without a word (sd-scripts has no such option); the runner's PYTHONPATH (our package's
    folder, the WebUI extension's extras/) came before sd-scripts' venv packages."""
    from lora_trainer.jobs.runner import PACKAGE_ROOT

    elsewhere = str(tmp_path / "user's own")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PACKAGE_ROOT), elsewhere, str(PACKAGE_ROOT / "extras")]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # the host's choice (the WebUI's --device-id): indexed into
    assert train(checkout, tmp_path, "--device", "cuda:1") == 0
    seen = toml.loads((checkout / "seen-environment.toml").read_text(encoding="utf-8"))
    assert seen == {"PYTHONPATH": elsewhere, "CUDA_VISIBLE_DEVICES": "3"}
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert "--device cuda:1: sd-scripts takes no device option, so it is shown that GPU alone (CUDA_VISIBLE_DEVICES=3)" \
        in [e["message"] for e in events if e["event"] == "warning"]
    monkeypatch.setenv("PYTHONPATH", str(PACKAGE_ROOT))
    assert train(checkout, tmp_path, "--device", "cpu") == 0
    seen = toml.loads((checkout / "seen-environment.toml").read_text(encoding="utf-8"))
    assert seen == {"PYTHONPATH": "(unset)", "CUDA_VISIBLE_DEVICES": ""}


def test_sd_scripts_samples_are_sample_events_and_its_steps_and_epochs_say_their_epoch(checkout, tmp_path):
    """Its event stream had no samples, and steps without their epoch."""
    lines = ["epoch 1/1", "steps:  50%|█████     | 1/2 [00:01<00:01,  1.1it/s, avr_loss=1.1]",
             "2026-12-01 20:13:16 INFO     generating sample images at step /     train_util.py:6394",
             "                             サンプル画像生成 ステップ: 1",
             "@write {out}/sample/star_000001_00_20261201201316_42.png",
             "steps: 100%|██████████| 2/2 [00:02<00:00,  1.1it/s, avr_loss=0.9]",
             "                    INFO     generating sample images at step /     train_util.py:6394",
             "@write {out}/sample/star_e000001_00_20261201201317_42.png",
             "@write {out}/star.safetensors", "saving checkpoint: {out}/star.safetensors"]
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / "star_e000003_00_20261130101010_42.png").write_bytes(b"")  # an earlier run's
    assert train(replay(checkout, lines), tmp_path, "--max_train_epochs", "1") == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    samples = [{k: e[k] for k in ("path", "epoch", "step")} for e in events if e["event"] == "sample"]
    assert samples == [{"path": str(tmp_path / "sample" / "star_000001_00_20261201201316_42.png"), "epoch": None, "step": 1},
                       {"path": str(tmp_path / "sample" / "star_e000001_00_20261201201317_42.png"), "epoch": 1, "step": 2}]
    assert [(e["step"], e["epoch"]) for e in events if e["event"] == "step"] == [(1, 1), (2, 1)]
    from lora_trainer.training.sd_scripts_backend import round_samples  # sd-scripts a round ahead of its console read

    hundredth = tmp_path / "star_e000001_100_20261201201317.png"  # {i:02d}: the 101st prompt's file
    assert round_samples([hundredth], 2, 1) == [{"path": str(hundredth), "epoch": 1, "step": 2}]

    ahead = [tmp_path / "star_000001_00_20261201201316.png", tmp_path / "star_e000001_00_20261201201317.png"]
    assert [e["path"] for e in round_samples(ahead, 1, 1)] == [str(ahead[0])]
    first = tmp_path / "star_e000000_00_20261201201315_42.png"  # --sample_at_first: drawn as "epoch 0", before epoch 1
    assert round_samples([first], 0, 0) == [{"path": str(first), "epoch": 0, "step": 0}]
    assert [{k: e[k] for k in ("epoch", "step", "average")} for e in events if e["event"] == "epoch"] == [
        {"epoch": 1, "step": 2, "average": 0.9}]


def test_an_error_sd_scripts_logged_and_trained_on_is_not_given_as_a_later_crashs_cause(checkout, tmp_path):
    """sd-scripts logs 'No prompt file' at each sample round and trains on; a kill (the OOM killer) later was said as
    'exited with code 137 after logging: No prompt file'."""
    lines = ["2026-12-01 20:13:16 ERROR    No prompt file / プロンプトファイルがありません: p.txt   train_util.py:6396",
             "epoch 1/3", "steps:  33%|███▎      | 20/60 [00:09<00:18,  2.1it/s, avr_loss=1.14]", "@exit 137"]
    assert train(replay(checkout, lines), tmp_path) == 2
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert events[-1]["event"] == "error" and "sd-scripts exited with code 137" in events[-1]["message"]
    assert "No prompt file" not in events[-1]["message"]


def test_the_checkpoint_is_read_once_per_version_for_the_command(tmp_path, monkeypatch):
    """The Train tab asks at each "Show sd-scripts command" and export; a .ckpt is unpickled whole to tell its version.
    A file saved again (or a .yaml put beside it) is read again."""
    import lora_trainer.models.checkpoint as checkpoint
    from lora_trainer.bench import write_random_checkpoint
    from lora_trainer.models.configs import SD2
    from lora_trainer.tiny_model.build import tiny_like
    from lora_trainer.training.options import options_from
    from lora_trainer.training.sd_scripts_backend import told_by_checkpoint

    sd2 = write_random_checkpoint(tiny_like(SD2), tmp_path / "sd2.safetensors")
    opened = []
    real = checkpoint.open_tensors
    monkeypatch.setattr(checkpoint, "open_tensors", lambda path: opened.append(path) or real(path))
    options = options_from({"pretrained_model_name_or_path": str(sd2), "train_data_dir": "d"})
    assert told_by_checkpoint(options) == told_by_checkpoint(options) == ("train_network.py", {"v2": True})
    assert len(opened) == 1
    sd2.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n', encoding="utf-8")
    assert told_by_checkpoint(options) == ("train_network.py", {"v2": True, "v_parameterization": True})
    assert len(opened) == 2
    root = options_from({"pretrained_model_name_or_path": "/", "train_data_dir": "d"})  # a folder: sd-scripts says
    assert told_by_checkpoint(root) == (None, {})


def test_a_checkpoint_whose_permission_was_fixed_is_read_again(tmp_path, monkeypatch):
    """Unreadable (no read permission) was kept per size and time of the file: after a chmod or a Windows ACL change,
    which touch neither, the command kept leaving --v2 out until a restart. The file's refusal is simulated (the
    tests may run as root, whom chmod does not stop)."""
    import builtins

    import lora_trainer.models.checkpoint as checkpoint
    import lora_trainer.training.sd_scripts_backend as backend
    from lora_trainer.bench import write_random_checkpoint
    from lora_trainer.models.configs import SD2
    from lora_trainer.tiny_model.build import tiny_like
    from lora_trainer.training.options import options_from

    sd2 = write_random_checkpoint(tiny_like(SD2), tmp_path / "sd2.safetensors")
    refused = {str(sd2)}

    def refusing(opener):
        def opened_unless_refused(path, *args, **kwargs):
            if str(path) in refused:
                raise PermissionError(13, "Permission denied", str(path))
            return opener(path, *args, **kwargs)
        return opened_unless_refused

    monkeypatch.setattr(backend, "open", refusing(builtins.open), raising=False)  # the module's open()
    monkeypatch.setattr(checkpoint, "open_tensors", refusing(checkpoint.open_tensors))
    options = options_from({"pretrained_model_name_or_path": str(sd2), "train_data_dir": "d"})
    assert backend.told_by_checkpoint(options) == (None, {})
    refused.clear()  # chmod a+r: the file itself untouched
    assert backend.told_by_checkpoint(options) == ("train_network.py", {"v2": True})
