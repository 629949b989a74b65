"""The trainer end to end on the tiny base model: Kohya files and metadata, events, reproducibility, resume."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.compat import OutOfMemoryError
from lora_trainer.errors import UserError
from lora_trainer.tiny_model.build import TINY_MODEL_PATH
from lora_trainer.train_network import main as train_main
from lora_trainer.training import tracking
from lora_trainer.training.events import read_events

SAMPLE = Path(__file__).resolve().parents[1] / "lora_trainer" / "assets" / "sample-dataset" / "10_zkstar"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The sample dataset with 2 repeats, under a path with spaces and CJK characters."""
    root = tmp_path_factory.mktemp("data") / "我的 数据集 Ä"
    shutil.copytree(SAMPLE, root / "2_zkstar")
    return root


def run(dataset: Path, out: Path, *extra: str, seed: str | None = "3") -> int:
    return train_main([
        "--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", str(dataset),
        "--output_dir", str(out), "--output_name", "star", "--resolution", "64", "--train_batch_size", "4",
        "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3",
        "--max_train_epochs", "2", "--cache_latents", *(["--seed", seed] if seed else []), "--caption_extension", ".txt",
        "--max_data_loader_n_workers", "0", *extra,
    ])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def command_while_running(monkeypatch, control: Path, word: str) -> None:
    """``word`` written to the control file once the next run has started, as the job runner writes it: a file
    written before the run started is a leftover, dropped."""
    import lora_trainer.training.trainer as trainer

    started = trainer.TrainingRun.train

    def train(self):
        monkeypatch.setattr(trainer.TrainingRun, "train", started)  # the next run only
        control.write_text(word, encoding="utf-8")
        return started(self)

    monkeypatch.setattr(trainer.TrainingRun, "train", train)


@pytest.fixture(scope="module")
def baseline(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "输出 folder"
    assert run(dataset, out, "--save_every_n_epochs", "1", "--save_state") == 0
    return out


def test_file_names_that_are_not_utf8_train_with_their_latents_cached_on_disk(tmp_path, capsys):
    """A zip made on Chinese Windows, unpacked on Linux, names files in GBK bytes: Python reads them as lone
    surrogates, which UTF-8 cannot encode. The run trained every step and then died writing its last event (or at
    once, writing a warning that named the file, or a cached latent's temporary)."""
    gbk = os.fsdecode("星星".encode("gbk"))  # '\udcd0\udcc7…'
    folder = tmp_path / "data" / "2_zkstar"
    try:
        shutil.copytree(SAMPLE, folder)
        for index, image in enumerate(sorted(folder.glob("*.png"))[:2]):
            image.rename(folder / f"{gbk}{index}.png")  # the first keeps its caption's old name: none, a warning
        (folder / f"{gbk}1.txt").write_text("zkstar, gbk", encoding="utf-8")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8 (Windows, macOS)")
    out = tmp_path / "out"
    assert run(folder.parent, out, "--max_train_epochs", "1", "--cache_latents_to_disk") == 0
    events, _ = read_events(out / "star.events.jsonl")
    assert events[-1]["event"] == "end" and (out / "star.safetensors").exists()
    assert any(gbk in e.get("message", "") for e in events if e["event"] == "warning")  # read back as Python named it
    assert sorted(p.name for p in folder.glob(f"{gbk}*.npz")) == [f"{gbk}0_0064x0064_sd.npz", f"{gbk}1_0064x0064_sd.npz"]
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_every_file_a_run_writes_gets_the_permissions_of_any_new_file(baseline, tmp_path):
    """A WebUI or ComfyUI running as another user (a service, a container) reads the LoRA files, and a state folder
    may be resumed by another account: nothing may come out owner-only, as atomic saves once made it."""
    (tmp_path / "probe").write_text("x", encoding="utf-8")
    usual = (tmp_path / "probe").stat().st_mode & 0o777
    written = {p.relative_to(baseline).as_posix(): oct(p.stat().st_mode & 0o777) for p in baseline.rglob("*") if p.is_file()}
    assert "star.safetensors" in written and "star-000001-state/model.safetensors" in written
    assert written == dict.fromkeys(written, oct(usual))


def test_run_writes_sd_scripts_files_with_kohya_keys_and_metadata(baseline):
    assert sorted(p.name for p in baseline.glob("*.safetensors")) == ["star-000001.safetensors", "star.safetensors"]
    with safe_open(str(baseline / "star.safetensors"), "pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert metadata["ss_epoch"] == "2" and metadata["ss_steps"] == "16" and metadata["ss_num_train_images"] == "32"
    assert json.loads(metadata["ss_dataset_dirs"]) == {"2_zkstar": {"n_repeats": 2, "img_count": 16}}
    assert json.loads(metadata["ss_tag_frequency"])["2_zkstar"]["zkstar"] == 16
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_output_name"] == "star" and metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_metadata_has_at_least_the_keys_sd_scripts_writes_for_such_a_run(baseline):
    from reference import REFERENCE

    with safe_open(str(REFERENCE / "kohya-fixtures" / "lora-baseline" / "tinylora.safetensors"), "pt") as handle:
        theirs = set(handle.metadata())
    with safe_open(str(baseline / "star.safetensors"), "pt") as handle:
        ours = set(handle.metadata())
    assert theirs - ours == set()


def test_events_tell_the_whole_run(baseline):
    events, _ = read_events(baseline / "star.events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("step") == 16 and kinds.count("epoch") == 2
    saved = [e["path"] for e in events if e["event"] == "saved"]
    assert [Path(p).name for p in saved] == ["star-000001.safetensors", "star.safetensors"]
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert all(0 < loss < 2 for loss in losses)
    assert all(e["memory_mib"] > 50 for e in events if e["event"] == "step")  # the UI's memory figure


def test_same_seed_same_weights_bit_for_bit(baseline, dataset, tmp_path):
    assert run(dataset, tmp_path) == 0
    ours, theirs = weights(tmp_path / "star.safetensors"), weights(baseline / "star.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_resuming_from_the_epoch_state_ends_bit_identical_to_the_uninterrupted_run(baseline, dataset, tmp_path):
    state = baseline / "star-000001-state"
    assert (state / "model.safetensors").is_file() and json.loads((state / "train_state.json").read_text()) == {
        "current_epoch": 1, "current_step": 8, "seed": 3, "images": 32, "batches_per_epoch": 8,
        "optimizer": "AdamW", "resolution": "64", "gradient_accumulation_steps": 1, "lr_scheduler": "constant",
        "total_steps": 16, "processes": 1, "train_batch_size": 4}  # sd-scripts reads the first two
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zkstar --w 64 --h 64 --s 1\n", encoding="utf-8")
    assert run(dataset, tmp_path, "--resume", str(state), "--sample_prompts", str(prompts), "--sample_at_first") == 0
    resumed, uninterrupted = weights(tmp_path / "star.safetensors"), weights(baseline / "star.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)  # samples leave the training alone
    events, _ = read_events(tmp_path / "star.events.jsonl")
    first = next(e for e in events if e["event"] in ("sample", "step"))  # --sample_at_first: the weights resumed from
    assert first["event"] == "sample" and (first["epoch"], first["step"]) == (0, 8) and "_e000000_" in first["path"]


def test_a_state_whose_replacing_save_was_cut_off_between_its_renames_resumes_from_the_one_it_replaced(
        baseline, dataset, tmp_path, capsys):
    """``save_state`` moves the old folder to ``.old`` before renaming the new one into place: a kill between the two
    leaves no folder of that name, and the job's Resume gives that name."""
    shutil.copytree(baseline / "star-000001-state", tmp_path / "star-000001-state.old")
    shutil.copytree(baseline / "star-000001-state", tmp_path / "star-000001-state.tmp")
    (tmp_path / "star-000001-state.tmp" / "model.safetensors").unlink()  # however far the new one got
    assert run(dataset, tmp_path / "out", "--resume", str(tmp_path / "star-000001-state")) == 0
    assert "a save replacing it was cut off" in capsys.readouterr().err
    resumed, uninterrupted = weights(tmp_path / "out" / "star.safetensors"), weights(baseline / "star.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_an_epoch_resumed_with_another_batch_size_averages_the_steps_it_trained(baseline, dataset, tmp_path):
    """Epoch 1 had 8 steps, epoch 2 (batch 2 now) has 16: its average is theirs, not an empty slice's 0.0 in the
    events, TensorBoard and the file's recorded losses."""
    assert run(dataset, tmp_path, "--resume", str(baseline / "star-000001-state"), "--train_batch_size", "2") == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    steps = [e["loss"] for e in events if e["event"] == "step"]
    (epoch,) = [e for e in events if e["event"] == "epoch"]
    assert len(steps) == 16 and epoch["epoch"] == 2
    assert epoch["average"] == pytest.approx(sum(steps) / len(steps))


def test_stop_file_finishes_the_step_saves_and_the_run_resumes_to_the_same_result(baseline, dataset, tmp_path, capsys,
                                                                                  monkeypatch):
    stop = tmp_path / "stop-now"
    command_while_running(monkeypatch, stop, "stop")
    assert run(dataset, tmp_path / "a", "--stop_file", str(stop)) == 0  # stops after its first step
    events, _ = read_events(tmp_path / "a" / "star.events.jsonl")
    state = next(e["path"] for e in events if e["event"] == "state")
    assert f'stopped at step 1; to go on, run the same command with --resume "{state}"' in capsys.readouterr().err
    assert [e["step"] for e in events if e["event"] == "step"] == [1]
    assert events[-1]["epochs"] == 1  # stopped in the first epoch: the file is labelled as such (the grid reads it)
    assert events[-1]["stopped"] is True  # the final file is a stopped run's, not a finished one's
    # a state inside the first epoch is in epoch 1, as sd-scripts' own mid-epoch states say
    assert json.loads((Path(state) / "train_state.json").read_text(encoding="utf-8"))["current_epoch"] == 1
    assert [e["epoch"] for e in events if e["event"] == "state"] == [1]
    with safe_open(str(tmp_path / "a" / "star.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_epoch"] == "1"
    assert not stop.exists()  # taken: the printed command, run as it is, goes on to the end
    assert run(dataset, tmp_path / "b", "--resume", state, "--stop_file", str(stop)) == 0
    resumed, uninterrupted = weights(tmp_path / "b" / "star.safetensors"), weights(baseline / "star.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    # with --save_state the stop's state is the one state: not a second, identical end-of-training "star-state"
    command_while_running(monkeypatch, stop, "stop")
    assert run(dataset, tmp_path / "c", "--stop_file", str(stop), "--save_state") == 0
    assert [p.name for p in (tmp_path / "c").glob("*-state")] == ["star-step00000001-state"]


def test_a_control_word_is_a_leftover_only_when_older_than_a_fat_drive_can_tell_apart(tmp_path):
    """FAT rounds file times to 2 s: a stop written just after the run started may read as older than the start."""
    from lora_trainer.training.trainer import StopRequest

    warned = []
    request = StopRequest(tmp_path / "control", warned.append)
    try:
        started = time.time()
        for age, kept in ((1.5, True), (5.0, False)):
            (tmp_path / "control").write_text("stop", encoding="utf-8")
            os.utime(tmp_path / "control", (started - age, started - age))
            request.drop_leftover(started)
            assert (tmp_path / "control").exists() == kept and len(warned) == (0 if kept else 1)
    finally:
        request.close()


@pytest.mark.skipif(os.name == "nt", reason="stands SIGUSR1 in for Windows' SIGBREAK")
def test_ctrl_break_stops_the_run_as_ctrl_c_does(tmp_path, monkeypatch):
    """Windows sends SIGBREAK for Ctrl-Break: its default ended the run at once, without finishing the step or saving;
    before the first step it ended without the stream's end event."""
    import signal

    from lora_trainer.train_network import _interrupt_on_sigterm
    from lora_trainer.training.trainer import StopRequest

    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)
    with pytest.raises(KeyboardInterrupt), _interrupt_on_sigterm():  # loading the model: ends as a stop
        os.kill(os.getpid(), signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # given back
    request = StopRequest(tmp_path / "control", lambda message: None)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # training: the step finishes, then the run saves and stops
        assert request.signalled
    finally:
        request.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_a_control_word_written_by_windows_shells_and_editors_is_obeyed(tmp_path):
    """PowerShell 5's `echo stop > file` writes UTF-16 with a BOM: it killed the run with a UnicodeDecodeError and
    nothing saved; Notepad's UTF-8 BOM made "\ufeffstop" an unknown word. Bytes that are no text read as a stop."""
    from lora_trainer.training.trainer import StopRequest

    control = tmp_path / "control"
    warned = []
    request = StopRequest(control, warned.append)
    try:
        for data, command in (("stop\r\n".encode("utf-16"), "stop"), (b"\xef\xbb\xbfsave\r\n", "save"),
                              ("sample".encode("utf-16-be"), "sample"),  # no BOM: ASCII words still read
                              (b"\xff\xfe\x00\xd8", "stop"), (b"\x80\x81", "stop")):
            control.write_bytes(data)
            assert request.command() == command, data
        assert warned == []
    finally:
        request.close()


def test_a_control_file_that_cannot_be_removed_is_obeyed_once_and_said(tmp_path, monkeypatch):
    """A folder without write access (or a virus scanner holding the file on Windows): the word is still obeyed,
    not a crash that saves nothing, and not obeyed again at every step until the file changes."""
    from lora_trainer.training.trainer import StopRequest

    control = tmp_path / "control"
    warned = []
    request = StopRequest(control, warned.append)
    unlink = Path.unlink

    def held(path, missing_ok=False):
        if path == control:
            raise PermissionError(13, "Permission denied")
        return unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", held)
    try:
        control.write_text("save", encoding="utf-8")
        assert request.command() == "save" and "could not be removed after it was read (Permission denied)" in warned[0]
        assert request.command() is None and request.command() is None
        control.write_text("stop now", encoding="utf-8")  # a new word: read again
        assert request.command() == "stop"
    finally:
        request.close()


def test_a_leftover_control_word_and_an_unknown_one_are_said_and_not_obeyed(dataset, tmp_path, monkeypatch):
    """A pause pressed twice, or a stop as the last run ended, stays in the file: the next run must not stop after
    its first step for it. A mistyped word is not a stop either."""
    control = tmp_path / "out" / "star.stop"  # the default control file beside the outputs
    control.parent.mkdir()
    control.write_text("pause", encoding="utf-8")
    os.utime(control, (time.time() - 60, time.time() - 60))
    assert run(dataset, tmp_path / "out", "--max_train_epochs", "1") == 0
    events, _ = read_events(tmp_path / "out" / "star.events.jsonl")
    assert events[-1]["event"] == "end" and events[-1]["steps"] == 8 and not control.exists()
    assert events[-1]["stopped"] is False
    assert f"{control} held 'pause' from before this run started: removed, not obeyed" in [
        e["message"] for e in events if e["event"] == "warning"]
    control = tmp_path / "control"
    command_while_running(monkeypatch, control, "smaple")
    assert run(dataset, tmp_path / "typo", "--max_train_epochs", "1", "--stop_file", str(control)) == 0
    events, _ = read_events(tmp_path / "typo" / "star.events.jsonl")
    assert events[-1]["event"] == "end" and events[-1]["steps"] == 8 and not control.exists()
    assert f"{control}: 'smaple' is not a control command (stop, pause, save or sample): not obeyed" in [
        e["message"] for e in events if e["event"] == "warning"]


def test_a_run_without_a_seed_resumes_exactly_with_the_seed_its_state_was_saved_with(dataset, tmp_path, monkeypatch,
                                                                                     capsys):
    """Without --seed each run draws one, and the data order comes from it: a resumed run must take the interrupted
    run's, or the epoch it stopped in is trained in another order (some images twice, some never)."""
    stop = tmp_path / "stop-now"
    command_while_running(monkeypatch, stop, "stop")
    assert run(dataset, tmp_path / "a", "--stop_file", str(stop), seed=None) == 0  # stops after its first step
    events, _ = read_events(tmp_path / "a" / "star.events.jsonl")
    seed, state = events[0]["seed"], next(e["path"] for e in events if e["event"] == "state")
    assert run(dataset, tmp_path / "b", "--resume", state, seed=None) == 0
    resumed_events, _ = read_events(tmp_path / "b" / "star.events.jsonl")
    assert resumed_events[0]["seed"] == seed
    assert not [e for e in resumed_events if e["event"] == "warning" and "--resume" in e["message"]]
    assert run(dataset, tmp_path / "c", seed=str(seed)) == 0
    resumed, uninterrupted = weights(tmp_path / "b" / "star.safetensors"), weights(tmp_path / "c" / "star.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)

    assert run(dataset, tmp_path / "d", "--resume", state, "--train_batch_size", "2", seed=None) == 0
    events, _ = read_events(tmp_path / "d" / "star.events.jsonl")
    said = [e["message"] for e in events if e["event"] == "warning" and "--resume" in e["message"]]
    assert len(said) == 1 and "(batches per epoch 8 then, 16 now; 1 process(es) × batch 4 then: with 1 process(es) " \
        "give --train_batch_size 4)" in said[0], said  # the batch that continues it (a torchrun state on one process)
    # another accumulation makes its step count mean other batches: refused (test_a_resume_that_changes_the_schedule…)
    assert run(dataset, tmp_path / "e", "--resume", state, "--gradient_accumulation_steps", "2", seed=None) == 2
    assert "resume with --gradient_accumulation_steps 1" in capsys.readouterr().err


def test_a_resume_that_leaves_nothing_to_train_is_refused_not_saved_as_finished(dataset, tmp_path, capsys):
    """A state past the end of this run's schedule (--max_train_epochs lowered) would 'finish' at once and save its
    weights as a final file of this run's length."""
    assert run(dataset, tmp_path / "a", "--save_state", "--save_every_n_epochs", "1") == 0
    assert run(dataset, tmp_path / "b", "--resume", str(tmp_path / "a" / "star-000001-state"),
               "--max_train_epochs", "1") == 2
    assert "leaves nothing to train: this run has 8 steps (1 epochs of 8); raise --max_train_epochs" in capsys.readouterr().err
    assert not (tmp_path / "b" / "star.safetensors").exists()


def test_a_state_from_an_earlier_version_is_said_and_another_optimizer_stops_it_with_a_sentence(baseline, dataset,
                                                                                                   tmp_path, capsys):
    """A state saved before states recorded their seed and optimizer (2026-12-04) resumed with SGDNesterov loaded,
    cached and died in torch's SGD with KeyError 'momentum'; nothing said that its seed and options were not known."""
    import json as json_module

    state = tmp_path / "old-state"
    shutil.copytree(baseline / "star-000001-state", state)
    saved = json_module.loads((state / "train_state.json").read_text(encoding="utf-8"))
    (state / "train_state.json").write_text(json_module.dumps({k: v for k, v in saved.items() if k in ("step", "epoch")}),
                                            encoding="utf-8")
    assert run(dataset, tmp_path / "sgd", "--resume", str(state), "--optimizer_type", "SGDNesterov") == 2
    error = capsys.readouterr().err
    assert f"--resume {state}: its optimizer state does not fit --optimizer_type SGDNesterov (KeyError" in error
    assert f"start afresh from its network with --network_weights {state / 'model.safetensors'}" in error
    assert "Traceback" not in error
    assert run(dataset, tmp_path / "same", "--resume", str(state), "--seed", "5") == 0
    warnings = [e["message"] for e in read_events(tmp_path / "same" / "star.events.jsonl")[0] if e["event"] == "warning"]
    assert any(m.startswith(f"--resume {state} was saved by an earlier version of this trainer, which did not record "
                            "its seed, optimizer or accumulation") for m in warnings), warnings


def test_running_out_of_memory_at_the_first_step_after_a_resume_is_said_as_memory_not_as_the_optimizer(
        baseline, dataset, tmp_path, capsys, monkeypatch):
    """An out-of-memory error is a RuntimeError: the first resumed step blamed it on the state's optimizer."""
    import json as json_module

    from lora_trainer.compat import OutOfMemoryError
    from lora_trainer.training.flat_adamw import FlatAdamW

    state = tmp_path / "old-state"
    shutil.copytree(baseline / "star-000001-state", state)
    saved = json_module.loads((state / "train_state.json").read_text(encoding="utf-8"))
    (state / "train_state.json").write_text(json_module.dumps({k: v for k, v in saved.items() if k in ("step", "epoch")}),
                                            encoding="utf-8")  # an earlier version's: its optimizer unknown

    def out_of_memory(self, *args, **kwargs):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(FlatAdamW, "step", out_of_memory)
    assert run(dataset, tmp_path / "out", "--resume", str(state), "--seed", "5") != 0
    error = capsys.readouterr().err
    assert "out of memory" in error.lower() and "its optimizer state does not fit" not in error


def test_a_state_from_a_later_version_resumes_and_says_what_it_does_not_read(baseline, dataset, tmp_path):
    """A state saved by a later version (an extension rolled back) stopped with a TypeError on its unknown field."""
    state = tmp_path / "later-state"
    shutil.copytree(baseline / "star-000001-state", state)
    saved = torch.load(state / "train_state.pt", weights_only=True)
    saved["run"]["a_later_counter"] = 3
    torch.save(saved, state / "train_state.pt")
    assert run(dataset, tmp_path / "out", "--resume", str(state)) == 0
    warnings = [e["message"] for e in read_events(tmp_path / "out" / "star.events.jsonl")[0] if e["event"] == "warning"]
    assert any("was saved by a later version of this trainer: what it recorded of a_later_counter is not read here"
               in m for m in warnings), warnings


def test_a_state_resumed_with_another_optimizer_is_refused_and_other_learning_rates_are_said(baseline, dataset,
                                                                                                tmp_path, capsys):
    """The moments in a state belong to the optimizer that made them; its rates and schedule replace the command's
    (as in sd-scripts), which a user changing --learning_rate on resume must hear."""
    state = baseline / "star-000001-state"
    assert run(dataset, tmp_path / "lion", "--resume", str(state), "--optimizer_type", "Lion") == 2
    error = capsys.readouterr().err
    assert f"was saved by --optimizer_type AdamW, and its moments do not fit Lion: resume with --optimizer_type AdamW, or " \
           f"start Lion afresh from its network with --network_weights {state / 'model.safetensors'}" in error
    assert not (tmp_path / "lion").exists() or not list((tmp_path / "lion").glob("*.safetensors"))
    assert run(dataset, tmp_path / "faster", "--resume", str(state), "--learning_rate", "5e-3") == 0
    events, _ = read_events(tmp_path / "faster" / "star.events.jsonl")
    said = [e["message"] for e in events if e["event"] == "warning" and "learning rates" in e["message"]]
    assert len(said) == 1 and "goes on at the learning rates it was saved with (0.001" in said[0]
    assert "not this command's (0.005" in said[0]


def test_a_resume_that_changes_the_schedule_is_said_and_one_that_changes_the_accumulation_is_refused(
        baseline, dataset, tmp_path, capsys):
    """Another scheduler, or more epochs under a decaying one, recomputes the rate over the new run: it jumped without
    a word. Another accumulation count changes what a step counts, and the run ended early without a word."""
    state = baseline / "star-000001-state"  # a constant-rate run of 2 epochs, 8 steps each
    assert run(dataset, tmp_path / "cosine", "--resume", str(state), "--lr_scheduler", "cosine") == 0
    said = [e["message"] for e in read_events(tmp_path / "cosine" / "star.events.jsonl")[0] if e["event"] == "warning"]
    assert any("the learning-rate schedule was constant over 16 steps, and is cosine over 16 now: the rate goes on from "
               "where the new schedule is at step 8" in message for message in said)
    assert run(dataset, tmp_path / "longer", "--resume", str(state), "--max_train_epochs", "3") == 0  # constant: no length
    said = [e["message"] for e in read_events(tmp_path / "longer" / "star.events.jsonl")[0] if e["event"] == "warning"]
    assert not any("schedule" in message for message in said)
    assert run(dataset, tmp_path / "accumulated", "--resume", str(state), "--gradient_accumulation_steps", "2") == 2
    assert (f"--gradient_accumulation_steps 2: --resume {state} counts its steps of 1 batch(es), so the run would end "
            "early or late; resume with --gradient_accumulation_steps 1") in capsys.readouterr().err
    events = tmp_path / "accumulated" / "star.events.jsonl"  # refused before the model loads and latents are cached
    assert "start" not in [e["event"] for e in read_events(events)[0]]


def test_a_state_resumed_with_another_network_alpha_keeps_its_own_and_the_files_say_so(baseline, dataset, tmp_path):
    state = baseline / "star-000001-state"
    assert run(dataset, tmp_path, "--resume", str(state), "--network_alpha", "1") == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert any(e["message"].startswith(f"--network_alpha 1: {state} was trained with alpha 4, which it keeps")
               for e in events if e["event"] == "warning")
    with safe_open(str(tmp_path / "star.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_network_alpha"] == "4.0"
        assert {float(handle.get_tensor(k)) for k in handle.keys() if k.endswith(".alpha")} == {4.0}
    resumed, uninterrupted = weights(tmp_path / "star.safetensors"), weights(baseline / "star.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)  # trained on as the state was


def test_save_now_writes_a_file_and_a_state_and_the_run_goes_on_unchanged(baseline, dataset, tmp_path, monkeypatch):
    control = tmp_path / "control"
    command_while_running(monkeypatch, control, "save")
    assert run(dataset, tmp_path / "a", "--stop_file", str(control)) == 0
    assert not control.exists()  # taken: the run saved once, then went on
    events, _ = read_events(tmp_path / "a" / "star.events.jsonl")
    assert [Path(e["path"]).name for e in events if e["event"] == "saved"] == ["star-step00000001.safetensors", "star.safetensors"]
    assert any(e["event"] == "state" for e in events) and events[-1]["steps"] == 16
    finished, uninterrupted = weights(tmp_path / "a" / "star.safetensors"), weights(baseline / "star.safetensors")
    assert all(torch.equal(finished[k], uninterrupted[k]) for k in uninterrupted)


def test_sample_now_draws_the_sample_prompts_at_that_step(dataset, tmp_path, monkeypatch):
    """Save now and sample now pressed within one step (the job runner adds a line each): both are done."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zkstar --w 64 --h 64 --s 2 --d 1\n", encoding="utf-8")
    control = tmp_path / "control"
    command_while_running(monkeypatch, control, "save\nsample\n")
    assert run(dataset, tmp_path / "a", "--stop_file", str(control), "--sample_prompts", str(prompts),
               "--max_train_epochs", "1") == 0
    events, _ = read_events(tmp_path / "a" / "star.events.jsonl")
    assert [e["step"] for e in events if e["event"] == "sample"] == [1]
    assert [Path(e["path"]).name for e in events if e["event"] == "saved"][0] == "star-step00000001.safetensors"
    assert events[-1]["event"] == "end" and events[-1]["steps"] == 8


def test_sample_now_then_pause_within_one_step_draws_the_samples_then_stops(dataset, tmp_path, monkeypatch):
    """"Sample now" then "Pause" within one step: the stop won and the samples were dropped without a word."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zkstar --w 64 --h 64 --s 2 --d 1\n", encoding="utf-8")
    control = tmp_path / "control"
    command_while_running(monkeypatch, control, "sample\npause\n")
    assert run(dataset, tmp_path / "a", "--stop_file", str(control), "--sample_prompts", str(prompts)) == 0
    events, _ = read_events(tmp_path / "a" / "star.events.jsonl")
    assert [e["step"] for e in events if e["event"] == "sample"] == [1]
    assert [e["step"] for e in events if e["event"] == "step"] == [1]
    assert events[-1]["event"] == "end" and events[-1]["stopped"] is True and not control.exists()


def test_each_sample_is_said_as_it_is_drawn_not_after_the_round(dataset, tmp_path, monkeypatch):
    """A round of samples takes minutes on a small GPU: the job runner, waiting to stop the run, hears the trainer
    drawing (a silent round was killed mid-sample, its step's save lost), and the UI shows each image as it comes."""
    from lora_trainer.training import samples

    txt2img, said_before = samples.txt2img, []

    def drawing(model, settings):
        events, _ = read_events(tmp_path / "a" / "star.events.jsonl")
        said_before.append(len([e for e in events if e["event"] == "sample"]))
        return txt2img(model, settings)

    monkeypatch.setattr(samples, "txt2img", drawing)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zkstar --w 64 --h 64 --s 2 --d 1\nzkstar red --w 64 --h 64 --s 2 --d 2\n", encoding="utf-8")
    assert run(dataset, tmp_path / "a", "--sample_prompts", str(prompts), "--sample_at_first",
               "--max_train_steps", "1") == 0
    assert said_before == [0, 1]


def test_a_failing_sample_is_a_warning_and_the_training_goes_on(dataset, tmp_path, monkeypatch, capsys):
    """A sample (out of memory on a small GPU at a large --w, say) shows the training: losing the run to it would lose
    hours; and one prompt that fails no longer loses the other prompts of that round."""
    from lora_trainer.training import samples

    txt2img = samples.txt2img

    def broken_for_large(model, settings):
        if settings.width > 64:
            raise RuntimeError("out of memory while drawing")
        return txt2img(model, settings)

    monkeypatch.setattr(samples, "txt2img", broken_for_large)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zkstar --w 128 --h 64 --s 1\nzkstar, small --w 64 --h 64 --s 1\n", encoding="utf-8")
    assert run(dataset, tmp_path / "a", "--sample_prompts", str(prompts), "--sample_every_n_steps", "4") == 0
    events, _ = read_events(tmp_path / "a" / "star.events.jsonl")
    warnings = [e["message"] for e in events if e["event"] == "warning" and "sample prompt" in e["message"]]
    assert warnings[0] == ("sample prompt 1 at step 4 failed (RuntimeError: out of memory while drawing); training "
                           "goes on, the other prompts are drawn") and len(warnings) == 4
    assert [e["step"] for e in events if e["event"] == "sample"] == [4, 8, 12, 16]  # the second prompt, each time
    assert events[-1]["event"] == "end" and (tmp_path / "a" / "star.safetensors").is_file()


def test_sample_settings_that_do_not_do_what_they_say_are_said_at_the_start(dataset, tmp_path, capsys):
    """Timing without a prompts file drew nothing without a word; steps and epochs together draw by epoch alone (as
    sd-scripts does); prompt syntax the sample cannot follow is named; a seed no generator takes is refused."""
    assert run(dataset, tmp_path / "a", "--sample_at_first", "--sample_every_n_steps", "2", "--max_train_steps", "1") == 0
    events, _ = read_events(tmp_path / "a" / "star.events.jsonl")
    warned = [e["message"] for e in events if e["event"] == "warning"]
    assert ("--sample_every_n_steps and --sample_at_first without --sample_prompts: no samples are drawn; give a "
            "prompts file") in warned
    prompts = tmp_path / "p.txt"
    prompts.write_text("zkstar, [red:blue:0.5], (smile:1.2 --n (ugly --w 64 --h 64 --s 1\n", encoding="utf-8")
    assert run(dataset, tmp_path / "b", "--sample_prompts", str(prompts), "--sample_every_n_steps", "2",
               "--sample_every_n_epochs", "1", "--max_train_steps", "1") == 0
    events, _ = read_events(tmp_path / "b" / "star.events.jsonl")
    warned = [e["message"] for e in events if e["event"] == "warning"]
    assert any(m.startswith("--sample_every_n_steps and --sample_every_n_epochs: samples are drawn every 1 epoch(s) "
                            "only") for m in warned)
    assert any(m.startswith(f"{prompts} prompt 1, prompt: ") and "prompt editing" in m for m in warned)
    assert any(m.startswith(f"{prompts} prompt 1, negative prompt: ") for m in warned)
    prompts.write_text("zkstar --d 18446744073709551616\n", encoding="utf-8")
    assert run(dataset, tmp_path / "c", "--sample_prompts", str(prompts)) == 2
    assert f"{prompts} line 1: seed 18446744073709551616 is larger than a seed can be" in capsys.readouterr().err


def test_an_unknown_sampler_is_refused_before_the_run_with_the_names_to_use(dataset, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zkstar --w 64 --h 64\nzkstar, red --ss bogus_sampler\n", encoding="utf-8")
    assert run(dataset, tmp_path / "a", "--sample_prompts", str(prompts)) == 2
    assert f"{prompts} line 2: sampler: unknown sampler 'bogus_sampler': use one of Euler, Euler a" in capsys.readouterr().err
    assert run(dataset, tmp_path / "a", "--sample_sampler", "k_eulr") == 2
    assert "--sample_sampler: unknown sampler 'k_eulr'" in capsys.readouterr().err
    assert not list((tmp_path / "a").glob("*.safetensors"))


def test_bad_runs_are_refused_before_heavy_work_with_the_reason(dataset, tmp_path, capsys):
    assert run(tmp_path / "missing", tmp_path) == 2
    assert "--train_data_dir" in capsys.readouterr().err
    assert run(dataset, tmp_path, "--v2") == 2
    assert "--v2 is set but" in capsys.readouterr().err
    assert run(dataset, tmp_path, "--adaptive_noise_scale", "0.1") == 2
    assert "needs --noise_offset" in capsys.readouterr().err
    assert run(dataset, tmp_path, "--output_name", "star:v2") == 2  # trains on Linux, then cannot be copied to Windows
    assert "--output_name 'star:v2' cannot be a file name on Windows" in capsys.readouterr().err
    assert run(dataset, tmp_path, "--output_name", "星" * 70) == 2  # 210 bytes: the file fits, its step states do not
    assert "--output_name is 210 bytes long in UTF-8" in capsys.readouterr().err
    assert run(dataset, tmp_path, "--log_with", "wandb") == 2  # was trained without a word of logging
    assert "--log_with wandb: Weights & Biases is not supported here" in capsys.readouterr().err
    assert run(dataset, tmp_path, "--log_with", "tensorboard") == 2
    assert "--log_with tensorboard needs --logging_dir" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.safetensors"))


def test_log_folder_names_windows_cannot_make_are_refused_before_the_model_loads(tmp_path):
    """The TensorBoard folder <logging_dir>/<log_prefix><time>/<log_tracker_name> was made after the model loaded:
    a ':' there ended the run on Windows as an unexpected OSError."""
    from lora_trainer.training.options import options_from, validate

    def problems(**names) -> str:
        try:
            validate(options_from({"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": str(tmp_path),
                                   "logging_dir": str(tmp_path / "logs"), **names}))
        except UserError as error:
            return str(error)
        return ""

    assert "--log_prefix 'run:': Windows cannot make that folder" in problems(log_prefix="run:")
    assert "--log_tracker_name 'net?': Windows cannot make that folder" in problems(log_tracker_name="net?")
    assert "--log_tracker_name 'CON'" in problems(log_tracker_name="CON")
    assert "--log_prefix 'proj. /run_'" in problems(log_prefix="proj. /run_")
    for escaping in ({"log_prefix": "../../../tmp/escaped_"}, {"log_prefix": "/tmp/abs_"}, {"log_prefix": "C:run_"},
                     {"log_tracker_name": "a/../../b"}, {"log_tracker_name": "\\\\server\\share"}):
        assert "the log folder must stay inside --logging_dir" in problems(**escaping), escaping  # the API's roots
    # what sd-scripts users write: the time follows the prefix, and a / makes a folder inside, as there
    for fine in ({"log_prefix": "星 run. ", "log_tracker_name": "network train"}, {"log_prefix": "my-lora-"},
                 {"log_prefix": "proj/run_"}, {"log_prefix": ".hidden_"}, {"log_tracker_name": "a\\b"}):
        assert "log_" not in problems(**fine), fine


def test_logging_without_tensorboard_installed_is_refused_before_the_model_loads(dataset, tmp_path, monkeypatch, capsys):
    """Found when the writer was made, it came after the loading and caching (and under torchrun left the other ranks
    failing with a gloo traceback): now every rank says it before the start event."""
    monkeypatch.setattr(tracking, "tensorboard_installed", lambda: False)
    assert run(dataset, tmp_path, "--logging_dir", str(tmp_path / "logs")) == 2
    assert "--logging_dir writes TensorBoard logs and needs the tensorboard package" in capsys.readouterr().err
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert "start" not in [e["event"] for e in events] and not (tmp_path / "logs").exists()
    # installed, but too old for torch's writer (it needs tensorboard 1.15 or later): said, not a traceback
    monkeypatch.setattr(tracking, "tensorboard_installed", lambda: True)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import raises ImportError
    with pytest.raises(UserError, match="tensorboard is installed but torch cannot use it") as error:
        tracking.Tracker(str(tmp_path / "logs"), None, None)
    assert error.value.field == "logging_dir"


def test_sample_images_are_drawn_at_first_and_every_epoch_with_sd_scripts_names(dataset, tmp_path):
    from lora_trainer.training.samples import parse_txt_line

    prompt = parse_txt_line("zkstar, red background --n blurry --w 64 --h 70 --s 3 --l 5 --d 5")
    assert (prompt.negative_prompt, prompt.width, prompt.height, prompt.steps, prompt.scale, prompt.seed) == ("blurry", 64, 64, 3, 5.0, 5)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# samples\nzkstar, red background --w 64 --h 64 --s 3 --d 5\n", encoding="utf-8")
    assert run(dataset, tmp_path, "--sample_prompts", str(prompts), "--sample_every_n_epochs", "1", "--sample_at_first",
               "--sample_sampler", "euler_a") == 0
    names = sorted(p.name for p in (tmp_path / "sample").iterdir())
    assert [n[:14] for n in names] == ["star_e000000_0", "star_e000001_0", "star_e000002_0"]
    assert all(n.endswith("_5.png") for n in names)
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert sum(e["event"] == "sample" for e in events) == 3
    assert not [e for e in events if e["event"] == "warning" and "<lora:" in e["message"]]
    prompts.write_text("zkstar <lora:other:0.5>, red background --w 64 --h 64 --s 3\n", encoding="utf-8")
    assert run(dataset, tmp_path / "tagged", "--sample_prompts", str(prompts), "--sample_at_first",
               "--max_train_steps", "1", "--max_train_epochs", "0") == 0
    events, _ = read_events(tmp_path / "tagged" / "star.events.jsonl")
    assert [e["message"] for e in events if e["event"] == "warning" and "<lora:" in e["message"]] == [
        f"{prompts} prompt 1: its <lora:…> tags are left out; a sample shows the base model with the network being "
        "trained, and no other"]


def test_sample_prompt_files_in_toml_and_json_read_as_sd_scripts_reads_them(tmp_path):
    """sd-scripts' three formats for the same two prompts: [prompt] defaults with [[prompt.subset]] entries, a JSON
    list of objects, and --options lines."""
    from lora_trainer.training.samples import read_prompts

    (tmp_path / "p.txt").write_text("zkstar, red dress --n blurry --w 64 --h 96 --s 12 --l 6 --d 7 --ss euler_a\n"
                                    "zkstar, white hair --n blurry --w 64 --h 64 --s 12 --l 6\n", encoding="utf-8")
    (tmp_path / "p.toml").write_text(
        '[prompt]\nnegative_prompt = "blurry"\nwidth = 64\nheight = 64\nsample_steps = 12\nscale = 6\n'
        '[[prompt.subset]]\nprompt = "zkstar, red dress"\nheight = 96\nseed = 7\nsample_sampler = "euler_a"\n'
        '[[prompt.subset]]\nprompt = "zkstar, white hair"\n', encoding="utf-8")
    (tmp_path / "p.json").write_text(
        '[{"prompt": "zkstar, red dress", "negative_prompt": "blurry", "width": 64, "height": 96, "sample_steps": 12,'
        ' "scale": 6, "seed": 7, "sample_sampler": "euler_a"},'
        ' {"prompt": "zkstar, white hair", "negative_prompt": "blurry", "width": 64, "height": 64, "sample_steps": 12,'
        ' "scale": 6}]', encoding="utf-8")
    from_txt = read_prompts(tmp_path / "p.txt")
    assert [(p.prompt, p.height, p.seed, p.sampler) for p in from_txt] == [
        ("zkstar, red dress", 96, 7, "euler_a"), ("zkstar, white hair", 64, None, None)]
    assert read_prompts(tmp_path / "p.toml") == from_txt
    assert read_prompts(tmp_path / "p.json") == from_txt
    # sd-scripts reads the options in any case; -1 asks for a new seed each time, as in the WebUI
    (tmp_path / "upper.txt").write_text("zkstar --W 64 --H 96 --D -1\n", encoding="utf-8")
    assert [(p.width, p.height, p.seed) for p in read_prompts(tmp_path / "upper.txt")] == [(64, 96, None)]


def test_a_number_option_is_read_by_its_leading_number_as_sd_scripts_reads_it_and_the_rest_is_said(dataset, tmp_path):
    """sd-scripts reads --w 768px as 768 and --l 7,5 as 7 (re.match(r"l ([\\d\\.]+)")): they were refused here; read
    the same, the ignored rest is said once, so a decimal comma does not pass as a silent 7."""
    from lora_trainer.training.samples import read_prompts

    prompts = tmp_path / "p.txt"
    prompts.write_text("# samples\nzkstar --w 64px --h 64 --l 7,5 --s 2,5\n", encoding="utf-8")
    (prompt,) = read_prompts(prompts)
    assert (prompt.width, prompt.scale, prompt.steps) == (64, 7.0, 2)
    assert prompt.read_partly == (
        f"{prompts} line 2: --w 64px is read as 64, as sd-scripts reads it ('px' after the number is ignored)",
        f"{prompts} line 2: --l 7,5 is read as 7, as sd-scripts reads it (',5' after the number is ignored; for a "
        "decimal write 7.5)",
        f"{prompts} line 2: --s 2,5 is read as 2, as sd-scripts reads it (',5' after the number is ignored)")  # whole steps
    assert run(dataset, tmp_path / "run", "--sample_prompts", str(prompts), "--sample_every_n_steps", "-1",
               "--max_train_steps", "1", "--max_train_epochs", "0") == 0
    events, _ = read_events(tmp_path / "run" / "star.events.jsonl")
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert all(warnings.count(message) == 1 for message in prompt.read_partly)
    for line, said in (("zkstar --w big", "--w big does not start with a number, so sd-scripts would not read it either; "
                        "give one, such as --w 512"), ("zkstar --l 7.5.1", "scale '7.5.1' is not a number"),
                       ("zkstar --l -1", "--l -1 is a negative number, which sd-scripts does not read; give one, such as "
                        "--l 7.5")):
        prompts.write_text(line + "\n", encoding="utf-8")
        with pytest.raises(UserError, match=re.escape(f"{prompts} line 1: {said}")):
            read_prompts(prompts)


def test_json_lines_read_as_txt_lines_and_options_not_read_are_named(tmp_path):
    """sd-scripts reads a JSON string as a .txt line, options and all; a typo'd or other-model option is kept
    apart to be said, not dropped in silence."""
    from lora_trainer.training.samples import not_read_warning, read_prompts

    (tmp_path / "p.json").write_text('["zkstar --n ugly --w 64 --d 4 --neg blurry --g 3.5"]', encoding="utf-8")
    (prompt,) = read_prompts(tmp_path / "p.json")
    assert (prompt.prompt, prompt.negative_prompt, prompt.width, prompt.seed) == ("zkstar", "ugly", 64, 4)
    assert prompt.not_read == ("--neg", "--g (for sd-scripts' other models)")
    assert not_read_warning(tmp_path / "p.json", 1, prompt).startswith(
        f"{tmp_path / 'p.json'} prompt 1: --neg, --g (for sd-scripts' other models) not read")
    (tmp_path / "p.toml").write_text('[prompt]\nwidth = 64\n[[prompt.subset]]\nprompt = "zkstar"\nnegative_promt = "x"\n',
                                     encoding="utf-8")
    assert read_prompts(tmp_path / "p.toml")[0].not_read == ("negative_promt",)


@pytest.mark.parametrize("name, text, problem", [
    ("bad.toml", "[prompt\n", "is not valid TOML: "),
    ("bad.json", '[{"prompt": "a"},]', "is not valid JSON: "),
    ("flat.toml", '[[prompts]]\nprompt = "a"\n', "write the defaults under [prompt] and one [[prompt.subset]]"),
    ("number.json", "5", "give a JSON list of prompts"),
    ("noprompt.json", '[{"width": 64}]', "prompt 1: give each prompt as a table"),
])
def test_a_malformed_prompts_file_is_one_message_naming_it(tmp_path, name, text, problem):
    from lora_trainer.training.samples import read_prompts

    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=r"^" + re.escape(f"{tmp_path / name}")) as error:
        read_prompts(tmp_path / name)
    assert problem in str(error.value)


def test_samples_that_would_never_be_drawn_are_said(dataset, tmp_path):
    from lora_trainer.training.options import parse_args

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n", encoding="utf-8")
    assert run(dataset, tmp_path / "a", "--sample_prompts", str(empty), "--sample_every_n_steps", "-1",
               "--max_train_steps", "2", "--max_train_epochs", "0") == 0
    events, _ = read_events(tmp_path / "a" / "star.events.jsonl")
    assert f"{empty} holds no prompt: no samples are drawn" in [e["message"] for e in events if e["event"] == "warning"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("zkstar --w 64 --h 64 --s 2\n", encoding="utf-8")
    assert run(dataset, tmp_path / "b", "--sample_prompts", str(prompts), "--sample_every_n_steps", "-1",
               "--max_train_steps", "2", "--max_train_epochs", "0", "--sample_sampler", "dpmsolver++") == 0
    events, _ = read_events(tmp_path / "b" / "star.events.jsonl")
    assert "samples are drawn with the closest sampler this trainer has: dpmsolver++ with DPM++ 2M Karras" in [
        e["message"] for e in events if e["event"] == "warning"]
    assert not [e for e in events if e["event"] == "sample"]  # 0 or less is no interval, as sd-scripts reads it
    assert any(e["message"].startswith("--sample_prompts without --sample_every_n_steps") for e in events
               if e["event"] == "warning")
    assert parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                       "--sample_every_n_epochs", "0"])[0].sample_every_n_epochs is None


def test_an_unreadable_sample_prompt_is_named_with_its_line_before_any_work(dataset, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# samples\nzkstar --w 64\nzkstar --w big\n", encoding="utf-8")
    assert run(dataset, tmp_path, "--sample_prompts", str(prompts), "--sample_every_n_epochs", "1") == 2
    assert f"{prompts} line 3: --w big does not start with a number" in capsys.readouterr().err
    assert not (tmp_path / "star.events.jsonl").exists()


def test_validation_split_gives_a_loss_per_epoch_and_a_recommended_epoch(dataset, tmp_path):
    assert run(dataset, tmp_path, "--validation_split", "0.25", "--validation_seed", "5") == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    validations = [e for e in events if e["event"] == "validation"]
    assert [v["epoch"] for v in validations] == [1, 2] and all(v["loss"] > 0 for v in validations)
    end = events[-1]
    lowest = min(v["loss"] for v in validations)  # the earliest epoch within 1 % of it: a tie is a few images' noise
    best = next(v["epoch"] for v in validations if v["loss"] <= lowest * 1.01)
    assert end["recommended_epoch"] == best and "validation loss" in end["reason"]
    assert len(end["highest_loss_images"]) <= 5  # only images clearly above the others: often none
    with safe_open(str(tmp_path / "star.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_num_validation_images"] == "4" and metadata["ss_num_train_images"] == "24"
    losses = json.loads(metadata["lora_trainer.losses"])
    assert set(losses["epoch_validation_loss"]) == {"1", "2"}
    # the events (read on this machine) name the files; a shared file names the folder and the image only
    assert [name for name, _ in losses["highest_loss_images"]] == [
        f"2_zkstar/{Path(path).name}" for path, _ in end["highest_loss_images"]]


def test_recommendation_without_a_split_is_the_knee_of_the_training_loss():
    from lora_trainer.training.evaluation import recommend_epoch

    advice = recommend_epoch([1.0, 0.5, 0.3, 0.28, 0.27, 0.26], [None] * 6)
    assert advice.epoch == 3 and "knee" in advice.reason
    # a run continued from epoch 5 (--initial_epoch) numbers its epochs from there
    assert recommend_epoch([1.0, 0.5, 0.3, 0.28, 0.27, 0.26], [None] * 6, list(range(5, 11))).epoch == 7


def test_without_a_knee_the_recommendation_is_the_last_epoch_and_says_why():
    """A loss still falling evenly recommended epoch 1 (no point below the chord: max() fell back to the first),
    a rising one a middle epoch, and two epochs were called a knee."""
    from lora_trainer.training.evaluation import recommend_epoch

    falling = recommend_epoch([0.1077, 0.0948, 0.0786], [None] * 3)
    assert falling.epoch == 3 and "still falling about evenly: more epochs may still pay off" in falling.reason
    assert recommend_epoch([1.0 - 0.05 * i for i in range(10)], [None] * 10).epoch == 10
    rising = recommend_epoch([0.1, 0.11, 0.12, 0.13], [None] * 4)
    assert rising.epoch == 4 and "did not fall" in rising.reason
    two = recommend_epoch([0.2, 0.1], [None, None], no_validation="validation never ran on an epoch (every 100 epochs)")
    assert two.epoch == 2 and two.reason.startswith("validation never ran on an epoch (every 100 epochs); 2 epochs are "
                                                    "too few")
    knee = recommend_epoch([1.0, 0.5, 0.3, 0.28, 0.27, 0.26], [None] * 6)
    # shown as "recommended epoch: 3 (reason)": a reason closing its own parenthesis read "… grid))"
    assert [advice.reason.endswith(")") for advice in (falling, rising, two, knee)] == [False] * 4


def test_validation_ties_go_to_the_earlier_epoch_and_a_nan_is_never_the_best():
    from lora_trainer.training.evaluation import recommend_epoch

    tied = recommend_epoch([0.3, 0.2, 0.1, 0.05], [0.1001, 0.1000, 0.1002, 0.0999])
    assert tied.epoch == 1 and "within 1% of the lowest (0.0999, epoch 4)" in tied.reason
    assert recommend_epoch([0.3, 0.2, 0.1, 0.05], [0.2, 0.1, 0.15, 0.18]).epoch == 2
    assert recommend_epoch([0.3, 0.2, 0.1, 0.05], [float("nan"), 0.25, 0.22, 0.26]).epoch == 3


def test_bucket_steps_follow_sd_scripts_multiples_sd1_64_sdxl_32(dataset, tmp_path, capsys):
    from lora_trainer.dataset.config import DatasetConfig, DatasetGroupConfig
    from lora_trainer.models.configs import SD1, SDXL
    from lora_trainer.training.data import check_bucket_steps

    check_bucket_steps(DatasetGroupConfig((DatasetConfig("dreambooth", (), bucket_reso_steps=32),)), SDXL)
    with pytest.raises(UserError, match="bucket_reso_steps 32: SD1 training needs a multiple of 64"):
        check_bucket_steps(DatasetGroupConfig((DatasetConfig("dreambooth", (), bucket_reso_steps=32),)), SD1)
    assert run(dataset, tmp_path, "--enable_bucket", "--bucket_reso_steps", "8", "--min_bucket_reso", "32") == 2
    assert "bucket_reso_steps 8: SD1 training needs a multiple of 64" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.safetensors"))


def test_a_recommended_epoch_without_a_kept_file_says_how_to_keep_it(dataset, tmp_path, monkeypatch):
    import lora_trainer.training.trainer as trainer
    from lora_trainer.training.evaluation import Recommendation

    monkeypatch.setattr(trainer, "recommend_epoch", lambda *losses: Recommendation(1, "the knee"))
    assert run(dataset, tmp_path / "finals only") == 0  # 2 epochs, only the final file
    end = read_events(tmp_path / "finals only" / "star.events.jsonl")[0][-1]
    assert end["recommended_epoch"] == 1 and "no file of epoch 1 was kept" in end["reason"]
    assert "--save_every_n_epochs 1" in end["reason"]
    assert not end["reason"].endswith(")")  # shown as "(reason)": it read "… larger))"
    assert run(dataset, tmp_path / "every epoch", "--save_every_n_epochs", "1") == 0
    end = read_events(tmp_path / "every epoch" / "star.events.jsonl")[0][-1]
    assert end["reason"] == "the knee"


def test_dataset_config_toml_trains_with_its_own_repeats_and_writes_ss_datasets(dataset, tmp_path):
    config = tmp_path / "dataset.toml"
    config.write_text(
        "[general]\ncaption_extension = '.txt'\nshuffle_caption = true\nkeep_tokens = 1\n"
        "[[datasets]]\nresolution = 64\nbatch_size = 4\n"
        f"  [[datasets.subsets]]\n  image_dir = '{(dataset / '2_zkstar').as_posix()}'\n  num_repeats = 1\n  flip_aug = true\n",
        encoding="utf-8")
    assert train_main([
        "--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--dataset_config", str(config),
        "--output_dir", str(tmp_path / "out"), "--output_name", "star", "--network_module", "networks.lora",
        "--network_dim", "4", "--learning_rate", "1e-3", "--max_train_epochs", "1", "--cache_latents", "--seed", "3",
        "--train_data_dir", str(dataset),  # a Kohya GUI keeps its folder field: not read, as sd-scripts says
    ]) == 0
    events, _ = read_events(tmp_path / "out" / "star.events.jsonl")
    assert f"--dataset_config {config} describes the data: --train_data_dir is not read" in [
        e["message"].split(" (")[0] for e in events if e["event"] == "warning"]
    with safe_open(str(tmp_path / "out" / "star.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["ss_dataset_dirs"]) == {"2_zkstar": {"n_repeats": 1, "img_count": 16}}
    assert "ss_reg_dataset_dirs" not in metadata  # ss_datasets tells the regularisation subsets, as in sd-scripts
    datasets = json.loads(metadata["ss_datasets"])
    assert metadata["ss_steps"] == "4" and "ss_resolution" not in metadata  # 16 images, repeats 1 (folder prefix ignored), batch 4
    assert datasets[0]["subsets"][0]["image_dir"] == "2_zkstar" and datasets[0]["subsets"][0]["flip_aug"] is True


def test_a_datasets_network_multiplier_scales_the_network_while_its_batches_train(dataset, tmp_path):
    """sd-scripts' per-dataset ``network_multiplier``: at 0 its batches see no network, so they teach it nothing."""
    def trained_with(multiplier: str, out: Path) -> dict[str, torch.Tensor]:
        config = tmp_path / f"dataset {multiplier}.toml"
        config.write_text(f"[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = 64\nbatch_size = 4\n"
                          f"network_multiplier = {multiplier}\n  [[datasets.subsets]]\n"
                          f"  image_dir = '{(dataset / '2_zkstar').as_posix()}'\n  num_repeats = 1\n", encoding="utf-8")
        assert train_main(["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--dataset_config", str(config),
                           "--output_dir", str(out), "--output_name", "star", "--network_dim", "4", "--learning_rate",
                           "1e-3", "--max_train_epochs", "1", "--cache_latents", "--seed", "3"]) == 0
        return weights(out / "star.safetensors")

    ups = [t for k, t in trained_with("0.0", tmp_path / "off").items() if k.endswith("lora_up.weight")]
    assert ups and all(t.eq(0).all() for t in ups)
    assert any(t.ne(0).any() for k, t in trained_with("1.0", tmp_path / "on").items() if k.endswith("lora_up.weight"))


@pytest.mark.parametrize("caching", [("--cache_latents",), ()], ids=["cached", "per-batch"])
def test_a_vae_that_gives_nan_latents_stops_the_run_naming_the_image_and_the_fix(dataset, tmp_path, capsys, caching):
    """In fp16 the SDXL VAE overflows to NaN (the WebUI's --no-half-vae message): say so at the image, not later as a
    NaN loss with no cause."""
    from safetensors.torch import save_file

    state = load_file(str(TINY_MODEL_PATH))
    state["first_stage_model.encoder.conv_in.bias"][0] = float("nan")
    model = tmp_path / "broken vae.safetensors"
    save_file(state, str(model))
    args = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(dataset), "--output_dir",
            str(tmp_path / "out"), "--resolution", "64", "--max_train_epochs", "1", "--max_data_loader_n_workers", "0"]
    assert train_main([*args, *caching]) == 2
    err = capsys.readouterr().err
    assert "2_zkstar" in err and ".png: the VAE (float32) gave NaN/Inf latents; check the VAE weights" in err
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_a_plain_cuda_device_is_this_ranks_gpu_and_a_missing_one_is_named(monkeypatch):
    """Under torchrun, --device cuda must put each rank on its own GPU (all on GPU 0 stops NCCL), and cuda:7 on a
    two-GPU machine is refused before loading, not by a CUDA error later."""
    from lora_trainer.training.distributed import World
    from lora_trainer.training.trainer import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda", World(1, 2, 1)) == torch.device("cuda", 1)
    assert pick_device("cuda") == torch.device("cuda", 0)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="--device cuda:1 under torchrun would put all 2 processes on GPU 1"):
        pick_device("cuda:1", World(0, 2, 0))  # each rank on that one GPU: NCCL's "Duplicate GPU", or shared memory
    with pytest.raises(UserError, match="--device cuda:7: this machine has 2 CUDA GPU"):
        pick_device("cuda:7")


def test_a_gpu_the_run_cannot_use_is_said_before_loading(dataset, tmp_path, capsys, monkeypatch):
    from lora_trainer.training.options import options_from
    from lora_trainer.training.trainer import check_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run(dataset, tmp_path, "--device", "cuda") == 2
    assert "--device cuda: this PyTorch" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    options = options_from({"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d", "mixed_precision": "bf16"})
    with pytest.raises(UserError, match="--mixed_precision bf16: Tesla T4 has no bf16 arithmetic; use --mixed_precision fp16"):
        check_precision(options, torch.device("cuda"))
    check_precision(options, torch.device("cpu"))  # the CPU computes in fp32 anyway
    # torch 2.1 (the WebUI's) takes no argument: asking with one stopped every CUDA bf16 run at its start
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    check_precision(options, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(UserError, match="Tesla T4 has no bf16 arithmetic"):
        check_precision(options, torch.device("cuda"))
    fp16 = options_from({"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d", "mixed_precision": "fp16"})
    monkeypatch.setattr("lora_trainer.training.trainer.SCALES_LOSS_ON_CPU", True)  # torch 2.3 and later
    check_precision(fp16, torch.device("cpu"))
    monkeypatch.setattr("lora_trainer.training.trainer.SCALES_LOSS_ON_CPU", False)  # the WebUI's torch 2.1
    with pytest.raises(UserError, match="--mixed_precision fp16 on the CPU: this PyTorch .* use --mixed_precision bf16"):
        check_precision(fp16, torch.device("cpu"))


def test_save_n_epoch_ratio_spaces_the_epoch_files_over_the_run_as_sd_scripts_does(tmp_path):
    """sd-scripts: every floor(epochs / ratio) epochs, at least every epoch; the last epoch is the final file."""
    from lora_trainer.training.options import options_from
    from lora_trainer.training.outputs import OutputPlan

    def saved_epochs(epochs: int, ratio: int) -> list[int]:
        plan = OutputPlan(options_from({"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d",
                                        "output_dir": str(tmp_path / "out"), "save_n_epoch_ratio": ratio}))
        plan.num_epochs = epochs  # counted once the data is read, after the plan was checked
        return [epoch for epoch in range(1, epochs + 1) if plan.save_at_epoch(epoch)]

    assert saved_epochs(10, 3) == [3, 6, 9]
    assert saved_epochs(2, 3) == [1]
    assert saved_epochs(11, 4) == [2, 4, 6, 8, 10]  # floor(11 / 4) = 2, not 11 / 4 rounded to 3


def test_save_last_n_epochs_counts_saved_files_not_epochs(tmp_path):
    """sd-scripts removes epoch - save_every_n_epochs × save_last_n_epochs: saving every 2 epochs and keeping 2, the
    save at epoch 6 removes epoch 2's file and state and keeps epoch 4's."""
    from lora_trainer.training.options import options_from
    from lora_trainer.training.outputs import OutputPlan

    plan = OutputPlan(options_from({"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d",
                                    "output_dir": str(tmp_path), "output_name": "star", "save_every_n_epochs": 2,
                                    "save_last_n_epochs": 2, "save_state": True}))
    for epoch in (2, 4, 6):
        plan.epoch_path(epoch).write_bytes(b"")
        plan.state_path(epoch, None).mkdir()
    plan.prune_epochs(6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["star-000004-state", "star-000004.safetensors",
                                                          "star-000006-state", "star-000006.safetensors"]


def test_save_last_n_steps_keeps_the_files_of_the_last_n_steps_as_sd_scripts_counts_them(tmp_path):
    """sd-scripts removes the file of step (step - n - 1) floored to the saving interval: saving every 10 steps and
    keeping 20, the save at step 40 removes step 10's file and state and keeps steps 20 and 30."""
    from lora_trainer.training.options import options_from
    from lora_trainer.training.outputs import OutputPlan

    plan = OutputPlan(options_from({"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d",
                                    "output_dir": str(tmp_path), "output_name": "star", "save_every_n_steps": 10,
                                    "save_last_n_steps": 20, "save_state": True}))
    for step in (10, 20, 30, 40):
        plan.step_path(step).write_bytes(b"")
        plan.state_path(None, step).mkdir()
        plan.prune_steps(step)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "star-step00000020-state", "star-step00000020.safetensors", "star-step00000030-state",
        "star-step00000030.safetensors", "star-step00000040-state", "star-step00000040.safetensors"]


def test_a_run_without_an_output_name_names_files_and_states_as_sd_scripts(tmp_path):
    """sd-scripts' DEFAULT_EPOCH_NAME, DEFAULT_STEP_NAME and DEFAULT_LAST_OUTPUT_NAME: the states were last-000001-state
    and last-step…-state, which scripts looking for epoch-000001-state (sd-scripts' name) missed."""
    from lora_trainer.training.options import options_from
    from lora_trainer.training.outputs import OutputPlan

    plan = OutputPlan(options_from({"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d",
                                    "output_dir": str(tmp_path)}))
    assert [plan.epoch_path(1).name, plan.step_path(1).name, plan.final_path().name] == [
        "epoch-000001.safetensors", "at-step00000001.safetensors", "last.safetensors"]
    assert [plan.state_path(1, None).name, plan.state_path(None, 1).name, plan.state_path(None, None).name] == [
        "epoch-000001-state", "at-step00000001-state", "last-state"]
    for leftover in ("epoch-000001-state.tmp", "at-step00000001-state.tmp"):  # and a killed save's staging goes
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_bytes(b"0" * 10)
    assert "removed what a run named 'last' left" in plan.remove_leftovers(now=time.time() + 3600)
    assert not list(tmp_path.iterdir())


def test_a_run_whose_paths_windows_cannot_hold_is_refused_before_loading(dataset, tmp_path, capsys, monkeypatch):
    """Where long paths are off, Windows refuses paths over 259 characters: a deep WebUI folder and a long name would
    train for hours and then fail at the first save. The check counts what a run may write, exactly."""
    from lora_trainer.safe_io import windows_path_length
    from lora_trainer.training.options import options_from
    from lora_trainer.training.outputs import OutputPlan

    def plan(folder: Path) -> OutputPlan:
        return OutputPlan(options_from({"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d",
                                        "output_dir": str(folder), "output_name": "star"}))

    def padded(characters: int) -> str:  # a folder name that many UTF-16 units long, some of them CJK
        return "深" * min(characters, 50) + "x" * max(characters - 50, 0)

    files, folders = plan(tmp_path / "x").longest_paths()
    room = 1 + min(259 - max(map(windows_path_length, files)), 247 - max(map(windows_path_length, folders)))
    plan(tmp_path / padded(room)).check_path_lengths((259, 247))  # fits to the character
    with pytest.raises(UserError, match="shorten --output_dir or --output_name by 1 character, "):
        plan(tmp_path / padded(room + 1)).check_path_lengths((259, 247))
    plan(tmp_path / padded(room + 1)).check_path_lengths(None)  # Linux, or Windows with long paths enabled

    monkeypatch.setattr("lora_trainer.training.trainer.windows_path_limits", lambda: (259, 247))
    out = tmp_path / padded(room + 5)
    assert run(dataset, out) == 2
    error = capsys.readouterr().err
    assert "Windows allows 259 unless long paths are enabled: shorten --output_dir or --output_name by 5" in error
    events, _ = read_events(out / "star.events.jsonl")
    assert [e["event"] for e in events] == ["error"]  # no start: refused before the model was loaded


def test_caches_beside_images_that_windows_cannot_hold_are_refused_before_caching(tmp_path, capsys, monkeypatch):
    """sd-scripts' cache names are longer than the image's (``img_0064x0064_sd.npz``): in a deep dataset folder every
    image opens and its cache cannot be written. Said before the caching starts, with the ways out; in memory it runs."""
    from lora_trainer.safe_io import windows_path_length
    from lora_trainer.training.options import options_from
    from lora_trainer.training.outputs import OutputPlan

    deep = tmp_path / ("深" * 60 + "x" * 40) / "2_zkstar"  # 100 UTF-16 units, 220 bytes: any file system holds it
    shutil.copytree(SAMPLE, deep)
    out = tmp_path / "o"
    limit = max(windows_path_length(p) for p in deep.iterdir()) + 5  # the images (and captions) fit, their caches not
    files, folders = OutputPlan(options_from({"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d",
                                              "output_dir": str(out), "output_name": "star"})).longest_paths()
    assert max(map(windows_path_length, files + folders)) < limit - 12  # the outputs fit
    monkeypatch.setattr("lora_trainer.training.trainer.windows_path_limits", lambda: (limit, limit - 12))

    assert run(deep.parent, out, "--cache_latents_to_disk", "--max_train_steps", "1") == 2
    error = capsys.readouterr().err
    assert f"--cache_latents_to_disk would write {deep / 'star_0'}" in error  # one of the longest: all are as long
    assert "_0064x0064_sd.npz beside its image, and its temporary name is" in error
    assert "move the dataset to a folder" in error and "drop --cache_latents_to_disk" in error
    assert not list(deep.glob("*.npz"))
    events, _ = read_events(out / "star.events.jsonl")
    assert [e["event"] for e in events] == ["error"]  # before the start: nothing cached, nothing trained

    assert run(deep.parent, out, "--max_train_steps", "1") == 0  # cached in memory: no path beside the images


def test_a_nan_loss_stops_the_run_with_advice_and_keeps_the_files_saved_before(baseline, dataset, tmp_path, capsys,
                                                                               monkeypatch):
    from lora_trainer.training import trainer

    calls = []

    def poisoned(*args, **kwargs):  # the loss weights of step 12 (epoch 2) and on are NaN
        calls.append(1)
        weights = loss_weights(*args, **kwargs)
        return weights * float("nan") if len(calls) >= 12 else weights

    loss_weights = trainer.N.loss_weights
    monkeypatch.setattr(trainer.N, "loss_weights", poisoned)
    assert run(dataset, tmp_path, "--save_every_n_epochs", "1") == 2
    assert "the loss became nan at step 12: lower the learning rate" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["star-000001.safetensors"]
    epoch_one = weights(tmp_path / "star-000001.safetensors")
    expected = weights(baseline / "star-000001.safetensors")
    assert all(torch.equal(epoch_one[k], expected[k]) for k in expected)
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert [e["event"] for e in events].count("error") == 1 and events[-1]["event"] == "error"


def test_weights_that_overflowed_while_the_loss_was_finite_are_never_saved_over_a_good_file(dataset, tmp_path, capsys,
                                                                                            monkeypatch):
    """The loss is computed before the step that applies its gradient: an overflow in that step (at an epoch's end)
    must stop the run before the epoch file, not leave an infinite one as the last save."""
    from lora_trainer.training import trainer

    step = trainer.TrainingRun._step

    def overflowing(self, epoch):
        step(self, epoch)
        if self.state.step == 8:  # the last step of epoch 1
            with torch.no_grad():
                self.trainable[0].view(-1)[0] = float("inf")

    monkeypatch.setattr(trainer.TrainingRun, "_step", overflowing)
    assert run(dataset, tmp_path, "--save_every_n_epochs", "1", "--save_every_n_steps", "3") == 2
    assert "weights became infinite or NaN (the loss was still finite) at step 8" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["star-step00000003.safetensors",
                                                                        "star-step00000006.safetensors"]


def test_a_full_disk_said_by_safetensors_in_its_own_words_gets_the_same_message(dataset, tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as a SafetensorError ("I/O error: No space left on device"), not an OSError:
    still what to do, not a traceback asking for a bug report."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert run(dataset, tmp_path, "--max_train_epochs", "1") == 2
    err = capsys.readouterr().err
    assert f"could not write {tmp_path / 'star.safetensors'}: Error while serializing: I/O error: No space left" in err
    assert "make room, then continue" in err and "report" not in err


@pytest.mark.parametrize("failing", ["network file", "state"])
def test_a_full_disk_during_a_save_stops_the_run_and_leaves_the_earlier_files_and_states_whole(baseline, dataset, tmp_path,
                                                                                            capsys, monkeypatch, failing):
    """The second save of the kind fails half-written (the final network file, or the final state)."""
    import errno

    import safetensors.torch

    save_file, saves = safetensors.torch.save_file, []

    def fills_the_disk(tensors, filename, metadata=None):
        if ("model.safetensors" in Path(filename).name) == (failing == "state"):  # a state's network, or a LoRA file
            saves.append(filename)
            if len(saves) == 2:
                Path(filename).write_bytes(b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
        return save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_the_disk)
    assert run(dataset, tmp_path, "--save_every_n_epochs", "1", "--save_state") == 2
    err = capsys.readouterr().err
    failed = "star.safetensors" if failing == "network file" else "star-state"
    assert f"could not write {tmp_path / failed}: No space left on device" in err and "--resume" in err
    kept = ["star-000001-state", "star-000001.safetensors"] + (["star.safetensors"] if failing == "state" else [])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".jsonl")) == kept  # nothing half-written
    epoch_one = weights(tmp_path / "star-000001.safetensors")
    expected = weights(baseline / "star-000001.safetensors")
    assert all(torch.equal(epoch_one[k], expected[k]) for k in expected)
    assert run(dataset, tmp_path / "resumed", "--resume", str(tmp_path / "star-000001-state")) == 0
    resumed, uninterrupted = weights(tmp_path / "resumed" / "star.safetensors"), weights(baseline / "star.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_a_file_the_webui_holds_open_does_not_cost_the_runs_weights(baseline, dataset, tmp_path, capsys, monkeypatch):
    """Windows refuses to replace a LoRA another program has loaded: the final save failed and the run ended without
    its last epoch. It is saved beside, said, and the held file is left as it was."""
    from lora_trainer import safe_io

    held = tmp_path / "star.safetensors"
    held.write_bytes(b"the WebUI has this one open")
    real = os.replace

    def refuses_the_held_file(source, target):
        if Path(target) == held:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        return real(source, target)

    monkeypatch.setattr(safe_io, "REPLACE_RETRY_SECONDS", (0, 0))
    monkeypatch.setattr(os, "replace", refuses_the_held_file)
    assert run(dataset, tmp_path, "--save_every_n_epochs", "1") == 0
    assert "Saved as star (2).safetensors instead: rename it once that program lets go" in capsys.readouterr().err
    assert held.read_bytes() == b"the WebUI has this one open"
    saved, expected = weights(tmp_path / "star (2).safetensors"), weights(baseline / "star.safetensors")
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    end = next(e for e in read_events(tmp_path / "star.events.jsonl")[0] if e["event"] == "end")
    assert str(tmp_path / "star (2).safetensors") in end["files"] and str(held) not in end["files"]


def test_a_state_an_antivirus_scan_holds_is_said_and_the_run_goes_on(dataset, tmp_path, capsys, monkeypatch):
    """Windows refuses to rename a folder while a file in it is open: the run stopped there, for a state it can save
    again at the next epoch. The previous state stays in place and nothing half-made is left."""
    from lora_trainer import safe_io
    from lora_trainer.training import state as state_module

    real = os.replace

    def scanned(source, target):
        if Path(target).name == "star-000001-state":
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        return real(source, target)

    monkeypatch.setattr(state_module, "FOLDER_RETRY_SECONDS", (0, 0))
    monkeypatch.setattr(safe_io, "REPLACE_RETRY_SECONDS", ())
    monkeypatch.setattr(os, "replace", scanned)
    assert run(dataset, tmp_path, "--save_every_n_epochs", "1", "--save_state", "--max_train_epochs", "3") == 0
    assert ("the state star-000001-state could not be put in place (The process cannot access the file because it is "
            "being used by another process): another program holds a file in it (an antivirus scan?); the previous "
            "state is kept; the run goes on") in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["star-000002-state", "star-state"]
    assert (tmp_path / "star-000002.safetensors").exists() and (tmp_path / "star.safetensors").exists()


@pytest.mark.parametrize("accumulation, step", [(1, 3), (2, 1)])  # with 2: the 4th batch is the 2nd of step 2
def test_an_image_damaged_mid_run_stops_it_with_what_it_learnt_saved_and_resumable(tmp_path, capsys, monkeypatch,
                                                                                    accumulation, step):
    """Without cached latents each image is read when its batch comes: one deleted or damaged mid-run ended the run
    with nothing saved since the last save (up to an epoch). What was trained is saved, as a stop saves it, the
    image is named, and resuming once it is fixed trains what an uninterrupted run trains."""
    from lora_trainer.training import trainer

    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data / "2_zkstar")
    arguments = ("--max_train_epochs", "1", "--seed", "3", "--gradient_accumulation_steps", str(accumulation))
    learn, batches = trainer.TrainingRun._learn, []

    def damaged_at_step_3(self, batch, epoch):
        batches.append(1)
        if len(batches) == 4:  # the 4th batch (after 3 steps) finds its image gone
            raise trainer.ImageError(f"{data / '2_zkstar' / 'star_007.png'} does not exist.")
        return learn(self, batch, epoch)

    def run_uncached(out, *extra):
        return train_main(["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", str(data),
                           "--output_dir", str(out), "--output_name", "star", "--resolution", "64",
                           "--train_batch_size", "4", "--network_dim", "4", "--network_alpha", "4", "--learning_rate",
                           "1e-3", "--caption_extension", ".txt", "--max_data_loader_n_workers", "0", *arguments, *extra])

    assert run_uncached(tmp_path / "whole") == 0
    monkeypatch.setattr(trainer.TrainingRun, "_learn", damaged_at_step_3)
    assert run_uncached(tmp_path / "cut") == 2
    err = capsys.readouterr().err
    state = tmp_path / "cut" / f"star-step{step:08d}-state"
    assert f"star_007.png does not exist. Training stopped at step {step}; what it learnt is saved in " \
           f"star-step{step:08d}.safetensors" in err and f"--resume {state}" in err
    monkeypatch.setattr(trainer.TrainingRun, "_learn", learn)
    assert run_uncached(tmp_path / "resumed", "--resume", str(state)) == 0
    resumed, whole = weights(tmp_path / "resumed" / "star.safetensors"), weights(tmp_path / "whole" / "star.safetensors")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_what_a_run_killed_while_saving_left_is_removed_by_the_next_run_of_that_name(dataset, tmp_path, capsys):
    """SIGKILL or a power cut mid-save leaves hidden temporaries the size of a network (states: staging folders), and
    a kill mid-caching leaves half-written caches beside the images; nothing else is touched, and a minute-fresh
    temporary may be a twin run's live save."""
    out, data = tmp_path / "out", tmp_path / "data"
    shutil.copytree(dataset, data)
    image_folder = data / "2_zkstar"
    old, fresh = time.time() - 3600, time.time()
    left = [out / ".star.safetensors.0123abcd.tmp", out / ".star-000001.safetensors.89abcdef.tmp",
            out / "star-step00000004-state.tmp" / "model.safetensors", out / "star-state.tmp" / "train_state.pt",
            out / "star-000001-state.old" / "model.safetensors", image_folder / ".a_0064x0064_sd.npz.0badcafe.tmp"]
    kept = [out / ".star-step00000002.safetensors.aaaaaaaa.tmp",  # fresh: maybe a twin's save in progress
            out / ".other.safetensors.bbbbbbbb.tmp", out / ".starlet.safetensors.cccccccc.tmp",  # other runs'
            out / "star-000002-state.old" / "model.safetensors",  # the state a cut-off save replaced: what --resume reads
            out / "notes.txt", image_folder / ".notes.txt.dddddddd.tmp"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1024)
    (out / "star-000002-state.old" / "train_state.pt").write_bytes(b"x")
    (out / "star-000001-state").mkdir()
    for path in {p for f in left + kept for p in (f, f.parent)} - {out, image_folder}:
        os.utime(path, (old, old))
    os.utime(kept[0], (fresh, fresh))
    assert run(data, out, "--save_every_n_epochs", "1", "--cache_latents_to_disk") == 0
    err = capsys.readouterr().err
    assert not any(path.exists() for path in left) and all(path.exists() for path in kept)
    assert "killed while saving" in err and "killed while caching" in err


def test_after_a_run_ctrl_c_interrupts_the_caller_again(dataset, tmp_path):
    import signal

    before = signal.getsignal(signal.SIGINT)
    assert run(dataset, tmp_path, "--max_train_steps", "1") == 0
    assert signal.getsignal(signal.SIGINT) is before


def test_a_run_killed_mid_epoch_resumes_from_its_last_state_to_the_same_weights(baseline, dataset, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    arguments = ["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", str(dataset),
                 "--output_dir", str(out), "--output_name", "star", "--resolution", "64", "--train_batch_size", "4",
                 "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3",
                 "--max_train_epochs", "2", "--cache_latents", "--seed", "3", "--caption_extension", ".txt",
                 "--max_data_loader_n_workers", "0", "--save_every_n_epochs", "1", "--save_state"]
    process = subprocess.Popen([sys.executable, "-m", "lora_trainer.train_network", *arguments],
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "star-000001-state"
    deadline = time.time() + 120
    while not (state / "train_state.json").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)  # no chance to save anything more
    process.wait()
    assert not (out / "star.safetensors").exists(), "the run ended before it could be killed"
    assert run(dataset, tmp_path / "resumed", "--resume", str(state)) == 0
    resumed, uninterrupted = weights(tmp_path / "resumed" / "star.safetensors"), weights(baseline / "star.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_step_saves_and_exits_0_and_the_run_resumes_to_the_same_weights(baseline, dataset, tmp_path,
                                                                                             signal_name):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "signalled"
    arguments = ["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", str(dataset),
                 "--output_dir", str(out), "--output_name", "star", "--resolution", "64", "--train_batch_size", "4",
                 "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3",
                 "--max_train_epochs", "2", "--cache_latents", "--seed", "3", "--caption_extension", ".txt",
                 "--max_data_loader_n_workers", "0"]
    process = subprocess.Popen([sys.executable, "-m", "lora_trainer.train_network", *arguments],
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    events_file, deadline = out / "star.events.jsonl", time.time() + 120
    while process.poll() is None and time.time() < deadline and not (
            events_file.exists() and '"step": 2, "total"' in events_file.read_text(encoding="utf-8")):
        time.sleep(0.01)
    os.kill(process.pid, getattr(signal, signal_name))
    assert process.wait(timeout=120) == 0, process.stderr.read().decode()[-2000:]
    events, _ = read_events(events_file)
    stopped = [e for e in events if e["event"] == "state" and e["action"] == "saved"]
    assert stopped and stopped[-1]["step"] < 16, "the run ended before the signal came"
    assert (out / "star.safetensors").exists()  # the weights so far
    assert run(dataset, tmp_path / "resumed", "--resume", stopped[-1]["path"]) == 0
    resumed, uninterrupted = weights(tmp_path / "resumed" / "star.safetensors"), weights(baseline / "star.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_mixed_precision_on_the_cpu_trains_the_fp32_weights_and_says_so(baseline, dataset, tmp_path):
    """Half precision pays only on a GPU: on the CPU the run is the fp32 one, --full_bf16 included, and a warning
    tells the user instead of the option passing silently."""
    assert run(dataset, tmp_path, "--mixed_precision", "bf16", "--full_bf16") == 0
    ours, theirs = weights(tmp_path / "star.safetensors"), weights(baseline / "star.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert any("--mixed_precision bf16 and --full_bf16 on the CPU" in e["message"] for e in events if e["event"] == "warning")


def test_xformers_runs_only_when_asked_and_asking_without_it_gives_way_to_sdpa_with_a_warning(dataset, tmp_path, monkeypatch):
    """--sdpa (or no flag) must keep an installed xformers out: a build that does not match the torch fails mid-run.
    --xformers without xformers (shared configs set it) runs on SDPA, the same attention, and says so."""
    from lora_trainer.models import attention

    monkeypatch.setattr(attention, "_backend", attention._backend)  # restored after the test
    monkeypatch.setattr(attention, "_XFORMERS_AVAILABLE", False)
    assert run(dataset, tmp_path / "asked", "--xformers", "--max_train_epochs", "1") == 0
    assert attention._backend == "sdpa"
    events, _ = read_events(tmp_path / "asked" / "star.events.jsonl")
    assert any("--xformers: xformers is not installed, so attention uses SDPA" in e["message"]
               for e in events if e["event"] == "warning")
    monkeypatch.setattr(attention, "_XFORMERS_AVAILABLE", True)
    monkeypatch.setattr(attention, "_backend", "auto")  # what an installed xformers would get unasked
    assert run(dataset, tmp_path / "sdpa", "--sdpa", "--max_train_epochs", "1") == 0
    assert attention._backend == "sdpa"


def test_gradient_checkpointing_trains_the_same_weights(baseline, dataset, tmp_path):
    assert run(dataset, tmp_path, "--gradient_checkpointing") == 0
    ours, theirs = weights(tmp_path / "star.safetensors"), weights(baseline / "star.safetensors")
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-7) for k in theirs)


def test_fine_tuning_metadata_json_trains_exactly_as_the_same_captions_in_folders(baseline, dataset, tmp_path):
    """--in_json (sd-scripts' fine-tuning mode, made by merge_captions_to_metadata.py) with --dataset_repeats 2 is the
    folder run: same images, captions, repeats and order, so the same weights; the metadata names the JSON file."""
    images = dataset / "2_zkstar"
    metadata = {p.name: {"caption": p.with_suffix(".txt").read_text(encoding="utf-8").strip()} for p in sorted(images.glob("*.png"))}
    meta = tmp_path / "元 meta.json"
    meta.write_text(json.dumps(metadata, ensure_ascii=False), encoding="utf-8")
    assert run(images, tmp_path / "out", "--in_json", str(meta), "--dataset_repeats", "2") == 0
    ours, theirs = weights(tmp_path / "out" / "star.safetensors"), weights(baseline / "star.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with safe_open(str(tmp_path / "out" / "star.safetensors"), "pt") as handle:
        written = handle.metadata()
    assert json.loads(written["ss_dataset_dirs"]) == {"元 meta.json": {"n_repeats": 2, "img_count": 16}}
    assert written["ss_num_train_images"] == "32"


def test_a_metadata_image_size_buckets_the_image_and_names_its_cache_but_sdxl_is_conditioned_on_its_pixels(tmp_path):
    """sd-scripts buckets a fine-tuning entry by the metadata's image_size and names its latent cache by it, but gives
    SDXL the size of the pixels it reads (``trim_and_resize_if_required``): a picture shrunk after its metadata was
    written trains as 80x64, not as the 160x128 the file says."""
    from types import SimpleNamespace

    from lora_trainer.training.data import build_training_data, npz_path
    from lora_trainer.training.options import options_from

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (80, 64), (200, 40, 40)).save(folder / "shrunk.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"shrunk.png": {"caption": "zkstar", "image_size": [160, 128]}}), encoding="utf-8")
    options = options_from({"pretrained_model_name_or_path": "m", "train_data_dir": str(folder), "in_json": str(meta),
                            "resolution": "64", "enable_bucket": True, "min_bucket_reso": "64", "max_bucket_reso": "128"})
    data = build_training_data(options, SimpleNamespace(bucket_step_multiple=32, name="sdxl", label="SDXL"), seed=3)
    record = data.datasets[0].train[0]
    assert (record.bucket, record.choice.resized_size) == ((64, 64), (80, 64))  # from 160x128, as sd-scripts buckets
    assert npz_path(record, "sdxl").name == "shrunk_0160x0128_sdxl.npz"  # sd-scripts' name from the metadata size
    batch = data.epoch_batches(0)[0]
    assert (batch.original_sizes, batch.crops, batch.target_sizes) == ([(64, 80)], [(6, 0)], [(64, 64)])


def test_in_json_with_reg_images_is_refused_as_a_contradiction(dataset, tmp_path, capsys):
    meta = tmp_path / "meta.json"
    meta.write_text("{}", encoding="utf-8")
    assert run(dataset, tmp_path, "--in_json", str(meta), "--reg_data_dir", str(dataset)) == 2
    assert "--reg_data_dir is for DreamBooth folders" in capsys.readouterr().err


def test_fp8_base_trains_nearly_the_same_lora_and_says_so_in_the_file(baseline, dataset, tmp_path, capsys):
    assert run(dataset, tmp_path, "--fp8_base") == 2  # sd-scripts asserts mixed precision too
    assert "--fp8_base needs --mixed_precision fp16 or bf16" in capsys.readouterr().err
    assert run(dataset, tmp_path, "--fp8_base", "--mixed_precision", "bf16") == 0
    ours, theirs = weights(tmp_path / "star.safetensors"), weights(baseline / "star.safetensors")
    ups = [k for k in theirs if "lora_up" in k]
    learnt_fp8, learnt_full = (torch.cat([w[k].flatten() for k in ups]) for w in (ours, theirs))
    assert torch.nn.functional.cosine_similarity(learnt_fp8, learnt_full, 0) > 0.85
    assert not torch.equal(learnt_fp8, learnt_full)
    with safe_open(str(tmp_path / "star.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_fp8_base"] == "True"
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert events[0]["fp8_saved_mib"] > 0
    # sd-scripts' --fp8_base_unet (refused here before): the UNet alone in fp8, the text encoders in bf16
    assert run(dataset, tmp_path / "unet", "--fp8_base_unet", "--mixed_precision", "bf16", "--max_train_steps", "2") == 0
    with safe_open(str(tmp_path / "unet" / "star.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_fp8_base_unet"] == "True" and handle.metadata()["ss_fp8_base"] == "False"
    unet_only, _ = read_events(tmp_path / "unet" / "star.events.jsonl")
    assert 0 < unet_only[0]["fp8_saved_mib"] < events[0]["fp8_saved_mib"]


def test_the_gpu_cache_goes_back_to_the_card_after_caching_and_samples_unless_highvram(monkeypatch):
    from lora_trainer.training.options import options_from
    from lora_trainer.training.trainer import release_cached_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    base = {"pretrained_model_name_or_path": "m", "train_data_dir": "d"}
    release_cached_memory(torch.device("cuda"), options_from({**base, "lowram": True}))
    release_cached_memory(torch.device("cuda"), options_from({**base, "highvram": True}))
    release_cached_memory(torch.device("cpu"), options_from(base))
    assert calls == [1]


def test_a_run_continued_from_its_epoch_file_counts_and_names_on_from_the_initial_epoch(baseline, dataset, tmp_path):
    """sd-scripts' --network_weights X-000001 --initial_epoch 2: the second epoch is trained, numbered as such."""
    first = baseline / "star-000001.safetensors"
    assert run(dataset, tmp_path / "epoch", "--network_weights", str(first), "--initial_epoch", "2", "--save_every_n_epochs", "1") == 0
    events, _ = read_events(tmp_path / "epoch" / "star.events.jsonl")
    steps = [e["step"] for e in events if e["event"] == "step" and "phase" not in e]
    assert steps == list(range(9, 17)) and [e["epoch"] for e in events if e["event"] == "epoch"] == [2]
    assert sorted(p.name for p in (tmp_path / "epoch").glob("*.safetensors")) == ["star.safetensors"]
    with safe_open(str(tmp_path / "epoch" / "star.safetensors"), "pt") as handle:
        assert (handle.metadata()["ss_epoch"], handle.metadata()["ss_steps"]) == ("2", "16")
    assert not torch.equal(weights(tmp_path / "epoch" / "star.safetensors")["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"],
                           weights(first)["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"])
    # --initial_step 12: from the start of its epoch, or (skip_until_initial_step) from step 13 on
    for extra, expected in ((), list(range(9, 17))), (("--skip_until_initial_step",), [13, 14, 15, 16]):
        out = tmp_path / f"step{len(extra)}"
        assert run(dataset, out, "--network_weights", str(first), "--initial_step", "12", *extra) == 0
        events, _ = read_events(out / "star.events.jsonl")
        assert [e["step"] for e in events if e["event"] == "step" and "phase" not in e] == expected


def test_network_weights_with_another_alpha_keep_the_files_alpha_and_say_so(baseline, dataset, tmp_path, capsys):
    """The files said ss_network_alpha 2 while their tensors held the loaded file's alpha 4 (which trained), silently."""
    first = baseline / "star-000001.safetensors"  # trained with alpha 4
    assert run(dataset, tmp_path / "out", "--network_weights", str(first), "--network_alpha", "2", "--max_train_steps", "1",
               "--max_train_epochs", "0") == 0
    assert "holds alpha 4 and --network_alpha is 2: the file's alpha is kept" in capsys.readouterr().err
    with safe_open(str(tmp_path / "out" / "star.safetensors"), "pt") as handle:
        alphas = {float(handle.get_tensor(key)) for key in handle.keys() if key.endswith(".alpha")}
        assert alphas == {4.0} and handle.metadata()["ss_network_alpha"] == "4.0"
    assert run(dataset, tmp_path / "same", "--network_weights", str(first), "--max_train_steps", "1", "--max_train_epochs", "0") == 0
    assert "holds alpha" not in capsys.readouterr().err  # --network_alpha 4 as in the file: nothing to say


def test_a_run_resumes_from_sd_scripts_own_state_folder_with_its_network_and_step_count(dataset, tmp_path, capsys):
    """A Kohya GUI run's --save_state folder (accelerate's: model.safetensors, train_state.json) goes on here as
    sd-scripts would go on: its weights, the epoch of its step, the learning-rate schedule at that step."""
    from reference import REFERENCE

    fixtures = REFERENCE / "kohya-fixtures"
    state = fixtures / "lora-toml-variant" / "state-example" / "tinylora_toml-step00000010-state"  # step 10 of its run
    its_network = ("--pretrained_model_name_or_path", str(fixtures / "model" / "tiny-sd15.safetensors"),
                   "--network_alpha", "2", "--network_args", "conv_dim=2", "conv_alpha=1")
    # at a learning rate of 1e-30 nothing moves: the file holds the state's weights, conv modules and alphas included
    assert run(dataset, tmp_path / "still", *its_network, "--learning_rate", "1e-30", "--resume", str(state)) == 0
    saved, theirs = weights(tmp_path / "still" / "star.safetensors"), weights(state / "model.safetensors")
    assert saved.keys() == theirs.keys()
    assert all(torch.allclose(saved[k], theirs[k], rtol=0, atol=1e-25) for k in theirs)
    events, _ = read_events(tmp_path / "still" / "star.events.jsonl")
    assert [e["step"] for e in events if e["event"] == "step" and "phase" not in e] == list(range(9, 17))  # epoch 2 of 8 steps
    assert any("is sd-scripts' state" in e["message"] and "optimizer starts afresh" in e["message"]
               for e in events if e["event"] == "warning")

    # from step 11 on with --skip_until_initial_step; the linear schedule is where an unbroken run would have it
    assert run(dataset, tmp_path / "skip", *its_network, "--lr_scheduler", "linear", "--skip_until_initial_step",
               "--resume", str(state)) == 0
    events, _ = read_events(tmp_path / "skip" / "star.events.jsonl")
    steps = [e for e in events if e["event"] == "step" and "phase" not in e]
    assert [e["step"] for e in steps] == [11, 12, 13, 14, 15, 16]
    assert steps[0]["lr"] == pytest.approx([1e-3 * (16 - 11) / 16] * 2)  # not the 15/16 of a schedule begun afresh

    # another network is refused with a tensor it lacks; a folder that is no state, before any work
    assert run(dataset, tmp_path / "other", "--resume", str(state)) == 2
    assert "its network does not match this run's options" in capsys.readouterr().err
    assert run(dataset, tmp_path / "none", "--resume", str(tmp_path / "still")) == 2
    assert "not a state folder" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_a_damaged_or_missing_state_is_said_with_where_to_resume_from(dataset, tmp_path, capsys):
    """A run killed while writing a state (or a full disk) leaves it cut short: what to do, not a traceback."""
    assert run(dataset, tmp_path / "a", "--save_state", "--save_every_n_epochs", "1") == 0
    for part in ("model.safetensors", "train_state.pt"):
        damaged = tmp_path / f"damaged {part}"
        shutil.copytree(tmp_path / "a" / "star-000001-state", damaged)
        (damaged / part).write_bytes((damaged / part).read_bytes()[:100])
        assert run(dataset, tmp_path / "b", "--resume", str(damaged)) == 2
        err = capsys.readouterr().err
        assert f"{part} cannot be read" in err and "resume from the state saved before it" in err and "Traceback" not in err
    assert run(dataset, tmp_path / "b", "--resume", str(tmp_path / "gone-state")) == 2
    assert "no such folder; give a state folder a run saved" in capsys.readouterr().err


def test_sd_scripts_states_of_older_accelerate_and_broken_step_files(tmp_path):
    """Older accelerate wrote the network as pytorch_model.bin (a plain state dict: loaded without running code);
    a train_state.json without its step is named with what sd-scripts writes there."""
    from lora_trainer.training.state import load_sd_scripts_state, state_kind

    network = torch.nn.ModuleDict({"lora_unet_x": torch.nn.Linear(2, 2, bias=False)})
    torch.save({"lora_unet_x.weight": torch.ones(2, 2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "train_state.json").write_text('{"current_epoch": 1, "current_step": 7}', encoding="utf-8")
    assert state_kind(tmp_path) == "sd-scripts" and load_sd_scripts_state(tmp_path, network) == 7
    assert torch.equal(network["lora_unet_x"].weight, torch.ones(2, 2))
    (tmp_path / "train_state.json").write_text('{"current_epoch": 1}', encoding="utf-8")
    with pytest.raises(UserError, match=r"train_state.json: no readable current_step .*\"current_step\": …"):
        load_sd_scripts_state(tmp_path, network)


def test_initial_steps_that_leave_nothing_or_contradict_a_resume_are_refused(baseline, dataset, tmp_path, capsys):
    assert run(dataset, tmp_path, "--initial_step", "16") == 2
    assert "--initial_step 16 leaves nothing to train: the run has 16 steps" in capsys.readouterr().err
    assert run(dataset, tmp_path, "--initial_epoch", "2", "--resume", str(baseline / "star-000001-state")) == 2
    assert "--resume continues exactly where its state stopped" in capsys.readouterr().err


def test_sd_scripts_switches_that_change_nothing_here_run_and_say_so(baseline, dataset, tmp_path):
    """Kohya GUI commands carry switches such as --disable_mmap_load_safetensors or --cache_info: they must run, and
    the run must say that they change nothing here rather than pass over them in silence."""
    assert run(dataset, tmp_path, "--disable_mmap_load_safetensors", "--cache_info", "--persistent_data_loader_workers",
               "--console_log_level", "INFO", "--console_log_simple") == 0  # sd-scripts' logging options, in its docs
    ours, theirs = weights(tmp_path / "star.safetensors"), weights(baseline / "star.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    events, _ = read_events(tmp_path / "star.events.jsonl")
    said = " ".join(e["message"] for e in events if e["event"] == "warning")
    assert all(f"--{name} has no effect here" in said for name in ("disable_mmap_load_safetensors", "cache_info",
                                                                  "persistent_data_loader_workers", "console_log_level",
                                                                  "console_log_simple"))
    assert "skip_cache_check" not in said  # only the switches that were set


def test_sd_scripts_options_we_do_not_offer_are_refused_by_name(dataset, tmp_path, capsys):
    assert run(dataset, tmp_path, "--deepspeed", "--huggingface_repo_id", "me/star") == 2
    assert "not supported: --deepspeed, --huggingface_repo_id" in capsys.readouterr().err
    # sd-scripts' SDXL guide writes --text_encoder_lr1/2, which its own parser refuses too: named with the real one
    assert run(dataset, tmp_path, "--text_encoder_lr1=1e-5", "--text_encoder_lr2", "1e-5") == 2
    assert ("unknown option(s) --text_encoder_lr1 (did you mean --text_encoder_lr?), --text_encoder_lr2 (did you mean "
            "--text_encoder_lr?)") in capsys.readouterr().err
    # a Kohya GUI (or lora-scripts) file: empty values ask for nothing, ours (vae = "") as much as those, and the GUI's own keys, which
    # sd-scripts never reads, are noted: it trains
    config = tmp_path / "kohya_gui.toml"
    config.write_text('lr_scheduler_args = []\nhuggingface_repo_id = ""\nwandb_api_key = ""\ndeepspeed = false\n'
                      'vae = ""\nnetwork_weights = ""\nsample_prompts = ""\nresume = ""\nlogging_dir = ""\n'
                      'epoch = 15\nnoise_offset_type = "Original"\ndynamo_backend = "no"\nlr_restart_cycles = 1\n'
                      'text_encoder_lr = 1e-5\nbatch_size = 1\n'  # one number, as older sd-scripts took it
                      # lora-scripts' own template (config/lora.toml) carries its contrastive-loss settings, off
                      'enable_contrastive = false\nnegative_sampling_method = "Random-Noise"\nnoise_strength = 1.0\n'
                      'contrastive_weight = 0.05\ncontrastive_warmup_steps = 100\n', encoding="utf-8")
    assert run(dataset, tmp_path / "out", "--config_file", str(config), "--max_train_epochs", "1") == 0
    with safe_open(str(tmp_path / "out" / "star.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_text_encoder_lr"] == "1e-05"
    events, _ = read_events(tmp_path / "out" / "star.events.jsonl")
    said = " ".join(e["message"] for e in events if e["event"] == "warning")
    assert "kohya_gui.toml: epoch is not read, by sd-scripts either" in said and "noise_offset_type is not read" in said
    assert "noise_strength is not read" in said and "contrastive_weight is not read" in said
    assert "batch_size is not read, by sd-scripts either (lora-scripts' config_file.toml has it; sd-scripts reads " \
           "train_batch_size" in said  # was refused as "did you mean vae_batch_size?"
    capsys.readouterr()
    assert run(dataset, tmp_path, "--mixed_precision", "fp32") == 2  # a wrong value: one sentence, not the usage
    error = capsys.readouterr().err
    assert error.strip() == ("error: command line: argument --mixed_precision: invalid choice: 'fp32' (choose from "
                             "'no', 'fp16', 'bf16'); `--help` lists the options and their values")
    config.write_text("learning_rat = 1e-4\n", encoding="utf-8")  # a typo still stops the run
    assert run(dataset, tmp_path / "typo", "--config_file", str(config)) == 2
    assert "unknown option(s) learning_rat (did you mean learning_rate?)" in capsys.readouterr().err
    config.write_text("enable_contrastive = true\n", encoding="utf-8")  # the message says where it came from
    assert run(dataset, tmp_path / "contrastive", "--config_file", str(config)) == 2
    assert f"error: {config}: not supported: --enable_contrastive" in capsys.readouterr().err


def test_an_option_in_two_sections_of_a_config_file_is_the_last_as_in_sd_scripts_and_said(tmp_path):
    from lora_trainer.training.options import read_config_file

    config = tmp_path / "run.toml"
    config.write_text("[optimizer_arguments]\nlearning_rate = 1e-4\n[training_arguments]\nlearning_rate = 5e-4\n"
                      "[saving_arguments]\nsave_every_n_epochs = 1\n[other]\nsave_every_n_epochs = 1\n", encoding="utf-8")
    notes = []
    assert read_config_file(config, notes) == {"learning_rate": 5e-4, "save_every_n_epochs": 1}
    assert notes == [f"{config}: learning_rate is given twice, as 0.0001 and 0.0005: the last is used, as sd-scripts "
                     "uses it; keep one"]  # the same value twice is no mistake


def test_tensorboard_logs_the_adapted_step_of_prodigy_as_sd_scripts_does(dataset, tmp_path, monkeypatch):
    """D-Adaptation and Prodigy find their own step d; lr only scales it, so d·lr is what a user watches."""
    import sys
    import types

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Prodigy(torch.optim.SGD):  # a stand-in: the package is an optional extra
        def __init__(self, params, lr=1.0, **kwargs):
            super().__init__(params, lr=lr)
            for group in self.param_groups:
                group["d"] = 1e-3

    Prodigy.__module__ = "prodigyopt"
    monkeypatch.setitem(sys.modules, "prodigyopt", types.SimpleNamespace(Prodigy=Prodigy))
    assert run(dataset, tmp_path, "--logging_dir", str(tmp_path / "logs"), "--optimizer_type", "Prodigy",
               "--learning_rate", "0.5") == 0
    (folder,) = (tmp_path / "logs").glob("*/network_train")
    events = EventAccumulator(str(folder))
    events.Reload()
    assert [e.value for e in events.Scalars("lr/d*lr/unet")][:1] == pytest.approx([5e-4])
    assert [e.value for e in events.Scalars("lr/d*lr/textencoder")][:1] == pytest.approx([5e-4])
    # and by group number after the text encoder's, as sd-scripts' for-else logs lr/group<i> beside it
    assert [e.value for e in events.Scalars("lr/d*lr/group1")][:1] == pytest.approx([5e-4])


def test_numbers_written_as_text_in_a_file_are_numbers_and_a_wrong_one_is_named():
    """TOML and JSON bodies carry clip_skip = "2" or learning_rate = "1e-4" where the command line reads numbers."""
    from lora_trainer.training.options import options_from

    base = {"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d"}
    assert options_from({**base, "network_dim": np.int64(16)}).network_dim == 16  # from a UI component
    options = options_from({**base, "clip_skip": "2", "network_dim": "32", "learning_rate": "1e-4",
                            "text_encoder_lr": ["1e-5"], "seed": 42.0, "lr_warmup_steps": "10%", "lr_scheduler": "cosine"},
                           "config.toml")
    assert (options.clip_skip, options.network_dim, options.learning_rate, options.text_encoder_lr, options.seed) == (
        2, 32, 1e-4, [1e-5], 42)
    assert options.lr_warmup_steps == 0.1  # a share of the steps, as sd-scripts' int_or_float reads "10%"
    for bad, said in (({"clip_skip": "two"}, "clip_skip = 'two' is not a whole number"),
                      ({"network_dim": 2.5}, "network_dim = 2.5 is not a whole number"),
                      ({"learning_rate": "fast"}, "learning_rate = 'fast' is not a number")):
        with pytest.raises(UserError, match=f"config.toml: {said}"):
            options_from({**base, **bad}, "config.toml")


def test_a_value_of_another_kind_in_a_file_is_refused_by_name_not_read_as_something_else(tmp_path):
    """A list where one value goes, "false" for a switch (true to Python), an option written as a table: each said,
    naming the file and the option, before the run — not a traceback mid-run or a switch silently on."""
    from lora_trainer.training.options import options_from, parse_args

    base = {"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d"}
    for bad, said in (({"learning_rate": [1e-4]}, "learning_rate = \\[0.0001\\] is not a number"),
                      ({"noise_offset": [0.1]}, "noise_offset = \\[0.1\\] is not a number"),
                      ({"flip_aug": "false"}, "flip_aug = 'false' is not true or false"),
                      ({"network_args": ["conv_dim=4", True]}, 'network_args .* is not a list of "key=value" texts'),
                      ({"max_train_steps": 1e30}, "max_train_steps = 1e\\+30 is out of range")):
        with pytest.raises(UserError, match=f"config.toml: {said}") as raised:
            options_from({**base, **bad}, "config.toml")
        assert raised.value.field == next(iter(bad))
    with pytest.raises(UserError, match="no base model") as raised:  # named in the message and as the field
        options_from({"train_data_dir": "d"})
    assert raised.value.field == "pretrained_model_name_or_path"
    # what files legitimately write: a number for a text option, a resolution pair, null for not given
    options = options_from({**base, "resolution": [512, 768], "metadata_title": 2024, "shuffle_caption": None})
    assert (options.resolution, options.metadata_title, options.shuffle_caption) == ("512,768", "2024", False)
    assert options_from({**base, "resolution": 512.0}).resolution == "512"  # a UI's number field

    (tmp_path / "args.toml").write_text("[model]\npretrained_model_name_or_path = 'm.safetensors'\n"
                                        "[network_args]\nconv_dim = 4\n", encoding="utf-8")
    with pytest.raises(UserError, match='args.toml: network_args is a table; give it a list of "key=value" texts'):
        parse_args(["--config_file", str(tmp_path / "args.toml")])


def test_tensorboard_logs_carry_sd_scripts_tags(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run(dataset, tmp_path, "--logging_dir", str(tmp_path / "logs"), "--log_prefix", "run_") == 0
    (folder,) = (tmp_path / "logs").glob("run_*/network_train")
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder", "loss/epoch_average"} <= tags
    from reference import REFERENCE

    theirs = EventAccumulator(str(REFERENCE / "kohya-fixtures" / "tensorboard" / "baseline.tfevents"))
    theirs.Reload()
    assert set(theirs.Tags()["scalars"]) <= tags  # lr/group1 too: sd-scripts logs the groups by number as well
    assert [e.step for e in events.Scalars("loss/epoch_average")] == [1, 2]
    assert len(events.Scalars("loss/current")) == 16

    # sd-scripts' tags for the weight-norm limit and for validation (divergence: validation above training)
    assert run(dataset, tmp_path / "more", "--logging_dir", str(tmp_path / "more logs"), "--scale_weight_norms", "0.01",
               "--validation_split", "0.25", "--validate_every_n_steps", "3") == 0
    (folder,) = (tmp_path / "more logs").glob("*/network_train")
    events = EventAccumulator(str(folder))
    events.Reload()
    assert {"max_norm/keys_scaled", "max_norm/max_key_norm", "norm/avg_key_norm", "loss/validation/step_average",
            "loss/validation/step_divergence", "loss/validation/epoch_average",
            "loss/validation/epoch_divergence"} <= set(events.Tags()["scalars"])
    assert max(e.value for e in events.Scalars("max_norm/keys_scaled")) > 0
    average, validation, divergence = (events.Scalars(f"loss/{tag}")[-1].value for tag in (
        "epoch_average", "validation/epoch_average", "validation/epoch_divergence"))
    assert divergence == pytest.approx(validation - average, rel=1e-5)


def test_sd_scripts_fixture_run_runs_unchanged_and_writes_its_files_keys_and_metadata(tmp_path):
    """sd-scripts' own TOML pair (args + dataset) on its tiny checkpoint: same files, tensor keys, shapes, metadata keys."""
    from reference import REFERENCE

    fixtures = REFERENCE / "kohya-fixtures"
    # the images copied: the run caches latents to disk beside them (cache_latents_to_disk), never in the shared fixtures
    shutil.copytree(fixtures / "dataset", tmp_path / "dataset")
    for name in ("args.toml", "dataset.toml"):
        text = (fixtures / "configs" / name).read_text(encoding="utf-8")
        (tmp_path / name).write_text(text.replace("{FIXTURES}/dataset/", f"{tmp_path.as_posix()}/dataset/")
                                     .replace("{FIXTURES}", fixtures.as_posix()).replace("{OUT}", tmp_path.as_posix())
                                     .replace(f"{fixtures.as_posix()}/configs/dataset.toml", (tmp_path / "dataset.toml").as_posix()),
                                     encoding="utf-8")
    assert train_main(["--config_file", str(tmp_path / "args.toml")]) == 0
    out = tmp_path / "out"
    assert {"tinylora_toml-000001.safetensors", "tinylora_toml.safetensors", "tinylora_toml-step00000040.safetensors",
            "tinylora_toml-000001-state"} <= {p.name for p in out.iterdir()}
    theirs_path = fixtures / "lora-toml-variant" / "tinylora_toml.safetensors"
    with safe_open(str(out / "tinylora_toml.safetensors"), "pt") as ours, safe_open(str(theirs_path), "pt") as theirs:
        assert set(ours.keys()) == set(theirs.keys())
        assert all(ours.get_slice(k).get_shape() == theirs.get_slice(k).get_shape() for k in theirs.keys())
        assert set(theirs.metadata()) <= set(ours.metadata())
        assert ours.get_tensor(next(iter(ours.keys()))).dtype == torch.float16  # save_precision = "fp16"
    assert len(list((out / "sample").glob("tinylora_toml_e000001_*.png"))) == 2
    assert list((tmp_path / "dataset").rglob("*.npz")) and not list((fixtures / "dataset").rglob("*.npz"))


def test_config_file_sections_are_flattened_and_the_command_line_wins(tmp_path):
    from lora_trainer.training.options import parse_args

    (tmp_path / "args.toml").write_text("[model]\npretrained_model_name_or_path = 'm.safetensors'\n"
                                        "[dataset]\ntrain_data_dir = 'data'\n[optimizer]\nlearning_rate = 1e-4\n",
                                        encoding="utf-8")
    options, _ = parse_args(["--config_file", str(tmp_path / "args"), "--learning_rate", "5e-4"])  # ".toml" is added
    assert (options.pretrained_model_name_or_path, options.train_data_dir, options.learning_rate) == ("m.safetensors", "data", 5e-4)
    (tmp_path / "typo.toml").write_text("[training]\nlearning_rat = 1e-4\n", encoding="utf-8")
    with pytest.raises(UserError, match="learning_rat \\(did you mean learning_rate\\?\\)"):
        parse_args(["--config_file", str(tmp_path / "typo.toml")])


def test_captions_longer_than_the_run_reads_are_said_at_its_start(tmp_path, capsys):
    """Booru-tagged captions of 200 tokens lose their last tags every step; sd-scripts cuts them without a word."""
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data / "1_zkstar")
    images = sorted((data / "1_zkstar").glob("*.png"))
    for image in images[4:]:
        image.unlink()
        image.with_suffix(".txt").unlink()
    (data / "1_zkstar" / images[1].with_suffix(".txt").name).write_text(", ".join(["cat"] * 60), encoding="utf-8")
    (data / "1_zkstar" / images[2].with_suffix(".txt").name).write_text(", ".join(["cat"] * 100), encoding="utf-8")
    assert run(data, tmp_path / "75", "--max_train_epochs", "1") == 0
    assert (f"2 caption(s) are longer than the 75 tokens the text encoder reads (longest: {images[2].name}, 199 tokens): "
            "the rest is cut, as sd-scripts cuts it; --max_token_length 225 reads them whole") in capsys.readouterr().err
    assert run(data, tmp_path / "225", "--max_train_epochs", "1", "--max_token_length", "225") == 0
    assert "longer than the" not in capsys.readouterr().err


def test_latent_caches_on_disk_train_the_same_weights_whichever_of_them_exist(tmp_path):
    """A run killed while caching left some .npz files: every later run on that dataset drew other latents for the
    images still to encode (one random sequence over the images to do), so it was no longer the same run."""
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data / "2_zkstar")
    assert run(data, tmp_path / "fresh", "--max_train_epochs", "1", "--cache_latents_to_disk") == 0
    caches = sorted((data / "2_zkstar").glob("*.npz"))
    assert len(caches) == 16
    for cache in caches[::2]:
        cache.unlink()
    assert run(data, tmp_path / "half", "--max_train_epochs", "1", "--cache_latents_to_disk") == 0
    fresh, half = weights(tmp_path / "fresh" / "star.safetensors"), weights(tmp_path / "half" / "star.safetensors")
    assert all(torch.equal(fresh[k], half[k]) for k in fresh)


def test_windows_paths_in_double_quotes_are_said_as_such(tmp_path, monkeypatch):
    """'D:\\训练集\\10_x' in double quotes is an invalid escape, 'D:\\new\\train' a line break and a tab: both name the fix
    (sd-scripts' toml reader says only "Reserved escape sequence", or trains on a folder that is not there)."""
    from lora_trainer.training.options import parse_args

    config = tmp_path / "ds.toml"
    config.write_text('pretrained_model_name_or_path = "m.safetensors"\ntrain_data_dir = "D:\\训练集\\10_x"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"ds.toml is not valid TOML: Reserved escape sequence used \(line \d+, column \d+\); "
                                        r"a Windows path in double quotes needs each backslash doubled: write it in single quotes"):
        parse_args(["--config_file", str(config)])
    config.write_text('pretrained_model_name_or_path = "m.safetensors"\ntrain_data_dir = "D:\\new\\train"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"--train_data_dir 'D:\\new\\train' \(in .*ds.toml\) holds a line break or tab: .* single quotes"):
        parse_args(["--config_file", str(config)])
    # cmd.exe: "D:\\my data\\" --output_dir out reaches Python as one argument, the quote escaped
    quoted = ["--pretrained_model_name_or_path", "m", "--train_data_dir", 'D:\\my data" --output_dir out']
    assert parse_args(quoted)[0].train_data_dir == 'D:\\my data" --output_dir out'  # a legal POSIX name
    monkeypatch.setattr("lora_trainer.training.options.WINDOWS_PATHS", True)
    with pytest.raises(UserError, match=r'holds a double quote: on a Windows command line a quoted path ending in a '
                                        r'backslash .* leave out the last backslash'):
        parse_args(quoted)
    # a trailing backslash before the closing quote in TOML: "Unbalanced quotes", with the same hint
    config.write_text('pretrained_model_name_or_path = "m.safetensors"\ntrain_data_dir = "D:\\data\\"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"not valid TOML: .*; a Windows path in double quotes needs each backslash"):
        parse_args(["--config_file", str(config)])


@pytest.mark.parametrize("low, high, said", [
    (900, 100, "--min_timestep 900 is above --max_timestep 100: swap them"),
    (None, 2000, "--max_timestep 2000: give 1 to 1000"),
    (-5, None, "--min_timestep -5: give 0 to 999"),
    (1000, 1000, "--min_timestep 1000: give 0 to 999"),  # one fixed timestep past the schedule's last
])
def test_timestep_ranges_that_would_crash_mid_run_or_train_from_the_schedules_end_are_refused(low, high, said, tmp_path):
    from lora_trainer.training.options import options_from

    given = {k: v for k, v in (("min_timestep", low), ("max_timestep", high)) if v is not None}
    with pytest.raises(UserError, match=re.escape(said)):
        options_from({"pretrained_model_name_or_path": "m", "train_data_dir": "d", **given})
    assert options_from({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "min_timestep": 500,
                         "max_timestep": 500}).min_timestep == 500  # one fixed timestep, as sd-scripts trains it


def test_output_config_writes_the_config_file_as_sd_scripts_names_it_and_it_reads_back(tmp_path, capsys):
    """sd-scripts' --output_config --config_file NAME writes NAME.toml (never over a file) instead of reading it."""
    from lora_trainer.training.options import parse_args

    command = ["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "数据 set", "--network_module",
               "lycoris.kohya", "--network_args", "algo=lokr", "factor=4", "--max_train_epochs", "3"]
    name = str(tmp_path / "v1.5 cfg")  # a dot in the name: ".toml" is added, not put in place of ".5 cfg"
    assert train_main([*command, "--output_config", "--config_file", name]) == 0
    assert capsys.readouterr().out == f"wrote {name}.toml\n"
    read_back = parse_args(["--config_file", name])[0]
    # sd-scripts must be told the output folder this trainer defaults to (it has no default)
    assert dataclasses.replace(read_back, config_file=None) == dataclasses.replace(parse_args(command)[0], output_dir="output")
    assert train_main([*command, "--output_config", "--config_file", name]) == 2
    assert f"{name}.toml already exists; --output_config writes the command line's options to a new file and does " \
           "not read or overwrite this one" in capsys.readouterr().err
    # the file's own options are not read then (as in sd-scripts): said instead of "no dataset", "no base model"
    assert train_main(["--network_dim", "8", "--output_config", "--config_file", name]) == 2
    assert "already exists" in (error := capsys.readouterr().err) and "no dataset" not in error
    assert train_main([*command, "--output_config"]) == 2
    assert "add --config_file NAME" in capsys.readouterr().err
    # a template without model or dataset is written, as sd-scripts writes it; contradictions are still said
    assert train_main(["--network_dim", "8", "--output_config", "--config_file", str(tmp_path / "template")]) == 0
    assert "network_dim = 8" in (tmp_path / "template.toml").read_text(encoding="utf-8")
    assert train_main(["--adaptive_noise_scale", "0.1", "--output_config", "--config_file", str(tmp_path / "bad")]) == 2
    assert "--adaptive_noise_scale needs --noise_offset" in capsys.readouterr().err


@pytest.mark.parametrize("given, written", [("10", "10"), ("10.0", "10"), ("10%", "0.1"), ("0.05", "0.05"),
                                            ("100%", "1.0")])
def test_warm_up_steps_are_written_as_sd_scripts_reads_them(given, written, tmp_path, capsys):
    """sd-scripts reads any float warm-up as a share of the run (10.0 → ten times the run, the rate never rises)
    and refuses "10.0" on its command line: whole steps must come out as an int in the TOML and the command."""
    from lora_trainer.training.options import parse_args

    command = ["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "d", "--lr_scheduler",
               "constant_with_warmup", "--lr_warmup_steps", given, "--lr_decay_steps", given]
    name = tmp_path / "cfg"
    assert train_main([*command, "--output_config", "--config_file", str(name)]) == 0
    text = (tmp_path / "cfg.toml").read_text(encoding="utf-8")
    assert f"lr_warmup_steps = {written}\n" in text and f"lr_decay_steps = {written}\n" in text
    capsys.readouterr()
    assert train_main([*command, "--print-kohya-command"]) == 0
    on_the_command_line = "100%" if written == "1.0" else written  # sd-scripts refuses 1.0 there
    assert f"--lr_warmup_steps {on_the_command_line} --lr_decay_steps {on_the_command_line}" in capsys.readouterr().out
    assert parse_args(["--config_file", str(name)])[0].lr_warmup_steps == parse_args(command)[0].lr_warmup_steps


def test_dylora_convolutions_take_the_network_rank_and_alpha_as_in_sd_scripts(dataset, tmp_path, capsys):
    """sd-scripts' networks.dylora asserts conv_dim == network_dim and reads no conv_alpha: the same command must
    train the same scale here, and say what it does not read."""
    dylora = ("--network_module", "networks.dylora", "--max_train_steps", "1", "--max_train_epochs", "0")
    assert run(dataset, tmp_path / "a", *dylora, "--network_args", "unit=2", "conv_dim=8") == 2
    assert "networks.dylora: conv_dim=8 must equal --network_dim 4" in capsys.readouterr().err
    assert run(dataset, tmp_path / "b", *dylora, "--network_args", "unit=2", "conv_dim=4", "conv_alpha=2") == 0
    events, _ = read_events(tmp_path / "b" / "star.events.jsonl")
    assert any(e["message"].startswith("conv_alpha=2: networks.dylora trains its convolutions at --network_alpha 4")
               for e in events if e["event"] == "warning")
    alphas = {k: float(v) for k, v in weights(tmp_path / "b" / "star.safetensors").items() if k.endswith(".alpha")}
    assert any("resnets" in k for k in alphas) and set(alphas.values()) == {4.0}


def test_the_printed_sd1_command_leaves_out_what_only_sdxl_train_network_takes(dataset, capsys):
    """sd-scripts' train_network.py stops on --cache_text_encoder_outputs (an sdxl_train_network.py option), which
    this trainer also does for SD1: left out of the printed command, and said."""
    assert train_main(["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", str(dataset),
                       "--network_train_unet_only", "--cache_text_encoder_outputs", "--print-kohya-command"]) == 0
    printed = capsys.readouterr()
    assert "train_network.py" in printed.out and "--network_train_unet_only" in printed.out
    assert "--cache_text_encoder_outputs" not in printed.out
    assert "note: --cache_text_encoder_outputs left out: sd-scripts' train_network.py does not take it" in printed.err
    lycoris = ["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", str(dataset),
               "--network_module", "lycoris.kohya", "--print-kohya-command", "--network_args", "algo=loha"]
    assert train_main(lycoris) == 0  # LyCORIS's default preset, full: lycoris-lora 4.1.3 in sd-scripts stops on it
    assert "stops on an SD1/SD2 model with preset=full" in capsys.readouterr().err
    assert train_main([*lycoris, "preset=attn-mlp"]) == 0
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize("windows", [False, True], ids=["posix shell", "cmd.exe"])
def test_the_printed_kohya_command_reads_back_to_the_same_options_in_the_systems_shell(windows):
    """--print-kohya-command is pasted into a shell: paths with spaces, CJK and backslashes and a name with an
    apostrophe must come back whole (POSIX single quotes are no quotes in cmd.exe)."""
    from lora_trainer.training.options import kohya_command, parse_args, split_command_line

    options, _ = parse_args(["--pretrained_model_name_or_path", "C:\\models\\my model.safetensors",
                             "--train_data_dir", "D:\\训练 数据\\Ä", "--output_name", "it's mine",
                             "--network_module", "lycoris.kohya", "--network_args", "algo=loha", "conv_dim=4"])
    command = kohya_command(options, windows=windows)
    quote = '"' if windows else "'"
    assert f"{quote}D:\\训练 数据\\Ä{quote}" in command
    words = split_command_line(command, windows=windows)
    assert words[:3] == ["accelerate", "launch", "train_network.py"]
    assert parse_args(words[3:])[0] == options


def test_the_printed_kohya_command_holds_only_values_sd_scripts_command_line_takes():
    """Its parser refuses values outside its choices (which a TOML escapes): 75 tokens (its default is None),
    dynamo_backend "no" (a Kohya GUI default), a WebUI sampler name, the box filter."""
    from lora_trainer.training.options import kohya_command, parse_args, split_command_line

    options, _ = parse_args(["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "data",
                             "--max_token_length", "75", "--dynamo_backend", "no", "--sample_sampler", "DPM++ 2M Karras",
                             "--resize_interpolation", "box", "--network_module", "networks.lora"])
    words = split_command_line(kohya_command(options, windows=False), windows=False)
    assert "--max_token_length" not in words and "--dynamo_backend" not in words
    assert words[words.index("--sample_sampler") + 1] == "dpmsolver++"
    assert words[words.index("--resize_interpolation") + 1] == "area"
    options, _ = parse_args(["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "data",
                             "--max_token_length", "150", "--sample_sampler", "k_euler_a"])
    words = split_command_line(kohya_command(options, windows=False), windows=False)
    assert words[words.index("--max_token_length") + 1] == "150" and words[words.index("--sample_sampler") + 1] == "k_euler_a"


def test_on_windows_a_command_line_keeps_its_backslashes_and_apostrophes():
    """Kohya GUI's additional_parameters typed on Windows: unquoted paths, cmd.exe's quoting."""
    from lora_trainer.training.options import split_command_line

    text = '--vae C:\\models\\vae.safetensors --output_name Kim\'s --sample_prompts "D:\\my prompts.txt"'
    assert split_command_line(text, windows=True) == [
        "--vae", "C:\\models\\vae.safetensors", "--output_name", "Kim's", "--sample_prompts", "D:\\my prompts.txt"]
    assert split_command_line("--output_name 'my lora'", windows=False) == ["--output_name", "my lora"]


def test_a_printed_windows_command_quotes_what_cmd_would_take_for_an_operator():
    """--print-kohya-command pasted into cmd.exe: D:\\Tom&Jerry unquoted ran "Jerry\\img" as a second command; a
    backslash before a closing quote is doubled, as the C runtime reads arguments."""
    from lora_trainer.training.options import join_command_line

    assert join_command_line(["--train_data_dir", "D:\\Tom&Jerry\\img", "--output_dir", "D:\\lora (v2)\\",
                              "--output_name", "plain"], windows=True) == \
        '--train_data_dir "D:\\Tom&Jerry\\img" --output_dir "D:\\lora (v2)\\\\" --output_name plain'
    assert join_command_line(["--output_dir", "D:\\a|b^c\\"], windows=True) == '--output_dir "D:\\a|b^c\\\\"'


def test_step_files_count_the_epochs_completed_as_sd_scripts_and_run_at_epoch_names_the_epoch_end(dataset, tmp_path):
    """sd-scripts writes a step file's ss_epoch as the epochs completed (0 inside the first): a step file inside
    epoch 2 must not be taken for epoch 2's file by <lora:run@e2> (the final file is)."""
    from lora_trainer.networks.activation import LoraLibrary

    assert run(dataset, tmp_path, "--save_every_n_steps", "6") == 0  # 8 steps an epoch: steps 6 and 12
    def ss_epoch(name):
        with safe_open(str(tmp_path / name), "pt") as handle:
            return handle.metadata()["ss_epoch"]

    assert [ss_epoch(n) for n in ("star-step00000006.safetensors", "star-step00000012.safetensors",
                                  "star.safetensors")] == ["0", "1", "2"]
    assert LoraLibrary([tmp_path]).resolve("star@e2") == tmp_path / "star.safetensors"


def test_keeping_the_last_files_keeps_as_many_states_unless_told_otherwise(dataset, tmp_path):
    """sd-scripts prunes states with --save_last_n_epochs/--save_last_n_steps when their _state twins are not given:
    a long run with --save_state must not fill the disk with a state per save."""
    assert run(dataset, tmp_path, "--max_train_epochs", "3", "--save_state", "--save_every_n_epochs", "1",
               "--save_last_n_epochs", "1", "--save_every_n_steps", "5", "--save_last_n_steps", "5") == 0
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("star-"))
    assert names == ["star-000002-state", "star-000002.safetensors", "star-state", "star-step00000015-state",
                     "star-step00000015.safetensors", "star-step00000020-state", "star-step00000020.safetensors"]
    # a run without --save_state writes no state, so it removes none: not an earlier run's, resumable state
    assert run(dataset, tmp_path / "b", "--max_train_epochs", "3", "--save_state", "--save_every_n_epochs", "1") == 0
    assert run(dataset, tmp_path / "b", "--max_train_epochs", "3", "--save_every_n_epochs", "1",
               "--save_last_n_epochs", "1") == 0
    assert {"star-000001-state", "star-000002-state"} <= {p.name for p in (tmp_path / "b").iterdir()}


def test_an_old_epoch_file_another_program_holds_is_said_and_the_run_goes_on(dataset, tmp_path, monkeypatch):
    """Windows refuses to delete a file a WebUI or ComfyUI has mapped to try that epoch: the PermissionError of
    --save_last_n_epochs' pruning ended the run as an unexpected error, before the epoch's state was saved."""
    real_unlink = Path.unlink

    def held_open(path, missing_ok=False):
        if path.name in ("star-000001.safetensors", "star-step00000005.safetensors"):
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        return real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", held_open)
    assert run(dataset, tmp_path, "--max_train_epochs", "3", "--save_state", "--save_every_n_epochs", "1",
               "--save_last_n_epochs", "1", "--save_every_n_steps", "5", "--save_last_n_steps", "1") == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"star.safetensors", "star-000002-state", "star-000001.safetensors", "star-step00000005.safetensors"} <= names
    warnings = [e["message"] for e in read_events(tmp_path / "star.events.jsonl")[0] if e["event"] == "warning"]
    assert any(w.startswith("--save_last_n_epochs 1: could not remove") and "star-000001.safetensors" in w
               and "delete it by hand once it is free" in w for w in warnings)
    assert any(w.startswith("--save_last_n_steps 1: could not remove") and "star-step00000005" in w for w in warnings)


def test_step_states_are_saved_pruned_and_resume_mid_epoch_to_the_same_weights(baseline, dataset, tmp_path):
    assert run(dataset, tmp_path / "a", "--save_every_n_steps", "5", "--save_state", "--save_last_n_steps_state", "1") == 0
    states = sorted(p.name for p in (tmp_path / "a").glob("star-step*-state"))
    assert states == ["star-step00000015-state"]  # 5 and 10 were pruned, as sd-scripts prunes
    assert run(dataset, tmp_path / "b", "--resume", str(tmp_path / "a" / states[0])) == 0
    resumed, uninterrupted = weights(tmp_path / "b" / "star.safetensors"), weights(baseline / "star.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)

    def epoch_losses(path):
        with safe_open(str(path), "pt") as handle:
            return json.loads(handle.metadata()["lora_trainer.losses"])["epoch_training_loss"]

    assert epoch_losses(tmp_path / "b" / "star.safetensors") == epoch_losses(baseline / "star.safetensors")


def test_regularisation_images_are_counted_and_listed_as_sd_scripts_records_them(dataset, tmp_path):
    """ss_num_reg_images is the folders' images × repeats before they are balanced against the training images; a
    --dataset_config run lists only training folders in ss_dataset_dirs (the reg ones are in ss_datasets)."""
    reg = tmp_path / "reg" / "3_star"
    reg.mkdir(parents=True)
    for image in sorted((dataset / "2_zkstar").glob("*.png"))[:4]:
        shutil.copy(image, reg / image.name)

    def metadata(out: Path) -> dict:
        with safe_open(str(out / "star.safetensors"), "pt") as handle:
            return handle.metadata()

    assert run(dataset, tmp_path / "folders", "--reg_data_dir", str(tmp_path / "reg"), "--max_train_steps", "1",
               "--max_train_epochs", "0") == 0
    written = metadata(tmp_path / "folders")
    assert written["ss_num_reg_images"] == "12"  # 4 images × 3, though balanced up to the 32 training images
    assert json.loads(written["ss_reg_dataset_dirs"]) == {"3_star": {"n_repeats": 3, "img_count": 4}}
    config = tmp_path / "dataset.toml"
    config.write_text("[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = 64\nbatch_size = 4\n"
                      f"  [[datasets.subsets]]\n  image_dir = '{(dataset / '2_zkstar').as_posix()}'\n  num_repeats = 2\n"
                      f"  [[datasets.subsets]]\n  image_dir = '{reg.as_posix()}'\n  num_repeats = 3\n  is_reg = true\n",
                      encoding="utf-8")
    assert train_main(["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--dataset_config", str(config),
                       "--output_dir", str(tmp_path / "toml"), "--output_name", "star", "--network_module", "networks.lora",
                       "--max_train_steps", "1", "--cache_latents", "--seed", "3"]) == 0
    written = metadata(tmp_path / "toml")
    assert json.loads(written["ss_dataset_dirs"]) == {"2_zkstar": {"n_repeats": 2, "img_count": 16}}
    assert written["ss_num_reg_images"] == "12" and json.loads(written["ss_datasets"])[0]["num_reg_images"] == 12
    assert [s["is_reg"] for s in json.loads(written["ss_datasets"])[0]["subsets"]] == [False, True]


def test_two_folders_with_the_same_name_are_listed_apart_in_ss_dataset_dirs(dataset, tmp_path):
    for parent in ("a", "b"):
        shutil.copytree(dataset / "2_zkstar", tmp_path / parent / "stars")
    config = tmp_path / "dataset.toml"
    config.write_text("[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = 64\nbatch_size = 4\n"
                      + "".join(f"  [[datasets.subsets]]\n  image_dir = '{(tmp_path / p / 'stars').as_posix()}'\n" for p in "ab"),
                      encoding="utf-8")
    assert train_main(["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--dataset_config", str(config),
                       "--output_dir", str(tmp_path / "out"), "--output_name", "star", "--network_module", "networks.lora",
                       "--max_train_steps", "2", "--cache_latents", "--seed", "3"]) == 0
    with safe_open(str(tmp_path / "out" / "star.safetensors"), "pt") as handle:
        dirs = json.loads(handle.metadata()["ss_dataset_dirs"])
    assert dirs == {"stars": {"n_repeats": 1, "img_count": 16}, "stars (2)": {"n_repeats": 1, "img_count": 16}}


def test_running_out_of_memory_says_which_options_lower_it(dataset, tmp_path, capsys, monkeypatch):
    import lora_trainer.training.trainer as trainer

    def out_of_memory(*_, **__):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "_training_step", out_of_memory)
    assert run(dataset, tmp_path, "--gradient_checkpointing") == 2
    message = capsys.readouterr().err
    assert "out of CPU memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in message
    assert "--mixed_precision bf16" in message and "smaller --train_batch_size (now 4)" in message
    assert "--gradient_checkpointing," not in message  # already on: not advised


def test_an_empty_dataset_or_an_output_path_that_is_a_file_is_refused_and_nothing_is_written(dataset, tmp_path, capsys):
    empty = tmp_path / "empty set" / "5_nothing"
    empty.mkdir(parents=True)
    assert run(empty.parent, tmp_path / "out") == 2
    message = capsys.readouterr().err
    assert "No training images found in" in message and "5_nothing; add images (.png" in message
    assert not list((tmp_path / "out").glob("*.safetensors"))

    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("keep me", encoding="utf-8")
    assert run(dataset, blocked) == 2
    message = capsys.readouterr().err
    assert "is not writable" in message and "pick another --output_dir" in message and "Traceback" not in message
    assert blocked.read_text(encoding="utf-8") == "keep me"  # nothing lost
    # a state folder that cannot be written is said before training, not at the first save an epoch in
    assert run(dataset, tmp_path / "out2", "--save_state", "--state_dir", str(blocked)) == 2
    message = capsys.readouterr().err
    assert "state folder" in message and "is not writable" in message and "pick another --state_dir" in message
    assert not list((tmp_path / "out2").glob("*.safetensors"))


def test_validation_every_n_steps_adds_step_losses_to_the_events_and_the_file(dataset, tmp_path):
    assert run(dataset, tmp_path, "--validation_split", "0.5", "--validate_every_n_steps", "2",
               "--max_validation_steps", "1") == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    by_step = [e for e in events if e["event"] == "validation" and "epoch" not in e]
    by_epoch = [e for e in events if e["event"] == "validation" and "epoch" in e]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert [e["step"] for e in by_step] == [s for s in steps if s % 2 == 0] and len(by_epoch) == 2
    with safe_open(str(tmp_path / "star.safetensors"), "pt") as handle:
        losses = json.loads(handle.metadata()["lora_trainer.losses"])
    assert set(losses["step_validation_loss"]) == {str(e["step"]) for e in by_step}
    # one batch (4 images, as sd-scripts counts the steps) of the eight held out: another (cheaper) mean than all eight
    assert run(dataset, tmp_path / "all", "--validation_split", "0.5", "--validate_every_n_steps", "2") == 0
    every, _ = read_events(tmp_path / "all" / "star.events.jsonl")
    first_all = next(e["loss"] for e in every if e["event"] == "validation")
    assert by_step[0]["loss"] != first_all


@pytest.mark.parametrize("network", [["--network_args", "module_dropout=0.5"],
                                     ["--network_module", "networks.dylora", "--network_args", "unit=1"]])
def test_module_dropout_and_dylora_ranks_are_drawn_again_alike_in_a_checkpointed_recompute(dataset, tmp_path, network):
    """Gradient checkpointing runs a block's forward twice; the second must skip the same modules and train the same
    DyLoRA ranks (the Kohya GUI's SDXL LoKr preset pairs module dropout with checkpointing). They are drawn from
    torch's generator, which checkpointing restores for the recompute."""
    assert run(dataset, tmp_path / "plain", "--max_train_epochs", "1", *network) == 0
    assert run(dataset, tmp_path / "checkpointed", "--max_train_epochs", "1", "--gradient_checkpointing", *network) == 0
    plain, checkpointed = (weights(tmp_path / name / "star.safetensors") for name in ("plain", "checkpointed"))
    assert all(torch.allclose(checkpointed[k], plain[k], rtol=1e-5, atol=1e-7) for k in plain)


def test_a_missing_network_weights_file_is_named_before_any_work(dataset, tmp_path, capsys):
    """A Kohya GUI preset can carry its author's lora_network_weights (D:/…): said at once, with the option's name."""
    assert run(dataset, tmp_path, "--network_weights", str(tmp_path / "D" / "kill bill.safetensors")) == 2
    error = capsys.readouterr().err
    assert "--network_weights" in error and "kill bill.safetensors: no such network file" in error
    assert not (tmp_path / "star.events.jsonl").exists()  # refused with the options, before the model is read


def test_the_terminal_hears_warnings_saves_and_the_recommendation_and_a_program_may_read_events_on_stdout(
        dataset, tmp_path, capsys):
    """sd-scripts users read its console: the event stream's warnings, saved files and recommended epoch are said on
    stderr too; ``--events_file -`` writes the JSON lines to stdout for a program driving the trainer."""
    assert run(dataset, tmp_path / "out", "--xformers", "--save_every_n_epochs", "1") == 0
    said = capsys.readouterr()
    lines = said.err.splitlines()
    assert lines[0].startswith("warning: --xformers") and not said.out
    assert f"saved {tmp_path / 'out' / 'star-000001.safetensors'}" in lines
    assert lines[-1].startswith("recommended epoch: ")

    assert run(dataset, tmp_path / "piped", "--events_file", "-") == 0
    said = capsys.readouterr()
    events = [json.loads(line) for line in said.out.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    assert events[-1]["files"] == [str(tmp_path / "piped" / "star.safetensors")]
    assert f"saved {tmp_path / 'piped' / 'star.safetensors'}" in said.err.splitlines()
    assert not list((tmp_path / "piped").glob("*.jsonl"))


def test_a_stop_while_the_latents_cache_ends_the_stream_as_a_stop_not_a_traceback(dataset, tmp_path, capsys, monkeypatch):
    """SIGTERM or Ctrl-C before the training loop takes them over (loading, caching: minutes on a large dataset): the
    stream ends as a stop that saved nothing, which the UI and API read, instead of a traceback or a silent kill."""
    import os
    import signal

    from lora_trainer.training.data import TrainingData

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(TrainingData, "cache_latents", lambda *args: os.kill(os.getpid(), signal.SIGTERM))
    assert run(dataset, tmp_path) == 130
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert events[-1]["event"] == "end" and events[-1]["stopped"] and events[-1]["files"] == []
    assert "stopped before the first step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before  # given back


def test_a_stop_while_the_options_are_read_is_one_sentence_not_a_silent_kill(dataset, tmp_path, capsys, monkeypatch):
    """The job runner sends SIGTERM to a trainer that has not taken a step: in its first second (options, imports)
    that killed it without a word, or Ctrl-C printed a KeyboardInterrupt traceback."""
    import os
    import signal

    from lora_trainer.training import options as options_module

    before, parse = signal.getsignal(signal.SIGTERM), options_module.parse_args

    def stopped_while_parsing(*args, **kwargs):
        if signal.getsignal(signal.SIGTERM) == before:  # not taken over: the signal would end this test's process
            raise AssertionError("SIGTERM would kill the trainer here")
        os.kill(os.getpid(), signal.SIGTERM)
        return parse(*args, **kwargs)

    monkeypatch.setattr(options_module, "parse_args", stopped_while_parsing)
    assert run(dataset, tmp_path) == 130
    assert "stopped before the run started: nothing was trained or saved" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before  # given back


def test_a_full_disk_under_the_event_log_neither_ends_the_run_nor_garbles_the_log(dataset, tmp_path, capsys, monkeypatch):
    """Another program fills the disk: the events, flushed every step, are the first write to fail. The run died
    unsaved on the OSError (and a server restart died writing a recovered job's error). Now it is said once, the
    torn line is skipped by readers, and events go on once there is room."""
    import errno

    from lora_trainer.training import events as events_module

    real_open, failing = open, {"left": 0}

    class FillingUp:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            if failing["left"]:
                failing["left"] -= 1
                self.handle.write(data[:7])  # part of the line reached the disk
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

        def close(self):
            self.handle.close()

    monkeypatch.setattr(events_module, "open", lambda path, mode="r", **k: FillingUp(real_open(path, mode, **k))
                        if mode == "ab" else real_open(path, mode, **k), raising=False)
    log = events_module.EventLog(tmp_path / "events.jsonl")
    log.emit("start")
    failing["left"] = 2
    log.emit("warning", message="lost")
    log.emit("warning", message="lost too")
    log.emit("end", files=[])
    log.close()
    assert [e["event"] for e in read_events(tmp_path / "events.jsonl")[0]] == ["start", "end"]
    assert capsys.readouterr().err.count("could not be written (No space left on device); the run goes on") == 1
    # a trainer killed mid-line: the next writer (the job runner's closing event) starts on a line of its own
    with open(tmp_path / "events.jsonl", "ab") as torn:
        torn.write(b'{"event": "st')
    with events_module.EventLog(tmp_path / "events.jsonl") as later:
        later.emit("error", message="killed")
    assert [e["event"] for e in read_events(tmp_path / "events.jsonl")[0]] == ["start", "end", "error"]
    class FullStderr:  # the job's trainer.log, on the same full disk
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        flush = write

    failing["left"] = 1
    with events_module.EventLog(tmp_path / "events.jsonl", console=FullStderr()) as full:
        full.emit("warning", message="neither the file nor the console takes it")
    failing["left"] = 3  # during a run: it trains and saves as usual
    assert run(dataset, tmp_path / "run", "--max_train_epochs", "1") == 0
    assert (tmp_path / "run" / "star.safetensors").exists()


def test_a_reader_of_the_event_stream_going_away_leaves_the_run_training(dataset, tmp_path, capsys, monkeypatch):
    """``--events_file - | head``: the pipe breaks; the run goes on and saves (it died unsaved on BrokenPipeError)."""
    import io
    import sys

    class Closing(io.StringIO):
        def write(self, text):
            if self.tell() > 2000:
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", Closing())
    assert run(dataset, tmp_path, "--events_file", "-") == 0
    assert (tmp_path / "star.safetensors").exists()
    assert "the reader of the event stream went away; training goes on" in capsys.readouterr().err


def test_long_phases_show_a_progress_bar_at_a_terminal_and_none_in_a_log(monkeypatch):
    """Caching a thousand latents takes minutes: a person at a terminal sees it move, as in sd-scripts; the job
    runner's trainer.log (not a terminal) gets no bar redrawn a thousand times."""
    import io
    import sys

    from lora_trainer.console import progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, shown in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = progress_bar(3, "image", "caching latents", leave=False)
        bar.update(3)
        bar.close()
        assert ("caching latents" in stream.getvalue()) == shown


def test_what_the_dataset_leaves_out_is_said_as_warnings(dataset, tmp_path):
    """A damaged image and a folder without its repeats prefix are skipped, as sd-scripts skips such folders: the
    user must hear which and why, or a run trains on less than they think."""
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    expected = {}  # the tags of the images that train, as ss_tag_frequency counts them
    for caption in sorted((data / "2_zkstar").glob("*.txt")):
        for tag in caption.read_text(encoding="utf-8").split(","):
            expected[tag.strip().lower()] = expected.get(tag.strip().lower(), 0) + 1
    (data / "2_zkstar" / "damaged.png").write_bytes(b"not a png")
    (data / "2_zkstar" / "damaged.txt").write_text("zkstar, torn edges", encoding="utf-8")
    (data / "zkstar extra").mkdir()
    assert run(data, tmp_path / "out") == 0
    events, _ = read_events(tmp_path / "out" / "star.events.jsonl")
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert any("damaged.png is not an image Pillow can read" in w and w.endswith("skipped") for w in warnings)
    with safe_open(str(tmp_path / "out" / "star.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["ss_tag_frequency"]) == {"2_zkstar": expected}  # not the skipped image's
    assert any("skipped folders without a <repeats>_ prefix: 'zkstar extra'" in w for w in warnings)
    assert [e["event"] for e in events].index("warning") == 1  # right after the start event, as the UI shows them


def truncated_png(path: Path, size: tuple[int, int] = (128, 64)) -> Path:
    """A PNG cut in the middle of its pixel data: its header (and so its size) still reads, its pixels do not."""
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise, "RGB").save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def caption_tags(folder: Path) -> dict[str, int]:
    """The tags of the .txt captions in ``folder`` as ss_tag_frequency counts them."""
    counts: dict[str, int] = {}
    for caption in sorted(folder.glob("*.txt")):
        for tag in caption.read_text(encoding="utf-8").split(","):
            counts[tag.strip().lower()] = counts.get(tag.strip().lower(), 0) + 1
    return counts


@pytest.mark.parametrize("caching", [("--cache_latents",), ()], ids=["cached", "per-batch"])
def test_a_truncated_image_is_skipped_like_an_unreadable_one_and_counts_nowhere(dataset, tmp_path, caching):
    """A PNG cut short still has a readable header: it used to pass the dataset check and stop the run when its
    latents were cached (or mid-epoch without caching). It is skipped before anything is counted, with the file and
    what is wrong, like a file Pillow cannot open: not in the image count, the tags or the buckets."""
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    expected = caption_tags(data / "2_zkstar")
    truncated_png(data / "2_zkstar" / "cut.png")  # wide: a bucket of its own, were it counted
    (data / "2_zkstar" / "cut.txt").write_text("zkstar, torn edges", encoding="utf-8")
    args = ["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", str(data), "--output_dir",
            str(tmp_path / "out"), "--output_name", "star", "--resolution", "64", "--max_train_epochs", "1",
            "--caption_extension", ".txt", "--max_data_loader_n_workers", "0",
            "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128"]
    assert train_main([*args, *caching]) == 0
    events, _ = read_events(tmp_path / "out" / "star.events.jsonl")
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert (f"{data / '2_zkstar' / 'cut.png'} is truncated (the file ends early); re-export or re-download it, "
            "or remove it; skipped") in warnings
    assert next(e for e in events if e["event"] == "start")["images"] == 32  # 16 readable images x 2 repeats
    with safe_open(str(tmp_path / "out" / "star.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_num_train_images"] == "32"
    assert json.loads(metadata["ss_tag_frequency"]) == {"2_zkstar": expected}
    assert json.loads(metadata["ss_dataset_dirs"]) == {"2_zkstar": {"n_repeats": 2, "img_count": 16}}
    assert json.loads(metadata["ss_bucket_info"])["buckets"] == {"0": {"resolution": [64, 64], "count": 32}}


def test_training_start_decodes_a_large_jpeg_at_an_eighth_of_its_size_and_still_skips_a_truncated_one(tmp_path,
                                                                                                       monkeypatch):
    """The start of a run decodes every image to find damaged ones: 1500 12-megapixel photos took minutes in full.
    A JPEG is decoded at an eighth of each side, which still reads its stream to the end: a truncated one is skipped
    with its note, and a good one keeps its full size (its bucket)."""
    from types import SimpleNamespace

    from PIL import ImageFile

    from lora_trainer.training.data import build_training_data
    from lora_trainer.training.options import options_from

    folder = tmp_path / "data" / "1_zkstar"
    folder.mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    Image.fromarray(noise, "RGB").save(folder / "photo.jpg", quality=90)
    cut = folder / "cut.jpg"
    cut.write_bytes((folder / "photo.jpg").read_bytes()[: (folder / "photo.jpg").stat().st_size // 2])
    decoded: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image.size) or load(image))
    options = options_from({"pretrained_model_name_or_path": "m", "train_data_dir": str(folder.parent),
                            "resolution": "64", "enable_bucket": True, "min_bucket_reso": "64", "max_bucket_reso": "128"})
    data = build_training_data(options, SimpleNamespace(bucket_step_multiple=64, name="sd", label="SD 1.5"), seed=3)
    assert (f"{cut} is truncated (the file ends early); re-export or re-download it, or remove it; skipped"
            in data.notes)
    assert [(record.path.name, record.size) for record in data.datasets[0].train] == [("photo.jpg", (1024, 768))]
    assert sorted(decoded) == [(128, 96), (128, 96)]  # both JPEGs, each at an eighth of 1024 x 768


def test_a_dataset_of_truncated_images_only_is_refused_naming_them(tmp_path, capsys):
    folder = tmp_path / "data" / "2_zkstar"
    folder.mkdir(parents=True)
    truncated_png(folder / "a.png"), truncated_png(folder / "b.png")
    assert run(tmp_path / "data", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "the dataset has no usable training images" in err
    assert f"{folder / 'a.png'} is truncated" in err and f"{folder / 'b.png'} is truncated" in err


DAMAGE = {"not an image": lambda path: path.write_bytes(b"not a png"), "truncated": truncated_png}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_the_class_token_note_leaves_out_the_images_that_are_skipped(dataset, tmp_path, damage):
    """Images without a caption file train with the folder's class tokens, and the note lists them: a damaged one
    is skipped, so it is neither listed nor counted there."""
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "2_zkstar" / "star_003.txt").unlink()
    damage(data / "2_zkstar" / "damaged.png")
    assert run(data, tmp_path / "out") == 0
    events, _ = read_events(tmp_path / "out" / "star.events.jsonl")
    notes = [e["message"] for e in events if e["event"] == "warning" and "caption and train with" in e["message"]]
    assert notes == [f"{data / '2_zkstar'}: 1 images have no .txt caption and train with the class tokens 'zkstar': "
                     "star_003.png."]


@pytest.mark.parametrize(("damage", "size"),
                         [(DAMAGE["not an image"], {}), (DAMAGE["truncated"], {"image_size": [128, 64]})],
                         ids=["not an image", "truncated, sized by the metadata"])
def test_fine_tuning_tags_of_a_skipped_image_are_not_counted(dataset, tmp_path, damage, size):
    """--in_json: ss_tag_frequency counts the metadata's tags, and a skipped image's tags leave it, as a folder's
    skipped image takes its caption out (sd-scripts would stop on such an image: it trains nothing). An image is
    checked even when the metadata gives its size (prepare_buckets_latents.py writes it), else a damaged one would
    stop the run when its latents are cached."""
    images = tmp_path / "images"
    shutil.copytree(dataset / "2_zkstar", images)
    metadata = {p.name: {"caption": "a star", "tags": p.with_suffix(".txt").read_text(encoding="utf-8").strip()}
                for p in sorted(images.glob("*.png"))}
    expected = caption_tags(images)
    damage(images / "damaged.png")
    metadata["damaged.png"] = {"caption": "a star", "tags": "zkstar, torn edges", **size}
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(metadata), encoding="utf-8")
    assert run(images, tmp_path / "out", "--in_json", str(meta), "--dataset_repeats", "2") == 0
    with safe_open(str(tmp_path / "out" / "star.safetensors"), "pt") as handle:
        written = handle.metadata()
    assert json.loads(written["ss_tag_frequency"]) == {"meta.json": expected}
    assert written["ss_num_train_images"] == "32"


def test_network_weights_of_another_kind_name_the_options_the_file_was_trained_with(dataset, tmp_path, capsys):
    """A LoHa file continued by a LoRA run: the message gives the file's own network options to repeat."""
    loha = ("--network_module", "lycoris.kohya", "--network_args", "algo=loha", "preset=attn-mlp")
    assert run(dataset, tmp_path / "loha", *loha, "--max_train_epochs", "1") == 0
    start = str(tmp_path / "loha" / "star.safetensors")
    assert run(dataset, tmp_path / "lora", "--network_weights", start) == 2
    error = capsys.readouterr().err
    assert ("the file is loha with --network_module lycoris.kohya --network_args algo=loha preset=attn-mlp, this run "
            "trains lora") in error
    assert run(dataset, tmp_path / "again", *loha, "--network_weights", start, "--max_train_epochs", "1") == 0
    assert run(dataset, tmp_path / "taken", "--network_weights", start, "--dim_from_weights", "--max_train_epochs", "1") == 0
    assert {key.split(".", 1)[1] for key in weights(tmp_path / "taken" / "star.safetensors")} >= {"hada_w1_a", "hada_w2_b"}
    # saved as what it holds: a LoHa labelled networks.lora would be listed and inspected as a LoRA
    with safe_open(str(tmp_path / "taken" / "star.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == "loha"


def test_network_weights_of_another_rank_name_it_instead_of_torchs_size_mismatches(baseline, dataset, tmp_path, capsys):
    assert run(dataset, tmp_path, "--network_weights", str(baseline / "star.safetensors"), "--network_dim", "8") == 2
    error = capsys.readouterr().err
    assert "tensors have other shapes than this network's (e.g. lora_" in error
    assert "its rank is 4 and this run has --network_dim 8; set the file's --network_dim (and --network_alpha), or add " \
           "--dim_from_weights" in error and "Traceback" not in error


def test_network_weights_of_another_base_model_say_so_not_that_the_rank_differs(dataset, tmp_path, capsys):
    """The ranks agreed (4 and 4) and the message said to set --network_dim 4 or add --dim_from_weights, which led to
    20 lines of tensors that do not fit: the file was trained on another model."""
    from reference import REFERENCE

    other = REFERENCE / "kohya-fixtures" / "lora-baseline" / "tinylora.safetensors"  # trained on tiny-sd15
    assert run(dataset, tmp_path, "--network_weights", str(other)) == 2
    assert "its rank is this run's, 4, so its layers are of another size: it was trained on 'tiny-sd15.safetensors', " \
           "another base model than this run's" in capsys.readouterr().err


def test_a_locons_extra_modules_are_left_out_when_networks_lora_continues_it_as_sd_scripts_does(tmp_path):
    """sd-scripts loads --network_weights with strict=False: a LoCon's time-embedding module, which networks.lora
    does not make, is ignored and the rest trains on; it was refused here."""
    from reference import REFERENCE, TINY_KOHYA_CHECKPOINT

    fixtures = REFERENCE / "kohya-fixtures"
    locon = fixtures / "lora-lycoris" / "tiny_locon.safetensors"
    assert train_main(["--pretrained_model_name_or_path", str(TINY_KOHYA_CHECKPOINT), "--train_data_dir",
                       str(fixtures / "dataset" / "train"), "--output_dir", str(tmp_path), "--output_name", "go_on",
                       "--resolution", "64", "--network_module", "networks.lora", "--network_dim", "4",
                       "--network_alpha", "4", "--network_weights", str(locon), "--max_train_steps", "1",
                       "--caption_extension", ".txt", "--seed", "1"]) == 0
    events, _ = read_events(tmp_path / "go_on.events.jsonl")
    assert any("tensors fit no module of this network (e.g. lora_unet_time_embedding" in e["message"]
               and "left out, as sd-scripts leaves them out" in e["message"] for e in events if e["event"] == "warning")


def test_network_weights_go_on_unet_only_without_the_text_encoder_part(baseline, dataset, tmp_path):
    """sd-scripts continues a full LoRA with --network_train_unet_only (its load is not strict): so does this, and
    says the text-encoder modules are left out."""
    start = baseline / "star.safetensors"
    assert run(dataset, tmp_path, "--network_weights", str(start), "--network_train_unet_only", "--max_train_steps", "1") == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert any(e["message"].startswith(f"--network_weights {start}: its text-encoder modules are left out")
               for e in events if e["event"] == "warning")
    saved = weights(tmp_path / "star.safetensors")
    assert saved and not any(key.startswith("lora_te") for key in saved)


def test_adafactor_on_its_relative_step_says_the_rates_go_unused_and_shows_the_steps_it_takes(dataset, tmp_path):
    """sd-scripts: with relative_step the rates and the schedule are not used (it warns, and records adafactor:<lr>);
    its TensorBoard shows the step sizes Adafactor takes, which is what the events carry too."""
    assert run(dataset, tmp_path, "--optimizer_type", "Adafactor", "--lr_scheduler", "cosine", "--unet_lr", "1e-4",
               "--text_encoder_lr", "5e-5") == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert ("--optimizer_type Adafactor takes its own step size (relative_step, its default): --learning_rate 0.001, "
            "--unet_lr, --text_encoder_lr, --lr_scheduler cosine change nothing, as in sd-scripts") in [
        e["message"].split("; for fixed")[0] for e in events if e["event"] == "warning"]
    rates = [e["lr"] for e in events if e["event"] == "step"]
    assert len(rates) == 16 and all(len(r) == 2 and r[0] != 5e-5 and r[1] != 1e-4 and 0 < min(r) for r in rates)
    assert rates[0] != rates[-1]  # the step follows the weights' scale
    with safe_open(str(tmp_path / "star.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_lr_scheduler"] == "adafactor:0.001" and metadata["ss_unet_lr"] == "None"
    assert metadata["ss_learning_rate"] == "None" and metadata["ss_text_encoder_lr"] == "None"


def test_the_step_events_carry_each_parts_rate_and_every_group_when_there_are_more(dataset, tmp_path):
    """LoRA+ makes four groups (text encoder, its up weights, UNet, its up weights): the one-line view shows the text
    encoder's and the UNet's rate, and every group's is there by name."""
    assert run(dataset, tmp_path, "--network_args", "loraplus_lr_ratio=16", "--unet_lr", "1e-4", "--text_encoder_lr",
               "1e-5") == 0
    step = next(e for e in read_events(tmp_path / "star.events.jsonl")[0] if e["event"] == "step")
    assert step["lr"] == [1e-5, 1e-4]
    assert step["lr_groups"] == {"textencoder": 1e-5, "textencoder plus": 1.6e-4, "unet": 1e-4, "unet plus": 1.6e-3}


def test_dim_from_weights_writes_the_files_rank_and_alpha_and_needs_the_file(baseline, dataset, tmp_path, capsys):
    """The card in the WebUI shows ss_network_dim: a run that took its shape from a file must say that shape (where
    sd-scripts writes the command's --network_dim and --network_alpha, which its tensors do not hold)."""
    from lora_trainer.app.user_metadata import write_card_metadata

    start = baseline / "star.safetensors"
    assert run(dataset, tmp_path, "--network_weights", str(start), "--dim_from_weights", "--network_dim", "16",
               "--network_alpha", "1") == 0
    with safe_open(str(tmp_path / "star.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "4.0")
    card = json.loads(write_card_metadata(tmp_path / "star.safetensors", {}).read_text(encoding="utf-8"))
    assert "dim 4 / alpha 4," in card["description"]
    assert run(dataset, tmp_path / "none", "--dim_from_weights") == 2
    assert "--dim_from_weights takes the network's shape from --network_weights: give that file" in capsys.readouterr().err


def test_a_schedule_free_run_stopped_and_resumed_ends_as_the_uninterrupted_one(dataset, tmp_path, monkeypatch):
    """AdamWScheduleFree saves (files and states) its averaged weights; a resumed run turns them back into the ones
    it trains on, exactly as the uninterrupted run did after the same save."""
    schedule_free = ("--optimizer_type", "AdamWScheduleFree", "--lr_scheduler", "cosine", "--save_every_n_epochs", "1")
    assert run(dataset, tmp_path / "whole", *schedule_free) == 0
    events, _ = read_events(tmp_path / "whole" / "star.events.jsonl")
    assert any(e["message"].startswith("--optimizer_type AdamWScheduleFree makes its own schedule: --lr_scheduler cosine")
               for e in events if e["event"] == "warning")
    assert len({tuple(e["lr"]) for e in events if e["event"] == "step"}) == 1  # no cosine applied on top
    stop = tmp_path / "stop"
    command_while_running(monkeypatch, stop, "stop")
    assert run(dataset, tmp_path / "a", *schedule_free, "--stop_file", str(stop)) == 0
    state = next(e["path"] for e in read_events(tmp_path / "a" / "star.events.jsonl")[0] if e["event"] == "state")
    assert run(dataset, tmp_path / "b", *schedule_free, "--resume", state) == 0
    for name in ("star-000001.safetensors", "star.safetensors"):
        resumed, whole = weights(tmp_path / "b" / name), weights(tmp_path / "whole" / name)
        assert all(torch.equal(resumed[k], whole[k]) for k in whole), name


def test_an_unexpected_failure_still_ends_the_event_stream_with_an_error(dataset, tmp_path, monkeypatch):
    """The UI and the API read the events only: a bug must show there too, not just in a console nobody sees."""
    def broken(*_, **__):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr("lora_trainer.training.trainer._training_step", broken)
    with pytest.raises(ZeroDivisionError):
        run(dataset, tmp_path)
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert events[-1]["event"] == "error"
    assert events[-1]["message"].startswith("unexpected ZeroDivisionError: float division by zero; please report it")


def test_modelspec_options_fill_the_files_metadata_and_a_thumbnail_file_becomes_a_data_url(dataset, tmp_path, capsys):
    """sd-scripts' --metadata_* options (its add_model_spec_arguments): what a model card or a civitai upload reads."""
    thumbnail = sorted(dataset.rglob("*.png"))[0]
    given = {"title": "Star", "author": "me", "description": "a yellow star", "license": "CC-BY-4.0", "tags": "star,shape",
             "trigger_phrase": "zkstar", "usage_hint": "use zkstar at 0.8", "merged_from": "a, b", "preprocessor": "none",
             "is_negative_embedding": "false"}
    arguments = [word for key, value in given.items() for word in (f"--metadata_{key}", value)]
    assert run(dataset, tmp_path, "--max_train_epochs", "1", *arguments, "--metadata_thumbnail", str(thumbnail)) == 0
    with safe_open(str(tmp_path / "star.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert {key: metadata[f"modelspec.{key}"] for key in given} == given
    assert "modelspec.timestep_range" not in metadata and "modelspec.encoder_layer" not in metadata  # not asked for
    assert run(dataset, tmp_path / "range", "--max_train_steps", "1", "--min_timestep", "100", "--clip_skip", "2") == 0
    with safe_open(str(tmp_path / "range" / "star.safetensors"), "pt") as handle:
        ranged = handle.metadata()
    assert (ranged["modelspec.timestep_range"], ranged["modelspec.encoder_layer"]) == ("100,1000", "2")
    # sd-scripts records --network_dropout inside ss_network_args too
    assert run(dataset, tmp_path / "drop", "--max_train_steps", "1", "--network_dropout", "0.1", "--network_args",
               "conv_dim=2") == 0
    with safe_open(str(tmp_path / "drop" / "star.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["ss_network_args"]) == {"conv_dim": "2", "dropout": 0.1}
    assert metadata["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(thumbnail.read_bytes()).decode()
    assert run(dataset, tmp_path / "missing", "--metadata_thumbnail", str(tmp_path / "cover.png")) == 2
    assert "--metadata_thumbnail" in capsys.readouterr().err
    assert run(dataset, tmp_path / "deepspeed", "--offload_optimizer_device", "cpu") == 2  # DeepSpeed's own options
    assert "not supported: --offload_optimizer_device" in capsys.readouterr().err


def test_a_ctrl_c_after_the_run_ended_does_not_say_nothing_was_trained(dataset, tmp_path, capsys, monkeypatch):
    """A second Ctrl-C lands after the loop gave the signals back (its end event listed the saved files): it was
    reported as a stop before the first step that saved nothing, with a second end event saying so."""
    from lora_trainer.training import trainer as trainer_module

    train = trainer_module.train

    def interrupted_on_the_way_out(*args, **kwargs):
        train(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "train", interrupted_on_the_way_out)
    assert run(dataset, tmp_path) == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    ends = [event for event in events if event["event"] == "end"]
    assert len(ends) == 1 and ends[0]["files"] and not ends[0]["stopped"]
    err = capsys.readouterr().err
    assert "nothing was trained" not in err and "interrupted after the run ended: the files it listed are saved" in err


def test_under_gradient_accumulation_the_reported_losses_count_every_batch(dataset, tmp_path, monkeypatch):
    """With --gradient_accumulation_steps 2 the step loss, the epoch average (and so the recommended epoch) were the
    last batch's alone: half the images never counted. sd-scripts records every batch."""
    from lora_trainer.training import trainer as trainer_module

    batch_means, training_step = [], trainer_module._training_step

    def recorded(*args, **kwargs):
        losses = training_step(*args, **kwargs)
        batch_means.append(float(losses.detach().mean()))
        return losses

    monkeypatch.setattr(trainer_module, "_training_step", recorded)
    assert run(dataset, tmp_path, "--gradient_accumulation_steps", "2") == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    steps = [event for event in events if event["event"] == "step"]
    epochs = [event for event in events if event["event"] == "epoch"]
    assert len(batch_means) == 2 * len(steps)  # even batches per epoch: every step took two
    for number, step in enumerate(steps):
        assert step["loss"] == pytest.approx((batch_means[2 * number] + batch_means[2 * number + 1]) / 2, rel=1e-6)
    half = len(batch_means) // 2
    for epoch, means in zip(epochs, (batch_means[:half], batch_means[half:])):
        assert epoch["average"] == pytest.approx(sum(means) / len(means), rel=1e-6)
    per_epoch = len(steps) // 2  # the running average spans one epoch of steps, not one of batches
    assert steps[-1]["average"] == pytest.approx(sum(step["loss"] for step in steps[-per_epoch:]) / per_epoch, rel=1e-6)


def test_off_a_terminal_the_console_still_shows_progress(dataset, tmp_path, capsys):
    """stderr to a file (nohup … > log, a notebook's !python, the job's trainer.log): the bar is off there, and a run
    of hours printed nothing between its warnings and its end — it looked hung."""
    assert run(dataset, tmp_path) == 0  # pytest's captured stderr is not a terminal
    lines = capsys.readouterr().err.splitlines()
    progress = [line for line in lines if line.startswith(("step ", "epoch "))]
    assert progress[0].startswith("step 1/16 (epoch 1): loss ")
    assert any(line.startswith("epoch 1 done at step 8: average loss ") for line in progress)
    assert progress[-1].startswith("epoch 2 done at step 16")
    assert any(line.startswith("step 16/16 (epoch 2)") for line in progress)  # the last step, whatever the interval
    assert len(progress) == 4  # the steps between, within a minute of the first, are not each a line


def test_caching_fifty_latents_or_more_off_a_terminal_says_how_far_it_is_and_trains(tmp_path, capsys):
    """Every 50 cached latents make a progress event without a step: off a terminal (every WebUI and API job writes
    trainer.log) its console line raised KeyError 'step', and any run of 50 images or more stopped before training."""
    images = sorted(SAMPLE.glob("*.png"))
    folder = tmp_path / "data" / "1_zkstar"
    folder.mkdir(parents=True)
    for number in range(52):
        source = images[number % len(images)]
        shutil.copy(source, folder / f"{number:03d}.png")
        shutil.copy(source.with_suffix(".txt"), folder / f"{number:03d}.txt")
    assert run(folder.parent, tmp_path / "out", "--max_train_steps", "1") == 0
    lines = capsys.readouterr().err.splitlines()
    assert "caching latents: 50/52" in lines and "caching latents: 52/52" in lines  # the first count, then one a
    # minute, and the last
    assert (tmp_path / "out" / "star.safetensors").exists()


def test_off_terminal_progress_says_the_time_left():
    from lora_trainer.training.events import OffTerminalProgress

    progress = OffTerminalProgress(every=60)
    step = {"event": "step", "total": 101, "epoch": 1, "loss": 0.1, "average": 0.1}
    assert progress.line({**step, "time": 1000.0, "step": 1}) == "step 1/101 (epoch 1): loss 0.10000, average 0.10000"
    assert progress.line({**step, "time": 1030.0, "step": 11}) is None
    assert progress.line({**step, "time": 1060.0, "step": 21}).endswith("average 0.10000, about 4:00 left")
    assert progress.line({**step, "time": 5000.0, "step": 100}).endswith("about 0:40 left")


def test_the_validation_split_is_drawn_per_subset_as_sd_scripts_draws_it(tmp_path):
    """The split was drawn over the whole dataset: a small subset (a second concept) could be held out whole and never
    trained, without a word. Now each subset is split on its own, holding out the images sd-scripts holds out."""
    import random

    from lora_trainer.training.evaluation import split_validation

    def sd_scripts_held_out(names, fraction, seed):  # train_util.split_train_val: seeded shuffle, the tail held out
        shuffled = list(names)
        random.Random(seed).shuffle(shuffled)
        return set(shuffled[len(shuffled) - round(len(shuffled) * fraction):])

    for count, fraction, seed in ((10, 0.2, 14), (6, 0.25, 5), (16, 0.25, 3), (7, 0.5, 0)):
        names = [f"img_{i:03d}.png" for i in range(count)]
        train, held = split_validation(names, fraction, seed)
        assert set(held) == sd_scripts_held_out(names, fraction, seed) and not set(train) & set(held)
    assert split_validation(["a", "b", "c"], 0.9, 1)[0]  # sd-scripts would hold out all three: one still trains

    root = tmp_path / "data"
    shutil.copytree(SAMPLE, root / "10_a")
    (root / "5_b").mkdir()
    for name in ("star_001", "star_002"):
        for suffix in (".png", ".txt"):
            shutil.copy(SAMPLE / f"{name}{suffix}", root / "5_b" / f"{name}{suffix}")
    assert run(root, tmp_path / "out", "--validation_split", "0.2", "--validation_seed", "14", "--max_train_steps", "1") == 0
    events, _ = read_events(tmp_path / "out" / "star.events.jsonl")
    assert any(e["message"] == f"{root / '5_b'}: --validation_split 0.2 holds out none of its 2 image(s); it trains on "
               "all of them" for e in events if e["event"] == "warning")
    with safe_open(str(tmp_path / "out" / "star.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert set(json.loads(metadata["ss_dataset_dirs"])) == {"10_a", "5_b"}
    assert metadata["ss_num_validation_images"] == "3"  # round(16 × 0.2) of 10_a, none of 5_b


def test_validation_is_measured_as_the_run_trains_at_sd_scripts_timesteps(dataset, tmp_path, capsys):
    """Validation was plain L2 at 100/350/600/850 whatever the run trained: with --max_timestep 500 it measured
    timesteps never trained, with a Huber loss or min-SNR another quantity than sd-scripts logs under the same tag."""
    from lora_trainer.training.evaluation import validation_timesteps

    assert validation_timesteps(None, None, 1000) == [200, 400, 600, 800]
    assert validation_timesteps(None, 500, 1000) == [100, 200, 300, 400]
    first = {}
    for name, extra in (("l2", ()), ("huber", ("--loss_type", "huber")), ("snr", ("--min_snr_gamma", "5"))):
        assert run(dataset, tmp_path / name, "--validation_split", "0.25", "--max_train_epochs", "1", *extra) == 0
        events, _ = read_events(tmp_path / name / "star.events.jsonl")
        first[name] = next(e["loss"] for e in events if e["event"] == "validation")
    assert len(set(first.values())) == 3
    assert run(dataset, tmp_path / "none", "--validation_split", "0.25", "--max_validation_steps", "0") == 2
    assert "--max_validation_steps 0: give 1 or more batches" in capsys.readouterr().err


def test_only_images_clearly_above_the_others_are_named_and_the_console_and_train_tab_say_what_to_do():
    """The five highest mean losses were named whatever the spread: among alike images that is the noise of the
    timesteps drawn (another seed named other images), and nobody saw the list outside the events."""
    import random

    from lora_trainer.app.ui.live import progress_text, view_of
    from lora_trainer.training.evaluation import outlier_images
    from lora_trainer.training.events import console_line

    draw = random.Random(0)
    alike = {f"10_a/img_{i:02d}.png": [0.1 + draw.gauss(0, 0.01) for _ in range(6)] for i in range(16)}
    assert outlier_images(alike) == []
    odd = {**alike, "10_a/noise.png": [0.3, 0.32, 0.29, 0.31, 0.3, 0.33]}
    assert [path for path, _ in outlier_images(odd)] == ["10_a/noise.png"]
    assert outlier_images({**odd, "10_a/seen_once.png": [0.2]}) == outlier_images(odd)  # one draw is no evidence
    timesteps_noise = {f"10_a/img_{i:02d}.png": [draw.choice((0.01, 0.05, 0.2, 0.9)) for _ in range(4)] for i in range(16)}
    assert outlier_images(timesteps_noise) == []  # four draws at random timesteps: a high mean is no finding
    end = {"event": "end", "time": 0, "files": [], "steps": 8, "recommended_epoch": 2, "reason": "the knee",
           "highest_loss_images": [["/data/10_a/noise.png", 0.308]]}
    said = console_line(end).splitlines()
    assert said[0] == "recommended epoch: 2 (the knee)"
    assert said[1].startswith("images with a clearly higher training loss than the others: noise.png (0.3080) — check "
                              "their crop and caption")
    assert said[1] in progress_text(view_of([end], "finished"))


def test_the_held_out_count_is_said_at_the_start_and_a_follower_stops_at_an_error(dataset, tmp_path, capsys):
    from lora_trainer.training.events import EventLog, follow

    assert run(dataset, tmp_path, "--validation_split", "0.25", "--max_train_steps", "1") == 0
    start = read_events(tmp_path / "star.events.jsonl")[0][0]
    assert start["validation_images"] == 4 and start["images"] == 24
    # what --log_config asks of sd-scripts: the run's options, where every reader of the events finds them
    assert start["options"]["validation_split"] == 0.25 and start["options"]["network_dim"] == 4
    assert "validation: 4 image(s) held out, 24 training images (with repeats)" in capsys.readouterr().err.splitlines()
    with EventLog(tmp_path / "failed.jsonl") as events:  # a failed run ends with error and no end: follow() waited forever
        events.emit("start")
        events.emit("error", message="out of memory")
    assert [e["event"] for e in follow(tmp_path / "failed.jsonl", poll=0.01)] == ["start", "error"]


def test_a_missing_optimizer_package_is_said_before_the_model_loads(dataset, tmp_path, monkeypatch, capsys):
    """AdamW8bit without bitsandbytes failed after the model loaded and the latents cached (minutes on a real model,
    after waiting in the queue). The WebUI's own process cannot check it: the trainer's process does, first."""
    import sys

    from lora_trainer.training import trainer as trainer_module

    def loaded(*args):
        raise AssertionError("the model was loaded before the optimizer's package was looked for")

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    monkeypatch.setattr(trainer_module, "_prepared_model", loaded)
    assert run(dataset, tmp_path, "--optimizer_type", "AdamW8bit") == 2
    assert "--optimizer_type AdamW8bit needs the Python package bitsandbytes" in capsys.readouterr().err


def test_validation_noise_is_shaped_as_training_shapes_it(dataset, tmp_path):
    """sd-scripts validates through its training noise (offset, pyramid, input perturbation, drawn from the reset
    validation seed); validation here used plain noise whatever the run trained with, so a run with --noise_offset
    measured another quantity than sd-scripts logs, and than its own training loss."""
    first = {}
    for name, extra in (("plain", ()), ("offset", ("--noise_offset", "0.5")), ("pyramid", ("--multires_noise_iterations", "6")),
                        ("perturbed", ("--ip_noise_gamma", "0.5"))):
        # a learning rate of 1e-30: every run validates the same weights, so only the noise can tell them apart
        assert run(dataset, tmp_path / name, "--validation_split", "0.25", "--max_train_epochs", "1",
                   "--learning_rate", "1e-30", *extra) == 0
        events, _ = read_events(tmp_path / name / "star.events.jsonl")
        first[name] = next(e["loss"] for e in events if e["event"] == "validation")
    assert len(set(first.values())) == 4, first



def test_a_learning_rate_of_zero_everywhere_is_refused_before_loading(dataset, tmp_path, capsys):
    """It trained nothing and stopped after loading and caching with torch's "optimizer got an empty parameter list"."""
    assert run(dataset, tmp_path, "--learning_rate", "0") == 2
    assert "every learning rate is 0 (--learning_rate, --unet_lr, --text_encoder_lr): nothing would train" in capsys.readouterr().err
    assert run(dataset, tmp_path, "--learning_rate", "0", "--unet_lr", "1e-4", "--max_train_steps", "1") == 0


def test_a_parked_vae_decoder_comes_to_the_gpu_only_while_samples_decode():
    """After latents are cached the decoder is needed only for samples; it stayed on the GPU all run (0.1–0.2 GiB of
    a 6 GB card with SDXL's fp32 VAE). A sample that fails still puts it back."""
    from lora_trainer.training.trainer import decoder_on

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moves = []

        def to(self, device):
            self.moves.append(str(device))
            return self

    vae = Recorder()
    with decoder_on(vae, torch.device("cuda"), parked=True):
        assert vae.moves == ["cuda"]
    with pytest.raises(RuntimeError), decoder_on(vae, torch.device("cuda"), parked=True):
        raise RuntimeError("a prompt failed")
    assert vae.moves == ["cuda", "cpu", "cuda", "cpu"]
    with decoder_on(vae, torch.device("cpu"), parked=False):
        pass
    assert len(vae.moves) == 4  # a CPU run (or uncached latents) never moves it
