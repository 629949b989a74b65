"""``bench prep``: preprocessing throughput (images/s) for 512-px crops of generated ~800×600 photos-like JPEGs,
with the centre crop, the focal crop (saliency, or faces when OpenCV is installed) and the bucket crop."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lora_trainer.dataset.focus import face_detector_available
from lora_trainer.dataset.preprocess import PrepSettings, prepare_dataset

IMAGE_COUNT = 200


def make_folder(folder: Path, count: int = IMAGE_COUNT, seed: int = 0) -> Path:
    """``count`` JPEGs of 800×600 (every fourth 600×800) with smooth colour fields and detail, and captions."""
    target = folder / "10_zkstar"
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        size = (600, 800) if index % 4 == 3 else (800, 600)
        coarse = (rng.random((12, 16, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
        pixels = np.asarray(image).astype(np.int16) + rng.integers(-12, 12, (size[1], size[0], 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(target / f"photo_{index:04d}.jpg", quality=90)
        (target / f"photo_{index:04d}.txt").write_text("zkstar, yellow star", encoding="utf-8")
    return folder


def run(work_dir: Path) -> None:
    """Generate the folder under ``work_dir`` (reused when complete) and print images/s for each crop mode."""
    source = Path(work_dir) / "bench-prep" / "source"
    if sum(1 for _ in source.glob("*/*.jpg")) != IMAGE_COUNT:
        shutil.rmtree(source, ignore_errors=True)
        started = time.perf_counter()
        make_folder(source)
        print(f"generated {IMAGE_COUNT} JPEGs (800x600 and 600x800) in {time.perf_counter() - started:.1f} s")
    focal = "faces (OpenCV), else saliency" if face_detector_available() else "saliency (no OpenCV)"
    cases = (
        ("512x512 centre crop", PrepSettings(size=512)),
        (f"512x512 focal crop, {focal}", PrepSettings(size=512, crop="focal")),
        ("512 buckets, centre crop", PrepSettings(size=512, buckets=True)),
        ("512x512 centre crop + flipped copy", PrepSettings(size=512, flip=True)),
    )
    for label, settings in cases:
        out = Path(work_dir) / "bench-prep" / "out"
        shutil.rmtree(out, ignore_errors=True)
        result = prepare_dataset(source, out, settings)
        print(f"{label:<52} {result.images / result.seconds:7.1f} images/s  ({result.images} in {result.seconds:.2f} s)")
        shutil.rmtree(out, ignore_errors=True)
