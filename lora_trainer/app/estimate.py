"""Before Start: how many steps the run takes (sd-scripts' arithmetic), a rough VRAM and time estimate, and the
warnings users want before they wait an hour. Pure functions over the options and the dataset's numbers."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from ..dataset.health import HealthReport, steps_per_epoch
from ..dataset.layouts import regularization_repeats
from ..training.options import TrainOptions, resolution_of

MIN_IMAGES = 5  # below this a LoRA memorises its few images instead of learning the subject
MIN_STEPS = 100
# Full-size weights in GiB at 16 bits that stay on the GPU (UNet, VAE, the rest) and the text encoders' (off it
# with --cache_text_encoder_outputs, as sd-scripts moves them); activations in GiB per image at the native
# resolution in 16 bits, as `bench train --size sd15|sdxl` allocated them on a lent H200 (2026-12-04: SD1.5 3.30 GiB
# at batch 1, 6.72 at 4, 20.45 at 16; SDXL, text-encoder outputs cached, 21.07 at batch 2, 67.57 at 8), and about a
# quarter of that with gradient checkpointing (SD1.5 0.22, SDXL 0.26 there); a seconds-per-step order at batch 1 on
# a mid-range GPU (RTX 3060-class). Guides, not promises.
_ARCH = {"sd1": {"weights": 1.87, "text_encoders": 0.23, "native": 512, "activations": 1.15, "seconds": 0.45},
         "sdxl": {"weights": 6.9, "text_encoders": 1.53, "native": 1024, "activations": 7.0, "seconds": 1.6}}
_CHECKPOINTED = 0.25  # of the activations kept with gradient checkpointing
_CUDA_OVERHEAD_GIB = 0.8
# Trainable parameters per unit of rank of sd-scripts' LoRA (its default layers; counted from its key lists of the
# full-size models), and per unit of conv_dim where the 3×3 convolutions are trained too
_PER_RANK = {"sd1": {"unet": 423_936, "text_encoder": 165_888, "conv": 626_880},
             "sdxl": {"unet": 2_659_840, "text_encoder": 903_168, "conv": 414_400}}
# Optimizer state in bytes per trainable fp32 parameter (the weight and its gradient come on top)
_OPTIMIZER_BYTES = {"adamw": 8, "pagedadamw": 8, "pagedadamw32bit": 8, "adamw8bit": 2, "pagedadamw8bit": 2,
                    "ademamix8bit": 3, "pagedademamix8bit": 3, "lion": 4, "lion8bit": 1, "pagedlion8bit": 1,
                    "sgd": 0, "sgdnesterov": 4, "sgdnesterov8bit": 1, "adafactor": 1, "prodigy": 16,
                    "dadaptation": 12, "dadaptadampreprint": 12, "dadaptadam": 12, "dadaptadan": 16,
                    "dadaptadanip": 16, "dadaptadagrad": 8, "dadaptlion": 8, "dadaptsgd": 8,
                    "adamwschedulefree": 8, "radamschedulefree": 8, "sgdschedulefree": 4}


@dataclass(frozen=True)
class Estimate:
    images: int
    samples_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    vram_gib: float
    minutes: float
    warnings: list[str] = field(default_factory=list)
    regularization_samples: int = 0  # of samples_per_epoch

    def lines(self) -> list[str]:
        counted = (f"with repeats; {self.regularization_samples} of them regularisation images"
                   if self.regularization_samples else "with repeats")
        lines = [f"{self.images} images → {self.samples_per_epoch} samples per epoch ({counted}) → "
                 f"{self.steps_per_epoch} steps per epoch × {self.epochs} epochs = {self.total_steps} steps",
                 f"Estimated VRAM ≈ {self.vram_gib:.1f} GiB; time ≈ {_duration(self.minutes)} on a mid-range GPU"]
        return lines + [f"⚠ {warning}" for warning in self.warnings]


def _duration(minutes: float) -> str:
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def samples_per_bucket(report: HealthReport, regularization: HealthReport | None = None) -> list[int]:
    """Samples (images × their folder's repeats) in each bucket, the numbers sd-scripts batches within; with the
    ``regularization`` folder's images as the trainer adds them (``regularization_samples``)."""
    return list((_bucket_samples(report) + regularization_samples(report, regularization)).values())


def _bucket_samples(report: HealthReport) -> Counter:
    repeats = {folder.path: folder.repeats for folder in report.concept_folders}
    counts: Counter = Counter()
    for image in report.images:
        counts[image.bucket] += repeats.get(image.folder, 1)
    return counts


def regularization_samples(report: HealthReport, regularization: HealthReport | None) -> Counter:
    """The regularisation images' samples in each bucket, as the trainer takes them (sd-scripts' DreamBooth
    balancing, ``regularization_repeats``): in order, with their repeats, until they match the training samples, so
    an epoch has about twice the batches; batched in the same buckets as the training images."""
    if regularization is None:
        return Counter()
    repeats = {folder.path: folder.repeats for folder in regularization.concept_folders}
    used = regularization_repeats(sum(_bucket_samples(report).values()),
                                  [repeats.get(image.folder, 1) for image in regularization.images])
    counts: Counter = Counter()
    for image, times in zip(regularization.images, used):
        counts[image.bucket] += times
    return counts


def planned_steps(bucket_samples: list[int], options: TrainOptions) -> tuple[int, int, int]:
    """(steps per epoch, epochs, total optimizer steps) as sd-scripts counts them: batches within buckets, divided
    by gradient accumulation; epochs given win over max_train_steps."""
    return planned_from_batches(steps_per_epoch(bucket_samples, options.train_batch_size), options)


def planned_from_batches(batches: int, options: TrainOptions) -> tuple[int, int, int]:
    """``planned_steps`` from the batches of one epoch (a dataset TOML batches each dataset at its own size)."""
    per_epoch = math.ceil(batches / options.gradient_accumulation_steps)
    if options.max_train_epochs:
        epochs = options.max_train_epochs
        total = per_epoch * epochs
    else:
        total = options.max_train_steps
        epochs = math.ceil(total / per_epoch) if per_epoch else 0
    return per_epoch, epochs, total


def vram_gib(options: TrainOptions, architecture: str = "sd1") -> float:
    arch = _ARCH[architecture]
    width, height = resolution_of(options) or (arch["native"], arch["native"])
    half = options.mixed_precision in ("fp16", "bf16")
    # fp8: Linear/Conv weights take one byte (the UNet's, and the text encoders' unless --fp8_base_unet); the VAE
    # and norms keep theirs
    unet_share = 0.55 if options.fp8_base or options.fp8_base_unet else 1
    encoder_share = 0.55 if options.fp8_base and not options.fp8_base_unet else 1
    weights = (arch["weights"] * unet_share + (0 if options.cache_text_encoder_outputs else arch["text_encoders"] * encoder_share)
               ) * (1 if half else 2)
    activations = arch["activations"] * options.train_batch_size * (width * height) / arch["native"] ** 2
    activations *= (_CHECKPOINTED if options.gradient_checkpointing else 1) * (1 if half else 2)
    if not options.cache_latents:
        activations += 0.5  # the VAE encodes every batch
    if not options.network_train_unet_only:
        activations += 0.1  # text-encoder activations kept for its gradients (77 tokens: small)
    return round(weights + activations + network_gib(options, architecture) + _CUDA_OVERHEAD_GIB, 1)


def _network_arg(options: TrainOptions, key: str) -> str | None:
    return next((arg.split("=", 1)[1].strip() for arg in options.network_args or []
                 if arg.split("=", 1)[0].strip() == key and "=" in arg), None)


def network_gib(options: TrainOptions, architecture: str = "sd1") -> float:
    """The trained network's weights, gradients and optimizer state: a rank-128 SDXL LoRA under AdamW is ≈ 5 GiB,
    which a guess from the model alone leaves out."""
    per_rank = _PER_RANK[architecture]
    dim = options.network_dim or 4
    parameters = 0 if options.network_train_text_encoder_only else per_rank["unet"] * dim
    if not options.network_train_unet_only:
        parameters += per_rank["text_encoder"] * dim
    try:
        conv_dim = int(float(_network_arg(options, "conv_dim") or 0))
    except ValueError:
        conv_dim = 0
    algo = (_network_arg(options, "algo") or "").lower()
    if "lycoris" in (options.network_module or "") and algo in ("locon", "loha", "lokr") and not conv_dim:
        conv_dim = dim  # LyCORIS trains the convolutions at the network's dim unless told otherwise
    if not options.network_train_text_encoder_only:
        parameters += per_rank["conv"] * conv_dim
    if algo == "loha":  # two pairs of factors where LoRA has one
        parameters *= 2
    state = _OPTIMIZER_BYTES.get((options.optimizer_type or "AdamW").lower(), 8)
    return parameters * (4 + 4 + state) / 2**30


def minutes(total_steps: int, options: TrainOptions, architecture: str = "sd1") -> float:
    arch = _ARCH[architecture]
    width, height = resolution_of(options) or (arch["native"], arch["native"])
    per_step = arch["seconds"] * options.train_batch_size * (width * height) / arch["native"] ** 2
    per_step *= 1.3 if options.gradient_checkpointing else 1
    return total_steps * per_step / 60


def warnings_for(options: TrainOptions, images: int, total_steps: int, epochs: int) -> list[str]:
    warnings = []
    dim = options.network_dim or 4
    if options.network_alpha > dim:
        warnings.append(f"network alpha {options.network_alpha:g} is above dim {dim}: updates are scaled by alpha/dim = "
                        f"{options.network_alpha / dim:g}, which usually overshoots; use alpha ≤ dim (often dim/2)")
    if images == 0:
        warnings.append("the dataset has no usable images; press Check to see why")
    elif images < MIN_IMAGES:
        warnings.append(f"only {images} image(s): {MIN_IMAGES}–20 varied images give a LoRA that generalises")
    if images and options.train_batch_size > images:
        warnings.append(f"batch size {options.train_batch_size} is larger than the {images} images; lower it")
    if total_steps and total_steps < MIN_STEPS:
        warnings.append(f"only {total_steps} steps: the LoRA will learn little; raise the epochs or the folder's repeats")
    step = options.bucket_reso_steps
    sides = resolution_of(options)
    if sides and any(side % step for side in sides):
        warnings.append(f"resolution {options.resolution} is not divisible by the bucket step {step}; use a multiple of {step}")
    if options.save_every_n_epochs and epochs and options.save_every_n_epochs > epochs:
        warnings.append(f"save every {options.save_every_n_epochs} epochs but only {epochs} epochs: only the final file is written")
    return warnings


def estimate(options: TrainOptions, report: HealthReport | None, architecture: str = "sd1",
             regularization: HealthReport | None = None) -> Estimate:
    """``regularization``: the report of --reg_data_dir's folder, whose images the trainer adds to every epoch."""
    buckets = samples_per_bucket(report) if report else []
    images = len(report.images) if report else 0
    batches = report.steps_per_epoch if report else 0
    reg = regularization_samples(report, regularization) if report else Counter()
    if reg:  # a folder dataset (one batch size): reg and training images batched together, bucket by bucket
        buckets = samples_per_bucket(report, regularization)
        batches = steps_per_epoch(buckets, options.train_batch_size)
    per_epoch, epochs, total = planned_from_batches(batches, options)
    return Estimate(images, sum(buckets), per_epoch, epochs, total, vram_gib(options, architecture),
                    minutes(total, options, architecture), warnings_for(options, images, total, epochs),
                    sum(reg.values()))
