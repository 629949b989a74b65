"""A training image as the VAE sees it, in sd-scripts' order: resize to cover the bucket, crop (centre, or random
with ``random_crop``), alpha mask, colour augmentation, flip. Pure functions of the image, the bucket choice and a
seeded ``random.Random``, so a resumed run draws the same augmentations."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..dataset.buckets import BucketChoice, centre_crop_box
from ..dataset.images import load_image_and_alpha
from ..errors import UserError

Box = tuple[int, int, int, int]


def crop_box(choice: BucketChoice, random_crop: bool = False, rng: random.Random | None = None) -> Box:
    """The (left, top, right, bottom) part of the resized image that is trained: the centre, or anywhere with
    ``random_crop`` (sd-scripts' ``trim_and_resize_if_required``)."""
    if not random_crop:
        return centre_crop_box(choice.resized_size, choice.bucket)
    rng = rng or random.Random()
    left = rng.randint(0, max(0, choice.resized_size[0] - choice.bucket[0]))
    top = rng.randint(0, max(0, choice.resized_size[1] - choice.bucket[1]))
    return left, top, left + choice.bucket[0], top + choice.bucket[1]


def face_crop_plan(image_size: tuple[int, int], target: tuple[int, int], face: tuple[int, int, int, int],
                   face_range: tuple[float, float], random_crop: bool, rng: random.Random) -> tuple[tuple[int, int], Box]:
    """sd-scripts' ``crop_target`` for ``face_crop_aug_range = (low, high)``: scale the image so the face's larger
    side is 1/high … 1/low of the target's shorter side (never below covering the target, never enlarged beyond the
    original), then cut the target around the face — shifted by up to ±face/20 when the range is a range, or
    anywhere that keeps the face near the middle more often with ``random_crop``. Returns (resized size, box).

    Where we differ: an image smaller than the target is enlarged to cover it (sd-scripts fails on it)."""
    width, height = image_size
    if image_size == target:
        return image_size, (0, 0, width, height)
    cx, cy, face_w, face_h = face
    face_size = max(face_w, face_h)
    short_side = min(target)
    cover = max(target[1] / height, target[0] / width)
    min_scale = max(cover, min(1.0, short_side / (face_size * face_range[1])))
    max_scale = max(min_scale, min(1.0, short_side / (face_size * face_range[0])))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    resized = (max(target[0], int(width * scale + 0.5)), max(target[1], int(height * scale + 0.5)))
    start = []
    for target_side, length, centre in ((target[1], resized[1], int(cy * scale + 0.5)),
                                        (target[0], resized[0], int(cx * scale + 0.5))):  # sd-scripts: rows first
        p1 = centre - target_side // 2
        if random_crop:
            reach = max(length - centre, centre)
            p1 += rng.randint(0, reach) + rng.randint(0, reach) - reach
        elif face_range[0] != face_range[1] and face_size > short_side // 10 and face_size >= 40:
            p1 += rng.randint(-face_size // 20, face_size // 20)
        start.append(max(0, min(p1, length - target_side)))
    top, left = start
    return resized, (left, top, left + target[0], top + target[1])


FILTERS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
           "linear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
           "area": Image.Resampling.BOX, "box": Image.Resampling.BOX}  # sd-scripts' resize_interpolation names


def resize_filter(size: tuple[int, int], resized: tuple[int, int], interpolation: str | None = None) -> Image.Resampling:
    """``resize_interpolation``, or sd-scripts' default: area averaging when shrinking, Lanczos when enlarging."""
    if interpolation is None:
        interpolation = "area" if size[0] >= resized[0] and size[1] >= resized[1] else "lanczos"
    return FILTERS[interpolation]


def resize_and_crop(image: Image.Image, choice: BucketChoice, box: Box | None = None,
                    interpolation: str | None = None) -> Image.Image:
    """Scale to cover the bucket, then keep ``box`` (the centre by default)."""
    if choice.resized_size != image.size:
        image = image.resize(choice.resized_size, resize_filter(image.size, choice.resized_size, interpolation))
    return image.crop(box or centre_crop_box(choice.resized_size, choice.bucket))


HUE_SHIFT_LIMIT = 8 / 180  # sd-scripts: ±8 on OpenCV's 0–180 hue circle
GAMMA_RANGE = (0.95, 1.05)


def color_augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """sd-scripts' ``color_aug``: a third of the time either a hue shift of up to ±8/180 of the circle or a gamma
    of 0.95–1.05 applied to the 0–255 values (as sd-scripts does, so bright pixels saturate), else unchanged."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        shift = rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)
        hsv = np.asarray(image.convert("HSV"), dtype=np.int16).copy()
        hsv[..., 0] = (hsv[..., 0] + round(shift * 256)) % 256
        return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
    gamma = rng.uniform(*GAMMA_RANGE)
    values = np.asarray(image, dtype=np.float64) ** gamma
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB → [3, H, W] in [-1, 1], as the VAE takes it."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def mask_tensor(alpha: Image.Image | None, size: tuple[int, int]) -> torch.Tensor:
    """The loss mask [H, W] in [0, 1] from an alpha channel; an image without transparency counts everywhere."""
    if alpha is None:
        return torch.ones(size[1], size[0])
    return torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0)


def cut_mask(mask: Image.Image | None, choice: BucketChoice, box: Box | None = None,
             interpolation: str | None = None) -> torch.Tensor:
    """The loss mask [H, W] of a picture, resized and cut into its bucket as the picture is (``resize_and_crop``)."""
    return mask_tensor(None if mask is None else resize_and_crop(mask, choice, box, interpolation), choice.bucket)


def mask_image(path: Path, image_size: tuple[int, int]) -> Image.Image:
    """A mask folder's image (sd-scripts' ``conditioning_data_dir`` with ``--masked_loss``): its red channel, which
    sd-scripts reads as the mask (white: learnt, black: not), at the training image's own size."""
    red = load_image_and_alpha(path)[0].getchannel("R")
    if red.size != image_size:
        raise UserError(f"{path}: the mask is {red.size[0]}x{red.size[1]} but its image is {image_size[0]}x{image_size[1]}; "
                        "save each mask at the size of its image")
    return red


@dataclass
class TrainingPixels:
    pixels: torch.Tensor  # [3, H, W] in [-1, 1]
    mask: torch.Tensor | None  # [H, W] in [0, 1] with alpha_mask, else None


def training_pixels(path: Path, choice: BucketChoice, *, flip: bool = False, random_crop: bool = False,
                    color_aug: bool = False, alpha_mask: bool = False, mask_path: Path | None = None,
                    interpolation: str | None = None, face: tuple[int, int, int, int] | None = None,
                    face_range: tuple[float, float] | None = None, rng: random.Random | None = None) -> TrainingPixels:
    """One image ready for the VAE (and its loss mask: its transparency, or ``mask_path``'s image, cut and flipped
    with it), with the augmentations asked for; with ``face`` and ``face_range`` it is cut around the face
    (``face_crop_aug_range``) instead of resized into the bucket."""
    rng = rng or random.Random()
    image, alpha = load_image_and_alpha(path)
    if mask_path is not None:
        alpha, alpha_mask = mask_image(mask_path, image.size), True
    if face is not None and face_range is not None:
        resized, box = face_crop_plan(image.size, choice.bucket, face, face_range, random_crop, rng)
        choice = dataclasses.replace(choice, resized_size=resized)
    else:
        box = crop_box(choice, random_crop, rng)
    image = resize_and_crop(image, choice, box, interpolation)
    mask = cut_mask(alpha, choice, box, interpolation) if alpha_mask else None
    if color_aug:
        image = color_augment(image, rng)
    pixels = to_tensor(image)
    if flip:
        pixels = pixels.flip(-1)
        mask = None if mask is None else mask.flip(-1)
    return TrainingPixels(pixels, mask)
