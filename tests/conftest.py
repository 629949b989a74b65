import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

if "LORA_TRAINER_CACHE" not in os.environ:
    # the hash cache (hashes.json) of files the tests make goes to a folder of this run, not the user's ~/.cache
    import atexit
    import shutil
    import tempfile

    os.environ["LORA_TRAINER_CACHE"] = tempfile.mkdtemp(prefix="lora-trainer-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LORA_TRAINER_CACHE"], True)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker, for the trainers it starts too: the tiny models' ops gain nothing from a second
    # thread, and two workers with two threads each on two cores only wait on each other
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """Random tiny SDXL weights (two text encoders, size conditioning) with the tiny SD1 model's VAE (the latents only
    need to be consistent)."""
    import torch
    from safetensors import safe_open

    from lora_trainer.models.checkpoint import ARCHITECTURE_METADATA_KEY, architecture_overrides, build_models
    from lora_trainer.models.configs import SDXL
    from lora_trainer.safe_io import save_safetensors
    from lora_trainer.tiny_model.build import TINY_MODEL_PATH, tiny_like

    config = tiny_like(SDXL)
    torch.manual_seed(0)
    unet, text_encoders, _ = build_models(config, device="cpu")
    state = {config.unet_prefix + k: v for k, v in unet.state_dict().items()}
    for slot, encoder in zip(config.text_encoders, text_encoders):
        state.update({slot.prefix + k: v for k, v in encoder.state_dict().items()})
    with safe_open(str(TINY_MODEL_PATH), "pt") as handle:
        state.update({k: handle.get_tensor(k).float() for k in handle.keys() if k.startswith(config.vae_prefix)})
    path = tmp_path_factory.mktemp("model") / "tiny sdxl.safetensors"
    return save_safetensors(state, path, {ARCHITECTURE_METADATA_KEY: json.dumps(architecture_overrides(config))})
