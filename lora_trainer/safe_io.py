"""Writing files so that a crash never leaves a truncated one behind: write a temporary file, then rename."""

from __future__ import annotations

import json
import os
import re
import stat
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from .errors import UserError

if TYPE_CHECKING:  # the dataset tools write files without needing torch loaded
    import torch


# what np.load raises for a cache another tool left half-written or in another layout: read as "no cache"
UNREADABLE_NPZ = (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile)

# device names, whatever the extension and with spaces before it ("NUL .safetensors"); the superscript digits too
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                     *(f"{port}{digit}" for port in ("COM", "LPT") for digit in "123456789¹²³")}


def is_plain_name(name: str) -> bool:
    """A file name that works on Windows and Linux alike: no separators, no ``..``, none of ``<>:"|?*``, no reserved
    device name (CON, NUL, COM1 …), no trailing space or dot, no leading dot (a hidden file that file lists skip)."""
    return bool(name) and not ("/" in name or "\\" in name or ".." in name or name.startswith(".")) and windows_can_make(name)


def windows_can_make(relative: str) -> bool:
    """Whether Windows can make the relative path ``relative`` (folders between ``/`` or ``\\``): none of ``<>:"|?*``
    or control characters, no reserved device name, no part ending in a space or dot (``.`` and ``..`` apart)."""
    return not re.search(r'[<>:"|?*\x00-\x1f]', relative) and not any(
        part.split(".")[0].rstrip(" ").upper() in _WINDOWS_RESERVED or part.endswith((" ", ".")) and part not in (".", "..")
        for part in re.split(r"[\\/]", relative))


def resolves_below(path: str | Path, folders: Iterable[str | Path]) -> bool:
    """Whether ``path``, its links and ``..`` followed as far as it exists, lies below one of ``folders`` (resolved
    too): the one check of the allowed folders, for a path a request names and a link a dataset holds alike."""
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(Path(folder).resolve()) for folder in folders)


# On Windows a file that another program has open cannot be replaced: an antivirus scan or the search indexer opens
# every new file for a moment, so a rename can fail once or twice where it would succeed a moment later.
REPLACE_RETRY_SECONDS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6) if os.name == "nt" else ()


# A folder is refused while any file in it is open: an antivirus scan of a freshly written multi-GB optimizer state
# can take much longer than a caption's
FOLDER_RETRY_SECONDS = REPLACE_RETRY_SECONDS + ((2.0, 4.0, 8.0, 12.0) if os.name == "nt" else ())


def replace_path(source: str | Path, target: str | Path, waits: tuple[float, ...] | None = None) -> None:
    """``os.replace``, tried again for a few seconds (``waits``) where Windows refuses it while another program has a
    file open."""
    for wait in REPLACE_RETRY_SECONDS if waits is None else waits:
        try:
            return os.replace(source, target)
        except PermissionError:
            time.sleep(wait)
    os.replace(source, target)


NAME_BYTES = 255  # the longest file name most file systems take (ext4, APFS; NTFS 255 UTF-16 units)


def temporary_beside(target: Path, tag: str = "12345678") -> Path:
    """The hidden name a file is written under before it is renamed onto ``target`` (``tag``: 8 random hex digits).
    ``target``'s name is cut to keep it within the 255 bytes a file name may have: a name the user could give the file
    itself (80 CJK characters are 240 bytes) must not fail for the temporary's few extra characters."""
    shortened, limit = target.name, NAME_BYTES - len(f"..{tag}.tmp")
    while len(shortened.encode("utf-8", "surrogateescape")) > limit:  # whole characters; a name that is not UTF-8
        shortened = shortened[:-1]  # (GBK bytes unpacked on Linux) counts its own bytes
    return target.with_name(f".{shortened}.{tag}.tmp")


STALE_AFTER_SECONDS = 60.0  # a write in progress touches its temporary continually; one a minute older was abandoned


def beginnings(text: str) -> str:
    """A regular expression for every beginning of ``text`` ("" too): what is left of it where a name was cut."""
    return "|".join(re.escape(text[:end]) for end in range(len(text) + 1))


def stale_temporaries(folder: Path, targets: re.Pattern, now: float | None = None,
                      cut_targets: re.Pattern | None = None) -> list[Path]:
    """The temporaries in ``folder`` (``temporary_beside``) for a file name ``targets`` matches in full, that nothing has
    written for ``STALE_AFTER_SECONDS``: left by a process killed mid-write (SIGKILL, a power cut), never renamed. A
    run started twice by mistake keeps its twin's live one. A temporary whose name was cut to fit (a long CJK name)
    holds only a beginning of its target's: ``cut_targets`` matches those beginnings."""
    now = time.time() if now is None else now
    stale = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:  # no such folder (yet): nothing was left there
        return []
    for entry in entries:
        name = re.fullmatch(r"\.(.+)\.[0-9a-f]{8}\.tmp", entry.name)
        ours = name and (targets.fullmatch(name[1]) or cut_targets is not None and _was_cut(entry.name)
                         and cut_targets.fullmatch(name[1]))
        try:
            if ours and now - entry.stat().st_mtime > STALE_AFTER_SECONDS and entry.is_file():
                stale.append(entry)
        except OSError:  # removed meanwhile
            continue
    return sorted(stale)


def _was_cut(temporary: str) -> bool:
    """Whether ``temporary_beside`` may have cut this name: it is within one character's bytes (4) of the limit."""
    return len(temporary.encode("utf-8", "surrogateescape")) > NAME_BYTES - 4


def remove_files(paths: list[Path]) -> int:
    """Remove them (any already gone: another process cleaning too); returns the bytes freed."""
    freed = 0
    for path in paths:
        try:
            size = path.stat().st_size
            path.unlink()
            freed += size
        except OSError:
            continue
    return freed


def check_writable(folder: Path, what: str, option: str) -> None:
    """``folder`` exists (made if need be) and takes a new file, else one UserError naming ``option`` to change."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"  # one per process: torchrun's ranks probe at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"{what} {folder} is not writable ({error}); pick another {option}") from error


WINDOWS_LONGEST_FILE_PATH = 259  # MAX_PATH, less its terminating NUL
WINDOWS_LONGEST_FOLDER_PATH = 247  # a folder leaves room for an 8.3 file name in it (MAX_PATH - 12, NUL included)
ENABLE_LONG_PATHS = ("enable long paths (Group Policy \"Enable Win32 long paths\", or LongPathsEnabled = 1 in "
                     "HKLM\\SYSTEM\\CurrentControlSet\\Control\\FileSystem) and restart")


def windows_path_limits() -> tuple[int, int] | None:
    """The longest file and folder paths this process may use, where Windows limits them: (259, 247) unless long paths
    are enabled (Windows 10 1607+, ``LongPathsEnabled``; Python itself is long-path aware); ``None`` elsewhere."""
    if os.name != "nt":
        return None
    import winreg

    try:
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            if winreg.QueryValueEx(key, "LongPathsEnabled")[0] == 1:
                return None
    except OSError:  # no such value: the old limit
        pass
    return WINDOWS_LONGEST_FILE_PATH, WINDOWS_LONGEST_FOLDER_PATH


def windows_path_length(path: str | Path) -> int:
    """Length of the absolute path as Windows counts it (UTF-16 units: a CJK character is one, an emoji two)."""
    return len(os.path.abspath(path).encode("utf-16-le")) // 2


def open_temporary_beside(target: Path) -> tuple[int, Path, int]:
    """Create a new hidden file in ``target``'s folder, open for writing (binary), to be renamed onto ``target``.
    Also returns the permissions to give it once written (``give_permissions``): those of the file it replaces, else
    what the user's umask gives a new file, as an editor's save would. (``tempfile.mkstemp`` makes files only their
    owner can read: a LoRA saved that way is unreadable by a WebUI running as another user, and an edited caption
    would change its mode.)"""
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = temporary_beside(target, os.urandom(4).hex())
        try:
            handle = os.open(temporary, flags, 0o666)  # the umask applies, as to any new file
            break
        except FileExistsError:
            continue
    try:
        permissions = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        permissions = stat.S_IMODE(os.fstat(handle).st_mode)
    except BaseException:
        os.close(handle)
        temporary.unlink()
        raise
    return handle, temporary, permissions


def give_permissions(written: Path, permissions: int) -> None:
    """Set them only once the file is written: a read-only file's replacement must stay writable until then."""
    if os.name != "nt":  # Windows has no modes to keep, only a read-only flag
        os.chmod(written, permissions)


class HeldFile(UserError):
    """The target exists and cannot be replaced: another program has it open (Windows refuses to replace a file that
    is open or memory-mapped, e.g. a LoRA the WebUI or ComfyUI loaded) or its folder is read-only."""


@contextmanager
def atomic_path(target: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one step, on error it vanishes.
    ``durable=False`` skips the flush to disk: for caches, which can be made again, written by the thousand."""
    target = Path(target)
    handle, temporary, permissions = open_temporary_beside(target)
    os.close(handle)
    try:
        yield temporary
        give_permissions(temporary, permissions)  # also where the writer made it anew (safetensors 0.8: owner-only)
        if durable:
            with open(temporary, "rb+") as written:  # on disk before the rename, so a power cut cannot leave it empty
                os.fsync(written.fileno())
        try:
            replace_path(temporary, target)
        except PermissionError as error:
            raise HeldFile(f"{target} could not be replaced ({error.strerror}): another program has it open, or the "
                            "folder is read-only; close that program (or choose another output folder) and save again. "
                            "The previous file is unchanged.") from error
    finally:
        temporary.unlink(missing_ok=True)


def save_safetensors(tensors: dict[str, torch.Tensor], target: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save tensors (contiguous, on CPU) with string metadata, atomically."""
    from safetensors.torch import save_file

    prepared = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    with atomic_path(target) as temporary:
        save_file(prepared, str(temporary), metadata=metadata or {})
    return Path(target)


def save_npz(target: str | Path, arrays: dict) -> Path:
    """A cache of numpy arrays (sd-scripts' .npz layout), renamed into place without the flush to disk."""
    import numpy as np

    with atomic_path(target, durable=False) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, **arrays)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(target)


def read_utf8(path: str | Path, what: str) -> str:
    """A text file people edit by hand (configs, prompts, metadata): UTF-8 with or without BOM, else one clear error."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8; re-save it as UTF-8 (in Notepad: Save as → Encoding: UTF-8).") from None


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's header metadata; {} for .pt/.ckpt (pickles are not opened just to list them) and for
    unreadable files (they still show up, by file name)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > 100 * 1024 * 1024:
                return {}
            header = json.loads(handle.read(length).decode("utf-8"))
        metadata = header.get("__metadata__") or {}
        return {str(k): str(v) for k, v in metadata.items()}
    except (OSError, ValueError, AttributeError):
        return {}
