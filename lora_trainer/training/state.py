"""Saving and resuming a run: network weights, optimizer, scheduler, random streams and the position in the data.

A state folder holds ``model.safetensors`` (the network, training dtype, no metadata, as sd-scripts'),
``train_state.pt`` (optimizer, scheduler, generators, position) and ``train_state.json`` (sd-scripts'
``{"current_epoch", "current_step"}``). It is written into a temporary folder and renamed into place, so a
crash during the save leaves the previous state intact.
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


def load_state(folder: Path, network, optimizer, scheduler, generator: torch.Generator):
    from .trainer import RunState

    folder = Path(folder)
    if not (folder / "model.safetensors").is_file() or not (folder / "train_state.pt").is_file():
        raise UserError(f"{folder}: not a state folder of ours (needs model.safetensors and train_state.pt); "
                        "a network file can be continued with --network_weights instead")
    missing, unexpected = network.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise UserError(f"{folder}: its network does not match this run's options "
                        f"({len(missing)} missing, {len(unexpected)} unexpected tensors); resume with the same network options")
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
