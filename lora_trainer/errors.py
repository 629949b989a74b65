"""User-facing errors: one clear sentence naming the file, field or token, and what to do."""


class UserError(Exception):
    """An error caused by user input; the CLI prints its message without a traceback."""
