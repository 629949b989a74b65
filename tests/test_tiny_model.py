"""The embedded tiny base model actually draws what it is asked for, and its build script runs."""

from __future__ import annotations

import numpy as np
import pytest

from lora_trainer.models.checkpoint import load_checkpoint
from lora_trainer.sampling.txt2img import GenerationSettings, txt2img
from lora_trainer.tiny_model.build import TINY_MODEL_PATH, BuildSettings, build
from lora_trainer.tiny_model.shapes import COLOURS


@pytest.fixture(scope="module")
def tiny():
    return load_checkpoint(TINY_MODEL_PATH)


def draw(model, prompt: str, count: int = 8) -> np.ndarray:
    settings = GenerationSettings(prompt, steps=20, sampler="DPM++ 2M Karras", cfg_scale=5.0, seed=100,
                                  width=64, height=64, batch_size=count)
    return np.stack([np.asarray(g.image, dtype=np.float32) for g in txt2img(model, settings)])


def colour_mask(images: np.ndarray, colour: str, tolerance: float = 70.0) -> np.ndarray:
    """Pixels within ``tolerance`` (RGB distance) of one of the dataset's colours."""
    return np.linalg.norm(images - np.array(COLOURS[colour], dtype=np.float32), axis=-1) < tolerance


def bounding_box_fill(mask: np.ndarray) -> float:
    """Share of the object's bounding box it fills: π/4 ≈ 0.79 for a circle, 1.0 for a square."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 20:
        return float("nan")
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return len(ys) / box


def test_tiny_model_is_small_enough_to_ship():
    assert TINY_MODEL_PATH.stat().st_size <= 15 * 2**20


def test_red_circles_are_red_and_round_blue_squares_are_blue_and_square(tiny):
    # The background is stated: left open, the model picks one at random (red behind a blue square is as
    # right as any), which would blur colour shares that are meant to measure the shape's own colour.
    circles = draw(tiny, "red circle, black background")
    squares = draw(tiny, "blue square, black background")

    red_in_circles, blue_in_circles = colour_mask(circles, "red").mean(), colour_mask(circles, "blue").mean()
    red_in_squares, blue_in_squares = colour_mask(squares, "red").mean(), colour_mask(squares, "blue").mean()
    assert red_in_circles > 0.05 and red_in_circles > 2 * red_in_squares
    assert blue_in_squares > 0.05 and blue_in_squares > 2 * blue_in_circles

    circle_fill = np.nanmean([bounding_box_fill(m) for m in colour_mask(circles, "red")])
    square_fill = np.nanmean([bounding_box_fill(m) for m in colour_mask(squares, "blue")])
    assert square_fill > circle_fill + 0.05, (circle_fill, square_fill)


def test_the_issues_own_prompts_differ_in_mean_colour_and_shape_in_the_right_direction(tiny):
    circles = draw(tiny, "a red circle")
    squares = draw(tiny, "a blue square")
    redness = lambda images: float((images[..., 0] - images[..., 2]).mean())  # noqa: E731  mean red minus blue
    assert redness(circles) > redness(squares) + 20
    circle_fill = np.nanmean([bounding_box_fill(m) for m in colour_mask(circles, "red")])
    square_fill = np.nanmean([bounding_box_fill(m) for m in colour_mask(squares, "blue")])
    assert square_fill > circle_fill + 0.05, (circle_fill, square_fill)


def test_same_seed_same_image_different_seed_different_image(tiny):
    def one(seed):
        settings = GenerationSettings("a green triangle", steps=8, sampler="Euler a", seed=seed, width=64, height=64)
        return np.asarray(txt2img(tiny, settings)[0].image)

    assert np.array_equal(one(7), one(7))
    assert not np.array_equal(one(7), one(8))


def test_build_script_runs_and_writes_a_loadable_checkpoint(tmp_path):
    path = build(tmp_path / "quick.safetensors", BuildSettings.quick())
    model = load_checkpoint(path)
    assert model.config.resolution == 64 and model.config.unet.model_channels == 32
    image = txt2img(model, GenerationSettings("a red circle", steps=2, seed=1, width=64, height=64))[0].image
    assert image.size == (64, 64)
