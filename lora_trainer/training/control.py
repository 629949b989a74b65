"""The control file (``--stop_file``): one command a line, added by the job runner (or written by hand), read once
a step by the trainer and by the sd-scripts backend. Pure: text in, command out."""

from __future__ import annotations

WORDS = ("stop", "pause", "save", "sample")


def control_command(text: str) -> tuple[str | None, list[str]]:
    """The command the file's words ask for, and the words that are none. ``stop`` for stop or pause or an empty
    file (a stop saves too, so it takes the others' place); else ``save``, ``sample`` or ``save+sample`` (both asked
    within one step); None when only unknown words are there."""
    words = text.lower().split()
    unknown = [word for word in words if word not in WORDS]
    if not words or {"stop", "pause"} & set(words):
        return "stop", unknown
    return "+".join(word for word in ("save", "sample") if word in words) or None, unknown
