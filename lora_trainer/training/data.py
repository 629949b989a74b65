"""The data plan of a run: which images, in which buckets, in which order, with which captions, as latents.

Built on the dataset package (``--dataset_config`` / DreamBooth folders, buckets, captions); this file only arranges
them the way sd-scripts' training loop consumes them: repeats (regularisation images balanced as sd-scripts does),
batches inside a bucket per dataset, a seeded order per epoch, cached latents (in memory or as sd-scripts'
``.npz`` files), and the dataset metadata of the saved files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..dataset import buckets as B
from ..dataset import captions as C
from ..dataset.config import DatasetConfig, SubsetConfig, load_dataset_config
from ..dataset.images import load_image, read_image_size
from ..dataset.layouts import config_from_folders, dataset_images, regularization_repeats
from ..errors import UserError
from .evaluation import split_validation
from .pixels import resize_and_crop
from .options import TrainOptions, resolution_of
from .text import caching_problems


@dataclass
class ImageRecord:
    path: Path
    caption: str
    subset: SubsetConfig
    dataset: int  # index of its dataset
    size: tuple[int, int]  # original (w, h)
    choice: B.BucketChoice  # the bucket (w, h) it is trained at, and the size it is resized to first
    repeats: int
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


@dataclass
class DatasetPlan:
    config: DatasetConfig
    train: list[ImageRecord]
    reg: list[ImageRecord]
    validation: list[ImageRecord]
    tag_frequency: dict[str, dict[str, int]]


class TrainingData:
    def __init__(self, options: TrainOptions, datasets: list[DatasetPlan], seed: int, config_name: str, notes: list[str],
                 from_config_file: bool, world_size: int = 1):
        self.options = options
        self.world_size = world_size  # under torchrun a batch is the global batch: batch_size per rank × ranks
        self.datasets = datasets
        self.seed = seed
        self.config_name = config_name
        self.notes = notes
        self.from_config_file = from_config_file
        self.validation_seed = options.validation_seed if options.validation_seed is not None else seed
        self.train = [r for d in datasets for r in d.train]
        self.reg = [r for d in datasets for r in d.reg]
        self.validation = [r for d in datasets for r in d.validation]
        self.records = self.train + self.reg  # what is trained on
        self.num_images = sum(r.repeats for r in self.train)
        self.num_reg_images = sum(r.repeats for r in self.reg)
        self.num_validation_images = len(self.validation)
        self.batches_per_epoch = len(self._plan(0))

    # --- order ----------------------------------------------------------------------------------------------

    def _plan(self, epoch: int) -> list[list[ImageRecord]]:
        """Batches of one bucket each, per dataset with its own batch size, in a seeded order per epoch."""
        rng = random.Random(self.seed + epoch)
        batches = []
        for dataset in self.datasets:
            by_bucket: dict[tuple[int, int], list[ImageRecord]] = {}
            for record in dataset.train + dataset.reg:
                by_bucket.setdefault(record.bucket, []).extend([record] * record.repeats)
            size = dataset.config.batch_size * self.world_size
            for bucket in sorted(by_bucket):
                members = by_bucket[bucket]
                rng.shuffle(members)
                batches += [members[i : i + size] for i in range(0, len(members), size)]
        rng.shuffle(batches)
        return batches

    def epoch_batches(self, epoch: int) -> list[Batch]:
        rng = random.Random(self.seed * 1000003 + epoch)
        batches = []
        for members in self._plan(epoch):
            flips = [m.subset.flip_aug and rng.random() < 0.5 for m in members]
            latents = torch.stack([self._latents(m, f) for m, f in zip(members, flips)])
            weights = torch.tensor([self.datasets[m.dataset].config.prior_loss_weight if m.subset.is_reg else 1.0 for m in members])
            batches.append(Batch(members, flips, latents, weights))
        return batches

    @staticmethod
    def _latents(record: ImageRecord, flipped: bool) -> torch.Tensor:
        if record.latents is None:
            raise UserError("latents are not cached: training without --cache_latents is not supported yet")
        return record.latents_flipped if flipped else record.latents

    # --- captions -------------------------------------------------------------------------------------------

    def captions_for(self, batch: Batch, epoch: int, step: int, total_steps: int, generator: torch.Generator) -> list[str]:
        rng = random.Random(int(torch.randint(0, 2**62, (), generator=generator)))
        return [C.process_caption(r.caption, r.subset.caption_options, rng, epoch=epoch + 1, step=step,
                                  max_train_steps=total_steps) for r in batch.records]

    def fixed_captions(self) -> dict[Path, str]:
        """Each image's caption as training sees it, for ``--cache_text_encoder_outputs`` (refused when captions vary)."""
        problems = sorted({p for r in self.records for p in caching_problems(r.subset.caption_options)})
        if problems:
            raise UserError(f"--cache_text_encoder_outputs encodes each caption once, but {', '.join(problems)} change the "
                            "captions between steps; turn them off (in the options or the dataset TOML) or drop the caching")
        rng = random.Random(0)  # unused: nothing random is on
        captions = {r.path: C.process_caption(r.caption, r.subset.caption_options, rng, epoch=1, step=0, max_train_steps=1)
                    for r in self.records}
        captions.update({r.path: r.caption.split("\n")[0] for r in self.validation})
        return captions

    # --- latents --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def cache_latents(self, vae, device, events) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        vae.to(device)
        todo = [r for r in self.records + self.validation if r.latents is None]
        for index, record in enumerate(sorted(todo, key=lambda r: (r.bucket, str(r.path)))):
            cached = _read_npz(record) if self.options.cache_latents_to_disk else None
            if cached is None:
                image = resize_and_crop(load_image(record.path), record.choice)
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

    def _dirs(self, reg: bool) -> dict:
        """``ss_dataset_dirs``: folder name → repeats and image count; a second folder of the same name is "name (2)"."""
        dirs: dict = {}
        names: dict[int, str] = {}  # id(subset) → its key
        for record in self.reg if reg else self.train:
            subset = record.subset
            if id(subset) not in names:
                base = subset.image_dir.name if subset.image_dir else subset.metadata_file.name
                name, count = base, 1
                while name in dirs:
                    count += 1
                    name = f"{base} ({count})"
                names[id(subset)] = name
                dirs[name] = {"n_repeats": subset.num_repeats, "img_count": 0}
            dirs[names[id(subset)]]["img_count"] += 1
        return dirs

    def _bucket_info(self, dataset: DatasetPlan):
        if not dataset.config.enable_bucket:
            return None
        counts: dict = {}
        for record in dataset.train + dataset.reg:
            counts[record.bucket] = counts.get(record.bucket, 0) + record.repeats
        errors = [abs(r.choice.aspect_error) for r in dataset.train + dataset.reg]
        return {"buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(counts.items()))},
                "mean_img_ar_error": sum(errors) / max(1, len(errors))}

    def metadata(self) -> dict:
        """sd-scripts' dataset keys: mode A (folders/CLI) or mode B (``--dataset_config``: ``ss_datasets``)."""
        o = self.options
        frequency = C.merged_tag_frequency(d.tag_frequency for d in self.datasets)
        common = {"ss_dataset_dirs": json.dumps(self._dirs(False)), "ss_reg_dataset_dirs": json.dumps(self._dirs(True)),
                  "ss_tag_frequency": json.dumps(frequency)}
        if self.from_config_file:
            return {**common, "ss_datasets": json.dumps([self._dataset_entry(d) for d in self.datasets])}
        first = self.datasets[0].config
        resolution = resolution_of(o) or first.resolution
        return {
            **common,
            "ss_batch_size_per_device": first.batch_size,
            "ss_total_batch_size": first.batch_size * self.world_size * o.gradient_accumulation_steps,
            "ss_resolution": f"({resolution[0]}, {resolution[1]})",
            "ss_color_aug": o.color_aug, "ss_flip_aug": o.flip_aug, "ss_random_crop": o.random_crop,
            "ss_shuffle_caption": o.shuffle_caption, "ss_enable_bucket": o.enable_bucket,
            "ss_bucket_no_upscale": o.bucket_no_upscale,
            "ss_min_bucket_reso": first.min_bucket_reso if o.enable_bucket else None,
            "ss_max_bucket_reso": first.max_bucket_reso if o.enable_bucket else None,
            "ss_keep_tokens": o.keep_tokens,
            "ss_bucket_info": json.dumps(self._bucket_info(self.datasets[0])),
        }

    def _dataset_entry(self, dataset: DatasetPlan) -> dict:
        c = dataset.config
        subsets = []
        for subset in c.subsets:
            count = sum(1 for r in dataset.train + dataset.reg + dataset.validation if r.subset is subset)
            entry = {"img_count": count, "num_repeats": subset.num_repeats, "color_aug": subset.color_aug,
                     "flip_aug": subset.flip_aug, "random_crop": subset.random_crop, "shuffle_caption": subset.shuffle_caption,
                     "keep_tokens": subset.keep_tokens, "keep_tokens_separator": subset.keep_tokens_separator,
                     "secondary_separator": subset.secondary_separator, "enable_wildcard": subset.enable_wildcard,
                     "caption_prefix": subset.caption_prefix, "caption_suffix": subset.caption_suffix,
                     "resize_interpolation": subset.resize_interpolation}
            if c.is_dreambooth:
                entry.update({"image_dir": subset.image_dir.name, "class_tokens": subset.class_tokens, "is_reg": subset.is_reg})
            else:
                entry["metadata_file"] = subset.metadata_file.name
            subsets.append(entry)
        return {"is_dreambooth": c.is_dreambooth, "batch_size_per_device": c.batch_size,
                "num_train_images": sum(r.repeats for r in dataset.train), "num_reg_images": sum(r.repeats for r in dataset.reg),
                "resolution": list(c.resolution), "enable_bucket": c.enable_bucket,
                "min_bucket_reso": c.min_bucket_reso if c.enable_bucket else None,
                "max_bucket_reso": c.max_bucket_reso if c.enable_bucket else None,
                "tag_frequency": dataset.tag_frequency, "bucket_info": self._bucket_info(dataset),
                "resize_interpolation": c.resize_interpolation, "subsets": subsets}


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


def _plan_dataset(index: int, dataset: DatasetConfig, notes: list[str], seed: int) -> DatasetPlan:
    images = dataset_images(dataset)
    notes.extend(images.notes)
    settings = dataset.bucket_settings
    train, reg = [], []
    for subset_images in images.subsets:
        subset = subset_images.subset
        for entry in subset_images.images:
            try:
                size = entry.image_size or read_image_size(entry.path)
                choice = B.select_bucket(size, settings)
            except UserError as problem:
                notes.append(f"{entry.path}: {problem}; skipped")
                continue
            record = ImageRecord(entry.path, entry.caption, subset, index, size, choice, subset.num_repeats)
            (reg if subset.is_reg else train).append(record)
    validation_seed = dataset.validation_seed if dataset.validation_seed is not None else seed
    train, validation = split_validation(train, dataset.validation_split, validation_seed)
    used = regularization_repeats(sum(r.repeats for r in train), [r.repeats for r in reg])
    for record, repeats in zip(reg, used):
        record.repeats = repeats
    reg = [r for r in reg if r.repeats > 0]
    return DatasetPlan(dataset, train, reg, validation, images.tag_frequency)


def build_training_data(options: TrainOptions, config, seed: int, world_size: int = 1) -> TrainingData:
    if not options.cache_latents:
        raise UserError("training without --cache_latents is not supported yet: add --cache_latents")
    if options.dataset_config:
        group = load_dataset_config(Path(options.dataset_config), options)
    else:
        reg = Path(options.reg_data_dir) if options.reg_data_dir else None
        group = config_from_folders(Path(options.train_data_dir), reg, options)
    notes = list(group.warnings)
    datasets = [_plan_dataset(i, d, notes, seed) for i, d in enumerate(group.datasets)]
    datasets = [d for d in datasets if d.train]
    if not datasets:
        raise UserError("the dataset has no usable training images" + (f" ({'; '.join(notes[:3])})" if notes else ""))
    return TrainingData(options, datasets, seed, config.name, notes, bool(options.dataset_config), world_size)
