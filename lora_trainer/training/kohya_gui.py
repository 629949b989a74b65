"""The Kohya GUI's saved LoRA settings (bmaltais/kohya_ss, "Save config": its own JSON, not sd-scripts' TOML) as
sd-scripts options, the way the GUI turns them into the TOML it hands sd-scripts: so a GUI user's ``.json`` runs
here as it ran there.

Pure data in, data out: ``options_from_gui`` returns the options and says what it left out in ``notes``; the GUI's
``additional_parameters`` (command-line text) is read by the caller, with the command line's parser.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from ..networks.spec import READ_BY

# The GUI's LoRA types for SD1/SD2/SDXL and the network each trains (lora_gui.py).
_LYCORIS_ALGOS = {"LoCon": "locon", "LyCORIS/LoCon": "locon", "LyCORIS/LoHa": "loha", "LyCORIS/LoKr": "lokr",
                  "LyCORIS/iA3": "ia3", "LyCORIS/DyLoRA": "dylora", "LyCORIS/GLoRA": "glora",
                  "LyCORIS/Diag-OFT": "diag-oft", "LyCORIS/BOFT": "boft", "LyCORIS/Native Fine-Tuning": "full"}
# the LyCORIS arguments the GUI passes, by the GUI's field name (those it passes with another name are mapped)
_LYCORIS_FIELDS = {"locon": ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "module_dropout", "use_scalar",
                             "dora_wd", "bypass_mode", "train_norm"),
                   "loha": ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "module_dropout", "use_scalar",
                            "dora_wd", "bypass_mode", "train_norm"),
                   "lokr": ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "module_dropout", "use_scalar",
                            "dora_wd", "bypass_mode", "train_norm", "factor", "use_cp", "decompose_both"),
                   "ia3": ("conv_dim", "conv_alpha"),
                   "dylora": ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "module_dropout", "train_norm"),
                   "glora": ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "module_dropout", "train_norm"),
                   "diag-oft": ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "module_dropout", "train_norm",
                                "constraint", "rescaled"),
                   "boft": ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "module_dropout", "train_norm"),
                   "full": ("rank_dropout", "module_dropout", "train_norm")}
_KOHYA_BLOCK_FIELDS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                       "block_alphas", "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout")
_LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
# GUI field → sd-scripts option, where the names differ
_RENAMED = {"optimizer": "optimizer_type", "max_resolution": "resolution", "lora_network_weights": "network_weights"}
# the GUI's own fields, consumed above or meaningless to sd-scripts: never an option
_GUI_ONLY = {"LoRA_type", "LyCORIS_preset", "model_list", "sdxl", "sdxl_no_half_vae", "sdxl_cache_text_encoder_outputs",
             "xformers", "lr_warmup", "epoch", "noise_offset_type", "num_cpu_threads_per_process", "additional_parameters",
             "stop_text_encoder_training", "stop_text_encoder_training_pct", "unit", "factor", "use_cp", "use_tucker",
             "use_scalar", "decompose_both", "conv_dim", "conv_alpha", "constrain", "rescaled", "train_on_input",
             "rank_dropout_scale", "dora_wd", "bypass_mode", "train_norm", "sample_prompts", "use_wandb", "use_8bit_adam",
             "flux1_checkbox", "sd3_checkbox", *_KOHYA_BLOCK_FIELDS, *_LORAPLUS}
# Fields lora_gui.py passes only with its Flux.1 checkbox ticked (train_model: ``x if flux1_checkbox else None``): a
# value left from ticking it once stays in every later save, and an SD/SDXL run never gets it
_FLUX_ONLY = ("fp8_base_unet", "cpu_offload_checkpointing", "split_mode", "t5xxl_max_token_length", "guidance_scale",
              "mem_eff_save", "apply_t5_attn_mask", "blocks_to_swap", "single_blocks_to_swap", "double_blocks_to_swap",
              "discrete_flow_shift", "model_prediction_type", "timestep_sampling", "ae", "clip_l", "t5xxl", "model_type",
              "flux1_cache_text_encoder_outputs", "flux1_cache_text_encoder_outputs_to_disk")
# what an early GUI's LoRA tab saved before it had LoRA_type (v21.1 and older), and its DreamBooth tab never saves
_EARLY_LORA_FIELDS = {"network_dim", "network_alpha", "lora_network_weights"}


def is_gui_config(data: dict) -> bool:
    """A Kohya GUI LoRA settings file: every version since v21.2 saves its LoRA type; the older ones have the
    network's fields beside the GUI's own max_resolution (sd-scripts' options have neither name)."""
    early = _EARLY_LORA_FIELDS & data.keys() and {"max_resolution", "lora_network_weights"} & data.keys()
    return "LoRA_type" in data or bool(early)


def _set(value: Any) -> bool:
    """The GUI drops "", False, None and 0 before it writes the TOML (``value not in ["", False, None]``, after its
    int() of the numbers it keeps as text, such as "0" for keep_tokens or seed)."""
    if isinstance(value, str):
        try:
            return float(value) != 0
        except ValueError:
            return value != ""
    return value is not None and value is not False and not (isinstance(value, (int, float)) and value == 0)


def _number(value: Any) -> float:
    try:
        return float(value) if value not in ("", None) else 0.0
    except (TypeError, ValueError):
        raise UserError(f"the Kohya GUI value {value!r} is not a number") from None


def options_from_gui(data: dict, notes: list[str], source: str = "Kohya GUI config") -> dict[str, Any]:
    """The sd-scripts options the GUI would write for ``data``; ``notes`` gain what is not carried over."""
    from .options import FIELDS, FOREIGN

    if data.get("flux1_checkbox") or data.get("sd3_checkbox"):
        model = "Flux.1 (flux1_checkbox)" if data.get("flux1_checkbox") else "SD3 (sd3_checkbox)"
        raise UserError(f"{source}: saved for {model}, which the GUI trains with its own script; only SD1, SD2 and "
                        "SDXL are trained here (untick it in the GUI and save again to train an SD/SDXL model)")
    if "LoRA_type" not in data:  # update_my_data: the GUI opens such a file as Standard
        notes.append(f"{source}: no LoRA_type (an early Kohya GUI's file): trained as a Standard LoRA, as the GUI opens it")
    lora_type = data.get("LoRA_type") or "Standard"
    sdxl = bool(data.get("sdxl"))
    flux_only = sorted(k for k in _FLUX_ONLY if _set(data.get(k)))
    if flux_only:
        notes.append(f"{source}: {', '.join(flux_only)} {'is a Flux.1 setting' if len(flux_only) == 1 else 'are Flux.1 settings'}"
                     ", which the GUI passes only with flux1_checkbox ticked: not carried over")
    data = {k: v for k, v in data.items() if k not in _FLUX_ONLY}
    options_like = FIELDS.keys() | FOREIGN | _RENAMED.keys()  # checked as a TOML's are (FOREIGN: refused by name)
    options = {_RENAMED.get(k, k): v for k, v in data.items() if k not in _GUI_ONLY and k in options_like and _set(v)}
    left = sorted(k for k, v in data.items() if k not in _GUI_ONLY and k not in options_like and _set(v))
    if left:
        notes.append(f"{source}: {', '.join(left)} {'is' if len(left) == 1 else 'are'} the GUI's own, not carried over")
    if "optimizer" not in data:  # update_my_data: the GUI's optimizer choice replaced its use_8bit_adam switch (v21.2)
        options["optimizer_type"] = "AdamW8bit" if data.get("use_8bit_adam") else "AdamW"
    options.update(_network(lora_type, data, source, notes))

    kind = data.get("noise_offset_type", "Original")  # one noise kind is passed, the other's fields are left
    unused = ("multires_noise_iterations", "multires_noise_discount") if kind == "Original" else \
             ("noise_offset", "adaptive_noise_scale", "noise_offset_random_strength")
    for name in unused:
        options.pop(name, None)
    attention = data.get("xformers")
    if attention in ("xformers", True):
        options["xformers"] = True
    elif attention == "sdpa":
        options["sdpa"] = True
    if sdxl and data.get("sdxl_no_half_vae"):
        options["no_half_vae"] = True
    if sdxl and data.get("sdxl_cache_text_encoder_outputs"):
        options["cache_text_encoder_outputs"] = True

    no_count = not _set(data.get("max_train_epochs")) and not _set(data.get("max_train_steps")) and _set(data.get("epoch"))
    if no_count and _set(data.get("dataset_config")):  # lora_gui.py passes no count then: sd-scripts' 1600 steps
        notes.append(f"{source}: epoch is not carried over: with a dataset_config the GUI passes sd-scripts neither "
                     "max_train_steps nor max_train_epochs, so it trains its default 1600 steps; set max_train_epochs "
                     "to train by epochs")
    elif no_count:
        # The GUI counted max_train_steps itself then (lora_gui.py: Σ repeats × images / batch / accumulation × epoch,
        # × 2 with reg_data_dir), from the folder as it was at its Start. Not copied: the folder is read here later,
        # maybe another (the command line's --train_data_dir, the Train tab's Dataset field), or not there at all
        options["max_train_epochs"] = epochs = int(_number(data["epoch"]))
        notes.append(f"{source}: epoch = {epochs} trains {epochs} whole epochs (max_train_epochs); the GUI passed "
                     "max_train_steps counted from the folder's images instead (× 2 with reg_data_dir), which stops "
                     "some batches short of them when the images fall into several buckets; set max_train_steps to "
                     "train a fixed number of steps")
    if "lr_scheduler_num_cycles" in data and not _set(data.get("lr_scheduler_num_cycles")) and _set(data.get("epoch")):
        options["lr_scheduler_num_cycles"] = int(_number(data["epoch"]))  # the GUI's default: one cycle per epoch
    if data.get("lr_scheduler", "constant") == "constant":  # the GUI zeroes (and locks) the warm-up for it
        options.pop("lr_warmup_steps", None)
    elif not _set(data.get("lr_warmup_steps")) and _number(data.get("lr_warmup")):
        options["lr_warmup_steps"] = f"{_number(data['lr_warmup']):g}%"  # a share of the steps, 100% too
    for name in ("optimizer_args", "lr_scheduler_args"):  # one text field in the GUI, a list for sd-scripts
        if isinstance(options.get(name), str):
            options[name] = options[name].replace('"', "").split()

    te_lr, unet_lr = _number(data.get("text_encoder_lr")), _number(data.get("unet_lr"))
    options.pop("text_encoder_lr", None)
    if te_lr:
        options["text_encoder_lr"] = [te_lr]
    if "text_encoder_lr" in data and "unet_lr" in data:  # a rate of 0 leaves that part untrained, in the GUI
        options["network_train_unet_only"] = te_lr == 0 and unet_lr != 0
        options["network_train_text_encoder_only"] = te_lr != 0 and unet_lr == 0

    algo = _LYCORIS_ALGOS.get(lora_type)
    if algo not in (None, "locon", "dylora") and options.pop("network_dropout", None) is not None:
        notes.append(f"{source}: network_dropout is not carried over (LyCORIS's {algo} has no neuron dropout, so it did "
                     "nothing there)")
    if lora_type == "Kohya DyLoRA" and options.pop("network_dropout", None) is not None:
        notes.append(f"{source}: network_dropout is not carried over (sd-scripts' networks.dylora has no dropout, so it "
                     "did nothing there)")
    for name in ("stop_text_encoder_training_pct", "use_wandb"):  # sample_prompts: gui_settings_options writes them
        if _set(data.get(name)):
            notes.append(f"{source}: {name} is not carried over ({_WHY[name]})")
    return _as_numbers(options, source)


def _as_numbers(options: dict[str, Any], source: str) -> dict[str, Any]:
    """The GUI saves many numbers as text (seed "1234", clip_skip "2"): as numbers where the option is one, so they
    read as numbers wherever the options go (the Train tab's Advanced box shows them as TOML). A text that is no
    number stays as written, for the options' check to name."""
    from .options import FIELDS, _normalised

    numbers = {k: v for k, v in options.items() if isinstance(v, str) and k in FIELDS
               and FIELDS[k].type in ("int", "int | None", "float", "float | None")}
    for name, value in numbers.items():
        try:
            options[name] = _normalised(name, value, source)
        except UserError:
            pass
    return options


_WHY = {"stop_text_encoder_training_pct": "sd-scripts' LoRA training has no such option",
        "use_wandb": "wandb is not supported here; TensorBoard logs are written with --logging_dir"}


def _network(lora_type: str, data: dict, source: str, notes: list[str]) -> dict[str, Any]:
    """network_module and network_args for the GUI's LoRA type, built as lora_gui.py builds them."""
    if lora_type in _LYCORIS_ALGOS:
        algo = _LYCORIS_ALGOS[lora_type]
        args = [f"preset={data.get('LyCORIS_preset') or 'full'}", f"algo={algo}"]
        gui_field = {"constraint": "constrain"}  # the GUI's field name for LyCORIS's constraint
        values = {name: data.get(gui_field.get(name, name)) for name in _LYCORIS_FIELDS[algo]}
        if algo in ("loha", "dylora") and "use_tucker" not in data and _truthy(data.get("use_cp")):
            # a GUI before use_tucker (v21.x) passed use_cp=… for LoHa and DyLoRA, LyCORIS's Tucker switch
            if algo == "loha":
                values["use_tucker"] = True
                notes.append(f"{source}: use_cp = true is LyCORIS's Tucker switch, which this GUI version passed for "
                             "LoHa: trained with use_tucker=True")
            else:
                notes.append(f"{source}: use_cp = true is not carried over: LyCORIS's DyLoRA has no Tucker form and "
                             "ignored it")
        args += [f"{name}={value}" for name, value in values.items() if value not in ("", None)]
        if algo == "dylora" and _set(data.get("unit")):
            args.append(f"block_size={data['unit']}")
        return {"network_module": "lycoris.kohya", "network_args": args + _loraplus(data)}
    if lora_type in ("Standard", "Kohya LoCon"):
        args = [f"conv_dim={data.get('conv_dim', 1)}", f"conv_alpha={data.get('conv_alpha', 1)}"] if lora_type == "Kohya LoCon" else []
        args += [f"{name}={data[name]}" for name in _KOHYA_BLOCK_FIELDS if _set(data.get(name))]
        return {"network_module": "networks.lora", "network_args": args + _loraplus(data)}
    if lora_type == "Kohya DyLoRA":
        given = [name for name in ("conv_dim", "conv_alpha", *_KOHYA_BLOCK_FIELDS, "unit") if _set(data.get(name))]
        unread = [name for name in given if name not in READ_BY["networks.dylora"]]
        if unread:  # the GUI passes Standard LoRA's block and dropout fields to DyLoRA too
            notes.append(f"{source}: {', '.join(unread)} {'is' if len(unread) == 1 else 'are'} not carried over: "
                         f"sd-scripts' networks.dylora does not read {'it' if len(unread) == 1 else 'them'}, so "
                         f"{'it' if len(unread) == 1 else 'they'} changed nothing there")
        args = [f"{name}={data[name]}" for name in given if name not in unread]
        return {"network_module": "networks.dylora", "network_args": args + _loraplus(data)}
    raise UserError(f"{source}: LoRA_type {lora_type!r} is not trained here (SD1/SD2/SDXL LoRA types: Standard, "
                    f"Kohya LoCon, Kohya DyLoRA, {', '.join(_LYCORIS_ALGOS)})")


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _loraplus(data: dict) -> list[str]:
    return [f"{name}={data[name]}" for name in _LORAPLUS if _set(data.get(name))]
