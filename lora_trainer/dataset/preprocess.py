"""Preprocessing: crop and resize a folder of images into a new folder, ready to train.

Each image becomes a square (``size`` × ``size``) or its sd-scripts bucket for a ``size`` resolution, cut with
sd-scripts' centre crop or around the most interesting part (``focus``: faces, else saliency); optionally never
enlarged, with mirrored copies, and with a *face emphasis* subset — a ``<repeats>_<name> face`` folder of face
close-ups that training repeats on their own, what beginners know as "face enhancement training".

The planning is pure (``crop_target``, ``plan_crop``, ``plan_face_crop``, ``plan_outputs``: sizes and boxes in, boxes
and paths out); ``prepare_dataset`` reads, resamples and writes. Sources are only read: the output goes into a new
(or empty) folder outside the source, each image through a temporary file and a rename, and the captions — read up
front, so a caption that cannot be read stops the run before anything is written — go in at the end through
``caption_files.write_captions``. Sub-folders are mirrored, so a ``10_name`` layout stays one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from lora_trainer.dataset.buckets import BucketChoice, BucketSettings, centre_crop_box, nearest_bucket, select_bucket
from lora_trainer.dataset.caption_files import caption_path_for, load_caption_file, write_captions
from lora_trainer.dataset.focus import Box, best_offset, face_detector_available, interest_of, require_face_detector
from lora_trainer.dataset.images import ImageError, load_image_and_alpha
from lora_trainer.dataset.layouts import (IMAGE_EXTENSIONS, broken_links, caption_candidates, first_few, list_images,
                                         other_caption_extension, outside_links_note, parse_repeats_folder_name,
                                         pictures_inside, UNREAD_PICTURE_SUFFIXES)
from lora_trainer.errors import UserError
from lora_trainer.safe_io import resolves_below

Size = tuple[int, int]
SourceBox = tuple[float, float, float, float]

CROP_MODES = ("centre", "focal")
# A face close-up shows the face and some hair and neck: the square is this many face widths wide.
FACE_CROP_FACES_WIDE = 2.0
# A face whose close-up would be enlarged more than this trains blurry: it gets no close-up.
MAX_FACE_UPSCALE = 2.0
_SAVE_OPTIONS = {
    ".png": ("PNG", {"compress_level": 3}),  # level 6 (Pillow's default) costs 2x the time for 3% smaller files
    ".jpg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".jpeg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".webp": ("WEBP", {"quality": 95}),
    ".bmp": ("BMP", {}),
}


@dataclass(frozen=True)
class PrepSettings:
    size: int = 512
    buckets: bool = False
    crop: str = "centre"
    no_upscale: bool = False
    flip: bool = False
    face_emphasis_repeats: int | None = None
    caption_extension: str = ".txt"
    overwrite: bool = False
    bucket_reso_steps: int = 64

    def __post_init__(self) -> None:
        if self.crop == "center":
            object.__setattr__(self, "crop", "centre")
        if self.crop not in CROP_MODES:
            raise UserError(f"crop is {self.crop!r}; use one of {', '.join(CROP_MODES)}.")
        if self.size < 64:
            raise UserError(f"size is {self.size}; give the training resolution in pixels, e.g. --size 512.")
        if self.face_emphasis_repeats is not None and self.face_emphasis_repeats < 1:
            raise UserError(f"--face-emphasis is {self.face_emphasis_repeats}; give the face folder's repeats, 1 or more.")
        if not self.caption_extension.startswith("."):
            object.__setattr__(self, "caption_extension", "." + self.caption_extension)

    def bucket_settings(self) -> BucketSettings:
        """sd-scripts' bucket options for a ``size`` resolution: its defaults for 512 (256–1024), scaled for others,
        the smallest never below one bucket step (sd-scripts' minimum: a 64 px run would else be refused, naming a
        min_bucket_reso that prep has no option for)."""
        return BucketSettings((self.size, self.size), True, max(self.size // 2, self.bucket_reso_steps), self.size * 2,
                              self.bucket_reso_steps, self.no_upscale)


@dataclass(frozen=True)
class CropPlan:
    """Cut ``source_box`` (the image's own pixels, floats) and resample it to ``output_size``; ``scale`` above 1
    means the image is enlarged."""

    source_box: SourceBox
    output_size: Size
    scale: float


# ---------------------------------------------------------------------------------------------------------------
# Pure planning


def crop_target(image_size: Size, settings: PrepSettings) -> BucketChoice:
    """The output size and the size the whole image is scaled to before cropping (covering the output)."""
    if settings.buckets:
        return select_bucket(image_size, settings.bucket_settings())
    side = settings.size
    if settings.no_upscale and min(image_size) < side:
        side = min(image_size)  # cropped to a square at its own size, never enlarged
    return nearest_bucket(image_size, ((side, side),))


def plan_crop(image_size: Size, settings: PrepSettings, interest: np.ndarray | None = None) -> CropPlan:
    """Where to cut one image: sd-scripts' centre crop, or, given an ``Interest`` grid, the span along the cropped
    side that holds the most weight."""
    choice = crop_target(image_size, settings)
    resized, bucket = choice.resized_size, choice.bucket
    left, top, right, bottom = centre_crop_box(resized, bucket)
    if interest is not None and settings.crop == "focal":
        if resized[0] > bucket[0]:
            left = best_offset(interest.sum(axis=0), resized[0], bucket[0])
            right = left + bucket[0]
        if resized[1] > bucket[1]:
            top = best_offset(interest.sum(axis=1), resized[1], bucket[1])
            bottom = top + bucket[1]
    scale_x, scale_y = resized[0] / image_size[0], resized[1] / image_size[1]
    box = (left / scale_x, top / scale_y, min(right, resized[0]) / scale_x, min(bottom, resized[1]) / scale_y)
    return CropPlan(box, bucket, max(scale_x, scale_y))


def plan_face_crop(image_size: Size, face: Box, settings: PrepSettings) -> CropPlan | None:
    """A square close-up around ``face`` (inside the image), or None when it would be enlarged more than
    ``MAX_FACE_UPSCALE`` (a face too small for the size)."""
    width, height = image_size
    face_left, face_top, face_right, face_bottom = face
    side = min(width, height, FACE_CROP_FACES_WIDE * max(face_right - face_left, face_bottom - face_top))
    centre_x, centre_y = (face_left + face_right) / 2, (face_top + face_bottom) / 2
    left = min(max(0.0, centre_x - side / 2), width - side)
    top = min(max(0.0, centre_y - side / 2), height - side)
    output = settings.size if not settings.no_upscale else min(settings.size, int(side))
    scale = output / side
    if scale > MAX_FACE_UPSCALE:
        return None
    return CropPlan((left, top, left + side, top + side), (output, output), scale)


def face_folder_name(repeats: int, relative_folder: Path, source_name: str) -> str:
    """``10_zkstar/…`` → ``"<repeats>_zkstar face"``; for images at the top, the source folder's name is used."""
    top_folder = relative_folder.parts[0] if relative_folder.parts else source_name
    parsed = parse_repeats_folder_name(top_folder)
    name = (parsed[1] if parsed else top_folder) or "face"
    return f"{repeats}_{name} face" if name != "face" else f"{repeats}_face"


def flipped_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}_flip{path.suffix}")


@dataclass(frozen=True)
class PrepItem:
    """One source image, where its outputs go, and the caption text to write beside each (None: no caption file)."""

    source: Path
    output: Path
    caption: str | None
    flipped: Path | None = None
    face: Path | None = None


def plan_outputs(source_root: Path, out_root: Path, images: list[Path], captions: dict[Path, str | None],
                 settings: PrepSettings) -> list[PrepItem]:
    """Mirror each image's place under ``source_root`` into ``out_root``, plus its flipped and face paths."""
    items = []
    for image in images:
        relative = image.relative_to(source_root)
        output = out_root / relative
        if output.suffix.lower() not in _SAVE_OPTIONS:  # read through a plug-in (.avif, .jxl) that may not write
            output = output.with_suffix(".png")
        face = None
        if settings.face_emphasis_repeats:
            face = out_root / face_folder_name(settings.face_emphasis_repeats, relative.parent, source_root.name) / image.name
        items.append(PrepItem(image, output, captions.get(image), flipped_path(output) if settings.flip else None, face))
    return items


def check_folders(source: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output that would touch the source or mix with older files."""
    if not source.is_dir():
        raise UserError(f"{source} is not a folder; give the folder of images to prepare.")
    source_resolved, out_resolved = source.resolve(), out.resolve()
    suggestion = source_resolved.parent / f"{source_resolved.name}-prepared"
    if out_resolved == source_resolved or source_resolved in out_resolved.parents:
        raise UserError(f"The output folder {out} is inside the source {source}; sources are never written to: "
                        f"choose a folder outside it, e.g. {suggestion}.")
    if out_resolved in source_resolved.parents:
        raise UserError(f"The source {source} is inside the output folder {out}; choose a separate output folder, "
                        f"e.g. {suggestion}.")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for the prepared images.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"The output folder {out} is not empty; choose a new folder, or add --overwrite to replace "
                        "files of the same name in it.")


# pictures training does not read (and training's own, in a case it does not read): said, as a prepared folder
# without them is missing what the user put in
_PICTURE_SUFFIXES = frozenset((*UNREAD_PICTURE_SUFFIXES, *IMAGE_EXTENSIONS))


def find_source_images(source: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Training images in ``source`` and its sub-folders (hidden ones skipped), sorted by folder, then name; the
    pictures among the other files, which training would not read either (``a.Jpg``: the case of its extension); and
    the images that are links to files that are not there."""
    images: list[Path] = []
    not_read: list[Path] = []
    links: list[Path] = []
    for folder, subfolders, names in os.walk(source):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found = list_images(Path(folder))
        images += found
        missing = broken_links(Path(folder))
        links += missing
        read = {path.name for path in [*found, *missing]}
        not_read += sorted(Path(folder) / name for name in names if not name.startswith(".") and name not in read
                           and os.path.splitext(name)[1].lower() in _PICTURE_SUFFIXES)
    return images, not_read, links


def read_source_captions(images: list[Path], caption_extension: str) -> dict[Path, str | None]:
    """Every image's caption text (as sd-scripts would find it), read before anything is written; a caption that
    cannot be read stops here with the file named."""
    captions: dict[Path, str | None] = {}
    for image in images:
        found = next((path for path in caption_candidates(image, caption_extension) if path.is_file()), None)
        captions[image] = None if found is None else load_caption_file(found).text
    return captions


# ---------------------------------------------------------------------------------------------------------------
# Running


# The summary names this many pictures of each list: 1500 photos smaller than the target made one line of 1300 names.
_NAMED = 10


def _names(names: tuple[str, ...]) -> str:
    return f"{len(names)} pictures: {first_few(names, _NAMED)}" if len(names) > _NAMED else first_few(names, _NAMED)


@dataclass(frozen=True)
class PrepResult:
    out: Path
    images: int
    flipped: int
    face_crops: int
    captions: int
    enlarged: tuple[str, ...] = ()
    without_face: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0
    face_folders: tuple[str, ...] = field(default=())
    flattened: tuple[str, ...] = ()  # transparent pictures written where the format holds no transparency
    not_read: tuple[str, ...] = ()  # pictures in a format (or an extension's case) training does not read
    captions_elsewhere: str = ""  # the other usual caption extension, where the chosen one found none and it does
    outside_links: tuple[str, ...] = ()  # pictures and captions that are links leading outside the allowed folders

    def summary(self) -> str:
        lines = [f"Wrote {self.images} images, {self.flipped} flipped copies, {self.face_crops} face close-ups and "
                 f"{self.captions} captions to {self.out} in {self.seconds:.1f} s."]
        if self.face_folders:
            lines.append(f"Face folders: {', '.join(self.face_folders)}")
        if self.enlarged:
            lines.append(f"Enlarged (smaller than the target; --no-upscale keeps them small): {_names(self.enlarged)}")
        if self.without_face:
            lines.append(f"No usable face found (no close-up written): {_names(self.without_face)}")
        if self.flattened:
            lines.append("Transparent parts flattened onto white (their format holds no transparency, which "
                         f"--alpha_mask would train with; PNG and WebP keep it): {_names(self.flattened)}")
        if self.not_read:
            lines.append(f"Not prepared, as training would not read them ({', '.join(IMAGE_EXTENSIONS)} in lower or "
                         f"upper case): {_names(self.not_read)}")
        for name, reason in self.skipped[:_NAMED]:
            lines.append(f"Skipped {name}: {reason}")
        if len(self.skipped) > _NAMED:
            lines.append(f"… and {len(self.skipped) - _NAMED} more skipped ({len(self.skipped)} in all)")
        if self.outside_links:
            lines.append(f"Not prepared: {outside_links_note([Path(name) for name in self.outside_links])}")
        if self.captions_elsewhere:
            lines.append(f"No caption was carried along: the pictures have {self.captions_elsewhere} captions; give "
                         f"--caption-extension {self.captions_elsewhere} to copy those")
        return "\n".join(lines)


def _save(image, target: Path) -> None:
    from lora_trainer.safe_io import atomic_path

    image_format, options = _SAVE_OPTIONS[target.suffix.lower()]
    with atomic_path(target) as temporary:
        image.save(temporary, format=image_format, **options)


_KEEPS_TRANSPARENCY = (".png", ".webp")


def _cut(image, plan: CropPlan, alpha=None):
    """The crop, resampled; with ``alpha`` (the picture's transparency, cut the same way) as an RGBA picture."""
    from PIL import Image

    # reducing_gap: shrink by whole factors first (fast), then Lanczos the rest; indistinguishable at gap 3
    cut = image.resize(plan.output_size, Image.Resampling.LANCZOS, box=plan.source_box, reducing_gap=3.0)
    if alpha is not None:
        cut.putalpha(alpha.resize(plan.output_size, Image.Resampling.LANCZOS, box=plan.source_box, reducing_gap=3.0))
    return cut


def prepare_dataset(source: Path, out: Path, settings: PrepSettings = PrepSettings(),
                    progress: Callable[[int, int], None] | None = None,
                    within: Iterable[Path] | None = None) -> PrepResult:
    """Crop and resize every image under ``source`` into ``out`` (see the module's description). With ``within``
    (the app's dataset folders) a picture or caption that is a link leading outside them is neither read nor copied:
    its picture is left out and the links named."""
    from PIL import ImageOps

    started = time.perf_counter()
    source, out = Path(source), Path(out)
    check_folders(source, out, settings.overwrite)
    if settings.face_emphasis_repeats:
        require_face_detector()
    images, not_read, links = find_source_images(source)
    within = None if within is None else list(within)
    images, outside = pictures_inside(images, settings.caption_extension, within)
    if within is not None:  # outside before missing: nothing is said of what lies elsewhere
        outside += [link for link in links if not resolves_below(link, within)]
        links = [link for link in links if resolves_below(link, within)]
    outside_names = tuple(sorted({path.relative_to(source).as_posix() for path in outside}))
    if not images and outside:
        raise UserError(f"Nothing was written: {outside_links_note([Path(name) for name in outside_names])}.")
    if not images:
        raise UserError(f"{source} has no images ({' '.join(IMAGE_EXTENSIONS)}); nothing was written.")
    items = plan_outputs(source, out, images, read_source_captions(images, settings.caption_extension), settings)
    use_faces = face_detector_available() and (settings.crop == "focal" or bool(settings.face_emphasis_repeats))

    captions: dict[Path, str] = {}
    written = flipped = faces = 0
    enlarged, without_face, flattened, face_folders = [], [], [], set()
    skipped = [(link.relative_to(source).as_posix(), "a link to a file that is not there (a drive not mounted?)")
               for link in links]
    for index, item in enumerate(items):
        name = item.source.relative_to(source).as_posix()
        try:
            image, alpha = load_image_and_alpha(item.source)  # colours over white, as training reads them
        except ImageError as error:
            skipped.append((name, str(error)))
            continue
        if alpha is not None and alpha.getextrema()[0] == 255:  # an alpha channel with nothing transparent
            alpha = None
        if alpha is not None and item.output.suffix.lower() not in _KEEPS_TRANSPARENCY:
            flattened.append(name)
            alpha = None
        interest = interest_of(image, use_faces) if settings.crop == "focal" or settings.face_emphasis_repeats else None
        try:
            plan = plan_crop(image.size, settings, interest.weights if interest else None)
        except UserError as error:  # no bucket fits this shape (a 1×4000 sliver with --no-upscale): this image only
            skipped.append((name, str(error)))
            continue
        result = _cut(image, plan, alpha)
        _save(result, item.output)
        written += 1
        if plan.scale > 1.0:
            enlarged.append(name)
        outputs = [item.output]
        if item.flipped:
            _save(ImageOps.mirror(result), item.flipped)
            outputs.append(item.flipped)
            flipped += 1
        if item.face:
            face_plan = plan_face_crop(image.size, interest.faces[0], settings) if interest and interest.faces else None
            if face_plan is None:
                without_face.append(name)
            else:
                _save(_cut(image, face_plan, alpha), item.face)
                outputs.append(item.face)
                face_folders.add(item.face.parent.name)
                faces += 1
        if item.caption is not None:
            captions.update({caption_path_for(output, settings.caption_extension): item.caption for output in outputs})
        if progress:
            progress(index + 1, len(items))
    write_captions(captions, backup_dir=None)
    elsewhere = "" if captions else next(filter(None, (other_caption_extension(image, settings.caption_extension)
                                                       for image in images)), "")
    return PrepResult(out, written, flipped, faces, len(captions), tuple(enlarged), tuple(without_face), tuple(skipped),
                      time.perf_counter() - started, tuple(sorted(face_folders)), tuple(flattened),
                      tuple(path.relative_to(source).as_posix() for path in not_read), elsewhere, outside_names)
