"""The Train LoRA tab: checkpoint, dataset (with its health report), preset and VRAM tier, the main parameters,
an Advanced box for the rest, validation with the step/VRAM/time estimate, the job buttons and a live view that
polls the job store every second (so a reloaded page finds its run again).

The handlers are plain functions of ``Services`` and the form values; ``build`` only wires them to components.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from ...dataset.captions import VARYING_CAPTION_OPTIONS, caching_problems
from ...dataset.config import load_dataset_config
from ...dataset.health import HealthSettings, check_dataset, check_dataset_config, report_lines
from ...errors import UserError
from ...jobs.runner import RUNNER_OPTIONS, earlier_files_note, same_run_jobs_note, trimmed_name_note
from ...jobs.store import Job
from ...networks.spec import forge_problem, spec_from_kohya
from ...training.lr_schedules import SCHEDULER_NAMES
from ...training.optimizers import missing_package
from ...training.options import (DEFAULTS, TrainOptions, memory_advice, options_from, resolution_of,
                                write_prompts_file)
from .. import presets
from ..estimate import estimate, network_gib
from ..extras import EXTRAS, install_extras
from ..form import ALGORITHMS, algorithm_of, form_to_options, parse_extra_options
from ..paths import allowed_path, check_dataset_config_paths, plain_name
from ..services import Services, write_card_hints
from ..settings import AppSettings
from .compat import js_kwarg, poll_kwarg, table
from .live import NOTIFY_STATUSES, LiveView, apply_event, loss_plot, progress_text

TITLE = "Train LoRA"

# The main form, in the order of the components ``build`` passes to every handler.
FORM_FIELDS = ("checkpoint", "dataset", "preset", "tier", "algorithm", "output_name", "epochs", "batch_size", "resolution",
               "network_dim", "network_alpha", "unet_lr", "text_encoder_lr", "save_every_n_epochs", "sample_every_n_epochs",
               "sample_prompt", "optimizer", "scheduler", "extra")
# What a preset fills (the components ``build`` passes to the fill handlers, in this order).
PRESET_FIELDS = ("epochs", "batch_size", "resolution", "network_dim", "network_alpha", "unet_lr", "text_encoder_lr",
                 "save_every_n_epochs", "optimizer", "scheduler")
# what a preset fills differently by tier and base model (SDXL: 1024 px, on 6 GB 640 and rank 4, below 16 GB no text
# encoder rate; the batch size and optimizer that fit the card: SD1 on 8 GB batch 2, SDXL 1)
_TIER_AND_MODEL_FIELDS = ("resolution", "network_dim", "network_alpha", "text_encoder_lr", "batch_size", "optimizer")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "Prodigy", "Adafactor", "SGDNesterov", "DAdaptAdam")
RESUMABLE = ("paused", "stopped", "interrupted", "failed")

_ASK_NOTIFICATION = ("(...args) => { if (window.Notification && Notification.permission === 'default') "
                     "Notification.requestPermission(); return args; }")
# The grid tab is another Blocks (another top-level tab in the WebUI): the run goes over in the browser, into its
# run box (elem_id lora_trainer_grid_run), as if typed there.
_SEND_TO_GRID = ("(path) => { const root = typeof gradioApp === 'function' ? gradioApp() : document; "
                 "const box = root.querySelector('#lora_trainer_grid_run textarea'); "
                 "if (box && path) { box.value = path; box.dispatchEvent(new Event('input', {bubbles: true})); } return [path]; }")
# Only a change seen while the page is open notifies: the first value after a (re)load is the page catching up.
_NOTIFY = ("(text) => { const first = window.loraTrainerLastEnd === undefined; window.loraTrainerLastEnd = text; "
           "if (!first && text && window.Notification && Notification.permission === 'granted') "
           "new Notification('LoRA Trainer', {body: text}); return [text]; }")  # a list: gradio 3 iterates it


# --- handlers (plain functions; the tests call these) ----------------------------------------------------------

def checkpoint_choices(services: Services) -> list[str]:
    return list(services.host.checkpoints())


def checkpoint_path(services: Services, value: str) -> Path:
    """A title from the host's list, or a file path below the configured roots."""
    known = services.host.checkpoints()
    if value in known:
        return Path(known[value])
    return allowed_path(value, services.settings.roots(), "base checkpoint")


def _form(values: tuple | list) -> dict[str, Any]:
    return dict(zip(FORM_FIELDS, values))


def _is_sdxl(path: Path) -> bool:
    """Whether the checkpoint is SDXL, told from its tensors' names once per version of the file: the form asks at
    every preset, tier and checkpoint pick, and a .ckpt is unpickled to tell. A Diffusers folder by its second text
    encoder, as the loader tells it."""
    if path.is_dir():
        return (path / "text_encoder_2" / "config.json").exists()
    try:
        stat = path.stat()
    except OSError:
        return False
    return _is_sdxl_file(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _is_sdxl_file(path: str, size: int, modified_ns: int) -> bool:  # size and time: a file saved again is read again
    from ...models.checkpoint import detect_architecture, open_tensors

    try:
        config, _ = detect_architecture(open_tensors(path))
    except (UserError, OSError):
        return False
    return "xl" in config.label.lower()


def checkpoint_is_sdxl(services: Services, value: str | None, unpickle: bool = True) -> bool | None:
    """Whether the Base checkpoint field names an SDXL model; None while it names no file (a path being typed), and
    without ``unpickle`` for a .ckpt/.pt, which only unpickling the whole file tells."""
    try:
        path = checkpoint_path(services, value or "")
    except UserError:
        return None
    if not path.exists() or not (unpickle or path.is_dir() or path.suffix.lower() == ".safetensors"):
        return None
    return _is_sdxl(path)


def _resolution_pair(text: Any) -> tuple[int, int]:
    try:
        sides = [int(float(v)) for v in str(text or "512").split(",")]
    except ValueError:
        raise UserError(f'Resolution {text!r}: give "512" or "768,512" (width,height)', "resolution") from None
    return (sides[0], sides[-1])


def health_settings(options: dict[str, Any]) -> HealthSettings:
    """The health check under the run's own resolution, batch size, buckets, random_crop, face crop and latent
    caching."""
    checked = options_from({"pretrained_model_name_or_path": "-", "train_data_dir": "-", **options}, "Train form")
    return HealthSettings(resolution=resolution_of(checked) or (512, 512), batch_size=checked.train_batch_size,
                          enable_bucket=checked.enable_bucket, min_bucket_reso=checked.min_bucket_reso,
                          max_bucket_reso=checked.max_bucket_reso, bucket_reso_steps=checked.bucket_reso_steps,
                          bucket_no_upscale=checked.bucket_no_upscale, caption_extension=checked.caption_extension,
                          max_token_length=checked.max_token_length or 75, shuffle_caption=checked.shuffle_caption,
                          keep_tokens=checked.keep_tokens, keep_tokens_separator=checked.keep_tokens_separator or "",
                          random_crop=checked.random_crop,
                          cache_latents=checked.cache_latents or checked.cache_latents_to_disk,
                          face_crop=bool(checked.face_crop_aug_range))


def dataset_config_file(services: Services, dataset: str) -> Path | None:
    """The Dataset field's Kohya dataset TOML (``--dataset_config``), None for a folder."""
    path = allowed_path(dataset, services.settings.dataset_roots, "dataset folder")
    return path if path.is_file() and path.suffix.lower() in (".toml", ".json") else None


def health_report(services: Services, dataset: str, options: dict[str, Any]):
    folder = allowed_path(dataset, services.settings.dataset_roots, "dataset folder")
    if (config := dataset_config_file(services, dataset)) is not None:
        check_dataset_config_paths(config, services.settings.dataset_roots, options, "dataset folder")
        return check_dataset_config(config, health_settings(options), options)
    return check_dataset(folder, health_settings(options))


def regularization_report(services: Services, options: dict[str, Any]):
    """The reg_data_dir folder (given in Advanced) checked as the trainer reads it, for the estimate to count its
    images; None without one, or with a dataset TOML (whose subsets say what is regularisation)."""
    folder = options.get("reg_data_dir")
    if not folder or options.get("dataset_config"):
        return None
    path = allowed_path(folder, services.settings.roots(), "Advanced: reg_data_dir")
    return check_dataset(path, health_settings(options))


def check_dataset_text(services: Services, form: dict[str, Any]) -> str:
    """The Check button: the dataset's health report under the form's current settings."""
    try:
        options = form_to_options({**form, "checkpoint": None, "dataset": None, "sample_prompt": None},
                                  form.get("preset") or "character", form.get("tier") or presets.NO_TIER)
        return "\n".join(report_lines(health_report(services, form.get("dataset") or "", options)))
    except UserError as error:
        return f"error: {error}"


def sample_prompt_file(services: Services, prompt: str, resolution: Any) -> str:
    """sd-scripts reads sample prompts from a file: write the typed prompt (at the training size unless it says
    otherwise) into the data folder, named by its content so queued jobs never overwrite each other's."""
    width, height = _resolution_pair(resolution)
    lines = [line.strip() for line in prompt.splitlines() if line.strip()]
    lines = [line if re.search(r"--[wh]\s", line + " ") else f"{line} --w {width} --h {height}" for line in lines]
    return str(write_prompts_file("\n".join(lines), services.settings.data_folder / "sample-prompts"))


# what the form's own fields name: typed in Advanced, Validate would check one folder and the job train another
_FORM_PATHS = {"pretrained_model_name_or_path": "Base model", "train_data_dir": "Dataset folder",
               "output_dir": "the Lora folder (the app's setting)"}


def _check_advanced_paths(services: Services, extra: dict[str, Any]) -> None:
    """Files and folders named in Advanced lie below the allowed roots, as every path the API takes (a WebUI shared
    with --listen serves this tab to others)."""
    from ...training.options import PATH_OPTIONS

    for key, field in _FORM_PATHS.items():
        if extra.get(key):
            raise UserError(f"Advanced: {key} is set by {field}; remove it from Advanced", "extra")
    for key in [*PATH_OPTIONS, "backend"]:
        value = extra.get(key)
        values = value if isinstance(value, list) else [value] if value else []
        for item in values:
            path = str(item).split("=", 1)[1] if key == "backend" and "=" in str(item) else str(item)
            allowed_path(path, services.settings.roots(), f"Advanced: {key}", must_exist=PATH_OPTIONS.get(key, True))


def job_options(services: Services, form: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The form → checked sd-scripts option values (and whether the base is SDXL); raises UserError."""
    checkpoint = checkpoint_path(services, form.get("checkpoint") or "")
    extra = parse_extra_options(form.get("extra", ""))
    if extra.get("dataset_config"):  # "" is not given
        raise UserError("Advanced: dataset_config is the Dataset field's to give: put the dataset TOML's path there "
                        "(and remove it from Advanced)", "extra")
    if extra.get("in_json"):  # fine-tuning metadata: its images and captions are not what the form checks and estimates
        raise UserError("Advanced: in_json names the captions in a metadata file, and this tab trains a Dataset folder "
                        "or dataset TOML: remove it, or train that file from the command line (python -m "
                        "lora_trainer.train_network --in_json FILE) or the API (POST /jobs)", "extra")
    _check_advanced_paths(services, extra)
    dataset = allowed_path(form.get("dataset") or "", services.settings.dataset_roots, "dataset folder")
    config = dataset_config_file(services, str(dataset))
    name = plain_name(form.get("output_name") or "", "output name")
    sdxl = _is_sdxl(checkpoint)
    values = {**form, "checkpoint": str(checkpoint), "dataset": None if config else str(dataset), "output_name": name}
    if (form.get("sample_prompt") or "").strip():
        values["sample_prompts"] = sample_prompt_file(services, form["sample_prompt"], form.get("resolution") or 512)
    options = form_to_options(values, form.get("preset") or "character", form.get("tier") or presets.NO_TIER, sdxl)
    if config:  # its subsets name the folders; its [general]/[[datasets]] values win over the form's, as in sd-scripts
        options["dataset_config"] = str(config)
        check_dataset_config_paths(config, services.settings.dataset_roots, options, "dataset folder")
    options["output_dir"] = str(services.settings.lora_folder)
    checked = options_from(options, "Train form")
    if (options.get("cache_text_encoder_outputs") and "cache_text_encoder_outputs" not in extra
            and not extra.get("cache_text_encoder_outputs_to_disk") and varying_captions(checked)):
        del options["cache_text_encoder_outputs"]  # the tier's caching gives way to captions the dataset TOML varies,
        # as form_to_options' gives way to the form's (Validate says so); caching asked for in Advanced is refused
    return options, sdxl


def varying_captions(checked: TrainOptions) -> list[str]:
    """The caption options that change captions between steps in some subset of the run's dataset: a dataset TOML's
    subsets have their own (its [general] and [[datasets]] win over the form's, as in sd-scripts), folders the
    options'."""
    if not checked.dataset_config:
        return caching_problems(checked)
    group = load_dataset_config(Path(checked.dataset_config), checked, support_controlnet=checked.masked_loss)
    found = {name for dataset in group.datasets for subset in dataset.subsets
             for name in caching_problems(subset.caption_options)}
    return [name for name in VARYING_CAPTION_OPTIONS if name in found]


def validation_text(services: Services, form: dict[str, Any]) -> str:
    """Total steps, VRAM and time, and the warnings, or the one-sentence problem."""
    try:
        options, sdxl = job_options(services, form)
        checked = options_from(options, "Train form")
        report = health_report(services, form["dataset"], options)
        regularization = regularization_report(services, options)
        services.runner.check(options["output_name"], options)  # what Start would refuse, said now
    except UserError as error:
        return f"**Cannot start:** {error}"
    if report.errors:
        return "**Cannot start:** " + "; ".join(f"{f.path}: {f.message}" for f in report.errors[:3])
    notes = [note for note in (trimmed_name_note("Output name", form.get("output_name") or "", options["output_name"]),
                               earlier_files_note(options, services.runner.replaced_folder),
                               same_run_jobs_note(options, services.store.all(), services.runner.replaced_folder)) if note]
    planned = estimate(checked, report, "sdxl" if sdxl else "sd1", regularization)
    lines = planned.lines()
    if services.host.name == "forge" and (problem := forge_problem(
            spec_from_kohya(checked.network_module or "networks.lora", checked.network_dim, checked.network_alpha,
                            checked.network_args, checked.network_dropout))):
        lines.append(f"⚠ {problem}")
    tier = form.get("tier") or presets.NO_TIER
    # a resolution typed or imported for SD1 (the fill gives SDXL its tier's)
    if sdxl and max(resolution_of(checked) or (0, 0)) < (side := presets.sdxl_resolution(tier)):
        trained = "is trained at 1024 px" if side == 1024 else f"the {tier} GPU memory tier trains at {side} px"
        lines.append(f"⚠ The base model is SDXL, which {trained}, and Resolution is {checked.resolution}: set {side} "
                     f"(or {side},{side * 3 // 4} …) unless a smaller size is what you mean")
    unet_only = presets.unet_only_tier(tier, sdxl) and checked.network_train_unet_only
    if unet_only and float(form.get("text_encoder_lr") or 0):
        cached = (" (the captions are encoded once, so the text encoders leave the GPU)"
                  if checked.cache_text_encoder_outputs else "")
        lines.append(f"⚠ The {tier} GPU memory tier trains SDXL's UNet only{cached}: the text encoder learning rate is "
                     "not used. To train the text encoders, choose 16 GB or more, or add network_train_unet_only = "
                     "false in Advanced")
    if unet_only and not checked.cache_text_encoder_outputs and (varying := varying_captions(checked)):
        where = " in the dataset TOML" if checked.dataset_config else ""
        one = len(varying) == 1
        lines.append(f"⚠ The {tier} GPU memory tier encodes the captions once, but {', '.join(varying)}{where} "
                     f"{'changes' if one else 'change'} them between steps: they are encoded at every step instead, "
                     "with the text encoders on the GPU (the estimate counts them). To encode them once, turn "
                     f"{'it' if one else 'them'} off{where}")
    card = presets.tier_gib(tier)
    if card is not None and planned.vram_gib > card:
        lines.append(f"⚠ The estimate is above the {form['tier']} chosen as GPU memory: {memory_advice(checked)} "
                     "(or pick the card's real size)")
    elif card is not None and planned.vram_gib > presets.USABLE_SHARE * card:  # what the tiers themselves keep free
        lines.append(f"⚠ The estimate leaves less than a tenth of the {form['tier']} card free, which a desktop and "
                     "other programs usually take: close the programs that use the GPU (a browser with hardware "
                     f"acceleration, games), or lower the resolution or rank — {memory_advice(checked)}")
    elif card is None and (gpu := gpu_gib(services.settings.cuda_device)) and planned.vram_gib > gpu:
        lines.append(f"⚠ The estimate is above this GPU's {gpu:.0f} GiB, and no GPU memory tier is chosen (without one "
                     "the run trains in full precision without gradient checkpointing): pick your card's size under GPU "
                     "memory")
    return "\n\n".join([*lines, *(f"**Note:** {note}" for note in notes)])


def equivalent_command(options: dict[str, Any], sdxl: bool) -> tuple[str, str]:
    """"Show sd-scripts command": the command (one line to paste) and, for the message under it, what
    ``--print-kohya-command`` says beside it that concerns the form's run: options sd-scripts' script does not take, a
    sampler or LyCORIS preset it runs otherwise, this trainer's own options typed in Advanced (device, backend; not
    the runner's ``RUNNER_OPTIONS``, which it sets for every job whatever Advanced says) and, on Windows, values
    PowerShell would change."""
    command, notes = presets.sd_scripts_command({k: v for k, v in options.items() if k not in RUNNER_OPTIONS}, sdxl)
    return command, "\n\n".join(f"**Note:** {note}" for note in notes)


def gpu_gib(device: str | None) -> float | None:
    """The memory of the GPU a job trains on (the host's device id, else the first), None on a machine without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = int(device) if str(device or "").isdigit() and int(device) < torch.cuda.device_count() else 0
    return torch.cuda.get_device_properties(index).total_memory / 2**30


@dataclass
class Filled:
    """What the form's preset values were filled for (the GPU memory tier, an SDXL base or not), for one browser
    session (a ``gr.State``, changed in place): a tier or checkpoint picked later changes a field only where the form
    still shows the filled value, so what the user typed stays. ``imported``: the fields an imported file wrote since
    the last preset pick, which only a preset pick fills again (a file's value may equal the fill's);
    ``tier_zero_rate``: the imported text encoder rate is a 0 that the SDXL tier would have filled anyway, which an SD1
    checkpoint picked later fills again (``filled_after_import``)."""

    tier: str = presets.NO_TIER
    sdxl: bool = False
    imported: frozenset[str] = frozenset()
    tier_zero_rate: bool = False


def preset_values(preset: str, tier: str, sdxl: bool = False, extras_folder: Path | None = None) -> dict[str, Any]:
    """What picking a preset fills (``PRESET_FIELDS`` and its guidance): its values at the tier, for the base model."""
    options = presets.preset_options(preset, tier, sdxl)
    tiered = tier_values(preset, tier, extras_folder, sdxl)
    te = options.get("text_encoder_lr")
    return {"epochs": options.get("max_train_epochs"), "batch_size": tiered["batch_size"],
            "resolution": options.get("resolution"), "network_dim": options.get("network_dim"),
            "network_alpha": options.get("network_alpha"), "unet_lr": options.get("unet_lr"),
            "text_encoder_lr": te[0] if te else 0, "save_every_n_epochs": options.get("save_every_n_epochs"),
            "optimizer": tiered["optimizer"], "scheduler": options.get("lr_scheduler"),
            "guidance": tiered.get("guidance", presets.guidance(preset, tier, sdxl))}


def refilled_values(preset: str, before: Filled, after: Filled, form: dict[str, Any],
                    extras_folder: Path | None = None) -> dict[str, Any]:
    """The fields the preset fills differently for ``after`` than for ``before`` (resolution, rank, the text encoder's
    rate), where the form still shows ``before``'s value and no file imported it; and a rank above the tier's cap
    lowered to it, alpha with it (keeping the form's alpha/rank scale)."""
    old = preset_values(preset, before.tier, before.sdxl, extras_folder)
    new = preset_values(preset, after.tier, after.sdxl, extras_folder)
    # an imported 0 the SDXL tier would have filled anyway is the fill's once SD1 is picked (only then: the file's
    # UNet-only stays for a larger SDXL tier)
    refilled_anyway = {"text_encoder_lr"} if before.tier_zero_rate and before.sdxl and not after.sdxl else set()
    values = {field: new[field] for field in _TIER_AND_MODEL_FIELDS
              if (field not in before.imported or field in refilled_anyway)
              and not _same(new[field], old[field]) and _same(form.get(field), old[field])}
    cap = presets.max_rank(after.tier, after.sdxl)
    dim = _number_or_none(values.get("network_dim", form.get("network_dim")))
    # an imported rank is the file's: a tier picked caps it (as the tier sets the batch size and optimizer), a
    # checkpoint changed, the import's own checkpoint included, does not
    tier_picked = after.tier != before.tier
    if cap and dim and dim > cap and ("network_dim" not in before.imported or tier_picked):
        alpha = _number_or_none(values.get("network_alpha", form.get("network_alpha")))
        values["network_dim"] = cap
        values["network_alpha"] = alpha * cap / dim if alpha else new["network_alpha"]
    return values


def _number_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _same(shown: Any, filled: Any) -> bool:
    """A form value as a fill put it there (gradio gives numbers back as floats, a resolution as text)."""
    if (a := _number_or_none(shown)) is not None and (b := _number_or_none(filled)) is not None:
        return a == b
    return str(shown if shown is not None else "").strip() == str(filled if filled is not None else "").strip()


def _base_is_sdxl(services: Services, form: dict[str, Any], filled: Filled) -> bool:
    """The Base checkpoint's architecture; the last one known while the field names no file."""
    sdxl = checkpoint_is_sdxl(services, form.get("checkpoint"))
    return filled.sdxl if sdxl is None else sdxl


def fill_for_preset(services: Services, form: dict[str, Any], filled: Filled) -> dict[str, Any]:
    """A preset picked: every field it fills, for the tier and the base checkpoint."""
    return _preset_fill(services, form, filled, _base_is_sdxl(services, form, filled))


def fill_at_page_load(services: Services, form: dict[str, Any], filled: Filled) -> dict[str, Any]:
    """The page loaded: the preset's fill for the base checkpoint as its header tells. A .ckpt is not unpickled in the
    WebUI's process at every page load: SD 1.5's fill (or the last answer known) stays until a preset, tier or
    checkpoint pick reads it; Validate and Start read it in any case."""
    sdxl = checkpoint_is_sdxl(services, form.get("checkpoint"), unpickle=False)
    return _preset_fill(services, form, filled, filled.sdxl if sdxl is None else sdxl)


def _preset_fill(services: Services, form: dict[str, Any], filled: Filled, sdxl: bool) -> dict[str, Any]:
    tier = form.get("tier") or presets.NO_TIER
    filled.tier, filled.sdxl, filled.imported, filled.tier_zero_rate = tier, sdxl, frozenset(), False
    return preset_values(form["preset"], tier, sdxl, services.settings.extras_folder)


def fill_for_tier(services: Services, form: dict[str, Any], filled: Filled) -> dict[str, Any]:
    """A GPU memory tier picked: what the tier decides on the base checkpoint (``tier_values``), and the preset's
    resolution, rank and text encoder rate for it where the form shows the earlier fill's. The guidance is always the
    tier's: an earlier tier's "needs bitsandbytes" must not stay on screen."""
    after = Filled(form.get("tier") or presets.NO_TIER, _base_is_sdxl(services, form, filled))
    extras = services.settings.extras_folder
    values = {**refilled_values(form["preset"], filled, after, form, extras),
              "guidance": presets.guidance(form["preset"], after.tier, after.sdxl),
              **tier_values(form["preset"], after.tier, extras, after.sdxl)}
    filled.tier, filled.sdxl = after.tier, after.sdxl
    return values


def fill_for_checkpoint(services: Services, form: dict[str, Any], filled: Filled) -> dict[str, Any]:
    """Another checkpoint picked: from SD1 to SDXL or back, the preset's resolution, rank and text encoder rate at the
    tier for it, where the form shows the earlier fill's, and the guidance for it; nothing for a checkpoint of the same
    kind."""
    sdxl = checkpoint_is_sdxl(services, form.get("checkpoint"))
    if sdxl is None or sdxl == filled.sdxl:
        return {}
    after = Filled(form.get("tier") or presets.NO_TIER, sdxl)
    values = {**refilled_values(form["preset"], filled, after, form, services.settings.extras_folder),
              "guidance": preset_values(form["preset"], after.tier, sdxl, services.settings.extras_folder)["guidance"]}
    filled.tier, filled.sdxl = after.tier, after.sdxl
    return values


def filled_after_import(services: Services, imported: list[Any], filled: Filled) -> Filled:
    """An import's values (``import_into_form``'s answer) written into the form: the preset fields it wrote are the
    file's from then on, which the checkpoint change the import sets off, and any tier or checkpoint picked later,
    leave as they are (an alpha goes with the rank it scales). A text encoder rate of 0 (the UNet only) where the
    tier trains the UNet only anyway, on the checkpoint the form names after the import, stays the file's for SDXL,
    but an SD1 checkpoint picked later brings the preset's rate back, as it does without an import."""
    written = {field for field, value in zip(IMPORTED_FIELDS, imported)
               if field in PRESET_FIELDS and not (isinstance(value, dict) and "value" not in value)}  # gr.update(): kept
    if "network_dim" in written:
        written.add("network_alpha")
    if "text_encoder_lr" in written:
        checkpoint = imported[IMPORTED_FIELDS.index("checkpoint")]
        sdxl = checkpoint_is_sdxl(services, checkpoint) if isinstance(checkpoint, str) else None
        filled.tier_zero_rate = (_same(imported[IMPORTED_FIELDS.index("text_encoder_lr")], 0)
                                 and presets.unet_only_tier(filled.tier, filled.sdxl if sdxl is None else sdxl))
    filled.imported = filled.imported | written
    return filled


def tier_values(preset: str, tier: str, extras_folder: Path | None = None, sdxl: bool = False) -> dict[str, Any]:
    """The form fields a GPU memory tier decides (batch size, optimizer, the text encoder's rate when a small card
    trains SDXL's UNet only): choosing a tier leaves the epochs, rank, rates and resolution typed or imported as they
    are (``refilled_values`` changes those the preset filled). An 8-bit optimizer whose bitsandbytes is not installed
    (here or in ``extras_folder``) becomes AdamW, and the preset's guidance says so: the job would be refused."""
    options = presets.preset_options(preset, tier, sdxl)
    values = {"batch_size": options.get("train_batch_size"), "optimizer": options.get("optimizer_type")}
    if "text_encoder_lr" not in options:
        values["text_encoder_lr"] = 0
    if package := missing_package(values["optimizer"], extras_folder):
        install = "with Install extras (under Advanced)" if extras_folder is not None else f"(pip install {package})"
        on_sd1, on_sdxl = (_adamw_extra_gib(preset, tier, values["optimizer"], base) for base in (False, True))
        values["guidance"] = (f"{presets.guidance(preset, tier, sdxl)} The {tier} tier's {values['optimizer']} needs "
                              f"{package}, which is not installed: the optimizer is AdamW, whose moments take ≈ "
                              f"{on_sd1:.2f} GiB more on SD 1.5 (≈ {on_sdxl:.1f} GiB on SDXL). Install {package} {install} "
                              f"to choose {values['optimizer']} again.")
        values["optimizer"] = "AdamW"
    return values


def _adamw_extra_gib(preset: str, tier: str, optimizer: str, sdxl: bool) -> float:
    """What AdamW's moments take beyond ``optimizer``'s for the preset's network at the tier."""
    options = {**presets.preset_options(preset, tier, sdxl), "pretrained_model_name_or_path": "-", "train_data_dir": "-"}
    architecture = "sdxl" if sdxl else "sd1"
    return (network_gib(options_from({**options, "optimizer_type": "AdamW"}), architecture)
            - network_gib(options_from({**options, "optimizer_type": optimizer}), architecture))


def submit(services: Services, form: dict[str, Any]) -> tuple[str, int | None]:
    """Start (or queue behind the running job). Returns the message and the new job's id."""
    text = validation_text(services, form)
    if text.startswith("**Cannot start:**"):
        return text, None
    options, _ = job_options(services, form)
    running = [job for job in services.store.all() if job.status in ("queued", "running")]
    try:
        job = services.runner.submit(options["output_name"], options)
    except UserError as error:  # changed on disk since Validate (a checkpoint replaced, captions edited)
        return f"**Cannot start:** {error}", None
    write_card_hints(job, presets.PRESETS[form.get("preset") or "character"].preferred_weight)
    where = f"queued behind {len(running)} job(s)" if running else "starting"
    return f"Job {job.id} ({job.name}) {where}.\n\n{text}", job.id


def resume_target(services: Services, job_id: int | None) -> Job | None:
    """The selected job (whether it can be resumed is the runner's to say), else, with none selected, the last
    paused/stopped/interrupted one with a saved state. Never another job than the selected one: a failed run
    without a state would resume some other run."""
    from ...training.state import readable_state  # torch: once a resume is asked for

    jobs = services.store.all()
    if job_id is not None:
        return next((job for job in jobs if job.id == job_id), None)
    candidates = [job for job in jobs if job.status in RESUMABLE and job.last_state
                  and readable_state(Path(job.last_state)).exists()]
    return candidates[-1] if candidates else None


def job_action(services: Services, action: str, job_id: int | None) -> tuple[str, int | None]:
    """Stop and save, Pause, Resume, Save now, Sample now. Returns a message and the job to show."""
    try:
        if action == "resume":
            target = resume_target(services, job_id)
            if target is None:
                return "Nothing to resume: no paused, stopped or interrupted job saved a state.", job_id
            notes: list[str] = []
            job = services.runner.resume(target.id, notes)
            return "\n\n".join([f"Job {job.id} resumes job {target.id} from its last state.",
                                 *(f"**Note:** {note}" for note in notes)]), job.id
        if job_id is None:
            return "No job selected.", None
        if action in ("stop", "pause"):
            job = services.runner.stop(job_id, pause=action == "pause")
            doing = "pausing (frees the GPU)" if action == "pause" else "stopping"
            if job.status != "running":
                return f"Job {job_id} is {job.status}.", job_id
            if job.options.get("backend"):  # terminated: it cannot save at a stop
                return (f"Job {job_id}: {doing}: sd-scripts is ended now, without saving (it cannot save at a stop); "
                        "a resume goes on from the last state it saved."), job_id
            return f"Job {job_id}: {doing} after the current step, saving first.", job_id
        services.runner.control(job_id, action)
        return f"Job {job_id}: {'saving' if action == 'save' else 'drawing samples'} after the current step.", job_id
    except UserError as error:
        return f"error: {error}", job_id


def install_extras_text(services: Services, names: list[str]) -> str:
    """The 'Install extras' button: pip into the private folder only the trainer subprocess reads."""
    folder = services.settings.extras_folder
    try:
        installed = install_extras(list(names or []), folder)
    except UserError as error:
        return f"error: {error}"
    if not installed:
        return f"The WebUI's environment already has {', '.join(names)}; the next training job can use them."
    return f"Installed {', '.join(installed)} into {folder}; the next training job can use them."


@dataclass
class _Followed:
    offset: int
    view: LiveView


class LiveViews:
    """Per job: the event offset read so far and the view folded from it, so a poll reads only new lines."""

    def __init__(self):
        self._followed: dict[int, _Followed] = {}

    def view(self, job: Job) -> LiveView:
        from ...training.events import read_events

        followed = self._followed.setdefault(job.id, _Followed(0, LiveView()))
        events, followed.offset = read_events(job.events_path, followed.offset)
        for event in events:
            apply_event(followed.view, event)
        view = followed.view
        view.status = job.status
        if job.status == "failed" and not view.error:
            view.error = job.message or "the trainer stopped with an error"
        return view


def shown_job(services: Services, job_id: int | None) -> Job | None:
    """The chosen job, else the running one, else the newest."""
    jobs = services.store.all()
    by_id = {job.id: job for job in jobs}
    if job_id in by_id:
        return by_id[job_id]
    running = [job for job in jobs if job.status == "running"]
    return (running or jobs or [None])[-1]


JOB_COLUMNS = ["id", "name", "status", "created", "message"]


def job_rows(services: Services) -> list[list[Any]]:
    return [[job.id, job.name, job.status, time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created)), job.message or ""]
            for job in reversed(services.store.all())]


def job_table(services: Services):
    return table(job_rows(services), JOB_COLUMNS)


def progress_html(view: LiveView) -> str:
    return (f'<div class="lora-trainer-progress"><div class="lora-trainer-progress-bar" style="width:{view.fraction * 100:.1f}%">'
            f"</div></div>")


def end_notice(job: Job | None) -> str:
    """Changes when the shown job ends: the browser notification's text."""
    return f"Job {job.id} ({job.name}) {job.status}" if job and job.status in NOTIFY_STATUSES else ""


def job_label(job: Job) -> str:
    return f"{job.id}: {job.name} ({job.status})"


def job_id_of(label: str | None) -> int | None:
    if not label:
        return None
    head = str(label).split(":", 1)[0]
    return int(head) if head.isdigit() else None


@dataclass
class Picked:
    """What the Job and Saved files boxes should hold, for one browser session (a ``gr.State``, changed in place).
    The live view reads it instead of the boxes: gradio 3 (the WebUI's) runs a polling handler with the inputs it
    had when the page loaded, so the boxes' own values would be stale to it and every poll would put the newest job
    back over the one the user picked; gradio 4 sends them when a poll starts, which may be just before Resume or
    Start replaced the job."""

    job: str | None = None  # the job the user, Start or Resume chose; None: the running one, else the newest
    file: str | None = None  # the saved file the user chose; None: the newest
    shown_job: str | None = None  # what the live view last put into each box
    shown_file: str | None = None

    def choose_job(self, label: str | None) -> None:
        self.job, self.file = label, None


def poll(services: Services, views: LiveViews, picked: Picked) -> tuple:
    """The live view's outputs, every second: Job box, progress, bar, loss plot, samples, Saved files box, job table,
    end notice. A box gets a value only when it differs from the one the live view last gave it, so a list being
    opened is not reset each second."""
    shown = shown_job(services, job_id_of(picked.job))
    choices = [job_label(j) for j in reversed(services.store.all())]
    if shown is None:
        return (gr.update(choices=choices), "No jobs yet: fill the form and press Start.", progress_html(LiveView()),
                loss_plot(LiveView()), [], gr.update(choices=[]), job_table(services), "")
    view = views.view(shown)
    current = job_label(shown)
    job_box = gr.update(choices=choices) if picked.shown_job == current else gr.update(choices=choices, value=current)
    file = picked.file if picked.file in view.files else (view.files[-1] if view.files else None)
    files_box = gr.update(choices=view.files) if picked.shown_file == file else gr.update(choices=view.files, value=file)
    picked.shown_job, picked.shown_file = current, file
    return (job_box, progress_text(view), progress_html(view), loss_plot(view), view.samples[-8:], files_box,
            job_table(services), end_notice(shown))


# --- the tab ---------------------------------------------------------------------------------------------------

def build(services: Services) -> gr.Blocks:
    views = LiveViews()
    names = list(presets.PRESETS)
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            checkpoint = gr.Dropdown(checkpoint_choices(services), label="Base checkpoint", allow_custom_value=True,
                                     value=(checkpoint_choices(services) or [None])[0], elem_id="lora_trainer_checkpoint",
                                     info="from the list, or the path of a .safetensors file")
            refresh = gr.Button("🔄", elem_id="lora_trainer_refresh_checkpoints", scale=0, min_width=40)
            dataset = gr.Textbox(label="Dataset folder", elem_id="lora_trainer_dataset",
                                 placeholder="folder with <repeats>_<name> subfolders, e.g. 10_mychar, or a Kohya "
                                             "dataset TOML (--dataset_config)")
            check = gr.Button("Check", elem_id="lora_trainer_check", scale=0)
        with gr.Row():
            preset = gr.Dropdown(names, value="character", label="Preset", elem_id="lora_trainer_preset")
            tier = gr.Dropdown([presets.NO_TIER, *presets.VRAM_TIERS], value=presets.NO_TIER, label="GPU memory",
                               elem_id="lora_trainer_tier")
            algorithm = gr.Radio(list(ALGORITHMS), value="LoRA", label="Algorithm", elem_id="lora_trainer_algorithm")
        guidance = gr.Markdown(presets.PRESETS["character"].guidance, elem_id="lora_trainer_guidance")
        with gr.Row():
            output_name = gr.Textbox(label="Output name", elem_id="lora_trainer_output_name", placeholder="my_lora")
            epochs = gr.Number(label="Epochs", precision=0, elem_id="lora_trainer_epochs")
            batch_size = gr.Number(label="Batch size", precision=0, elem_id="lora_trainer_batch_size")
            resolution = gr.Textbox(label="Resolution", elem_id="lora_trainer_resolution", info='"512" or "512,768"')
        with gr.Row():
            network_dim = gr.Number(label="Network dim (rank)", precision=0, elem_id="lora_trainer_dim")
            network_alpha = gr.Number(label="Network alpha", elem_id="lora_trainer_alpha")
            unet_lr = gr.Number(label="UNet learning rate", elem_id="lora_trainer_unet_lr")
            text_encoder_lr = gr.Number(label="Text encoder learning rate (0 = UNet only)", elem_id="lora_trainer_te_lr")
        with gr.Row():
            save_every = gr.Number(label="Save every N epochs", precision=0, elem_id="lora_trainer_save_every")
            sample_every = gr.Number(label="Sample every N epochs", precision=0, elem_id="lora_trainer_sample_every")
            sample_prompt = gr.Textbox(label="Sample prompt(s), one per line", lines=2, elem_id="lora_trainer_sample_prompt",
                                       placeholder="mychar, smiling --n blurry --s 20")
        with gr.Accordion("Advanced", open=False, elem_id="lora_trainer_advanced"):
            with gr.Row():
                optimizer = gr.Dropdown(list(OPTIMIZERS), label="Optimizer", allow_custom_value=True, elem_id="lora_trainer_optimizer")
                scheduler = gr.Dropdown(list(SCHEDULER_NAMES), label="LR scheduler", allow_custom_value=True,
                                        elem_id="lora_trainer_scheduler")  # an imported TOML may name any of sd-scripts'
            extra = gr.Textbox(label="More sd-scripts options (TOML lines or a JSON object)", lines=4, elem_id="lora_trainer_extra",
                               placeholder="noise_offset = 0.05\ncaption_dropout_rate = 0.05")
            with gr.Row():
                import_file = gr.File(label="Import Kohya TOML, Kohya GUI JSON or preset file", file_types=[".toml", ".json"],
                                      elem_id="lora_trainer_import")
                exported = gr.File(label="Exported", interactive=False, elem_id="lora_trainer_exported")
            with gr.Row():
                export_kohya = gr.Button("Export Kohya TOML", elem_id="lora_trainer_export_kohya")
                export_preset = gr.Button("Export preset file", elem_id="lora_trainer_export_preset")
                show_command = gr.Button("Show sd-scripts command", elem_id="lora_trainer_show_command")
            command = gr.Code(label="Equivalent sd-scripts command", language="shell", interactive=False, elem_id="lora_trainer_command")
            if services.settings.extras_folder is not None:  # the WebUI: extras go to the extension's private folder
                with gr.Row():
                    extras = gr.CheckboxGroup(list(EXTRAS), label="Optional trainer extras: "
                                              + "; ".join(f"{name} = {use}" for name, use in EXTRAS.items()),
                                              elem_id="lora_trainer_extras")
                    install = gr.Button("Install extras", elem_id="lora_trainer_install_extras")
        report = gr.Textbox(label="Dataset check", lines=8, max_lines=30, interactive=False, elem_id="lora_trainer_report")
        with gr.Row():
            validate_button = gr.Button("Validate", elem_id="lora_trainer_validate")
            start = gr.Button("Start", variant="primary", elem_id="lora_trainer_start")
            stop = gr.Button("Stop and save", elem_id="lora_trainer_stop")
            pause = gr.Button("Pause", elem_id="lora_trainer_pause")
            resume = gr.Button("Resume", elem_id="lora_trainer_resume")
            save_now = gr.Button("Save now", elem_id="lora_trainer_save_now")
            sample_now = gr.Button("Sample now", elem_id="lora_trainer_sample_now")
        message = gr.Markdown(elem_id="lora_trainer_message")
        with gr.Row():
            job = gr.Dropdown([], label="Job", allow_custom_value=True, elem_id="lora_trainer_job")
        progress = gr.Markdown(elem_id="lora_trainer_progress_text")
        bar = gr.HTML(elem_id="lora_trainer_progress")
        with gr.Row():
            plot = gr.HTML(loss_plot(LiveView()), label="Loss", elem_id="lora_trainer_loss")
            samples = gr.Gallery(label="Samples", columns=4, height=260, elem_id="lora_trainer_samples")
        with gr.Row():
            files = gr.Dropdown([], label="Saved files", elem_id="lora_trainer_files", allow_custom_value=True)
            send = gr.Button("Send to Prompt-Lora-Grid", elem_id="lora_trainer_send_to_grid", scale=0)
        jobs = gr.Dataframe(headers=JOB_COLUMNS, interactive=False, label="Jobs",
                            elem_id="lora_trainer_jobs")
        ended = gr.Textbox(visible=False, elem_id="lora_trainer_job_ended")

        form = [checkpoint, dataset, preset, tier, algorithm, output_name, epochs, batch_size, resolution, network_dim,
                network_alpha, unet_lr, text_encoder_lr, save_every, sample_every, sample_prompt, optimizer, scheduler, extra]
        preset_fields = [epochs, batch_size, resolution, network_dim, network_alpha, unet_lr, text_encoder_lr, save_every,
                         optimizer, scheduler]

        filled = gr.State(Filled())

        def filler(fill):
            def handler(checkpoint_value, name, tier_name, *values):
                *values, state = values
                changed = fill(services, {"checkpoint": checkpoint_value, "preset": name, "tier": tier_name,
                                          **dict(zip(PRESET_FIELDS, values))}, state)
                return [changed.get(field, gr.update()) for field in (*PRESET_FIELDS, "guidance")]
            return handler

        fill_inputs = [checkpoint, preset, tier, *preset_fields, filled]
        preset.change(filler(fill_for_preset), fill_inputs, preset_fields + [guidance])
        tier.change(filler(fill_for_tier), fill_inputs, preset_fields + [guidance])
        checkpoint.change(filler(fill_for_checkpoint), fill_inputs, preset_fields + [guidance])
        tab.load(filler(fill_at_page_load), fill_inputs, preset_fields + [guidance])
        refresh.click(lambda: gr.update(choices=checkpoint_choices(services)), None, checkpoint)
        check.click(lambda *v: check_dataset_text(services, _form(v)), form, report)
        validate_button.click(lambda *v: validation_text(services, _form(v)), form, message)

        picked = gr.State(Picked())

        def start_job(*values):
            *values, chosen = values
            text, job_id = submit(services, _form(values))
            if job_id:
                chosen.choose_job(job_label(services.store.get(job_id)))
            return text, job_id and job_label(services.store.get(job_id))

        start.click(start_job, [*form, picked], [message, job], **js_kwarg(_ASK_NOTIFICATION))
        # the user's picks (not the live view's own updates, which are no input)
        job.input(lambda label, chosen: chosen.choose_job(label), [job, picked], None)
        files.input(lambda path, chosen: setattr(chosen, "file", path), [files, picked], None)
        if services.settings.extras_folder is not None:
            install.click(lambda names: install_extras_text(services, names), extras, message)
        for button, action in ((stop, "stop"), (pause, "pause"), (resume, "resume"), (save_now, "save"), (sample_now, "sample")):
            def act(label, chosen, action=action):
                text, job_id = job_action(services, action, job_id_of(label))
                shown = services.store.get(job_id) if job_id else None
                if shown:
                    chosen.choose_job(job_label(shown))
                return text, job_label(shown) if shown else label
            button.click(act, [job, picked], [message, job])

        def export(kind, *values):
            form_values = _form(values)
            try:
                options, sdxl = job_options(services, form_values)
                folder = services.settings.data_folder / "exports"
                if kind == "command":
                    return gr.update(), *equivalent_command(options, sdxl)
                if kind == "kohya":
                    path = presets.export_kohya_toml(options, folder / f"{options['output_name']}.toml")
                else:
                    path = presets.write_preset_file(preset_file(form_values, options, sdxl),
                                                     folder / f"{options['output_name']}.preset.toml")
                return str(path), gr.update(), f"Written {path}"
            except UserError as error:
                return gr.update(), gr.update(), f"error: {error}"

        export_kohya.click(lambda *v: export("kohya", *v), form, [exported, command, message])
        export_preset.click(lambda *v: export("preset", *v), form, [exported, command, message])
        show_command.click(lambda *v: export("command", *v), form, [exported, command, message])

        def import_file_into_form(upload, name, state):
            values = import_into_form(upload.name if hasattr(upload, "name") else upload, name, services.settings)
            return [*values, filled_after_import(services, values, state)]

        # the Filled state last: the checkpoint change the import sets off reads it
        import_file.upload(import_file_into_form, [import_file, preset, filled],
                           [checkpoint, dataset, output_name, epochs, batch_size, resolution, network_dim, network_alpha,
                            unet_lr, text_encoder_lr, save_every, sample_every, optimizer, scheduler, algorithm,
                            sample_prompt, extra, message, filled])

        send.click(lambda path: "Sent to Prompt-Lora-Grid." if path else "Pick a saved file first.", files, message,
                   **js_kwarg(_SEND_TO_GRID))

        tab.load(lambda chosen: poll(services, views, chosen), picked,
                 [job, progress, bar, plot, samples, files, jobs, ended], show_progress="hidden", **poll_kwarg(1.0))
        ended.change(None, ended, None, **js_kwarg(_NOTIFY))
    return tab


# numbers the Kohya GUI saves as 0 for "off" and then leaves out of sd-scripts' command
_GUI_ZERO_IS_OFF = {"min_snr_gamma": "min_snr_gamma", "keep_tokens": "keep_tokens", "lr_warmup_steps": "lr_warmup",
                    "noise_offset": "noise_offset"}


def _gui_switched_off(data: dict, preset: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The options a Kohya GUI file sets off (a switch false, a number 0) that the preset would otherwise turn on at
    Start: the importer reads those values as unset, as the GUI leaves them out of its command."""
    from ...training.options import FIELDS

    off = {}
    for key in preset:
        field = FIELDS.get(key)
        if key in options or field is None:
            continue
        gui_key = _GUI_ZERO_IS_OFF.get(key, key)
        value = data.get(gui_key)
        if field.type in ("bool", "bool | None") and value is False:
            off[key] = False
        elif key in _GUI_ZERO_IS_OFF and value is not None and value != "" and float(value) == 0:
            off[key] = 0
    return off


# What an import fills, in this order (the components ``build`` wires to the upload)
IMPORTED_FIELDS = ("checkpoint", "dataset", "output_name", "epochs", "batch_size", "resolution", "network_dim",
                   "network_alpha", "unet_lr", "text_encoder_lr", "save_every_n_epochs", "sample_every_n_epochs",
                   "optimizer", "scheduler", "algorithm", "sample_prompt", "extra", "message")


def _imported_rates(options: dict[str, Any], rest: dict[str, Any]) -> tuple[Any, Any]:
    """The UNet and text-encoder fields as sd-scripts reads the file's rates: each part's own rate, else
    learning_rate; 0 for a part the file does not train. Taken out of Advanced where the fields hold them."""
    base = options.get("learning_rate")
    unet = options.get("unet_lr", base)
    unet = 0 if options.get("network_train_text_encoder_only") else base if unet is None else unet
    te = options.get("text_encoder_lr")
    if isinstance(te, list):
        if len(set(te)) > 1:  # one rate per SDXL text encoder: the one field cannot show both, Advanced keeps them
            rest["text_encoder_lr"] = te
            te = None
        te = te[0] if te else None
    elif te is None:
        te = base
    te = 0 if options.get("network_train_unet_only") else te
    for key in ("learning_rate", "network_train_unet_only", "network_train_text_encoder_only"):
        rest.pop(key, None)
    return unet, te


def _imported_prompts(rest: dict[str, Any]) -> str | None:
    """A .txt prompts file's lines for the Sample prompt field (taken out of Advanced); a .toml/.json one stays."""
    path = Path(str(rest.get("sample_prompts") or ""))
    if path.suffix.lower() != ".txt" or not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None
    del rest["sample_prompts"]
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def _folders_the_app_sets(options: dict[str, Any], settings: AppSettings | None) -> list[str]:
    """The file's output folder (every Kohya GUI save has one, often another machine's): the Lora folder decides
    where a job's files go, and Start refuses output_dir in Advanced. A logging_dir outside the folders this tab may
    write to would be refused too: both are left out, and said. Taken out of ``options``."""
    said = []
    output_dir = options.pop("output_dir", None)
    if output_dir:
        where = f"the Lora folder {settings.lora_folder}" if settings else "the Lora folder (the app's setting)"
        said.append(f"output_dir {output_dir} is not used: files go to {where}")
    logging_dir = options.get("logging_dir")
    if logging_dir and settings:
        try:
            allowed_path(logging_dir, settings.roots(), "logging_dir", must_exist=False)
        except UserError:
            del options["logging_dir"]
            said.append(f"logging_dir {logging_dir} is not used: it is outside the folders this tab may write to (for "
                        "TensorBoard logs, give one inside them in Advanced)")
    return said


def _steps_without_epochs(options: dict[str, Any]) -> str | None:
    """A file that counts steps (max_train_steps, no max_train_epochs): the Epochs field is cleared, as a number
    there would override the steps (sd-scripts' epochs win over steps), and the form's blank Epochs leaves the
    preset's out too."""
    if options.get("max_train_steps") and not options.get("max_train_epochs"):
        return (f"Epochs is cleared: the file counts max_train_steps = {options['max_train_steps']} (in Advanced), "
                "which a number of epochs would override")
    return None


def preset_file(form: dict[str, Any], options: dict[str, Any], sdxl: bool) -> presets.PresetFile:
    """The form's run as a preset file: its options without the folders, and without what the GPU memory tier and the
    base model filled in (where the run still has the tier's value and Advanced does not type it): the form the file
    is imported into fills those for its own card and model. A file exported at SDXL's 6 GB tier carried fp8,
    cached captions and 640 px into Advanced, which an SD 1.5 checkpoint then refused."""
    chosen, tier = form["preset"], form.get("tier") or presets.NO_TIER
    plain, tiered = presets.preset_options(chosen), presets.preset_options(chosen, tier, sdxl)
    filled = {name for name, value in tiered.items() if name not in plain or plain[name] != value}
    typed = parse_extra_options(form.get("extra") or "")
    kept = {name: value for name, value in options.items()
            if name not in ("pretrained_model_name_or_path", "train_data_dir", "output_dir", "sample_prompts")
            and not (name in filled and name not in typed and value == tiered[name])}
    return presets.PresetFile(form["output_name"], kept, presets.PRESETS[chosen].preferred_weight,
                              presets.PRESETS[chosen].guidance)


def import_into_form(path: str, preset: str = "character", settings: AppSettings | None = None) -> list[Any]:
    """An uploaded Kohya TOML, Kohya GUI settings (JSON) or our preset file → the form's fields (what does not fit
    a field goes to Advanced). A Kohya file's scheduler and optimizer left out are sd-scripts' defaults, as the file
    meant them; the ``preset``'s options it leaves out still apply, and are named. ``settings``: the app's (its Lora
    folder, where the files go instead of the file's output_dir)."""
    notes: list[str] = []
    shown = {"pretrained_model_name_or_path", "train_data_dir", "output_name", "max_train_epochs", "train_batch_size",
             "resolution", "network_dim", "network_alpha", "unet_lr", "text_encoder_lr", "save_every_n_epochs",
             "sample_every_n_epochs", "optimizer_type", "lr_scheduler"}
    added = {}
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
        if "[options]" in text:
            options, switches = presets.without_tier_switches(presets.read_preset_file(path).options)
            if switches:  # the form's tier fills them for its own card and checkpoint
                notes.append(f"tier: it carries a GPU memory tier's switches ({', '.join(switches)}), which are left "
                             "out: the GPU memory tier chosen here sets them")
        else:
            imported = presets.import_kohya_toml(path, notes)
            if set(imported) == {"dataset_config"}:  # a dataset TOML: the Dataset field's, the rest of the form as it is
                return ([gr.update()] + [imported["dataset_config"]] + [gr.update()] * (len(IMPORTED_FIELDS) - 3)
                        + [f"Imported {Path(path).name} as the Dataset: its subsets name the image folders."])
            options = {"lr_scheduler": "constant", "optimizer_type": "AdamW", **imported}
            if Path(path).suffix.lower() == ".json":  # the GUI's own settings: what it set off stays off
                options |= _gui_switched_off(json.loads(text), presets.preset_options(preset), options)
            added = {k: v for k, v in presets.preset_options(preset).items()  # those that change something
                     if k not in options and k not in shown | {"learning_rate"}  # its rate shows in the UNet field
                     and getattr(DEFAULTS, k, None) != v}
    except UserError as error:
        return [gr.update()] * (len(IMPORTED_FIELDS) - 1) + [f"error: {error}"]
    from ... import toml_text

    set_by_the_app = _folders_the_app_sets(options, settings)
    steps_only = _steps_without_epochs(options)
    # Advanced is applied last and wins, so what a field shows must not also stay there: a later edit of the field
    # would be overridden by the file's value
    rest = {k: v for k, v in options.items() if k not in shown and v is not None}
    unet, te = _imported_rates(options, rest)
    algorithm, network_args = algorithm_of(options.get("network_module"), options.get("network_args"),
                                           options.get("network_dim"), options.get("network_alpha"))
    if algorithm:
        rest.pop("network_module", None)
        rest.pop("network_args", None)
        if network_args:
            rest["network_args"] = network_args
    prompts = _imported_prompts(rest)
    dataset = rest.pop("dataset_config", None) or options.get("train_data_dir")  # a dataset TOML goes in the field too
    values = [options.get("pretrained_model_name_or_path"), dataset, options.get("output_name"),
              options.get("max_train_epochs"), options.get("train_batch_size"), options.get("resolution"),
              options.get("network_dim"), options.get("network_alpha"), unet, te, options.get("save_every_n_epochs"),
              options.get("sample_every_n_epochs"), options.get("optimizer_type"), options.get("lr_scheduler"),
              algorithm, prompts]
    said = "".join(f" {note.split(': ', 1)[-1]}." for note in notes)  # what it holds that is not carried over
    said += "".join(f" {sentence}." for sentence in [*set_by_the_app, steps_only] if sentence)
    if not algorithm:
        said += (f" Its network ({options['network_module']}) is no Algorithm choice: it stays in Advanced, which decides "
                 "over the Algorithm buttons.")
    if added:  # the form trains with its preset's options where the file has none
        said += (f" The {preset} preset adds what the file leaves out: "
                 + ", ".join(f"{k} = {v!r}" for k, v in added.items()) + " (change them in Advanced).")
    shown_values = [gr.update() if v is None else v for v in values]
    if steps_only:
        shown_values[IMPORTED_FIELDS.index("epochs")] = gr.update(value=None)
    return shown_values + [toml_text.dumps(rest), f"Imported {Path(path).name}.{said}"]
