"""The data plan of a run: which images, in which buckets, in which order, with which captions, as latents.

Built on the dataset package (layouts, buckets, captions, image loading); this file only arranges them the way
sd-scripts' training loop consumes them: repeats, batches inside a bucket, a seeded order per epoch, cached
latents (in memory or as sd-scripts' ``.npz`` files), and the dataset metadata of the saved files.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..dataset import buckets as B
from ..dataset import captions as C
from .minimal_dataset import Subset, load_rgb, resize_and_crop, resolve_subsets
from .evaluation import split_validation
from .options import TrainOptions, resolution_of


@dataclass
class ImageRecord:
    path: Path
    caption: str
    subset: Subset
    size: tuple[int, int]  # original (w, h)
    choice: B.BucketChoice  # the bucket (w, h) it is trained at, and the size it is resized to first
    latents: torch.Tensor | None = None
    latents_flipped: torch.Tensor | None = None

    @property
    def bucket(self) -> tuple[int, int]:
        return self.choice.bucket


@dataclass
class Batch:
    records: list[ImageRecord]
    flips: list[bool]
    latents: torch.Tensor | None = None
    loss_weights: torch.Tensor = field(default_factory=lambda: torch.ones(1))

    @property
    def original_sizes(self):
        return [(r.size[1], r.size[0]) for r in self.records]  # (h, w) as SDXL's conditioning wants

    @property
    def crops(self):
        return [(int(top), int(left)) for left, top, _, _ in (B.crop_ltrb(r.bucket, r.size) for r in self.records)]

    @property
    def target_sizes(self):
        return [(r.bucket[1], r.bucket[0]) for r in self.records]


class TrainingData:
    def __init__(self, options: TrainOptions, records: list[ImageRecord], batch_size: int, seed: int, config_name: str):
        self.options = options
        self.batch_size = batch_size
        self.seed = seed
        self.config_name = config_name
        self.validation_seed = options.validation_seed if options.validation_seed is not None else seed
        self.train, self.validation = split_validation([r for r in records if not r.subset.is_reg],
                                                       options.validation_split, self.validation_seed)
        self.reg = [r for r in records if r.subset.is_reg]
        self.records = self.train + self.reg  # what is trained on
        self.num_images = sum(r.subset.num_repeats for r in self.train)
        self.num_reg_images = sum(r.subset.num_repeats for r in self.reg)
        self.num_validation_images = len(self.validation)
        self.batches_per_epoch = len(self._plan(0))

    # --- order ----------------------------------------------------------------------------------------------

    def _samples(self) -> list[ImageRecord]:
        samples = [r for r in self.train for _ in range(r.subset.num_repeats)]
        if self.reg:  # sd-scripts: as many regularisation samples as training samples, round-robin
            reg_cycle = [r for r in self.reg for _ in range(r.subset.num_repeats)]
            samples += [reg_cycle[i % len(reg_cycle)] for i in range(len(samples))]
        return samples

    def _plan(self, epoch: int) -> list[list[ImageRecord]]:
        rng = random.Random(self.seed + epoch)
        by_bucket: dict[tuple[int, int], list[ImageRecord]] = {}
        for record in self._samples():
            by_bucket.setdefault(record.bucket, []).append(record)
        batches = []
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            rng.shuffle(members)
            batches += [members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def epoch_batches(self, epoch: int) -> list[Batch]:
        rng = random.Random(self.seed * 1000003 + epoch)
        batches = []
        for members in self._plan(epoch):
            flips = [m.subset.flip_aug and rng.random() < 0.5 for m in members]
            latents = torch.stack([self._latents(m, f) for m, f in zip(members, flips)])
            weights = torch.tensor([self.options.prior_loss_weight if m.subset.is_reg else 1.0 for m in members])
            batches.append(Batch(members, flips, latents, weights))
        return batches

    def _latents(self, record: ImageRecord, flipped: bool) -> torch.Tensor:
        if record.latents is None:
            raise UserError("latents are not cached: training without --cache_latents is not supported yet")
        return record.latents_flipped if flipped else record.latents

    # --- captions -------------------------------------------------------------------------------------------

    def captions_for(self, batch: Batch, epoch: int, step: int, total_steps: int, generator: torch.Generator) -> list[str]:
        rng = random.Random(int(torch.randint(0, 2**62, (), generator=generator)))
        return [C.process_caption(r.caption, r.subset.caption_options, rng, epoch=epoch + 1, step=step,
                                  max_train_steps=total_steps) for r in batch.records]

    # --- latents --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def cache_latents(self, vae, device, events) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        vae.to(device)
        todo = [r for r in self.records + self.validation if r.latents is None]
        for index, record in enumerate(sorted(todo, key=lambda r: r.bucket)):
            cached = _read_npz(record) if self.options.cache_latents_to_disk else None
            if cached is None:
                image = resize_and_crop(load_rgb(record.path), record.choice)
                pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(device)
                variants = [pixels, pixels.flip(-1)] if record.subset.flip_aug else [pixels]
                encoded = [vae.encode(v.to(vae.dtype)).sample(generator).float().cpu()[0] for v in variants]
                cached = (encoded[0], encoded[1] if len(encoded) > 1 else None)
                if self.options.cache_latents_to_disk:
                    _write_npz(record, *cached, self.config_name)
            record.latents, record.latents_flipped = cached
            if (index + 1) % 50 == 0:
                events.emit("step", phase="caching latents", done=index + 1, total=len(todo))

    # --- metadata -------------------------------------------------------------------------------------------

    def metadata(self) -> dict:
        dirs, reg_dirs, frequency = {}, {}, {}
        for subset, records in _by_subset(self.records).items():
            entry = {"n_repeats": subset.num_repeats, "img_count": len(records)}
            (reg_dirs if subset.is_reg else dirs)[subset.image_dir.name] = entry
            if not subset.is_reg:
                frequency[subset.image_dir.name] = C.tag_frequency([r.caption for r in records])
        buckets = {}
        for record in self._samples():
            buckets[record.bucket] = buckets.get(record.bucket, 0) + 1
        o = self.options
        bucket_info = None
        if o.enable_bucket:
            bucket_info = {"buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(buckets.items()))}}
        resolution = resolution_of(o)
        return {
            "ss_batch_size_per_device": self.batch_size,
            "ss_total_batch_size": self.batch_size * o.gradient_accumulation_steps,
            "ss_resolution": f"({resolution[0]}, {resolution[1]})" if resolution else None,
            "ss_color_aug": o.color_aug,
            "ss_flip_aug": o.flip_aug,
            "ss_random_crop": o.random_crop,
            "ss_shuffle_caption": o.shuffle_caption,
            "ss_enable_bucket": o.enable_bucket,
            "ss_bucket_no_upscale": o.bucket_no_upscale,
            "ss_min_bucket_reso": o.min_bucket_reso if o.enable_bucket else None,
            "ss_max_bucket_reso": o.max_bucket_reso if o.enable_bucket else None,
            "ss_keep_tokens": o.keep_tokens,
            "ss_dataset_dirs": json.dumps(dirs),
            "ss_reg_dataset_dirs": json.dumps(reg_dirs),
            "ss_tag_frequency": json.dumps(frequency),
            "ss_bucket_info": json.dumps(bucket_info),
        }


def _by_subset(records: list[ImageRecord]) -> dict:
    groups: dict = {}
    for record in records:
        groups.setdefault(record.subset, []).append(record)
    return groups


def npz_path(record: ImageRecord, config_name: str) -> Path:
    """sd-scripts' cache name: ``<stem>_<W:04d>x<H:04d>_sd.npz`` (``_sdxl``), W×H the original image size."""
    w, h = record.size
    return record.path.with_name(f"{record.path.stem}_{w:04d}x{h:04d}_{'sdxl' if config_name == 'sdxl' else 'sd'}.npz")


def _read_npz(record: ImageRecord):
    for path in record.path.parent.glob(f"{record.path.stem}_*x*_sd*.npz"):
        with np.load(path) as data:
            latents = data.get("latents")
            if latents is None or tuple(latents.shape[1:]) != (record.bucket[1] // 8, record.bucket[0] // 8):
                return None
            flipped = data.get("latents_flipped")
            if record.subset.flip_aug and flipped is None:
                return None
            return torch.from_numpy(latents), None if flipped is None else torch.from_numpy(flipped)
    return None


def _write_npz(record: ImageRecord, latents: torch.Tensor, flipped: torch.Tensor | None, config_name: str) -> None:
    arrays = {"latents": latents.numpy().astype(np.float32), "original_size": np.array(record.size, dtype=np.int64),
              "crop_ltrb": np.array(B.crop_ltrb(record.bucket, record.size), dtype=np.float64)}
    if flipped is not None:
        arrays["latents_flipped"] = flipped.numpy().astype(np.float32)
    np.savez(npz_path(record, config_name), **arrays)


def build_training_data(options: TrainOptions, config, seed: int) -> TrainingData:
    subsets, batch_size, bucketing = resolve_subsets(options)
    records = []
    problems = []
    for subset in subsets:
        for item in subset.images():
            if item.problem:
                problems.append(item.problem)
                continue
            records.append(ImageRecord(item.path, item.caption, subset, item.size, B.select_bucket(item.size, bucketing)))
    if not [r for r in records if not r.subset.is_reg]:
        detail = f" ({'; '.join(problems[:3])})" if problems else ""
        raise UserError(f"the dataset has no usable training images{detail}")
    if not options.cache_latents:
        raise UserError("training without --cache_latents is not supported yet: add --cache_latents")
    return TrainingData(options, records, batch_size, seed, config.name)
