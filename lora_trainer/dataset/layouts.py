"""Where a dataset's images and captions come from, as sd-scripts finds them (kohya-reference §4.3).

- DreamBooth folders (``--train_data_dir`` / ``--reg_data_dir``): each direct subfolder ``<repeats>_<class tokens>``
  is a subset (``config_util.generate_dreambooth_subsets_config_by_subdirs``): ``10_sks dog`` → 10 repeats, class
  tokens "sks dog"; ``10_my_dog`` → "my_dog"; ``10_`` → 10 repeats and empty class tokens; ``abc_dog``, ``0_dog`` and
  ``dog`` are skipped (sd-scripts logs a warning; we say how to rename them, and refuse a run left without folders).
- Images of a subset folder: files directly inside with sd-scripts' extensions in lower or upper case
  (``IMAGE_EXTENSIONS``), sorted by name; hidden files are skipped like glob's ``*`` does.
- Caption of an image: ``<stem><caption_extension>``, else the face-crop name (``<stem minus its last 4 "_" parts>``),
  first line only (every non-empty line with wildcards); an empty caption file is an error (sd-scripts asserts); no
  file → the subset's class tokens (or "" with a note).
- Fine-tuning metadata JSON (``--in_json`` / ``metadata_file``): ``{image key: {"caption", "tags", "image_size"}}``
  (or JSON lines with ``image_path``), caption + ``caption_separator`` + tags.

Where we differ: folders are read in name order (sd-scripts: file-system order); the face-crop caption name is derived
from the file name only (sd-scripts splits the whole path, so underscores in folder names can send it to an unrelated
file); a metadata key without an extension (written by ``merge_captions_to_metadata.py`` without ``--full_path``) is
matched to ``<image_dir>/<key>.<image extension>`` instead of failing when the image is opened; ``cache_info``'s
``metadata_cache.json`` is never written into the dataset, whose folders are only read.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from lora_trainer.dataset.caption_files import caption_path_for, load_caption_file, training_caption
from lora_trainer.dataset.captions import dataset_tag_frequency
from lora_trainer.dataset.config import (
    FINE_TUNING,
    DatasetConfig,
    DatasetGroupConfig,
    SubsetConfig,
    resolve_dataset_config,
)
from lora_trainer.errors import UserError
from lora_trainer.safe_io import read_utf8, resolves_below


def _optional_extensions() -> tuple[str, ...]:
    # sd-scripts reads these only when the matching Pillow plug-in is installed
    extensions: list[str] = []
    for module, extension in (("pillow_avif", ".avif"), ("pillow_jxl", ".jxl"), ("jxlpy", ".jxl")):
        try:
            __import__(module)
        except ImportError:
            continue
        if extension not in extensions:
            extensions.append(extension)
    return tuple(extensions)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp") + _optional_extensions()
_IMAGE_SUFFIXES = frozenset(IMAGE_EXTENSIONS) | frozenset(extension.upper() for extension in IMAGE_EXTENSIONS)
# sd-scripts globs "*.png" and "*.PNG": on Windows the file system ignores case, so a.Jpg is trained there too
CASE_FOLDING_FILE_SYSTEM = os.name == "nt"
# pictures sd-scripts does not read: said where they lie among the training images (check, prep)
UNREAD_PICTURE_SUFFIXES = frozenset({".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".jfif"})
_LIST_LIMIT = 5
# The suggested repeats aim at about this many samples per epoch (a common starting point for 10–50 images).
SUGGESTED_SAMPLES_PER_EPOCH = 200
MAX_SUGGESTED_REPEATS = 20


def first_few(items: Iterable[Any], limit: int = _LIST_LIMIT, separator: str = ", ") -> str:
    """``a, b, c, d, e and 95 more``: a list said in a message, at most ``limit`` of it named."""
    names = [str(item) for item in items]
    shown = separator.join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- DreamBooth folders -----------------------------------------------------------------------------------------


def parse_repeats_folder_name(name: str) -> tuple[int, str] | None:
    """``"10_sks dog"`` → ``(10, "sks dog")``; ``None`` for names sd-scripts skips (no number before the first
    "_", or fewer than 1 repeat). Python's ``int`` is used as in sd-scripts, so ``" 5_x"`` and ``"+5_x"`` count too."""
    head, _, rest = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    if repeats < 1:
        return None
    return repeats, rest


def suggested_repeats(image_count: int) -> int:
    return max(1, min(MAX_SUGGESTED_REPEATS, round(SUGGESTED_SAMPLES_PER_EPOCH / max(1, image_count))))


def _number_in_front(name: str) -> tuple[int | None, str]:
    """``0_cat`` → (0, "cat"); ``cat`` → (None, "cat"): the repeats a name asks for (any number), and the rest."""
    head, _, rest = name.partition("_")
    return (int(head), rest) if re.fullmatch(r"-?[0-9]+", head) else (None, name)


def suggested_folder_name(name: str, image_count: int) -> str:
    """A name sd-scripts accepts for a folder it would skip: the repeats in front, the old name as class tokens."""
    words = _number_in_front(name)[1]
    return f"{suggested_repeats(image_count)}_{words or 'concept'}"


def _rename_hint(folder: Path) -> str:
    """What training says of a skipped folder: the same name as ``dataset check`` suggests for it."""
    count = len(list_images(folder))
    if not count:
        return "no images"
    asked = _number_in_front(folder.name)[0]
    asks = "" if asked is None else f"it asks for {asked} repeats; "
    return f"{count} image(s), {asks}rename it to {suggested_folder_name(folder.name, count)}"


@dataclass(frozen=True)
class FolderScan:
    """The subsets found under ``--train_data_dir``/``--reg_data_dir`` as config tables, and what was skipped."""

    subsets: tuple[dict[str, Any], ...]
    notes: tuple[str, ...]


def _scan_parent(parent: Path, is_reg: bool, option: str) -> tuple[list[dict[str, Any]], list[str]]:
    if not parent.is_dir():
        raise UserError(f"{option} {parent} is not a folder; give the folder that holds the <repeats>_<name> subfolders.",
                        option.lstrip("-"))
    subsets: list[dict[str, Any]] = []
    notes: list[str] = []
    skipped: list[str] = []
    own = parse_repeats_folder_name(parent.name)
    if own and list_images(parent) and not any(parse_repeats_folder_name(child.name) for child in parent.iterdir()
                                               if child.is_dir()):
        raise UserError(f"{option} {parent} is itself a <repeats>_<name> folder ({own[0]} repeats): give the folder "
                        f"that holds it, {option} {parent.parent}", option.lstrip("-"))
    # hidden folders (the tag editor's .caption-backups, .git) are never image folders: not worth a rename hint
    for folder in sorted(child for child in parent.iterdir() if child.is_dir() and not child.name.startswith(".")):
        parsed = parse_repeats_folder_name(folder.name)
        if parsed is None:
            skipped.append(f"{folder.name!r} ({_rename_hint(folder)})")
            continue
        repeats, class_tokens = parsed
        if not class_tokens:
            notes.append(f"{folder}: the folder name gives no class tokens, so its images without a caption file train with an empty caption.")
        subsets.append({"image_dir": str(folder), "num_repeats": repeats, "is_reg": is_reg, "class_tokens": class_tokens})
    if skipped:
        notes.append(f"{option} {parent}: skipped folders without a <repeats>_ prefix: {first_few(skipped)}.")
    if not subsets and not is_reg:
        loose_images = list_images(parent)
        if loose_images:
            raise UserError(
                f"{option} {parent} holds {len(loose_images)} images directly, but sd-scripts reads only subfolders named "
                f"<repeats>_<name>: move them into a subfolder such as {parent / '10_mytrigger'}."
            )
        found = f" (found {first_few(skipped)})" if skipped else ""
        raise UserError(f"{option} {parent} has no subfolder named <repeats>_<name>, such as 10_mytrigger{found}.")
    return subsets, notes


def scan_dreambooth_folders(train_data_dir: Path, reg_data_dir: Path | None = None) -> FolderScan:
    """The subsets sd-scripts makes from ``--train_data_dir`` and ``--reg_data_dir`` (train first, then reg)."""
    subsets, notes = _scan_parent(Path(train_data_dir), False, "--train_data_dir")
    if reg_data_dir is not None:
        reg_subsets, reg_notes = _scan_parent(Path(reg_data_dir), True, "--reg_data_dir")
        subsets += reg_subsets
        notes += reg_notes
    return FolderScan(tuple(subsets), tuple(notes))


def config_from_folders(
    train_data_dir: Path, reg_data_dir: Path | None = None, cli_args: Mapping[str, Any] | object | None = None
) -> DatasetGroupConfig:
    """The dataset config sd-scripts builds without ``--dataset_config``: one dataset whose subsets are the folders,
    every other option from the command line. Folder notes come back as the config's warnings."""
    scan = scan_dreambooth_folders(train_data_dir, reg_data_dir)
    group = resolve_dataset_config({"datasets": [{"subsets": list(scan.subsets)}]}, f"--train_data_dir {train_data_dir}", cli_args)
    return DatasetGroupConfig(group.datasets, scan.notes + group.warnings)


def config_from_metadata(
    train_data_dir: Path | None, in_json: Path, cli_args: Mapping[str, Any] | object | None = None
) -> DatasetGroupConfig:
    """The dataset config sd-scripts builds for ``--in_json``: one fine-tuning subset."""
    subset: dict[str, Any] = {"metadata_file": str(in_json)}
    if train_data_dir is not None:
        subset["image_dir"] = str(train_data_dir)
    return resolve_dataset_config({"datasets": [{"subsets": [subset]}]}, f"--in_json {in_json}", cli_args)


# --- images and captions of a subset ----------------------------------------------------------------------------


def is_picture_suffix(suffix: str) -> bool:
    """Whether sd-scripts reads a file with this extension as a training image."""
    return (suffix.lower() in IMAGE_EXTENSIONS) if CASE_FOLDING_FILE_SYSTEM else suffix in _IMAGE_SUFFIXES


def list_images(folder: Path) -> list[Path]:
    """Training images directly in ``folder``, sorted by name, as sd-scripts' ``glob_images`` lists them."""
    return sorted(
        path for path in Path(folder).iterdir()
        if is_picture_suffix(path.suffix) and not path.name.startswith(".") and path.is_file()
    )


def broken_links(folder: Path) -> list[Path]:
    """Images in ``folder`` that are links to files that are not there (a library on a drive not mounted):
    ``list_images`` leaves them out, where sd-scripts lists them and stops at the first."""
    return sorted(path for path in Path(folder).iterdir()
                  if is_picture_suffix(path.suffix) and not path.name.startswith(".") and path.is_symlink()
                  and not path.exists())


def broken_links_note(links: list[Path]) -> str:
    return (f"{first_few(path.name for path in links)} {'link' if len(links) > 1 else 'links'} to "
            f"{'files that are' if len(links) > 1 else 'a file that is'} not there (a drive not mounted?): not trained "
            "here, and sd-scripts stops at them; reconnect the drive or remove the links.")


def captions_leading_outside(image: Path, caption_extension: str, within: Iterable[Path]) -> list[Path]:
    """The image's caption files (its own, a face crop's source's) that are links leading outside ``within``."""
    return [path for path in caption_candidates(image, caption_extension)
            if os.path.islink(path) and not resolves_below(path, within)]


def pictures_inside(images: list[Path], caption_extension: str,
                    within: Iterable[Path] | None) -> tuple[list[Path], list[Path]]:
    """The images to read, and the links leading outside ``within`` (the app's allowed folders: pictures, their
    captions) whose images are left out unread; every image where ``within`` is None."""
    if within is None:
        return images, []
    within = list(within)
    kept, outside = [], []
    for image in images:
        links = ([image] if image.is_symlink() and not resolves_below(image, within)
                 else captions_leading_outside(image, caption_extension, within))
        if links:
            outside += links
        else:
            kept.append(image)
    return kept, outside


def outside_links_note(links: list[Path]) -> str:
    """Links (pictures, captions, folders) leading outside the allowed folders, which the app neither reads nor
    shows; said without whether anything is there."""
    if len(links) == 1:
        return (f"{links[0].name} is a link leading outside the allowed folders, so it is not read here; copy what it "
                "links to into the dataset, or allow that folder")
    return (f"{first_few(path.name for path in links)} are links leading outside the allowed folders, so they are not "
            "read here; copy what they link to into the dataset, or allow those folders")


def images_in_unread_case(folder: Path) -> list[Path]:
    """``a.Jpg``: an image sd-scripts skips, reading extensions in lower or upper case only."""
    return sorted(
        path for path in folder.iterdir()
        if path.suffix.lower() in IMAGE_EXTENSIONS and not is_picture_suffix(path.suffix) and path.is_file()
    )


def unread_case_note(unread: list[Path]) -> str:
    return (f"{first_few(path.name for path in unread)} skipped: sd-scripts reads extensions in lower or upper case only; "
            "rename them.")


def nested_images_note(folder: Path) -> str | None:
    """Images in sub-folders of an image folder (``10_zk/outfit 1/``), which sd-scripts never reads: its glob takes
    the folder's own files; hidden sub-folders (the tag editor's backups) are not counted."""
    nested = {child.name: len(list_images(child)) for child in sorted(folder.iterdir())
              if child.is_dir() and not child.name.startswith(".")}
    nested = {name: count for name, count in nested.items() if count}
    if not nested:
        return None
    return (f"{sum(nested.values())} images in its sub-folders ({first_few(nested)}) are not trained: sd-scripts reads only "
            f"the folder's own images; move them up into {folder.name}, or make each sub-folder a <repeats>_<name> "
            "folder beside it")


def blank_first_line_note(folder: Path, caption_files: list[Path]) -> str:
    return (f"{folder}: the first line of {first_few(path.name for path in caption_files)} is empty, and the first line is "
            "the caption sd-scripts trains on (so an empty caption); write the caption on the first line.")


def caption_candidates(image: Path, caption_extension: str) -> tuple[Path, ...]:
    """``a_1_2_3_4.png`` → ``a_1_2_3_4.txt``, then the caption of the face-crop source ``a.txt``."""
    own = caption_path_for(image, caption_extension)
    parts = image.stem.split("_")
    if len(parts) >= 5:
        return own, caption_path_for(image.with_name("_".join(parts[:-4]) + image.suffix), caption_extension)
    return (own,)


def face_in_name(image: Path) -> tuple[int, int, int, int] | None:
    """``a_120_80_40_48.png`` → the face's centre (120, 80) and size 40×48, sd-scripts' face-crop naming (written by
    its ``detect_face_rotate.py``); the parts are read with ``int`` as sd-scripts reads them, so a centre above or left
    of the picture (``a_5_-3_30_40``) is a face that the crop keeps at the edge. None when the last four parts are
    not whole numbers or the centre x is 0, where sd-scripts finds no face (it crashes on a name like
    ``photo_2024_01_02_x`` and divides by a face of size 0: we train such an image normally)."""
    parts = image.stem.split("_")
    if len(parts) < 5:
        return None
    try:
        cx, cy, width, height = (int(part) for part in parts[-4:])
    except ValueError:
        return None
    return (cx, cy, width, height) if cx > 0 and max(width, height) > 0 else None


@dataclass(frozen=True)
class ImageEntry:
    """One training image: its caption as sd-scripts would train it (before caption processing), the caption file it
    came from (``None``: class tokens or metadata), its size when the metadata gives it, and what ``ss_tag_frequency``
    counts for it (a folder image's caption, a metadata entry's tags; ``None``: nothing), so that an image left out
    later takes its own tags out of the count."""

    path: Path
    caption: str
    caption_file: Path | None = None
    image_size: tuple[int, int] | None = None
    counted_tags: str | None = None


@dataclass(frozen=True)
class SubsetImages:
    """A subset's images; ``frequency_name``/``frequency_captions`` feed ``ss_tag_frequency`` (sd-scripts counts
    captions per folder for DreamBooth, only the ``tags`` per metadata file for fine-tuning)."""

    subset: SubsetConfig
    images: tuple[ImageEntry, ...]
    frequency_name: str
    frequency_captions: tuple[str, ...]
    notes: tuple[str, ...] = ()


def _duplicate_stem_notes(images: list[Path], caption_extension: str) -> list[str]:
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for image in images:
        by_stem[image.stem].append(image)
    return [
        f"{' and '.join(path.name for path in paths)} in {paths[0].parent} share the name {stem!r}, so they share the "
        f"caption {stem}{caption_extension} and their cached latents may overwrite each other; rename or remove one."
        for stem, paths in by_stem.items() if len(paths) > 1
    ]


def _counted_tags(entries: Iterable[ImageEntry]) -> tuple[str, ...]:
    return tuple(entry.counted_tags for entry in entries if entry.counted_tags is not None)


def dreambooth_images(subset: SubsetConfig) -> SubsetImages:
    """Images and captions of a DreamBooth subset; caption files that cannot be used raise one ``UserError``."""
    folder = subset.image_dir
    assert folder is not None
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        return SubsetImages(subset, (), folder.name, (), (f"{folder} {what}; this subset is ignored.",))
    images = list_images(folder)
    notes = _duplicate_stem_notes(images, subset.caption_extension)
    unread = images_in_unread_case(folder)
    if unread:
        notes.append(f"{folder}: {unread_case_note(unread)}")
    if links := broken_links(folder):
        notes.append(f"{folder}: {broken_links_note(links)}")
    if nested := nested_images_note(folder):
        notes.append(f"{folder}: {nested}.")
    entries: list[ImageEntry] = []
    empty_files: list[Path] = []
    undecodable: list[UserError] = []  # all of them in one message: re-saving them is one task
    blank_first_lines: list[Path] = []
    for image in images:
        caption_file = next((path for path in caption_candidates(image, subset.caption_extension) if path.is_file()), None)
        if caption_file is None:
            fallback = subset.class_tokens or ""
            entries.append(ImageEntry(image, fallback, counted_tags=fallback))
            continue
        try:
            text = load_caption_file(caption_file).text
        except UserError as error:
            undecodable.append(error)
            continue
        if text == "":
            empty_files.append(caption_file)
            continue
        caption = training_caption(text, subset.enable_wildcard)
        if not caption:
            blank_first_lines.append(caption_file)
        entries.append(ImageEntry(image, caption, caption_file, counted_tags=caption))
    if undecodable:
        more = f" ({len(undecodable) - 1} more caption files cannot be read either)" if len(undecodable) > 1 else ""
        raise UserError(f"{str(undecodable[0]).rstrip('.')}{more}.")
    if empty_files:
        raise UserError(
            f"Empty caption files (sd-scripts stops on them): {first_few(empty_files)}; write a caption in each, or delete "
            "them to train those images with the folder's class tokens."
        )
    if blank_first_lines:
        notes.append(blank_first_line_note(folder, blank_first_lines))
    if not images:
        notes.append(f"{folder} has no images ({', '.join(IMAGE_EXTENSIONS)}); this subset is ignored.")
    return SubsetImages(subset, tuple(entries), folder.name, _counted_tags(entries), tuple(notes))


def caption_fallback_notes(subset: SubsetConfig, entries: Iterable[ImageEntry],
                           config_file: str | Path | None = None) -> list[str]:
    """The note on a folder's images that train with its class tokens for want of a caption file, given the images
    that do train: said once the unreadable ones are left out (by the caller, who opens the images), so it never
    names an image that is skipped. Fine-tuning subsets have no caption files: no note. ``config_file``: the dataset
    TOML the subset comes from, whose caption_extension wins over the command line's."""
    if subset.kind == FINE_TUNING:
        return []
    without_caption = [entry.path for entry in entries if entry.caption_file is None]
    if not without_caption:
        return []
    fallback = f"the class tokens {subset.class_tokens!r}" if subset.class_tokens else "an empty caption"
    return [
        f"{subset.image_dir}: {len(without_caption)} images have no {subset.caption_extension} caption and train with "
        f"{fallback}: {first_few(path.name for path in without_caption)}."
        f"{_other_caption_hint(without_caption, subset.caption_extension, config_file)}"
    ]


_USUAL_CAPTION_EXTENSIONS = (".txt", ".caption")  # the taggers' and the Kohya GUI's, sd-scripts' default


def other_caption_extension(image: Path, extension: str) -> str | None:
    """The other usual caption extension of a caption file beside ``image``, when ``extension`` finds none."""
    return next((other for other in _USUAL_CAPTION_EXTENSIONS
                 if other != extension.lower() and image.with_suffix(other).is_file()), None)


def _other_caption_hint(images: list[Path], extension: str, config_file: str | Path | None) -> str:
    """Captions under the other usual extension beside those images: the option most often forgotten (sd-scripts'
    default is .caption, the taggers and the Kohya GUI write .txt)."""
    for other in _USUAL_CAPTION_EXTENSIONS:
        found = sum(image.with_suffix(other).is_file() for image in images)
        if other != extension.lower() and found:
            fix = (f"set caption_extension = \"{other}\" for this subset in {config_file}" if config_file
                   else f"add --caption_extension {other}")
            return f" {found} of them have a {other} file beside them: {fix} to train with those."
    return ""


def read_metadata_file(path: Path) -> dict[str, dict[str, Any]]:
    """A fine-tuning metadata file: JSON ``{key: {...}}`` or JSON lines with ``image_path`` (sd-scripts' two forms)."""
    if not path.is_file():
        raise UserError(f"Metadata file {path} does not exist; check metadata_file / --in_json.")
    text = read_utf8(path, "Metadata file")
    try:
        if path.suffix.lower() == ".jsonl":
            metadata: dict[str, dict[str, Any]] = {}
            for line in text.splitlines():
                if line.strip():
                    record = json.loads(line)
                    entry = {"caption": record.get("caption", "")}
                    entry.update({key: record[key] for key in ("image_size", "tags") if key in record})
                    metadata[record["image_path"]] = entry
            return metadata
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"Metadata file {path} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno}).") from None
    except KeyError:
        raise UserError(f"Metadata file {path}: every JSON line needs an \"image_path\".") from None
    if not isinstance(metadata, dict) or not all(isinstance(entry, dict) for entry in metadata.values()):
        raise UserError(f'Metadata file {path} must map each image to {{"caption": ..., "tags": ...}}.')
    return metadata


def _image_for_key(key: str, image_dir: Path | None, metadata_file: Path) -> Path:
    path = Path(key)
    if not path.is_absolute():
        if image_dir is None:
            raise UserError(
                f"Metadata file {metadata_file} names images by relative path ({key!r}); set image_dir (or "
                "--train_data_dir) to the folder they are in."
            )
        path = image_dir / key
    if is_picture_suffix(path.suffix) or path.is_file():
        return path
    for extension in IMAGE_EXTENSIONS:
        for candidate in (path.with_name(path.name + extension), path.with_name(path.name + extension.upper())):
            if candidate.is_file():
                return candidate
    return path


def metadata_image_paths(metadata_file: Path, image_dir: Path | None) -> list[Path]:
    """Every image a fine-tuning metadata file names, as training will open it."""
    return [_image_for_key(key, image_dir, metadata_file) for key in read_metadata_file(metadata_file)]


def fine_tuning_images(subset: SubsetConfig) -> SubsetImages:
    """Images and captions of a fine-tuning subset: caption, then ``caption_separator`` and the tags when there are
    tags (every caption line gets the tags with wildcards), in sd-scripts' order (longest key first)."""
    metadata_file = subset.metadata_file
    assert metadata_file is not None
    metadata = read_metadata_file(metadata_file)
    separator = subset.caption_separator
    entries: list[ImageEntry] = []
    missing: list[str] = []
    for key in sorted(metadata, key=len, reverse=True):
        record = metadata[key]
        caption = record.get("caption") or ""
        tags = record.get("tags")
        counted = None  # sd-scripts counts the tags only, and only of the images that have them
        if subset.enable_wildcard:
            if tags is not None:
                counted = tags = tags.replace("\n", separator)
                caption = "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip())
        elif tags:
            caption = (caption + separator if caption else "") + tags
            counted = tags
        path = _image_for_key(key, subset.image_dir, metadata_file)
        if not path.is_file():
            missing.append(key)
        size = record.get("image_size")
        entries.append(ImageEntry(path, caption, None, (int(size[0]), int(size[1])) if size else None, counted))
    notes = []
    if missing:
        notes.append(f"Metadata file {metadata_file}: no image found for {first_few(missing)}.")
    if not metadata:
        notes.append(f"Metadata file {metadata_file} lists no images; this subset is ignored.")
    return SubsetImages(subset, tuple(entries), metadata_file.name, _counted_tags(entries), tuple(notes))


def subset_images(subset: SubsetConfig) -> SubsetImages:
    if subset.kind == FINE_TUNING:
        return fine_tuning_images(subset)
    return dreambooth_images(subset)  # a ControlNet subset's images and captions too, as sd-scripts reads them


# --- a whole dataset --------------------------------------------------------------------------------------------


def regularization_repeats(num_train_images: int, reg_repeats: Iterable[int]) -> list[int]:
    """sd-scripts' balancing of regularisation images (``DreamBoothDataset.__init__``): reg images are taken in order
    with their own repeats until they match the training samples, then their repeats go up one by one in turns;
    a 0 means the image is not used. Returns the effective repeats per reg image."""
    repeats = list(reg_repeats)
    used = [0] * len(repeats)
    if not repeats:
        return used
    total = 0
    first_round = True
    while total < num_train_images:
        for index, own_repeats in enumerate(repeats):
            if first_round:
                used[index] = own_repeats
                total += own_repeats
            else:
                used[index] += 1
                total += 1
            if total >= num_train_images:
                break
        first_round = False
    return used


@dataclass(frozen=True)
class DatasetImages:
    """A dataset's subsets with their images, the ``ss_tag_frequency`` of this dataset, sample counts with repeats
    (``ss_num_train_images`` / ``ss_num_reg_images``) and every note worth showing the user."""

    dataset: DatasetConfig
    subsets: tuple[SubsetImages, ...]
    tag_frequency: dict[str, dict[str, int]]
    num_train_images: int
    num_reg_images: int
    notes: tuple[str, ...]


def dataset_images(dataset: DatasetConfig) -> DatasetImages:
    """Read every subset of ``dataset``; subsets without images are dropped with a note (as sd-scripts does) and a
    dataset left without any training image is a ``UserError``."""
    loaded = [subset_images(subset) for subset in dataset.subsets]
    notes = [note for subset in loaded for note in subset.notes]
    kept = tuple(subset for subset in loaded if subset.images)
    num_train = sum(subset.subset.num_repeats * len(subset.images) for subset in kept if not subset.subset.is_reg)
    num_reg = sum(subset.subset.num_repeats * len(subset.images) for subset in kept if subset.subset.is_reg)
    if num_train == 0:
        where = first_few(str(subset.subset.image_dir or subset.subset.metadata_file) for subset in loaded)
        missing = [subset.subset.image_dir for subset in loaded
                   if subset.subset.image_dir is not None and not subset.subset.image_dir.is_dir()]
        why = f" ({first_few(str(folder) for folder in missing)}: no such folder)" if missing else ""
        raise UserError(f"No training images found in {where}{why}; add images ({', '.join(IMAGE_EXTENSIONS)}) or fix the paths.")
    if num_reg > num_train:
        notes.append(f"There are more regularisation samples ({num_reg}) than training samples ({num_train}); some are never used.")
    # sd-scripts counts tags of every subset it read, reg subsets included
    frequency = dataset_tag_frequency((subset.frequency_name, subset.frequency_captions) for subset in kept)
    return DatasetImages(dataset, kept, frequency, num_train, num_reg, tuple(notes))
