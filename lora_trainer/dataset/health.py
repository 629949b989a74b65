"""The dataset health report: what sd-scripts will do with a ``--train_data_dir`` folder, said before training.

``check_dataset`` reads every image and caption once and returns a ``HealthReport``: the concept folders with their
repeats, samples and steps per epoch; a resolution and a bucket histogram; for each image the bucket it lands in and
the box of its own pixels that survives the centre crop (data for a per-image preview); tag frequency, trigger-word
coverage and near-duplicates (perceptual hashes); and ``Finding``s — one per problem, each naming the file, what
sd-scripts does with it and the fix. Everything is sorted, so two runs on the same folder give the same report.

The judgements (which folder names sd-scripts accepts, which caption it trains on, how many steps an epoch has) are
pure functions over plain data; only the reading of the folder touches the disk (each image once in a process
while it is unchanged), and nothing here ever writes.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from itertools import groupby
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lora_trainer.dataset.buckets import (BucketSettings, bucket_list, centre_crop_box, fixed_resolution_problem,
                                         select_bucket)
from lora_trainer.dataset.caption_files import (CaptionUnreadable, caption_path_for, checked_caption_extension,
                                                 load_caption_file, training_caption)
from lora_trainer.dataset.captions import CaptionOptions, split_kept_tags, tag_frequency
from lora_trainer.dataset.images import ImageError, checked_size_and_thumbnail, sd_scripts_reading
from lora_trainer.dataset.layouts import (IMAGE_EXTENSIONS, broken_links, broken_links_note, caption_candidates,
                                         face_in_name, first_few, images_in_unread_case, list_images,
                                         nested_images_note, other_caption_extension, outside_links_note,
                                         parse_repeats_folder_name, pictures_inside, suggested_folder_name,
                                         UNREAD_PICTURE_SUFFIXES, unread_case_note)
from lora_trainer.errors import UserError
from lora_trainer.safe_io import resolves_below

Size = tuple[int, int]
Box = tuple[int, int, int, int]

# sd-scripts trains on 75 tokens unless --max_token_length is 150 or 225; beyond that the text encoder never sees it.
TOKEN_LIMITS = (75, 150, 225)
# Files users drop into a folder expecting them to be trained, which sd-scripts' glob never picks up.
# An enlargement this large makes a visibly soft training image.
TOO_SMALL_UPSCALE = 2.0
# 64-bit perceptual hashes this close are the same picture re-encoded, resized or lightly edited.
NEAR_DUPLICATE_BITS = 6

SEVERITY_ORDER = {"error": 0, "warning": 1, "note": 2}
# The text form names the commonest sizes and buckets, a few files of each kind of finding and a few near-duplicate
# groups (1500 phone photos made 4957 lines); the JSON form (--json, the API) keeps every one.
TEXT_SIZES = 10
TEXT_BUCKETS = 20
TEXT_GROUPS = 10
TEXT_EXAMPLES = 5


@dataclass(frozen=True)
class HealthSettings:
    """The training options that change the report, with sd-scripts' meanings; ``resolution`` is (width, height)."""

    resolution: Size = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    caption_extension: str = ".txt"
    trigger: str | None = None
    max_token_length: int = TOKEN_LIMITS[0]  # the tokens a caption is read to (--max_token_length; 75 when not set)
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    near_duplicate_bits: int = NEAR_DUPLICATE_BITS
    # Buckets off, these decide which images of another size than the resolution train: with random_crop a larger
    # one gives a patch at its own size; cached latents are resized like a bucket, so any size trains; with the run's
    # face_crop_aug_range (face_crop) a larger one whose name gives its face is cut around it.
    random_crop: bool = False
    cache_latents: bool = False
    face_crop: bool = False

    def __post_init__(self) -> None:
        if self.max_token_length not in TOKEN_LIMITS:
            raise UserError(f"max_token_length {self.max_token_length}: sd-scripts reads 75, 150 or 225 tokens",
                            "max_token_length")

    def buckets(self) -> BucketSettings:
        return BucketSettings(self.resolution, self.enable_bucket, self.min_bucket_reso, self.max_bucket_reso,
                              self.bucket_reso_steps, self.bucket_no_upscale)


@dataclass(frozen=True)
class Finding:
    """One problem: ``kind`` is a stable name for the UI and tests, ``path`` is relative to the checked folder
    ("" for the whole dataset), ``message`` says what happens and what to do."""

    severity: str
    kind: str
    path: str
    message: str


@dataclass(frozen=True)
class ConceptFolder:
    """A ``<repeats>_<class tokens>`` folder as sd-scripts reads it."""

    path: str
    repeats: int
    class_tokens: str
    image_count: int = 0
    captioned_count: int = 0

    @property
    def samples(self) -> int:
        return self.repeats * self.image_count


@dataclass(frozen=True)
class ImageCheck:
    """One image as training will see it. ``crop_box`` is the (left, top, right, bottom) part of the image's own
    pixels that survives the centre crop; ``cut_off`` the fraction of its area that does not; ``scale`` the resize
    factor (above 1: enlarged). ``caption_source`` is "file", "class tokens" or "none"."""

    path: str
    folder: str
    size: Size
    caption: str
    caption_source: str
    tokens: int
    bucket: Size
    resized_size: Size
    crop_box: Box
    cut_off: float
    scale: float
    perceptual_hash: str


@dataclass(frozen=True)
class HealthReport:
    folder: str
    settings: HealthSettings
    concept_folders: tuple[ConceptFolder, ...]
    images: tuple[ImageCheck, ...]
    samples_per_epoch: int
    steps_per_epoch: int
    resolution_histogram: tuple[tuple[str, int], ...]
    bucket_histogram: tuple[tuple[str, int], ...]
    tag_frequency: tuple[tuple[str, int], ...]
    images_without_trigger: tuple[str, ...]
    near_duplicates: tuple[tuple[str, ...], ...]
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(finding for finding in self.findings if finding.severity == "error")

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2)

    def to_text(self) -> str:
        return "\n".join(report_lines(self))


# ---------------------------------------------------------------------------------------------------------------
# Folder names (sd-scripts' ``generate_dreambooth_subsets_config_by_subdirs``)


# ---------------------------------------------------------------------------------------------------------------
# Pure judgements over plain data


def crop_in_image_pixels(size: Size, resized: Size, bucket: Size) -> Box:
    """The centre crop of ``bucket`` out of the image resized to ``resized``, mapped back to the image's pixels."""
    left, top, right, bottom = centre_crop_box(resized, bucket)
    scale_x, scale_y = resized[0] / size[0], resized[1] / size[1]
    return (
        max(0, round(left / scale_x)),
        max(0, round(top / scale_y)),
        min(size[0], round(min(right, resized[0]) / scale_x)),
        min(size[1], round(min(bottom, resized[1]) / scale_y)),
    )


def steps_per_epoch(samples_per_bucket: Iterable[int], batch_size: int) -> int:
    """sd-scripts batches inside a bucket, so each bucket's last batch may be short: Σ ceil(samples / batch)."""
    if batch_size < 1:
        raise UserError(f"batch size is {batch_size}; give --batch-size 1 or more.")
    return sum(math.ceil(samples / batch_size) for samples in samples_per_bucket if samples)


def token_length_reading(tokens: int) -> int | None:
    """The --max_token_length that reads a caption of ``tokens`` whole (75, 150 or 225), None past 225."""
    return next((limit for limit in TOKEN_LIMITS if tokens <= limit), None)


def token_count_problem(tokens: int, max_token_length: int = TOKEN_LIMITS[0]) -> tuple[str, str] | None:
    """(kind, message) for a caption longer than the run reads (``max_token_length``: sd-scripts' 75, 150 or 225)."""
    if tokens <= max_token_length:
        return None
    if tokens > TOKEN_LIMITS[2]:
        return "caption-over-225", f"{tokens} tokens: everything after 225 is cut even with --max_token_length 225; shorten the caption."
    if tokens > TOKEN_LIMITS[1]:
        return "caption-over-150", (f"{tokens} tokens: needs --max_token_length 225, else it is cut at "
                                    f"{max_token_length}; or shorten the caption.")
    return "caption-over-75", f"{tokens} tokens: cut at 75 unless you train with --max_token_length 150 or 225; or shorten the caption."


def mentions(caption: str, word: str) -> bool:
    """Whether ``word`` occurs in ``caption`` as a whole word or phrase, ignoring case."""
    return re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", caption, flags=re.IGNORECASE) is not None


def perceptual_hash(gray: np.ndarray) -> int:
    """pHash: the signs of the 8×8 lowest frequencies of a 32×32 grey image's DCT against their median (DC left
    out), as a 64-bit number; resizing, re-encoding and small edits change only a few bits."""
    pixels = np.asarray(gray, dtype=np.float64)
    if pixels.shape != (32, 32):
        raise ValueError(f"perceptual_hash wants a 32x32 grey image, got {pixels.shape}")
    # rounded so that the float noise of a blank image gives no random bits: blank images all hash to 0
    coefficients = np.round((_DCT @ pixels @ _DCT.T)[:8, :8].ravel(), 6)
    bits = coefficients > np.median(coefficients[1:])
    return int(sum(1 << index for index, bit in enumerate(bits) if bit))


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2 / n)
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT = _dct_matrix(32)


_M1, _M2, _M4, _BYTES = (np.uint64(mask) for mask in (0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F,
                                                      0x0101010101010101))


def bits_set(values: np.ndarray) -> np.ndarray:
    """The 1 bits of each uint64: counted in pairs, nibbles and bytes, then the bytes summed by one multiply (numpy
    1.x has no bitwise_count; a byte table is four times slower)."""
    values = values - ((values >> np.uint64(1)) & _M1)
    values = (values & _M2) + ((values >> np.uint64(2)) & _M2)
    values = (values + (values >> np.uint64(4))) & _M4
    return (values * _BYTES) >> np.uint64(56)


def near_duplicate_groups(hashes: dict[str, int], max_bits: int) -> tuple[tuple[str, ...], ...]:
    """Groups (sorted, two or more names) of images whose hashes differ in at most ``max_bits`` bits, joined
    transitively. Every pair is compared, each image against the later ones at once: 10,000 images in a fraction
    of a second."""
    names = sorted(hashes)
    values = np.array([hashes[name] for name in names], dtype=np.uint64)
    parent = list(range(len(names)))

    def root(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for index in range(len(names) - 1):
        for offset in np.nonzero(bits_set(values[index + 1:] ^ values[index]) <= max_bits)[0]:
            parent[root(index + 1 + int(offset))] = root(index)
    groups: dict[int, list[str]] = {}
    for index, name in enumerate(names):
        groups.setdefault(root(index), []).append(name)
    return tuple(sorted(tuple(group) for group in groups.values() if len(group) > 1))


def _histogram(values: Iterable[str]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(Counter(values).items(), key=lambda item: (-item[1], item[0])))


def _size_text(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


# ---------------------------------------------------------------------------------------------------------------
# Reading the folder


@dataclass(frozen=True)
class ImageFacts:
    """What the disk says about one image: its upright size, perceptual hash and how sd-scripts reads it otherwise
    (None when alike), or why it cannot be read."""

    size: Size | None = None
    perceptual_hash: int = 0
    sd_scripts_reading: str | None = None
    problem: str | None = None


def read_image_facts(path: Path) -> ImageFacts:
    """The size from the header; every pixel decoded (a header alone cannot show truncation), a JPEG at an eighth of
    its size, for the thumbnail the hash is taken from."""
    try:
        size, thumbnail = checked_size_and_thumbnail(path, 32)
    except ImageError as error:
        return ImageFacts(problem=str(error))
    return ImageFacts(size, perceptual_hash(np.asarray(thumbnail, dtype=np.float64)), sd_scripts_reading(path))


# The facts of unchanged files, kept for the app's next check (Validate, then Start, check the same folder): by
# resolved path, size, modification time, file id and change time, so an edited or replaced file is read again —
# also one of the same size whose modification time was kept by the copy or rounded to FAT's 2 seconds (its file
# id or change time differs). A file that could not be read is never kept: a copy finished or a permission fixed
# shows at once.
_FACTS_KEPT = 20_000  # the tag editor's 10,000 images, with as many regularisation images
_FileKey = tuple[str, int, int, int, int]
_facts_cache: OrderedDict[_FileKey, ImageFacts] = OrderedDict()
_facts_lock = threading.Lock()
_READERS = 2  # decoding releases the GIL: two files at a time, without taking every core of the machine


def _file_key(path: Path) -> _FileKey | None:
    try:
        stat = path.stat()  # st_ino is the NTFS file id on Windows
        return str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns
    except OSError:  # gone or a broken link: read (and reported) without a key
        return None


def _cached_image_facts(path: Path) -> ImageFacts:
    key = _file_key(path)
    with _facts_lock:
        if key in _facts_cache:
            _facts_cache.move_to_end(key)
            return _facts_cache[key]
    facts = read_image_facts(path)
    if key is not None and facts.problem is None:
        with _facts_lock:
            _facts_cache[key] = facts
            while len(_facts_cache) > _FACTS_KEPT:
                _facts_cache.popitem(last=False)
    return facts


def read_all_image_facts(paths: Sequence[Path]) -> dict[Path, ImageFacts]:
    """``read_image_facts`` of every path, two files at a time; unchanged files already read in this process are
    not read again."""
    with ThreadPoolExecutor(max_workers=_READERS) as pool:
        return dict(zip(paths, pool.map(_cached_image_facts, paths)))


@dataclass(frozen=True)
class Layout:
    """Which folders sd-scripts would train from a ``--train_data_dir``, and what it would silently skip."""

    concept_folders: tuple[tuple[Path, int, str], ...]
    findings: tuple[Finding, ...]


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return path.as_posix()


def discover_layout(root: Path, within: Iterable[Path] | None = None) -> Layout:
    """The ``<N>_<name>`` folders under ``root``; a flat folder of images is checked as one folder (its own
    ``N_name`` if it has one, else 1 repeat) with a finding that says what to rename. With ``within`` (the app's
    allowed folders) a sub-folder that is a link leading outside them is named, not read."""
    subfolders = sorted(child for child in root.iterdir() if child.is_dir() and not child.name.startswith("."))
    concept: list[tuple[Path, int, str]] = []
    findings: list[Finding] = []
    for child in subfolders:
        if within is not None and not resolves_below(child, within):
            findings.append(Finding("warning", "outside-link", _relative(child, root), outside_links_note([child])))
            continue
        parsed = parse_repeats_folder_name(child.name)
        if parsed:
            concept.append((child, *parsed))
            continue
        count = len(list_images(child))
        if count:
            findings.append(Finding(
                "warning", "skipped-folder", _relative(child, root),
                f"sd-scripts skips this folder and its {count} image(s): its name does not start with a number of "
                f"repeats (1 or more) and '_'; rename it to {suggested_folder_name(child.name, count)}."))
    loose = list_images(root)
    if loose and concept:
        findings.append(Finding(
            "warning", "loose-images", ".",
            f"{len(loose)} image(s) lie directly in {root.name} and are not trained: sd-scripts reads only the "
            f"<repeats>_<name> subfolders; put them in one, e.g. {suggested_folder_name(root.name, len(loose))}."))
    elif loose:
        own = parse_repeats_folder_name(root.name)
        if own:
            findings.append(Finding(
                "note", "concept-folder-given", ".",
                f"{root.name} is itself a <repeats>_<name> folder ({own[0]} repeats); for --train_data_dir give its "
                f"parent folder {root.parent}."))
            concept.append((root, *own))
        else:
            name = suggested_folder_name(root.name, len(loose))
            findings.append(Finding(
                "warning", "flat-folder", ".",
                f"{root.name} holds images but no <repeats>_<name> subfolder, so --train_data_dir {root.name} trains "
                f"nothing; rename the folder to {name} and give its parent as --train_data_dir (checked here as 1 "
                f"repeat), or point a dataset_config subset's image_dir at it."))
            concept.append((root, 1, ""))
    return Layout(tuple(concept), tuple(findings))


# ---------------------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class _Source:
    """One image folder as training reads it, under its dataset's buckets and batch size."""

    path: Path
    repeats: int
    class_tokens: str
    caption_extension: str
    buckets: BucketSettings
    dataset: int = 0
    random_crop: bool = False
    face_crop: bool = False


def bucket_limits_for(resolution: Size) -> tuple[int, int]:
    """Bucket limits where none are given: sd-scripts' 256…1024, widened to hold the resolution (they would refuse 64
    or 2048 px)."""
    return min(HealthSettings.min_bucket_reso, *resolution), max(HealthSettings.max_bucket_reso, *resolution)


def check_dataset(folder: Path, settings: HealthSettings = HealthSettings(),
                  within: Iterable[Path] | None = None) -> HealthReport:
    """Check ``folder`` as sd-scripts' ``--train_data_dir`` (or a single image folder) under ``settings``; with
    ``within`` (the app's allowed folders) links leading outside them (sub-folders, pictures, captions) are named as
    findings and what they lead to is not read."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; give the folder that holds your <repeats>_<name> image folders.")
    within = None if within is None else list(within)
    layout = discover_layout(root, within)
    bucket_settings = settings.buckets()
    bucket_list(bucket_settings)  # bucket options that contradict the resolution: one error, not one per image
    caption_extension = checked_caption_extension(settings.caption_extension)
    sources = [_Source(path, repeats, tokens, caption_extension, bucket_settings, random_crop=settings.random_crop,
                       face_crop=settings.face_crop) for path, repeats, tokens in layout.concept_folders]
    return _report(root, str(root), sources, list(layout.findings), settings, {0: settings.batch_size}, within)


def check_dataset_config(path: Path, settings: HealthSettings, options: object | None = None,
                         within: Iterable[Path] | None = None) -> HealthReport:
    """Check the image folders a ``--dataset_config`` file names, each subset with its repeats, class tokens and
    caption extension, random_crop and face_crop_aug_range and each dataset with its buckets and batch size
    (``options``: the run's, which the file's values override, as sd-scripts reads them; ``settings.face_crop`` stands
    for a run's face_crop_aug_range). Regularisation and metadata-file subsets are named, not counted. ``within`` as
    for ``check_dataset``."""
    from lora_trainer.dataset.config import load_dataset_config

    path = Path(path)
    group = load_dataset_config(path, options)
    sources, findings, batches = [], [Finding("note", "dataset-config", "", warning) for warning in group.warnings], {}
    for index, dataset in enumerate(group.datasets):
        buckets = dataset.bucket_settings
        bucket_list(buckets)
        batches[index] = dataset.batch_size
        for subset in dataset.subsets:
            where = str(subset.image_dir or subset.metadata_file)
            if subset.is_reg or subset.metadata_file or not dataset.is_dreambooth:
                kind = "regularisation images" if subset.is_reg else "captions from a metadata file"
                findings.append(Finding("note", "not-counted", where, f"{kind}: trained, but not checked or counted here"))
                continue
            if not subset.image_dir.is_dir():
                findings.append(Finding("error", "no-folder", where, f"image_dir in {path.name} is not a folder; fix the path"))
                continue
            sources.append(_Source(subset.image_dir, subset.num_repeats, subset.class_tokens or "",
                                   checked_caption_extension(subset.caption_extension), buckets, index,
                                   subset.random_crop, subset.face_crop_aug_range is not None or settings.face_crop))
    first = group.datasets[0] if group.datasets else None
    if first and first.resolution:  # the report's header shows the first dataset's settings
        settings = replace(settings, resolution=first.resolution, batch_size=first.batch_size,
                           enable_bucket=first.enable_bucket, min_bucket_reso=first.min_bucket_reso,
                           max_bucket_reso=first.max_bucket_reso, bucket_reso_steps=first.bucket_reso_steps,
                           bucket_no_upscale=first.bucket_no_upscale)
    return _report(path.parent, str(path), sources, findings, settings, batches, None if within is None else list(within))


def _report(root: Path, label: str, sources: list[_Source], findings: list[Finding], settings: HealthSettings,
            batches: dict[int, int], within: list[Path] | None = None) -> HealthReport:
    from lora_trainer.models.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer.default()
    concept_folders: list[ConceptFolder] = []
    images: list[ImageCheck] = []
    samples_per_bucket: Counter[tuple[int, Size]] = Counter()
    hashes: dict[str, int] = {}
    frequency_by_folder: list[dict[str, int]] = []
    image_paths_by_source = []
    for source in sources:
        paths, outside = pictures_inside(list_images(source.path), source.caption_extension, within)
        image_paths_by_source.append(paths)
        if within is not None:  # outside before missing: a link to nothing elsewhere is said to lead outside
            outside += [link for link in broken_links(source.path) if not resolves_below(link, within)]
        if outside:
            findings.append(Finding("warning", "outside-link", _relative(source.path, root),
                                    outside_links_note(sorted(set(outside)))))
    facts_by_path = read_all_image_facts([path for paths in image_paths_by_source for path in paths])
    for source, image_paths in zip(sources, image_paths_by_source):
        concept_path, repeats, class_tokens, caption_extension = (source.path, source.repeats, source.class_tokens,
                                                                  source.caption_extension)
        folder_name = _relative(concept_path, root)
        findings += _folder_file_findings(concept_path, root, image_paths, caption_extension, within)
        usable = 0
        captioned_texts: dict[str, str] = {}
        trained_captions: list[str] = []
        otherwise: list[tuple[str, str]] = []  # (image, how sd-scripts trains it otherwise)
        for image_path in image_paths:
            name = _relative(image_path, root)
            facts = facts_by_path[image_path]
            if facts.problem or facts.size is None:
                problem = (facts.problem or "its size cannot be read").rstrip(".")
                findings.append(Finding("error", "corrupt-image", name, f"{problem}: sd-scripts stops on it."))
                continue
            caption, caption_source, caption_findings = _effective_caption(image_path, name, class_tokens, caption_extension)
            findings += caption_findings
            if caption_source == "file":
                captioned_texts[name] = caption
            trained_captions.append(caption)
            tokens = len(tokenizer.encode(caption)) if caption else 0
            too_long = token_count_problem(tokens, settings.max_token_length)
            if too_long:
                findings.append(Finding("warning", too_long[0], name, too_long[1]))
            hashes[name] = facts.perceptual_hash
            check = _image_check(name, folder_name, facts.size, caption, caption_source, tokens, hashes[name],
                                 source.buckets, source.random_crop, settings.cache_latents, findings,
                                 face_crop=source.face_crop, face_named=face_in_name(image_path) is not None)
            images.append(check)
            samples_per_bucket[(source.dataset, check.bucket)] += repeats
            usable += 1
            if why := facts.sd_scripts_reading:
                otherwise.append((image_path.name, why))
        if otherwise:
            findings.append(Finding("note", "sd-scripts-reads-otherwise", folder_name,
                                    f"{len(otherwise)} picture(s) sd-scripts trains otherwise than shown here (and "
                                    f"trained here), e.g. {otherwise[0][0]} {otherwise[0][1]}; `dataset prep` writes "
                                    "them as trained here, for sd-scripts too"))
        frequency_by_folder.append(tag_frequency(trained_captions))  # sd-scripts counts class-token captions too
        concept_folders.append(ConceptFolder(folder_name, repeats, class_tokens, usable, len(captioned_texts)))
        findings += _class_token_findings(folder_name, class_tokens, captioned_texts)

    if not images:
        findings.append(Finding(
            "error", "no-images", ".",
            f"{label} has no image sd-scripts would train on ({' '.join(IMAGE_EXTENSIONS)} files inside "
            "<repeats>_<name> subfolders, e.g. 10_mychar); add images or give the right folder."))

    without_trigger: tuple[str, ...] = ()
    if settings.trigger:
        without_trigger = tuple(sorted(image.path for image in images if not mentions(image.caption, settings.trigger)))
        for image_name in without_trigger:
            findings.append(Finding("warning", "missing-trigger", image_name,
                                    f"the caption lacks the trigger word '{settings.trigger}'; add it (first, if you use keep_tokens)."))
    findings += _shuffled_trigger_findings(images, settings, {f.path: f.class_tokens for f in concept_folders})
    findings += _bucket_step_findings(settings)
    duplicates = near_duplicate_groups(hashes, settings.near_duplicate_bits)
    for group in duplicates:
        findings.append(Finding("warning", "near-duplicate", group[0],
                                f"looks like {first_few(group[1:])}; near-copies count double in training: keep the best one."))

    totals: Counter[str] = Counter()
    for counts in frequency_by_folder:
        totals.update(counts)
    return HealthReport(
        folder=label,
        settings=settings,
        concept_folders=tuple(concept_folders),
        images=tuple(sorted(images, key=lambda image: image.path)),
        samples_per_epoch=sum(samples_per_bucket.values()),
        steps_per_epoch=sum(steps_per_epoch([n for (d, _), n in samples_per_bucket.items() if d == dataset], batch)
                            for dataset, batch in batches.items()),
        resolution_histogram=_histogram(_size_text(image.size) for image in images),
        bucket_histogram=_histogram(_size_text(image.bucket) for image in images),
        tag_frequency=tuple(sorted(totals.items(), key=lambda item: (-item[1], item[0]))),
        images_without_trigger=without_trigger,
        near_duplicates=duplicates,
        findings=tuple(sorted(set(findings), key=lambda f: (SEVERITY_ORDER[f.severity], f.kind, f.path, f.message))),
    )


def _image_check(name: str, folder: str, size: Size, caption: str, source: str, tokens: int, image_hash: int,
                 bucket_settings: BucketSettings, random_crop: bool, latents_cached: bool,
                 findings: list[Finding], face_crop: bool = False, face_named: bool = False) -> ImageCheck:
    """Buckets off, as training plans it: cached latents resize any size to cover the resolution; without them
    random_crop trains a patch of a larger image at its own size, a face crop (``face_crop``, where ``face_named``: the
    image's name gives its face) cuts the resolution around the face of a larger one, and sd-scripts stops on the other sizes."""
    hash_text = f"{image_hash:016x}"
    try:
        choice = select_bucket(size, bucket_settings, random_crop and not latents_cached)
    except UserError as error:
        findings.append(Finding("error", "no-bucket", name, str(error)))
        return ImageCheck(name, folder, size, caption, source, tokens, (0, 0), size, (0, 0, *size), 0.0, 1.0, hash_text)
    crop = crop_in_image_pixels(size, choice.resized_size, choice.bucket)
    kept = (crop[2] - crop[0]) * (crop[3] - crop[1])
    scale = max(choice.resized_size[0] / size[0], choice.resized_size[1] / size[1])
    if not bucket_settings.enable_bucket and not latents_cached:
        problem = fixed_resolution_problem(size, bucket_settings.resolution, random_crop, face_crop, face_named)
        if problem:
            findings.append(Finding("error", "wrong-size", name, problem))
    if scale >= TOO_SMALL_UPSCALE:
        findings.append(Finding("warning", "too-small", name,
                                f"{_size_text(size)} is enlarged {scale:.1f}x to fill the {_size_text(choice.bucket)} bucket and will "
                                "train soft; use a larger source or remove it."))
    elif scale > 1.0:
        findings.append(Finding("note", "upscaled", name,
                                f"{_size_text(size)} is enlarged {scale:.2f}x to fill the {_size_text(choice.bucket)} bucket "
                                "(bucket_no_upscale avoids that)."))
    return ImageCheck(name, folder, size, caption, source, tokens, choice.bucket, choice.resized_size, crop,
                      round(1 - kept / (size[0] * size[1]), 4), round(scale, 4), hash_text)


def _effective_caption(image: Path, name: str, class_tokens: str, extension: str) -> tuple[str, str, list[Finding]]:
    """The caption sd-scripts trains on and where it comes from, with the findings about the caption file."""
    candidates = caption_candidates(image, extension)
    caption_path = next((path for path in candidates if path.is_file()), candidates[0])
    findings: list[Finding] = []
    try:
        caption_file = load_caption_file(caption_path)
    except UserError as error:
        kind = "caption-unreadable" if isinstance(error, CaptionUnreadable) else "caption-not-utf8"
        findings.append(Finding("error", kind, _sibling_name(name, caption_path), str(error)))
        return class_tokens, "class tokens" if class_tokens else "none", findings
    if not caption_file.stamp.exists:
        target = f"the folder's class tokens '{class_tokens}'" if class_tokens else "an empty caption"
        other = other_caption_extension(image, extension)
        fix = (f"its captions are {other} files: check with --caption-extension {other} (train with --caption_extension "
               f"{other})" if other else "write a caption file")
        findings.append(Finding("warning", "missing-caption", name, f"has no {caption_path.name}, so it trains on {target}; {fix}."))
        return class_tokens, "class tokens" if class_tokens else "none", findings
    caption = training_caption(caption_file.text)
    if caption_file.sd_scripts_misreading:  # read right here: said for Kohya's tools and --backend sd-scripts
        findings.append(Finding("note", "caption-encoding", _sibling_name(name, caption_path),
                                f"{caption_file.sd_scripts_misreading}; read correctly here, but re-save it as UTF-8 "
                                "without a mark for sd-scripts (in Notepad: Encoding: UTF-8, not UTF-8 with BOM)."))
    if caption_file.text == "":
        findings.append(Finding("error", "empty-caption", _sibling_name(name, caption_path),
                                "is empty, which stops sd-scripts with an assertion error; write the caption in it or "
                                "delete the file."))
        return caption, "file", findings
    if not caption:
        findings.append(Finding("warning", "blank-first-line", _sibling_name(name, caption_path),
                                "has an empty first line, and the first line is the caption sd-scripts trains on (so "
                                "an empty caption); write the caption on the first line."))
        return caption, "file", findings
    if "\n" in caption_file.text.strip():
        findings.append(Finding("note", "multi-line-caption", _sibling_name(name, caption_path),
                                "has several lines; sd-scripts trains on the first only (all of them with enable_wildcard)."))
    return caption, "file", findings


def _sibling_name(image_name: str, sibling: Path) -> str:
    return str(Path(image_name).with_name(sibling.name).as_posix())


def _folder_file_findings(folder: Path, root: Path, images: list[Path], caption_extension: str,
                          within: list[Path] | None = None) -> list[Finding]:
    findings = []
    by_caption: dict[Path, list[Path]] = {}
    for image in images:
        by_caption.setdefault(caption_path_for(image, caption_extension), []).append(image)
    for caption, sharing in by_caption.items():
        if len(sharing) > 1:
            names = ", ".join(path.name for path in sharing)
            findings.append(Finding("warning", "shared-caption", _relative(caption, root),
                                    f"is the caption of {names} (same name, different extension); rename one image "
                                    "and give it its own caption."))
    for child in folder.iterdir():
        if child.suffix.lower() in UNREAD_PICTURE_SUFFIXES and child.is_file():
            findings.append(Finding("warning", "unread-format", _relative(child, root),
                                    f"sd-scripts does not read {child.suffix} files; convert it to PNG or JPEG."))
    if unread := images_in_unread_case(folder):
        findings.append(Finding("warning", "unread-case", _relative(folder, root), unread_case_note(unread)))
    if links := [link for link in broken_links(folder) if within is None or resolves_below(link, within)]:
        findings.append(Finding("warning", "broken-link", _relative(folder, root), broken_links_note(links)))
    if nested := nested_images_note(folder):
        findings.append(Finding("warning", "nested-images", _relative(folder, root), f"{nested}."))
    return findings


def _class_token_findings(folder: str, class_tokens: str, captions: dict[str, str]) -> list[Finding]:
    if not class_tokens or not captions:
        return []
    lacking = sorted(name for name, caption in captions.items() if not mentions(caption, class_tokens))
    if not lacking:  # ignored, but the captions carry it anyway
        return []
    return [Finding("warning", "class-tokens-ignored", folder,
                    f"the folder's class tokens '{class_tokens}' are ignored for the {len(captions)} image(s) that have a "
                    f"caption file, and {len(lacking)} of those captions do not mention them ({', '.join(Path(n).name for n in lacking[:5])}"
                    f"{' …' if len(lacking) > 5 else ''}); add '{class_tokens}' to those captions if it is your trigger.")]


# ---------------------------------------------------------------------------------------------------------------
# Text form


def _shuffled_trigger_findings(images: Sequence[ImageCheck], settings: HealthSettings,
                               class_tokens: dict[str, str]) -> list[Finding]:
    """A trigger behind the tags kept in place is shuffled like any tag: Pony's ``score_9, score_8_up, score_7_up,
    zkchar, …`` under keep_tokens 1 keeps only score_9 first. sd-scripts says nothing. The trigger is the one given,
    else each folder's class tokens (``10_zkchar``)."""
    if not settings.shuffle_caption:
        return []
    kept_options = CaptionOptions(keep_tokens=settings.keep_tokens, keep_tokens_separator=settings.keep_tokens_separator)
    late: dict[str, tuple[str, int]] = {}  # image → its trigger and that tag's place among its tags, from 1
    for image in images:
        trigger = settings.trigger or class_tokens.get(image.folder)
        if not trigger or not mentions(image.caption, trigger):
            continue
        kept, moving, kept_last = split_kept_tags(image.caption, kept_options)
        if not any(mentions(tag, trigger) for tag in kept + kept_last):
            late[image.path] = trigger, len(kept) + next(i for i, t in enumerate(moving) if mentions(t, trigger)) + 1
    if not late:
        return []
    example = min(late)
    trigger, place = late[example]
    return [Finding("warning", "trigger-shuffled", "",
                    f"{len(late)} caption(s) have the trigger behind the tags kept in place (keep_tokens "
                    f"{settings.keep_tokens}), so shuffle_caption moves it like any tag (e.g. {example}: '{trigger}' is "
                    f"tag {place}); put it first, keep more tags in place (keep_tokens "
                    f"{max(p for _, p in late.values())}), or end the kept tags with keep_tokens_separator")]


def _bucket_step_findings(settings: HealthSettings) -> list[Finding]:
    """The check does not know the model; training does, and refuses a bucket step its model's UNet cannot take
    (sd-scripts asserts a multiple of 64 in train_network.py, of 32 in sdxl_train_network.py)."""
    step = settings.bucket_reso_steps
    if not settings.enable_bucket or step % 64 == 0:
        return []
    if step % 32 == 0:
        return [Finding("note", "bucket-step-sdxl-only", "",
                        f"bucket_reso_steps {step} gives buckets only SDXL training takes: SD1/SD2 training needs a "
                        "multiple of 64; check with --bucket-reso-steps 64 for an SD1/SD2 model")]
    return [Finding("error", "bucket-step", "",
                    f"bucket_reso_steps {step}: training refuses it (SD1/SD2 need a multiple of 64, SDXL of 32); "
                    "use 64")]


def report_lines(report: HealthReport) -> list[str]:
    settings = report.settings
    width, height = settings.resolution
    buckets = (f"buckets {settings.min_bucket_reso}-{settings.max_bucket_reso} step {settings.bucket_reso_steps}"
               + (", no upscale" if settings.bucket_no_upscale else "")) if settings.enable_bucket else "no buckets"
    lines = [f"Dataset check: {report.folder}", f"  resolution {width}x{height}, {buckets}, batch size {settings.batch_size}", ""]
    lines.append("Folders:")
    for folder in report.concept_folders:
        tokens = f"class tokens '{folder.class_tokens}'" if folder.class_tokens else "no class tokens"
        lines.append(f"  {folder.path}: {folder.repeats} repeats x {folder.image_count} images = {folder.samples} samples; "
                     f"{folder.captioned_count} captioned; {tokens}")
    if not report.concept_folders:
        lines.append("  (none)")
    lines.append(f"Samples per epoch: {report.samples_per_epoch}; steps per epoch at batch size {settings.batch_size}: "
                 f"{report.steps_per_epoch}")
    lines += ["", "Image sizes:"] + _histogram_lines(report.resolution_histogram, TEXT_SIZES, "sizes")
    lines += ["Buckets:"] + _histogram_lines(report.bucket_histogram, TEXT_BUCKETS, "buckets")
    cropped = [image for image in report.images if image.cut_off >= 0.05]
    if cropped:
        lines.append(f"Crops cutting off 5% or more: {len(cropped)} image(s) (largest: "
                     + ", ".join(f"{image.path} {image.cut_off:.0%}" for image in sorted(cropped, key=lambda i: (-i.cut_off, i.path))[:5]) + ")")
    if report.tag_frequency:
        lines += ["", "Tags (most frequent first):",
                  "  " + ", ".join(f"{tag} {count}" for tag, count in report.tag_frequency[:30])
                  + (f", … ({len(report.tag_frequency)} tags)" if len(report.tag_frequency) > 30 else "")]
    if settings.trigger:
        covered = len(report.images) - len(report.images_without_trigger)
        lines.append(f"Trigger '{settings.trigger}': in {covered} of {len(report.images)} captions")
    if report.near_duplicates:
        groups = report.near_duplicates
        lines += ["", "Near-duplicates:"] + ["  " + first_few(group, TEXT_EXAMPLES, " ~ ")
                                              for group in groups[:TEXT_GROUPS]]
        if len(groups) > TEXT_GROUPS:
            lines.append(f"  … and {len(groups) - TEXT_GROUPS} more groups")
    counts = Counter(finding.severity for finding in report.findings)
    lines += ["", f"Findings: {counts['error']} error(s), {counts['warning']} warning(s), {counts['note']} note(s)"]
    for (severity, kind), of_kind in groupby(report.findings, key=lambda finding: (finding.severity, finding.kind)):
        of_kind = list(of_kind)
        for finding in of_kind[:TEXT_EXAMPLES]:
            where = f"{finding.path}: " if finding.path and finding.path != "." else ""
            lines.append(f"  {severity:<7} {kind:<20} {where}{finding.message}")
        if len(of_kind) > TEXT_EXAMPLES:
            lines.append(f"  {severity:<7} {kind:<20} … and {len(of_kind) - TEXT_EXAMPLES} more ({len(of_kind)} in all)")
    return lines


def _histogram_lines(histogram: Sequence[tuple[str, int]], shown: int, what: str) -> list[str]:
    """The ``shown`` commonest entries (the histogram is sorted so), and how many more there are."""
    lines = [f"  {size:>11}  {count}" for size, count in histogram[:shown]]
    if len(histogram) > shown:
        rest = histogram[shown:]
        lines.append(f"  … and {len(rest)} more {what} ({sum(count for _, count in rest)} images)")
    return lines
