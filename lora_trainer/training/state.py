"""Saving and resuming a run: network weights, optimizer, scheduler, random streams and the position in the data.

A state folder holds ``model.safetensors`` (the network, training dtype, no metadata, as sd-scripts'),
``train_state.pt`` (optimizer, scheduler, generators, position) and ``train_state.json`` (sd-scripts'
``{"current_epoch", "current_step"}``). It is written into a temporary folder and renamed into place, so a
crash during the save leaves the previous state intact.

sd-scripts' own ``--save_state`` folders (accelerate's) hold the network and ``train_state.json`` too; a run resumes
from them with the network's weights and the step count, and for networks.lora/dylora with the optimizer's moments:
``optimizer.bin`` lists them by the position of each parameter in sd-scripts' module order, which
``sd_scripts_parameter_key`` reproduces (a wrong guess would hand them to another layer of the same shape, so other
network modules start the optimizer afresh). Their scheduler follows from the step; ``random_states_0.pkl`` is a
pickle (unsafe to load) and is not read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import UserError
from ..safe_io import FOLDER_RETRY_SECONDS, HeldFile, replace_path, save_safetensors


def staging_folder(folder: Path) -> Path:
    """Where a state is written before it replaces ``folder``, so that a kill mid-save leaves the previous one."""
    return folder.with_name(folder.name + ".tmp")


def save_state(folder: Path, network, optimizer, scheduler, generator: torch.Generator, run_state,
               facts: dict[str, int | str] | None = None) -> Path:
    """``facts``: what fixed the run's data order (its seed, images, batches per epoch, resolution, accumulation)
    and its optimizer, for ``saved_facts``; kept in train_state.json beside sd-scripts' two keys, which is all
    sd-scripts reads of it."""
    folder = Path(folder)
    temporary = staging_folder(folder)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        save_safetensors(network.state_dict(), temporary / "model.safetensors")  # readable as the LoRA files are
        torch.save({
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": _numpy_state(),
            "run": dataclasses.asdict(run_state),
        }, temporary / "train_state.pt")
        (temporary / "train_state.json").write_text(
            json.dumps({"current_epoch": run_state.current_epoch, "current_step": run_state.step, **(facts or {})}),
            encoding="utf-8")
        for file in temporary.iterdir():
            with open(file, "rb+") as handle:
                os.fsync(handle.fileno())
    except BaseException:  # a full disk or a kill: the half-written folder goes, the previous state stays
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    old = folder.with_name(folder.name + ".old")
    moved_aside = False
    try:
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            replace_path(folder, old, FOLDER_RETRY_SECONDS)
            moved_aside = True
        replace_path(temporary, folder, FOLDER_RETRY_SECONDS)
    except PermissionError as error:  # a file in it held open (an antivirus scan): the previous state stays in place
        shutil.rmtree(temporary, ignore_errors=True)
        kept = "the previous state is kept"
        if moved_aside:
            try:
                replace_path(old, folder, FOLDER_RETRY_SECONDS)
            except PermissionError:
                kept = f"the previous state is kept as {old.name} (rename it back to {folder.name} to resume from it)"
        raise HeldFile(f"the state {folder.name} could not be put in place ({error.strerror}): another program holds a "
                       f"file in it (an antivirus scan?); {kept}") from error
    shutil.rmtree(old, ignore_errors=True)
    return folder


_FACT_TYPES = {"seed": int, "images": int, "batches_per_epoch": int, "optimizer": str, "resolution": str,
               "lr_scheduler": str, "total_steps": int,
               "gradient_accumulation_steps": int, "processes": int, "train_batch_size": int}


def saved_facts(folder: Path) -> dict[str, int | str]:
    """The ``facts`` a state of ours was saved with ({} for sd-scripts' states and older ones of ours)."""
    try:
        saved = json.loads((Path(folder) / "train_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {key: saved[key] for key, kind in _FACT_TYPES.items() if isinstance(saved.get(key), kind)}


def _numpy_state() -> list:
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(position), int(has_gauss), float(gauss)]


SD_SCRIPTS_NETWORK_FILES = ("model.safetensors", "pytorch_model.bin")  # accelerate's names, newer and older


def readable_state(folder: Path) -> Path:
    """``folder``, or the state it held before a save replacing it was cut off between its two renames (``save_state``):
    then only ``<folder>.old`` is left whole."""
    folder = Path(folder)
    old = folder.with_name(folder.name + ".old")
    if not folder.exists() and (old / "model.safetensors").is_file() and (old / "train_state.pt").is_file():
        return old
    return folder


def state_kind(folder: Path) -> str:
    """"ours" or "sd-scripts" (a ``--save_state`` folder of sd-scripts); anything else is refused with what it lacks."""
    folder = readable_state(folder)
    if folder.is_file():
        raise UserError(_not_a_folder(folder))
    if not folder.is_dir():
        raise UserError(f"--resume {folder}: no such folder; give a state folder a run saved (name-000001-state, "
                        "name-state …)")
    if (folder / "model.safetensors").is_file() and (folder / "train_state.pt").is_file():
        return "ours"
    if (folder / "train_state.json").is_file() and any((folder / name).is_file() for name in SD_SCRIPTS_NETWORK_FILES):
        return "sd-scripts"
    raise UserError(f"--resume {folder}: not a state folder (ours holds model.safetensors and train_state.pt, "
                    "sd-scripts' model.safetensors and train_state.json); a network file can be continued with "
                    "--network_weights instead")


def _not_a_folder(file: Path) -> str:
    """What a file given to --resume is, and what to give instead: its state folder, or --network_weights."""
    try:
        state_kind(file.parent)
        return f"--resume {file}: a file inside a state folder; give its folder, {file.parent}"
    except UserError:
        pass
    if file.suffix.lower() == ".safetensors":
        # a state saved beside its network file is named as it plus -state (outputs.state_name); jobs keep theirs in
        # their own folder, and --state_dir elsewhere: named only where it is
        state = file.with_name(file.stem + "-state")
        instead = f" (or give its state folder, {state})" if state.is_dir() else ""
        return f"--resume {file}: a network file: continue it with --network_weights {file}{instead}"
    return (f"--resume {file}: not a state folder, but a file; give a state folder a run saved (name-000001-state, "
            "name-state …)")


# Where sd-scripts' networks.lora puts each layer's parameters in its optimizer: module by module as its models register
# their layers (torch's named_modules), text encoders first, lora_down before lora_up. accelerate's optimizer.bin numbers
# the moments in that order, so a rank per name part sorts Kohya names into it. Checked against the orders sd-scripts
# gives for SD1.5, SD2 and SDXL, with and without conv_dim (tests/data/sd-scripts-optimizer-order.json.gz).
_REGISTRATION_RANK = {
    "te": 0, "te1": 0, "te2": 1, "unet": 2,
    # transformers' CLIP text model
    "text_model": 0, "encoder": 0, "layers": 0, "self_attn": 0, "mlp": 1,
    "k_proj": 0, "v_proj": 1, "q_proj": 2, "out_proj": 3, "fc1": 0, "fc2": 1,
    # sd-scripts' SD1/SD2 UNet: diffusers' layout, its mid block registered after the up blocks
    "conv_in": -2, "time_embedding": -1, "linear_1": 0, "linear_2": 1, "conv_out": 3,  # LyCORIS's presets reach these
    "down_blocks": 0, "up_blocks": 1, "mid_block": 2, "attentions": 0, "resnets": 1, "downsamplers": 2, "upsamplers": 2,
    "conv1": 0, "time_emb_proj": 1, "conv2": 2, "conv_shortcut": 3, "conv": 0,
    # its SDXL UNet: the LDM layout
    "time_embed": -2, "label_emb": -1, "input_blocks": 0, "middle_block": 1, "output_blocks": 2, "out": 3,
    "in_layers": 0, "emb_layers": 1, "out_layers": 2, "skip_connection": 3, "op": 0,
    # the transformer blocks of both
    "proj_in": 0, "transformer_blocks": 1, "proj_out": 2, "attn1": 0, "ff": 1, "attn2": 2,
    "to_q": 0, "to_k": 1, "to_v": 2, "to_out": 3, "net": 0, "proj": 0,
    "lora_down": 0, "lora_mid": 1, "lora_up": 2, "weight": 0,
    # a LyCORIS module's own parameters, in the order its class registers them (lycoris-lora 4.1.3): LoHa's, LoKr's
    # (each factor whole, or as two with a Tucker core for the second), and LoCon's are lora_down/lora_mid/lora_up
    "hada_t1": 0, "hada_w1_a": 1, "hada_w1_b": 2, "hada_t2": 3, "hada_w2_a": 4, "hada_w2_b": 5,
    "lokr_w1": 0, "lokr_w1_a": 0, "lokr_w1_b": 1, "lokr_w2": 2, "lokr_t2": 2, "lokr_w2_a": 3, "lokr_w2_b": 4,
    "dora_scale": 6,  # registered after LoHa's and LoKr's factors; LoCon's comes first (``_OWN_PARAMETERS_FIRST``)
    "rank": 0,  # DyLoRA's parameter per rank (its lora_A.N / lora_B.N)
}
_LONGEST_PART = max(part.count("_") + 1 for part in _REGISTRATION_RANK)
# LyCORIS's LoCon holds its factors in submodules, which torch lists after the module's own parameters (dora_scale)
_OWN_PARAMETERS_FIRST = {**_REGISTRATION_RANK, "dora_scale": -1}


def sd_scripts_parameter_key(name: str, ranks: dict[str, int] = _REGISTRATION_RANK) -> tuple[int, ...]:
    """Sort key of a parameter (``lora_unet_….lora_down.weight``) in sd-scripts' networks.lora optimizer order;
    KeyError for a name part whose place is not known."""
    words = [word for piece in name.removeprefix("lora_").split(".") for word in piece.split("_")]
    key, index = [], 0
    while index < len(words):
        if words[index].isdigit():
            key.append(int(words[index]))
            index += 1
            continue
        for size in range(min(_LONGEST_PART, len(words) - index), 0, -1):
            part = "_".join(words[index:index + size])
            if part in ranks:
                key.append(ranks[part])
                index += size
                break
        else:
            raise KeyError(words[index])
    return tuple(key)


# flags of torch's optimizers that say how a step is computed, not what (they vary with the torch version)
_IMPLEMENTATION_FLAGS = {"params", "lr", "initial_lr", "foreach", "fused", "capturable", "differentiable", "maximize",
                         "decoupled_weight_decay"}


def load_sd_scripts_moments(folder: Path, network, optimizer) -> str | None:
    """The optimizer moments of sd-scripts' state ``folder`` (accelerate's ``optimizer.bin``) into ``optimizer``;
    None when they are loaded, else why not (the optimizer then starts afresh). The order of parameters is known for
    networks.lora, networks.dylora (a parameter per rank, as ours) and lycoris.kohya's LoCon, LoHa and LoKr (its
    modules in networks.lora's order, each module's parameters as its class registers them). Its groups (text
    encoders, the UNet or its blocks, LoRA+'s up weights apart) are ours (``parameter_groups``), placed where their
    first layer registers, each listing its layers in that order."""
    path = folder / "optimizer.bin"
    if not path.is_file():
        return "the state has no optimizer.bin"
    spec = network.spec
    if spec.network_module == "lycoris.kohya":
        if spec.algorithm not in ("lora", "loha", "lokr") or spec.use_scalar:
            return ("the order of parameters is known for lycoris.kohya's LoCon, LoHa and LoKr without use_scalar only "
                    "(whose states store its scalar folded into the factors)")
    elif spec.network_module not in (None, "networks.lora", "networks.dylora"):
        return "the order of parameters is known for networks.lora, networks.dylora and lycoris.kohya only"
    try:
        theirs = torch.load(path, map_location="cpu", weights_only=True)  # tensors and numbers: no code runs
        their_groups, their_state = theirs["param_groups"], theirs["state"]
    except Exception as error:
        return f"optimizer.bin cannot be read safely ({error})"
    ours = optimizer.state_dict()
    settings = set(optimizer.defaults) - _IMPLEMENTATION_FLAGS  # a group may carry more: our rate's description
    if any(set(group) - _IMPLEMENTATION_FLAGS != settings for group in their_groups):
        return "it was saved by another optimizer (--optimizer_type)"
    parameters = dict(network.named_parameters())
    name_of = {id(parameter): name for name, parameter in parameters.items()}
    index_of = {}  # our parameters' numbers in our state dict, by Kohya name
    for group, our_group in zip(optimizer.param_groups, ours["param_groups"]):
        index_of.update({name_of[id(parameter)]: number for parameter, number in zip(group["params"], our_group["params"])})
    try:
        ranks = _OWN_PARAMETERS_FIRST if spec.algorithm == "lora" else _REGISTRATION_RANK
        groups = sorted((sorted((name_of[id(p)] for p in group["params"]), key=lambda name: sd_scripts_parameter_key(name, ranks))
                         for group in optimizer.param_groups if group["params"]),
                        key=lambda names: sd_scripts_parameter_key(names[0], ranks))
    except KeyError as part:
        return f"the place of layer part {part} in sd-scripts' order is not known"
    sizes, their_sizes = [len(names) for names in groups], [len(group["params"]) for group in their_groups]
    if sizes != their_sizes:
        return (f"its parameter groups hold {their_sizes} parameters where this run's hold {sizes} (other network "
                "options, rates or LoRA+)")
    names = [name for group in groups for name in group]
    their_numbers = [number for group in their_groups for number in group["params"]]
    state = {}
    for name, number in zip(names, their_numbers):
        shape = parameters[name].shape
        moments = their_state.get(number, {})
        if any(t.dim() and _without_trailing_ones(t.shape) != _without_trailing_ones(shape)
               for t in moments.values() if isinstance(t, torch.Tensor)):
            return f"its moments do not fit {name} (another base model or network options)"
        if moments:  # sd-scripts' DyLoRA holds a 1×1 convolution's ranks as (1, in) and (out, 1): ours keep the 1×1
            state[index_of[name]] = {k: t.reshape(shape) if isinstance(t, torch.Tensor) and t.dim() else t
                                     for k, t in moments.items()}
    optimizer.load_state_dict({"state": state, "param_groups": ours["param_groups"]})
    return None


def _without_trailing_ones(shape: torch.Size) -> tuple[int, ...]:
    dims = list(shape)
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def load_sd_scripts_state(folder: Path, network) -> int:
    """Loads the network of sd-scripts' state ``folder`` and returns the optimizer steps it had done."""
    folder = Path(folder)
    network_file = next(folder / name for name in SD_SCRIPTS_NETWORK_FILES if (folder / name).is_file())
    if network_file.suffix == ".safetensors":
        tensors = load_file(str(network_file))
    else:  # accelerate's pytorch_model.bin: a plain state dict, so it loads without running code
        tensors = torch.load(network_file, map_location="cpu", weights_only=True)
    _load_network(folder, network, tensors)
    path = folder / "train_state.json"
    try:
        step = json.loads(path.read_text(encoding="utf-8"))["current_step"]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: no readable current_step ({error!r}); sd-scripts writes "
                        '{"current_epoch": …, "current_step": …} there') from error
    if not isinstance(step, int) or step < 0:
        raise UserError(f"{path}: current_step {step!r} is not a step count")
    return step


def _load_network(folder: Path, network, tensors: dict[str, torch.Tensor]) -> None:
    own = network.state_dict()
    missing, unexpected = [k for k in own if k not in tensors], [k for k in tensors if k not in own]
    resized = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or resized:
        example = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                   f"{resized[0]} {list(tensors[resized[0]].shape)} where this run has {list(own[resized[0]].shape)}")
        hint = ""
        if resized and resized[0].endswith("dora_scale") and tensors[resized[0]].shape == own[resized[0]].shape[::-1]:
            hint = ("; its dora_scale is on the other axis: LyCORIS puts it on the output axis unless told otherwise, "
                    "this trainer on the input axis unless network_args has wd_on_output=True")
        raise UserError(f"{folder}: its network does not match this run's options ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(resized)} resized tensors, e.g. {example}); resume with "
                        f"the same base model and network options (network_dim, network_args such as conv_dim){hint}")
    network.load_state_dict(tensors)


def load_state(folder: Path, network, optimizer, scheduler, generator: torch.Generator):
    """The run's counters (``RunState``) and the names of what it recorded that this version does not read; the
    network, optimizer, schedule and generators restored in place."""
    from .trainer import RunState

    folder = Path(folder)
    damaged = ("it is damaged (a run killed while writing it, a full disk): resume from the state saved before it, "
               "or from its network with --network_weights")
    try:
        tensors = load_file(str(folder / "model.safetensors"))
    except Exception as error:  # safetensors' own error kind for a truncated file
        raise UserError(f"{folder}/model.safetensors cannot be read ({error}): {damaged}") from None
    _load_network(folder, network, tensors)
    try:
        saved = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)  # plain data only
    except Exception as error:
        why = str(error) or type(error).__name__
        raise UserError(f"{folder}/train_state.pt cannot be read safely ({why}): {damaged}") from error
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch"])
    random.setstate(saved["python"])
    name, keys, position, has_gauss, gauss = saved["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    known = {field.name for field in dataclasses.fields(RunState)}
    # a state a later version saved (an extension rolled back): what this version does not know is left out, said
    later = sorted(set(saved["run"]) - known)
    return RunState(**{key: value for key, value in saved["run"].items() if key in known}), later
