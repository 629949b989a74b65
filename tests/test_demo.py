"""The main job: a LoRA trained on the sample dataset teaches the tiny model the new concept behind its trigger word."""

from __future__ import annotations

import numpy as np
import pytest

from lora_trainer.models.checkpoint import load_checkpoint
from lora_trainer.networks.apply import MergedNetworks, Strength
from lora_trainer.networks.files import read_network
from lora_trainer.sampling.txt2img import GenerationSettings, txt2img
from lora_trainer.tiny_model.build import TINY_MODEL_PATH
from lora_trainer.tiny_model.demo import DEMO_PROMPT, run_demo
from lora_trainer.tiny_model.shapes import COLOURS, CONCEPT_COLOUR, CONCEPT_TRIGGER


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    grid = run_demo(out)
    return out, grid


def concept_share(images: list) -> float:
    """Share of pixels close to the concept's colour (the dataset's yellow), over all images."""
    pixels = np.stack([np.asarray(i, dtype=np.float32) for i in images])
    return float((np.linalg.norm(pixels - np.array(COLOURS[CONCEPT_COLOUR], dtype=np.float32), axis=-1) < 50).mean())


def test_demo_writes_kohya_epoch_files_and_the_grid(demo):
    out, grid = demo
    names = sorted(p.name for p in (out / "lora").glob("*.safetensors"))
    assert names == [f"{CONCEPT_TRIGGER}-00000{i}.safetensors" for i in (2, 4, 6)] + [f"{CONCEPT_TRIGGER}.safetensors"]
    assert grid.is_file() and grid.suffix == ".png"


def test_the_trained_lora_draws_the_concept_clearly_more_than_the_base_model(demo):
    out, _ = demo
    model = load_checkpoint(TINY_MODEL_PATH)
    merged = MergedNetworks.for_model(model.config, model.unet, model.text_encoders)
    network = read_network(out / "lora" / f"{CONCEPT_TRIGGER}.safetensors")
    settings = GenerationSettings(DEMO_PROMPT, steps=16, sampler="DPM++ 2M Karras", cfg_scale=5.0, seed=100,
                                  width=64, height=64, batch_size=8)
    without = [g.image for g in txt2img(model, settings)]
    merged.set_networks([(network, Strength(1.0))])
    with_lora = [g.image for g in txt2img(model, settings)]
    merged.restore()
    shares = concept_share(with_lora), concept_share(without)
    assert shares[0] > 0.03 and shares[0] > 4 * shares[1], shares
