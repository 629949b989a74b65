"""The job queue runs jobs one at a time, stops them gracefully (or kills them), survives restarts, resumes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from lora_trainer.errors import UserError
from lora_trainer.jobs.runner import JobRunner
from lora_trainer.jobs.store import JobStore
from lora_trainer.tiny_model.build import TINY_MODEL_PATH
from lora_trainer.training import tracking
from lora_trainer.training.events import read_events

# A stand-in trainer: reads its config like the real one, writes events, obeys (or ignores) the stop file.
FAKE_TRAINER = textwrap.dedent('''
    import json, signal, sys, time, toml
    from pathlib import Path
    options = toml.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    mode = options["training_comment"]
    events = open(options["events_file"], "a", encoding="utf-8")
    def emit(kind, **fields):
        events.write(json.dumps({"event": kind, **fields}) + "\\n"); events.flush()
    if mode == "late":  # a slow interpreter start: the job is running well before the trainer takes its start time
        time.sleep(0.5)
        mode = "wait"
    quick = mode == "quick"  # a slow start, then a fast model: three steps before it reads the control file, 1.5 s saving
    if quick:
        time.sleep(1.0)
        mode = "wait"
    slow = mode == "slow"  # it takes a second to finish its step and save once told to stop
    drawing = mode == "drawing"  # told to stop, it ends its step, draws samples for 2.5 s (one each 0.25 s), saves
    mode = "wait" if slow or drawing else mode
    started = time.time()  # as train_network.main takes it
    time.sleep(0.05)  # the trainer's imports, before it says start
    emit("start")
    control = Path(options["stop_file"])
    if control.exists() and control.stat().st_mtime < started:  # as StopRequest.drop_leftover: an earlier run's word
        control.unlink()
        emit("warning", message=f"{control} held a word from before this run started: removed, not obeyed")
    if mode == "fail":
        emit("error", message="the dataset has no usable training images")
        sys.exit(2)
    if mode == "die":  # what the kernel's out-of-memory killer does: nothing said about it (the log holds older lines)
        import os, signal
        print("saved state /out/star-000001-state", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "caching":  # latents being cached, counted as the trainer counts them: not a training step
        emit("step", phase="caching latents", done=50, total=400)
        mode = "loading"
    if mode in ("loading", "deaf"):  # a model that takes long to load; the control file is not read yet
        if mode == "deaf":  # a trainer that does not end on SIGTERM (Windows has none to send)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if mode == "loading":  # as the trainer: SIGTERM before the first step ends it at once, saying so
            signal.signal(signal.SIGTERM, lambda *_: (emit("end", files=[], steps=0, stopped=True), sys.exit(130)))
        time.sleep(30)
    if mode in ("wait", "ignore"):  # training (ignore: stuck, it took a step and stopped reading the control file)
        for step in range(1, 4 if quick else 2):
            emit("step", step=step)
    if mode in ("stepping", "talking"):  # never reads the control file: steps with a validation each, or talks after one
        for step in range(1, 300):
            emit("step", step=step) if mode == "stepping" or step == 1 else None
            emit("validation" if mode == "stepping" else "warning", step=step, message="…")
            time.sleep(0.1)
    if mode in ("wait", "ignore"):
        while not (mode == "wait" and control.exists() and control.read_text().split() not in ([], ["save"])):
            if control.exists() and control.read_text().split() == ["save"]:  # save now, go on (as the trainer does)
                control.unlink()
                step_file = Path(options["output_dir"]) / "run-step00000001.safetensors"
                step_file.parent.mkdir(parents=True, exist_ok=True)
                step_file.write_bytes(b"x")
                emit("saved", path=str(step_file))
            time.sleep(0.05)
        if slow or quick:
            time.sleep(1.5 if quick else 1.0)
        if drawing:  # the step it was in ends with its validation, in one read of the events
            time.sleep(0.6)
            emit("step", step=2)
            emit("validation", step=2, loss=0.1)
            time.sleep(0.3)  # the samples' set-up: 0.6 + 0.3 + 0.25 s from the stop to the first image, beyond the wait
        for image in range(10 if drawing else 0):
            time.sleep(0.25)
            emit("sample", path=f"sample-{image}.png")
        state = Path(options["output_dir"]) / "run-state"
        state.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "train_state.pt"):  # what a state folder holds (resuming checks for them)
            (state / name).write_bytes(b"x")
        emit("state", action="saved", path=str(state))
    Path(options["output_dir"]).mkdir(parents=True, exist_ok=True)
    out = Path(options["output_dir"]) / "run.safetensors"
    out.write_bytes(b"x")
    emit("saved", path=str(out))
    emit("end")
''')


@pytest.fixture
def runner(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER, encoding="utf-8")
    store = JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs")
    return JobRunner(store, command=lambda job: [sys.executable, str(script), str(job.config_path)], kill_after=1.0, poll=0.05)


def options(tmp_path, mode: str) -> dict:
    (tmp_path / "data" / "1_zk").mkdir(parents=True, exist_ok=True)  # a job is checked for its folders and their
    (tmp_path / "data" / "1_zk" / "a.png").write_bytes(b"")  # images (listed, not decoded) when submitted
    return {"pretrained_model_name_or_path": str(TINY_MODEL_PATH), "train_data_dir": str(tmp_path / "data"),
            "resolution": "64", "output_dir": str(tmp_path / f"out-{mode}"), "training_comment": mode}


def test_a_job_the_trainer_would_refuse_as_it_starts_is_refused_when_submitted(runner, tmp_path, monkeypatch):
    """Read from the checkpoint's header and the machine, before the job exists: a LoRA picked as the base model,
    --v2 on an SD1 file, a GPU the machine does not have. Found at the start, they failed a job after its wait."""
    from lora_trainer.safe_io import save_safetensors

    lora = save_safetensors({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
                            tmp_path / "my lora.safetensors")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(tracking, "tensorboard_installed", lambda: False)
    for change, said in (({"pretrained_model_name_or_path": str(lora)}, "my lora.safetensors is not an SD1/SD2/SDXL checkpoint"),
                         ({"v2": True}, "--v2 is set but .* is an SD1"),
                         ({"vae": str(lora)}, "--vae .*my lora.safetensors: not a VAE"),
                         ({"device": "cuda:1"}, "--device cuda:1: this machine has 1 CUDA GPU"),
                         ({"logging_dir": str(tmp_path / "logs")}, "--logging_dir .* needs the tensorboard package"),
                         # a Kohya GUI preset's step of 1: odd sizes sd-scripts refuses for an SD1 model
                         ({"bucket_reso_steps": 1}, "bucket_reso_steps 1: SD1 training needs a multiple of 64 .*use 64")):
        with pytest.raises(UserError, match=said) as refused:
            runner.submit("refused", {**options(tmp_path, "finish"), **change})
        assert refused.value.field == next(iter(change))  # the API's 400 names it
    assert runner.store.all() == []


def test_jobs_run_one_at_a_time_in_order_and_record_their_files(runner, tmp_path):
    first = runner.submit("first", options(tmp_path, "finish"))
    second = runner.submit("second", options(tmp_path, "finish"))
    done = runner.run_next()
    assert done.id == first.id and done.status == "finished"
    assert done.files == [str(tmp_path / "out-finish" / "run.safetensors")]
    assert runner.store.get(second.id).status == "queued"
    assert runner.run_next().id == second.id and runner.run_next() is None


def test_a_windows_path_with_a_part_starting_with_x_reaches_the_trainer(runner, tmp_path):
    """toml 0.10.2 writes "\\x" unescaped: every job of a D:\\models\\xxmix… checkpoint or an \\xl\\ folder failed as it
    started ("not valid TOML: Reserved escape sequence"). Linux allows backslashes in a name, so the path is one here."""
    out = tmp_path / "D:\\AI\\xxmix out"
    runner.submit("x path", {**options(tmp_path, "finish"), "output_dir": str(out)})
    done = runner.run_next()
    assert done.status == "finished", done.message
    assert done.files == [str(out / "run.safetensors")]


def test_a_new_job_moves_an_earlier_runs_files_of_its_name_aside_instead_of_replacing_them(runner, tmp_path):
    """Training "mychar" again in the Tab must not destroy the first attempt (and its edited card) in models/Lora:
    it is said before the job is queued, and the files wait beside the job folders to be moved back."""
    from lora_trainer.jobs.runner import earlier_files_note
    from lora_trainer.training.events import read_events

    lora = tmp_path / "Lora"
    lora.mkdir()
    for name, text in (("run.safetensors", "first attempt"), ("run-000002.safetensors", "its epoch"),
                       ("run.json", '{"activation text": "zkchar"}'), ("run.v2.safetensors", "another LoRA"),
                       ("run-000001.png", "a picture of no run: no run-000001 network beside it")):
        (lora / name).write_text(text, encoding="utf-8")
    again = {**options(tmp_path, "finish"), "output_dir": str(lora), "output_name": "run"}
    note = earlier_files_note(again, runner.replaced_folder)
    assert note.startswith(f"{lora} already holds a run named 'run' (run-000002.safetensors, run.json, run.safetensors)")
    job = runner.submit("run", again)
    assert runner.run_next().status == "finished"
    replaced = runner.replaced_folder / job.folder.name
    assert not replaced.is_relative_to(job.folder)  # deleting the job must not delete them
    assert (replaced / "run.safetensors").read_text(encoding="utf-8") == "first attempt"
    assert sorted(p.name for p in replaced.iterdir()) == ["run-000002.safetensors", "run.json", "run.safetensors"]
    assert sorted(p.name for p in lora.iterdir()) == ["run-000001.png", "run.safetensors", "run.v2.safetensors"]
    events, _ = read_events(job.events_path)
    assert events[0]["event"] == "warning" and f"moved out of the way into {replaced}" in events[0]["message"]
    assert earlier_files_note({**again, "resume": "some state"}, runner.replaced_folder) is None  # its own files


def test_an_earlier_file_another_program_holds_is_said_in_the_jobs_events(runner, tmp_path, monkeypatch):
    """Windows cannot move a LoRA the WebUI or ComfyUI has open: only the server's log said so."""
    import shutil

    lora = tmp_path / "Lora"
    lora.mkdir()
    for name in ("run.safetensors", "run-000001.safetensors"):
        (lora / name).write_text("first attempt", encoding="utf-8")
    move = shutil.move

    def held(source, target):
        if Path(source).name == "run.safetensors":
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        return move(source, target)

    monkeypatch.setattr(shutil, "move", held)
    job = runner.submit("run", {**options(tmp_path, "finish"), "output_dir": str(lora), "output_name": "run"})
    assert runner.run_next().status == "finished"
    messages = [e["message"] for e in read_events(job.events_path)[0] if e["event"] == "warning"]
    assert "1 file(s) of an earlier run named 'run' were moved out of the way" in messages[0]
    assert messages[1].startswith("run.safetensors of an earlier run could not be moved out of the way (another "
                                  "program has it open?)")


def test_a_job_lists_its_files_where_a_later_run_moved_them_and_a_run_that_wrote_nothing_puts_them_back(runner, tmp_path):
    """An automation client that downloads a job's file must get that job's run, not the later one written under the
    same name; and a re-run that fails before its first file leaves the Lora folder as it found it."""
    lora = tmp_path / "Lora"
    first = runner.submit("run", {**options(tmp_path, "finish"), "output_dir": str(lora), "output_name": "run"})
    runner.run_next()
    (lora / "run.safetensors").write_text("first run", encoding="utf-8")
    second = runner.submit("run", {**options(tmp_path, "finish"), "output_dir": str(lora), "output_name": "run"})
    runner.run_next()
    (moved_first,) = runner.store.get(first.id).files
    assert Path(moved_first).read_text(encoding="utf-8") == "first run"
    assert runner.store.get(second.id).files == [str(lora / "run.safetensors")]

    (lora / "run.safetensors").write_text("second run", encoding="utf-8")
    failed = runner.submit("run", {**options(tmp_path, "fail"), "output_dir": str(lora), "output_name": "run"})
    assert runner.run_next().status == "failed"
    assert (lora / "run.safetensors").read_text(encoding="utf-8") == "second run"  # back where it was
    assert runner.store.get(second.id).files == [str(lora / "run.safetensors")]
    assert not (runner.replaced_folder / failed.folder.name).exists()
    events, _ = read_events(failed.events_path)
    assert "are back in" in events[-1]["message"]


def test_a_failing_event_listener_never_stops_a_job_or_the_queue(runner, tmp_path, caplog):
    """The app refreshes its LoRA list on each saved file; when that fails (a file renamed away during the walk),
    the job still finishes and the next one still runs."""
    def listener(job, event):
        if event["event"] == "saved":
            raise FileNotFoundError("renamed away meanwhile")

    runner.on_event = listener
    first = runner.submit("first", options(tmp_path, "finish"))
    second = runner.submit("second", options(tmp_path, "finish"))
    assert runner.run_next().status == "finished" and runner.run_next().id == second.id
    assert runner.store.get(first.id).files and "handling its saved event failed" in caplog.text


def test_a_failing_job_keeps_the_trainers_message(runner, tmp_path):
    runner.submit("broken", options(tmp_path, "fail"))
    job = runner.run_next()
    assert job.status == "failed" and "no usable training images" in job.message


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_a_killed_trainer_is_said_in_the_job_and_ends_its_event_stream(runner, tmp_path):
    """Killed (out of memory, say), the trainer writes nothing: the job and the stream that the UI, the API and an
    EventSource waiting for its end read must still say what happened."""
    job = runner.submit("killed", options(tmp_path, "die"))
    job = runner.run_next()
    assert job.status == "failed"
    assert job.message == "the trainer was killed (SIGKILL) before it could say why: the system may have run out of memory"
    events, _ = read_events(job.events_path)
    assert [e["event"] for e in events] == ["start", "error"] and events[-1]["message"] == job.message


def _run_in_background(runner):
    thread = threading.Thread(target=runner.run_next)
    thread.start()
    while runner._current is None:
        time.sleep(0.02)
    time.sleep(0.2)
    return thread


def test_stop_is_graceful_and_resume_continues_from_the_saved_state(runner, tmp_path):
    job = runner.submit("long", options(tmp_path, "wait"))
    thread = _run_in_background(runner)
    runner.stop(job.id)
    thread.join(timeout=10)
    stopped = runner.store.get(job.id)
    assert stopped.status == "stopped" and stopped.message == "stopped and saved"
    assert stopped.last_state == str(tmp_path / "out-wait" / "run-state")

    resumed = runner.resume(job.id)
    assert resumed.status == "queued" and resumed.options["resume"] == stopped.last_state and resumed.resumed_from == job.id
    assert runner.store.get(job.id).message == f"resumed as job {resumed.id}"  # no longer reads as one to resume
    # a finished run's state is at its last step: the resumed job failed "leaves nothing to train" after a 201
    runner.store.update(resumed.id, status="finished", last_state=stopped.last_state)
    with pytest.raises(UserError, match=f"job {resumed.id} finished: nothing is left to train"):
        runner.resume(resumed.id)
    with pytest.raises(UserError, match=f"job {job.id} was resumed already, as job {resumed.id}: resume that one"):
        runner.resume(job.id)  # a second job from the same state would train the same steps and write the same files
    with pytest.raises(UserError, match=f"job {job.id} is stopped; only a running job can be paused"):
        runner.stop(job.id, pause=True)


def test_a_pause_pressed_after_a_stop_does_not_turn_the_stop_into_a_pause(runner, tmp_path):
    job = runner.submit("long", options(tmp_path, "wait"))
    thread = _run_in_background(runner)
    runner.stop(job.id)
    runner.stop(job.id, pause=True)
    thread.join(timeout=10)
    assert runner.store.get(job.id).status == "stopped"


def test_resumes_asked_at_once_make_one_job(runner, tmp_path, monkeypatch):
    """Four clients pressing Resume together: one job, the others told it was resumed already."""
    job = runner.submit("long", options(tmp_path, "wait"))
    thread = _run_in_background(runner)
    runner.stop(job.id)
    thread.join(timeout=10)
    submit = runner.submit
    monkeypatch.setattr(runner, "submit", lambda *a, **k: (time.sleep(0.2), submit(*a, **k))[1])  # a slow check
    answers = []

    def press():
        try:
            answers.append(runner.resume(job.id).id)
        except UserError as error:
            answers.append(str(error))

    presses = [threading.Thread(target=press) for _ in range(4)]
    for press_ in presses:
        press_.start()
    for press_ in presses:
        press_.join(timeout=10)
    assert sum(isinstance(a, int) for a in answers) == 1 and sum("resumed already" in str(a) for a in answers) == 3


def test_an_earlier_file_held_open_on_another_drive_stays_without_a_copy_left_in_replaced(tmp_path, monkeypatch):
    """Across drives a move is a copy, then the original's removal, which Windows refuses while a program (the WebUI
    hashing it) holds the file: the full copy stayed in replaced/ beside the original, never cleaned up."""
    import errno

    from lora_trainer.jobs import runner as runner_module
    from lora_trainer.jobs.store import Job

    output = tmp_path / "Lora"
    output.mkdir()
    (output / "run.safetensors").write_bytes(b"weights")
    job = Job(1, "run", "queued", {"output_dir": str(output), "output_name": "run"}, tmp_path / "jobs" / "job-1", 0.0)
    real_rename, real_unlink = os.rename, os.unlink

    def other_drive(source, target, *args, **kwargs):
        if Path(source).parent == output:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(source, target, *args, **kwargs)

    def held(path, *args, **kwargs):
        if Path(path).parent == output:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(runner_module.shutil.os, "rename", other_drive)
    monkeypatch.setattr(runner_module.shutil.os, "unlink", held)
    assert runner_module.set_aside_earlier_files(job, tmp_path / "replaced") == {}
    monkeypatch.undo()
    assert (output / "run.safetensors").read_bytes() == b"weights"
    assert not [p for p in (tmp_path / "replaced").rglob("*") if p.is_file()]


def test_a_job_whose_state_was_cut_off_while_being_replaced_resumes_from_the_one_it_replaced(runner, tmp_path):
    job = runner.submit("long", options(tmp_path, "wait"))
    thread = _run_in_background(runner)
    runner.stop(job.id)
    thread.join(timeout=10)
    state = Path(runner.store.get(job.id).last_state)
    state.rename(state.with_name(state.name + ".old"))  # killed between save_state's two renames
    assert runner.resume(job.id).options["resume"] == str(state)  # the trainer reads the .old one and says so


@pytest.mark.parametrize("word, status", [("stop", "stopped"), ("pause", "paused")])
def test_a_stop_pressed_before_the_trainer_took_its_start_time_is_obeyed_not_dropped_as_a_leftover(runner, tmp_path,
                                                                                                 word, status):
    """The trainer drops control words older than its own start (an earlier run's); a stop pressed as the job
    starts, while the trainer's interpreter still loads, is this job's and must stop it, saved."""
    runner.terminates_early = False  # as on Windows: the word waits for the trainer to read it
    job = runner.submit("early", options(tmp_path, "late"))
    thread = threading.Thread(target=runner.run_next)
    thread.start()
    while runner.store.get(job.id).status != "running":
        time.sleep(0.01)
    runner.stop(job.id, pause=word == "pause")
    thread.join(timeout=10)
    ended = runner.store.get(job.id)
    assert ended.status == status and ended.last_state == str(tmp_path / "out-late" / "run-state"), ended.message
    assert [e for e in read_events(job.events_path)[0] if e["event"] == "warning"] == []


def test_a_stop_relayed_at_the_start_of_a_fast_trainer_waits_for_its_save_from_the_relay(runner, tmp_path):
    """On Windows the stop waits for the trainer's start; its wait and its "one step since the stop" were counted from
    the press: a fast model's steps taken before the relay were counted as disobeying, and the trainer was killed
    mid-save, 2 s after the press (its save begins as it starts, 1 s after the press, and takes 1.5 s)."""
    runner.terminates_early = False  # as on Windows: the word waits for the trainer to read it
    runner.kill_after = 2.0
    job = runner.submit("fast", options(tmp_path, "quick"))
    thread = threading.Thread(target=runner.run_next)
    thread.start()
    while runner.store.get(job.id).status != "running":
        time.sleep(0.01)
    runner.stop(job.id)
    thread.join(timeout=15)
    ended = runner.store.get(job.id)
    assert (ended.status, ended.message) == ("stopped", "stopped and saved")
    assert [e["event"] for e in read_events(job.events_path)[0]][-3:] == ["state", "saved", "end"]


def test_a_stop_pressed_as_the_job_leaves_the_queue_is_not_undone_by_its_start(runner, tmp_path):
    """A stop that reads the job as queued while the runner takes it would mark it removed, and the launch would
    then run it to its end: the stop must be one for the starting job instead."""
    job = runner.submit("racing", options(tmp_path, "finish"))
    next_queued, pressed = runner.store.next_queued, []

    def taken_while_stop_is_pressed():
        taken = next_queued()
        stopper = threading.Thread(target=lambda: pressed.append(runner.stop(job.id)))
        stopper.start()
        stopper.join(timeout=0.3)
        return taken

    runner.store.next_queued = taken_while_stop_is_pressed
    ended = runner.run_next()
    assert pressed[0].status == "running"
    assert ended.id == job.id and ended.status == "stopped"


def test_a_trainer_that_cannot_be_launched_fails_its_job_and_the_queue_goes_on(tmp_path):
    """The job is marked running as it leaves the queue: a launch that fails must not leave it so."""
    runner = JobRunner(JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs"), command=lambda job: [str(tmp_path / "nothing")])
    job = runner.submit("unlaunchable", options(tmp_path, "finish"))
    failed = runner.run_next()
    assert failed.id == job.id and failed.status == "failed"
    assert failed.message.startswith("the trainer could not be started: ") and "nothing" in failed.message
    assert runner.run_next() is None


def test_pausing_a_queued_job_is_refused_as_it_has_nothing_to_save(runner, tmp_path):
    job = runner.submit("waiting", options(tmp_path, "finish"))
    with pytest.raises(UserError, match=f"job {job.id} is queued, not running: nothing to pause; stop takes it out "
                                        "of the queue"):
        runner.stop(job.id, pause=True)
    assert runner.store.get(job.id).status == "queued"
    assert runner.stop(job.id).status == "stopped"
    # its stream ends as a stopped run's does: a client that waits for the end event is not left waiting
    assert read_events(job.events_path)[0] == [{**read_events(job.events_path)[0][0], "event": "end", "files": [],
                                                "steps": 0, "stopped": True, "message": "removed from the queue"}]
    with pytest.raises(UserError, match=f"job {job.id} is stopped; only a running job can be paused"):
        runner.stop(job.id, pause=True)


def test_save_now_reaches_the_running_job_which_goes_on_until_stopped(runner, tmp_path):
    job = runner.submit("long", options(tmp_path, "wait"))
    with pytest.raises(UserError, match="only while it runs"):
        runner.control(job.id, "save")
    thread = _run_in_background(runner)
    runner.control(job.id, "save")
    while str(tmp_path / "out-wait" / "run-step00000001.safetensors") not in runner.store.get(job.id).files:
        time.sleep(0.05)
    assert runner.store.get(job.id).status == "running"
    with pytest.raises(UserError, match="use save or sample"):
        runner.control(job.id, "rm -rf")
    # answered "sent" and then only a warning in the events said nothing was drawn
    with pytest.raises(UserError, match=f"job {job.id} has no sample prompts \\(sample_prompts\\): there is nothing to draw"):
        runner.control(job.id, "sample")
    runner.stop(job.id)
    thread.join(timeout=10)
    assert runner.store.get(job.id).status == "stopped"


@pytest.mark.parametrize("pause", [False, True], ids=["stop", "pause"])
def test_a_job_that_ignores_stop_is_killed_after_the_timeout(runner, tmp_path, pause):
    job = runner.submit("stubborn", options(tmp_path, "ignore"))
    thread = _run_in_background(runner)
    runner.stop(job.id, pause=pause)
    thread.join(timeout=10)
    assert runner.store.get(job.id).status == "stopped"
    assert "killed" in runner.store.get(job.id).message
    assert read_events(job.events_path)[0][-1] == {**read_events(job.events_path)[0][-1], "event": "error",
                                                   "message": runner.store.get(job.id).message}


def test_a_stop_is_not_cut_off_while_the_trainer_is_still_saying_what_it_does(runner, tmp_path):
    """Stop (or Pause) after Sample now draws the samples first: on a slow GPU that takes minutes, beyond the wait after
    which a silent trainer is killed. A trainer that goes on writing events is finishing its work, not stuck: it was
    killed mid-sample, its step's weights and state never saved."""
    job = runner.submit("samples first", options(tmp_path, "drawing"))  # kill_after is 1 s, the samples take 2.5 s
    thread = _run_in_background(runner)
    while not [e for e in read_events(job.events_path)[0] if e["event"] == "step"]:
        time.sleep(0.02)
    runner.stop(job.id, pause=True)
    thread.join(timeout=15)
    ended = runner.store.get(job.id)
    assert (ended.status, ended.message) == ("paused", ended.message) and "killed" not in (ended.message or "")
    assert [e["event"] for e in read_events(job.events_path)[0]][-3:] == ["state", "saved", "end"]


@pytest.mark.parametrize("mode", ["stepping", "talking"])
def test_a_trainer_that_goes_on_stepping_or_talking_after_a_stop_is_killed_all_the_same(runner, tmp_path, mode):
    """Its words do not keep it alive: one that takes more steps (a validation each) does not obey; warnings are no
    sign of finishing its step."""
    runner.kill_after = 0.3
    job = runner.submit("deaf", options(tmp_path, mode))
    thread = _run_in_background(runner)
    while not [e for e in read_events(job.events_path)[0] if e["event"] == "step"]:
        time.sleep(0.02)
    asked = time.time()
    runner.stop(job.id)
    thread.join(timeout=20)
    took = time.time() - asked
    assert not thread.is_alive() and "killed" in runner.store.get(job.id).message
    assert took < 2


@pytest.mark.parametrize("mode", ["loading", "caching", "deaf"])
def test_a_stop_while_the_model_loads_ends_the_job_stopped_saying_nothing_was_trained(runner, tmp_path, mode):
    """The trainer reads its control file between steps only: loading or caching, it is told by SIGTERM and ends at
    once (it waited out the 2-minute timeout, then a SIGKILL cut a cache file mid-write). One that does not end is
    killed when the wait runs out, as a stuck trainer is; before its first step there was nothing to lose either way:
    the job says so, and its events end as a stopped run, not as an error."""
    runner.kill_after = 60.0 if mode in ("loading", "caching") else 1.0
    job = runner.submit("slow start", options(tmp_path, mode))
    thread = _run_in_background(runner)
    while not [e for e in read_events(job.events_path)[0] if e["event"] == "start"]:
        time.sleep(0.02)
    asked = time.time()
    runner.stop(job.id, pause=True)
    thread.join(timeout=10)
    assert not thread.is_alive() and time.time() - asked < 8
    ended = runner.store.get(job.id)
    assert ended.status == "stopped" and "before its first step" in ended.message and "nothing was trained" in ended.message
    last = read_events(job.events_path)[0][-1]
    assert last["event"] == "end" and last["stopped"] and last["files"] == []


def test_a_stop_before_the_first_step_of_an_sd_scripts_backend_job_is_its_stop_file_not_a_signal(runner, tmp_path,
                                                                                                monkeypatch):
    """The backend runs sd-scripts as its own child and reads the stop file itself: a SIGTERM ended our wrapper alone
    and left sd-scripts training on the GPU, orphaned, while the next job started."""
    import lora_trainer.jobs.runner as runner_module

    checkout = tmp_path / "sd-scripts"
    checkout.mkdir()
    (checkout / "train_network.py").write_text("", encoding="utf-8")
    signalled = []
    monkeypatch.setattr(runner_module, "_terminate", signalled.append)
    runner.kill_after = 1.0
    job = runner.submit("backend", {**options(tmp_path, "deaf"), "backend": f"sd-scripts={checkout}"})
    thread = _run_in_background(runner)
    while not [e for e in read_events(job.events_path)[0] if e["event"] == "start"]:
        time.sleep(0.02)
    runner.stop(job.id)
    thread.join(timeout=10)
    assert signalled == [] and runner.store.get(job.id).status == "stopped"


def test_a_job_running_when_the_webui_died_is_shown_interrupted_after_restart(runner, tmp_path):
    job = runner.submit("was running", options(tmp_path, "finish"))
    runner.store.update(job.id, status="running", pid=2**22 + 12345)  # a process that no longer exists
    restarted = JobRunner(JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs"))
    assert restarted.store.get(job.id).status == "interrupted"
    last = read_events(job.events_path)[0][-1]  # a client waiting on the stream for its end gets one
    assert last["event"] == "error" and "stopped when the app did" in last["message"]
    assert last["message"].endswith("it had saved no state to resume from: start the job again")  # not "resume"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times read from /proc here")
def test_a_job_whose_trainer_pid_now_belongs_to_another_process_is_neither_followed_nor_killed(runner, tmp_path):
    """After a crash the number can be given to any later process: one that started an hour after the job is not
    its trainer (it held the queue for good, and a stop killed it)."""
    job = runner.submit("long gone", options(tmp_path, "finish"))
    waiting = runner.submit("next", options(tmp_path, "finish"))
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runner.store.update(job.id, status="running", pid=stranger.pid, started=time.time() - 3600)
        restarted = JobRunner(JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs"), poll=0.05)
        assert restarted.store.get(job.id).status == "interrupted"
        assert restarted.run_next().id == waiting.id and stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_job_that_finished_while_the_webui_was_down_is_finished_after_restart_with_its_files(runner, tmp_path):
    """Its trainer outlived the WebUI and ran to its end unobserved: its events say so. Shown as interrupted, a
    Resume would train the finished epochs again over its files."""
    from lora_trainer.training.events import EventLog

    job = runner.submit("ran alone", options(tmp_path, "finish"))
    runner.store.update(job.id, status="running", pid=2**22 + 12345, files=["e1.safetensors"], last_state="s1")
    saved = {name: tmp_path / f"{name}.safetensors" for name in ("e1", "e2", "e3", "final")}
    with EventLog(job.events_path) as events:
        events.emit("start")
        for epoch in (1, 2, 3):
            events.emit("saved", path=str(saved[f"e{epoch}"]))
            events.emit("state", action="saved", path=f"s{epoch}")
        events.emit("saved", path=str(saved["final"]))
        events.emit("end", files=[str(saved["final"])], steps=20)
    for name, path in saved.items():
        if name != "e1":  # pruned by --save_last_n_epochs: not listed as the job's
            path.write_bytes(b"")
    recovered = JobRunner(JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs")).store.get(job.id)
    assert recovered.status == "finished" and recovered.message is None
    assert recovered.files == [str(saved[name]) for name in ("e2", "e3", "final")] and recovered.last_state == "s3"


def test_a_trainer_still_running_after_a_restart_is_followed_to_its_end_and_holds_the_queue(runner, tmp_path):
    """The WebUI restarted while a trainer ran (trainers have their own process group, so they outlive it): the new
    runner follows that trainer (stop works, its files and end are recorded) before it starts the next job."""
    job = runner.submit("outlived", options(tmp_path, "wait"))
    waiting = runner.submit("next", options(tmp_path, "finish"))
    trainer = subprocess.Popen([sys.executable, str(tmp_path / "fake_trainer.py"), str(job.config_path)],
                               start_new_session=True)
    threading.Thread(target=trainer.wait, daemon=True).start()  # its old parent, gone in life, reaped it
    runner.store.update(job.id, status="running", pid=trainer.pid, started=time.time())
    restarted = JobRunner(JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs"), kill_after=5.0, poll=0.05)
    assert restarted.store.get(job.id).status == "running"
    followed = []
    follower = threading.Thread(target=lambda: followed.append(restarted.run_next()))
    follower.start()
    time.sleep(0.5)
    assert restarted.store.get(waiting.id).status == "queued"  # one trainer at a time, whoever started it
    restarted.stop(job.id)
    follower.join(timeout=10)
    assert followed[0].id == job.id and followed[0].status == "stopped"
    assert followed[0].files == [str(tmp_path / "out-wait" / "run.safetensors")] and followed[0].last_state
    assert restarted.run_next().id == waiting.id


def test_a_runner_made_anew_in_the_same_process_takes_the_trainer_over_alone(runner, tmp_path):
    """The WebUI's "Reload UI" closes the old runner and makes a new one in the same process: the old one went on
    following the trainer beside the new one, and told its listeners "finished" while the new one said "paused"."""
    script = tmp_path / "fake_trainer.py"
    heard_by_old, heard_by_new = [], []
    old = JobRunner(runner.store, command=runner.command, kill_after=5.0, poll=0.05,
                    on_event=lambda job, event: heard_by_old.append(event["event"]))
    job = old.submit("reloaded", options(tmp_path, "wait"))
    thread = _run_in_background(old)
    started = time.time()
    old.close()
    thread.join(timeout=5)
    assert not thread.is_alive() and time.time() - started < 2  # it waited its 5 s timeout, still following
    assert old.store.get(job.id).status == "running"
    new = JobRunner(JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs"), command=lambda j: [sys.executable, str(script)],
                    kill_after=5.0, poll=0.05, on_event=lambda job, event: heard_by_new.append(event["event"]))
    follower = threading.Thread(target=new.run_next)
    follower.start()
    time.sleep(0.3)
    heard_before = list(heard_by_old)
    new.stop(job.id, pause=True)
    follower.join(timeout=10)
    assert new.store.get(job.id).status == "paused"
    assert heard_by_old == heard_before and "job" in heard_by_new  # only the new runner follows it to its end


def test_a_pause_asked_just_before_the_runner_is_made_anew_ends_as_a_pause(runner, tmp_path):
    """Pause, then "Reload UI" before the trainer has ended: the new runner adopted it without knowing, and the job
    that the trainer ended paused (saved, exit 0) was shown "finished"."""
    old = JobRunner(runner.store, command=runner.command, kill_after=5.0, poll=0.05)
    job = old.submit("paused, then reloaded", options(tmp_path, "slow"))
    thread = _run_in_background(old)
    old.stop(job.id, pause=True)
    old.close()
    thread.join(timeout=5)
    assert old.store.get(job.id).status == "running"  # the trainer is still finishing its step
    new = JobRunner(JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs"), command=runner.command, kill_after=5.0, poll=0.05)
    assert new.run_next().id == job.id
    assert new.store.get(job.id).status == "paused"


@pytest.mark.parametrize("text, command, unknown", [
    ("", "stop", []), ("stop\n", "stop", []), ("PAUSE", "stop", []), ("save\nsample\n", "save+sample", []),
    ("save\n\n", "save", []),  # a blank line (an editor's last newline) is no stop
    ("save\nstop\n", "stop", []),  # a stop saves too: it takes the others' place
    # "Sample now" then "Pause" within one step: the samples were dropped, the stop won
    ("sample\npause\n", "sample+stop", []), ("stop\nsave\nsample\n", "sample+stop", []),
    ("smaple\n", None, ["smaple"]), ("sample\nrm -rf\n", "sample", ["rm", "-rf"]),
])
def test_the_control_file_words_read_as_one_command(text, command, unknown):
    """What the trainer and the sd-scripts backend both read from the lines the job runner adds."""
    from lora_trainer.training.control import control_command

    assert control_command(text) == (command, unknown)


def test_a_windows_trainer_is_asked_whether_it_runs_without_a_signal(monkeypatch):
    """os.kill(pid, 0) is a liveness probe on POSIX but Ctrl-C on Windows, which would stop the trainer it asks
    about: there the process is opened and its exit code read."""
    import ctypes

    from lora_trainer.jobs.store import pid_alive

    kernel32 = fake_kernel32()
    monkeypatch.setattr(os, "kill", lambda *_: pytest.fail("os.kill on Windows sends Ctrl-C"))
    monkeypatch.setattr(ctypes, "WinDLL", lambda name: kernel32, raising=False)
    for pid, running in ((11, True), (12, False), (13, False)):
        kernel32.asked = pid
        assert pid_alive(pid, windows=True) is running


HANDLE_ABOVE_32_BITS = 0x1_0000_0F0C  # 64-bit Windows hands out handles a 32-bit int cannot hold


def fake_kernel32():
    """kernel32's calls that the job store makes, as plain functions (which, like ctypes' functions, take a restype
    and argtypes): pids 11 and 12 are open, 11 is still running; every process started at 2026-01-01 00:00 UTC."""
    import types

    kernel32 = types.SimpleNamespace(asked=None, closed=[])

    def open_process(access, inherit, pid):
        return HANDLE_ABOVE_32_BITS if pid in (11, 12) else None

    def get_exit_code_process(handle, code):
        code._obj.value = 259 if kernel32.asked == 11 else 0  # STILL_ACTIVE, or an exit code
        return 1

    def get_process_times(handle, created, exited, kernel, user):
        ticks = int((1767225600 + 11644473600) * 1e7)  # 100 ns since 1601
        created._obj.dwHighDateTime, created._obj.dwLowDateTime = ticks >> 32, ticks & 0xFFFFFFFF
        return 1

    kernel32.OpenProcess, kernel32.GetExitCodeProcess = open_process, get_exit_code_process
    kernel32.GetProcessTimes = get_process_times
    kernel32.CloseHandle = lambda handle: kernel32.closed.append(handle)
    return kernel32


def test_kernel32_calls_are_declared_so_a_64_bit_handle_is_not_cut_to_32_bits(monkeypatch):
    """OpenProcess was called without its restype: ctypes read the HANDLE as a C int, so on 64-bit Windows a handle
    above 2**31 came back cut (or negative), and the trainer was asked about through a handle that was not its own."""
    import ctypes
    from ctypes import wintypes

    from lora_trainer.jobs.store import pid_alive, process_start_time

    kernel32 = fake_kernel32()
    monkeypatch.setattr(ctypes, "WinDLL", lambda name: kernel32, raising=False)
    kernel32.asked = 11
    assert pid_alive(11, windows=True) is True
    assert process_start_time(11, windows=True) == pytest.approx(1767225600)
    assert kernel32.closed == [HANDLE_ABOVE_32_BITS] * 2
    assert kernel32.OpenProcess.restype is wintypes.HANDLE
    assert kernel32.OpenProcess.argtypes == [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    assert kernel32.GetProcessTimes.argtypes == [wintypes.HANDLE] + [wintypes.LPFILETIME] * 4
    assert kernel32.GetExitCodeProcess.argtypes == [wintypes.HANDLE, wintypes.LPDWORD]
    assert kernel32.CloseHandle.argtypes == [wintypes.HANDLE]
    assert {kernel32.GetProcessTimes.restype, kernel32.GetExitCodeProcess.restype,
            kernel32.CloseHandle.restype} == {wintypes.BOOL}


def test_bad_options_and_names_are_refused_before_anything_is_queued(runner, tmp_path):
    with pytest.raises(UserError, match="adaptive_noise_scale needs --noise_offset"):
        runner.submit("x", {**options(tmp_path, "finish"), "adaptive_noise_scale": 0.1})
    with pytest.raises(UserError, match="without / or .."):
        runner.submit("../evil", options(tmp_path, "finish"))
    with pytest.raises(UserError, match="network algorithm 'lorra' is not one of"):  # said here, not by the subprocess
        runner.submit("x", {**options(tmp_path, "finish"), "network_module": "lycoris.kohya", "network_args": ["algo=lorra"]})
    assert runner.store.all() == [] and not list((tmp_path / "jobs").glob("job-*"))  # no folder left, no id used up
    assert runner.submit("good", options(tmp_path, "finish")).id == 1


def test_the_trainer_finds_installed_extras_after_everything_the_host_has(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/host/site")
    monkeypatch.setattr("lora_trainer.jobs.runner._installed", lambda: True)
    runner = JobRunner(JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs"), extras_folder=tmp_path / "extras")
    assert runner.environment()["PYTHONPATH"].split(os.pathsep) == ["/host/site", str(tmp_path / "extras")]


@pytest.mark.parametrize("device_id, visible, expected", [
    (None, None, None),  # no --device-id: the trainer's own default, the first visible GPU
    ("1", None, "1"),
    ("1", "3,5,7", "5"),  # the WebUI's cuda:1 is the second GPU it sees
    ("1", " 3, 5 ", "5"),
    ("4", "3,5", None),  # out of range: the WebUI could not have used it either; the environment is left alone
    ("cuda:1", None, None),
])
def test_the_trainer_trains_on_the_gpu_the_webui_was_started_on(tmp_path, monkeypatch, device_id, visible, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    runner = JobRunner(JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs"), cuda_device=device_id)
    assert runner.environment().get("CUDA_VISIBLE_DEVICES") == (visible if expected is None else expected)


def test_the_trainer_finds_this_package_where_only_the_webui_process_has_it_on_its_path(tmp_path):
    """In the WebUI the package is no installed distribution: the extension's folder is on the WebUI's sys.path
    only. ``-S`` hides every site-packages folder (and this checkout's editable install with them), so the trainer's
    module is found through the runner's environment or not at all."""
    from lora_trainer.jobs.runner import PACKAGE_ROOT

    runner = JobRunner(JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs"), extras_folder=tmp_path / "extras")
    probe = [sys.executable, "-S", "-c", "import lora_trainer.train_network as t; print(t.__file__)"]
    found = subprocess.run(probe, env=runner.environment(), cwd=tmp_path, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == PACKAGE_ROOT / "lora_trainer" / "train_network.py"
    bare = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert subprocess.run(probe, env=bare, cwd=tmp_path, capture_output=True).returncode != 0  # the probe can fail


def _state_of(pid: int) -> str:
    """'gone', 'zombie' (dead, not yet reaped) or 'alive'."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return "gone"
    return "zombie" if "\nState:\tZ" in status else "alive"


def test_on_windows_the_trainer_outlives_the_webuis_console_window():
    """Closing the console window reaches every process attached to it; the trainer gets a hidden one of its own
    (and its own process group, so the host's Ctrl-C does not stop the job unasked)."""
    from lora_trainer.jobs.runner import own_group

    flags = own_group(windows=True)["creationflags"]
    assert flags & 0x08000000 and flags & 0x00000200  # CREATE_NO_WINDOW, CREATE_NEW_PROCESS_GROUP
    assert own_group(windows=False) == {"start_new_session": True}
    if os.name == "nt":
        assert flags == subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_killing_a_stubborn_trainer_takes_its_data_loader_workers_with_it(tmp_path):
    from lora_trainer.jobs.runner import _OWN_GROUP, kill_process_tree

    worker_pid = tmp_path / "worker.pid"
    script = ("import subprocess, sys, time\n"
              "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(worker_pid)!r}, 'w').write(str(worker.pid))\n"
              "time.sleep(60)\n")
    trainer = subprocess.Popen([sys.executable, "-c", script], **_OWN_GROUP)
    deadline = time.time() + 20
    while not worker_pid.exists() or not worker_pid.read_text():
        assert time.time() < deadline, "the fake trainer never started its worker"
        time.sleep(0.05)
    worker = int(worker_pid.read_text())
    kill_process_tree(trainer)
    assert trainer.wait(timeout=10) != 0
    deadline = time.time() + 10
    while _state_of(worker) == "alive" and time.time() < deadline:
        time.sleep(0.05)
    assert _state_of(worker) != "alive"
    kill_process_tree(trainer)  # already gone: no error


@pytest.mark.parametrize("taskkill_code, killed_alone", [(0, False), (128, True)])
def test_on_windows_the_kill_goes_through_taskkill_of_the_whole_tree(monkeypatch, taskkill_code, killed_alone):
    """Windows has no process groups to signal: taskkill /T ends the trainer's tree, else the trainer alone."""
    from lora_trainer.jobs import runner as runner_module

    calls = []
    monkeypatch.setattr(runner_module.subprocess, "run",
                        lambda command, **_: calls.append(command) or subprocess.CompletedProcess(command, taskkill_code))

    class Trainer:
        pid, killed = 4242, False

        def kill(self):
            self.killed = True

    trainer = Trainer()
    runner_module.kill_process_tree(trainer, windows=True)
    assert calls == [["taskkill", "/F", "/T", "/PID", "4242"]]
    assert trainer.killed == killed_alone
