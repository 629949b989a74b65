"""The Train form as plain data: what the user typed → sd-scripts option values, the one dict ``options_from``
checks and the job runner runs. Pure, so the form's meaning is tested without a browser."""

from __future__ import annotations

import json
from typing import Any

from .. import toml_text
from ..errors import UserError
from ..dataset.captions import VARYING_CAPTION_OPTIONS
from .presets import NO_TIER, preset_options, unet_only_tier

# The algorithm choice as sd-scripts and LyCORIS spell it: (network_module, network_args).
ALGORITHMS: dict[str, tuple[str, list[str]]] = {
    "LoRA": ("networks.lora", []),
    "LoCon": ("lycoris.kohya", ["algo=locon"]),
    "LoHa": ("lycoris.kohya", ["algo=loha"]),
    "LoKr": ("lycoris.kohya", ["algo=lokr"]),
    "DyLoRA": ("networks.dylora", []),
    "DoRA": ("lycoris.kohya", ["algo=lora", "dora_wd=True", "preset=attn-mlp"]),  # the layers LoRA trains (+ time embedding)
}
CONV_ALGORITHMS = ("LoCon", "LoHa", "LoKr")  # these also train the ResBlock convolutions

# Form field → option name, for the fields that map one to one (blank = keep the preset's value).
_DIRECT = {
    "checkpoint": "pretrained_model_name_or_path", "dataset": "train_data_dir", "output_name": "output_name",
    "epochs": "max_train_epochs", "batch_size": "train_batch_size", "resolution": "resolution",
    "network_dim": "network_dim", "network_alpha": "network_alpha", "save_every_n_epochs": "save_every_n_epochs",
    "sample_every_n_epochs": "sample_every_n_epochs", "optimizer": "optimizer_type", "scheduler": "lr_scheduler",
    "seed": "seed",
}
_INTEGERS = {"max_train_epochs", "train_batch_size", "network_dim", "save_every_n_epochs", "sample_every_n_epochs", "seed"}


def parse_extra_options(text: str) -> dict[str, Any]:
    """The Advanced box: sd-scripts options as TOML (``key = value`` lines) or a JSON object."""
    text = (text or "").strip()
    if not text:
        return {}
    try:
        values = json.loads(text) if text.startswith("{") else toml_text.loads(
            text, "Advanced options", "; write one option per line, e.g. noise_offset = 0.05")
    except json.JSONDecodeError as error:
        raise UserError(f"Advanced options: not valid JSON ({error}); write one option per line, e.g. "
                        "noise_offset = 0.05") from None
    if not isinstance(values, dict) or any(isinstance(v, dict) for v in values.values()):
        raise UserError("Advanced options: give plain option = value lines, without [tables]")
    return values


def _number(value: Any, name: str, integer: bool) -> int | float | None:
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}: {value!r} is not a number") from None
    if integer:
        if number != int(number):
            raise UserError(f"{name}: {value!r} must be a whole number")
        return int(number)
    return number


def form_to_options(form: dict[str, Any], preset: str, tier: str = NO_TIER, sdxl: bool = False) -> dict[str, Any]:
    """Preset (+ VRAM tier) first, then the main fields, the algorithm, the learning rates and finally the
    Advanced box, each overriding what came before. Blank fields keep the preset's value."""
    options = preset_options(preset, tier, sdxl)
    extra = parse_extra_options(form.get("extra", ""))
    for field, name in _DIRECT.items():
        value = form.get(field)
        if value in (None, ""):
            continue
        if name in _INTEGERS or name == "network_alpha":
            value = _number(value, field, integer=name in _INTEGERS)
        options[name] = str(value).strip() if isinstance(value, str) else value
    if options.get("lr_scheduler") == "constant":  # the one schedule without warm-up; the preset's warm-up goes
        options.pop("lr_warmup_steps", None)
    if isinstance(options.get("resolution"), (int, float)):
        options["resolution"] = str(int(options["resolution"]))
    _fit_buckets(options)
    unet_lr = _number(form.get("unet_lr"), "UNet learning rate", integer=False)
    text_encoder_lr = _number(form.get("text_encoder_lr"), "text encoder learning rate", integer=False)
    if unet_lr == 0 and text_encoder_lr == 0:
        raise UserError("UNet and text encoder learning rates are both 0: nothing would train; give one of them a rate",
                        "unet_lr")
    if unet_lr == 0:  # 0 means "do not train the UNet", as in Kohya's GUI (its rate trained the modules at 0)
        options.pop("unet_lr", None)
        options["network_train_text_encoder_only"] = True
        options["network_train_unet_only"] = False
    elif unet_lr is not None:
        options["unet_lr"] = options["learning_rate"] = unet_lr
    if text_encoder_lr is not None:
        if text_encoder_lr == 0:  # 0 means "do not train the text encoder", as in Kohya's GUI
            options.pop("text_encoder_lr", None)
            options["network_train_unet_only"] = True
        else:
            options["text_encoder_lr"] = [text_encoder_lr]
            # an SDXL tier below 16 GB trains the UNet only, whatever rate the preset filled in (Validate says so)
            options["network_train_unet_only"] = (unet_only_tier(tier, sdxl) and not options.get(
                "network_train_text_encoder_only") and not extra.get("network_train_text_encoder_only"))
    algorithm = form.get("algorithm") or "LoRA"
    if algorithm not in ALGORITHMS:
        raise UserError(f"algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    module, args = ALGORITHMS[algorithm]
    options["network_module"] = module
    network_args = list(args)
    if algorithm in CONV_ALGORITHMS:
        dim, alpha = int(options.get("network_dim") or 4), float(options.get("network_alpha") or 1)
        network_args += [f"conv_dim={max(1, dim // 2)}", f"conv_alpha={max(1.0, alpha / 2):g}"]
    if algorithm == "DyLoRA":
        dim = int(options.get("network_dim") or 4)  # the rank must be a multiple of the unit (sd-scripts asserts it)
        network_args.append(f"unit={next(unit for unit in (4, 3, 2, 1) if dim % unit == 0)}")
    # Advanced's network_args refine the algorithm's (conv_dim=8, rank_dropout=0.1, …); with its own network_module,
    # Advanced names the whole network
    more = _listed(extra.pop("network_args", None))
    network_args = more if extra.get("network_module") else merged_network_args(network_args, more)
    options["network_args"] = network_args or None
    if form.get("sample_prompts"):
        options["sample_prompts"] = form["sample_prompts"]
    if extra.get("text_encoder_lr") and "network_train_unet_only" not in extra:  # Advanced's rate wins, so it trains
        options["network_train_unet_only"] = False
    if form.get("epochs") in (None, "") and extra.get("max_train_steps"):  # steps counted in Advanced: the preset's
        options.pop("max_train_epochs", None)  # epochs would override them (sd-scripts' epochs win)
    options.update(extra)
    if "cache_text_encoder_outputs" not in extra and options.get("cache_text_encoder_outputs") and (
            not options.get("network_train_unet_only") or any(options.get(name) for name in VARYING_CAPTION_OPTIONS)):
        del options["cache_text_encoder_outputs"]  # the tier's caching gives way to a trained text encoder or varied
        # captions asked for (Validate's estimate says what that costs); the preset's own caption options, which the
        # caching had set aside, come back with it
        preset_captions = preset_options(preset)
        for name in VARYING_CAPTION_OPTIONS:
            if name in preset_captions and name not in extra:
                options[name] = preset_captions[name]
    return {k: v for k, v in options.items() if v is not None}


def _listed(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)] if value else []


def _arg_key(arg: str) -> str:
    return arg.split("=", 1)[0].strip()


def _normal_arg(arg: str) -> str:
    key, _, value = str(arg).partition("=")
    return f"{key.strip()}={value.strip()}".lower()


def merged_network_args(base: list[str], more: list[str]) -> list[str]:
    """``base``'s key=value items, each replaced by ``more``'s item of the same key; ``more``'s other items after."""
    given = {_arg_key(arg): arg for arg in more}
    return [given.pop(_arg_key(arg), arg) for arg in base] + list(given.values())


def algorithm_of(module: str | None, args: list[str] | None, dim: Any = None, alpha: Any = None) -> tuple[str | None, list[str]]:
    """The Algorithm choice a Kohya file's network_module and network_args make, and the args it leaves to Advanced
    (None when no choice matches: the file's module and args then stay in Advanced, which wins). The defaults the
    choice would change are kept as the file meant them: LyCORIS's convolutions at the network's dim and alpha,
    sd-scripts' DyLoRA unit 1."""
    module = module or "networks.lora"
    given = _listed(args)
    normal = {_normal_arg(arg) for arg in given}
    for name, (own_module, own_args) in reversed(ALGORITHMS.items()):  # DoRA (algo=lora + dora_wd) before LoRA
        own = {_normal_arg(arg) for arg in own_args}
        if own_module != module or not own <= normal:
            continue
        rest = [arg for arg in given if _normal_arg(arg) not in own]
        keys = {_arg_key(arg) for arg in rest}
        if name in CONV_ALGORITHMS and "conv_dim" not in keys:
            rest.append(f"conv_dim={int(float(dim or 4))}")
        if name in CONV_ALGORITHMS and "conv_alpha" not in keys:
            rest.append(f"conv_alpha={float(alpha or 1):g}")
        if name == "DyLoRA" and "unit" not in keys:
            rest.append("unit=1")
        return name, rest
    return None, given


def _fit_buckets(options: dict[str, Any]) -> None:
    """Keep the preset's bucket range around the chosen resolution (sd-scripts refuses a minimum above it)."""
    if not options.get("enable_bucket") or not options.get("resolution"):
        return
    try:
        sides = [int(v) for v in str(options["resolution"]).split(",")]
    except ValueError:
        return  # options_from names the bad resolution
    options["min_bucket_reso"] = min(options.get("min_bucket_reso", 256), min(sides))
    options["max_bucket_reso"] = max(options.get("max_bucket_reso", 1024), max(sides))
