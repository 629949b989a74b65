"""``--backend sd-scripts=PATH``: run the same configuration on the user's own kohya-ss/sd-scripts checkout.

The options become the TOML sd-scripts reads (``--config_file``; the options that are ours stay out), the
script is chosen from the checkpoint (``sdxl_train_network.py`` for SDXL), and its console output — the tqdm
``steps`` bar with ``avr_loss``, ``epoch N/M``, ``saving checkpoint: FILE``, its log's state, sample and ERROR lines
— becomes our event stream, so the UI, the API and the job runner follow it as they follow our own trainer. sd-scripts
has no graceful stop: the control file's stop (or Ctrl-C, SIGTERM) terminates it, keeping the files and states it saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .. import toml_text
from ..errors import UserError
from .control import asks_to_stop, control_command, control_text, leftover_warning, written_before
from .events import EventLog
from .options import (TrainOptions, absolute_path, memory_advice, sd_scripts_notes, sd_scripts_values,
                      with_absolute_paths, with_sd_scripts_requirements)

# "steps:" is the training bar; sd-scripts' "validation steps:" / "epoch validation steps:" bars (with
# --validation_split) count their own 1..N and must not become step events, hence the look-behind.
_STEPS = re.compile(r"(?<![\w ])steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)\s*\[[^\]]*?(?:,\s*avr_loss=([0-9.eE+-]+|nan|inf))?\]")
_EPOCH = re.compile(r"^epoch (\d+)/(\d+)\s*$")
_SAVED = re.compile(r"saving checkpoint: (.+?)\s*$")
# train_util's log lines as a state is about to be written (save_and_remove_state_on_epoch_end / _stepwise,
# save_state_on_train_end); its folder is named from the options, not read from the line, which rich may wrap
_STATE = re.compile(r"saving state at (epoch|step) (\d+)|saving last state")
_ERROR = re.compile(r"^([\w.]+(?:Error|Exception)): (.+)$")  # dotted too: torch.OutOfMemoryError
# its log lines through rich: "2026-12-01 20:13:16 ERROR    message    train_util.py:6638" (the time left blank where it
# repeats); a message wider than the console goes on in lines indented past the level column
# "generating sample images at step / サンプル画像生成 ステップ: N": only its start, which rich does not wrap
_SAMPLING = re.compile(r"generating sample")
# sd-scripts' sample file names: [<output_name>_]e<epoch:06d> or <step:06d>, _<prompt:02d>_<time>[_<seed>].png
_SAMPLE_NAME = re.compile(r"(?:^|_)(e?)(\d{6})_\d{2,}_\d{14}(?:_\d+)?\.png$")  # {i:02d}: three digits from 100
_LOGGED_ERROR = re.compile(r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)?\s*(?:ERROR|CRITICAL)\s+(.+?)(?:\s+[\w.-]+\.py:\d+)?$")
_CONTINUED = re.compile(r"^\s{20,}(?!(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s)(\S.*?)(?:\s+[\w.-]+\.py:\d+)?$")


def checkout_of(backend: str) -> Path:
    """``sd-scripts=PATH`` → the checkout, checked to hold train_network.py."""
    kind, _, path = backend.partition("=")
    if kind.strip() != "sd-scripts" or not path.strip():
        raise UserError(f"--backend {backend!r}: write --backend sd-scripts=PATH (PATH = your sd-scripts checkout)")
    checkout = Path(path.strip()).expanduser()
    if not (checkout / "train_network.py").is_file():
        inside = checkout / "sd-scripts"  # the Kohya GUI's install: kohya_ss/ holds sd-scripts/ and venv/
        hint = f": use --backend sd-scripts={inside} (the Kohya GUI keeps its sd-scripts there)" if \
            (inside / "train_network.py").is_file() else "; point it at the sd-scripts checkout folder"
        raise UserError(f"--backend: {checkout} holds no train_network.py{hint}")
    return checkout


def _asks_to_stop(stop_file: Path | None, started: float) -> bool:
    """The control file asks to stop or pause (a sample asked with it too): sd-scripts can neither save nor sample
    now, so only the stop is obeyed. A file older than the run (one that could not be removed as a leftover) is not
    this run's."""
    try:
        return stop_file is not None and not written_before(stop_file.stat().st_mtime, started) and \
            asks_to_stop(control_command(control_text(stop_file.read_bytes()))[0])
    except OSError:
        return False


def dropped_leftover(stop_file: Path | None, started: float) -> str | None:
    """A control file written before this run started, removed, as our trainer's StopRequest.drop_leftover does: what
    to say, or None. It would stop this run at sd-scripts' first line."""
    try:
        if stop_file is None or not written_before(stop_file.stat().st_mtime, started):
            return None
        text = control_text(stop_file.read_bytes()).strip()
        stop_file.unlink()
    except OSError:
        return None
    return leftover_warning(stop_file, text)


def python_of(checkout: Path) -> str:
    """The checkout's own venv when it has one (that is where its accelerate/diffusers live), or the one beside it
    (the Kohya GUI's kohya_ss/venv beside kohya_ss/sd-scripts), else ours."""
    kohya_ss = (checkout.parent / "kohya_gui").is_dir() or (checkout.parent / "kohya_gui.py").is_file()
    for folder in (checkout, checkout.parent) if kohya_ss else (checkout,):  # not any venv that lies beside it
        for venv in ("venv", ".venv"):
            for candidate in (folder / venv / "Scripts" / "python.exe", folder / venv / "bin" / "python"):
                if candidate.is_file():
                    return str(candidate)
    return sys.executable


def for_sd_scripts(options: TrainOptions, unreadable: str = "train_network.py") -> tuple[str, TrainOptions]:
    """The script for the checkpoint's version (``unreadable`` where the file cannot be read), and the options with
    what sd-scripts must be told and this trainer detects (``told_by_checkpoint``) and what it requires and this
    trainer defaults (``with_sd_scripts_requirements``)."""
    script, told = told_by_checkpoint(options)
    return script or unreadable, dataclasses.replace(with_sd_scripts_requirements(options), **told)


def told_by_checkpoint(options: TrainOptions) -> tuple[str | None, dict[str, bool]]:
    """sd-scripts' script for the checkpoint's version (None where the file cannot be read: sd-scripts gives its own
    message) and the switches it must be told and this trainer detects: ``--v2`` for an SD2 file,
    ``--v_parameterization`` where the file declares v-prediction (a wrong or missing flag fails sd-scripts' strict
    load, or trains the wrong target), ``--zero_terminal_snr`` for a v-prediction file with the ztsnr marker (trained
    here on that schedule, as the loader reads the marker)."""
    path = Path(options.pretrained_model_name_or_path or "")
    yaml = path.with_suffix(".yaml") if path.name else None  # ("/" or "D:\\" has no name to put .yaml on)
    facts = _checkpoint_facts(str(path), _stamp(path), yaml and _stamp(yaml))
    if facts is None:
        return None, {}
    architecture, prediction, ztsnr = facts
    told = {}
    if architecture.startswith("sd2") and not options.v2:
        told["v2"] = True
    if prediction == "v_prediction" and not options.v_parameterization:
        told["v_parameterization"] = True
    v_prediction = options.v_parameterization or told.get("v_parameterization", False)
    if ztsnr and v_prediction and not options.zero_terminal_snr:
        told["zero_terminal_snr"] = True
    return ("sdxl_train_network.py" if architecture == "sdxl" else "train_network.py"), told


def _stamp(path: Path) -> tuple[int, int, bool] | None:
    """What a file's facts are kept for: its version, and whether it opens (a permission fixed with chmod or a Windows
    ACL changes neither its size nor its time, and an unreadable file was said unreadable until a restart)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns, _opens(path)


def _opens(path: Path) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:  # refused, or a folder
        return False


@functools.lru_cache(maxsize=16)
def _checkpoint_facts(path: str, stamp, yaml_stamp) -> tuple[str, str | None, bool] | None:
    """The architecture, declared prediction and ztsnr marker of a checkpoint, read once per version of the file and
    of the .yaml beside it (the Train tab asks at each "Show sd-scripts command", and a .ckpt is unpickled to tell)."""
    from ..models.checkpoint import declared_prediction_type, detect_architecture, open_tensors

    try:
        source = open_tensors(path)
        config, _ = detect_architecture(source)
    except Exception:
        return None
    return config.name, declared_prediction_type(source, Path(path)), "ztsnr" in source.shapes


def event_from_line(line: str) -> dict | None:
    """One console line of sd-scripts → one of our events (None for lines that say nothing we track)."""
    line = line.strip()
    if match := _STEPS.search(line):
        step, total, loss = int(match[1]), int(match[2]), match[3]
        if step == 0:
            return None
        event = {"event": "step", "step": step, "total": total}
        if loss is not None:
            event["average"] = float(loss)
        return event
    if match := _EPOCH.match(line):  # printed as epoch N starts: epoch N-1 is complete
        return {"event": "epoch", "epoch": int(match[1]) - 1, "epochs": int(match[2])} if int(match[1]) > 1 else None
    if match := _SAVED.search(line):
        return {"event": "saved", "path": match[1]}
    if match := _ERROR.match(line):
        return {"event": "error", "message": f"sd-scripts: {match[1]}: {match[2]}"}
    return None


def state_folder(line: str, options: TrainOptions) -> dict | None:
    """The state folder sd-scripts is about to write when ``line`` says so, named as its train_util names it
    (EPOCH_STATE_NAME, STEP_STATE_NAME, LAST_STATE_NAME in --output_dir, with its default names where --output_name is
    not given), with the epoch or step the line tells; None for other lines."""
    match = _STATE.search(line)
    if match is None:
        return None
    from .outputs import state_name  # the trainer's naming: outputs loads the network code, needed here only now

    said = {match[1]: int(match[2])} if match[1] else {}  # {"epoch": 3}, {"step": 120} or {} (the last state)
    name = state_name(options.output_name, said.get("epoch"), said.get("step"))
    return {"path": str(Path(options.output_dir or "output") / name), **said}


def round_samples(new: list[Path], step: int, epoch: int) -> list[dict]:
    """The samples of the round sd-scripts said it draws after ``step`` in ``epoch``, among the ``new`` files of its
    sample folder, as our ``sample`` events: those named for that step (``epoch`` 0 for --sample_at_first, else None),
    or, for a round at an epoch's end, those named for the epoch. A file of a later round (sd-scripts may be ahead of
    the console read so far) is left for its own round."""
    named = [(path, match) for path in new if (match := _SAMPLE_NAME.search(path.name))]
    at_step = [{"path": str(path), "epoch": 0 if step == 0 else None, "step": step}
               for path, match in named if not match[1] and int(match[2]) == step]
    return at_step or [{"path": str(path), "epoch": epoch, "step": step}
                       for path, match in named if match[1] and int(match[2]) == epoch]


def crash_message(error: str | None, logged_error: str | None, code: int, log_path: Path, options: TrainOptions,
                  python: str) -> str:
    """Why sd-scripts failed: its exception, else the last ERROR line it logged, else its exit code; with our memory
    advice after an out-of-memory error, as our own trainer gives it, and where a missing module goes."""
    message = error or (f"sd-scripts exited with code {code}" + (f" after logging: {logged_error}" if logged_error else "")
                        + f"; see {log_path}")
    if "out of memory" in message.lower():
        message += f"; {memory_advice(options)}"
    if "ModuleNotFoundError" in message:
        message += (f"; install it into {python}, the Python that runs sd-scripts (its requirements.txt lists what it "
                    "needs), or give the checkout a venv of its own")
    return message


def _lines(stream):
    """tqdm redraws with carriage returns: split on both."""
    buffer = b""
    while chunk := stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096):
        buffer += chunk
        *complete, buffer = re.split(rb"[\r\n]", buffer)
        for raw in complete:
            yield raw.decode("utf-8", errors="replace")
    if buffer:
        yield buffer.decode("utf-8", errors="replace")


_DATASET_PATHS = ("image_dir", "metadata_file", "conditioning_data_dir")


def absolute_dataset_config(source: Path, target: Path) -> Path:
    """A copy of a ``--dataset_config`` at ``target`` with its subsets' folders absolute: sd-scripts reads them
    against the folder it runs in, its checkout, not ours."""
    from ..dataset.config import read_config_file

    config = read_config_file(source)
    for dataset in config.get("datasets", []):
        for subset in dataset.get("subsets", []):
            for key in _DATASET_PATHS:
                if isinstance(subset.get(key), str):
                    subset[key] = absolute_path(subset[key], must_exist=False)
    target.write_text(toml_text.dumps(config), encoding="utf-8")
    return target


def _sd_scripts_misreadings(options: TrainOptions) -> list[str]:
    """Caption files this trainer reads right and sd-scripts does not (a byte-order mark, UTF-16), and pictures it
    trains otherwise (an EXIF turn ignored, 16 bits clipped, transparency kept), said before it runs: a mark glued to
    the first tag loses a trigger word there without a word, a phone photo trains sideways."""
    from ..dataset.caption_files import sd_scripts_misreading
    from ..dataset.images import sd_scripts_reading
    from ..dataset.layouts import dataset_images
    from .data import dataset_group

    try:  # the captions only: any resolution reads them (sd-scripts says what it makes of a missing one)
        scanned = dataclasses.replace(options, resolution=options.resolution or "512")
        datasets = [dataset_images(dataset) for dataset in dataset_group(scanned).datasets]
    except (UserError, OSError):  # sd-scripts says what it makes of a dataset it cannot read
        return []
    misread, pictures = [], []
    for dataset in datasets:
        for subset in dataset.subsets:
            for entry in subset.images:
                if entry.caption_file is not None:
                    with open(entry.caption_file, "rb") as handle:
                        if why := sd_scripts_misreading(handle.read(4)):
                            misread.append((entry.caption_file, why))
                if why := sd_scripts_reading(entry.path):
                    pictures.append((entry.path, why))
    notes = []
    if misread:
        path, why = misread[0]
        notes.append(f"{len(misread)} caption file(s) sd-scripts misreads, e.g. {path}: it {why}; re-save them as UTF-8 "
                     "without a mark (this trainer reads them right)")
    if pictures:
        path, why = pictures[0]
        notes.append(f"{len(pictures)} picture(s) sd-scripts trains otherwise than this trainer, e.g. {path}: it {why}; "
                     "`python -m lora_trainer dataset prep` writes them upright, in 8 bits, on white")
    return notes


def _terminate(process: subprocess.Popen) -> bool:
    """sd-scripts has no graceful stop: it is ended (TerminateProcess on Windows) and waited for, never left running
    without us; a second Ctrl-C while it ends kills it. True: stopped."""
    process.terminate()
    try:
        process.wait()
    except KeyboardInterrupt:
        process.kill()
        process.wait()
    return True


def child_environment(environ: dict[str, str], device: str) -> tuple[dict[str, str], list[str]]:
    """sd-scripts' environment, and what to say about it. Its output in UTF-8, unbuffered; PYTHONPATH without this
    package's folder and what lies in it (the job runner puts them there, with the WebUI extension's extras/, whose
    packages would come before those of sd-scripts' venv); ``device`` (sd-scripts takes no such option) as the GPUs
    it is shown: ``cuda:N`` that GPU alone, ``cpu`` none."""
    from ..jobs.runner import PACKAGE_ROOT, visible_devices

    env = {**environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"}
    root = PACKAGE_ROOT.resolve()
    paths = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep)
             if entry and not (Path(entry).resolve() == root or root in Path(entry).resolve().parents)]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        env.pop("PYTHONPATH", None)
    notes = []
    if device.startswith("cuda:") and device[5:].isdigit():
        visible = visible_devices(device[5:], environ.get("CUDA_VISIBLE_DEVICES"))
        if visible is None:  # an index past the list the host gives: left to the host
            notes.append(f"--device {device}: sd-scripts takes no device option, and the GPUs this process is shown "
                         f"(CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES')}) have no number {device[5:]}: it "
                         "trains on the first of them")
        else:
            env["CUDA_VISIBLE_DEVICES"] = visible
            notes.append(f"--device {device}: sd-scripts takes no device option, so it is shown that GPU alone "
                         f"(CUDA_VISIBLE_DEVICES={visible})")
    elif device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        notes.append("--device cpu: sd-scripts takes no device option, so it is shown no GPU (CUDA_VISIBLE_DEVICES "
                     "empty) and trains on the CPU")
    elif device not in ("auto", "cuda"):
        notes.append(f"--device {device}: sd-scripts takes no device option and picks its device itself (accelerate): "
                     "this one is not passed on")
    return env, notes


def stopped_message(last_state: dict | None) -> str:
    """What a stop of sd-scripts kept: it cannot save at a stop, so a resume goes on from the last state it saved."""
    if last_state is None:
        return ("stopped: sd-scripts cannot save at a stop, and it saved no state to resume from (--save_state keeps "
                "one with each file); the files it saved are kept")
    return (f"stopped: sd-scripts cannot save at a stop; resume from its last saved state, step {last_state['step']} "
            f"({last_state['path']})")


def run_sd_scripts(options: TrainOptions, events: EventLog, log_path: Path, started: float) -> int:
    """``started``: when the command started (train_network.main); a control word older than that is an earlier run's."""
    checkout = checkout_of(options.backend)
    script, options = for_sd_scripts(options)
    options = with_absolute_paths(options)  # it runs in its checkout
    config = log_path.with_suffix(".toml").resolve()  # beside its log: <name>.events.sd-scripts.toml
    if options.dataset_config:
        dataset = absolute_dataset_config(Path(options.dataset_config), config.with_suffix(".dataset.toml"))
        options = dataclasses.replace(options, dataset_config=str(dataset))
    config.write_text(toml_text.dumps(sd_scripts_values(options)), encoding="utf-8")
    python = python_of(checkout)
    command = [python, str(checkout / script), "--config_file", str(config)]
    events.emit("start", backend="sd-scripts", checkout=str(checkout), command=command)
    if python == sys.executable:
        events.emit("warning", message=f"{checkout} has no venv (nor .venv, nor the Kohya GUI's beside it): sd-scripts runs with "
                                       f"this trainer's Python, {python}, which needs sd-scripts' requirements")
    for note in [*sd_scripts_notes(options, script), *_sd_scripts_misreadings(options)]:
        events.emit("warning", message=note)
    if options.state_dir and (options.save_state or options.save_state_on_train_end):
        events.emit("warning", message=f"sd-scripts saves its states beside its files in {options.output_dir}, "
                                       f"not in --state_dir {options.state_dir}")
    stop_file = Path(options.stop_file) if options.stop_file else None
    if leftover := dropped_leftover(stop_file, started):
        events.emit("warning", message=leftover)
    last_step, files, error = 0, [], None
    logged_error, error_goes_on = None, False  # the last ERROR line sd-scripts logged, and whether the next lines extend it
    epochs_done, epoch_now, epochs, stopped = 0, 0, None, False
    # sd-scripts draws each step twice: progress_bar.update(1) (avr_loss still that of the step before), then
    # set_postfix(avr_loss=...). A step is held until its redraw (or the next line we track) so it carries its own loss.
    pending: dict | None = None
    # a state sd-scripts said it is writing: recorded once a later line shows its save_state returned (the folder is
    # whole), so a resume never starts from one a stop cut short
    state: dict | None = None
    last_state: dict | None = None
    # samples: the files new in <output_dir>/sample once sd-scripts has said it draws and a later line shows it is done
    sample_folder = Path(options.output_dir or "output") / "sample"
    samples_seen = set(sample_folder.glob("*.png")) if sample_folder.is_dir() else set()
    rounds, last_average = [], None  # (step, epoch) of each round of samples said and not yet found

    def flush():
        nonlocal pending
        if pending is not None:
            events.emit("step", **pending)
            pending = None

    def samples_drawn():
        if not rounds or not sample_folder.is_dir():
            return
        for step, epoch in rounds:
            for event in round_samples(sorted(set(sample_folder.glob("*.png")) - samples_seen), step, epoch):
                events.emit("sample", **event)
                samples_seen.add(Path(event["path"]))
        rounds.clear()

    def state_written():
        nonlocal state, last_state
        if state is None:
            return
        if Path(state["path"]).is_dir():
            last_state = {"action": "saved", "path": state["path"], "epoch": state.get("epoch", epoch_now),
                          "step": state.get("step", last_step)}
            events.emit("state", **last_state)
        else:
            events.emit("warning", message=f"sd-scripts said it saved a state, but {state['path']} is not there: "
                                           "it is not a state to resume from")
        state = None
    env, notes = child_environment(dict(os.environ), options.device)
    for note in notes:
        events.emit("warning", message=note)
    with open(log_path, "w", encoding="utf-8") as log, \
            subprocess.Popen(command, cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as process:
        try:
            for line in _lines(process.stdout):
                log.write(line + "\n")
                if stopped:  # what it printed before it ended goes to its log, not into the events after the stop
                    continue
                if match := _LOGGED_ERROR.match(line.rstrip()):
                    logged_error, error_goes_on = match[1], True
                elif error_goes_on and (match := _CONTINUED.match(line.rstrip())):
                    logged_error += " " + match[1]
                else:
                    error_goes_on = False
                if match := _EPOCH.match(line.strip()):
                    epoch_now, epochs = int(match[1]), int(match[2])
                event = event_from_line(line)
                if event is not None:
                    state_written()
                    samples_drawn()
                if _SAMPLING.search(line):  # drawn after the step its bar showed last, at the end of this epoch or not
                    flush()
                    rounds.append((last_step, epoch_now))
                if saving := state_folder(line, options):
                    flush()
                    state = saving
                if event is not None and event["event"] == "step":
                    event.pop("event")
                    logged_error = None  # an error it logged and trained on (a missing prompts file) is not a crash's cause
                    last_average = event.get("average", last_average)
                    if pending is not None and event["step"] == pending["step"]:
                        pending.update(event)  # the redraw after set_postfix: this step's own average
                        flush()
                    elif event["step"] > last_step:
                        flush()
                        pending, last_step = {**event, **({"epoch": epoch_now} if epoch_now else {})}, event["step"]
                elif event is not None:
                    flush()
                    kind = event.pop("event")
                    files += [event["path"]] if kind == "saved" else []
                    if kind == "epoch":  # its last step's average is sd-scripts' average over the epoch
                        epochs_done = event["epoch"]
                        event.update(step=last_step, **({"average": last_average} if last_average is not None else {}))
                    if kind == "error":  # becomes the UserError below; the caller writes the one error event
                        error = event["message"]
                    else:
                        events.emit(kind, **event)
                if process.returncode is None and _asks_to_stop(stop_file, started):
                    flush()
                    stopped = _terminate(process)
                    with contextlib.suppress(OSError):  # obeyed, as our trainer takes it: a resume must not stop on it
                        stop_file.unlink(missing_ok=True)
                    events.emit("warning", message="sd-scripts cannot stop gracefully: terminated; the files it saved are kept")
            code = process.wait()
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (train_network makes it one): sd-scripts must not train on orphaned
            flush()
            stopped = _terminate(process)
            code = process.returncode
            events.emit("warning", message="interrupted: sd-scripts cannot stop gracefully, so it was terminated; the "
                                           "files it saved are kept")
    flush()
    if code == 0:
        state_written()
        samples_drawn()
    if code != 0 and not stopped:  # a stop the user asked for ends like our own trainer's stop: with "end"
        raise UserError(crash_message(error, logged_error, code, log_path, options, python))
    if code == 0 and not stopped and not last_step and logged_error:  # it returns after "No data found", unsaid
        raise UserError(f"sd-scripts ended without training a step; it logged: {logged_error} (see {log_path})")
    if epochs_done < epoch_now and not stopped:  # the last epoch has no "epoch N+1" line after it
        events.emit("epoch", epoch=epoch_now, epochs=epochs, step=last_step,
                    **({"average": last_average} if last_average is not None else {}))
    stop = {"stopped": True, "message": stopped_message(last_state)} if stopped else {}
    events.emit("end", files=files, steps=last_step, seconds=round(time.time() - started, 2), backend="sd-scripts", **stop)
    return code
