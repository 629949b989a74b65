"""Auto-tagging: a small ``Tagger`` interface (images in, tags with confidences out), a WD14-style ONNX tagger read
from a local folder, and tagging a dataset folder without ever losing a hand-written caption.

The WD14 format is SmilingWolf's: ``model.onnx`` takes NHWC float32 images, BGR, 0–255, square, at the size its input
declares (448 for the usual models), and outputs one probability per row of ``selected_tags.csv``
(``tag_id,name,category,count``; category 9 = rating, 0 = general, 4 = character). Preprocessing follows SmilingWolf's
reference app and the WD14 tagger extension: transparency composited on white, padded to a square on white
(centred), resized to the input size with a bicubic filter, RGB → BGR. (sd-scripts' ``tag_images_by_wd14_tagger.py``
does the same apart from the resize filter: OpenCV's area filter when shrinking, Lanczos when enlarging.)

Tags are post-processed as sd-scripts does: ratings dropped, general and character tags above their thresholds,
excluded tags removed, underscores → spaces except in tags of 3 characters or fewer (kaomoji such as ``^_^``).

Writing: ``propose_captions`` tags the images and says what each caption would become, without writing anything
(a preview for the UI); ``write_proposal`` writes it through ``caption_files.write_captions`` — all-or-nothing,
previous versions backed up, refused for any caption edited by someone else in between. ``tag_folder`` does both.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping, Protocol, Sequence

import numpy as np
from PIL import Image

from lora_trainer.dataset.images import load_image, to_rgb
from lora_trainer.dataset.caption_files import CaptionStamp, caption_path_for, read_image_captions, write_captions
from lora_trainer.dataset.tag_editor import (
    DEFAULT_BACKUP_FOLDER,
    Tags,
    find_images,
    join_tags,
    split_tags,
    underscores_to_spaces,
)
from lora_trainer.dataset.layouts import IMAGE_EXTENSIONS
from lora_trainer.errors import UserError

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
RATING, GENERAL, CHARACTER = 9, 0, 4
DEFAULT_INPUT_SIZE = 448

ExistingCaptionMode = Literal["skip", "append", "prepend", "overwrite"]
EXISTING_CAPTION_MODES: tuple[ExistingCaptionMode, ...] = ("skip", "append", "prepend", "overwrite")


class Tagger(Protocol):
    """Anything that tags images: the WD14 ONNX tagger here, the WebUI's DeepBooru or CLIP interrogator in the
    WebUI layer. ``tag`` returns, for each image, the tags it found with their confidence (1.0 when the tagger has
    none), most confident first."""

    name: str

    def tag(self, images: list[Image.Image]) -> list[dict[str, float]]: ...


# ---------------------------------------------------------------------------------------------------------------
# WD14: labels, preprocessing, post-processing, the ONNX session.


@dataclass(frozen=True)
class Label:
    name: str
    category: int


@dataclass(frozen=True)
class TagSelection:
    """Which of a WD14 model's tags to keep (sd-scripts' defaults: 0.35 for both thresholds; the WD14 extension
    uses 0.35 and 0.85)."""

    general_threshold: float = 0.35
    character_threshold: float = 0.85
    excluded_tags: frozenset[str] = frozenset()
    underscores_to_spaces: bool = True

    def is_excluded(self, name: str) -> bool:
        return name in self.excluded_tags or underscores_to_spaces(name) in self.excluded_tags


def read_labels(csv_path: Path) -> list[Label]:
    """Read ``selected_tags.csv`` (SmilingWolf's columns ``tag_id,name,category,count``)."""
    try:
        with open(csv_path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except UnicodeDecodeError:
        raise UserError(f"{csv_path} is not UTF-8 text: download the tagger's {TAGS_FILE} again.") from None
    if not rows or "name" not in rows[0] or "category" not in rows[0]:
        raise UserError(f"{csv_path} lacks the columns name and category (expected tag_id,name,category,count).")
    try:
        return [Label(row["name"], int(row["category"])) for row in rows]
    except (TypeError, ValueError):
        raise UserError(f"{csv_path} has a row whose category is not a number.") from None


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """One image as the WD14 model wants it: (size, size, 3) float32, BGR, 0–255, padded square on white (16-bit
    images scaled to 8 bits as training reads them: Pillow's own conversion clips them to white)."""
    image = to_rgb(image)
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


def select_tags(probabilities: np.ndarray, labels: Sequence[Label], selection: TagSelection) -> dict[str, float]:
    """One image's kept tags with their probabilities, most confident first."""
    kept: dict[str, float] = {}
    for index in np.argsort(-probabilities, kind="stable"):
        label, probability = labels[index], float(probabilities[index])
        threshold = {GENERAL: selection.general_threshold, CHARACTER: selection.character_threshold}.get(label.category)
        if threshold is None or probability < threshold or selection.is_excluded(label.name):
            continue
        name = underscores_to_spaces(label.name) if selection.underscores_to_spaces else label.name
        kept.setdefault(name, probability)
    return kept


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError(
            "The WD14 tagger needs onnxruntime: run `pip install onnxruntime` (or `onnxruntime-gpu` for an NVIDIA GPU) "
            "in this Python environment, or install this package with its `tagger` extra."
        ) from None
    return onnxruntime


def check_tagger_folder(folder: Path) -> None:
    """A WD14 tagger folder must hold both ``model.onnx`` and ``selected_tags.csv``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"Tagger folder {folder} does not exist.")
    missing = [name for name in (MODEL_FILE, TAGS_FILE) if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"Tagger folder {folder} lacks {' and '.join(missing)}: put the WD14 model's {MODEL_FILE} and {TAGS_FILE} "
            "(from the same model page) into it."
        )


class WD14Tagger:
    """A WD14-style ONNX tagger from a local folder (``model.onnx`` + ``selected_tags.csv``)."""

    def __init__(
        self,
        folder: Path,
        selection: TagSelection = TagSelection(),
        batch_size: int = 8,
        providers: Sequence[str] | None = None,
    ) -> None:
        folder = Path(folder)
        check_tagger_folder(folder)
        self.labels = read_labels(folder / TAGS_FILE)
        onnxruntime = _import_onnxruntime()
        available = onnxruntime.get_available_providers()
        chosen = list(providers) if providers else [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = onnxruntime.InferenceSession(str(folder / MODEL_FILE), providers=chosen)
        except Exception as error:  # onnxruntime raises its own exception types for unreadable models
            raise UserError(f"{folder / MODEL_FILE} could not be loaded by onnxruntime: {error}") from None
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        batch, height = model_input.shape[0], model_input.shape[1]
        self.input_size = height if isinstance(height, int) and height > 0 else DEFAULT_INPUT_SIZE
        # some exported models have a fixed batch dimension; use it rather than fail
        self.batch_size = batch if isinstance(batch, int) and batch > 0 else batch_size
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.labels):
            raise UserError(
                f"{folder / MODEL_FILE} outputs {outputs} tags but {folder / TAGS_FILE} lists {len(self.labels)}: "
                "the two files come from different models."
            )
        self.selection = selection
        self.name = f"WD14 {folder.name}"

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        """(len(images), tags) probabilities, run in batches of ``batch_size``."""
        results = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack([prepare_image(image, self.input_size) for image in images[start:start + self.batch_size]])
            results.append(self.session.run(None, {self.input_name: batch})[0])
        return np.concatenate(results) if results else np.zeros((0, len(self.labels)), dtype=np.float32)

    def tag(self, images: list[Image.Image]) -> list[dict[str, float]]:
        return [select_tags(row, self.labels, self.selection) for row in self.probabilities(images)]


# ---------------------------------------------------------------------------------------------------------------
# Tagging a folder.


def merged_caption(existing: Tags, found: Tags, mode: ExistingCaptionMode, trigger_word: str | None = None) -> Tags | None:
    """The tags a caption gets from the tagger's ``found`` tags; None means "leave the caption file alone".
    ``skip`` tags only images without a caption; ``append``/``prepend`` add the new tags after/before the existing
    ones (no duplicates); ``overwrite`` replaces them. A trigger word goes first in whatever is written."""
    if mode not in EXISTING_CAPTION_MODES:
        raise UserError(f"Unknown mode {mode!r} for existing captions; use one of {', '.join(EXISTING_CAPTION_MODES)}.")
    if existing and mode == "skip":
        return None
    new = tuple(tag for tag in found if tag not in existing)
    tags = {"append": existing + new, "prepend": new + existing}.get(mode, found)
    if trigger_word:
        tags = (trigger_word,) + tuple(tag for tag in tags if tag != trigger_word)
    tags = tuple(dict.fromkeys(tags))
    return None if existing and tags == existing else tags


def load_image_for_tagging(path: Path) -> Image.Image:
    """The image as training reads it (``images.load_image``: upright, the first frame, transparency on white, 16
    bits scaled), so the tags describe what trains; ``ImageError`` names the file and why not."""
    return load_image(path)


@dataclass(frozen=True)
class TaggingProposal:
    """What tagging would write: ``captions`` maps caption files to their new text; ``skipped`` are images whose
    hand-written caption is kept (mode ``skip``) or already has every tag; ``unreadable`` maps images that could not
    be opened to why. ``found`` keeps each tagged image's tags and confidences for display."""

    captions: Mapping[Path, str]
    stamps: Mapping[Path, CaptionStamp]
    skipped: tuple[Path, ...] = ()
    unreadable: Mapping[Path, str] = field(default_factory=dict)
    found: Mapping[Path, dict[str, float]] = field(default_factory=dict)


def propose_captions(
    images: Iterable[Path],
    tagger: Tagger,
    *,
    mode: ExistingCaptionMode = "skip",
    trigger_word: str | None = None,
    caption_extension: str = ".txt",
    batch_size: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
) -> TaggingProposal:
    """Tag the images that need it and work out their new captions; writes nothing."""
    if mode not in EXISTING_CAPTION_MODES:
        raise UserError(f"Unknown mode {mode!r} for existing captions; use one of {', '.join(EXISTING_CAPTION_MODES)}.")
    captions = read_image_captions(list(images), caption_extension)
    stamps, unreadable = captions.stamps, dict(captions.unreadable)
    # a caption's tags are its first line, which training reads; the lines after it are kept as they are
    lines = {image: text.partition("\n") for image, text in captions.texts.items()}
    existing: dict[Path, Tags] = {image: split_tags(first) for image, (first, _, _) in lines.items()}
    skipped: list[Path] = []
    to_tag: list[Path] = []
    for image in existing:
        if mode == "skip" and existing[image]:
            skipped.append(image)  # decided before loading the image: hand-written captions cost no tagging time
        else:
            to_tag.append(image)
    captions: dict[Path, str] = {}
    found: dict[Path, dict[str, float]] = {}
    for start in range(0, len(to_tag), batch_size):
        batch, pictures = [], []
        for image in to_tag[start:start + batch_size]:
            try:
                pictures.append(load_image_for_tagging(image))
                batch.append(image)
            except (UserError, OSError, ValueError) as error:  # ImageError names the file already
                unreadable[image] = str(error) if isinstance(error, UserError) else f"{image} could not be read as an image ({error})."
        results = tagger.tag(pictures) if pictures else []
        if len(results) != len(pictures):
            raise UserError(f"The tagger {tagger.name} returned {len(results)} results for {len(pictures)} images.")
        for image, tags in zip(batch, results):
            found[image] = tags
            merged = merged_caption(existing[image], tuple(tags), mode, trigger_word)
            if merged is None:
                skipped.append(image)
            else:
                later = lines[image][2]
                captions[caption_path_for(image, caption_extension)] = join_tags(merged) + (f"\n{later}" if later else "")
        if on_progress:
            on_progress(min(start + batch_size, len(to_tag)), len(to_tag))
    return TaggingProposal(captions, {path: stamps[path] for path in captions}, tuple(skipped), unreadable, found)


@dataclass(frozen=True)
class TaggingResult:
    written: tuple[Path, ...]
    skipped: tuple[Path, ...]
    unreadable: Mapping[Path, str]
    backup_folder: Path | None


def write_proposal(proposal: TaggingProposal, backup_dir: Path | None) -> TaggingResult:
    """Write the proposed captions all-or-nothing, backing up the ones that existed; refused (nothing written) if
    any caption changed on disk since ``propose_captions`` read it."""
    result = write_captions(proposal.captions, backup_dir, proposal.stamps)
    return TaggingResult(tuple(proposal.captions), proposal.skipped, proposal.unreadable, result.backup_folder)


def tag_folder(
    folder: Path,
    tagger: Tagger,
    *,
    mode: ExistingCaptionMode = "skip",
    trigger_word: str | None = None,
    recursive: bool = False,
    caption_extension: str = ".txt",
    backup_dir: Path | str | None = DEFAULT_BACKUP_FOLDER,
    batch_size: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
) -> TaggingResult:
    """Tag a folder's images and write their captions. By default (mode ``skip``) only images without a caption (or
    with an empty one) are tagged, so hand-written captions are never touched. ``backup_dir`` is relative to
    ``folder`` unless absolute (None: no backup)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder.")
    images = find_images(folder, recursive)
    if not images:
        raise UserError(f"{folder} holds no images ({' '.join(IMAGE_EXTENSIONS)}) to tag.")
    proposal = propose_captions(
        images,
        tagger,
        mode=mode,
        trigger_word=trigger_word,
        caption_extension=caption_extension,
        batch_size=batch_size,
        on_progress=on_progress,
    )
    return write_proposal(proposal, None if backup_dir is None else folder / backup_dir)
