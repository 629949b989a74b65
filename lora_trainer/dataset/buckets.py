"""Aspect-ratio buckets exactly as sd-scripts makes and assigns them (kohya-reference §5).

sd-scripts: ``library/model_util.py`` ``make_bucket_resolutions`` builds the list; ``library/train_util.py``
``BucketManager.select_bucket`` picks a bucket per image and ``BaseDataset.adjust_min_max_bucket_reso_by_steps``
snaps the min/max sizes. Here they are pure functions over a small ``BucketSettings``.

Quirks kept on purpose, because they decide which bucket (and so which crop) a user's image gets:
- the nearest aspect ratio is found with ``argmin`` over the *sorted* list, so an exact tie goes to the bucket that
  sorts first (smaller width), and float rounding of ``w/h`` decides near-ties: a 256×128 image goes to 128×128
  while a 128×256 one goes to 64×192 with resolution 128, min 64, max 256, step 64;
- an image whose exact size is a bucket keeps that bucket even if another has the same aspect ratio;
- ``bucket_no_upscale`` ignores the list (and min/max) and floors the (possibly shrunken) size to the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from lora_trainer.errors import UserError

Size = tuple[int, int]  # (width, height), as sd-scripts writes every resolution


@dataclass(frozen=True)
class BucketSettings:
    """A dataset's bucket options, with sd-scripts' names and defaults; ``resolution`` is (width, height)."""

    resolution: Size
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: the bucket (training size), the size it is resized to before the centre crop, and
    the bucket's aspect ratio minus the image's (sd-scripts averages its absolute value as ``mean_img_ar_error``);
    ``native``: cut out at the image's own size, never resized (``native_patch``)."""

    bucket: Size
    resized_size: Size
    aspect_error: float
    native: bool = False


LARGEST_SIDE = 8192  # pixels: 64 megapixels an image (SDXL trains at 1024); beyond, a typo that would take the memory


def check_largest_side(value: int, option: str) -> None:
    if value > LARGEST_SIDE:
        raise UserError(f"{option} {value} is larger than {LARGEST_SIDE} pixels, the most this trainer takes (SD1 trains "
                        f"at 512, SDXL at 1024); give a smaller {option}.", option)


def adjusted_bucket_range(resolution: Size, min_bucket_reso: int, max_bucket_reso: int, bucket_reso_steps: int) -> tuple[int, int]:
    """min/max bucket sizes snapped to the step (min down, max up), then checked against the resolution.

    sd-scripts logs the snapping as a warning and asserts the checks; the assertions become ``UserError``s that say
    which option to change.
    """
    check_largest_side(max(resolution), "resolution")
    check_largest_side(max_bucket_reso, "max_bucket_reso")
    if bucket_reso_steps < 1:
        raise UserError(f"bucket_reso_steps is {bucket_reso_steps}; it must be a positive number of pixels (64 for SD1/SD2, "
                        "32 or 64 for SDXL).", "bucket_reso_steps")
    if min(resolution) < bucket_reso_steps:  # said of the resolution the user typed, not of a bucket limit fitted to it
        raise UserError(f"resolution {resolution[0]}x{resolution[1]} is smaller than bucket_reso_steps {bucket_reso_steps}, "
                        f"the narrowest a bucket can be; use a resolution of {bucket_reso_steps} or more.", "resolution")
    if min_bucket_reso < bucket_reso_steps:  # snapped down it would be 0, and sd-scripts divides by it
        raise UserError(f"min_bucket_reso {min_bucket_reso} is less than bucket_reso_steps {bucket_reso_steps}, the "
                        f"narrowest a bucket can be; set min_bucket_reso to {bucket_reso_steps} or more.", "min_bucket_reso")
    if min_bucket_reso % bucket_reso_steps:
        min_bucket_reso -= min_bucket_reso % bucket_reso_steps
    if max_bucket_reso % bucket_reso_steps:
        max_bucket_reso += bucket_reso_steps - max_bucket_reso % bucket_reso_steps
    width, height = resolution
    if min(resolution) < min_bucket_reso:
        raise UserError(
            f"min_bucket_reso {min_bucket_reso} is larger than the shorter side of the resolution {width}x{height}; "
            f"lower min_bucket_reso to {min(resolution)} or less, or raise the resolution.", "min_bucket_reso"
        )
    if max(resolution) > max_bucket_reso:
        raise UserError(
            f"max_bucket_reso {max_bucket_reso} is smaller than the longer side of the resolution {width}x{height}; "
            f"raise max_bucket_reso to {max(resolution)} or more, or lower the resolution.", "max_bucket_reso"
        )
    return min_bucket_reso, max_bucket_reso


@lru_cache(maxsize=64)
def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64) -> tuple[Size, ...]:
    """sd-scripts' bucket list: the largest square of the resolution's area, plus for every width from ``min_size``
    to ``max_size`` in steps the tallest height (≤ ``max_size``) that keeps the area, and its transpose; sorted."""
    max_area = max_reso[0] * max_reso[1]
    square = int(math.sqrt(max_area) // divisible) * divisible
    resolutions = {(square, square)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
    return tuple(sorted(resolutions))


def bucket_list(settings: BucketSettings) -> tuple[Size, ...]:
    """The buckets images are chosen from: the computed list, only the resolution when bucketing is off, and none
    with ``bucket_no_upscale`` (there every image makes its own bucket)."""
    if not settings.enable_bucket:
        return (settings.resolution,)
    if settings.bucket_no_upscale:
        return ()
    min_size, max_size = adjusted_bucket_range(
        settings.resolution, settings.min_bucket_reso, settings.max_bucket_reso, settings.bucket_reso_steps
    )
    return make_bucket_resolutions(settings.resolution, min_size, max_size, settings.bucket_reso_steps)


def nearest_bucket(image_size: Size, resolutions: tuple[Size, ...]) -> BucketChoice:
    """Upscaling allowed: the image's own size if it is a bucket, else the first bucket with the smallest aspect
    ratio difference; the image is scaled to cover the bucket (rounded half up) before the centre crop."""
    width, height = image_size
    aspect = width / height
    if image_size in resolutions:
        bucket = image_size
    else:
        errors = [abs(bucket_width / bucket_height - aspect) for bucket_width, bucket_height in resolutions]
        bucket = resolutions[errors.index(min(errors))]
    if aspect > bucket[0] / bucket[1]:
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    return BucketChoice(bucket, resized, bucket[0] / bucket[1] - aspect)


def _round_to_steps(value: float, steps: int) -> int:
    rounded = int(value + 0.5)
    return rounded - rounded % steps


def _too_thin(image_size: Size, steps: int) -> UserError:
    return UserError(
        f"an image of {image_size[0]}x{image_size[1]} leaves less than one bucket step ({steps} px) on a side with "
        "bucket_no_upscale; crop it to a less extreme shape or remove it from the dataset."
    )


def bucket_without_upscale(image_size: Size, max_area: int, steps: int) -> BucketChoice:
    """``bucket_no_upscale``: an image larger than the resolution's area is shrunk keeping its aspect ratio (the
    side whose rounding to the step loses less aspect wins), a smaller one keeps its size; the bucket is that size
    floored to the step, so the crop cuts at most ``steps - 1`` pixels per side and nothing is ever enlarged."""
    width, height = image_size
    aspect = width / height
    if width * height > max_area:
        resized_width = math.sqrt(max_area * aspect)
        resized_height = max_area / resized_width
        width_rounded = _round_to_steps(resized_width, steps)
        height_for_width = _round_to_steps(width_rounded / aspect, steps)
        height_rounded = _round_to_steps(resized_height, steps)
        width_for_height = _round_to_steps(height_rounded * aspect, steps)
        if height_for_width == 0 or height_rounded == 0:
            raise _too_thin(image_size, steps)
        aspect_by_width = width_rounded / height_for_width
        aspect_by_height = width_for_height / height_rounded
        if abs(aspect_by_width - aspect) < abs(aspect_by_height - aspect):
            resized = (width_rounded, int(width_rounded / aspect + 0.5))
        else:
            resized = (int(height_rounded * aspect + 0.5), height_rounded)
    else:
        resized = image_size
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    if 0 in bucket:
        raise _too_thin(image_size, steps)
    return BucketChoice(bucket, resized, bucket[0] / bucket[1] - aspect)


def native_patch(image_size: Size, resolution: Size) -> BucketChoice | None:
    """Buckets off with ``random_crop`` (latents then are never cached): sd-scripts cuts the resolution out of an
    image at least that large at its own size, never resizing it; None for one it would stop on."""
    if fixed_resolution_problem(image_size, resolution, random_crop=True) is not None:
        return None
    return BucketChoice(resolution, image_size, resolution[0] / resolution[1] - image_size[0] / image_size[1], native=True)


def select_bucket(image_size: Size, settings: BucketSettings, random_crop: bool = False) -> BucketChoice:
    """The bucket sd-scripts gives an image of ``image_size`` (width, height) under ``settings``; with buckets off
    and ``random_crop`` its ``native_patch`` where sd-scripts cuts one."""
    if image_size[0] < 1 or image_size[1] < 1:
        raise UserError(f"an image of {image_size[0]}x{image_size[1]} has no pixels to train on; remove it from the dataset.")
    if not settings.enable_bucket and random_crop and (patch := native_patch(image_size, settings.resolution)):
        return patch
    if settings.enable_bucket and settings.bucket_no_upscale:
        # sd-scripts checks min/max against the resolution even though this mode never uses them
        adjusted_bucket_range(settings.resolution, settings.min_bucket_reso, settings.max_bucket_reso, settings.bucket_reso_steps)
        return bucket_without_upscale(image_size, settings.max_area, settings.bucket_reso_steps)
    return nearest_bucket(image_size, bucket_list(settings))


def crop_ltrb(bucket: Size, image_size: Size) -> tuple[float, float, float, float]:
    """SDXL's crop conditioning as sd-scripts stores it (``BucketManager.get_crop_ltrb``): Stability's formula on
    the bucket, which fits the image *inside* the bucket, so it differs from the real (covering) centre crop."""
    bucket_aspect = bucket[0] / bucket[1]
    image_aspect = image_size[0] / image_size[1]
    if bucket_aspect > image_aspect:
        resized_width, resized_height = bucket[1] * image_aspect, bucket[1]
    else:
        resized_width, resized_height = bucket[0], bucket[0] / image_aspect
    left = (bucket[0] - resized_width) // 2
    top = (bucket[1] - resized_height) // 2
    return left, top, left + resized_width, top + resized_height


def centre_crop_box(resized_size: Size, bucket: Size) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box, in resized pixels, that sd-scripts keeps when it crops without
    ``random_crop`` (``trim_and_resize_if_required``): the excess split with the odd pixel on the right/bottom."""
    left = (resized_size[0] - bucket[0]) // 2 if resized_size[0] > bucket[0] else 0
    top = (resized_size[1] - bucket[1]) // 2 if resized_size[1] > bucket[1] else 0
    return left, top, left + bucket[0], top + bucket[1]


def fixed_resolution_problem(image_size: Size, resolution: Size, random_crop: bool, face_crop: bool = False,
                             face_named: bool = True) -> str | None:
    """Without buckets (and without latent caching, which resizes like a bucket) sd-scripts trains an image only if
    it has exactly the resolution, or is larger with ``random_crop``/face crop (``face_crop``: face_crop_aug_range,
    which crops only an image whose name gives its face, ``face_named``; its ``crop_target`` never enlarges: it stops
    on a smaller image with a face too); this says why one would fail."""
    width, height = image_size
    if (width, height) == resolution:
        return None
    if width < resolution[0] or height < resolution[1]:
        return (
            f"{width}x{height} is smaller than the resolution {resolution[0]}x{resolution[1]} and buckets are off; "
            "turn on enable_bucket or resize the image."
        )
    if random_crop or (face_crop and face_named):
        return None
    if face_crop:
        return (f"{width}x{height} is larger than the resolution {resolution[0]}x{resolution[1]}, buckets are off, and "
                "face_crop_aug_range crops only an image whose name gives its face (<name>_<cx>_<cy>_<w>_<h>, as "
                "sd-scripts reads it); name it so, or turn on enable_bucket (or random_crop).")
    return (
        f"{width}x{height} is larger than the resolution {resolution[0]}x{resolution[1]} and neither buckets nor "
        "random_crop are on; turn on enable_bucket (or random_crop)."
    )
