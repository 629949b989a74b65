"""Caption files on disk: reading them the way sd-scripts does (but telling the user when it would fail), and
writing many of them safely — all-or-nothing, after a backup, never over someone else's newer edit.

Reading. sd-scripts (``library/train_util.py``, ``read_caption`` inside ``DreamBoothDataset``) opens a caption with
``encoding="utf-8"``, reads its lines and keeps only the first one, stripped (all non-empty stripped lines joined by
``"\\n"`` when ``enable_wildcard`` is on); a non-UTF-8 file crashes training with ``UnicodeDecodeError``, and a UTF-8
BOM survives as ``"\\ufeff"`` glued to the first tag. We keep the same line rule (``training_caption``) but decode
more kindly: UTF-8, UTF-8 with BOM and UTF-16 with BOM are read (the BOM dropped), Windows and old-Mac line ends
become ``"\\n"``, and anything else — a GBK file saved by a Chinese Notepad, for instance — is a ``UserError`` naming
the file and telling the user to re-save it as UTF-8, unless the caller names the encoding. We always write UTF-8
without a BOM, which is what sd-scripts reads correctly.

Writing. ``write_captions`` first checks that no file changed on disk since it was read (by content, through the
``CaptionStamp`` taken when reading; a file that was merely touched is not a conflict), writes every new text into a
temporary file beside its target and fsyncs it, keeps every previous version in a new timestamped backup folder (a
hard link where the file system allows, else a copy), and only when all of that succeeded renames the temporary files
over the targets. A failure before the renames leaves every caption as it was. Each backup folder is named by its
save's time and holds a manifest of where its files go back: ``restorable_backups`` lists a folder's, newest first
(``backup_summaries`` with what each holds, for a list to pick from), and ``restore_backup`` puts one back.

Not ``safe_io.atomic_path``: it fsyncs and renames one file at a time, and one fsync costs ~4 ms on an ordinary disk,
so 1,000 captions would take 4 s; here the writes, syncs and renames of a batch run side by side.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Mapping

from lora_trainer.errors import UserError
from lora_trainer.safe_io import give_permissions, open_temporary_beside, replace_path, resolves_below, write_text

CAPTION_WRITE_ENCODING = "utf-8"
_ON_WINDOWS = os.name == "nt"
BACKUP_MANIFEST = "backup.json"  # in each backup folder: where its files go back, and the captions its save created
UNFINISHED_BACKUP = ".unfinished"  # in a backup folder from its making until its manifest is written
_NOT_CAPTIONS = frozenset(("thumbs.db", "desktop.ini"))  # what Windows' Explorer leaves in a folder (macOS': hidden)
BACKUP_TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"  # a backup folder's name: the time of the save that made it

# fsync costs ~4 ms a file on an ordinary disk, so 1,000 captions take 4 s one after another; run side by side, the
# file system folds them into a few journal commits (0.13 s measured for 1,000 files on a 2-core machine).
_PARALLEL_SYNCS = 16


@dataclass(frozen=True)
class CaptionStamp:
    """What a caption file looked like when it was read; ``exists=False`` stands for "there was no file"."""

    exists: bool
    size: int = 0
    mtime_ns: int = 0
    digest: bytes = b""

    def same_content(self, other: CaptionStamp) -> bool:
        return self.exists == other.exists and self.digest == other.digest


NO_FILE = CaptionStamp(exists=False)


@dataclass(frozen=True)
class CaptionFile:
    """A caption file's whole text (BOM dropped, line ends as ``"\\n"``) and the stamp to write it back safely."""

    path: Path
    text: str
    stamp: CaptionStamp
    sd_scripts_misreading: str | None = None  # ``sd_scripts_misreading`` of its bytes


@dataclass(frozen=True)
class CaptionWriteResult:
    """The stamps of the files as written (to write them again later) and the backup folder, if one was made."""

    written: Mapping[Path, CaptionStamp]
    backup_folder: Path | None
    not_removed: tuple[Path, ...] = ()  # files to delete that could not be (a restore's)


def caption_path_for(image: Path, extension: str = ".txt") -> Path:
    """``photo.png`` → ``photo.txt``; like sd-scripts, a caption extension given without its dot gets one."""
    if not extension.startswith("."):
        extension = "." + extension
    return image.with_name(image.stem + extension)


# extensions of image files, sd-scripts' and others': never a caption's (saving would write text into an image)
_IMAGE_LIKE = frozenset((".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".avif", ".jxl", ".tif", ".tiff"))


def checked_caption_extension(extension: str, name: str = "caption extension") -> str:
    """``extension`` with its dot, or why no caption can have it: an image's extension (the tag editor would write
    text into the images sharing a stem, the trainer read an image as a caption) or not an extension at all."""
    extension = extension if extension.startswith(".") else "." + extension
    if extension.lower() in _IMAGE_LIKE:
        raise UserError(f"{name} {extension!r} is an image extension: give the captions' own, such as .txt or .caption")
    if extension == "." or any(mark in extension for mark in ("/", "\\", ":")) or extension.strip() != extension:
        raise UserError(f"{name} {extension!r} is not a file extension: give one such as .txt or .caption")
    return extension


def _stamp(data: bytes, stat: os.stat_result) -> CaptionStamp:
    return CaptionStamp(True, len(data), stat.st_mtime_ns, hashlib.blake2b(data, digest_size=16).digest())


def _read_bytes(path: Path) -> tuple[bytes, CaptionStamp]:
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            data = handle.read()
    except FileNotFoundError:
        return b"", NO_FILE
    except OSError as error:  # no read permission, a file locked by another program, a folder named like a caption
        raise CaptionUnreadable(f"{path}: cannot be read ({error.strerror or error}); give your account read access "
                                "to it, or move it away") from None
    return data, _stamp(data, stat)


class CaptionUnreadable(UserError):
    """The caption file exists and the system would not let it be read."""


def _normalise_line_ends(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def sd_scripts_misreading(data: bytes) -> str | None:
    """How sd-scripts (``open(..., encoding="utf-8")``) misreads a caption this module reads kindly, or None."""
    if data.startswith(codecs.BOM_UTF8):
        return ("starts with a UTF-8 byte-order mark, which sd-scripts keeps glued to the first tag ('\\ufeff' + tag "
                "matches no prompt: a trigger word there is lost)")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "is UTF-16, which stops sd-scripts with a UnicodeDecodeError"
    return None


def decode_caption(data: bytes, path: Path, encoding: str | None = None) -> str:
    """Decode a caption file's bytes: UTF-8 (with or without BOM) or UTF-16 with BOM, unless ``encoding`` is given."""
    if encoding is not None:
        try:
            return _normalise_line_ends(data.decode(encoding).lstrip("\ufeff"))
        except (UnicodeDecodeError, LookupError) as error:
            raise UserError(f"Caption file {path} cannot be read as {encoding} ({error}); re-save it as UTF-8.") from None
    if data.startswith(codecs.BOM_UTF8):
        data, encoding = data[len(codecs.BOM_UTF8):], "utf-8"
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"  # the codec reads the BOM to pick the byte order, then drops it
    else:
        encoding = "utf-8"
    try:
        return _normalise_line_ends(data.decode(encoding))
    except UnicodeDecodeError as error:
        raise UserError(
            f"Caption file {path} is not UTF-8 (byte 0x{data[error.start]:02x} at position {error.start}; GBK, Shift-JIS "
            "or another local encoding?): re-save it as UTF-8 (in Notepad: Save as → Encoding: UTF-8)."
        ) from None


def load_caption_file(path: Path, encoding: str | None = None) -> CaptionFile:
    """Read a caption file whole; a missing file reads as empty text with the ``NO_FILE`` stamp."""
    path = path if isinstance(path, Path) else Path(path)  # Path(path) parses again: 10,000 captions in an open
    data, stamp = _read_bytes(path)
    return CaptionFile(path, decode_caption(data, path, encoding) if stamp.exists else "", stamp,
                       sd_scripts_misreading(data) if stamp.exists else None)


@dataclass(frozen=True)
class ImageCaptions:
    """The caption files of some images, read whole: text per image, stamp per caption file, and the images whose
    caption could not be read (with the reason), which callers leave alone."""

    texts: dict[Path, str]
    stamps: dict[Path, CaptionStamp]
    unreadable: dict[Path, str]


def read_image_captions(images: list[Path], caption_extension: str) -> ImageCaptions:
    texts, stamps, unreadable = {}, {}, {}
    for image in images:
        path = caption_path_for(image, caption_extension)
        try:
            caption_file = load_caption_file(path)
        except UserError as error:
            unreadable[image] = str(error)
            continue
        texts[image], stamps[path] = caption_file.text, caption_file.stamp
    return ImageCaptions(texts, stamps, unreadable)


def training_caption(text: str, enable_wildcard: bool = False) -> str:
    """The caption sd-scripts trains on: the first line, stripped; with wildcards, every non-empty line, stripped."""
    lines = text.split("\n")
    if enable_wildcard:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip()


def read_caption(path: Path, encoding: str | None = None, enable_wildcard: bool = False) -> str:
    """The caption sd-scripts would train on for this file (see ``training_caption``); "" for an empty file."""
    caption_file = load_caption_file(path, encoding)
    if not caption_file.stamp.exists:
        raise UserError(f"Caption file {path} does not exist.")
    return training_caption(caption_file.text, enable_wildcard)


def _backup_folder(backup_dir: Path) -> Path:
    base = Path(backup_dir) / time.strftime(BACKUP_TIME_FORMAT)
    folder, attempt = base, 1
    while True:
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:  # two saves within one second get folders of their own
            attempt += 1
            folder = base.with_name(f"{base.name}_{attempt}")


def _common_root(paths: list[Path]) -> Path | None:
    try:
        return Path(os.path.commonpath([str(path.parent) for path in paths]))
    except ValueError:  # different drives on Windows
        return None


def _backup_name(path: Path, root: Path | None) -> Path:
    if root is not None:
        return path.relative_to(root)
    return Path(*path.parts[1:]) if path.is_absolute() else path


def _write_synced(target: Path, data: bytes) -> Path:
    handle, temporary, permissions = open_temporary_beside(target)
    try:
        with os.fdopen(handle, "wb") as written:
            written.write(data)
            written.flush()
            os.fsync(written.fileno())
        give_permissions(temporary, permissions)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def find_changed_on_disk(expected: Mapping[Path, CaptionStamp]) -> list[Path]:
    """The files whose content on disk is no longer what their stamp says (created, deleted or edited since)."""
    changed = []
    for path, stamp in expected.items():
        _, current = _read_bytes(Path(path))
        if not current.same_content(stamp):
            changed.append(Path(path))
    return changed


def write_captions(
    changes: Mapping[Path, str],
    backup_dir: Path | None,
    expected: Mapping[Path, CaptionStamp] | None = None,
    within: Iterable[Path] | None = None,
) -> CaptionWriteResult:
    """Write caption texts (UTF-8, no BOM) all-or-nothing, keeping the previous versions in a new folder under
    ``backup_dir`` (none when ``backup_dir`` is None).

    ``expected`` holds the stamp each file had when it was read (``NO_FILE`` for "must not exist yet"); if any file
    in ``changes`` differs from its stamp, nothing is written and the ``UserError`` lists those files. With
    ``within`` (the app's allowed folders) every caption and the backup folder must resolve below them.
    """
    targets = [Path(path) for path in changes]
    if not targets:
        return CaptionWriteResult({}, None)
    if expected:
        conflicts = find_changed_on_disk({Path(p): s for p, s in expected.items() if Path(p) in set(targets)})
        if conflicts:
            listed = ", ".join(str(path) for path in conflicts[:10]) + (" …" if len(conflicts) > 10 else "")
            raise UserError(
                f"{len(conflicts)} caption file(s) changed on disk since they were read, so nothing was saved: {listed}. "
                "Reload them to see the other version, then save again."
            )
    return _replace_all({Path(path): text.encode(CAPTION_WRITE_ENCODING) for path, text in changes.items()}, backup_dir,
                        within=within)


def _replace_all(contents: Mapping[Path, bytes], backup_dir: Path | None, removed: tuple[Path, ...] = (),
                 within: Iterable[Path] | None = None) -> CaptionWriteResult:
    """Write ``contents`` and delete ``removed``, all or nothing up to the renames, after keeping every current
    version (and what the write creates, in the backup's manifest) in a new folder under ``backup_dir``. With
    ``within``, a caption or backup folder resolving outside those folders (a link) changes nothing: its backup would
    copy the file it leads to into the dataset."""
    targets = list(contents)
    if within is not None:
        within = list(within)
        if elsewhere := [path for path in (*targets, *removed, *([backup_dir] if backup_dir else []))
                         if not resolves_below(path, within)]:
            raise UserError(f"{_first_few(tuple(elsewhere))} lead{'s' if len(elsewhere) == 1 else ''} outside the "
                            "allowed folders (a link): no caption was changed; replace the link by a file or folder of its own")
    if held := _read_only([*targets, *removed]):
        raise UserError(f"{len(held)} caption file(s) are read-only, which Windows does not let a program replace: "
                        f"{', '.join(str(path) for path in held[:10])}{' …' if len(held) > 10 else ''}. Clear "
                        "their read-only attribute (Properties), then save again; no caption was changed.")
    temporaries = _run_all_or_clean_up(lambda path: _write_synced(path, contents[path]), targets)
    backup_folder = None
    if backup_dir is not None:
        existing = [path for path in (*targets, *removed) if path.is_file()]
        try:
            backup_folder = _keep_previous_versions(existing, [path for path in targets if not path.is_file()],
                                                    Path(backup_dir))
        except BaseException:
            for temporary in temporaries:
                temporary.unlink(missing_ok=True)
            raise

    def put_in_place(pair: tuple[Path, Path]) -> OSError | None:
        try:
            replace_path(*pair)
            return None
        except OSError as error:
            pair[0].unlink(missing_ok=True)
            return error

    # Side by side because on a disk mounted with discard, freeing a replaced file's blocks takes ~3 ms each.
    with ThreadPoolExecutor(_PARALLEL_SYNCS) as pool:
        failures = [error for error in pool.map(put_in_place, zip(temporaries, targets)) if error is not None]
    if failures:
        raise UserError(
            f"Could not replace {len(failures)} of {len(targets)} captions ({failures[0]}); the others were written"
            + (f", and the previous versions are in {backup_folder} (restoring that backup puts them back)."
               if backup_folder else ".")
        )
    held = []
    for path in removed:
        try:
            path.unlink(missing_ok=True)
        except OSError:  # open in another program (Windows), or a read-only folder: said by the caller
            held.append(path)
    written = {target: _stamp(contents[target], os.stat(target)) for target in targets}
    return CaptionWriteResult(written, backup_folder, tuple(held))


def _read_only(paths: list[Path]) -> list[Path]:
    """The files Windows would refuse to replace or delete (their read-only attribute), found before anything is
    written: one of them failing after the others were replaced left a save half done. Elsewhere a file's own mode
    does not stop a rename over it."""
    if not _ON_WINDOWS:
        return []
    return [path for path in paths if path.is_file() and not os.access(path, os.W_OK)]


def _keep_previous_versions(existing: list[Path], created: list[Path], backup_dir: Path) -> Path:
    """Put the current version of each file into a new timestamped folder under ``backup_dir``, keeping the files'
    layout relative to their common folder, then a manifest (``BACKUP_MANIFEST``) of where each goes back, which
    captions the write creates and when, which ``restore_backup`` reads: written last, so a folder with a manifest
    holds every file it names."""
    saved = datetime.now(timezone.utc)  # as the folder is named: the copies below take seconds for 10,000 captions
    try:
        folder = _backup_folder(backup_dir)
    except OSError as error:
        raise UserError(f"Could not create a backup folder in {backup_dir} ({error}); no caption was changed.") from None
    try:  # a save cut off (Ctrl-C, a kill) before its manifest leaves a folder that is no backup of before manifests
        (folder / UNFINISHED_BACKUP).touch()
    except OSError as error:
        shutil.rmtree(folder, ignore_errors=True)
        raise UserError(f"Could not write in the backup folder {folder} ({error}); no caption was changed.") from None
    root = _common_root(existing)

    def keep(path: Path) -> Path:
        backup = folder / _backup_name(path, root)
        backup.parent.mkdir(parents=True, exist_ok=True)
        try:
            # A hard link is a free, instant backup: captions are only ever replaced by rename, never written in
            # place, so the linked file keeps the old text once the caption's name points at the new file. Not for a
            # link to a caption shared elsewhere (Linux links the link itself) nor a file with other names: those
            # may change in place, and the backup with them.
            if path.is_symlink() or path.stat().st_nlink > 1:
                raise OSError("shared caption: copied")
            os.link(path, backup)
        except OSError:  # another drive, or a file system without hard links
            os.replace(_write_synced(backup, path.read_bytes()), backup)
        return backup

    _run_all_or_clean_up(keep, existing, f"Could not back up the previous captions into {folder}")
    manifest = {"saved": saved.isoformat(),
                "files": {_backup_name(path, root).as_posix(): _from_backup(folder, path) for path in existing},
                "created": [_from_backup(folder, path) for path in created]}
    try:
        # escaped: a file name that is not UTF-8 (GBK bytes on Linux) is kept as Python's surrogates, which read back
        write_text(folder / BACKUP_MANIFEST, json.dumps(manifest, indent=1))
    except OSError as error:
        shutil.rmtree(folder, ignore_errors=True)  # made above, holding only the copies just kept
        raise UserError(f"Could not write the backup's manifest in {folder} ({error}); no caption was changed.") from None
    try:
        (folder / UNFINISHED_BACKUP).unlink(missing_ok=True)
    except OSError:  # held for a moment (an antivirus scan): harmless left, a folder with a manifest is whole
        pass
    return folder


def _from_backup(folder: Path, path: Path) -> str:
    """Where ``path`` is as seen from the backup ``folder``: relative (a dataset moved with its backups restores into its
    new place), or absolute where no relative path leads there (another drive on Windows)."""
    try:
        return Path(os.path.relpath(path, folder)).as_posix()
    except ValueError:
        return str(Path(path).absolute())


@dataclass(frozen=True)
class RestoreResult:
    restored: tuple[Path, ...]  # captions put back as the backup holds them
    removed: tuple[Path, ...]  # captions the backed-up save had created
    backup_folder: Path | None  # the versions the restore replaced: restoring it undoes the restore
    left_out: tuple[Path, ...] = ()  # captions whose picture (or folder) was deleted since: not brought back
    not_removed: tuple[Path, ...] = ()  # captions its save created that could not be removed (held open)

    @property
    def left_out_note(self) -> str:
        """What the restore did not do, as sentences ("" when it did everything)."""
        note = ""
        if self.left_out:
            note += (f"{len(self.left_out)} caption(s) whose picture or folder was deleted since stay in the backup: "
                     f"{_first_few(self.left_out)}.")
        if self.not_removed:
            note += (f" {len(self.not_removed)} caption(s) its save had created could not be removed (open in another "
                     f"program?): {_first_few(self.not_removed)}; delete them by hand.")
        return note.strip()


def _first_few(paths: tuple[Path, ...]) -> str:
    return ", ".join(str(path) for path in paths[:3]) + (" …" if len(paths) > 3 else "")


@dataclass(frozen=True)
class _Manifest:
    files: dict[str, str]  # file in the backup → where it goes back, from the backup folder
    created: list[str]  # captions its save created, from the backup folder
    saved: datetime | None  # when (UTC); None in the manifests of 2026-12-05's first hours


def _read_manifest(folder: Path) -> _Manifest:
    """``folder``'s manifest; ``UserError`` when there is none (see ``_manifest_or_inferred``) or it cannot be read."""
    try:
        data = json.loads((folder / BACKUP_MANIFEST).read_text(encoding="utf-8"))
        saved = datetime.fromisoformat(data["saved"]) if "saved" in data else None
        return _Manifest(dict(data["files"]), list(data["created"]), saved)
    except FileNotFoundError:
        raise UserError(f"{folder} has no {BACKUP_MANIFEST}: it is not a caption backup, or one made before backups "
                        "recorded where their captions go back (2026-12-05); copy its files back by hand") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{folder / BACKUP_MANIFEST} cannot be read ({error}); copy the backup's files back by hand") from None


def _is_unrecorded(folder: Path) -> bool:
    """A backup made before backups had manifests (before 2026-12-05): named by its save's time, holding its files
    laid out relative to their common folder, which nothing recorded (``_manifest_or_inferred`` finds it again)."""
    return (backup_time(folder.name) is not None and not (folder / BACKUP_MANIFEST).exists()
            and not (folder / UNFINISHED_BACKUP).exists() and any(True for _ in _unrecorded_files(folder)))


def _unrecorded_files(folder: Path) -> Iterator[str]:
    """The captions of a backup without a manifest, relative to it: not what file browsers leave beside them."""
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if not any(part.startswith(".") for part in name.split("/")) and path.name.lower() not in _NOT_CAPTIONS \
                and path.is_file():
            yield name


def _manifest_or_inferred(folder: Path, dataset: Path) -> _Manifest:
    """The backup's manifest, or for a backup without one, where its files go back inferred from ``dataset``: the one
    folder under it (the dataset itself or a sub folder, hidden ones left out) below which more than half of its files
    name captions beside a picture of the same name. Else (two folders fitting as well, or none) it is refused: the
    user copies the files by hand."""
    if not _is_unrecorded(folder):
        return _read_manifest(folder)
    names = sorted(_unrecorded_files(folder))
    wanted: dict[tuple[str, ...], set[str]] = {}  # the folders a backup's files are in, relative: the pictures' stems
    for name in names:
        wanted.setdefault(PurePosixPath(name).parent.parts, set()).add(PurePosixPath(name).stem)
    fits: Counter[Path] = Counter()
    for current, folders, files in os.walk(dataset):
        folders[:] = [name for name in folders if not name.startswith(".")]  # the backups' own folder too
        stems = {Path(name).stem for name in files if Path(name).suffix.lower() in _IMAGE_LIKE}
        here = Path(current).parts
        for parts, captions in wanted.items():  # a root that puts the backup's folder here, by its trailing names
            if stems and (not parts or here[-len(parts):] == parts) and len(here) - len(parts) >= len(dataset.parts):
                fits[Path(*here[:len(here) - len(parts)])] += len(captions & stems)
    best = max(fits.values(), default=0)
    roots = sorted(root for root, count in fits.items() if count == best)
    if best * 2 <= len(names) or len(roots) > 1:
        found = (f"its files fit as well below {' and '.join(str(root) for root in roots[:3])}" if best and len(roots) > 1
                 else f"{best} of its {len(names)} files are captions of pictures in {dataset} (more than half must be)")
        raise UserError(f"{folder} was made before backups recorded where their captions go back (2026-12-05), and "
                        f"{found}: copy its files back by hand")
    return _Manifest({name: _from_backup(folder, roots[0] / name) for name in names}, [], None)


class _PictureCheck:
    """Whether a caption path is beside a picture of the same name; each folder listed once."""

    def __init__(self):
        self._stems: dict[Path, set[str]] = {}

    def __call__(self, caption: Path) -> bool:
        if caption.parent not in self._stems:
            try:
                self._stems[caption.parent] = {entry.stem for entry in caption.parent.iterdir()
                                               if entry.suffix.lower() in _IMAGE_LIKE}
            except OSError:  # the folder is gone
                self._stems[caption.parent] = set()
        return caption.stem in self._stems[caption.parent]


@dataclass(frozen=True)
class _Listed:
    """What listing a backup needs of its manifest (the whole one of 10,000 captions is ≈ 1.7 MB in memory)."""

    saved: datetime | None
    captions: int
    created: int


# A manifest is written once, with its backup; listing 100 backups of 10,000 captions at each save would read 60 MB.
@lru_cache(maxsize=1024)
def _listed_of(folder: Path, mtime_ns: int, size: int) -> _Listed:
    manifest = _read_manifest(folder)
    return _Listed(manifest.saved, len(manifest.files), len(manifest.created))


@lru_cache(maxsize=1024)
def _unrecorded_listed_of(folder: Path, mtime_ns: int) -> _Listed:
    return _Listed(None, sum(1 for _ in _unrecorded_files(folder)), 0)


def _listed(folder: Path) -> _Listed:
    if _is_unrecorded(folder):
        return _unrecorded_listed_of(folder, folder.stat().st_mtime_ns)
    stat = (folder / BACKUP_MANIFEST).stat()
    return _listed_of(folder, stat.st_mtime_ns, stat.st_size)


def restorable_backups(backup_dir: Path) -> list[Path]:
    """The backups under ``backup_dir`` that ``restore_backup`` can put back (those with a manifest, and those made
    before backups had one, which it places by inference), newest first by the time their manifests record (in UTC:
    the hour repeated when clocks go back sorts right), then by name: the first is the one the last save or restore
    made."""
    backup_dir = Path(backup_dir)
    if not backup_dir.is_dir():
        return []
    real = backup_dir.resolve()
    found = [folder for folder in backup_dir.iterdir()  # not a link leading elsewhere: a dataset may bring its own
             if folder.resolve().is_relative_to(real)
             and ((folder / BACKUP_MANIFEST).is_file() or folder.is_dir() and _is_unrecorded(folder))]
    return sorted(found, key=lambda folder: (_saved_at(folder), _saved_order(folder)), reverse=True)


def _saved_at(folder: Path) -> float:
    try:
        saved = _listed(folder).saved
    except (OSError, UserError):
        saved = None
    if saved is None:
        named = backup_time(folder.name)
        return named.timestamp() if named else 0.0
    return saved.timestamp()


def _saved_order(backup: Path) -> tuple[str, int]:
    """``2026-12-05_17-02-44``, then ``…_2`` … ``…_10`` for later saves within that second (``_backup_folder``)."""
    stamp, _, count = backup.name[:19], backup.name[19:20], backup.name[20:]
    return stamp, int(count) if count.isdigit() else 1


@dataclass(frozen=True)
class BackupSummary:
    """What a backup holds, for a list to pick one from: its folder's name, the time of the save that made it (this
    machine's local time; None for a folder named otherwise), how many captions it puts back and how many its save
    created (a restore removes them); ``problem`` when its manifest cannot be read (a restore says why)."""

    name: str
    time: datetime | None
    captions: int
    created: int
    problem: str = ""


def backup_time(name: str) -> datetime | None:
    """The time a backup folder's name says (this machine's local time), or None for a folder named otherwise."""
    try:
        return datetime.strptime(name[:19], BACKUP_TIME_FORMAT)
    except ValueError:
        return None


def backup_summaries(backup_dir: Path) -> list[BackupSummary]:
    """``restorable_backups`` with what each holds, newest first."""
    summaries = []
    for folder in restorable_backups(backup_dir):
        try:
            manifest = _listed(folder)
        except (OSError, UserError) as error:
            summaries.append(BackupSummary(folder.name, backup_time(folder.name), 0, 0, str(error)))
            continue
        made = (manifest.saved.astimezone().replace(tzinfo=None, microsecond=0) if manifest.saved
                else backup_time(folder.name))
        summaries.append(BackupSummary(folder.name, made, manifest.captions, manifest.created))
    return summaries


class BackupNotFound(UserError):
    """No restorable backup of that name in the backup folder."""


def backup_named(backup_dir: Path, name: str) -> Path:
    """The restorable backup folder ``name`` (``2026-12-05_17-02-44``) under ``backup_dir``: a name, never a path, so a
    request can restore nothing outside it."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(mark in name for mark in ("/", "\\", ":", "\0")):
        raise UserError(f"backup: {name!r} is not a backup's name; give a folder name from the list of backups, such as "
                        "2026-12-05_17-02-44", "backup")
    folder = Path(backup_dir) / name
    if folder not in restorable_backups(backup_dir):
        raise BackupNotFound(f"backup: {backup_dir} holds no backup {name!r} that can be put back; pick one from the "
                             "list of backups", "backup")
    return folder


def restore_backup(folder: Path, dataset: Path, backup_dir: Path | None, within: Iterable[Path] | None = None) -> RestoreResult:
    """Put the captions of the backup ``folder`` back where they were, and remove those its save created, keeping the
    current versions in a new backup under ``backup_dir`` first (all or nothing, as ``write_captions``).

    Whatever the manifest says (a dataset shared with its backups brings its own), only caption files are written or
    removed: inside ``dataset`` (the folder the backups belong to; by path, so a linked sub folder the editor saved
    through stays one), in no hidden folder, not pictures themselves, and beside a picture of the same name; a
    manifest naming anything else restores nothing. Captions whose folder or picture is gone stay in the backup.
    With ``within`` (the app's allowed folders), the backup's files and the captions it replaces must resolve below
    them."""
    folder = Path(os.path.normpath(Path(folder).absolute()))
    inside, backups = Path(os.path.normpath(Path(dataset).absolute())), folder.parent
    manifest = _manifest_or_inferred(folder, inside)
    beside_its_picture = _PictureCheck()

    def target(relative: str, field: str) -> Path:
        path = Path(os.path.normpath(folder / relative))
        below = path.relative_to(inside).parts if path.is_relative_to(inside) else None
        if (below is None or path.is_relative_to(backups) or any(part.startswith(".") for part in below)
                or path.suffix.lower() in _IMAGE_LIKE):
            raise UserError(f"{folder / BACKUP_MANIFEST} names {relative!r} in its {field}, which is not a caption of "
                            f"{dataset}: nothing was restored; copy the backup's files back by hand")
        return path

    def source(name: str) -> Path:
        path = Path(os.path.normpath(folder / name))
        if not path.is_relative_to(folder) or not path.resolve().is_relative_to(folder.resolve()):
            raise UserError(f"{folder / BACKUP_MANIFEST} names {name!r}, which is not in the backup: nothing was restored")
        if not path.is_file():
            raise UserError(f"{path} is missing from the backup its manifest describes: nothing was restored; copy the "
                            "backup's other files back by hand")
        return path

    placed = {target(place, "files"): source(name) for name, place in manifest.files.items()}
    created = [target(place, "created") for place in manifest.created]
    contents = {path: kept.read_bytes() for path, kept in placed.items() if beside_its_picture(path)}
    removed = tuple(path for path in created if path.is_file() and path not in contents and beside_its_picture(path))
    if not contents and not removed:
        raise UserError(f"{folder} holds no caption of a picture that is still there, and the captions its save created "
                        "are gone: nothing to restore")
    result = _replace_all(contents, backup_dir, removed, within)
    return RestoreResult(tuple(contents), tuple(path for path in removed if path not in result.not_removed),
                         result.backup_folder, tuple(path for path in placed if path not in contents),
                         result.not_removed)


def _run_all_or_clean_up(prepare, items: list, failure: str = "Could not write captions") -> list[Path]:
    """Run ``prepare`` (which makes one file) on every item side by side; if any fails, delete the files the others
    made and raise a ``UserError`` that says nothing was changed."""
    with ThreadPoolExecutor(_PARALLEL_SYNCS) as pool:
        futures = [pool.submit(prepare, item) for item in items]
    made = [future.result() for future in futures if future.exception() is None]
    failures = [future.exception() for future in futures if future.exception() is not None]
    if failures:
        for temporary in made:
            temporary.unlink(missing_ok=True)
        raise UserError(f"{failure} ({failures[0]}); no caption was changed.")
    return made
