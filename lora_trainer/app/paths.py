"""Every path that comes from a request or a form is checked here: resolved (symlinks and ``..`` followed) and
required to lie below one of the configured roots. Names for new files are checked to be plain names."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..safe_io import is_plain_name, resolves_below


class PathNotAllowed(UserError):
    def __init__(self, message: str, field: str):
        super().__init__(message, field)


class MissingPath(UserError):
    """An allowed path that does not exist (the API's 400 ``not_found``)."""


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
    if "\x00" in value:  # the file system's calls stop on it with a ValueError
        raise UserError(f"{field}: a path cannot hold a NUL character; give the path as the file manager shows it",
                        field)
    path = Path(value).expanduser()
    resolved = path.resolve()  # symlinks and .. followed as far as the path exists
    if not resolves_below(resolved, roots):
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


def check_dataset_config_paths(path: Path, roots: list[Path], options: dict, field: str = "dataset_config") -> None:
    """The folders and files a ``--dataset_config`` names are a request's or a form's paths too: absolute (a relative
    one would resolve against the server's working folder), existing, below the roots."""
    from ..dataset.config import load_dataset_config

    for dataset in load_dataset_config(path, options, support_controlnet=bool(options.get("masked_loss"))).datasets:
        for subset in dataset.subsets:
            for folder in (subset.image_dir, subset.metadata_file, subset.conditioning_data_dir):
                if folder is None:
                    continue
                if not Path(folder).is_absolute():
                    raise UserError(f"{field}: {folder} in {Path(path).name} is relative; give absolute paths in a "
                                    "dataset config used here", field)
                if not allowed_path(str(folder), roots, field, must_exist=False).exists():
                    raise MissingPath(f"{field}: {folder} in {Path(path).name} does not exist", field)
            if subset.metadata_file is not None:
                check_metadata_images(subset.metadata_file, subset.image_dir, roots, field)


def check_metadata_images(metadata_file: Path, image_dir: Path | None, roots: list[Path], field: str) -> None:
    """A fine-tuning metadata file may name images by absolute path: those are paths to check too."""
    from ..dataset.layouts import metadata_image_paths

    for image in metadata_image_paths(metadata_file, image_dir):
        allowed_path(str(image), roots, field, must_exist=False)
