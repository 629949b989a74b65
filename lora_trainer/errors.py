"""User-facing errors: one clear sentence naming the file, field or token, and what to do."""

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """An error caused by user input; the CLI prints its message without a traceback. ``field`` names the option or
    form field it is about, when there is one, so the API and the UI can point at it."""

    def __init__(self, message: str = "", field: str | None = None):
        super().__init__(message)
        self.field = field


def with_closest(names: Iterable[str], known: Iterable[str], prefix: str = "") -> str:
    """Unknown ``names`` for a message, each with the closest ``known`` one: "learning_rat (did you mean
    learning_rate?), foo"; ``prefix`` ("--") is put before the suggestion as the user would type it."""
    known = list(known)
    hints = []
    for name in names:
        match = difflib.get_close_matches(name.lstrip("-"), known, 1)
        hints.append(f"{name} (did you mean {prefix}{match[0]}?)" if match else name)
    return ", ".join(hints)
