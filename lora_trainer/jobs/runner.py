"""Run queued training jobs one at a time, each as a trainer subprocess, and keep the store up to date.

Stop is graceful: a stop file makes the trainer finish its step, save the network and its state, and exit;
after ``kill_after`` seconds without a sign of finishing (``FINISHING_EVENTS``) it is killed. Every job's events go to
``<job folder>/events.jsonl``; the runner reads them to record saved files and the last state, which ``resume``
continues from.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import site
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .. import toml_text
from ..errors import UserError
from ..training.events import EventLog, read_events
from ..training.options import options_from
from .store import Job, JobStore, trainer_alive


def trainer_command(job: Job) -> list[str]:
    return [sys.executable, "-m", "lora_trainer.train_network", "--config_file", str(job.config_path)]


PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds lora_trainer/


def run_location(options: dict) -> tuple[Path, str]:
    """The folder and name a job's run writes its files under, with sd-scripts' defaults."""
    return Path(options.get("output_dir") or "output"), options.get("output_name") or "last"


def earlier_files(options: dict) -> list[Path]:
    """Files of an earlier run of the same name in the job's output folder (the Lora folder): a new job would replace
    them. None for a resumed job, whose files they are."""
    from ..training.outputs import files_of_run

    if options.get("resume"):
        return []
    return files_of_run(*run_location(options))


def trimmed_name_note(field: str, given: str, used: str) -> str | None:
    """A name given with spaces at its start or end, which the job's name and files leave out (a file ending in a space
    is one Windows cannot open): said, as a client or user looking for the name as typed would find nothing."""
    if not given or given == used or given.strip() != used:  # another name is used (Advanced's output_name)
        return None
    return f"{field}: {given!r} has spaces at its start or end: they were removed, and {used!r} is used"


def earlier_files_note(options: dict, replaced_folder: Path) -> str | None:
    """What submitting the job will do to an earlier run's files, said before it is queued."""
    files = earlier_files(options)
    if not files:
        return None
    shown = ", ".join(path.name for path in files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
    return (f"{files[0].parent} already holds a run named {options.get('output_name')!r} ({shown}): when this job "
            f"starts they are moved into {replaced_folder}, not overwritten")


# what the runner sets for every job, whatever the job's options say: its folder's event log, control file and states
RUNNER_OPTIONS = ("events_file", "stop_file", "state_dir")


def same_run_jobs_note(options: dict, jobs: list[Job], replaced_folder: Path) -> str | None:
    """What a job of the same output name and folder queued or running before this one will lose when this one starts
    (its files moved aside, as an earlier run's are; a resumed run moves none aside and writes over them), said before
    this one is queued; None where there is none."""

    def run_of(values: dict) -> tuple[str, str]:
        folder, name = run_location(values)
        return os.path.normcase(str(folder.resolve())), os.path.normcase(name)  # Windows: any case

    same = [job for job in jobs if job.status in ("queued", "running") and run_of(job.options) == run_of(options)]
    if not same:
        return None
    one = len(same) == 1
    listed = ", ".join(f"{job.id} ({job.status})" for job in same)
    also = (f"job{'' if one else 's'} {listed} also write{'s' if one else ''} the run {options.get('output_name')!r} "
            f"in {run_location(options)[0]}")
    if options.get("resume"):  # it goes on with its own run, whose files are its own: none are moved aside
        # stopping the other job would lose its progress (its resume writes the same names again); this one, queued,
        # has trained nothing, and its state stays to be resumed from later
        return (f"{also}, and this resumed job, which runs after {'it' if one else 'them'}, writes over the files of "
                f"the same name {'it' if one else 'they'} saved (a resume moves no files aside); to keep "
                f"{'both' if one else 'all'}, stop this job while it is queued (it has trained nothing yet), and when "
                f"{'that job has' if one else 'those jobs have'} ended, move {'its' if one else 'their'} files out of "
                f"that folder and resume again from the same state")
    return (f"{also}: when this job starts, the files {'it' if one else 'they'} wrote by then are moved into "
            f"{replaced_folder}, not overwritten; give this job another output name to keep "
            f"{'both' if one else 'all'} where they are")


def set_aside_earlier_files(job: Job, replaced_folder: Path) -> dict[Path, Path]:
    """Move an earlier run's files out of the new job's way, into ``replaced_folder/<job folder's name>``: nothing is
    lost (deleting the job leaves them), and moving them back restores them. A file another program holds open stays
    (the job's events say so; the trainer saves beside a file it cannot replace). Returns where each file went."""
    return _moved(job, {path: replaced_folder / job.folder.name / path.name for path in earlier_files(job.options)})


def put_back_earlier_files(job: Job, replaced_folder: Path) -> dict[Path, Path]:
    """Undo ``set_aside_earlier_files`` for a job that wrote no file of its own: each file whose place is still free
    goes back. Returns where each file went."""
    folder = replaced_folder / job.folder.name
    output = Path(job.options.get("output_dir") or "output")
    moves = {path: output / path.name for path in sorted(folder.iterdir()) if not (output / path.name).exists()} \
        if folder.is_dir() else {}
    moved = _moved(job, moves)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return moved


def _moved(job: Job, moves: dict[Path, Path]) -> dict[Path, Path]:
    done = {}
    for path, target in moves.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.move(str(path), str(target))
        except OSError as error:
            if path.is_file() and target.is_file():  # copied to another drive, the original held open: it stays, alone
                target.unlink(missing_ok=True)
            logging.getLogger(__name__).warning("job %s: could not move %s to %s (%s)", job.id, path, target, error)
            continue
        done[path] = target
    return done


def visible_devices(device_id: str | None, visible: str | None) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for a trainer that is to train on the host's GPU ``device_id`` (the WebUI's
    ``--device-id``, an index among the GPUs the host sees), or None to leave the environment as it is. The trainer
    always uses its first visible GPU, so it gets only that one; an index into an existing list becomes its entry."""
    if device_id is None or not device_id.strip().isdigit():
        return None
    index = int(device_id)
    if not visible or not visible.strip():
        return str(index)
    entries = [entry.strip() for entry in visible.split(",")]
    return entries[index] if index < len(entries) else None


def _installed() -> bool:
    """Whether this package lies in a site-packages folder, where every interpreter of this environment finds it
    (a folder put on PYTHONPATH would come before the standard library)."""
    sites = {Path(p).resolve() for p in (*getattr(site, "getsitepackages", list)(), site.getusersitepackages())}
    return PACKAGE_ROOT in sites


def own_group(windows: bool = os.name == "nt") -> dict:
    """Popen's arguments that put the trainer in its own process group, as the host's Ctrl-C must not reach it (it
    would stop the job unasked) and a kill must reach its data-loader workers too: a new session on POSIX; on Windows
    a new process group and a console of its own (no window), since closing the WebUI's console window sends its
    close event to every process attached to it, whatever their group, and the run would end unsaved."""
    create_new_process_group, create_no_window = 0x00000200, 0x08000000  # subprocess has them on Windows only
    return {"creationflags": create_new_process_group | create_no_window} if windows else {"start_new_session": True}


_OWN_GROUP = own_group()


def _terminate(process) -> None:
    """SIGTERM to the trainer itself (a Popen or an adopted one), which saves and ends as on a stop."""
    try:
        os.kill(process.pid, signal.SIGTERM)
    except OSError:  # it ended between the poll and now
        pass


def kill_process_tree(process: subprocess.Popen, windows: bool = os.name == "nt") -> None:
    """Kill the trainer and its data-loader workers: its process group on POSIX; on Windows, which has no process
    groups to signal, ``taskkill /T`` (its tree), or the process alone where taskkill fails."""
    if windows:
        taskkill = subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True)
        if taskkill.returncode != 0:
            process.kill()
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended between the last poll and now
        pass


# Trainers this process started and has not seen end, by pid: a runner made anew in the same process (the WebUI's
# "Reload UI") follows its predecessor's trainer through the same Popen, which reads its exit and reaps it (a pid
# alone would stay "alive" as an unreaped zombie)
_LAUNCHED: dict[int, subprocess.Popen] = {}
# What a closing runner had been asked for its trainer, by job id: (stop asked, pause asked, words held until it
# starts), for the runner that adopts it (a pause asked just before "Reload UI" must end as a pause, not "finished")
_HANDED_OVER: dict[int, tuple[bool, bool, list[str]]] = {}


class AdoptedProcess:
    """A trainer that an earlier server started and left running (the WebUI restarted): followed by its pid, since
    only its parent could read its exit code (or through that parent's Popen, where it is this process)."""

    def __init__(self, job: Job):
        self.job = job
        self.pid = job.pid
        self.launched = _LAUNCHED.get(job.pid)
        self.returncode: int | None = None  # unknown: its events tell how it ended

    def poll(self) -> bool | None:
        if self.launched is not None:
            ended = self.launched.poll()
            self.returncode = ended
            return ended
        return None if trainer_alive(self.job) else True

    def kill(self) -> None:
        if not trainer_alive(self.job):  # its number may be another process's by now
            return
        try:
            os.kill(self.pid, getattr(signal, "SIGKILL", signal.SIGTERM))  # Windows: SIGTERM is TerminateProcess
        except OSError:
            pass


def _sample_prompts(job: Job) -> str | None:
    """The job's ``sample_prompts`` as the trainer reads its options (a config file's too); assumed given where they
    cannot be read here (the trainer then says what it does)."""
    from ..training.options import options_from

    try:
        return options_from(job.options, f"job {job.id}").sample_prompts
    except UserError:
        return "unreadable here"


# what a trainer told to stop writes while it ends its step, draws the samples asked for and saves (a step's own event
# counts once: the step it was in)
FINISHING_EVENTS = ("step", "epoch", "validation", "sample", "saved", "state")


class JobRunner:
    def __init__(self, store: JobStore, command: Callable[[Job], list[str]] = trainer_command, kill_after: float = 120.0,
                 poll: float = 0.5, on_event: Callable[[Job, dict], None] | None = None, extras_folder: Path | None = None,
                 cuda_device: str | None = None):
        self.store = store
        self.command = command
        self.kill_after = kill_after
        self.poll = poll
        self.on_event = on_event
        self.extras_folder = extras_folder  # optional packages installed for the trainer only (bitsandbytes, …)
        # a stop before the first step is a SIGTERM (POSIX); Windows has no signal a Python process can catch there
        self.terminates_early = os.name != "nt"
        self.cuda_device = cuda_device  # the host's GPU index (the WebUI's --device-id); None: the first visible one
        self._process: subprocess.Popen | None = None
        self._current: int | None = None
        self._stop_requested: set[int] = set()
        self._pause_requested: set[int] = set()
        # Control words wait here until the job's trainer has said "start": the trainer drops a word older than its
        # own start as an earlier run's leftover, and a stop pressed while its interpreter loads would be one.
        self._listening: set[int] = set()
        self._held: dict[int, list[str]] = {}
        # stop, pause and the control words against the queue taking a job and the trainer saying start
        self._lock = threading.Lock()
        self._resuming = threading.Lock()  # one resume at a time: two would both find the state not yet resumed
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closing = False
        self.recovered = store.recover()  # the jobs that ended while no app followed them, ended now

    # --- queue ----------------------------------------------------------------------------------------------

    @property
    def replaced_folder(self) -> Path:
        """Where an earlier run's files go when a new job of its name starts: beside the job folders, not in one."""
        return self.store.jobs_folder.parent / "replaced"

    def check(self, name: str, options: dict) -> list[str]:
        """What ``submit`` refuses, without queueing (the Train tab's Validate asks the same): the options, the dataset's
        layout and resolution, the device, the checkpoint's kind and the optimizer's package, so a job that would fail as it starts is refused
        before it exists (no id or folder used up, nothing the queue could start half-made). Returns what the run would
        warn of as it starts (``check_before_queueing``)."""
        if not name or "/" in name or "\\" in name or ".." in name:
            raise UserError(f"job name {name!r}: use a plain name without / or ..")
        # torch: imported when a job is checked, not with the tabs
        from ..training.data import dataset_group
        from ..training.optimizers import check_optimizer_installed
        from ..training.trainer import check_before_queueing

        checked = options_from({**options, "events_file": "events.jsonl", "stop_file": "stop"}, f"job {name}")
        if checked.backend:  # a wrong path failed only when the queue reached the job
            from ..training.sd_scripts_backend import checkout_of

            try:
                checkout_of(checked.backend)
            except UserError as error:
                raise UserError(str(error), "backend") from None
        else:  # sd-scripts imports its optimizers from its own environment
            check_optimizer_installed(checked.optimizer, self.extras_folder)
        return check_before_queueing(checked, dataset_group(checked))

    def submit(self, name: str, options: dict, warnings: list[str] | None = None) -> Job:
        """Validate now (a clear message before anything is queued), then queue; what the run would warn of as it
        starts goes into ``warnings``."""
        notes = self.check(name, options)
        if warnings is not None:
            warnings += notes
        job = self.store.add(name, options)
        # states in the job's folder: in models/Lora the WebUI would list each state's files as Lora cards
        values = {**options, "events_file": str(job.events_path), "stop_file": str(job.stop_path),
                  "state_dir": str(job.state_folder)}  # RUNNER_OPTIONS
        job.config_path.write_text(toml_text.dumps(values), encoding="utf-8")
        self._wake.set()
        return job

    def resume(self, job_id: int, warnings: list[str] | None = None) -> Job:
        """A new job that goes on from the job's last state; ``warnings`` gain what a job queued or running before it
        does to the same run (``same_run_jobs_note``)."""
        with self._resuming:
            return self._resume(job_id, warnings)

    def _resume(self, job_id: int, warnings: list[str] | None) -> Job:
        job = self._job(job_id)
        if job.status in ("queued", "running"):
            raise UserError(f"job {job_id} is {job.status}; nothing to resume")
        if job.status == "finished":  # its state is at the last step: the resumed job would fail, leaving nothing to train
            raise UserError(f"job {job_id} finished: nothing is left to train; to train on, start a new job with its last "
                            "file as --network_weights (or more epochs from its state: --resume with max_train_epochs raised)")
        # one taken out of the queue before it started trained nothing (and saved no state): this job's state is the
        # run's last still, as after a failed one
        later = [j for j in self.store.all() if j.resumed_from == job_id and j.status != "failed"
                 and not (j.status == "stopped" and j.started is None)]
        if later:  # two jobs from one state would train the same steps twice and write the same files
            raise UserError(f"job {job_id} was resumed already, as job {later[-1].id}: resume that one")
        from ..training.state import readable_state

        if not job.last_state or not readable_state(Path(job.last_state)).exists():
            raise UserError(f"job {job_id} saved no state to resume from; start it again (or use its last file as --network_weights)")
        options = {**job.options, "resume": job.last_state}
        note = same_run_jobs_note(options, self.store.all(), self.replaced_folder)
        resumed = self.submit(job.name, options)
        if note and warnings is not None:
            warnings.append(note)
        self.store.update(job.id, message=f"resumed as job {resumed.id}")  # its status stays what it ended as
        return self.store.update(resumed.id, resumed_from=job.id)

    def stop(self, job_id: int, pause: bool = False) -> Job:
        with self._lock:
            job = self._job(job_id)
            if job.status == "queued" and pause:  # it has trained nothing, so there is nothing to save
                raise UserError(f"job {job_id} is queued, not running: nothing to pause; stop takes it out of the queue")
            if job.status == "queued":
                return self._dequeue(job)
            if job.status != "running":
                raise UserError(f"job {job_id} is {job.status}; only a {'running' if pause else 'queued or running'} "
                                f"job can be {'paused' if pause else 'stopped'}")
            (self._pause_requested if pause else self._stop_requested).add(job_id)
            self._send(job, "pause" if pause else "stop")
        return self.store.get(job_id)

    def dequeue(self, job_id: int) -> Job:
        """A queued job out of the queue, ended as a stop ends it there; UserError where it is queued no longer (the
        queue took it meanwhile: a delete must not remove a running job's row)."""
        with self._lock:
            job = self._job(job_id)
            if job.status != "queued":
                raise UserError(f"job {job_id} is {job.status}, no longer queued")
            return self._dequeue(job)

    def _dequeue(self, job: Job) -> Job:
        """Under ``_lock``: the queued ``job`` marked stopped, its stream ended as every stopped job's is."""
        removed = "removed from the queue"
        with EventLog(job.events_path) as events:
            events.emit("end", files=[], steps=0, stopped=True, message=removed)
        return self.store.update(job.id, status="stopped", finished=time.time(), message=removed)

    def control(self, job_id: int, command: str) -> Job:
        """``save`` (write the network and a state now, go on) or ``sample`` (draw the sample prompts now, go on)."""
        if command not in ("save", "sample"):
            raise UserError(f"control command {command!r}: use save or sample (stop and pause have their own calls)")
        with self._lock:
            job = self._job(job_id)
            if job.status != "running":
                raise UserError(f"job {job_id} is {job.status}; {command} works only while it runs")
            if job.options.get("backend"):
                raise UserError(f"job {job_id} runs on sd-scripts (--backend), which cannot {command} on request: it "
                                "saves and draws samples only at the steps and epochs its options set "
                                "(save_every_n_epochs/steps, sample_every_n_epochs/steps)")
            if command == "sample" and not _sample_prompts(job):
                raise UserError(f"job {job_id} has no sample prompts (sample_prompts): there is nothing to draw; give "
                                "sample prompts (the Train tab's Sample prompt) when starting a job to sample it while "
                                "it trains")
            self._send(job, command)
        return job

    def _send(self, job: Job, command: str) -> None:
        """Tell the trainer now if it has said start, else once it does (``_listen``); under ``_lock``."""
        if job.id in self._listening:
            _tell(job, command)
        else:
            self._held.setdefault(job.id, []).append(command)

    def _listen(self, job: Job) -> list[str]:
        """The trainer has said start, so it has taken its start time: the words held until now are this job's (told
        now, and returned)."""
        with self._lock:
            self._listening.add(job.id)
            held = self._held.pop(job.id, [])
            for command in held:
                _tell(job, command)
            return held

    def _job(self, job_id: int) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise UserError(f"no job {job_id}")
        return job

    # --- running --------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lora-trainer-jobs", daemon=True)
            self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._closing:
            if self.run_next() is None:
                self._wake.wait(timeout=2.0)
                self._wake.clear()

    def run_next(self) -> Job | None:
        """Follow a trainer an earlier server left running, else run the oldest queued job, to its end
        (synchronously); None when there is neither. One trainer at a time, whoever started it."""
        orphan = next((job for job in self.store.all() if job.status == "running" and job.id != self._current
                       and trainer_alive(job)), None)
        if orphan is not None:
            stop, pause, held = _HANDED_OVER.pop(orphan.id, (False, False, []))
            with self._lock:
                if stop:
                    self._stop_requested.add(orphan.id)
                if pause:
                    self._pause_requested.add(orphan.id)
                if held:
                    self._held.setdefault(orphan.id, []).extend(held)
            return self._follow(orphan, AdoptedProcess(orphan), log=None)
        job = self._take_next()
        if job is None:
            return None
        job.stop_path.unlink(missing_ok=True)
        if moved := set_aside_earlier_files(job, self.replaced_folder):  # said in its events, before the trainer's
            self._files_moved(moved)
            with EventLog(job.events_path) as events:
                events.emit("warning", message=f"{len(moved)} file(s) of an earlier run named "
                            f"{job.options.get('output_name')!r} were moved out of the way into "
                            f"{next(iter(moved.values())).parent}; move them back to restore them")
        if stuck := earlier_files(job.options):  # held open by another program (Windows: a LoRA the WebUI loaded)
            with EventLog(job.events_path) as events:
                events.emit("warning", message=f"{', '.join(p.name for p in stuck)} of an earlier run could not be moved "
                            "out of the way (another program has it open?): it stays, and a save this run cannot put "
                            "in its place goes beside it")
        log = open(job.folder / "trainer.log", "w", encoding="utf-8")
        try:
            process = subprocess.Popen(self.command(job), stdout=log, stderr=subprocess.STDOUT, cwd=job.folder,
                                       env=self.environment(), **_OWN_GROUP)
        except OSError as error:  # it is marked running already: said, or it would hold the queue for good
            log.close()
            self._forget(job.id)
            self._put_back(job)
            return self.store.update(job.id, status="failed", finished=time.time(),
                                     message=f"the trainer could not be started: {error}")
        self._process, self._current = process, job.id
        _LAUNCHED[process.pid] = process
        job = self.store.update(job.id, pid=process.pid)
        self._notify(job)
        return self._follow(job, process, log)

    def _take_next(self) -> Job | None:
        """The oldest queued job, marked running at once: a stop pressed from here on stops the starting job. Read
        as queued while the trainer is launched, it would be marked removed and then run to its end all the same."""
        with self._lock:
            job = self.store.next_queued()
            return None if job is None else self.store.update(job.id, status="running", started=time.time())

    def _follow(self, job: Job, process: subprocess.Popen | AdoptedProcess, log) -> Job:
        """The running trainer's events into the job (files, last state, error) and its end into the job's status."""
        self._process, self._current = process, job.id
        offset, files, last_state, error, ended, stepped = 0, [], None, None, False, False
        state_step = None
        stop_seen_at, steps_since_stop = None, 0
        while True:
            finished = process.poll() is not None
            events, offset = read_events(job.events_path, offset)
            relayed = False  # a stop held until the trainer's start, told it in this read
            for event in events:
                if event["event"] == "saved":
                    files.append(event["path"])
                elif event["event"] == "state" and event.get("action") == "saved":
                    last_state, state_step = event["path"], event.get("step")
                elif event["event"] == "error":
                    error = event.get("message")
                elif event["event"] == "start" and {"stop", "pause"} & set(self._listen(job)) and stop_seen_at:
                    # the trainer hears it only now (Windows: no signal before its first step): its wait and its one
                    # step start here, and the steps this read holds after the start were taken before it
                    stop_seen_at, steps_since_stop, relayed = time.time(), 0, True
                training_step = event["event"] == "step" and "phase" not in event  # not a count of cached latents
                stepped = stepped or training_step
                steps_since_stop += training_step and stop_seen_at is not None and not relayed
                ended = ended or event["event"] in ("end", "error")
                if self.on_event:
                    try:
                        self.on_event(job, event)
                    except Exception:  # a listener's failure (a LoRA list refresh) must never stop the queue
                        logging.getLogger(__name__).exception("job %s: handling its %s event failed", job.id, event["event"])
            if events:  # not the epoch files --save_last_n_epochs removed since they were saved
                job = self.store.update(job.id, files=[f for f in files if Path(f).exists()], last_state=last_state)
            if finished:
                break
            if self._closing:  # a new runner takes over ("Reload UI"): it adopts the trainer, still running
                if log is not None:
                    log.close()
                with self._lock:
                    _HANDED_OVER[job.id] = (job.id in self._stop_requested, job.id in self._pause_requested,
                                            self._held.pop(job.id, []))
                return job
            if job.id in self._stop_requested | self._pause_requested:
                if stop_seen_at is None and not stepped and self.terminates_early and not job.options.get("backend"):
                    # (an sd-scripts backend run reads its stop file itself; a SIGTERM would orphan its training process)
                    # it reads its control file between steps only: loading or caching, it stops on SIGTERM at once,
                    # cleanly (its caches whole), where waiting out kill_after ended in a SIGKILL mid-write
                    _terminate(process)
                # the wait runs from the stop or the trainer's last sign of finishing its step: the step's own end,
                # its validation, each sample drawn, a file or state saved (a kill then lost the step's save; a round
                # of samples takes minutes on a small GPU). Warnings are no such sign, and a trainer that takes a
                # second step after the stop does not obey
                finishing = any(event["event"] in FINISHING_EVENTS and "phase" not in event for event in events)
                if stop_seen_at is None or finishing and steps_since_stop <= 1:
                    stop_seen_at = time.time()
                if time.time() - stop_seen_at > self.kill_after:
                    kill_process_tree(process)
            time.sleep(self.poll)
        if log is not None:
            log.close()
        _LAUNCHED.pop(process.pid, None)
        code = process.returncode
        if code is None:  # adopted: no exit code to read, its events say how it ended
            code = 0 if ended and error is None else 1
        asked = job.id in self._stop_requested | self._pause_requested
        if asked and code == 0 and job.options.get("backend"):  # sd-scripts was terminated: it saved nothing then
            status, message = _backend_stopped(job.id in self._pause_requested and job.id not in self._stop_requested,
                                               last_state, state_step)
        elif job.id in self._pause_requested and job.id not in self._stop_requested and code == 0:
            status, message = "paused", "paused: resume continues from the saved state"
        elif job.id in self._stop_requested | self._pause_requested and code != 0 and not stepped:
            # still loading the model or caching latents: stopped there (or killed after the wait), nothing was lost
            status, message = "stopped", ("stopped before its first step (the model was still loading or the latents "
                                          "caching): nothing was trained or saved")
        elif job.id in self._stop_requested | self._pause_requested:  # a pause killed after the timeout is a stop
            status, message = "stopped", "stopped and saved" if code == 0 else "stopped (killed after the timeout)"
        elif code == 0:
            status, message = "finished", None
        else:
            # killed by a signal, the log's last lines are whatever it said before (a warning, a saved file): not why
            status, message = "failed", error or (code > 0 and _tail(job.folder / "trainer.log")) or _exit_reason(code)
        if not ended and status in ("failed", "stopped") and code != 0:  # killed: say so where the UI and API read
            with EventLog(job.events_path) as events:  # appends
                if stepped or status == "failed":
                    events.emit("error", message=message)
                else:  # what the user asked for, not a failure
                    events.emit("end", files=[], steps=0, stopped=True, message=message)
        if status == "failed" and not files:
            self._put_back(job)
        self._process, self._current = None, None
        job = self.store.update(job.id, status=status, finished=time.time(), message=message, pid=None)
        self._forget(job.id)  # after: a stop pressed until then reads the job as running and leaves its id here
        self._notify(job)
        return job

    def _put_back(self, job: Job) -> None:
        """A run that failed before writing a file replaces nothing: the earlier run's files go back."""
        if back := put_back_earlier_files(job, self.replaced_folder):
            self._files_moved(back)
            with EventLog(job.events_path) as events:
                events.emit("warning", message=f"the {len(back)} file(s) of the earlier run named "
                            f"{job.options.get('output_name')!r} are back in {next(iter(back.values())).parent}")

    def _files_moved(self, moved: dict[Path, Path]) -> None:
        """Jobs that list a moved file list it where it is now: a client that downloads a job's file must get that
        job's run, not the later one written under the same name."""
        moved = {path.resolve(): str(target) for path, target in moved.items()}
        for job in self.store.all():
            now = [moved.get(Path(name).resolve(), name) for name in job.files]
            if now != job.files:
                self.store.update(job.id, files=now)

    def _forget(self, job_id: int) -> None:
        with self._lock:
            for requested in (self._stop_requested, self._pause_requested, self._listening):
                requested.discard(job_id)
            self._held.pop(job_id, None)

    def environment(self) -> dict[str, str]:
        """The trainer's environment. PYTHONPATH starts with the folder that holds this package unless it is installed:
        in the WebUI that is the extension's folder, which only the WebUI's own process has on its path (put there by
        ``scripts/lora_trainer.py``). The extras folder goes last, so the packages pip put there as dependencies
        (numpy, …) never shadow the host's own. The trainer sees only the host's GPU when the host names one."""
        env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
        devices = visible_devices(self.cuda_device, env.get("CUDA_VISIBLE_DEVICES"))
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if not _installed():
            paths.insert(0, str(PACKAGE_ROOT))
        if self.extras_folder is not None:
            paths.append(str(self.extras_folder))
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def _notify(self, job: Job) -> None:
        """A synthetic ``job`` event when the subprocess starts and when it is gone, whatever way it went."""
        if self.on_event:
            self.on_event(job, {"event": "job", "status": job.status, "id": job.id})


def _tell(job: Job, command: str) -> None:
    """A command for the running trainer, a line of its control file: added to any it has not read yet (a save then a
    sample within one step are both done)."""
    with open(job.stop_path, "a", encoding="utf-8") as control:
        control.write(command + "\n")


def _backend_stopped(pause: bool, last_state: str | None, state_step: int | None) -> tuple[str, str]:
    """The status and message of an sd-scripts backend job a stop or pause ended: sd-scripts cannot save at a stop (it
    is terminated), so a resume goes on from the last state it saved on its own, and without one it cannot resume."""
    if last_state is None:
        return "stopped", ("stopped (sd-scripts cannot save at a stop, and it saved no state to resume from: "
                           "--save_state keeps one with each file it saves); the files it saved are kept")
    at = f", step {state_step}" if state_step is not None else ""
    if pause:
        return "paused", f"paused (sd-scripts cannot save at a stop; resume continues from its last saved state{at})"
    return "stopped", f"stopped (sd-scripts cannot save at a stop; resume from its last saved state{at})"


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]).strip()
    except OSError:
        return ""


def _exit_reason(code: int) -> str:
    """What an exit code says when the trainer could say nothing (killed, out of memory on the host …)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the trainer was killed ({name}) before it could say why: the system may have run out of memory"
    return f"the trainer exited with code {code} before it could say why"
