"""Progress a person at a terminal sees (tqdm); none off a terminal, where the UI and the API follow events or logs."""

from __future__ import annotations

import codecs
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable


def utf8_when_redirected() -> None:
    """Output sent to a file or a pipe in UTF-8: on Windows it would be in the ANSI code page (cp1252), which cannot
    write a Chinese file name — ``dataset check D:\\训练集 > report.txt`` died with a UnicodeEncodeError, and
    ``--events_file -`` stopped echoing after its first event. A console shows Unicode whatever its code page."""
    for stream in (sys.stdout, sys.stderr):
        try:
            encoding = getattr(stream, "encoding", None)
            if encoding and not stream.isatty() and codecs.lookup(encoding).name != "utf-8":
                stream.reconfigure(encoding="utf-8")
        except (AttributeError, LookupError, OSError, ValueError):  # a host's own stream (a StringIO has no encoding)
            pass


def is_terminal(stream) -> bool:
    """Whether ``stream`` is a console a person watches (a bar redrawn in place), not a file, a pipe or a log."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a host's own stream, or a closed one
        return False


def progress_bar(total: int, unit: str, description: str | None = None, initial: int = 0, leave: bool = True):
    """A tqdm bar on stderr at a terminal, a disabled one elsewhere (a log must not hold a bar redrawn a thousand
    times); ``leave=False`` for a phase that gives way to the next bar."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc=description, disable=not total or not is_terminal(sys.stderr),
                dynamic_ncols=True, leave=leave)


@contextmanager
def progress_callback(unit: str, description: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback, as the tools' long loops take one, drawn as a bar that goes when done."""
    bars = []

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(progress_bar(total, unit, description, leave=False))
        bars[0].update(done - bars[0].n)

    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()
