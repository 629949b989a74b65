"""The trainer's one event channel: JSON lines (start, step, epoch, sample, saved, warning, error, end …).

The trainer subprocess appends events to a file (and optionally stdout); the CLI, the UI and the API all read
the same lines. Each line is one complete JSON object written with a single write and flushed, so a reader
that meets a half-written last line simply waits for the rest.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from ..console import is_terminal
from ..errors import UserError

KINDS = ("start", "step", "epoch", "validation", "sample", "saved", "state", "warning", "error", "end")


def console_line(event: dict) -> str | None:
    """What a person at a terminal reads of an event, as sd-scripts' console tells it (the progress bar shows the
    steps; an error is printed by the command itself)."""
    kind = event["event"]
    if kind == "warning":
        return f"warning: {event['message']}"
    if kind == "start" and event.get("validation_images") is not None:
        return (f"validation: {event['validation_images']} image(s) held out, {event['images']} training images "
                "(with repeats)")
    if kind == "saved":
        return f"saved {event['path']}"
    if kind == "state" and event.get("action") == "saved":
        if event.get("stopped"):
            return f"stopped at step {event['step']}; to go on, run the same command with --resume \"{event['path']}\""
        return f"saved state {event['path']}"
    if kind == "sample":
        return f"sample {event['path']}"
    if kind == "validation" and event.get("loss") is not None:
        when = f"epoch {event['epoch']}" if event.get("epoch") is not None else f"step {event.get('step')}"
        return f"{when}: validation loss {event['loss']:.5f}"
    if kind == "end":
        lines = [f"recommended epoch: {event['recommended_epoch']} ({event['reason']})"] \
            if event.get("recommended_epoch") is not None else []
        if event.get("highest_loss_images"):
            lines.append(outliers_sentence(event["highest_loss_images"]))
        return "\n".join(lines) or None
    return None


def outliers_sentence(images: list) -> str:
    """The images the run learnt least well, with what to do about them."""
    named = ", ".join(f"{Path(path).name} ({loss:.4f})" for path, loss in images)
    return (f"images with a clearly higher training loss than the others: {named} — check their crop and caption "
            "(an odd one out, a wrong tag, a mostly cut-off subject)")


class OffTerminalProgress:
    """What the progress bar tells, for a console that is not a terminal (``nohup … > log``, a notebook's ``!python``,
    the job's trainer.log), where the bar is off: the first step, a line at most every ``every`` seconds, each epoch's
    end — a long run must not look hung."""

    def __init__(self, every: float = 60.0):
        self.every = every
        self._first: tuple[float, int] | None = None  # (time, step) of the first step seen
        self._said = 0.0

    def line(self, event: dict) -> str | None:
        kind, now = event["event"], event["time"]
        if kind == "epoch":  # sd-scripts' events (the backend) carry fewer fields
            words = f"epoch {event.get('epoch', '?')} done"
            words += f" at step {event['step']}" if event.get("step") is not None else ""
            return words + (f": average loss {event['average']:.5f}" if event.get("average") is not None else "")
        if kind != "step" or event.get("total") is None:
            return None
        if event.get("phase"):  # work before training (caching latents): its count, not a training step
            if now - self._said < self.every and event.get("done") != event["total"]:
                return None
            self._said = now
            return f"{event['phase']}: {event.get('done', '?')}/{event['total']}"
        step, total = event["step"], event["total"]
        if self._first is None:
            self._first = (now, step)
        elif now - self._said < self.every and step != total:
            return None
        self._said = now
        figures = [f"{name} {event[name]:.5f}" for name in ("loss", "average") if event.get(name) is not None]
        words = f"step {step}/{total}" + (f" (epoch {event['epoch']})" if event.get("epoch") else "")
        words += f": {', '.join(figures)}" if figures else ""
        began, first = self._first
        if step > first and step < total:
            left = (now - began) / (step - first) * (total - step)
            words += f", about {format_seconds(left)} left"
        return words


def format_seconds(seconds: float) -> str:
    """``1:02:03`` or ``2:03``, as tqdm writes a time."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def json_line(event: dict) -> str:
    """One JSON line, UTF-8 writable whatever the text holds: a file name that is not UTF-8 (GBK bytes from a zip
    unpacked on Linux) reaches Python as lone surrogates, which UTF-8 cannot encode; written as ``\\udcXX``, the JSON
    escape of the same character, so a reader gets the name back as Python gave it."""
    return writable(json.dumps(event, ensure_ascii=False, default=str) + "\n")


def writable(text: str) -> str:
    """``text`` with lone surrogates as ``\\udcXX`` (what Python's own stderr writes for them), so any UTF-8 stream
    takes it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class EventLog:
    """Events appended to ``path``; also written as JSON lines to ``echo`` (``--events_file -``: stdout) and, as
    ``console_line`` words them, to ``console`` (the CLI's stderr, above its progress bar)."""

    def __init__(self, path: str | Path | None, echo: TextIO | None = None, console: TextIO | None = None):
        self.path = Path(path) if path else None
        self.echo = echo
        self.console = console
        self._file = None
        self._torn = False  # a write failed part-way: the next line starts on a line of its own
        self.ended = False  # the end event was written: the run's outcome is told
        self._progress = None if console is None or is_terminal(console) else OffTerminalProgress()
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "ab", buffering=0)  # each line reaches the file whole, or is said torn
                self._torn = _ends_torn(self.path)  # a writer before this one (a trainer killed mid-line)
            except OSError as error:
                raise UserError(f"the event log {self.path} is not writable ({error}); pick another --output_dir "
                                "or --events_file") from None

    def emit(self, kind: str, **fields: Any) -> dict:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = {"event": kind, "time": round(time.time(), 3), **fields}
        self.ended = self.ended or kind == "end"
        line = json_line(event)
        if self._file is not None:
            self._write_file(line)
        if self.echo is not None:
            try:
                self.echo.write(line)
                self.echo.flush()
            except (BrokenPipeError, ValueError):  # the reader of --events_file - went away: train on, unwatched
                self._stop_echo()
        words = console_line(event) or (self._progress.line(event) if self._progress else None)
        if self.console is not None and words is not None:
            from tqdm import tqdm

            try:  # the bar is cleared and drawn again below the line
                tqdm.write(writable(words), file=self.console)
            except OSError:  # the job's trainer.log on a full disk: the event file says it, or says it later
                pass
        return event

    def _write_file(self, line: str) -> None:
        """A full disk (another program filled it) must not end the run unsaved, or stop a server from starting: the
        failure is said once, and later events are written again once there is room."""
        data = (b"\n" if self._torn else b"") + line.encode("utf-8")
        try:
            while data:
                data = data[self._file.write(data):]
        except OSError as error:
            if not self._torn:
                try:
                    (self.console or sys.stderr).write(f"warning: the event log {self.path} could not be written "
                                                       f"({error.strerror or error}); the run goes on, and its events "
                                                       "are written there again once they can be\n")
                except OSError:  # stderr on the same full disk (the job's trainer.log)
                    pass
            self._torn = True
        else:
            self._torn = False

    def _stop_echo(self) -> None:
        echo, self.echo = self.echo, None
        try:  # whatever is left in its buffer would fail again when Python flushes it at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), echo.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        if self.console is not None:
            self.console.write("warning: the reader of the event stream went away; training goes on\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ends_torn(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if not handle.tell():
            return False
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


def read_events(path: str | Path, start: int = 0) -> tuple[list[dict], int]:
    """Complete events from byte offset ``start``, and the offset to continue from (a partial line is left)."""
    path = Path(path)
    if not path.exists():
        return [], start
    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read()
    events = []
    consumed = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        consumed += len(line)
        try:
            if line.strip():
                events.append(json.loads(line))
        except ValueError:  # a line torn by a full disk (the writer starts the next one afresh)
            continue
    return events, start + consumed


def follow(path: str | Path, poll: float = 0.5, until: tuple[str, ...] = ("end", "error")) -> Iterator[dict]:
    """Yield events as they are written, stopping after an event whose kind is in ``until`` (a run that fails ends
    with ``error``, without an ``end``)."""
    offset = 0
    while True:
        events, offset = read_events(path, offset)
        for event in events:
            yield event
            if event["event"] in until:
                return
        time.sleep(poll)

