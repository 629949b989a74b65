"""What a client of the HTTP API (or the UI reading the same store and events) sees of jobs it did not watch every
step of: a job that ended while the app was closed or being reloaded, a failed resume, a second press of a control
button, files a run removed, the event stream of a failed run. Each test here failed under a small change of the
code (a mutation review) that the other tests let through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lora_trainer.app.api import PREFIX, grid_json, register
from lora_trainer.app.grid_queue import GridQueue, grids_at_exit
from lora_trainer.app.services import Services
from lora_trainer.app.settings import AppSettings
from lora_trainer.errors import UserError
from lora_trainer.jobs.runner import JobRunner
from lora_trainer.jobs.store import JobStore
from lora_trainer.tiny_model.build import TINY_MODEL_PATH
from lora_trainer.training.control import control_command, control_text
from lora_trainer.training.events import EventLog, read_events
from api_client import sse_events, webhook_server

# A stand-in trainer: reads its config, writes events; its training_comment says how it behaves.
FAKE_TRAINER = textwrap.dedent('''
    import json, os, sys, time, toml
    from pathlib import Path
    options = toml.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    mode = options["training_comment"]
    out = Path(options["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    control = Path(options["stop_file"])
    events = open(options["events_file"], "a", encoding="utf-8")
    def emit(kind, **fields):
        events.write(json.dumps({"event": kind, **fields}) + "\\n"); events.flush()
    def words():
        return control.read_text().split() if control.exists() else []
    if mode == "late":  # a slow interpreter start: the job runs well before the trainer says start
        time.sleep(0.8)
    started = time.time()
    emit("start")
    if mode == "fail":
        time.sleep(float(os.environ.get("FAKE_FAIL_AFTER", "0")))
        emit("error", message="the dataset has no usable training images")
        sys.exit(2)
    if mode == "quiet":  # loads its model for long, reading no control word meanwhile
        time.sleep(30)
    if mode == "stale":  # as the trainer: start said, the model loads, then a word older than the start is dropped
        deadline = time.time() + 5
        while "save" not in words() and time.time() < deadline:
            time.sleep(0.02)
        if control.exists() and control.stat().st_mtime < started - 2:
            control.unlink()
        if {"stop", "pause"} & set(words()):
            emit("end", files=[], steps=0, stopped=True)
            sys.exit(0)
        for step in (1, 2, 3):
            emit("step", step=step)
    if mode == "pruning":  # --save_last_n_epochs 1: each epoch's file replaces the one before
        for epoch in (1, 2):
            path = out / f"run-00000{epoch}.safetensors"
            path.write_bytes(b"x")
            emit("saved", path=str(path))
            if epoch == 2:
                (out / "run-000001.safetensors").unlink()
    if mode == "epoch then fail":
        path = out / "run-000001.safetensors"
        path.write_bytes(b"this run")
        emit("saved", path=str(path))
        emit("error", message="out of memory")
        sys.exit(1)
    if mode in ("slow", "late"):  # trains until told to stop, then takes a second to save
        emit("step", step=1)
        while not {"stop", "pause"} & set(words()):
            time.sleep(0.02)
        time.sleep(1.0 if mode == "slow" else 0)
        state = out / "run-state"
        state.mkdir(exist_ok=True)
        for name in ("model.safetensors", "train_state.pt"):
            (state / name).write_bytes(b"x")
        emit("state", action="saved", path=str(state))
    final = out / "run.safetensors"
    final.write_bytes(b"x")
    emit("saved", path=str(final))
    emit("end", files=[str(final)])
''')


class Host:
    """What the job routes ask of a host."""

    name = "standalone"

    def checkpoints(self) -> dict:
        return {"tiny": TINY_MODEL_PATH}

    def refresh_loras(self) -> None:
        pass

    def release_gpu(self) -> None:
        pass

    def restore_gpu(self) -> None:
        pass


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER, encoding="utf-8")
    return path


@pytest.fixture
def runner(tmp_path, script) -> JobRunner:
    store = JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs")
    runner = JobRunner(store, command=lambda job: [sys.executable, str(script), str(job.config_path)], kill_after=5.0,
                       poll=0.05)
    runner.terminates_early = False  # as on Windows: a stop is a word in the control file, never a signal
    return runner


def options(tmp_path: Path, mode: str, **more) -> dict:
    (tmp_path / "data" / "1_zk").mkdir(parents=True, exist_ok=True)  # checked when submitted: listed, not decoded
    (tmp_path / "data" / "1_zk" / "a.png").write_bytes(b"")
    return {"pretrained_model_name_or_path": str(TINY_MODEL_PATH), "train_data_dir": str(tmp_path / "data"),
            "resolution": "64", "output_dir": str(tmp_path / "out"), "output_name": "run", "training_comment": mode,
            **more}


def running(runner: JobRunner, job_id: int, said_start: bool = True) -> threading.Thread:
    """``runner`` follows the job in a thread, returned once its trainer runs (and the runner has heard it say
    start: the control words pressed from then on reach it at once)."""
    heard = []
    runner.on_event = lambda job, event: heard.append(event["event"])
    thread = threading.Thread(target=runner.run_next, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while runner.store.get(job_id).pid is None or said_start and "start" not in heard:
        assert time.time() < deadline, "the fake trainer never started"
        time.sleep(0.01)
    return thread


def api(tmp_path: Path, start: bool = False, script: Path | None = None) -> tuple[Services, TestClient]:
    folders = {name: tmp_path / name for name in ("loras", "appdata", "datasets")}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    settings = AppSettings(lora_folder=folders["loras"], data_folder=folders["appdata"],
                           dataset_roots=[folders["datasets"], tmp_path / "data"])
    command = {} if script is None else {"command": lambda job: [sys.executable, str(script), str(job.config_path)]}
    services = Services.create(settings, Host(), start=start, poll=0.05, **command)
    app = FastAPI()
    register(app, services, listening_remotely=False)
    return services, TestClient(app)


def a_trainer_that_ended(store: JobStore, job, *events: tuple[str, dict]) -> None:
    """``job`` marked running under a trainer that has ended since, with ``events`` written by it."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store.update(job.id, status="running", pid=gone.pid, started=time.time())
    with EventLog(job.events_path) as log:
        for kind, fields in events:
            log.emit(kind, **fields)


# --- jobs that ended while no app followed them -----------------------------------------------------------------


def test_a_job_stopped_or_failed_while_the_app_was_closed_is_shown_so_at_the_next_start(tmp_path):
    """A stop pressed as the app closed: the trainer saved and stopped on its own, and the job was shown finished
    (Resume then refused: "nothing is left to train"); one that failed meanwhile lost its trainer's message."""
    services, _ = api(tmp_path)
    stopped = services.store.add("stopped", {})
    failed = services.store.add("failed", {})
    services.close()
    a_trainer_that_ended(services.store, stopped, ("start", {}), ("end", {"files": [], "steps": 3, "stopped": True}))
    a_trainer_that_ended(services.store, failed, ("start", {}), ("error", {"message": "CUDA out of memory"}))
    services, client = api(tmp_path)
    try:
        shown = {job["name"]: job for job in client.get(f"{PREFIX}/jobs").json()["jobs"]}
    finally:
        services.close()
    assert (shown["stopped"]["status"], shown["stopped"]["message"]) == ("stopped", "stopped and saved")
    assert (shown["failed"]["status"], shown["failed"]["message"]) == ("failed", "CUDA out of memory")


def test_jobs_are_listed_oldest_first_as_the_api_documents(tmp_path):
    services, client = api(tmp_path)
    try:
        for name in ("first", "second", "third"):
            services.store.add(name, {})
        listed = client.get(f"{PREFIX}/jobs").json()["jobs"]
    finally:
        services.close()
    assert [job["name"] for job in listed] == ["first", "second", "third"]


def test_a_job_that_ran_says_when_it_started(runner, tmp_path):
    """``started`` is in every job's answer, and what tells the job's trainer from a later process given its number
    after a crash (a job without it was followed, and a stop killed that process)."""
    job = runner.submit("run", options(tmp_path, "finish"))
    ended = runner.run_next()
    assert ended.status == "finished"
    assert job.created <= ended.started <= ended.finished


def test_a_trainer_the_app_follows_after_a_restart_that_fails_is_shown_failed(runner, tmp_path, script):
    """A trainer started by an earlier app has no exit code to read: its events say how it ended. Its failure was
    shown as finished."""
    job = runner.submit("outlived", options(tmp_path, "fail"))
    trainer = subprocess.Popen([sys.executable, str(script), str(job.config_path)], start_new_session=True,
                               env={**os.environ, "FAKE_FAIL_AFTER": "1.0"})
    threading.Thread(target=trainer.wait, daemon=True).start()  # its old parent, gone in life, reaped it
    runner.store.update(job.id, status="running", pid=trainer.pid, started=time.time())
    restarted = JobRunner(JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs"), poll=0.05)
    followed = restarted.run_next()
    assert followed.id == job.id
    assert (followed.status, followed.message) == ("failed", "the dataset has no usable training images")


def test_a_job_another_runner_is_launching_is_left_to_it(runner, tmp_path):
    """Two apps on one data folder (or "Reload UI" while a job starts): a job marked running whose trainer is not
    launched yet is not one to follow; followed, it was marked failed before its trainer started."""
    other = JobRunner(JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs"), poll=0.05)
    job = runner.submit("starting", options(tmp_path, "finish"))
    runner.store.update(job.id, status="running", started=time.time())  # taken from the queue, trainer not yet up
    assert other.run_next() is None
    assert runner.store.get(job.id).status == "running"


# --- stop, pause and the control words across a reload ----------------------------------------------------------


def test_a_stop_asked_just_before_the_runner_is_made_anew_ends_as_a_stop(runner, tmp_path):
    """Stop, then "Reload UI" while the trainer still saves: the new runner must know the stop was asked, or the
    trainer's clean exit reads as a run that finished."""
    job = runner.submit("stopped, then reloaded", options(tmp_path, "slow"))
    thread = running(runner, job.id)
    runner.stop(job.id)
    runner.close()
    thread.join(timeout=5)
    assert runner.store.get(job.id).status == "running"  # the trainer is still saving
    new = JobRunner(JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs"), command=runner.command, poll=0.05)
    new.terminates_early = False
    ended = new.run_next()
    assert (ended.id, ended.status, ended.message) == (job.id, "stopped", "stopped and saved")


def test_a_stop_pressed_before_the_trainer_said_start_reaches_it_after_a_reload(runner, tmp_path):
    """The stop waits until the trainer says start (a word written before its start is dropped as an earlier
    run's). A reload meanwhile lost it: the trainer trained on until the wait ran out, then was killed unsaved."""
    job = runner.submit("early stop, then reloaded", options(tmp_path, "late"))
    thread = running(runner, job.id, said_start=False)
    runner.stop(job.id)
    runner.close()
    thread.join(timeout=5)
    new = JobRunner(JobStore(tmp_path / "jobs.sqlite", tmp_path / "jobs"), command=runner.command, kill_after=5.0,
                    poll=0.05)
    new.terminates_early = False
    ended = new.run_next()
    assert (ended.status, ended.message) == ("stopped", "stopped and saved")
    assert ended.last_state == str(tmp_path / "out" / "run-state")


def test_save_then_sample_pressed_before_the_trainer_reads_them_both_reach_it(runner, tmp_path):
    """The trainer reads its control file once a step: a Save now and a Sample now pressed within one step are both
    done. Written over each other, the first was lost."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a star\n", encoding="utf-8")
    runner.terminates_early = True  # the stop at the end ends it at once
    job = runner.submit("busy", options(tmp_path, "quiet", sample_prompts=str(prompts)))
    thread = running(runner, job.id)
    runner.control(job.id, "save")
    runner.control(job.id, "sample")
    assert job.stop_path.read_text(encoding="utf-8").split() == ["save", "sample"]
    runner.stop(job.id)
    thread.join(timeout=10)


def test_save_and_sample_of_a_job_on_sd_scripts_are_refused_with_why(tmp_path):
    """sd-scripts cannot save or sample on request: answered 200 "sent", nothing happened."""
    services, client = api(tmp_path)
    checkout = tmp_path / "sd-scripts"
    checkout.mkdir()
    (checkout / "train_network.py").write_text("", encoding="utf-8")
    try:
        job = services.runner.submit("backend", {**options(tmp_path, "quiet"), "backend": f"sd-scripts={checkout}"})
        services.store.update(job.id, status="running", started=time.time())  # as the Train tab started it
        for command in ("save", "sample"):
            refused = client.post(f"{PREFIX}/jobs/{job.id}/{command}")
            assert refused.status_code == 409 and refused.json()["error"]["message"].startswith(
                f"job {job.id} runs on sd-scripts (--backend), which cannot {command} on request")
        assert not job.stop_path.exists()
    finally:
        services.close()


def test_a_stale_stop_in_a_reused_job_folder_is_not_revived_by_a_later_word(runner, tmp_path):
    """A job folder an earlier database left (jobs.sqlite removed, jobs/ kept) may hold its last stop: a Save now
    pressed while the model loads was added to it, the file looked new, and the trainer stopped at its first step."""
    folder = tmp_path / "jobs" / "job-00001"
    folder.mkdir(parents=True)
    (folder / "stop").write_text("stop\n", encoding="utf-8")
    os.utime(folder / "stop", (time.time() - 3600, time.time() - 3600))
    job = runner.submit("again", options(tmp_path, "stale"))
    assert job.folder == folder
    thread = running(runner, job.id)
    runner.control(job.id, "save")
    thread.join(timeout=10)
    events = read_events(job.events_path)[0]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert not events[-1].get("stopped")


# --- what a job lists and says ----------------------------------------------------------------------------------


def test_an_epoch_file_the_run_removed_is_not_listed_as_the_jobs(runner, tmp_path):
    """--save_last_n_epochs removes older epoch files as it goes: listed, a client downloading them got 404s."""
    runner.submit("pruned", options(tmp_path, "pruning"))
    ended = runner.run_next()
    assert ended.files == [str(tmp_path / "out" / "run-000002.safetensors"), str(tmp_path / "out" / "run.safetensors")]


def test_a_failed_runs_event_stream_ends_with_its_one_error(tmp_path, script):
    """The trainer said why it failed: the runner adds no second error to the stream an EventSource shows."""
    services, client = api(tmp_path, start=True, script=script)
    try:
        job = services.runner.submit("broken", options(tmp_path, "fail"))
        deadline = time.time() + 20
        while services.store.get(job.id).status != "failed":
            assert time.time() < deadline
            time.sleep(0.05)
        stream = client.get(f"{PREFIX}/jobs/{job.id}/events").text
    finally:
        services.close()
    messages = [json.loads(line[len("data: "):]) for line in stream.splitlines() if line.startswith("data: ")]
    assert [e["event"] for e in messages] == ["start", "error"]


def test_a_run_that_failed_after_writing_a_file_leaves_the_earlier_runs_files_set_aside(runner, tmp_path):
    """Its own epoch file is in the Lora folder: the earlier run's final file put back beside it made one folder of
    two runs, and a resume of the failed job then wrote over that file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.safetensors").write_bytes(b"earlier run")
    job = runner.submit("run", options(tmp_path, "epoch then fail"))
    assert runner.run_next().status == "failed"
    assert sorted(p.name for p in out.iterdir()) == ["run-000001.safetensors"]
    assert (runner.replaced_folder / job.folder.name / "run.safetensors").read_bytes() == b"earlier run"


# --- resume -----------------------------------------------------------------------------------------------------


def test_a_job_whose_resume_failed_can_be_resumed_again(runner, tmp_path):
    """The resumed job failed (out of memory, say) before it saved a state: the stopped job is the one to resume,
    and it was refused as "resumed already" while the failed one had nothing to resume from."""
    job = runner.submit("long", options(tmp_path, "slow"))
    thread = running(runner, job.id)
    runner.stop(job.id)
    thread.join(timeout=10)
    first = runner.resume(job.id)
    runner.store.update(first.id, status="failed", message="CUDA out of memory")
    second = runner.resume(job.id)
    assert second.id != first.id and second.options["resume"] == runner.store.get(job.id).last_state


def test_resuming_a_queued_job_says_it_is_queued(tmp_path):
    services, client = api(tmp_path)
    try:
        job = services.runner.submit("waiting", options(tmp_path, "finish"))
        refused = client.post(f"{PREFIX}/jobs/{job.id}/resume")
    finally:
        services.close()
    assert refused.status_code == 409
    assert refused.json()["error"]["message"] == f"job {job.id} is queued; nothing to resume"


# --- the stop's wait, on a clock of the test's own ----------------------------------------------------------------


class TrainerOnAClock:
    """A trainer as the runner follows it, on a virtual clock: ``lines[t]`` are the events it writes at second ``t``
    after the stop; ``kill`` (the runner's ``kill_process_tree``) ends it, and notes when."""

    pid = 2**22 + 4321  # no process of ours

    def __init__(self, events_path: Path, lines: dict[float, list[dict]], ends_at: float = 30.0):
        self.events_path, self.lines, self.ends_at = events_path, lines, ends_at
        self.now, self.returncode, self.killed_at = 0.0, None, None
        self.write_due()

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now = round(self.now + seconds, 6)
        self.write_due()
        if self.now >= self.ends_at and self.returncode is None:
            self.returncode = 0

    def write_due(self) -> None:
        with open(self.events_path, "a", encoding="utf-8") as events:
            for at in sorted(t for t in self.lines if t <= self.now):
                for event in self.lines.pop(at):
                    events.write(json.dumps(event) + "\n")

    def poll(self):
        return self.returncode

    def kill(self, process) -> None:
        self.killed_at, self.returncode = self.now, -9


def test_a_trainer_that_takes_another_step_after_the_stop_is_killed_the_wait_after_the_step_it_was_in(runner, tmp_path,
                                                                                                    monkeypatch):
    """Told to stop, a trainer ends the step it is in and saves; one that takes a second step does not obey. The wait
    runs from the end of the step it was in, not from each later step (killed a step later), nor for good."""
    import lora_trainer.jobs.runner as runner_module

    runner.kill_after, runner.poll = 1.0, 0.1
    job = runner.submit("deaf", options(tmp_path, "finish"))
    job = runner.store.update(job.id, status="running", started=time.time())
    steps = {round(0.4 * n, 6): [{"event": "step", "step": n + 1}, {"event": "validation", "step": n + 1}]
             for n in range(1, 20)}  # every 0.4 s after the stop: the step it was in ends at 0.4 s, then it steps on
    trainer = TrainerOnAClock(job.events_path, {0.0: [{"event": "start"}, {"event": "step", "step": 1}], **steps})
    monkeypatch.setattr(runner_module, "time", trainer)
    monkeypatch.setattr(runner_module, "kill_process_tree", trainer.kill)
    runner.stop(job.id)
    ended = runner._follow(job, trainer, log=None)
    assert (ended.status, ended.message) == ("stopped", "stopped (killed after the timeout)")
    assert trainer.killed_at is not None and 0.4 + 1.0 < trainer.killed_at <= 0.4 + 1.0 + 0.1


# --- the HTTP API: webhooks, deletes, the event stream ----------------------------------------------------------


def job_body(tmp_path: Path, **more) -> dict:
    options(tmp_path, "finish")  # the dataset
    return {"name": "zkchar", "options": {"pretrained_model_name_or_path": "tiny", "train_data_dir": str(tmp_path / "data"),
                                          "resolution": 64, "max_train_steps": 5}, **more}


def streamed(client: TestClient, url: str, seconds: float = 10.0) -> list[tuple[int, dict]]:
    """The (id, event) messages of the event stream at ``url``, which must end within ``seconds`` (read on a loop of
    its own, so that a stream that never ends fails the test, not the run's exit)."""
    import asyncio

    import httpx

    async def get() -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app), base_url="http://test") as http:
            return (await http.get(url)).text

    try:
        text = asyncio.run(asyncio.wait_for(get(), seconds))
    except asyncio.TimeoutError:
        pytest.fail(f"the event stream {url} did not end within {seconds} s")
    return sse_events(text)


def test_a_jobs_answer_names_its_event_stream(tmp_path):
    services, client = api(tmp_path)
    try:
        job = client.post(f"{PREFIX}/jobs", json=job_body(tmp_path)).json()
        assert job["events"] == f"{PREFIX}/jobs/{job['id']}/events"
        assert client.post(f"{PREFIX}/jobs/{job['id']}/stop").json()["status"] == "stopped"  # out of the queue
        assert [event["event"] for _, event in streamed(client, job["events"])] == ["end"]
    finally:
        services.close()


def test_a_delete_that_meets_a_job_just_started_leaves_its_webhook_to_be_called_when_it_ends(tmp_path, monkeypatch):
    """The DELETE claims a queued job's webhook before taking it out of the queue; the queue started it meanwhile,
    the DELETE answered 409 and kept the claim: the job's end was never sent."""
    services, client = api(tmp_path)
    try:
        with webhook_server() as (url, received):
            job = client.post(f"{PREFIX}/jobs", json=job_body(tmp_path, webhook=url)).json()

            def started_meanwhile(job_id):
                services.store.update(job_id, status="running", started=time.time())
                raise UserError(f"job {job_id} is running, no longer queued")

            monkeypatch.setattr(services.runner, "dequeue", started_meanwhile)
            refused = client.delete(f"{PREFIX}/jobs/{job['id']}")
            assert refused.status_code == 409 and "has just started" in refused.json()["error"]["message"]
            services.store.update(job["id"], status="finished", finished=time.time())
            deadline = time.time() + 10
            while not received and time.time() < deadline:
                time.sleep(0.05)
    finally:
        services.close()
    assert [(call["job"]["id"], call["job"]["status"]) for call in received] == [(job["id"], "finished")]


def test_a_job_whose_state_a_running_job_resumed_from_cannot_be_deleted(tmp_path):
    """As for a queued one: its folder holds the state the running job may still be loading."""
    services, client = api(tmp_path)
    try:
        job = services.runner.submit("paused", options(tmp_path, "finish"))
        state = job.folder / "states" / "run-state"
        state.mkdir(parents=True)
        for name in ("model.safetensors", "train_state.pt"):
            (state / name).write_bytes(b"x")
        services.store.update(job.id, status="paused", last_state=str(state))
        resumed = client.post(f"{PREFIX}/jobs/{job.id}/resume").json()
        services.store.update(resumed["id"], status="running", started=time.time())
        refused = client.delete(f"{PREFIX}/jobs/{job.id}")
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["message"].startswith(
            f"job {resumed['id']} resumes from job {job.id}'s saved state")
        assert state.is_dir()
    finally:
        services.close()


def test_a_job_is_not_told_an_ended_job_of_its_name_will_lose_files(tmp_path):
    """The note about a queued or running job of the same run named ended jobs too, whose files nothing moves (an
    earlier run's files in the folder get their own note)."""
    services, client = api(tmp_path)
    try:
        first = client.post(f"{PREFIX}/jobs", json=job_body(tmp_path)).json()
        services.store.update(first["id"], status="finished", finished=time.time())
        again = client.post(f"{PREFIX}/jobs", json=job_body(tmp_path)).json()
    finally:
        services.close()
    assert not any("also write" in warning for warning in again.get("warnings", [])), again["warnings"]


def test_the_event_stream_waits_for_the_rest_of_a_half_written_line(tmp_path):
    services, client = api(tmp_path)
    try:
        job = services.runner.submit("writing", options(tmp_path, "finish"))  # queued: its stream stays open
        job.events_path.write_bytes(b'{"event": "start"}\n{"event": "step", "st')

        def rest():
            time.sleep(0.6)
            with open(job.events_path, "ab") as events:
                events.write(b'ep": 1}\n{"event": "end", "files": []}\n')

        threading.Thread(target=rest, daemon=True).start()
        messages = streamed(client, f"{PREFIX}/jobs/{job.id}/events")
    finally:
        services.close()
    assert messages == [(1, {"event": "start"}), (2, {"event": "step", "step": 1}), (3, {"event": "end", "files": []})]


def test_the_event_stream_ends_at_the_end_event_though_the_trainer_has_not_exited_yet(tmp_path):
    """A trainer that said end may take long to exit (data-loader workers, CUDA's teardown): a client waiting for the
    stream to close waited as long."""
    services, client = api(tmp_path)
    try:
        job = services.runner.submit("exiting", options(tmp_path, "finish"))
        services.store.update(job.id, status="running", started=time.time())
        with EventLog(job.events_path) as log:
            log.emit("start")
            log.emit("end", files=[])
        messages = streamed(client, f"{PREFIX}/jobs/{job.id}/events", seconds=5)
    finally:
        services.close()
    assert [event["event"] for _, event in messages] == ["start", "end"]


def test_the_event_stream_sends_no_empty_message_for_a_blank_line(tmp_path):
    """A write a full disk refused before its first byte leaves the next event after a blank line: sent as an empty
    ``data``, it broke a client's JSON parse. Ids stay the file's line numbers."""
    services, client = api(tmp_path)
    try:
        job = services.runner.submit("blank", options(tmp_path, "finish"))
        job.events_path.write_bytes(b'{"event": "start"}\n\n{"event": "step", "step": 1}\n{"event": "end"}\n')
        services.store.update(job.id, status="finished", finished=time.time())
        messages = streamed(client, f"{PREFIX}/jobs/{job.id}/events")
    finally:
        services.close()
    assert [(number, event["event"]) for number, event in messages] == [(1, "start"), (3, "step"), (4, "end")]


def test_the_event_stream_goes_past_a_line_a_full_disk_tore(tmp_path):
    """The event log writes a torn line's successor on a line of its own and every other reader skips the torn one
    (``read_events``); the API's stream stopped there, and a client never got the events after it, nor the end."""
    services, client = api(tmp_path)
    try:
        job = services.runner.submit("torn", options(tmp_path, "finish"))
        with EventLog(job.events_path) as log:
            log.emit("start")
        with open(job.events_path, "ab") as events:
            events.write(b'{"event": "st')  # the disk filled up mid-line
        with EventLog(job.events_path) as log:
            log.emit("step", step=1)
            log.emit("end", files=[])
        services.store.update(job.id, status="finished", finished=time.time())
        messages = streamed(client, f"{PREFIX}/jobs/{job.id}/events", seconds=5)
    finally:
        services.close()
    assert [(number, event["event"]) for number, event in messages] == [(1, "start"), (3, "step"), (4, "end")]


# --- the readers of the event file and the control file ---------------------------------------------------------


def test_a_reader_that_meets_a_half_written_event_gets_it_once_it_is_whole(tmp_path):
    """What the runner, the UI and the CLI read: the trainer's line not yet whole was consumed, and the saved file it
    named never reached the job's files."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"event": "start"}\n{"event": "saved", "pa')
    events, offset = read_events(path)
    assert events == [{"event": "start"}]
    with open(path, "ab") as more:
        more.write(b'th": "run.safetensors"}\n')
    assert read_events(path, offset) == ([{"event": "saved", "path": "run.safetensors"}], path.stat().st_size)


def test_a_save_written_by_powershell_is_a_save_not_a_stop():
    """PowerShell 5's ``echo save > stop`` writes UTF-16 with a BOM: read as bytes that are no text, it stopped the
    run instead of saving."""
    assert control_command(control_text("save\r\n".encode("utf-16")))[0] == "save"
    assert control_command(control_text("sample\r\n".encode("utf-16-be")))[0] == "sample"


# --- grids ------------------------------------------------------------------------------------------------------


@pytest.fixture
def one_cell_grids(tmp_path, monkeypatch):
    """A GridQueue whose grids are one cell each, drawn once ``gate`` is set (``drawing`` is set as it starts)."""
    import lora_trainer.grid.plan as plan_module

    gate, drawing = threading.Event(), threading.Event()

    def run_grid(host, plan, folder, progress, should_stop):
        if should_stop():
            return types.SimpleNamespace(path=None, stopped=True, warnings=[])
        drawing.set()
        assert gate.wait(20)
        progress(1, 1)
        return types.SimpleNamespace(path=Path(folder) / "grid.png", stopped=False, warnings=[])

    monkeypatch.setattr(plan_module, "run_grid", run_grid)
    monkeypatch.setattr(plan_module, "unfinished_images", lambda result, plan: None)
    queue = GridQueue(object(), tmp_path / "grids")
    queue.gate, queue.drawing = gate, drawing
    queue.plan = types.SimpleNamespace(cells=[[types.SimpleNamespace(key="a")]], best_epoch=None, notes=[])
    yield queue
    gate.set()
    queue.close()


def test_a_finished_grid_says_how_long_it_took(one_cell_grids):
    one_cell_grids.gate.set()
    grid = one_cell_grids.submit(one_cell_grids.plan)
    deadline = time.time() + 10
    while grid.status != "finished":
        assert time.time() < deadline
        time.sleep(0.01)
    answer = grid_json(grid)
    assert answer["progress"] == {"done": 1, "total": 1} and isinstance(answer["seconds"], float)


def test_a_grid_that_drew_its_last_image_while_the_app_closed_is_not_said_stopped(one_cell_grids):
    """Its last image was being drawn when the app was asked to close: it finished, and the exit said it was
    stopped after 1 of 1 images."""
    grid = one_cell_grids.submit(one_cell_grids.plan)
    assert one_cell_grids.drawing.wait(10)
    stopped = []
    closing = threading.Thread(target=lambda: stopped.extend(one_cell_grids.close()))
    closing.start()
    assert grid.stop.wait(10)
    one_cell_grids.gate.set()
    closing.join(10)
    assert grid.status == "finished" and grids_at_exit(stopped) == []
