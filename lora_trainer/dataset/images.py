"""Image files as training data: sizes from headers, pixels as RGB, and every unreadable file reported, not fatal.

sd-scripts reads sizes with ``imagesize`` and pixels with ``Image.open(...).convert("RGB")``: EXIF orientation is
ignored (phone photos train sideways), transparency becomes black, 16-bit greyscale turns white, and one bad file
stops the run. Here:
- EXIF orientation is applied, to the size read from the header and to the pixels alike, so the bucket chosen from
  the size is the bucket the pixels fit;
- transparent pixels (RGBA, LA, palette with transparency) are composited on a background colour, white unless the
  caller picks another;
- CMYK, palette, greyscale, 16-bit and 32-bit greyscale become 8-bit RGB (16-bit by its high byte, not clipped);
- animated files give their first frame;
- an image with more pixels than ``max_pixels`` is refused before it is decoded (Pillow's own decompression-bomb
  guard also stays on);
- empty, truncated and non-image files become ``ImageProblem``s; the batch functions return the good images and the
  list of problems so the rest of the dataset proceeds.
- ``checked_image_size`` decodes the pixels once as well (a JPEG at an eighth of its size, still to the end of its
  stream): a file truncated after a good header is found before training, where it can be skipped like any other
  unreadable file.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from lora_trainer.errors import UserError

Size = tuple[int, int]
Colour = tuple[int, int, int]

WHITE: Colour = (255, 255, 255)
DEFAULT_MAX_PIXELS = 100_000_000  # 10,000 x 10,000: far above any training image, far below what exhausts memory

_ORIENTATION_TAG = 0x0112
# EXIF orientation → the transpose that makes the picture upright (the same table as ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class ImageError(UserError):
    """An image file that cannot be used, with the file and the reason in one sentence."""


@dataclass(frozen=True)
class ImageProblem:
    path: Path
    reason: str

    @property
    def message(self) -> str:
        return f"{self.path}: {self.reason}"


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1_000_000:.0f} megapixels" if pixels >= 10_000_000 else f"{pixels / 1_000_000:.1f} megapixels"


def _check_pixels(path: Path, size: Size, max_pixels: int) -> None:
    pixels = size[0] * size[1]
    if pixels > max_pixels:
        raise ImageError(
            f"{path} is {size[0]}x{size[1]} ({_megapixels(pixels)}), over the limit of {_megapixels(max_pixels)}; "
            "downscale it first (or raise max_pixels)."
        )


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only); the caller closes the image."""
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path} is an empty file (0 bytes); delete it or copy the image again.")
    except FileNotFoundError:
        raise ImageError(f"{path} does not exist.") from None
    try:
        with warnings.catch_warnings():
            # between Pillow's warning and error thresholds our own limit speaks instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        found = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f" ({_megapixels(int(found.group(1)))})" if found else ""
        raise ImageError(f"{path} is too large to decode safely{pixels}, over Pillow's limit; downscale it first.") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image Pillow can read (a renamed or damaged file?); re-export it or remove it.") from None
    except OSError as error:
        raise ImageError(f"{path} cannot be read ({error}).") from None
    try:
        _check_pixels(path, image.size, max_pixels)
    except ImageError:
        image.close()
        raise
    return image


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 = upright) from what Pillow parsed when opening; never decodes the pixels (a PNG's
    late ``eXIf`` chunk is ignored, in the size and in the pixels alike)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block only loses the orientation, never the image
        return 1
    return orientation if orientation in _UPRIGHT else 1


def _upright_size(image: Image.Image) -> Size:
    """(width, height) of an opened image as the picture is seen upright; read before decoding (a PNG's late EXIF
    chunk, parsed only by decoding, is ignored as ``load_image`` ignores it)."""
    width, height = image.size
    return (height, width) if exif_orientation(image) in _SWAPS_SIDES else (width, height)


def _undecodable(path: Path, error: Exception) -> ImageError:
    """The message of a file whose header reads but whose pixels do not decode."""
    reason = "is truncated (the file ends early)" if "truncated" in str(error) else f"cannot be decoded ({error})"
    return ImageError(f"{path} {reason}; re-export or re-download it, or remove it.")


def read_image_size(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Size:
    """(width, height) as the picture is seen upright, read from the header without decoding the pixels."""
    path = Path(path)
    with _open(path, max_pixels) as image:
        return _upright_size(image)


class _Decoded(NamedTuple):
    image: Image.Image  # as stored: not yet turned upright
    size: Size  # upright, at full size (a JPEG's pixels may be decoded smaller)
    orientation: int


@contextmanager
def _decoded(path: Path, max_pixels: int, at_least: Size | None = None) -> Iterator[_Decoded]:
    """The file opened and every pixel of its first frame decoded — a JPEG at a fraction of its size down to
    ``at_least`` (other formats ignore it) — with the picture's upright size and EXIF orientation, read before the
    decoding shrinks it. A damaged file is an ``ImageError`` naming it; the image is closed on leaving."""
    with _open(path, max_pixels) as image:
        size, orientation = _upright_size(image), exif_orientation(image)
        if at_least:
            image.draft(None, at_least)
        _decode(image, path)
        yield _Decoded(image, size, orientation)


# asked of ``Image.draft``: the smallest scale libjpeg offers, an eighth of each side
_SMALLEST_DRAFT: Size = (1, 1)


def _turned_upright(image: Image.Image, orientation: int) -> Image.Image:
    return image.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else image


@contextmanager
def _conversion_problems(path: Path) -> Iterator[None]:
    """A mode Pillow cannot convert (LAB, say) is as unreadable as a damaged file: an ``ImageError`` naming it."""
    try:
        yield
    except MemoryError:
        raise
    except Exception as error:
        raise _undecodable(path, error) from None


def checked_image_size(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Size:
    """``read_image_size`` once every pixel has been decoded (the first frame of an animation): a file damaged
    after a good header (truncated, corrupt data) is an ``ImageError`` here, like a file Pillow cannot open, so it
    can be left out of a dataset before training, not found when ``load_image`` reads it part-way through a run.
    A JPEG is decoded at an eighth of its size, which still reads its whole stream (a 12-megapixel photo in a
    fraction of the time); the size returned is the full one."""
    with _decoded(Path(path), max_pixels, _SMALLEST_DRAFT) as decoded:
        return decoded.size


def checked_size_and_thumbnail(path: Path, side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Size, Image.Image]:
    """``checked_image_size`` and a grey ``side``×``side`` thumbnail of the picture upright (over white where
    transparent, as ``load_image`` reads it). Every pixel is still decoded, so damage is found, but a JPEG at down to
    an eighth of its size (still 4 source pixels a thumbnail pixel)."""
    path = Path(path)
    with _decoded(path, max_pixels, (side * 4, side * 4)) as decoded, _conversion_problems(path):
        small = to_rgb(decoded.image).convert("L").resize((side, side), Image.Resampling.BOX)
        # a square turned or mirrored is the turned square of the picture: turned here, at 32 pixels
        return decoded.size, _turned_upright(small, decoded.orientation)


def _decode(image: Image.Image, path: Path) -> None:
    """Every pixel of the first frame; a damaged file (truncated, corrupt data) is an ``ImageError`` naming it."""
    try:
        image.seek(0)
        image.load()
    except MemoryError:
        raise
    except Exception as error:  # decoders raise OSError, SyntaxError, zlib/struct errors… for damaged files
        raise _undecodable(path, error) from None


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if values.dtype != np.uint8 and values.max(initial=0) > 255:
        values = values.astype(np.uint32) >> 8
    grey = np.clip(values, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def to_rgb(image: Image.Image, background: Colour = WHITE) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparency composited over ``background``."""
    if image.mode == "RGB":
        return image
    if (image.mode == "P" and "transparency" in image.info) or image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        return _sixteen_bit_to_rgb(image)
    return image.convert("RGB")


def sd_scripts_reading(path: Path) -> str | None:
    """How sd-scripts (``Image.open(path).convert("RGB")``, no EXIF turn) trains a picture otherwise than this trainer
    reads it, from its header; None when alike (or unreadable: said elsewhere)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                orientation, mode, info = exif_orientation(image), image.mode, image.info
    except Exception:
        return None
    if orientation in _UPRIGHT:
        return "has an EXIF orientation, which sd-scripts ignores: it trains the picture as stored, turned or mirrored"
    if mode.startswith("I"):
        return "has 16 bits a channel, which sd-scripts' conversion clips to near-white"
    if mode in _ALPHA_MODES or "transparency" in info:
        return "is transparent: sd-scripts trains the colours hidden under its transparent parts (here: white)"
    return None


def load_image(path: Path, background: Colour = WHITE, max_pixels: int = DEFAULT_MAX_PIXELS,
               at_least: tuple[int, int] | None = None) -> Image.Image:
    """The picture upright as 8-bit RGB (first frame of an animation); ``ImageError`` names the file and why not.
    ``at_least``: a JPEG may be decoded at a fraction of its size down to this (thumbnails: many times faster)."""
    return load_image_and_alpha(path, background, max_pixels, at_least)[0]


def load_image_and_alpha(path: Path, background: Colour = WHITE, max_pixels: int = DEFAULT_MAX_PIXELS,
                         at_least: tuple[int, int] | None = None) -> tuple[Image.Image, Image.Image | None]:
    """``load_image`` and the picture's transparency as an 8-bit "L" image (None when it has none): one decode
    serves training with ``alpha_mask``, which masks the loss where the picture is transparent."""
    path = Path(path)
    with _decoded(path, max_pixels, at_least) as decoded, _conversion_problems(path):
        upright = _turned_upright(decoded.image, decoded.orientation)
        has_alpha = (upright.mode == "P" and "transparency" in upright.info) or upright.mode in _ALPHA_MODES
        alpha = upright.convert("RGBA").getchannel("A") if has_alpha else None
        return to_rgb(upright, background).copy(), alpha


@dataclass(frozen=True)
class ImageScan:
    """Sizes of the readable images (upright, from headers) and the files that could not be read."""

    sizes: dict[Path, Size]
    problems: tuple[ImageProblem, ...]


def read_image_sizes(paths: Iterable[Path], max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageScan:
    """``read_image_size`` for many files; a bad file becomes a problem and the others are still read."""
    sizes: dict[Path, Size] = {}
    problems: list[ImageProblem] = []
    for path in paths:
        try:
            sizes[Path(path)] = read_image_size(path, max_pixels)
        except ImageError as error:
            problems.append(ImageProblem(Path(path), _reason(error, path)))
    return ImageScan(sizes, tuple(problems))


@dataclass(frozen=True)
class LoadedImages:
    images: tuple[tuple[Path, Image.Image], ...]
    problems: tuple[ImageProblem, ...]


def load_images(paths: Iterable[Path], background: Colour = WHITE, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImages:
    """``load_image`` for many files, in order; a bad file becomes a problem and the others are still loaded."""
    images: list[tuple[Path, Image.Image]] = []
    problems: list[ImageProblem] = []
    for path in paths:
        try:
            images.append((Path(path), load_image(path, background, max_pixels)))
        except ImageError as error:
            problems.append(ImageProblem(Path(path), _reason(error, path)))
    return LoadedImages(tuple(images), tuple(problems))


def _reason(error: ImageError, path: Path) -> str:
    message = str(error)
    prefix = f"{path} "
    return message[len(prefix):] if message.startswith(prefix) else message
