"""What a run writes and when, named and pruned as sd-scripts does, with its metadata.

Files: ``<name>-000001.safetensors`` per ``save_every_n_epochs`` (never for the last epoch),
``<name>-step00000050.safetensors`` per ``save_every_n_steps``, ``<name>.safetensors`` at the end; states
``<name>-000001-state/``, ``<name>-step00000050-state/``, ``<name>-state/`` (in ``--state_dir`` when given). Every
write is atomic.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..hashing import file_sha256, legacy_model_hash
from ..networks.network import SAVE_DTYPES, base_metadata, save_network
from ..safe_io import (ENABLE_LONG_PATHS, STALE_AFTER_SECONDS, atomic_path, beginnings, check_writable,
                       remove_files, stale_temporaries, temporary_beside, windows_path_length)
from .optimizers import takes_its_own_step
from .options import TrainOptions, is_data_url, resolution_of
from .samples import sample_path
from .state import staging_folder


# What sits beside a network file in a Lora folder and belongs to it: the WebUI's card and preview images
_COMPANION_SUFFIXES = (".json", ".preview.png", ".png", ".jpg", ".jpeg", ".webp")


_NETWORK_SUFFIXES = (".safetensors", ".ckpt", ".pt")


def files_of_run(folder: Path, name: str) -> list[Path]:
    """The files in ``folder`` a run named ``name`` writes there (final, epoch and step files, in any saved format) and
    what the WebUI keeps beside each of them (cards, previews): what a new run of that name would replace or leave
    mixed in. A picture or card without a network file beside it is no run's (a dataset's ``star_000.png``)."""
    suffixes = "|".join(re.escape(s) for s in (*_NETWORK_SUFFIXES, *_COMPANION_SUFFIXES))
    pattern = re.compile(re.escape(name) + rf"(-\d{{6}}|-step\d{{8}})?({suffixes})",
                         re.IGNORECASE if os.name == "nt" else 0)  # Windows' names ignore case
    if not folder.is_dir():
        return []
    found = {path: match for path in folder.iterdir() if (match := pattern.fullmatch(path.name)) and path.is_file()}
    networks = {(match[1] or "").lower() for match in found.values() if match[2].lower() in _NETWORK_SUFFIXES}
    return sorted(path for path, match in found.items() if (match[1] or "").lower() in networks)


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def state_name(output_name: str | None, epoch: int | None, step: int | None) -> str:
    """A state folder's name as sd-scripts' train_util names it: that of the file saved with it, plus ``-state``."""
    if step is not None:
        return f"{output_name or 'at'}-step{step:08d}-state"
    if epoch is not None:
        return f"{output_name or 'epoch'}-{epoch:06d}-state"
    return f"{output_name or 'last'}-state"


def _unlinked(path: Path, why: str) -> list[str]:
    """Removes ``path``; a file another program holds (Windows refuses to delete a file a WebUI or ComfyUI has mapped
    to try that epoch) is said, not raised: pruning is never worth the run."""
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        return [f"{why}: could not remove {path} ({error.strerror or error}); another program may hold it open (a "
                "WebUI or ComfyUI that loaded it): the run goes on, delete it by hand once it is free"]
    return []


class OutputPlan:
    def __init__(self, options: TrainOptions, num_epochs: int = 1):
        self.options = options
        self.num_epochs = num_epochs  # known once the data is counted: set it then (the names do not depend on it)
        self.folder = Path(options.output_dir or "output")
        check_writable(self.folder, "output folder", "--output_dir")
        self.name = options.output_name
        self.suffix = "." + options.save_model_as
        self.state_folder = Path(options.state_dir) if options.state_dir else self.folder
        if options.state_dir:  # a stop saves a state there too: said now, not at the first save an epoch in
            check_writable(self.state_folder, "state folder", "--state_dir")

    @property
    def every_epochs(self) -> int | None:
        if self.options.save_n_epoch_ratio:
            return max(1, self.num_epochs // self.options.save_n_epoch_ratio)
        return self.options.save_every_n_epochs

    @property
    def sample_folder(self) -> Path:
        return self.folder / "sample"

    @property
    def stop_file(self) -> Path:
        return Path(self.options.stop_file) if self.options.stop_file else self.folder / f"{self.name or 'last'}.stop"

    def epoch_path(self, epoch: int) -> Path:
        return self.folder / f"{self.name or 'epoch'}-{epoch:06d}{self.suffix}"

    def step_path(self, step: int) -> Path:
        return self.folder / f"{self.name or 'at'}-step{step:08d}{self.suffix}"

    def final_path(self) -> Path:
        return self.folder / f"{self.name or 'last'}{self.suffix}"

    def state_path(self, epoch: int | None, step: int | None) -> Path:
        """Named as the file saved with it (sd-scripts' ``at-step…-state``, ``epoch-…-state``, ``last-state`` when the
        run has no output name)."""
        return self.state_folder / state_name(self.name, epoch, step)

    def save_at_epoch(self, epoch: int) -> bool:
        return bool(self.every_epochs) and epoch % self.every_epochs == 0 and epoch < self.num_epochs

    def save_at_step(self, step: int) -> bool:
        return bool(self.options.save_every_n_steps) and step % self.options.save_every_n_steps == 0

    def prune_epochs(self, epoch: int) -> list[str]:
        """Removes the epoch file (and state) that ``--save_last_n_epochs`` (``_state``) no longer keeps; returns what
        could not be removed, as warnings: the run goes on."""
        keep, held = self.options.save_last_n_epochs, []
        if keep and self.every_epochs:
            old = epoch - self.every_epochs * keep
            if old > 0:
                held += _unlinked(self.epoch_path(old), f"--save_last_n_epochs {keep}")
        keep_states = self.options.save_last_n_epochs_state or keep  # sd-scripts: states follow the files unless told
        if keep_states and self.every_epochs and self.options.save_state:  # never a state this run did not write
            old = epoch - self.every_epochs * keep_states
            if old > 0:
                shutil.rmtree(self.state_path(old, None), ignore_errors=True)
        return held

    def prune_steps(self, step: int) -> list[str]:
        """``prune_epochs`` for ``--save_last_n_steps`` (``_state``)."""
        every = self.options.save_every_n_steps
        keep_files = self.options.save_last_n_steps
        keep_states = (self.options.save_last_n_steps_state or keep_files) if self.options.save_state else None
        held = []
        for keep, remove in ((keep_files, lambda s: _unlinked(self.step_path(s), f"--save_last_n_steps {keep_files}")),
                             (keep_states, lambda s: shutil.rmtree(self.state_path(None, s), ignore_errors=True) or [])):
            if keep and every:
                old = step - keep - 1
                old -= old % every
                if old > 0:
                    held += remove(old)
        return held

    def remove_leftovers(self, now: float | None = None) -> str | None:
        """What a run of this name killed while saving (SIGKILL, a power cut) left behind, each the size of a network:
        hidden temporaries of its files, staging folders of its states (``<state>.tmp``), and an ``<state>.old`` that
        was not removed once its replacement was in place; and the temporaries of its sample images (killed while
        drawing). Returns a note saying what went, or None."""
        now = time.time() if now is None else now
        stems = rf"{re.escape(self.final_path().stem)}|{re.escape(self.epoch_path(0).stem[:-6])}\d{{6}}|" \
                rf"{re.escape(self.step_path(0).stem[:-8])}\d{{8}}"  # of the files, and of the states named after them
        gone = stale_temporaries(self.folder, re.compile(rf"({stems})\.(safetensors|ckpt|pt)"), now)
        # sample_path's names; a long seed (or 100 prompts) after a name near the longest --output_name makes one that
        # temporary_beside cuts to fit, after its time (the name has 200 bytes at most): in the seed or the .png
        drawn = re.escape(f"{self.name}_" if self.name else "") + r"(e\d{6,}|\d{6,})_\d{2,}_\d{14}"
        cut = rf"{drawn}(_-?\d*|(_-?\d+)?({beginnings('.png')}))"
        gone += stale_temporaries(self.sample_folder, re.compile(rf"{drawn}(_-?\d+)?\.png"), now, re.compile(cut))
        freed = remove_files(gone)
        states = re.compile(rf"({stems})-state\.(tmp|old)")
        for folder in _entries(self.state_folder):
            match = states.fullmatch(folder.name)
            if not match or not folder.is_dir() or match[2] == "old" and not folder.with_suffix("").is_dir():
                continue  # a lone .old is the state a cut-off save replaced: what --resume reads (readable_state)
            try:
                entries = [folder, *folder.iterdir()]
                if now - max(entry.stat().st_mtime for entry in entries) <= STALE_AFTER_SECONDS:
                    continue
                freed += sum(entry.stat().st_size for entry in entries[1:] if entry.is_file())
            except OSError:  # removed meanwhile
                continue
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
        if not gone:
            return None
        return (f"removed what a run named {self.name or 'last'!r} left when it was killed while saving or drawing "
                f"samples: {', '.join(p.name for p in gone)} ({freed / 2**20:.1f} MiB)")

    def longest_paths(self) -> tuple[list[Path], list[Path]]:
        """The longest file and folder paths this run may write: a step file's temporary (a stop saves one at any step)
        and the model's temporary inside a state folder being written, and a sample image's where samples are drawn."""
        last_step = 10**8 - 1  # sd-scripts' names give steps 8 digits
        state = staging_folder(self.state_path(None, last_step))
        files = [temporary_beside(self.step_path(last_step)), temporary_beside(state / "model.safetensors")]
        if self.options.sample_prompts:
            files.append(temporary_beside(sample_path(self.sample_folder, self.name, 99, 2**32 - 1, 999999, 0)))
        return files, [state]

    def check_path_lengths(self, limits: tuple[int, int] | None) -> None:
        """Where Windows limits paths (``safe_io.windows_path_limits``: 259 characters unless long paths are enabled),
        the run is refused before any work if its longest path would not fit: else the first save, maybe hours in,
        fails."""
        if limits is None:
            return
        longest_file, longest_folder = limits
        files, folders = self.longest_paths()
        over = [(windows_path_length(path) - limit, path, limit)
                for paths, limit in ((files, longest_file), (folders, longest_folder)) for path in paths]
        excess, path, limit = max(over, key=lambda o: o[0])
        if excess > 0:
            folders_named = "--output_dir or --state_dir" if self.options.state_dir else "--output_dir"
            characters = f"{excess} character{'s' if excess > 1 else ''}"
            raise UserError(f"this run would write {path}, which is {limit + excess} characters long, and Windows allows "
                            f"{limit} unless long paths are enabled: shorten {folders_named} or --output_name by "
                            f"{characters}, or {ENABLE_LONG_PATHS}")

    def save(self, network, path: Path, metadata: dict[str, str]) -> Path:
        precision = self.options.save_precision or "float"
        tensors = network.file_tensors()
        if self.suffix == ".safetensors":
            return save_network(tensors, path, metadata, "fp32" if precision == "float" else precision)
        cast = {k: v.detach().to("cpu", SAVE_DTYPES[precision]) for k, v in tensors.items()}
        with atomic_path(path) as temporary:
            torch.save(cast, temporary)
        return path


def data_url(value: str) -> str:
    """``--metadata_thumbnail``: a file becomes a data URL (its type from the name), as sd-scripts stores it."""
    if is_data_url(value):
        return value
    kind = mimetypes.guess_type(value)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(Path(value).read_bytes()).decode('ascii')}"


class RunMetadata:
    """sd-scripts' ``ss_*`` and ``modelspec.*`` keys, with the values it writes (all strings)."""

    def __init__(self, options: TrainOptions, config, model, spec, data, seed: int, started: float, optimizer: str,
                 num_epochs: int, total_steps: int):
        o = options
        self.options = options
        self.config = config
        self.spec = spec
        title = o.metadata_title or o.output_name or f"LoRA@{time.strftime('%Y%m%d%H%M%S')}"
        self.base = base_metadata(config, spec, title, resolution_of(o))
        if spec.alpha == o.network_alpha:  # str() of the value as given, as sd-scripts writes it: a TOML's 8 is "8"
            self.base["ss_network_alpha"] = str(o.network_alpha)
        if o.metadata_author:
            self.base["modelspec.author"] = o.metadata_author
        for key in ("description", "license", "tags", "trigger_phrase", "usage_hint", "merged_from", "preprocessor",
                    "is_negative_embedding", "thumbnail"):
            value = getattr(o, f"metadata_{key}")
            if value:
                self.base[f"modelspec.{key}"] = data_url(value) if key == "thumbnail" else value
        if o.min_timestep is not None or o.max_timestep is not None:  # sd-scripts' defaults fill the other end
            self.base["modelspec.timestep_range"] = f"{o.min_timestep or 0},{1000 if o.max_timestep is None else o.max_timestep}"
        if o.clip_skip is not None:
            self.base["modelspec.encoder_layer"] = str(o.clip_skip)
        self.base["modelspec.implementation_version"] = "lora-trainer/0.1.0"
        if o.no_metadata:
            self.full = {}
            return
        model_path = Path(o.pretrained_model_name_or_path)
        self.full = {
            "ss_session_id": random.randrange(2**32),
            "ss_training_started_at": started,
            "ss_output_name": o.output_name,
            "ss_learning_rate": o.learning_rate,
            "ss_text_encoder_lr": (o.text_encoder_lr or [None])[0],
            "ss_unet_lr": o.unet_lr,
            "ss_num_train_images": data.num_images,
            "ss_num_validation_images": data.num_validation_images,
            "ss_num_reg_images": data.num_reg_images,
            "ss_num_batches_per_epoch": data.batches_per_epoch,
            "ss_num_epochs": num_epochs,
            "ss_gradient_checkpointing": o.gradient_checkpointing,
            "ss_gradient_accumulation_steps": o.gradient_accumulation_steps,
            "ss_max_train_steps": total_steps,
            "ss_lr_warmup_steps": o.lr_warmup_steps,
            "ss_lr_scheduler": o.lr_scheduler,
            "ss_network_dropout": o.network_dropout,
            "ss_mixed_precision": o.mixed_precision,
            "ss_full_fp16": o.full_fp16,
            "ss_clip_skip": o.clip_skip,
            "ss_max_token_length": o.max_token_length,
            "ss_cache_latents": o.cache_latents,
            "ss_seed": seed,
            "ss_lowram": o.lowram,
            "ss_noise_offset": o.noise_offset,
            "ss_multires_noise_iterations": o.multires_noise_iterations,
            "ss_multires_noise_discount": o.multires_noise_discount,
            "ss_adaptive_noise_scale": o.adaptive_noise_scale,
            "ss_zero_terminal_snr": o.zero_terminal_snr,
            "ss_training_comment": o.training_comment,
            "ss_sd_scripts_commit_hash": "(unknown)",
            "ss_optimizer": optimizer,
            "ss_max_grad_norm": o.max_grad_norm,
            "ss_caption_dropout_rate": o.caption_dropout_rate,
            "ss_caption_dropout_every_n_epochs": o.caption_dropout_every_n_epochs,
            "ss_caption_tag_dropout_rate": o.caption_tag_dropout_rate,
            "ss_face_crop_aug_range": o.face_crop_aug_range,
            "ss_prior_loss_weight": o.prior_loss_weight,
            "ss_min_snr_gamma": o.min_snr_gamma,
            "ss_scale_weight_norms": o.scale_weight_norms,
            "ss_ip_noise_gamma": o.ip_noise_gamma,
            "ss_debiased_estimation": o.debiased_estimation_loss,
            "ss_noise_offset_random_strength": o.noise_offset_random_strength,
            "ss_ip_noise_gamma_random_strength": o.ip_noise_gamma_random_strength,
            "ss_loss_type": o.loss_type,
            "ss_huber_schedule": o.huber_schedule,
            "ss_huber_scale": o.huber_scale,
            "ss_huber_c": o.huber_c,
            "ss_fp8_base": o.fp8_base,
            "ss_fp8_base_unet": o.fp8_base_unet,
            "ss_validation_seed": o.validation_seed,
            "ss_validation_split": o.validation_split,
            "ss_max_validation_steps": o.max_validation_steps,
            "ss_validate_every_n_epochs": o.validate_every_n_epochs,
            "ss_validate_every_n_steps": o.validate_every_n_steps,
            "ss_resize_interpolation": o.resize_interpolation,
            **data.metadata(),
        }
        if model_path.is_file():
            self.full["ss_sd_model_name"] = model_path.name
            self.full["ss_sd_model_hash"] = legacy_model_hash(model_path)
            self.full["ss_new_sd_model_hash"] = file_sha256(model_path)
        else:
            self.full["ss_sd_model_name"] = o.pretrained_model_name_or_path
        if o.vae:
            self.full["ss_vae_name"] = Path(o.vae).name
        if takes_its_own_step(o.optimizer, o.optimizer_args):  # as sd-scripts records it: the rates were not used
            self.full.update({"ss_learning_rate": None, "ss_unet_lr": None, "ss_text_encoder_lr": None,
                              "ss_lr_scheduler": f"adafactor:{o.learning_rate}"})
        if spec.metadata_args() is not None:
            given = dict(spec.network_args)  # sd-scripts adds --network_dropout as "dropout" (its LyCORIS workaround)
            self.full["ss_network_args"] = json.dumps({**given, **({} if "dropout" in given else {"dropout": o.network_dropout})})

    def build(self, epoch: int, step: int, extra: dict[str, str] | None = None) -> dict[str, str]:
        values = {**self.full, "ss_training_finished_at": time.time(), "ss_steps": step, "ss_epoch": epoch, **(extra or {})} if self.full else {}
        metadata = {k: str(v) for k, v in values.items()}  # sd-scripts writes str(): None, True, (128, 128)
        return {**self.base, **metadata, "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S")}
