"""The standalone host applies exactly the prompt's LoRAs on our own model and leaves the base model bit-exact."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lora_trainer.app.standalone_host import StandaloneHost
from lora_trainer.grid.bench import make_epoch_files
from lora_trainer.models.checkpoint import load_checkpoint
from lora_trainer.sampling.txt2img import GenerationSettings
from lora_trainer.tiny_model.build import EMBEDDED_TITLE, TINY_MODEL_PATH

SETTINGS = GenerationSettings("zkstar", steps=1, sampler="Euler", cfg_scale=5.0, seed=3, width=64, height=64)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    make_epoch_files(folder, "tinylora", epochs=1)
    return StandaloneHost([], [folder])


def pixels(host, prompt: str) -> np.ndarray:
    return np.asarray(host.generate(dataclasses.replace(SETTINGS, prompt=prompt)).image)


def test_loras_are_applied_and_removed_exactly(host):
    base = pixels(host, "zkstar")
    assert not np.array_equal(pixels(host, "zkstar <lora:tinylora:1>"), base)
    half = pixels(host, "zkstar <lora:tinylora:0.5>")  # only the strength changed: the difference is applied
    assert not np.array_equal(half, base)
    assert np.array_equal(pixels(host, "zkstar <lora:tinylora:0>"), base)
    assert np.array_equal(pixels(host, "zkstar"), base)
    fresh = load_checkpoint(TINY_MODEL_PATH).unet.state_dict()
    assert all(torch.equal(value, fresh[key]) for key, value in host._model.unet.state_dict().items())
    assert host.switching_seconds > 0


def test_infotext_has_lora_hashes_and_a_missing_lora_is_skipped_with_one_warning(host):
    image = host.generate(dataclasses.replace(SETTINGS, prompt="zkstar <lora:tinylora:1>"))
    assert 'Lora hashes: "tinylora: ' in image.infotext and "Model: tiny-sd" in image.infotext
    host.take_warnings()
    base = pixels(host, "zkstar")
    assert np.array_equal(pixels(host, "zkstar <lora:nosuch:1>"), base)
    assert np.array_equal(pixels(host, "zkstar <lora:nosuch:0.5>"), base)
    warnings = host.take_warnings()
    assert len(warnings) == 1 and "'nosuch' not found" in warnings[0]


def test_a_lora_copied_into_the_folder_after_listing_is_found(host):
    import shutil

    folder = host.library.folders[0]
    host.library.entries()  # listed before the copy
    shutil.copy(folder / "tinylora.safetensors", folder / "copied in.safetensors")
    try:
        assert np.array_equal(pixels(host, "zkstar <lora:copied in:1>"), pixels(host, "zkstar <lora:tinylora:1>"))
    finally:
        (folder / "copied in.safetensors").unlink()
        host.library.refresh()


def test_checkpoints_and_gpu_release(host):
    assert host.checkpoints()[EMBEDDED_TITLE] == TINY_MODEL_PATH
    assert host.generation_defaults().width == 64
    host.generate(SETTINGS)
    host.release_gpu()
    assert host.loaded_checkpoint is None
    host.restore_gpu()
    assert host.loaded_checkpoint == TINY_MODEL_PATH.resolve()


def test_standalone_grids_offer_every_sampler_we_implement(tmp_path):
    from lora_trainer.app.standalone_host import StandaloneHost
    from lora_trainer.sampling.samplers import SAMPLERS

    host = StandaloneHost([tmp_path], [tmp_path])
    assert host.sampler_names() == list(SAMPLERS) and host.generation_defaults().sampler in host.sampler_names()
    assert (host.sampler("euler_a"), host.sampler("DPM++ 2M Karras"), host.sampler("Eular a")) == (
        "Euler a", "DPM++ 2M Karras", None)


def test_the_current_folder_is_a_dataset_root_only_while_the_app_serves_this_machine(tmp_path, monkeypatch):
    """Started from the home folder with --listen, it would have opened every file below it to the network."""
    import argparse

    from lora_trainer.app.standalone import settings_from

    monkeypatch.chdir(tmp_path)
    local = argparse.Namespace(data=tmp_path / "data", lora_dir=None, dataset_root=[], checkpoint_dir=[], host="127.0.0.1",
                               listen=False, allow_unauthenticated=False, api_auth=None)
    assert tmp_path in settings_from(local).dataset_roots
    for remote in ({"listen": True}, {"host": "0.0.0.0"}):
        assert tmp_path not in settings_from(argparse.Namespace(**{**vars(local), **remote})).dataset_roots


def test_generation_defaults_take_the_default_checkpoints_own_size(tmp_path, monkeypatch):
    """The Grid tab's first values in the app started on an SDXL checkpoint: 1024 px, where 512 drew broken images."""
    from lora_trainer.models import checkpoint
    from lora_trainer.models.configs import SD1, SDXL

    model = tmp_path / "xl.safetensors"
    model.write_bytes(b"")
    monkeypatch.setattr(checkpoint, "open_tensors", lambda path: None)
    monkeypatch.setattr(checkpoint, "detect_architecture", lambda source: (SDXL, "stand-in"))
    defaults = StandaloneHost([], [], default_checkpoint=model).generation_defaults()
    assert (defaults.width, defaults.height) == (1024, 1024)
    monkeypatch.setattr(checkpoint, "detect_architecture", lambda source: (SD1, "stand-in"))
    assert StandaloneHost([], [], default_checkpoint=model).generation_defaults().width == 512
    assert StandaloneHost([], []).generation_defaults().width == 64  # the tiny model, at the demo's settings
