"""The one typed configuration of a training run, with sd-scripts' argument names, types and defaults.

The command line, a ``--config_file`` TOML (flattened one level, as sd-scripts does), the UI form and the HTTP
API body all become a ``TrainOptions`` before anything runs. Options sd-scripts has and we do not implement are
still recognised, and refused by name when set — never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import toml_text
from ..dataset.buckets import check_largest_side
from ..dataset.captions import caching_problems
from ..errors import UserError, with_closest
from ..safe_io import is_plain_name, read_utf8, windows_can_make
from .lr_schedules import steps_or_fraction
from .optimizers import check_optimizer_name, is_schedule_free, moments_underflow_in_fp16, takes_its_own_step

LONGEST_OUTPUT_NAME_BYTES = 200  # leaves room for what a run adds to it within a file name's 255 bytes


def opt(default: Any = None, help: str = "", *, choices=None, nargs: str | None = None, inert: str | None = None):
    return field(default=default, metadata={"help": help, "choices": choices, "nargs": nargs, "inert": inert})


def inert(why: str):
    """An sd-scripts switch that changes nothing here, and why: accepted so existing commands run, and said in a
    warning when set (never silently ignored)."""
    return opt(False, f"accepted, no effect: {why}", inert=why)


@dataclass
class TrainOptions:
    # model
    pretrained_model_name_or_path: str | None = opt(None, "base checkpoint (.safetensors/.ckpt) or Diffusers folder")
    v2: bool = opt(False, "SD2.x base model (detected from the checkpoint anyway; a contradiction is an error)")
    v_parameterization: bool = opt(False, "v-prediction model (SD2-768-v)")
    vae: str | None = opt(None, "a separate VAE file")
    clip_skip: int | None = opt(None, "use the output of the k-th last text-encoder layer")
    # dataset
    train_data_dir: str | None = opt(None, "folder of <repeats>_<class tokens> subfolders")
    reg_data_dir: str | None = opt(None, "regularisation images, same layout")
    dataset_config: str | None = opt(None, "dataset TOML (general / datasets / subsets)")
    in_json: str | None = opt(None, "fine-tuning metadata JSON ({image: {caption, tags}}); --train_data_dir is its image folder")
    dataset_repeats: int = opt(1, "repeats of every image where no num_repeats is given (--in_json datasets)")
    resolution: str | None = opt(None, '"512" or "512,768"')
    caption_extension: str = opt(".caption", "caption file extension")
    caption_separator: str = opt(",", "tag separator")
    keep_tokens: int = opt(0, "tags kept in front when shuffling")
    keep_tokens_separator: str = opt("", "text before it is kept in front when shuffling")
    secondary_separator: str | None = opt(None, "separator joined like a tag group, replaced by caption_separator")
    shuffle_caption: bool = opt(False, "shuffle comma-separated tags")
    enable_wildcard: bool = opt(False, "{a|b} wildcards and multi-line captions")
    caption_prefix: str | None = opt(None, "text put before every caption")
    caption_suffix: str | None = opt(None, "text put after every caption")
    caption_dropout_rate: float = opt(0.0, "probability of training a sample with an empty caption")
    caption_dropout_every_n_epochs: int = opt(0, "empty captions for the whole epoch every N epochs")
    caption_tag_dropout_rate: float = opt(0.0, "probability of dropping each shuffled tag")
    token_warmup_min: int = opt(1, "tags used at the start of token warm-up")
    token_warmup_step: float = opt(0.0, "steps (or fraction of all steps) until all tags are used")
    weighted_captions: bool = opt(False, "read (word:1.3)/(word)/[word] in captions as token weights")
    color_aug: bool = opt(False, "colour augmentation: small hue or gamma changes (latents cannot be cached)")
    flip_aug: bool = opt(False, "horizontal flip augmentation")
    random_crop: bool = opt(False, "random instead of centre crop (latents cannot be cached)")
    face_crop_aug_range: str | None = opt(None, '"2.0,4.0": cut the resolution around the face named in the file name '
                                          '(img_<cx>_<cy>_<w>_<h>.png), the face 1/4…1/2 of the short side (no buckets, '
                                          'latents cannot be cached)')
    alpha_mask: bool = opt(False, "the images' transparency masks the loss (transparent parts are not learnt)")
    resize_interpolation: str | None = opt(None, "resize filter (default: area when shrinking, lanczos when enlarging)",
                                           choices=[None, "lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic",
                                                    "area", "box"])
    enable_bucket: bool = opt(False, "aspect-ratio buckets")
    min_bucket_reso: int = opt(256, "smallest bucket side")
    max_bucket_reso: int = opt(1024, "largest bucket side")
    bucket_reso_steps: int = opt(64, "bucket side step")
    bucket_no_upscale: bool = opt(False, "never upscale images into a bucket")
    cache_latents: bool = opt(False, "encode all images once before training, in memory")
    cache_latents_to_disk: bool = opt(False, "… and keep them as sd-scripts' .npz files beside the images")
    vae_batch_size: int = opt(1, "images per VAE batch while caching")
    skip_cache_check: bool = inert("a cache is checked as it is read, which training needs anyway")
    cache_info: bool = inert("image sizes come from the files' headers, which is fast without a cache")
    max_token_length: int | None = opt(None, "75, 150 or 225 tokens per caption", choices=[None, 75, 150, 225])
    prior_loss_weight: float = opt(1.0, "loss weight of regularisation images")
    masked_loss: bool = opt(False, "mask the loss (masks from --alpha_mask, or a dataset config's conditioning_data_dir)")
    max_data_loader_n_workers: int = opt(8, "batches read ahead by loader threads without cached latents (0 = none)")
    persistent_data_loader_workers: bool = inert("loader threads cost nothing to start, so each epoch has its own")
    validation_split: float = opt(0.0, "fraction of images held out for validation loss")
    validation_seed: int | None = opt(None, "seed of the held-out split")
    validate_every_n_steps: int | None = opt(None, "validation loss every N steps too (the live plot shows it)")
    validate_every_n_epochs: int | None = opt(None, "validation every N epochs")
    max_validation_steps: int | None = opt(None, "batches of held-out images per validation run (train_batch_size each, as sd-scripts counts them)")
    # training loop and precision
    output_dir: str | None = opt(None, "where the LoRA files go")
    output_name: str | None = opt(None, "file name without extension")
    save_model_as: str = opt("safetensors", "file format", choices=["safetensors", "ckpt", "pt"])
    train_batch_size: int = opt(1, "images per step")
    max_train_steps: int = opt(1600, "optimizer steps")
    max_train_epochs: int | None = opt(None, "epochs (overrides max_train_steps)")
    gradient_accumulation_steps: int = opt(1, "batches per optimizer step")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    seed: int | None = opt(None, "random seed; a CPU run with the same seed is reproducible bit for bit")
    mixed_precision: str = opt("no", "autocast precision", choices=["no", "fp16", "bf16"])
    full_fp16: bool = opt(False, "network weights in fp16 too")
    full_bf16: bool = opt(False, "network weights in bf16 too")
    fp8_base: bool = opt(False, "keep the frozen base model's Linear/Conv2d weights in fp8 (about half the memory of "
                         "fp16; needs --mixed_precision fp16 or bf16)")
    fp8_base_unet: bool = opt(False, "keep only the UNet's Linear/Conv2d weights in fp8; the text encoders keep the "
                              "training precision (needs --mixed_precision fp16 or bf16)")
    save_precision: str | None = opt(None, "dtype of saved files", choices=[None, "float", "fp16", "bf16"])
    no_half_vae: bool = opt(False, "keep the VAE in fp32")
    lowram: bool = inert("the model always loads straight to its device here (the GPU when training on one), tensor by "
                         "tensor from the mapped file; with fp8 first to the CPU, converted there, as sd-scripts does")
    disable_mmap_load_safetensors: bool = inert("the checkpoint is converted tensor by tensor, so memory stays low "
                                                "with the file mapped")
    highvram: bool = opt(False, "keep the GPU's cached memory after caching latents and drawing samples (by default "
                         "it is handed back, e.g. to the WebUI on the same card)")
    xformers: bool = opt(False, "xformers attention (CUDA; pip install the build made for your torch)")
    sdpa: bool = opt(False, "PyTorch SDPA attention (the default without --xformers)")
    mem_eff_attn: bool = opt(False, "memory-efficient attention (SDPA picks its memory-efficient kernel)")
    torch_compile: bool = opt(False, "compile the UNet and text encoders with torch.compile (slow first steps; "
                              "inductor needs a C++ compiler, on Windows MSVC)")
    dynamo_backend: str = opt("inductor", "torch.compile backend (no: compile nothing, as accelerate's NO; the Kohya GUI "
                              "writes it)", choices=["no", "eager", "aot_eager", "inductor", "aot_ts_nvfuser",
                              "nvprims_nvfuser", "cudagraphs", "ofi", "fx2trt", "onnxrt", "tensort", "ipex", "tvm"])
    gradient_checkpointing: bool = opt(False, "recompute activations to save memory")
    # noise and loss
    noise_offset: float | None = opt(None, "noise offset")
    noise_offset_random_strength: bool = opt(False, "random noise offset in [0, noise_offset]")
    adaptive_noise_scale: float | None = opt(None, "extra offset proportional to the latents' mean (needs noise_offset)")
    multires_noise_iterations: int | None = opt(None, "pyramid noise levels")
    multires_noise_discount: float = opt(0.3, "pyramid noise discount")
    ip_noise_gamma: float | None = opt(None, "input perturbation noise")
    ip_noise_gamma_random_strength: bool = opt(False, "random input perturbation strength")
    min_timestep: int | None = opt(None, "smallest training timestep")
    max_timestep: int | None = opt(None, "largest training timestep (exclusive)")
    zero_terminal_snr: bool = opt(False, "rescale the schedule to zero terminal SNR (Lin et al. 2023; for v-prediction)")
    loss_type: str = opt("l2", "loss", choices=["l1", "l2", "huber", "smooth_l1"])
    huber_schedule: str = opt("snr", "huber c schedule", choices=["constant", "exponential", "snr"])
    huber_c: float = opt(0.1, "huber c")
    huber_scale: float = opt(1.0, "huber scale")
    min_snr_gamma: float | None = opt(None, "Min-SNR weighting gamma (5 is common)")
    scale_v_pred_loss_like_noise_pred: bool = opt(False, "weight v-prediction loss like eps loss")
    v_pred_like_loss: float | None = opt(None, "add v-prediction-like loss")
    debiased_estimation_loss: bool = opt(False, "debiased estimation weighting")
    # optimizer and schedule
    optimizer_type: str = opt("", "AdamW, AdamW8bit, Lion, SGDNesterov, Adafactor, Prodigy, DAdaptation…")
    use_8bit_adam: bool = opt(False, "old spelling of --optimizer_type AdamW8bit")
    use_lion_optimizer: bool = opt(False, "old spelling of --optimizer_type Lion")
    learning_rate: float = opt(2e-6, "base learning rate")
    optimizer_args: list[str] | None = opt(None, "key=value optimizer arguments", nargs="*")
    fused_backward_pass: bool = inert("it fuses a full fine-tune's optimizer step into the backward pass; for LoRA "
                                      "training it does nothing, as in sd-scripts (whose LoRA scripts take it with "
                                      "Adafactor only and leave it unused)")
    lr_scheduler: str = opt("constant", "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, "
                                        "cosine_with_min_lr, inverse_sqrt, warmup_stable_decay, piecewise_constant")
    lr_warmup_steps: int | float = opt(0, "warm-up steps, or a fraction (< 1) of all steps")
    lr_scheduler_num_cycles: int = opt(1, "restarts of cosine_with_restarts")
    lr_scheduler_power: float = opt(1.0, "power of polynomial")
    lr_scheduler_min_lr_ratio: float | None = opt(None, "floor of the schedule as a fraction of the learning rate")
    lr_decay_steps: int | float = opt(0, "warmup_stable_decay: steps of its final decay, or a fraction (< 1) of all steps")
    lr_scheduler_timescale: int | None = opt(None, "inverse_sqrt: its timescale (default: the warm-up steps)")
    lr_scheduler_type: str | None = opt(None, "a torch.optim.lr_scheduler class instead of --lr_scheduler "
                                        "(e.g. CosineAnnealingLR)")
    lr_scheduler_args: list[str] | None = opt(None, "key=value arguments of --lr_scheduler_type's class, or of the schedule "
                                              "(cosine num_cycles, polynomial lr_end, piecewise_constant step_rules …)", nargs="*")
    # network
    network_module: str | None = opt(None, "networks.lora, networks.dylora or lycoris.kohya")
    network_dim: int | None = opt(None, "rank (default 4)")
    # sd-scripts' default=1 is an int, recorded "1" in ss_network_alpha (a file's whole number stays whole: _number)
    network_alpha: float = opt(1, "alpha (default 1: scale 1/dim)")
    network_dropout: float | None = opt(None, "dropout on the LoRA's hidden activations")
    network_args: list[str] | None = opt(None, "key=value network options (conv_dim=4, algo=loha, …)", nargs="*")
    network_weights: str | None = opt(None, "start from these network weights")
    dim_from_weights: bool = opt(False, "take the rank from --network_weights")
    unet_lr: float | None = opt(None, "UNet learning rate")
    text_encoder_lr: list[float] | None = opt(None, "text encoder learning rate(s)", nargs="*")
    network_train_unet_only: bool = opt(False, "train the UNet only")
    network_train_text_encoder_only: bool = opt(False, "train the text encoder(s) only")
    scale_weight_norms: float | None = opt(None, "max-norm regularisation of each module's ΔW")
    base_weights: list[str] | None = opt(None, "networks merged into the model before training", nargs="*")
    base_weights_multiplier: list[float] | None = opt(None, "their strengths (1 where not given)", nargs="*")
    training_comment: str | None = opt(None, "stored as ss_training_comment")
    no_metadata: bool = opt(False, "only the minimum metadata")
    # saving and resuming
    save_every_n_epochs: int | None = opt(None, "a numbered file every N epochs")
    save_every_n_steps: int | None = opt(None, "a numbered file every N steps")
    save_n_epoch_ratio: int | None = opt(None, "about N numbered files over the run")
    save_last_n_epochs: int | None = opt(None, "keep only the last N epoch files (and states, unless --save_last_n_epochs_state)")
    save_last_n_epochs_state: int | None = opt(None, "keep only the last N epoch states")
    save_last_n_steps: int | None = opt(None, "keep only step files (and states, unless --save_last_n_steps_state) of the last N steps")
    save_last_n_steps_state: int | None = opt(None, "keep only states of the last N steps")
    save_state: bool = opt(False, "save optimizer/scheduler/RNG state with each file, to resume")
    save_state_on_train_end: bool = opt(False, "save the state at the end")
    resume: str | None = opt(None, "state folder to resume from")
    initial_epoch: int | None = opt(None, "continue a run from its network file (--network_weights): start at this "
                                    "epoch (1 = the first); counting and file names go on from there")
    initial_step: int | None = opt(None, "… or at this step (0 = the first); wins over --initial_epoch")
    skip_until_initial_step: bool = opt(False, "with --initial_step: skip that epoch's batches before it (else the run "
                                        "starts at the epoch's beginning); --resume always continues exactly")
    # samples and logs
    sample_every_n_steps: int | None = opt(None, "sample images every N steps")
    sample_every_n_epochs: int | None = opt(None, "sample images every N epochs")
    sample_at_first: bool = opt(False, "sample before training")
    sample_prompts: str | None = opt(None, "prompts file (.txt with --n --w --h --s --l --d, .toml, .json)")
    sample_sampler: str = opt("ddim", "sampler of the samples")
    logging_dir: str | None = opt(None, "TensorBoard logs with sd-scripts' tags (needs the tensorboard package)")
    log_with: str | None = opt(None, "tensorboard", choices=[None, "tensorboard", "wandb", "all"])
    log_config: bool = inert("the options are in the start event (every option not at its default) and the saved files' ss_* metadata")
    log_prefix: str | None = opt(None, "prefix of the log folder")
    log_tracker_name: str | None = opt(None, "tracker name")
    # sd-scripts' console logging: its console is its log; here the event stream is, and the console shows progress
    console_log_level: str | None = opt(None, "accepted, no effect: the event stream (--events_file) has every message",
                                        inert="the event stream (--events_file) has every message")
    console_log_file: str | None = opt(None, "accepted, no effect: the event stream (--events_file) is the run's log",
                                       inert="the event stream (--events_file) is the run's log")
    console_log_simple: bool = inert("the console shows a progress bar, warnings and errors only")
    tokenizer_cache_dir: str | None = opt(None, "accepted for sd-scripts configs; our CLIP tokenizer is built in and needs no cache")
    # modelspec
    metadata_title: str | None = opt(None, "modelspec.title")
    metadata_author: str | None = opt(None, "modelspec.author")
    metadata_description: str | None = opt(None, "modelspec.description")
    metadata_license: str | None = opt(None, "modelspec.license")
    metadata_tags: str | None = opt(None, "modelspec.tags")
    metadata_trigger_phrase: str | None = opt(None, "modelspec.trigger_phrase")
    metadata_usage_hint: str | None = opt(None, "modelspec.usage_hint")
    metadata_thumbnail: str | None = opt(None, "modelspec.thumbnail: an image file (stored as a data URL) or a data URL")
    metadata_merged_from: str | None = opt(None, "modelspec.merged_from")
    metadata_preprocessor: str | None = opt(None, "modelspec.preprocessor")
    metadata_is_negative_embedding: str | None = opt(None, "modelspec.is_negative_embedding")
    # SDXL (sdxl_train_network.py)
    cache_text_encoder_outputs: bool = opt(False, "encode captions once, before training (UNet-only runs)")
    cache_text_encoder_outputs_to_disk: bool = opt(False, "… and keep them beside the images (<image>_te_outputs.npz)")
    # torchrun
    ddp_timeout: int | None = opt(None, "minutes a process waits for the others before giving up (torch's default: "
                                        "10 on NCCL, 30 on gloo); rank 0 alone draws samples and validates")
    ddp_gradient_as_bucket_view: bool = inert("gradients are summed in one flat buffer per step, without torch's DDP "
                                              "wrapper and its buckets")
    ddp_static_graph: bool = inert("there is no DDP wrapper here whose graph could be static")
    # ours
    device: str = opt("auto", "cpu, cuda, cuda:1, … (auto: the GPU when there is one)")
    events_file: str | None = opt(None, "JSON-lines event stream (default: <output_dir>/<output_name>.events.jsonl; - for stdout)")
    stop_file: str | None = opt(None, "when this file appears the run finishes its step, saves and exits "
                                "(default: <output_dir>/<output_name>.stop)")
    state_dir: str | None = opt(None, "where --save_state folders go (default: --output_dir, beside the files, as in "
                                "sd-scripts; the app keeps them in the job's folder, out of the WebUI's Lora list)")
    backend: str | None = opt(None, "sd-scripts=PATH: run this configuration on your own sd-scripts checkout instead")
    config_file: str | None = opt(None, "training options TOML (sections are flattened, as sd-scripts does)")
    output_config: bool = opt(False, "write the options to <config_file>.toml and exit")

    @property
    def optimizer(self) -> str:
        """--optimizer_type, or what sd-scripts' old switches select (AdamW when nothing does)."""
        return "AdamW8bit" if self.use_8bit_adam else "Lion" if self.use_lion_optimizer else self.optimizer_type or "AdamW"


FIELDS = {f.name: f for f in dataclasses.fields(TrainOptions)}
DEFAULTS = TrainOptions()
# sd-scripts options we know but do not offer at all (DeepSpeed, hub uploads, …): refused by name when given.
FOREIGN = {"deepspeed", "zero_stage", "huggingface_repo_id", "huggingface_token", "save_state_to_huggingface",
           "resume_from_huggingface", "async_upload", "wandb_api_key", "wandb_run_name",
           "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
           "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model", "fp16_master_weights_and_gradients",
           "dataset_class", "huggingface_repo_type", "huggingface_repo_visibility", "huggingface_path_in_repo",
           "debug_dataset", "cpu_offload_checkpointing", "conditioning_data_dir",
           "log_tracker_config", "enable_contrastive"}
# FOREIGN options that sd-scripts' LoRA scripts do not run either: their refusal says why, instead of sending the user
# to sd-scripts with them
NOT_FOR_SD_SCRIPTS_LORA = {
    "cpu_offload_checkpointing": "sd-scripts takes it for its Flux, SD3 and Lumina scripts; its SD1/SDXL UNet stops on "
                                 "it with --gradient_checkpointing (enable_gradient_checkpointing takes no cpu_offload) "
                                 "and ignores it without",
    "enable_contrastive": "a setting of lora-scripts' own trainer, which sd-scripts does not have",
}
# The WebUI's memory switches, typed here out of habit: "did you mean --lowram?" would point at system RAM
WEBUI_MEMORY_SWITCHES = ("lowvram", "medvram", "medvram_sdxl")


def unknown_options(names: list[str], prefix: str = "") -> str:
    """Unknown option names for a message: each with the closest known one, and the WebUI's memory switches with
    the trainer's own ways to lower memory."""
    webui = [name for name in names if name.lstrip("-").replace("-", "_").lower() in WEBUI_MEMORY_SWITCHES]
    others = [name for name in names if name not in webui]
    parts = [with_closest(others, FIELDS, prefix)] if others else []
    if webui:
        parts.append(f"{', '.join(webui)} ({'are switches' if len(webui) > 1 else 'is a switch'} of the Stable "
                     f"Diffusion WebUI, not of training: here {prefix}gradient_checkpointing, {prefix}cache_latents, "
                     f"{prefix}mixed_precision fp16 and {prefix}fp8_base lower the GPU memory, and the Train tab's "
                     "GPU memory tier sets them for a card's size)")
    return ", ".join(parts)


def foreign_refusal(names: list[str]) -> str:
    """What to do about FOREIGN options given: remove them to train here; sd-scripts runs the same command only
    without those its LoRA scripts do not run either (each named with why)."""
    named = ", ".join(f"--{n} ({NOT_FOR_SD_SCRIPTS_LORA[n]})" if n in NOT_FOR_SD_SCRIPTS_LORA else f"--{n}" for n in names)
    not_there = [f"--{n}" for n in names if n in NOT_FOR_SD_SCRIPTS_LORA]
    if len(not_there) == len(names):
        elsewhere = ""
    elif not_there:
        elsewhere = f" (or remove {', '.join(not_there)} and run the same command with sd-scripts)"
    else:
        elsewhere = " (or run the same command with sd-scripts)"
    return f"{named}; remove {'it' if len(names) == 1 else 'them'} to train here{elsewhere}"


def _steps_or_fraction_argument(text: str) -> int | float:
    try:
        return steps_or_fraction(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None


class _OneSentenceParser(argparse.ArgumentParser):
    """A wrong value (``--mixed_precision fp32``) is one sentence naming the option, as every other mistake is;
    argparse's own answer is its whole usage, some 170 lines, and exit 2."""

    def error(self, message: str):
        raise UserError(f"{message}; `--help` lists the options and their values")


# sd-scripts' own options under an old spelling (its --output_config writes them from an old command): read as the new
OLD_SPELLINGS = {"caption_extention": "caption_extension"}


def build_parser(prog: str = "python -m lora_trainer.train_network") -> argparse.ArgumentParser:
    parser = _OneSentenceParser(prog=prog, description="Train a LoRA with sd-scripts' options (Kohya-compatible).",
                                argument_default=argparse.SUPPRESS)
    for f in FIELDS.values():
        meta = f.metadata
        if f.type == "bool":
            parser.add_argument(f"--{f.name}", action="store_true", help=meta["help"])
            continue
        kind = {"int | None": int, "int": int, "float | None": float, "float": float, "list[float] | None": float,
                "int | float": _steps_or_fraction_argument}.get(f.type, str)
        choices = [c for c in meta["choices"] if c is not None] if meta["choices"] else None
        parser.add_argument(f"--{f.name}", type=kind, nargs=meta["nargs"], choices=choices, help=meta["help"])
    for name in sorted(FOREIGN):
        parser.add_argument(f"--{name}", nargs="*", help=argparse.SUPPRESS)
    for old, name in OLD_SPELLINGS.items():
        parser.add_argument(f"--{old}", dest=name, help=argparse.SUPPRESS)
    parser.add_argument("--print-config", "--print_config", dest="print_config", action="store_true",
                        help="print the resolved options and exit")
    parser.add_argument("--print-kohya-command", "--print_kohya_command", dest="print_kohya_command", action="store_true",
                        help="print the equivalent sd-scripts command line and exit")
    return parser


# Keys that front-ends (the Kohya GUI, Akegarasu's lora-scripts) write into the file they hand sd-scripts, which
# sd-scripts never reads (it keeps unknown keys without a word): dropped with a note, so their files run unchanged
# while a typo still stops the run.
FRONT_END_KEYS = {
    "epoch": "the GUI's epoch count, already turned into max_train_steps or max_train_epochs",
    "noise_offset_type": "the GUI's choice between noise_offset and multires_noise_*, which the file already holds",
    "stop_text_encoder_training": "a DreamBooth option of the GUI that train_network.py does not have",
    "huggingface_repo_type": "used only with huggingface_repo_id", "huggingface_repo_visibility": "used only with huggingface_repo_id",
    "huggingface_path_in_repo": "used only with huggingface_repo_id",
    "wandb_run_name": "used only with --log_with wandb; the Kohya GUI writes it into every file it hands sd-scripts",
    "lr_restart_cycles": "lora-scripts' name; sd-scripts reads lr_scheduler_num_cycles",
    "batch_size": "lora-scripts' config_file.toml has it; sd-scripts reads train_batch_size, and batch_size only in "
                  "a dataset TOML",
    **dict.fromkeys(("negative_sampling_method", "noise_strength", "contrastive_weight", "contrastive_warmup_steps"),
                    "lora-scripts' template: settings of its enable_contrastive, which is off"),
}


def toml_file_path(name: str | Path) -> Path:
    """sd-scripts' rule for ``--config_file``: ``.toml`` appended unless the name ends in it (``v1.5`` → ``v1.5.toml``)."""
    path = Path(name)
    return path if path.suffix.lower() == ".toml" else path.with_name(path.name + ".toml")


def config_file_read(name: str | Path) -> Path:
    """The file ``--config_file NAME`` reads: a Kohya GUI ``.json`` as named, else ``toml_file_path``."""
    return Path(name) if Path(name).suffix.lower() == ".json" else toml_file_path(name)


def read_config_file(path: str | Path, notes: list[str] | None = None) -> dict[str, Any]:
    """sd-scripts' ``--config_file``: ``.toml`` appended if missing, one level of tables flattened; front-ends' own
    keys are dropped, each with a line in ``notes``. A ``.json`` is the Kohya GUI's saved settings instead."""
    path = config_file_read(path)
    gui = path.suffix.lower() == ".json"
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    text = read_utf8(path, "Config file")
    if gui:
        return _flattened(path, _gui_config(path, text, notes if notes is not None else []), notes)
    data = toml_text.loads(text, f"Config file {path}")
    return _flattened(path, data, notes)


def _gui_config(path: Path, text: str, notes: list[str]) -> dict[str, Any]:
    """A Kohya GUI "Save config" file (JSON) → the options the GUI would hand sd-scripts."""
    from .kohya_gui import is_gui_config

    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"Config file {path} is not valid JSON: {error.msg} (line {error.lineno}).") from None
    if not isinstance(data, dict) or not is_gui_config(data):
        if isinstance(data, dict) and {"max_resolution", "learning_rate_te"} & data.keys():
            raise UserError(f"{path}: a Kohya GUI config without LoRA_type or network_dim, from its DreamBooth or fine-tuning tab, "
                            "which trains the whole model; save the settings from the GUI's LoRA tab to train a LoRA here")
        raise UserError(f"{path}: a JSON config here is a Kohya GUI LoRA config (it has LoRA_type); sd-scripts' own "
                        "config files are TOML")
    return gui_settings_options(data, notes, str(path))


def gui_settings_options(data: dict, notes: list[str], source: str, prompts_folder: Path | None = None) -> dict[str, Any]:
    """The Kohya GUI's saved settings → sd-scripts option values (``kohya_gui.options_from_gui``), with its
    ``additional_parameters`` read as the command line reads them: the GUI appends them to sd-scripts' command.
    The GUI keeps the sample prompts' text and writes it into a file when it starts training; so does this, into
    ``prompts_folder`` (default: the user's cache folder, not the output folder, which may be relative to where the
    run starts, or another machine's)."""
    from ..hashing import cache_dir
    from .kohya_gui import options_from_gui

    options = options_from_gui(data, notes, source)
    prompts = str(data.get("sample_prompts") or "").strip()
    if prompts:
        try:
            options["sample_prompts"] = str(write_prompts_file(prompts, prompts_folder or cache_dir() / "sample-prompts"))
        except OSError as error:
            notes.append(f"{source}: sample_prompts is not carried over: the GUI keeps the prompts' text there, and it "
                         f"could not be written into a file ({error}); save them as a .txt file and give its path")
    if str(data.get("additional_parameters") or "").strip():
        try:
            options.update(_command_line_values(data["additional_parameters"], f"{source}: additional_parameters"))
        except UserError as error:
            raise UserError(str(error), "additional_parameters") from None
    return options


def write_prompts_file(text: str, folder: Path) -> Path:
    """Sample prompts typed as text, written where a run reads them from (named by their content, so jobs queued with
    other prompts never overwrite each other's)."""
    import hashlib

    from ..safe_io import write_text

    text = "\n".join(line.strip() for line in text.splitlines() if line.strip()) + "\n"
    return write_text(Path(folder) / f"prompts-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}.txt", text)


def split_command_line(text: str, windows: bool = os.name == "nt") -> list[str]:
    """The words of ``text`` as the user's shell splits them: quotes group words; on Windows, as cmd.exe reads a
    command, only double quotes do, and a backslash is a path separator (``C:\\data\\set``), not an escape."""
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    if windows:
        lexer.quotes, lexer.escape = '"', ""
    return list(lexer)


def join_command_line(parts: list[str], windows: bool = os.name == "nt") -> str:
    """One line to paste into the user's shell: double quotes as cmd.exe and PowerShell read them on Windows
    (POSIX single quotes are not quotes there), POSIX quoting elsewhere."""
    return " ".join(_windows_word(part) for part in parts) if windows else shlex.join(parts)


def _windows_word(word: str) -> str:
    """``subprocess.list2cmdline``'s quoting, and double quotes also around cmd.exe's operators (``D:\\Tom&Jerry``
    unquoted is two commands); a backslash before the closing quote is doubled, as the C runtime reads it."""
    quoted = subprocess.list2cmdline([word])
    if quoted.startswith('"') or not re.search(r"[&|<>^()]", word):
        return quoted
    trailing = len(word) - len(word.rstrip("\\"))
    return '"' + quoted + "\\" * trailing + '"'


def _command_line_values(text: str, source: str) -> dict[str, Any]:
    """The options a piece of command-line text gives, as the command line reads them."""
    try:
        return _parsed(build_parser(), split_command_line(text), source)
    except (SystemExit, ValueError):  # argparse has said what it could not read
        raise UserError(f"{source}: {text!r} is not a list of options this trainer reads") from None


def _parsed(parser: argparse.ArgumentParser, argv: list[str] | None, source: str = "command line") -> dict[str, Any]:
    """The options ``argv`` gives. A foreign switch given bare (--deepspeed) asks for something, where an empty list
    in a TOML file does not: it reads as True, to be refused by name. Unknown options are named, with the closest
    known one (argparse would print its whole usage)."""
    try:
        given, unknown = parser.parse_known_args(argv)
    except UserError as error:
        raise UserError(f"{source}: {error}") from None
    if unknown:
        flags = [word.split("=", 1)[0] for word in unknown if word.startswith("-")]
        if not flags:
            raise UserError(f"{source}: unexpected value(s) {' '.join(unknown)}; each value follows its --option")
        raise UserError(f"{source}: unknown option(s) {unknown_options(flags, '--')}; `--help` lists the options")
    return {k: True if k in FOREIGN and v == [] else v for k, v in vars(given).items()}


def flattened_sections(data: dict[str, Any], source: str, notes: list[str] | None = None) -> dict[str, Any]:
    """One level of tables flattened, as sd-scripts reads a ``--config_file``: a table's keys are options. A table
    named after an option (``[network_args]``, ``"learning_rate": {…}``) is a mistake for that option's value. An
    option given two values (sd-scripts silently takes the last) is said in ``notes`` and the last taken, as there;
    without ``notes`` (a request's body, no file of sd-scripts') it is refused."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in FIELDS:
            raise UserError(f"{source}: {key} is a table; give it {_expected(FIELDS[key])}", key)
        for name, given in (value.items() if isinstance(value, dict) else [(key, value)]):
            if name in flat and flat[name] != given:
                if notes is None:
                    raise UserError(f"{source}: {name} is given twice, as {flat[name]!r} and {given!r}; keep one", name)
                notes.append(f"{source}: {name} is given twice, as {flat[name]!r} and {given!r}: the last is used, "
                             "as sd-scripts uses it; keep one")
            flat[name] = given
    return flat



def _flattened(path: Path, data: dict[str, Any], notes: list[str] | None) -> dict[str, Any]:
    """One level of tables flattened; front-ends' own keys dropped with a note; unknown keys refused."""
    if "datasets" in data:
        raise UserError(f"{path} is a dataset config ([[datasets]]): give it with --dataset_config (the training "
                        "options go in --config_file)", "dataset_config")
    flat = flattened_sections(data, str(path), notes)
    for key in sorted(FRONT_END_KEYS.keys() & flat.keys()):
        del flat[key]
        if notes is not None:
            notes.append(f"{path}: {key} is not read, by sd-scripts either ({FRONT_END_KEYS[key]})")
    for old, name in OLD_SPELLINGS.items():
        if old in flat:
            flat[name] = flat.pop(old)
    unknown = sorted(k for k in flat if k not in FIELDS and k not in FOREIGN)
    if unknown:
        raise UserError(f"{path}: unknown option(s) {unknown_options(unknown)}")
    return flat


def not_given(name: str, value: Any) -> bool:
    """An empty path or name (vae = "" in a TOML file or an API body) means the option was not given; so does false
    for one (resume = false in LyCORIS's example configs), which sd-scripts reads as not set."""
    f = FIELDS[name]
    return f.default is None and (value == "" or (value is False and f.type == "str | None"))


_NUMBERS = {"int": int, "int | None": int, "float": float, "float | None": float, "list[float] | None": float}


def _normalised(name: str, value: Any, source: str) -> Any:
    """A file's spelling of a value as the command line's: an empty path or name (vae = "") is not given, not the
    current folder; one value where a list goes (text_encoder_lr = 1e-5, as older sd-scripts took it) is a list; a
    number written as text (clip_skip = "2") is that number, as the command line reads it. A value of another kind
    (a list where one number goes, "false" for a switch, a table) is refused, naming the option:
    the command line's parser refuses them too, and past here they would fail mid-run or read as something else."""
    f = FIELDS[name]
    if not_given(name, value):
        return None
    if value is None:  # JSON's null: not given
        return f.default
    wrong = UserError(f"{source}: {name} = {_shown(value)} is not {_expected(f)}", name)
    if isinstance(value, dict):
        raise wrong
    if name == "resolution" and isinstance(value, (list, tuple)) and 1 <= len(value) <= 2:  # as a dataset TOML has it
        value = ",".join(_text(side) for side in value)
    if f.metadata["nargs"] == "*":
        value = list(value) if isinstance(value, (list, tuple)) else [value]
    elif isinstance(value, (list, tuple)):
        raise wrong
    if f.type == "bool":
        if isinstance(value, str) or value not in (True, False):  # "false" would be true to Python
            raise wrong
        return bool(value)
    if f.type in ("str", "str | None", "list[str] | None"):  # a number is its text (resolution = 512), as typed
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, os.PathLike, numbers.Real)) and not isinstance(v, bool) for v in items):
            raise wrong
        texts = [os.fspath(v) if isinstance(v, os.PathLike) else _text(v) for v in items]
        return texts if isinstance(value, list) else texts[0]
    if f.type == "int | float":
        try:
            return steps_or_fraction(value)
        except ValueError as error:
            raise UserError(f"{source}: {name} = {value!r}: {error}", name) from None
    kind = _NUMBERS.get(f.type)
    if kind is None:
        return value
    try:
        return [_number(kind, v) for v in value] if isinstance(value, (list, tuple)) else _number(kind, value)
    except OverflowError:
        raise UserError(f"{source}: {name} = {_shown(value)} is out of range", name) from None
    except (TypeError, ValueError):
        raise wrong from None


_KEY_VALUE_LISTS = ("optimizer_args", "lr_scheduler_args", "network_args")


def _expected(f: dataclasses.Field) -> str:
    """What a field's value is, in a message's words."""
    if f.name in _KEY_VALUE_LISTS:
        return 'a list of "key=value" texts, such as ["conv_dim=4", "conv_alpha=1"]'
    return {"bool": "true or false (without quotes)", "str": "a text", "str | None": "a text",
            "list[str] | None": "a list of texts", "int": "a whole number", "int | None": "a whole number",
            "float": "a number", "float | None": "a number", "list[float] | None": "a number or a list of numbers",
            "int | float": "a number of steps or a fraction of them"}.get(str(f.type), "a single value")


def _text(value: str | numbers.Real) -> str:
    """A text option's value as text: a whole number from a UI's number field (512.0) as it is typed (512)."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "…"


def _number(kind: type, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):  # numpy numbers too (UI components)
        raise TypeError(value)
    number = int(value) if kind is int and isinstance(value, str) and value.strip().lstrip("+-").isdigit() else value
    number = float(number) if isinstance(number, str) else number
    if not math.isfinite(number):  # TOML has nan and inf: no option means them
        raise ValueError(value)
    if abs(number) >= 2**63:  # beyond the 64-bit integers every count and seed is held in (1e30 in a JSON body)
        raise OverflowError(value)
    # a file's whole number stays whole for a float option too: sd-scripts records str(args.X) in the ss_* metadata,
    # and argparse converts only the command line's ("5.0"), not a --config_file's ("5")
    if kind is int or isinstance(number, numbers.Integral):
        if not isinstance(number, numbers.Integral) and float(number) != int(number):  # 2.5; a whole int stays exact
            raise ValueError(value)
        return int(number)
    return float(number)


def options_from(values: dict[str, Any], source: str = "options", template: bool = False,
                 from_file: dict[str, str] | None = None) -> TrainOptions:
    """A dict of option values (CLI, TOML, UI form or API body) → validated TrainOptions; a ``template`` (what
    --output_config writes) may leave the model and the dataset out, as sd-scripts writes it unchecked.
    ``from_file``: the options a --config_file gave (name → that file), which a refusal names instead of ``source``."""
    from_file = from_file or {}

    def given_in(names: list[str]) -> str:
        return " and ".join([source] * any(n not in from_file for n in names)
                            + sorted({from_file[n] for n in names if n in from_file}))

    # an empty value asks for nothing (Kohya GUI files carry e.g. lr_scheduler_args = [], wandb_api_key = "")
    foreign = sorted(k for k, v in values.items() if k in FOREIGN and v not in (None, False, "", []))
    unknown = sorted(k for k in values if k not in FIELDS and k not in FOREIGN)
    if unknown:
        raise UserError(f"{given_in(unknown)}: unknown option(s) {unknown_options(unknown)}", unknown[0])
    options = TrainOptions(**{k: _normalised(k, v, given_in([k])) for k, v in values.items() if k in FIELDS})
    from ..tiny_model.build import bundled_model

    if bundled := bundled_model(options.pretrained_model_name_or_path):  # by its name, as the API takes it
        options = dataclasses.replace(options, pretrained_model_name_or_path=str(bundled))
    for name in ("sample_every_n_steps", "sample_every_n_epochs"):  # 0 or less is none, as sd-scripts reads it
        if getattr(options, name) is not None and getattr(options, name) <= 0:
            options = dataclasses.replace(options, **{name: None})
    if foreign:
        raise UserError(f"{given_in(foreign)}: not supported: {foreign_refusal(foreign)}", foreign[0])
    validate(options, template, from_file)
    return options


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> tuple[TrainOptions, argparse.Namespace]:
    """Command line (+ its ``--config_file``) → TrainOptions. CLI values beat the file, the file beats defaults."""
    given = _parsed(build_parser(prog or "python -m lora_trainer.train_network"), argv)
    actions = {k: given.pop(k) for k in ("print_config", "print_kohya_command") if k in given}
    values: dict[str, Any] = {}
    notes: list[str] = []
    if given.get("config_file") and given.get("output_config"):  # then it is where to write: said before the options
        target = toml_file_path(given["config_file"])
        if target.exists():
            raise UserError(f"{target} already exists; --output_config writes the command line's options to a new "
                            "file and does not read or overwrite this one: give another --config_file")
    elif given.get("config_file"):
        values.update(read_config_file(given["config_file"], notes))
    file = given.get("config_file") and str(config_file_read(given["config_file"]))
    from_file = {name: file for name in values if name not in given}  # the command line beats it
    values.update(given)
    options = options_from(values, "command line", bool(given.get("output_config")), from_file)
    return options, argparse.Namespace(**{"print_config": False, "print_kohya_command": False, **actions, "notes": notes})


TRAINING_TIMESTEPS = 1000  # every SD model's schedule: timesteps 0…999
WINDOWS_PATHS = os.name == "nt"


def _timestep_problems(low: int | None, high: int | None) -> list[str]:
    """sd-scripts draws from [min, max) and trains at max when min ≥ max; out of 0…1000 it indexes past its schedule
    and crashes mid-run (or, below 0, silently from its end)."""
    problems = []
    if low is not None and not 0 <= low < TRAINING_TIMESTEPS:
        problems.append(f"--min_timestep {low}: give 0 to {TRAINING_TIMESTEPS - 1}")
    if high is not None and not 1 <= high <= TRAINING_TIMESTEPS:
        problems.append(f"--max_timestep {high}: give 1 to {TRAINING_TIMESTEPS} (it is exclusive)")
    if not problems and low is not None and high is not None and low > high:
        problems.append(f"--min_timestep {low} is above --max_timestep {high}: swap them (for one fixed timestep t, "
                        "give both as t)")
    return problems


def _ascending_pair(text: str) -> bool:
    """``"low,high"`` with low ≤ high, as sd-scripts reads ``--face_crop_aug_range``."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        return False
    return low <= high


def _mistyped_paths(options: TrainOptions) -> list[str]:
    """``"D:\\new\\train"`` in a TOML file reads as a line break and a tab, and ``"D:\\my data\\"`` on a Windows
    command line escapes its closing quote (the next options become part of the path): said as that, not as a folder
    not found."""
    problems = []
    for name in PATH_OPTIONS:
        values = getattr(options, name)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and re.search(r"[\x00-\x1f]", value):
                problems.append(f"--{name} {value!r} holds a line break or tab: in a TOML file a Windows path in double "
                                "quotes turns \\n, \\t, \\b into them; write it in single quotes ('D:\\data') or with "
                                "forward slashes")
            elif isinstance(value, str) and '"' in value and WINDOWS_PATHS:  # a legal character in a POSIX name
                problems.append(f"--{name} {value} holds a double quote: on a Windows command line a quoted path "
                                'ending in a backslash ("D:\\my data\\") escapes its closing quote; leave out the last '
                                "backslash")
    return problems


def _trained_rates(options: TrainOptions) -> list[float]:
    """The learning rates of the parts the run trains (a part whose rate is 0 is left out, as sd-scripts leaves it)."""
    unet = options.learning_rate if options.unet_lr is None else options.unet_lr
    text_encoder = (options.text_encoder_lr or [None])[0]  # the trainer's reading: the first encoder's rate
    text_encoder = options.learning_rate if text_encoder is None else text_encoder
    if options.network_train_unet_only:
        return [unet]
    return [text_encoder] if options.network_train_text_encoder_only else [unet, text_encoder]


def prediction_problems(options: TrainOptions, prediction_type: str, decided_by: str) -> list[str]:
    """The loss options that need (or exclude) the prediction type the run trains, which ``decided_by`` says: the
    flag, or the checkpoint (a v_pred marker, a .yaml, metadata, the WebUI's test forward for SD2)."""
    if prediction_type == "v_prediction":
        if options.v_pred_like_loss is not None:
            return [f"--v_pred_like_loss is for epsilon-prediction models and this run trains v-prediction ({decided_by}); "
                    "drop --v_pred_like_loss"]
    elif options.scale_v_pred_loss_like_noise_pred:
        return [f"--scale_v_pred_loss_like_noise_pred is for v-prediction models and this run trains epsilon-prediction "
                f"({decided_by}); drop it, or add --v_parameterization if the model is a v-prediction one"]
    return []


def _with_file(problem: str, options: TrainOptions, from_file: dict[str, str]) -> str:
    """A problem about options a --config_file gave (``--name value: …``) says that file after each one's value, so the
    user edits the file rather than looks for the option on the command line: the option it starts with, and each other
    the file gave that its statement (before ``: ``, where the fix follows) names with its value, as a switch the file
    turns on, or bare (``--a/--b``); never one named with another value, a fix (``needs --mixed_precision fp16``). Each
    option once, where it is first named."""
    parts, done, marked = [], 0, set()
    statement = problem.find(": ") % (len(problem) + 1)  # (none: all of it)
    for about in re.finditer(r"--(\w+)", problem):
        name, rest = about[1], problem[about.end():]
        if name not in from_file or name in marked:
            continue
        value = getattr(options, name, None)
        shown = next((said for said in (f" {value!r}", f" {value}")
                      if value is not None and re.match(re.escape(said) + r"(?!\w|\.\d)", rest)), "")
        if about.start() > 0 and (about.start() > statement
                                  or not shown and value is not True and re.match(r" \S", rest)):
            continue
        marked.add(name)
        parts.append(f"{problem[done:about.end()]}{shown} (in {from_file[name]})")
        done = about.end() + len(shown)
    return "".join(parts) + problem[done:]


def validate(options: TrainOptions, template: bool = False, from_file: dict[str, str] | None = None) -> None:
    """Contradictions sd-scripts rejects (and a few it lets through to fail later), said before any heavy work;
    ``from_file``: the options a --config_file gave (name → file), named with it."""
    problems = []
    for name, f in FIELDS.items():  # the command line checks these itself; TOML, the UI and the API do not
        allowed = f.metadata["choices"]
        if allowed and getattr(options, name) not in allowed:
            problems.append(f"--{name} {getattr(options, name)!r} is not one of {', '.join(str(c) for c in allowed if c is not None)}")
    if options.adaptive_noise_scale is not None and options.noise_offset is None:
        problems.append("--adaptive_noise_scale needs --noise_offset")
    if options.v_parameterization:  # a v-prediction file without the flag is checked once loaded (prediction_problems)
        problems += prediction_problems(options, "v_prediction", "--v_parameterization")
    if options.fused_backward_pass and (options.optimizer.lower() != "adafactor" or options.gradient_accumulation_steps > 1):
        problems.append("--fused_backward_pass: sd-scripts stops on it unless --optimizer_type Adafactor with "
                        "--gradient_accumulation_steps 1 (and does nothing with it for LoRA training); drop it")
    if not any(_trained_rates(options)):
        problems.append("every learning rate is 0 (--learning_rate, --unet_lr, --text_encoder_lr): nothing would "
                        "train; give the part you train a rate above 0")
    if options.network_train_unet_only and options.network_train_text_encoder_only:
        problems.append("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    problems += _timestep_problems(options.min_timestep, options.max_timestep)
    problems += _mistyped_paths(options)
    if options.output_name and not is_plain_name(options.output_name):
        problems.append(f"--output_name {options.output_name!r} cannot be a file name on Windows; use letters, digits, "
                        "spaces, - and _")
    # the log folder is <logging_dir>/<log_prefix><time>/<log_tracker_name>, made once the model has loaded (a / in
    # them makes folders inside, as in sd-scripts)
    for flag, name in (("log_prefix", f"{options.log_prefix}20261205120000" if options.log_prefix else None),
                       ("log_tracker_name", options.log_tracker_name)):
        if not options.logging_dir or name is None:
            continue
        if re.match(r"[A-Za-z]:|[\\/]", name) or ".." in re.split(r"[\\/]", name):  # a drive, a root, a way up
            problems.append(f"--{flag} {getattr(options, flag)!r}: the log folder must stay inside --logging_dir; "
                            "give a name (folders inside it with /), without .. or a drive")
        elif not windows_can_make(name):
            problems.append(f"--{flag} {getattr(options, flag)!r}: Windows cannot make that folder (none of <>:\"|?*, "
                            "no CON, NUL, COM1 …, no folder name ending in a dot or space)")
    name_bytes = len((options.output_name or "").encode("utf-8"))
    if name_bytes > LONGEST_OUTPUT_NAME_BYTES:
        problems.append(f"--output_name is {name_bytes} bytes long in UTF-8; a file name may "
                        "have 255, and a run adds up to 55 to it (name-step00000050-state, sample images): use at most "
                        f"{LONGEST_OUTPUT_NAME_BYTES} bytes (a CJK character takes 3)")
    if options.log_with in ("wandb", "all"):
        problems.append(f"--log_with {options.log_with}: Weights & Biases is not supported here; log with --logging_dir "
                        "(TensorBoard) and the event stream, or run the command with sd-scripts")
    elif options.log_with == "tensorboard" and not options.logging_dir:
        problems.append("--log_with tensorboard needs --logging_dir, the folder the logs go to (as in sd-scripts)")
    if options.vae_batch_size < 1:
        problems.append(f"--vae_batch_size {options.vae_batch_size}: give at least 1 image per VAE batch")
    if options.full_fp16 and options.mixed_precision != "fp16":
        problems.append("--full_fp16 needs --mixed_precision fp16")
    if options.full_fp16 and moments_underflow_in_fp16(options.optimizer):
        problems.append(f"--full_fp16 with {options.optimizer}: it keeps its average of squared gradients in fp16, where "
                        "values under 6e-8 are zero, so its steps divide by zero (NaN within a few steps); use "
                        "--optimizer_type AdamW8bit or Adafactor, or --mixed_precision bf16 --full_bf16, or drop --full_fp16 "
                        "(the network's own weights are small: it saves little)")
    if options.full_bf16 and options.mixed_precision != "bf16":
        problems.append("--full_bf16 needs --mixed_precision bf16")
    if is_schedule_free(options.optimizer):  # its own schedule: the scheduler options go unused (said when it starts)
        pass
    elif options.lr_scheduler_type:  # replaces --lr_scheduler
        from .lr_schedules import check_custom_scheduler

        try:
            check_custom_scheduler(options.lr_scheduler_type, options.lr_scheduler_args, options.lr_warmup_steps)
        except UserError as problem:
            problems.append(str(problem))
    else:
        from .lr_schedules import check_schedule

        try:
            check_schedule(options.lr_scheduler, options.lr_warmup_steps, options.lr_scheduler_args)
        except UserError as problem:
            problems.append(str(problem))
    if options.cache_latents_to_disk:
        options.cache_latents = True
    if options.face_crop_aug_range is not None and not _ascending_pair(options.face_crop_aug_range):
        # sd-scripts' prepare_dataset_args stops on it; the dataset read a reversed range as one fixed scale
        problems.append(f'--face_crop_aug_range {options.face_crop_aug_range!r}: give two numbers, the smaller first '
                        '("2.0,4.0": the face 1/4 to 1/2 of the short side)')
    augmented = [f"--{name}" for name in ("color_aug", "random_crop", "face_crop_aug_range") if getattr(options, name)]
    if options.face_crop_aug_range and options.enable_bucket:
        problems.append("--face_crop_aug_range cuts the fixed resolution around the face and does not work with "
                        "--enable_bucket (sd-scripts ignores it there): drop one of them")
    if augmented and options.cache_latents:
        problems.append(f"{' and '.join(augmented)} {'changes' if len(augmented) == 1 else 'change'} the pixels every step, "
                        "so latents cannot be cached: drop "
                        "--cache_latents/--cache_latents_to_disk or the augmentation")
    if options.masked_loss and not options.alpha_mask and not options.dataset_config:
        problems.append("--masked_loss needs masks: add --alpha_mask to mask the loss with the images' transparency, or "
                        "give the subsets of a --dataset_config mask folders (conditioning_data_dir)")
    if options.cache_text_encoder_outputs_to_disk:
        options.cache_text_encoder_outputs = True
    if options.cache_text_encoder_outputs and not options.network_train_unet_only:
        problems.append("--cache_text_encoder_outputs needs --network_train_unet_only (cached captions cannot train the "
                        "text encoders)")
    if not (0.0 <= options.validation_split < 1.0):
        problems.append(f"--validation_split {options.validation_split} must be in [0, 1)")
    if options.max_validation_steps is not None and options.max_validation_steps < 1:
        problems.append(f"--max_validation_steps {options.max_validation_steps}: give 1 or more batches (leave it out "
                        "to validate on every held-out image)")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
        if getattr(options, name) < 1:
            problems.append(f"--{name} must be at least 1")
    rates = [("learning_rate", [options.learning_rate]), ("unet_lr", [options.unet_lr]),
             ("text_encoder_lr", options.text_encoder_lr or [])]
    for name, values in rates:
        if any(value is not None and value < 0 for value in values):
            problems.append(f"--{name} {' '.join(f'{v:g}' for v in values if v is not None)}: a learning rate is 0 or "
                            "more (0 leaves that part untrained)")
    if options.max_train_epochs is not None and options.max_train_epochs < 0:  # 0 is "not set", as in the Kohya GUI
        problems.append(f"--max_train_epochs {options.max_train_epochs}: give 1 or more epochs, or 0 (or leave it out) to "
                        "count the run in --max_train_steps")
    # sd-scripts' file names hold 6 digits of epoch and 8 of step (name-000001, name-step00000050)
    for name, limit in (("max_train_epochs", 10**6 - 1), ("max_train_steps", 10**8 - 1)):
        if (getattr(options, name) or 0) > limit:
            problems.append(f"--{name} {getattr(options, name)} is more than the {limit} that sd-scripts' file names "
                            "can number; give fewer")
    if options.resolution is not None:
        try:
            sides = [int(v) for v in str(options.resolution).split(",")]
            assert len(sides) in (1, 2) and min(sides) > 0
        except (ValueError, AssertionError):
            problems.append(f'--resolution {options.resolution!r}: give "512" or "512,768"')
        else:
            try:
                check_largest_side(max(sides), "--resolution")
            except UserError as problem:
                problems.append(str(problem))
    try:
        check_largest_side(options.max_bucket_reso, "--max_bucket_reso")
    except UserError as problem:
        problems.append(str(problem))
    from ..networks.max_norm import check_supported
    from ..networks.spec import spec_from_kohya

    try:  # the network options (a LyCORIS preset file too), here rather than in the trainer subprocess
        spec = spec_from_kohya(options.network_module or "networks.lora", options.network_dim, options.network_alpha,
                               options.network_args, options.network_dropout)
    except UserError as problem:  # said as the option it is about, which the API and the UI point at
        said, field = str(problem), problem.field or "network_args"
        problems.append(said if said.startswith("--") else f"--{said}" if said.startswith(field) else f"--{field}: {said}")
        spec = None
    problems += _optimizer_problems(options, spec)
    if options.scale_weight_norms is not None:
        if options.scale_weight_norms <= 0:
            problems.append(f"--scale_weight_norms {options.scale_weight_norms} must be above 0 (sd-scripts' guides use 1)")
        elif spec is not None:
            try:
                for algorithm in sorted(spec.algorithms):
                    check_supported(algorithm, spec.uses_dora)
            except UserError as problem:
                problems.append(str(problem))
            if spec.use_scalar or any(o.get("use_scalar") for o in spec.map_options()):
                problems.append("--scale_weight_norms shrinks the factors, not use_scalar's trained scalar: drop one")
    from .samples import check_sampler, read_prompts  # a bad sampler or line now, rather than at the first sample

    try:
        check_sampler(options.sample_sampler, "--sample_sampler")
        if options.sample_prompts and Path(options.sample_prompts).is_file():
            read_prompts(options.sample_prompts)
    except UserError as problem:
        problems.append(str(problem))
    thumbnail = options.metadata_thumbnail
    if thumbnail and not is_data_url(thumbnail) and not Path(thumbnail).is_file():
        problems.append(f"--metadata_thumbnail {thumbnail}: no such image file; give an image (it is stored in the "
                        "file's metadata as a data URL) or a data: URL")
    for path in options.base_weights or []:
        if not Path(path).is_file():
            problems.append(f"--base_weights {path}: no such network file")
    if options.network_weights and not options.backend and not Path(options.network_weights).is_file():
        problems.append(f"--network_weights {options.network_weights}: no such network file; give the LoRA file to "
                        "continue training from, or leave the option out to start a new one")
    legacy = [f"--{name}" for name in ("use_8bit_adam", "use_lion_optimizer") if getattr(options, name)]
    if legacy and (len(legacy) > 1 or options.optimizer_type):  # sd-scripts' get_optimizer asserts one choice
        given = " and ".join(legacy + [f"--optimizer_type {options.optimizer_type}"] * bool(options.optimizer_type))
        problems.append(f"{given} each choose the optimizer, and sd-scripts stops on them together: keep one "
                        "(--use_8bit_adam is the old spelling of --optimizer_type AdamW8bit, --use_lion_optimizer of Lion)")
    try:
        check_optimizer_name(options.optimizer)
    except UserError as problem:
        problems.append(str(problem))
    if options.dim_from_weights and not options.network_weights:
        problems.append("--dim_from_weights takes the network's shape from --network_weights: give that file, or drop "
                        "--dim_from_weights")
    if options.train_data_dir is None and options.dataset_config is None and options.in_json is None and not template:
        problems.append("no dataset: give --train_data_dir (folders named <repeats>_<name>), --in_json or --dataset_config")
    if options.in_json and options.reg_data_dir and not options.dataset_config:
        problems.append("--reg_data_dir is for DreamBooth folders: a --in_json (fine-tuning) dataset has no regularisation "
                        "images; drop one of them")
    if options.initial_epoch is not None and options.initial_epoch < 1:
        problems.append(f"--initial_epoch {options.initial_epoch}: epochs count from 1")
    if options.initial_step is not None and options.initial_step < 0:
        problems.append(f"--initial_step {options.initial_step}: steps count from 0")
    if options.resume:
        from .state import state_kind

        try:
            state_kind(Path(options.resume))
        except UserError as problem:
            problems.append(str(problem))
    if options.resume and (options.initial_epoch is not None or options.initial_step is not None):
        problems.append("--resume continues exactly where its state stopped; --initial_epoch/--initial_step are for "
                        "continuing from a network file (--network_weights) without a state: drop one of them")
    for name in ("fp8_base", "fp8_base_unet"):
        if getattr(options, name) and options.mixed_precision == "no":
            problems.append(f"--{name} needs --mixed_precision fp16 or bf16 (the fp8 weights are computed in that precision)")
    if options.dataset_repeats < 1:
        problems.append(f"--dataset_repeats {options.dataset_repeats} must be 1 or more")
    if options.pretrained_model_name_or_path is None and not template:
        problems.append("no base model: give --pretrained_model_name_or_path")
    if problems:
        # each problem names the option it is about (--name …) first, which the API and the UI point at
        problems = [_with_file(problem, options, from_file or {}) for problem in problems]
        first_option = re.search(r"--(\w+)", problems[0])
        raise UserError("; ".join(problems), first_option and first_option[1])


def resolution_of(options: TrainOptions) -> tuple[int, int] | None:
    if options.resolution is None:
        return None
    sides = [int(v) for v in str(options.resolution).split(",")]
    return (sides[0], sides[-1])


# Options that name files or folders, with whether they must exist before the run (``base_weights``: a list). The
# API checks them against its allowed folders; the sd-scripts backend, which runs in its checkout, makes them absolute.
PATH_OPTIONS = {"pretrained_model_name_or_path": True, "vae": True, "train_data_dir": True, "reg_data_dir": True,
                "dataset_config": True, "in_json": True, "sample_prompts": True, "network_weights": True, "resume": True,
                "metadata_thumbnail": True,
                "base_weights": True, "output_dir": False, "state_dir": False, "logging_dir": False, "tokenizer_cache_dir": False}


def network_preset_file(item: str) -> str | None:
    """The LyCORIS preset file a ``network_args`` item names (``preset=my.toml``), None for anything else."""
    from ..networks.lycoris_presets import LYCORIS_PRESETS

    key, _, value = item.partition("=")
    value = value.strip()
    return value if key.strip() == "preset" and value not in (*LYCORIS_PRESETS, "ia3") else None


DATA_URL_OPTIONS = ("metadata_thumbnail",)  # the path options that may be given the file's content instead


def is_data_url(value: Any) -> bool:
    """A ``data:`` URL (``data:image/png;base64,…``) where a path may stand (``--metadata_thumbnail``): the image
    itself, not a file. Only with a media type: ``data:/../x`` is a path (a folder named ``data:``)."""
    return isinstance(value, str) and re.match(r"data:[\w.+-]+/[\w.+-]+[;,]", value) is not None


def absolute_path(value: str, must_exist: bool) -> str:
    """``value`` made absolute against the current folder, for a process that runs elsewhere; a relative input
    (``must_exist``) that does not exist here is left as given, for that process to report."""
    if is_data_url(value):
        return value
    path = Path(value).expanduser()
    return value if path.is_absolute() or (must_exist and not path.exists()) else str(path.resolve())


def with_absolute_paths(options: TrainOptions) -> TrainOptions:
    """The path options (a LyCORIS preset file too) through ``absolute_path``."""
    changes: dict[str, Any] = {}
    for name, must_exist in PATH_OPTIONS.items():
        value = getattr(options, name)
        if isinstance(value, list):
            changes[name] = [absolute_path(v, must_exist) for v in value]
        elif value is not None:
            changes[name] = absolute_path(value, must_exist)
    if options.network_args:
        changes["network_args"] = [f"preset={absolute_path(preset, True)}" if (preset := network_preset_file(item)) else item
                                   for item in options.network_args]
    return dataclasses.replace(options, **changes)


def _optimizer_problems(options: TrainOptions, spec) -> list[str]:
    """Optimizer and schedule pairs that would fail at the first step (or train another schedule), said before the
    model loads; ``spec``: the network options read (None when they were refused: said already)."""
    name, problems = (options.optimizer or "AdamW").lower(), []
    if name.startswith("dadapt") or name == "prodigy":  # they adapt one step size: their own check refuses other rates
        rates = {}  # each part's rate as its group gets it (unset: --learning_rate; 0: that part does not train)
        if not options.network_train_text_encoder_only:
            rates["--unet_lr" if options.unet_lr is not None else "--learning_rate"] = (
                options.unet_lr if options.unet_lr is not None else options.learning_rate)
        text_encoder_lr = (options.text_encoder_lr or [None])[0]
        if not options.network_train_unet_only:
            rates["--text_encoder_lr" if text_encoder_lr is not None else "--learning_rate"] = (
                text_encoder_lr if text_encoder_lr is not None else options.learning_rate)
        given = {rate for rate in rates.values() if rate}
        unet_rate = rates.get("--unet_lr", rates.get("--learning_rate")) if not options.network_train_text_encoder_only else 0
        args = dict(spec.network_args) if spec is not None else {}
        split = []
        weights = _block_weights(spec)  # a block's group trains at the UNet's rate × its weight; weight 0: no group
        if unet_rate and weights and {unet_rate * w for w in weights if w} - {unet_rate}:
            given |= {unet_rate * w for w in weights if w}
            split += sorted(key for key in args if key.endswith("_lr_weight"))
        # the lora_up weights' own group at ratio × the rate, where there are lora_up weights and their side trains
        unet_plus, te_plus = spec.loraplus_ratios() if spec is not None and spec.raises_lora_up else (None, None)
        plus = [ratio for ratio, trains in ((unet_plus, not options.network_train_text_encoder_only),
                                            (te_plus, not options.network_train_unet_only))
                if trains and ratio not in (None, 1.0)]
        if plus:
            split += sorted(key for key in args if key.startswith("loraplus"))
        if len(given) > 1 or plus:
            said = ", ".join(f"{flag} {rate:g}" for flag, rate in rates.items() if rate)
            problems.append(f"--optimizer_type {options.optimizer} adapts one step size for every parameter group and "
                            f"refuses different rates at the first step ({said}{'; ' if said and split else ''}"
                            f"{', '.join(f'network_args {key}' for key in split)}): give one --learning_rate (1 is "
                            "usual) and leave out the others (block weights of 0 and 1 keep one rate)")
    relative_step = takes_its_own_step(options.optimizer, options.optimizer_args)
    if relative_step and options.lr_warmup_steps:
        problems.append(f"--optimizer_type Adafactor on its relative step (its default) takes no warm-up "
                        f"(--lr_warmup_steps {options.lr_warmup_steps}): drop it, or add --optimizer_args "
                        "relative_step=False scale_parameter=False warmup_init=False for fixed rates with a warm-up")
    if options.lr_scheduler == "adafactor" and not relative_step:
        problems.append(f"--lr_scheduler adafactor is Adafactor's own relative step: it needs --optimizer_type Adafactor "
                        f"(without relative_step=False), as in sd-scripts; with {options.optimizer or 'AdamW'} use "
                        "constant or another schedule")
    return problems


def _block_weights(spec) -> list[float] | None:
    """The block learning-rate weights the network options ask for, on SD1's blocks and SDXL's together (the model is
    not read yet), or None; a list that fits neither is refused with its own message when the network is made."""
    from ..models.configs import SD1, SDXL
    from ..networks.network import block_lr_weights_for

    weights = []
    for config in (SD1, SDXL) if spec is not None else ():  # a list may fit either: one that differs in either counts
        try:
            weights += block_lr_weights_for(config, spec) or []
        except (UserError, ValueError, ZeroDivisionError):
            continue
    return weights or None


# this trainer's own options (TrainOptions' "ours"), which sd-scripts' parser has not: left out of what it is given
OWN_OPTIONS = ("device", "events_file", "stop_file", "state_dir", "backend")


def non_default(options: TrainOptions) -> dict[str, Any]:
    ours = {*OWN_OPTIONS, "config_file", "output_config"}  # a config file's values are in the options themselves
    return {k: v for k, v in dataclasses.asdict(options).items() if v != getattr(DEFAULTS, k) and k not in ours}


# options sd-scripts adds for sdxl_train_network.py only: its train_network.py (SD1/SD2) stops on them; trained here
SDXL_SCRIPT_ONLY = ("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "disable_mmap_load_safetensors")


def left_out_of_command(options: TrainOptions, script: str) -> list[str]:
    """The options of this run that ``script`` does not take (``kohya_command`` leaves them out: say so)."""
    return [] if "sdxl" in script else [f"--{name}" for name in SDXL_SCRIPT_ONLY if getattr(options, name)]


def memory_advice(options: TrainOptions) -> str:
    """The switches that lower memory which this run does not use yet, most effective first."""
    varying = [f"--{name}" for name in caching_problems(options)]  # cached captions cannot vary: they go with it
    caching = "--cache_text_encoder_outputs (with --network_train_unet_only" + (
        f", and {', '.join(varying)} off: cached captions cannot change between steps)" if varying else ")")
    unused = [hint for hint, used in (
        ("--gradient_checkpointing", options.gradient_checkpointing),
        ("--mixed_precision bf16 (or fp16)", options.mixed_precision != "no"),
        ("--cache_latents", options.cache_latents),
        ("--fp8_base (with mixed precision)", options.fp8_base),
        ("--optimizer_type AdamW8bit (needs bitsandbytes)", "8bit" in options.optimizer.lower()),
        ("--network_train_unet_only", options.network_train_unet_only),
        (caching, options.cache_text_encoder_outputs),
        (f"a smaller --train_batch_size (now {options.train_batch_size})", options.train_batch_size == 1),
        ("a lower --resolution", False),
    ) if not used]
    return "to fit, try " + ", ".join(unused)


def sd_scripts_notes(options: TrainOptions, script: str) -> list[str]:
    """What a user running this run with sd-scripts' ``script`` must know: options left out of the command, and
    runs sd-scripts stops on that this trainer does, or runs otherwise."""
    from ..networks.spec import spec_from_kohya
    from ..sampling.samplers import sd_scripts_stand_in

    notes = []
    if left_out := left_out_of_command(options, script):
        notes.append(f"{', '.join(left_out)} left out: sd-scripts' {script} does not take "
                     f"{'it' if len(left_out) == 1 else 'them'} (sdxl_train_network.py only)")
    if options.sample_prompts and (instead := sd_scripts_stand_in(options.sample_sampler)):
        notes.append(f"--sample_sampler {options.sample_sampler!r}: sd-scripts has no such sampler; it draws the samples "
                     f"with {instead}, so they differ from this trainer's")
    preset = spec_from_kohya(options.network_module or "networks.lora", options.network_dim, options.network_alpha,
                             options.network_args, options.network_dropout).preset  # LyCORIS's default when not given
    if "sdxl" not in script and preset in ("full", "full-lin", "unet-only"):
        notes.append(f"sd-scripts with lycoris-lora 4.1.3 stops on an SD1/SD2 model with preset={preset} (LyCORIS's "
                     "default is full): it lists the time embedding twice (\"duplicated lora name\"); this trainer "
                     "trains it once. To run it there, add preset=attn-mlp (or another preset) to --network_args")
    return notes


def sd_scripts_values(options: TrainOptions) -> dict[str, Any]:
    """``non_default(options)`` with the values sd-scripts' choices refuse written as it takes them, for its command
    line and its TOML alike (a TOML value skips the choices: a sampler name it does not know draws with DDIM without
    a word): 75 tokens is its default (None); a dynamo_backend of "no" compiles nothing (no --torch_compile); a WebUI
    sampler name as its closest (``sd_scripts_notes`` says where that is another sampler); box is area."""
    from ..sampling.samplers import sd_scripts_sampler

    values = non_default(options)
    if values.get("max_token_length") == 75:
        del values["max_token_length"]
    if values.get("dynamo_backend") == "no":
        values.pop("dynamo_backend")
        values.pop("torch_compile", None)
    if "sample_sampler" in values:
        values["sample_sampler"] = sd_scripts_sampler(values["sample_sampler"])
    if values.get("resize_interpolation") == "box":
        values["resize_interpolation"] = "area"
    return values


def kohya_command(options: TrainOptions, script: str = "train_network.py", windows: bool = os.name == "nt") -> str:
    """The sd-scripts command line for the same run (``--print-kohya-command``), quoted for this system's shell;
    without the options ``script`` does not take (``left_out_of_command``)."""
    return join_command_line(_kohya_words(options, script), windows)


def kohya_command_notes(options: TrainOptions, script: str = "train_network.py",
                        windows: bool = os.name == "nt") -> list[str]:
    """What ``--print-kohya-command`` says beside the command (which stays one line to paste): this trainer's own
    options it leaves out, and on Windows the values PowerShell would change (the line is quoted for cmd.exe, whose
    double quotes PowerShell reads with $variables and `escapes expanded)."""
    notes = []
    if own := [f"--{name}" for name in OWN_OPTIONS if getattr(options, name) != getattr(DEFAULTS, name)]:
        notes.append(f"{', '.join(own)} left out (this trainer's own: sd-scripts has no such option)")
    words = _kohya_words(options, script)
    expanded = [(next((w for w in reversed(words[:i]) if w.startswith("--")), ""), word)
                for i, word in enumerate(words) if re.search(r"[$`]", word)]
    if windows and expanded:  # PowerShell's single quotes take every character as it is, a ' written twice
        single_quoted = ", ".join(f"{name} '{word.replace(chr(39), chr(39) * 2)}'".strip() for name, word in expanded)
        notes.append(f"in PowerShell (not cmd), give {single_quoted} in single quotes: it expands $ and ` inside "
                     "double quotes and unquoted words")
    return notes


def _kohya_words(options: TrainOptions, script: str) -> list[str]:
    parts = ["accelerate", "launch", script]
    left_out = {name.removeprefix("--") for name in left_out_of_command(options, script)}
    for name, value in sd_scripts_values(options).items():
        if name in left_out:
            continue
        if FIELDS[name].type == "int | float" and value == 1.0 and isinstance(value, float):
            value = "100%"  # the whole run: sd-scripts' command line reads 1.0 as a step count, and refuses it
        if isinstance(value, bool):
            parts.append(f"--{name}")
        elif isinstance(value, list):
            parts += [f"--{name}", *map(str, value)]
        else:
            parts += [f"--{name}", str(value)]
    return parts


def write_config(options: TrainOptions, path: str | Path) -> Path:
    """The options that differ from the defaults, as a TOML sd-scripts' ``--config_file`` reads too."""
    from ..safe_io import write_text

    return write_text(Path(path), toml_text.dumps(non_default(options)))


def with_sd_scripts_requirements(options: TrainOptions) -> TrainOptions:
    """What this trainer defaults and sd-scripts requires, said: it has no --network_module default (it stops at
    import_module(None)) and joins files onto --output_dir (None fails at the first save)."""
    return dataclasses.replace(options, network_module=options.network_module or "networks.lora",
                               output_dir=options.output_dir or "output")


def write_output_config(options: TrainOptions) -> Path:
    """``--output_config``: the options written to ``--config_file`` (``.toml`` appended as sd-scripts does), never
    over an existing file, as sd-scripts."""
    if not options.config_file:
        raise UserError("--output_config writes the options to the file --config_file names: add --config_file NAME")
    target = toml_file_path(options.config_file)
    if target.exists():
        raise UserError(f"{target} already exists; --output_config does not overwrite it: give another --config_file")
    return write_config(with_sd_scripts_requirements(options), target)
