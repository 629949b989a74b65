"""The standalone app's shell (``python -m lora_trainer ui``): what it says at startup, in ``--help`` and when it
closes while a trainer runs on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_trainer.app import tag_sessions
from lora_trainer.app.settings import AppSettings
from lora_trainer.app.standalone import startup_line, still_training
from lora_trainer.cli import main
from lora_trainer.jobs.store import JobStore, process_start_time

REPO = Path(__file__).resolve().parents[2]


def mark_running(store: JobStore, name: str, pid: int):
    """A job whose trainer is process ``pid``, as the runner records one it started."""
    job = store.add(name, {})
    return store.update(job.id, status="running", pid=pid, started=process_start_time(pid) or time.time())


def test_closing_the_app_names_each_trainer_that_trains_on_and_how_to_follow_it(services):
    """The trainer runs in its own session so that a restarted app follows it; the app exited without a word and
    the user took training for stopped."""
    store = services.store
    running = mark_running(store, "mychar", os.getpid())
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    mark_running(store, "crashed", ended.pid)  # its trainer is gone: recover() marks it at the next start
    store.update(store.add("done", {}).id, status="finished")

    data = services.settings.data_folder
    assert still_training(store.all(), data) == [
        f"job {running.id} (mychar) is still training in the background (pid {os.getpid()}); start the app again "
        f"(same data folder: {data}) to follow or stop it"]


def test_closing_the_app_names_each_queued_job_and_that_it_waits_for_the_next_start(services):
    """The queued jobs do not follow the background trainer: they start when the app starts again."""
    store = services.store
    running = mark_running(store, "mychar", os.getpid())
    waiting = [store.add(name, {}) for name in ("second", "third")]
    data = services.settings.data_folder
    assert still_training(store.all(), data) == [
        f"job {running.id} (mychar) is still training in the background (pid {os.getpid()}); start the app again "
        f"(same data folder: {data}) to follow or stop it",
        *(f"job {job.id} ({job.name}) waits in the queue: it starts only when the app starts again (same data folder: "
          f"{data}), after the jobs before it" for job in waiting)]


def test_closing_the_app_names_each_folder_whose_unsaved_caption_edits_are_kept_as_a_draft(services, make_dataset):
    """The drafts come back when the folder is opened again; an app that exits without a word looks as if it had
    dropped them. Edits that no draft keeps are said to be lost, with the reason."""
    registry = services.tag_sessions
    folder = make_dataset(count=3) / "10_zkchar"
    tag_sessions.apply_request(registry.open(folder), {"op": "add", "tags": ["solo"], "selection": ["img_000.png", "img_001.png"]})
    registry.open(folder.parent, recursive=True)  # nothing unsaved there: no line
    assert tag_sessions.unsaved_edits_at_exit(registry.unsaved_at_exit()) == [
        f"2 unsaved caption edit(s) in {folder} are kept as a draft and come back when you open that folder again"]
    assert tag_sessions.unsaved_edits_at_exit([tag_sessions.UnsavedFolder(folder, 3, None, "no drafts folder is set")]) == [
        f"3 unsaved caption edit(s) in {folder} are lost as the app stops: no drafts folder is set"]


def test_ui_help_and_the_startup_line_name_the_data_folder_the_app_uses(tmp_path, monkeypatch, capsys):
    """Jobs and LoRAs live under ./lora-trainer-data: started from another folder the app showed an empty job list
    and Lora folder, and nothing said where it looked."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["ui", "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps the path at its hyphens
    assert "".join(str(tmp_path / "lora-trainer-data").split()) in help_text

    settings = AppSettings(lora_folder=tmp_path / "loras", data_folder=tmp_path / "lora-trainer-data",
                           dataset_roots=[], checkpoint_folders=[])
    assert startup_line("127.0.0.1", 7870, settings) == (
        f"LoRA Trainer: http://127.0.0.1:7870/ (jobs in {tmp_path / 'lora-trainer-data'}, LoRAs in {tmp_path / 'loras'})")


def following(port: int, path: str) -> socket.socket:
    """A connection that has asked for ``path`` and got its answer's first line (the server listening by then)."""
    for _ in range(200):
        try:
            connection = socket.create_connection(("127.0.0.1", port), timeout=30)
            break
        except ConnectionRefusedError:
            time.sleep(0.1)
    else:
        pytest.fail(f"the app never listened on port {port}")
    connection.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    answer = b""
    while b"\r\n" not in answer and (chunk := connection.recv(64)):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer
    return connection


def test_only_the_cancels_of_closing_are_kept_out_of_the_log():
    """A request cancelled while the app serves is an error and must be logged; the cancels of the exit are not."""
    import asyncio
    import logging

    from lora_trainer.app.standalone import ClosedConnectionsSaidQuietly

    def record(message: str, error: BaseException | None) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, message, (),
                                 (type(error), error, None) if error else None)

    quiet = ClosedConnectionsSaidQuietly()
    assert not quiet.filter(record("Exception in ASGI application",
                                   asyncio.CancelledError("Task cancelled, timeout graceful shutdown exceeded")))
    assert quiet.filter(record("Exception in ASGI application", asyncio.CancelledError()))
    said = record("Cancel 1 running task(s), timeout graceful shutdown exceeded", None)
    assert quiet.filter(said) and said.levelno == logging.INFO and "closing the connections" in said.getMessage()


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM is TerminateProcess on Windows: nothing runs after it")
def test_a_terminated_app_says_which_trainers_train_on(tmp_path):
    """SIGTERM (a service manager, ``kill``): uvicorn raises it again once it has shut down, which ended the process
    before the app could say anything."""
    data = tmp_path / "data"
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        paths = AppSettings(lora_folder=data / "Lora", data_folder=data, dataset_roots=[], checkpoint_folders=[])
        job = mark_running(JobStore(paths.jobs_database, paths.jobs_folder), "mychar", trainer.pid)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        app = subprocess.Popen([sys.executable, "-m", "lora_trainer", "ui", "--port", str(port), "--data", str(data)],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"})
        try:
            first = app.stdout.readline()  # the startup line, once the app is built
            follower = following(port, f"/lora-trainer/v1/jobs/{job.id}/events")  # a client holds the job's events open
            try:
                app.send_signal(signal.SIGTERM)
                rest, _ = app.communicate(timeout=60)
            finally:
                follower.close()
        finally:
            if app.poll() is None:
                app.kill()
        assert f"http://127.0.0.1:{port}/ (jobs in {data}" in first
        assert f"job {job.id} (mychar) is still training in the background (pid {trainer.pid})" in rest
        assert "Traceback" not in rest and "closing the connections still open" in rest  # not 30 lines of uvicorn's
        assert app.returncode == 128 + signal.SIGTERM
        assert trainer.poll() is None  # the design: a restart follows it
    finally:
        trainer.kill()
        trainer.wait()
