"""The dataset pieces the trainer needs, following sd-scripts (kohya-reference §4–§7): DreamBooth folders,
captions, buckets, caption processing at batch time.

Interim: the dataset package (issue #4) grows the complete versions of these (TOML configs, robust image
loading, health reports); the trainer moves onto them as they land.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from ..dataset.buckets import BucketChoice, BucketSettings, centre_crop_box
from ..dataset.caption_files import read_caption
from ..dataset.captions import CaptionOptions
from ..errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str = ""
    size: tuple[int, int] = (0, 0)
    problem: str | None = None


@dataclass(frozen=True)
class Subset:
    image_dir: Path
    num_repeats: int
    class_tokens: str | None
    is_reg: bool
    caption_extension: str
    flip_aug: bool
    caption_options: CaptionOptions

    def images(self) -> list[ImageItem]:
        items = []
        for path in sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            try:
                with Image.open(path) as image:  # header only: the pixels are read when latents are made
                    rotated = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF says "turn by 90°"
                    size = (image.height, image.width) if rotated else image.size
            except Exception as error:  # Pillow raises many types for broken files
                items.append(ImageItem(path, problem=f"{path}: not a readable image ({error}); skipped"))
                continue
            items.append(ImageItem(path, self._caption(path), size))
        return items

    def _caption(self, image: Path) -> str:
        caption_file = image.with_suffix(self.caption_extension)
        if caption_file.is_file():
            caption = read_caption(caption_file, enable_wildcard=self.caption_options.enable_wildcard)
            if not caption:
                raise UserError(f"{caption_file}: empty caption file; write a caption or delete the file")
            return caption
        return self.class_tokens or ""


def dreambooth_subsets(folder: Path, is_reg: bool, options) -> list[Subset]:
    """``<repeats>_<class tokens>`` subfolders (``10_sks dog`` → 10 repeats, "sks dog")."""
    if not folder.is_dir():
        raise UserError(f"{folder}: dataset folder not found")
    subsets = []
    skipped = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        head, _, rest = child.name.partition("_")
        try:
            repeats = int(head)
        except ValueError:
            skipped.append(child.name)
            continue
        if repeats < 1:
            skipped.append(child.name)
            continue
        subsets.append(Subset(child, repeats, rest or None, is_reg, _extension(options.caption_extension),
                              options.flip_aug, caption_options_from(options)))
    if not subsets and not is_reg:
        hint = f" (ignored: {', '.join(skipped)})" if skipped else ""
        raise UserError(f"{folder}: no <repeats>_<name> subfolder{hint}; put the images in e.g. {folder / '10_mychar'}")
    return subsets


def _extension(text: str) -> str:
    return text if text.startswith(".") else "." + text


def caption_options_from(options) -> CaptionOptions:
    return CaptionOptions(**{name: getattr(options, name) for name in CaptionOptions.__dataclass_fields__})


def resolve_subsets(options) -> tuple[list[Subset], int, BucketSettings]:
    if options.dataset_config:
        raise UserError("--dataset_config is not supported by the trainer yet; use --train_data_dir")
    if options.resolution is None:
        raise UserError("--resolution is required (e.g. 512 or 512,768)")
    sides = [int(v) for v in str(options.resolution).split(",")]
    resolution = (sides[0], sides[-1])
    subsets = dreambooth_subsets(Path(options.train_data_dir), False, options)
    if options.reg_data_dir:
        subsets += dreambooth_subsets(Path(options.reg_data_dir), True, options)
    bucketing = BucketSettings(resolution, options.enable_bucket, options.min_bucket_reso, options.max_bucket_reso,
                          options.bucket_reso_steps, options.bucket_no_upscale)
    return subsets, options.train_batch_size, bucketing


# --- buckets (lora_trainer.dataset.buckets) -----------------------------------------------------------------


def resize_and_crop(image: Image.Image, choice: BucketChoice) -> Image.Image:
    """Scale to cover the bucket, then centre-crop (sd-scripts' trim_and_resize_if_required)."""
    if choice.resized_size != image.size:
        image = image.resize(choice.resized_size, Image.Resampling.LANCZOS)
    return image.crop(centre_crop_box(choice.resized_size, choice.bucket))


def load_rgb(path: Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "P"):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, background)
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return image.convert("RGB")
