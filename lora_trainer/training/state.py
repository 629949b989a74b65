"""Saving and resuming a run: network weights, optimizer, scheduler, random streams and the position in the data.

A state folder holds ``model.safetensors`` (the network, training dtype, no metadata, as sd-scripts'),
``train_state.pt`` (optimizer, scheduler, generators, position) and ``train_state.json`` (sd-scripts'
``{"current_epoch", "current_step"}``). It is written into a temporary folder and renamed into place, so a
crash during the save leaves the previous state intact.

sd-scripts' own ``--save_state`` folders (accelerate's) hold the network and ``train_state.json`` too; a run resumes
from them with the network's weights and the step count. Their optimizer, scheduler and random states are not read:
``random_states_0.pkl`` is a pickle (unsafe to load), and ``optimizer.bin`` lists moments by the position of each
parameter in sd-scripts' module order, which a wrong guess would hand to another layer of the same shape.
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
from safetensors.torch import load_file, save_file

from ..errors import UserError


def save_state(folder: Path, network, optimizer, scheduler, generator: torch.Generator, run_state) -> Path:
    folder = Path(folder)
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, str(temporary / "model.safetensors"))
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
            json.dumps({"current_epoch": run_state.epoch, "current_step": run_state.step}), encoding="utf-8")
        for file in temporary.iterdir():
            with open(file, "rb+") as handle:
                os.fsync(handle.fileno())
    except BaseException:  # a full disk or a kill: the half-written folder goes, the previous state stays
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(temporary, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, folder)
    return folder


def _numpy_state() -> list:
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(position), int(has_gauss), float(gauss)]


SD_SCRIPTS_NETWORK_FILES = ("model.safetensors", "pytorch_model.bin")  # accelerate's names, newer and older


def state_kind(folder: Path) -> str:
    """"ours" or "sd-scripts" (a ``--save_state`` folder of sd-scripts); anything else is refused with what it lacks."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file() and (folder / "train_state.pt").is_file():
        return "ours"
    if (folder / "train_state.json").is_file() and any((folder / name).is_file() for name in SD_SCRIPTS_NETWORK_FILES):
        return "sd-scripts"
    raise UserError(f"--resume {folder}: not a state folder (ours holds model.safetensors and train_state.pt, "
                    "sd-scripts' model.safetensors and train_state.json); a network file can be continued with "
                    "--network_weights instead")


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
        raise UserError(f"{folder}: its network does not match this run's options ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(resized)} resized tensors, e.g. {example}); resume with "
                        "the same base model and network options (network_dim, network_args such as conv_dim)")
    network.load_state_dict(tensors)


def load_state(folder: Path, network, optimizer, scheduler, generator: torch.Generator):
    from .trainer import RunState

    folder = Path(folder)
    _load_network(folder, network, load_file(str(folder / "model.safetensors")))
    try:
        saved = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)  # plain data only
    except Exception as error:
        raise UserError(f"{folder}/train_state.pt cannot be read safely ({error}); was it written by this trainer?") from error
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch"])
    random.setstate(saved["python"])
    name, keys, position, has_gauss, gauss = saved["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    return RunState(**saved["run"])
