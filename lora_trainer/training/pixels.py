"""The bucket crop of a training image (sd-scripts' ``trim_and_resize_if_required``)."""

from __future__ import annotations

from PIL import Image

from ..dataset.buckets import BucketChoice, centre_crop_box


def resize_and_crop(image: Image.Image, choice: BucketChoice) -> Image.Image:
    """Scale to cover the bucket, then centre-crop."""
    if choice.resized_size != image.size:
        image = image.resize(choice.resized_size, Image.Resampling.LANCZOS)
    return image.crop(centre_crop_box(choice.resized_size, choice.bucket))
