"""The data plan of a run: which images, in which buckets, in which order, with which captions, as latents.

Built on the dataset package (``--dataset_config`` / DreamBooth folders, buckets, captions); this file only arranges
them the way sd-scripts' training loop consumes them: repeats (regularisation images balanced as sd-scripts does),
batches inside a bucket per dataset, a seeded order per epoch, latents either cached once (in memory or as
sd-scripts' ``.npz`` files) or encoded per batch with crop/colour/flip augmentation drawn from the epoch's seed, loss
masks from the images' transparency (``alpha_mask``) or from mask folders (``conditioning_data_dir`` with
``--masked_loss``), and the dataset metadata of the saved files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..dataset import buckets as B
from ..dataset import captions as C
from ..dataset.config import DatasetConfig, DatasetGroupConfig, SubsetConfig, load_dataset_config
from ..dataset.health import token_length_reading
from ..dataset.images import checked_image_size, read_image_size
from ..dataset.layouts import (ImageEntry, caption_fallback_notes, config_from_folders, config_from_metadata,
                               dataset_images, face_in_name, list_images, regularization_repeats)
from ..console import progress_bar
from ..errors import UserError
from ..hashing import weights_fingerprint
from ..safe_io import (ENABLE_LONG_PATHS, UNREADABLE_NPZ, remove_files, save_npz, stale_temporaries, temporary_beside,
                       windows_path_length)
from .evaluation import split_validation, validation_generator
from .pixels import TrainingPixels, cut_mask, mask_image, training_pixels
from .options import TrainOptions, resolution_of
from .text import te_outputs_path


@dataclass
class ImageRecord:
    path: Path
    caption: str
    subset: SubsetConfig
    dataset: int  # index of its dataset
    size: tuple[int, int]  # original (w, h), of the file's pixels: SDXL's original size and crop, as sd-scripts gives them
    choice: B.BucketChoice  # the bucket (w, h) it is trained at, and the size it is resized to first
    repeats: int
    latents: torch.Tensor | None = None
    latents_flipped: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # a masked image with cached latents: [H, W] at the bucket size, unflipped
    face: tuple[int, int, int, int] | None = None  # face centre and size from the name, with face_crop_aug_range
    mask_path: Path | None = None  # its image in the subset's mask folder (conditioning_data_dir)
    listed_size: tuple[int, int] | None = None  # a fine-tuning metadata entry's image_size: sd-scripts buckets it and
    # names its latent cache by it, but conditions SDXL on the pixels' size

    @property
    def masked(self) -> bool:
        return self.subset.alpha_mask or self.mask_path is not None

    @property
    def bucket(self) -> tuple[int, int]:
        return self.choice.bucket


@dataclass
class Batch:
    records: list[ImageRecord]
    flips: list[bool]
    latents: torch.Tensor | None = None  # None until encoded when latents are not cached
    loss_weights: torch.Tensor = field(default_factory=lambda: torch.ones(1))
    masks: torch.Tensor | None = None  # [B, H, W] loss masks when a subset is masked
    augment_seed: int = 0  # seeds this batch's crops, colours and VAE sampling when latents are not cached
    pixels: list[TrainingPixels] | None = None  # read ahead by a loader thread, until encoded

    @property
    def original_sizes(self):
        return [sdxl_sizes(r, f)[0] for r, f in zip(self.records, self.flips)]

    @property
    def crops(self):
        return [sdxl_sizes(r, f)[1] for r, f in zip(self.records, self.flips)]

    @property
    def target_sizes(self):
        return [sdxl_sizes(r, f)[2] for r, f in zip(self.records, self.flips)]


Hw = tuple[int, int]


def sdxl_sizes(record: ImageRecord, flipped: bool) -> tuple[Hw, Hw, Hw]:
    """SDXL's size conditioning of an image as sd-scripts gives it: (original h, w), (crop top, left), (target h, w),
    the crop mirrored for a flipped image."""
    target = (record.bucket[1], record.bucket[0])
    if record.face or record.choice.native:  # "uncropped at the target size" (a face crop, a patch at its own size):
        # crop (0, 0, 0, 0), whose mirror sd-scripts gives as a left of the full width
        return target, (0, record.bucket[0] if flipped else 0), target
    left, top, right, _ = B.crop_ltrb(record.bucket, record.size)
    return (record.size[1], record.size[0]), (int(top), int(record.bucket[0] - right if flipped else left)), target


@dataclass
class DatasetPlan:
    config: DatasetConfig
    train: list[ImageRecord]
    reg: list[ImageRecord]
    validation: list[ImageRecord]
    tag_frequency: dict[str, dict[str, int]]
    num_reg_images: int  # with their folders' repeats, before they are balanced against the training images


def latent_noise_seed(seed: int, record: ImageRecord) -> int:
    """The seed of an image's latent sample: the run's seed, the image's file name and its bucket (not its folder: the
    same pictures copied to another folder train the same)."""
    key = f"{seed}|{record.path.name}|{record.bucket}".encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


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
        self.num_reg_images = sum(d.num_reg_images for d in datasets)
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
        """The epoch's batches; with cached latents they are ready, else ``encode`` fills them when trained."""
        rng = random.Random(self.seed * 1000003 + epoch)
        batches = []
        for members in self._plan(epoch):
            flips = [m.subset.flip_aug and rng.random() < 0.5 for m in members]
            weights = torch.tensor([self.datasets[m.dataset].config.prior_loss_weight if m.subset.is_reg else 1.0 for m in members])
            if not self.options.cache_latents:
                batches.append(Batch(members, flips, None, weights, augment_seed=rng.getrandbits(62)))
                continue
            latents = torch.stack([m.latents_flipped if f else m.latents for m, f in zip(members, flips)])
            masks = None
            if any(m.masked for m in members):
                masks = torch.stack([_flip(m.mask, f) if m.mask is not None else torch.ones(m.bucket[1], m.bucket[0])
                                     for m, f in zip(members, flips)])
            batches.append(Batch(members, flips, latents, weights, masks))
        return batches

    @torch.no_grad()
    def encode(self, batch: Batch, vae, device, rows: slice = slice(None)) -> Batch:
        """Without ``--cache_latents``: load, crop, colour-augment, flip and encode the batch's images now.

        Under torchrun each rank encodes only its ``rows``; the augmentation and posterior-noise draws are still made
        for the whole batch, so every row gets the latent a single process would give it. Other ranks' rows stay
        zero: only their shape is used, for the batch-wide noise draws of the training step."""
        if batch.latents is not None:
            return batch
        images = batch.pixels or self._pixels(batch)
        batch.pixels = None
        height, width = images[0].pixels.shape[-2:]
        factor = vae.config.downscale
        batch.latents = torch.zeros(len(images), vae.config.z_channels, height // factor, width // factor)
        noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(batch.augment_seed))[rows]
        if len(noise):  # a short last batch may leave a rank without rows
            posterior = vae.encode(torch.stack([i.pixels for i in images[rows]]).to(device, vae.dtype))
            batch.latents[rows] = posterior.sample_with(noise).float().cpu()
            _check_finite(batch.latents[rows], batch.records[rows], vae.dtype)
        if any(i.mask is not None for i in images):
            batch.masks = torch.stack([i.mask if i.mask is not None else torch.ones(height, width) for i in images])
        return batch

    def network_multiplier(self, batch: Batch) -> float:
        """Its dataset's ``network_multiplier`` (a batch never mixes datasets; sd-scripts too takes one per batch)."""
        return self.datasets[batch.records[0].dataset].config.network_multiplier

    def _pixels(self, batch: Batch) -> list[TrainingPixels]:
        """The batch's images read, cropped, colour-augmented and flipped, with draws from its own seed only."""
        rng = random.Random(batch.augment_seed)
        return [training_pixels(r.path, r.choice, flip=f, random_crop=r.subset.random_crop, color_aug=r.subset.color_aug,
                                alpha_mask=r.subset.alpha_mask, mask_path=r.mask_path, interpolation=self._interpolation(r),
                                face=r.face,
                                face_range=r.subset.face_crop_aug_range, rng=rng)
                for r, f in zip(batch.records, batch.flips)]

    def loaded(self, batches: list[Batch], workers: int) -> Iterator[Batch]:
        """``batches`` in order; without cached latents each one's images are read up to ``workers`` batches ahead
        (sd-scripts' loader processes, here threads: PIL and torch decode and resize without the GIL). Each batch
        draws from its own seed, so what the threads produce does not depend on their timing."""
        if self.options.cache_latents or workers <= 0:
            yield from batches
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="loader") as pool:
            ahead: deque[tuple[Batch, Future]] = deque()
            for batch in batches:
                ahead.append((batch, pool.submit(self._pixels, batch)))
                if len(ahead) > workers:
                    yield _with_pixels(*ahead.popleft())
            while ahead:
                yield _with_pixels(*ahead.popleft())

    # --- captions -------------------------------------------------------------------------------------------

    def captions_for(self, batch: Batch, epoch: int, step: int, total_steps: int, generator: torch.Generator) -> list[str]:
        rng = random.Random(int(torch.randint(0, 2**62, (), generator=generator)))
        return [C.process_caption(r.caption, r.subset.caption_options, rng, epoch=epoch + 1, step=step,
                                  max_train_steps=total_steps) for r in batch.records]

    def long_captions_note(self, tokenizer, limit: int) -> str | None:
        """Captions longer than the text encoder reads at ``max_token_length`` (75 unless set): sd-scripts cuts them
        without a word, and a booru-tagged caption of 200 tokens loses its last tags every step."""
        lengths = {r.path: len(tokenizer.encode(r.caption.split("\n")[0])) for r in self.records}
        over = {path: n for path, n in lengths.items() if n > limit}
        if not over:
            return None
        longest = max(over, key=over.get)
        whole = token_length_reading(over[longest])
        fix = (f"--max_token_length {whole} reads them whole" if whole else
               "--max_token_length 225 reads more" if limit < 225 else "shorten them")
        return (f"{len(over)} caption(s) are longer than the {limit} tokens the text encoder reads (longest: "
                f"{longest.name}, {over[longest]} tokens): the rest is cut, as sd-scripts cuts it; {fix}")

    def fixed_captions(self) -> dict[Path, str]:
        """Each image's caption as training sees it, for ``--cache_text_encoder_outputs`` (refused when captions vary)."""
        check_captions_cacheable(r.subset.caption_options for r in self.records)
        rng = random.Random(0)  # unused: nothing random is on
        captions = {r.path: C.process_caption(r.caption, r.subset.caption_options, rng, epoch=1, step=0, max_train_steps=1)
                    for r in self.records}
        # nothing here changes with the step (token warm-up is refused above): any step count gives these captions
        captions.update(zip((r.path for r in self.validation), self.validation_captions(total_steps=1)))
        return captions

    def validation_captions(self, total_steps: int) -> list[str]:
        """Each held-out image's caption as training builds it (prefix and suffix, wildcards, separators, dropout), as
        the first epoch draws it once token warm-up is over; drawn from the image's own validation generator, so every
        evaluation measures the same captions and epochs compare (sd-scripts resets to the validation seed)."""
        captions = []
        for index, record in enumerate(self.validation):
            generator = validation_generator(self.validation_seed, index)
            rng = random.Random(int(torch.randint(0, 2**62, (), generator=generator)))
            captions.append(C.process_caption(record.caption, record.subset.caption_options, rng, epoch=1,
                                              step=total_steps, max_train_steps=total_steps))
        return captions

    def check_cache_path_lengths(self, limits: tuple[int, int] | None) -> None:
        """The caches written beside the images (sd-scripts' names, longer than the image's) must fit Windows' path
        limit too (``OutputPlan.check_path_lengths``): else the caching fails part-way, after the model has loaded."""
        images = [r.path for r in self.records + self.validation]
        caches = [("--cache_latents_to_disk", path) for path in (
            [npz_path(r, self.config_name) for r in self.records + self.validation] if self.options.cache_latents_to_disk else [])]
        caches += [("--cache_text_encoder_outputs_to_disk", te_outputs_path(image))
                   for image in (images if self.options.cache_text_encoder_outputs_to_disk else [])]
        if limits is None or not caches:
            return
        option, path = max(caches, key=lambda c: windows_path_length(temporary_beside(c[1])))
        excess = windows_path_length(temporary_beside(path)) - limits[0]
        if excess > 0:
            raise UserError(f"{option} would write {path} beside its image, and its temporary name is {limits[0] + excess} "
                            f"characters long where Windows allows {limits[0]} unless long paths are enabled: move the "
                            f"dataset to a folder {excess} characters shorter (or shorten that image's name), drop "
                            f"{option} (the cache then stays in memory), or {ENABLE_LONG_PATHS}")

    # --- latents --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def cache_latents(self, vae, device, events) -> None:
        """Encode every image once (with ``--cache_latents``; the validation images always: they are never augmented)."""
        vae.to(device)
        todo = [r for r in (self.records if self.options.cache_latents else []) + self.validation if r.latents is None]
        todo.sort(key=lambda r: (r.bucket, str(r.path)))
        encoder = weights_fingerprint(vae.encoder, vae.quant_conv) if self.options.cache_latents_to_disk and todo else ""
        if self.options.cache_latents_to_disk or self.options.cache_text_encoder_outputs_to_disk:
            folders = {r.path.parent for r in self.records + self.validation}
            left = [t for folder in sorted(folders) for t in stale_temporaries(folder, _CACHE_NAMES)]
            if left:
                freed = remove_files(left)
                events.emit("warning", message=f"removed {len(left)} cache file{'s' if len(left) > 1 else ''} that a run "
                            f"killed while caching left half-written beside the images ({freed / 2**20:.1f} MiB), "
                            f"e.g. {left[0]}")
        done, bar, unmarked = 0, progress_bar(len(todo), "image", "caching latents", leave=False), []
        for group in _vae_batches(todo, self.options.vae_batch_size):
            disk = [_read_npz(r, self.config_name, self._interpolation(r), encoder, unmarked)
                    if self.options.cache_latents_to_disk else None for r in group]
            fresh = [r for r, cached in zip(group, disk) if cached is None]
            encoded = iter(self._encode_for_cache(fresh, vae, device) if fresh else [])
            for record, cached in zip(group, disk):
                if cached is None:
                    cached = next(encoded)
                    if self.options.cache_latents_to_disk:
                        _write_npz(record, *cached, self.config_name, encoder)
                record.latents, record.latents_flipped, record.mask = cached
            # every 50 latents, and the last count of a caching long enough to have said one
            if (done + len(group)) // 50 > done // 50 or (done + len(group) == len(todo) >= 50):
                events.emit("step", phase="caching latents", done=done + len(group), total=len(todo))
            done += len(group)
            bar.update(len(group))
        bar.close()
        if unmarked:  # only the user knows which VAE made these; SD and SDXL latents even have the same shape
            older = any(not re.search(r"_\d{4}x\d{4}_(sd|sdxl)$", path.stem) for path in unmarked)
            other = " (for <image>.npz, sd-scripts' older name, also if they were made for SD where this run is SDXL, " \
                    "or the reverse)" if older else ""
            events.emit("warning", message=unmarked_caches_warning(unmarked, "latent", f"checkpoint or VAE{other}"))

    def _encode_for_cache(self, records: list[ImageRecord], vae, device):
        """(latents, flipped latents or None, mask) of each record, the images through the VAE as one batch."""
        images = [training_pixels(r.path, r.choice, alpha_mask=r.subset.alpha_mask, mask_path=r.mask_path,
                                  interpolation=self._interpolation(r)) for r in records]
        pixels = torch.stack([image.pixels for image in images]).to(device, vae.dtype)
        posteriors = [vae.encode(pixels)] + ([vae.encode(pixels.flip(-1))] if records[0].subset.flip_aug else [])
        # each image's own draws, flipped after unflipped: the same whatever --vae_batch_size is, and whichever other
        # images a cache on disk already holds (a run killed while caching changed every later run's latents)
        shape = (len(posteriors), *posteriors[0].mean.shape[1:])
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(latent_noise_seed(self.seed, r)))
                             for r in records])
        latents = [posterior.sample_with(noise[:, i]).float().cpu() for i, posterior in enumerate(posteriors)]
        _check_finite(torch.stack(latents, 1), records, vae.dtype)
        return [(latents[0][i], latents[1][i] if len(latents) > 1 else None, image.mask) for i, image in enumerate(images)]

    def _interpolation(self, record: ImageRecord) -> str | None:
        return record.subset.resize_interpolation or self.datasets[record.dataset].config.resize_interpolation

    # --- metadata -------------------------------------------------------------------------------------------

    @staticmethod
    def _dirs(records: list[ImageRecord]) -> dict:
        """``ss_dataset_dirs``: folder name → repeats and image count; a second folder of the same name is "name (2)"."""
        dirs: dict = {}
        names: dict[int, str] = {}  # id(subset) → its key
        for record in records:
            subset = record.subset
            if id(subset) not in names:
                base = subset.metadata_file.name if subset.metadata_file else subset.image_dir.name
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
        if self.from_config_file:  # the training subsets' folders in one table; sd-scripts leaves regularisation out
            return {"ss_dataset_dirs": json.dumps(self._dirs(self.train)), "ss_tag_frequency": json.dumps(frequency),
                    "ss_datasets": json.dumps([self._dataset_entry(d) for d in self.datasets])}
        common = {"ss_dataset_dirs": json.dumps(self._dirs(self.train)), "ss_reg_dataset_dirs": json.dumps(self._dirs(self.reg)),
                  "ss_tag_frequency": json.dumps(frequency)}
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
            elif subset.conditioning_data_dir:  # sd-scripts lists no subsets of a ControlNet dataset: named here
                entry.update({"image_dir": subset.image_dir.name, "conditioning_data_dir": subset.conditioning_data_dir.name})
            else:
                entry["metadata_file"] = subset.metadata_file.name
            subsets.append(entry)
        return {"is_dreambooth": c.is_dreambooth, "batch_size_per_device": c.batch_size,
                "num_train_images": sum(r.repeats for r in dataset.train), "num_reg_images": dataset.num_reg_images,
                "resolution": list(c.resolution), "enable_bucket": c.enable_bucket,
                "min_bucket_reso": c.min_bucket_reso if c.enable_bucket else None,
                "max_bucket_reso": c.max_bucket_reso if c.enable_bucket else None,
                "tag_frequency": dataset.tag_frequency, "bucket_info": self._bucket_info(dataset),
                "resize_interpolation": c.resize_interpolation, "subsets": subsets}


def _vae_batches(records: list[ImageRecord], size: int) -> Iterator[list[ImageRecord]]:
    """Runs of up to ``size`` records that the VAE can take together: one bucket, the same flip_aug."""
    group: list[ImageRecord] = []
    for record in records:
        fits = group and (record.bucket, record.subset.flip_aug) == (group[0].bucket, group[0].subset.flip_aug)
        if group and (not fits or len(group) >= size):
            yield group
            group = []
        group.append(record)
    if group:
        yield group


def _check_finite(latents: torch.Tensor, records: list[ImageRecord], vae_dtype: torch.dtype) -> None:
    """Stop at the first image whose latents hold NaN/Inf, before they poison the training: in fp16 the SDXL VAE
    overflows (the WebUI's --no-half-vae message)."""
    bad = (~torch.isfinite(latents.flatten(1))).any(1)
    if bad.any():
        path = records[int(bad.nonzero()[0])].path
        fix = ("add --no_half_vae to keep the VAE in fp32, or use an fp16-fixed VAE with --vae"
               if vae_dtype == torch.float16 else "check the VAE weights (--vae or the checkpoint's own)")
        raise UserError(f"{path}: the VAE ({str(vae_dtype).removeprefix('torch.')}) gave NaN/Inf latents; {fix}")


def _with_pixels(batch: Batch, pixels: Future) -> Batch:
    batch.pixels = pixels.result()
    return batch


# the names of the caches written beside the images (``_npz_beside``, an older ``<stem>.npz``, ``text.te_outputs_path``)
_CACHE_NAMES = re.compile(r".+\.npz")


def npz_path(record: ImageRecord, config_name: str) -> Path:
    """sd-scripts' cache name: ``<stem>_<W:04d>x<H:04d>_sd.npz`` (``_sdxl``), W×H the original image size (a metadata
    entry's image_size where it gives one); an older ``<stem>.npz`` beside the image instead, where there is one."""
    return _npz_beside(record.path, record.listed_size or record.size, config_name)


def _npz_beside(image: Path, size: tuple[int, int], config_name: str) -> Path:
    older = image.with_suffix(".npz")  # sd-scripts' name before sizes and families: it still reads it, SD and SDXL
    if older.is_file():  # alike, and encodes again into it when it does not fit (``get_latents_npz_path``)
        return older
    w, h = size
    return image.with_name(f"{image.stem}_{w:04d}x{h:04d}_{'sdxl' if config_name == 'sdxl' else 'sd'}.npz")


def _cached_since(image: Path, cache: Path) -> bool:
    """The cache was written after the image last changed (an edited image is encoded again)."""
    return cache.is_file() and cache.stat().st_mtime >= image.stat().st_mtime


def _flip(mask: torch.Tensor, flipped: bool) -> torch.Tensor:
    return mask.flip(-1) if flipped else mask


def _read_npz(record: ImageRecord, config_name: str, interpolation: str | None, encoder: str, unmarked: list[Path]):
    """(latents, flipped latents, mask) from this model family's sd-scripts cache when it fits this run, else None.
    Only the family's own file (SD and SDXL latents have the same shape but come from different VAEs), but for an
    older ``<stem>.npz``, which sd-scripts reads for both (a cache_latents warning names those); and not one
    ours wrote with another VAE encoder (``encoder``: its weights' fingerprint; a checkpoint with another baked-in VAE,
    or ``--vae``), which sd-scripts would train on unnoticed. A mask folder's mask is not in it (sd-scripts reads
    those images each step): it is read from the folder. A cache read that does not record its VAE encoder is added
    to ``unmarked``."""
    path = npz_path(record, config_name)
    if not _cached_since(record.path, path):
        return None
    try:
        with np.load(path) as data:
            latents = data.get("latents")
            flipped = data.get("latents_flipped")
            mask = data.get("alpha_mask")
            made_by = data.get("vae_encoder")
    except UNREADABLE_NPZ:  # half-written by a crashed run of another tool: encode again
        return None
    if latents is None or tuple(latents.shape[1:]) != (record.bucket[1] // 8, record.bucket[0] // 8):
        return None
    if made_by is not None and str(made_by) != encoder:  # sd-scripts' files have no such entry: trusted as it does
        return None
    if (record.subset.flip_aug and flipped is None) or (record.subset.alpha_mask and mask is None):
        return None
    mask = torch.from_numpy(mask.astype(np.float32)) if record.subset.alpha_mask else None
    if record.mask_path is not None:
        mask = cut_mask(mask_image(record.mask_path, record.size), record.choice, interpolation=interpolation)
    if made_by is None:  # ours record it since 2026-12-04; sd-scripts' never do
        unmarked.append(path)
    return torch.from_numpy(latents), None if flipped is None else torch.from_numpy(flipped), mask


def unmarked_caches_warning(caches: list[Path], kind: str, changed: str) -> str:
    """Caches read as this run's that do not record what made them: sd-scripts' own, or this trainer's before it
    recorded it. Read as sd-scripts reads them, and said, since only the user knows whether the model changed."""
    many = len(caches) > 1
    return (f"{len(caches)} {kind} cache{'s' if many else ''} beside the images {'do' if many else 'does'} not record "
            f"which model made {'them' if many else 'it'} (sd-scripts' own, or this trainer's before 2026-12-05) and "
            f"{'were' if many else 'was'} read as this run's, as sd-scripts reads them, e.g. {caches[0]}: if the "
            f"{changed} changed since, delete {'them' if many else 'it'} and {'they are' if many else 'it is'} "
            "encoded again")


def _write_npz(record: ImageRecord, latents: torch.Tensor, flipped: torch.Tensor | None, mask: torch.Tensor | None,
               config_name: str, encoder: str) -> None:
    arrays = {"latents": latents.numpy().astype(np.float32), "original_size": np.array(record.size, dtype=np.int64),
              "crop_ltrb": np.array(B.crop_ltrb(record.bucket, record.size), dtype=np.float64),
              "vae_encoder": np.array(encoder)}  # ours: sd-scripts reads only the entries it knows
    if flipped is not None:
        arrays["latents_flipped"] = flipped.numpy().astype(np.float32)
    if mask is not None and record.subset.alpha_mask:  # a mask folder's stays in its folder, as in sd-scripts
        arrays["alpha_mask"] = mask.numpy().astype(np.float32)
    target = npz_path(record, config_name)
    try:
        save_npz(target, arrays)  # a crash leaves no half-written cache
    except OSError as error:
        raise UserError(f"cannot write the latent cache {target}: {error.strerror or error}; make the folder writable "
                        "or cache in memory only (--cache_latents without --cache_latents_to_disk)") from None


MASK_SOURCES = ("set alpha_mask = true on the subsets (or --alpha_mask) to mask the loss with the images' "
                "transparency, or give each subset of a --dataset_config a mask folder (conditioning_data_dir: an image "
                "of the same name per training image, white where it is learnt, black where not)")


def _mask_files(subset: SubsetConfig, entries, notes: list[str]) -> dict[str, Path]:
    """The mask folder's image for each training image (same name, any image extension), as sd-scripts pairs them;
    a training image without one is an error before any work, a mask without its image a note."""
    folder = subset.conditioning_data_dir
    if not folder.is_dir():
        raise UserError(f"conditioning_data_dir {folder}: no such folder; give the folder of the masks of {subset.image_dir}")
    masks = {path.stem: path for path in list_images(folder)}
    missing = [entry.path.name for entry in entries if entry.path.stem not in masks]
    if missing:
        raise UserError(f"conditioning_data_dir {folder}: no mask for {len(missing)} of the images in {subset.image_dir} "
                        f"({', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}); add an image of the same name for each")
    unused = sorted(set(masks) - {entry.path.stem for entry in entries})
    if unused:
        notes.append(f"conditioning_data_dir {folder}: {len(unused)} masks without a training image are not used "
                     f"({', '.join(unused[:5])})")
    damaged = [problem for problem in _each_decoded(_mask_problem, [masks[entry.path.stem] for entry in entries], "mask")
               if problem is not None]
    if damaged:  # like a missing mask, before any work: which parts to learn is the user's to say
        raise UserError(f"conditioning_data_dir {folder}: {len(damaged)} masks cannot be read: "
                        f"{str(damaged[0]).rstrip('.')}{' (and more)' if len(damaged) > 1 else ''}")
    return masks


def _mask_problem(path: Path) -> UserError | None:
    try:
        checked_image_size(path)
    except UserError as error:
        return error
    return None


# Pillow decodes without the GIL; at most a few images decoded at once, each up to 100 megapixels
_CHECK_THREADS = min(8, os.cpu_count() or 1)


_SizedImage = tuple[tuple[int, int], B.BucketChoice]  # an image's original size (w, h) and its bucket


def _sized_image(entry: ImageEntry, settings: B.BucketSettings, cached_as: str | None = None,
                 random_crop: bool = False) -> _SizedImage | UserError:
    """The image's size and bucket, or why it cannot train. Its pixels are decoded once here, even when the metadata
    gives its size: a file truncated after a good header is then skipped like any unreadable one, before anything is
    counted, instead of stopping the run when its latents are cached (or mid-epoch without caching). Not when this
    model family's disk cache (``cached_as``) is newer than the image: the run reads the latents, never the pixels
    (unless the cache was made at another resolution, when the image is read to encode it again). The size is the
    file's; the bucket is a metadata entry's image_size's, where it gives one, as sd-scripts buckets it."""
    listed = entry.image_size
    try:
        if cached_as is not None:
            size = _header_size_or_listed(entry.path, listed)
            if _cached_since(entry.path, _npz_beside(entry.path, listed or size, cached_as)):
                return size, B.select_bucket(listed or size, settings)
        size = checked_image_size(entry.path)
        return size, B.select_bucket(listed or size, settings, random_crop)
    except UserError as problem:
        return problem


def _header_size_or_listed(path: Path, listed: tuple[int, int] | None) -> tuple[int, int]:
    """The size the file's header gives, or the metadata's where the header cannot be read: with a fresh cache the
    run never opens the picture (sd-scripts takes the metadata's size then, and trains from the cache)."""
    try:
        return read_image_size(path)
    except UserError:
        if listed is None:
            raise
        return listed


def _each_decoded(check: Callable, items: Sequence, unit: str) -> list:
    """``check`` (which decodes an image) of each item, in order, on a few threads, with a bar: decoding takes
    ≈ 6 ms a megapixel PNG, a minute for ten thousand images on 2 cores."""
    results = []
    with (ThreadPoolExecutor(_CHECK_THREADS, thread_name_prefix="image-check") as pool,
          progress_bar(len(items), unit, f"checking {unit}s", leave=False) as bar):
        for result in pool.map(check, items):
            results.append(result)
            bar.update()
    return results


def _plan_dataset(index: int, dataset: DatasetConfig, notes: list[str], seed: int,
                  cached_as: str | None = None, config_file: str | None = None,
                  latents_cached: bool = False) -> DatasetPlan:
    images = dataset_images(dataset)
    notes.extend(images.notes)
    settings = dataset.bucket_settings
    train, reg = [], []
    tag_frequency = images.tag_frequency
    for subset_images in images.subsets:
        subset = subset_images.subset
        masks = _mask_files(subset, subset_images.images, notes) if subset.conditioning_data_dir else None
        kept = []
        checked = _each_decoded(lambda entry: _sized_image(entry, settings, cached_as, subset.random_crop),
                                subset_images.images, "image")
        for entry, sized in zip(subset_images.images, checked):
            if isinstance(sized, UserError):
                said = str(sized).rstrip(".")
                notes.append(f"{said if str(entry.path) in said else f'{entry.path}: {said}'}; skipped")
                if entry.counted_tags is not None:  # it trains nothing: its tags leave ss_tag_frequency
                    tag_frequency = C.tag_frequency_without(tag_frequency, subset_images.frequency_name,
                                                            [entry.counted_tags])
                continue
            kept.append(entry)
            size, choice = sized
            record = ImageRecord(entry.path, entry.caption, subset, index, size, choice, subset.num_repeats,
                                 mask_path=masks.get(entry.path.stem) if masks is not None else None,
                                 listed_size=entry.image_size)
            (reg if subset.is_reg else train).append(record)
        notes.extend(caption_fallback_notes(subset, kept, config_file))  # after the skips: it names only images that train
    validation_seed = dataset.validation_seed if dataset.validation_seed is not None else seed
    train, validation = _split_each_subset(train, dataset.validation_split, validation_seed, notes)
    num_reg_images = sum(r.repeats for r in reg)  # what sd-scripts records as ss_num_reg_images
    used = regularization_repeats(sum(r.repeats for r in train), [r.repeats for r in reg])
    for record, repeats in zip(reg, used):
        record.repeats = repeats
    reg = [r for r in reg if r.repeats > 0]
    for record in train + reg:  # validation images are never augmented
        if record.subset.face_crop_aug_range is not None:
            record.face = face_in_name(record.path)
    if not dataset.enable_bucket and not latents_cached:
        notes.extend(_fixed_resolution_note(train + reg + validation, settings.resolution))
    return DatasetPlan(dataset, train, reg, validation, tag_frequency, num_reg_images)


def _fixed_resolution_note(records: list[ImageRecord], resolution: tuple[int, int]) -> list[str]:
    """Without buckets and cached latents sd-scripts trains only images of the resolution (larger ones with
    random_crop or a face crop) and stops on the others; here they are resized to cover it and cropped: said once."""
    problems = [(record, problem) for record in records if (problem := B.fixed_resolution_problem(
        record.size, resolution, record.subset.random_crop, face_crop=record.subset.face_crop_aug_range is not None,
        face_named=face_in_name(record.path) is not None))]
    if not problems:
        return []
    first, problem = problems[0]
    others = f" (and {len(problems) - 1} more image{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    return [f"{first.path}{others}: sd-scripts would stop on it (buckets off, latents not cached): {problem} This run "
            f"resizes such images to cover {resolution[0]}x{resolution[1]} and crops them instead"]


def _split_each_subset(records: list[ImageRecord], fraction: float, seed: int, notes: list[str]):
    """The held-out split of each subset on its own, as sd-scripts draws it: a small subset is never held out whole
    by a split drawn over the dataset. A subset too small to give an image is said."""
    train, validation = [], []
    subsets = {id(record.subset): record.subset for record in records}
    for key, subset in subsets.items():
        kept, held = split_validation([r for r in records if id(r.subset) == key], fraction, seed)
        train += kept
        validation += held
        if fraction > 0 and not held:
            notes.append(f"{subset.image_dir}: --validation_split {fraction} holds out none of its {len(kept)} "
                         "image(s); it trains on all of them")
    return train, validation


def check_captions_cacheable(caption_options: Iterable[C.CaptionOptions]) -> None:
    """--cache_text_encoder_outputs encodes each caption once: no subset may change its captions between steps."""
    problems = sorted({p for options in caption_options for p in C.caching_problems(options)})
    if problems:
        raise UserError(f"--cache_text_encoder_outputs encodes each caption once, but {', '.join(problems)} "
                        f"{'changes' if len(problems) == 1 else 'change'} the captions between steps; turn "
                        f"{'it' if len(problems) == 1 else 'them'} off (in the options or the dataset TOML) or drop the "
                        "caching", problems[0])


def dataset_group(options: TrainOptions) -> DatasetGroupConfig:
    """The datasets the run reads, resolved with its options: from --dataset_config, --in_json (fine-tuning) or the
    folders. No image is opened, so a job can be checked with it before it is queued."""
    if options.dataset_config:
        return load_dataset_config(Path(options.dataset_config), options, support_controlnet=options.masked_loss)
    if options.in_json:  # sd-scripts' fine-tuning mode: one subset, --train_data_dir is where its images are
        return config_from_metadata(Path(options.train_data_dir) if options.train_data_dir else None, Path(options.in_json), options)
    reg = Path(options.reg_data_dir) if options.reg_data_dir else None
    return config_from_folders(Path(options.train_data_dir), reg, options)


def check_bucket_steps(group: DatasetGroupConfig, config) -> None:
    """sd-scripts' ``verify_bucket_reso_steps``: bucket sides step by a multiple of 64 for SD1/SD2 and 32 for SDXL,
    so every latent side halves evenly down the UNet; a step of 1 (shipped in some Kohya GUI presets) trains odd
    sizes that sd-scripts refuses."""
    multiple = config.bucket_step_multiple
    for dataset in group.datasets:
        step = dataset.bucket_reso_steps
        if step % multiple:
            fix = max(multiple, round(step / multiple) * multiple)
            raise UserError(f"bucket_reso_steps {step}: {config.label} training needs a multiple of {multiple} (as "
                            f"sd-scripts asserts); use {fix}", "bucket_reso_steps")


def build_training_data(options: TrainOptions, config, seed: int, world_size: int = 1) -> TrainingData:
    group = dataset_group(options)
    check_bucket_steps(group, config)
    notes = list(group.warnings)
    _check_augmentations(group.datasets, options)
    cached_as = config.name if options.cache_latents_to_disk else None  # whose disk caches the run would read
    datasets = [_plan_dataset(i, d, notes, seed, cached_as, options.dataset_config, options.cache_latents)
                for i, d in enumerate(group.datasets)]
    datasets = [d for d in datasets if d.train]
    if not datasets:
        raise UserError("the dataset has no usable training images" + (f" ({'; '.join(notes[:3])})" if notes else ""))
    return TrainingData(options, datasets, seed, config.name, notes, bool(options.dataset_config), world_size)


def _check_augmentations(datasets: list[DatasetConfig], options: TrainOptions) -> None:
    """Augmentations that change the pixels every step cannot use latents encoded once (sd-scripts asserts the same);
    face crops need the fixed resolution (no buckets); ``--masked_loss`` needs a subset with masks."""
    subsets = [subset for dataset in datasets for subset in dataset.subsets]
    if options.masked_loss and not any(subset.alpha_mask or subset.conditioning_data_dir for subset in subsets):
        raise UserError(f"--masked_loss needs masks: {MASK_SOURCES}")
    for dataset in datasets:
        for subset in dataset.subsets:
            where = subset.image_dir or subset.metadata_file
            if subset.face_crop_aug_range is not None and dataset.enable_bucket:
                raise UserError(f"{where}: face_crop_aug_range cuts the fixed resolution around the face and does not "
                                "work with buckets (sd-scripts ignores it there); turn enable_bucket off or drop "
                                "face_crop_aug_range")
            used = [name for name in ("color_aug", "random_crop", "face_crop_aug_range") if getattr(subset, name)]
            if used and options.cache_latents:
                raise UserError(f"{where}: {' and '.join(used)} "
                                f"{'changes' if len(used) == 1 else 'change'} the pixels every step, so latents cannot be cached; "
                                "drop --cache_latents/--cache_latents_to_disk (slower, more memory) or turn "
                                f"{' and '.join(used)} off")
