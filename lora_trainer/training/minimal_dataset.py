"""Reading pixels for training: header-only sizes, RGB conversion, and the bucket crop.

Interim: the dataset package's image loader (issue #4: CMYK, 16-bit, decompression-bomb limits, animated files)
replaces ``image_size`` and ``load_rgb`` when it lands.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from ..dataset.buckets import BucketChoice, centre_crop_box
from ..errors import UserError


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image will be seen, read from the header (EXIF rotations swap the sides)."""
    try:
        with Image.open(path) as image:
            rotated = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF says "turn by 90°"
            return (image.height, image.width) if rotated else image.size
    except Exception as error:  # Pillow raises many types for broken files
        raise UserError(f"not a readable image ({error})") from None


def load_rgb(path: Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "P"):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, background)
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return image.convert("RGB")


def resize_and_crop(image: Image.Image, choice: BucketChoice) -> Image.Image:
    """Scale to cover the bucket, then centre-crop (sd-scripts' trim_and_resize_if_required)."""
    if choice.resized_size != image.size:
        image = image.resize(choice.resized_size, Image.Resampling.LANCZOS)
    return image.crop(centre_crop_box(choice.resized_size, choice.bucket))
