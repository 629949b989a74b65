"""The control file (``--stop_file``): one command a line, added by the job runner (or written by hand), read once
a step by the trainer and by the sd-scripts backend. Pure: bytes or text in, command out."""

from __future__ import annotations

import codecs

WORDS = ("stop", "pause", "save", "sample")


def control_text(data: bytes) -> str:
    """The file's words however a Windows shell wrote them: PowerShell 5's ``echo stop > file`` writes UTF-16 with a
    BOM, Notepad may add a UTF-8 BOM. Bytes that are no text at all read as a stop (someone meant to control the run,
    and a stop saves before it ends)."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        return data.decode(encoding).replace("\x00", "")
    except UnicodeDecodeError:
        return "stop"


def control_command(text: str) -> tuple[str | None, list[str]]:
    """The command the file's words ask for, and the words that are none. ``stop`` for stop or pause or an empty
    file (a stop saves too, so it takes a save's place), ``sample+stop`` where a sample was asked too ("Sample now"
    then "Pause" within one step: the samples are drawn, then the run stops); else ``save``, ``sample`` or
    ``save+sample`` (both asked within one step); None when only unknown words are there. The parts are done in the
    order they are named (``asks_to_stop`` tells a stop)."""
    words = text.lower().split()
    unknown = [word for word in words if word not in WORDS]
    if not words or {"stop", "pause"} & set(words):
        return ("sample+stop" if "sample" in words else "stop"), unknown
    return "+".join(word for word in ("save", "sample") if word in words) or None, unknown


def asks_to_stop(command: str | None) -> bool:
    """Whether ``control_command``'s command ends the run (``stop``, ``sample+stop``)."""
    return "stop" in (command or "").split("+")


CLOCK_SLACK_SECONDS = 2.0  # FAT keeps file times to 2 s: a word of this run may read up to that much older than its start


def written_before(modified: float, started: float) -> bool:
    """Whether a control file last written at ``modified`` is a leftover of an earlier run (a pause pressed twice, a
    stop as the last run ended): obeyed, it would stop this run at its first step."""
    return modified < started - CLOCK_SLACK_SECONDS


def leftover_warning(stop_file, text: str) -> str:
    return f"{stop_file} held {text.replace(chr(10), ', ') or 'stop'!r} from before this run started: removed, not obeyed"
