"""Every path that comes from a request or a form is checked here: resolved (symlinks and ``..`` followed) and
required to lie below one of the configured roots. Names for new files are checked to be plain names."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..safe_io import is_plain_name


class PathNotAllowed(UserError):
    def __init__(self, message: str, field: str):
        super().__init__(message, field)


def unquoted(value: str) -> str:
    """A pasted path without its surrounding spaces and quotes (Windows Explorer's "Copy as path" quotes it)."""
    value = value.strip()
    if len(value) > 1 and value[0] == value[-1] == '"':
        value = value[1:-1].strip()
    return value


def allowed_path(value: str | Path, roots: list[Path], field: str, must_exist: bool = True) -> Path:
    """``value`` resolved, if it is inside one of ``roots``; otherwise a message that names the field and the roots."""
    value = unquoted(str(value))
    if not value:
        raise PathNotAllowed(f"{field}: no path given", field)
    path = Path(value).expanduser()
    resolved = path.resolve()  # symlinks and .. followed as far as the path exists
    if not any(resolved.is_relative_to(Path(root).resolve()) for root in roots):
        # said before existence, so a request cannot probe which files exist outside the roots
        shown = ", ".join(str(r) for r in roots) or "(none configured)"
        raise PathNotAllowed(f"{field}: {value} is outside the allowed folders ({shown}); allow its folder (in the "
                             "WebUI: Settings → LoRA Trainer; the standalone app: --dataset-root or --checkpoint-dir)", field)
    if must_exist and not resolved.exists():
        raise PathNotAllowed(f"{field}: {value} does not exist", field)
    return resolved


def plain_name(name: str, field: str = "name") -> str:
    """A file or job name that is safe on Windows and Linux: no separators, no ``..``, no reserved device names."""
    name = (name or "").strip()
    if not name:
        raise PathNotAllowed(f"{field}: empty; type a name (letters, digits, spaces, - and _)", field)
    if not is_plain_name(name):
        raise PathNotAllowed(f"{field}: {name!r} is not a plain file name; use letters, digits, spaces, - and _", field)
    return name
