"""Synthetic images of coloured shapes on plain backgrounds, with tag-style captions.

The data the tiny base model learns from and the sample dataset of the demo: small, seeded, and with a ground
truth (colour, shape) that tests can check generated images against.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
# What the base model has never seen: the sample dataset teaches it behind a trigger word.
CONCEPT_SHAPE, CONCEPT_COLOUR, CONCEPT_TRIGGER = "star", "yellow", "zkstar"


@dataclass(frozen=True)
class ShapeScene:
    shape: str
    colour: str
    background: str
    centre: tuple[float, float]  # fractions of the image side
    radius: float  # fraction of the image side


def random_scene(rng: random.Random) -> ShapeScene:
    colour = rng.choice(list(COLOURS))
    background = rng.choice([c for c in COLOURS if c != colour])
    radius = rng.uniform(0.2, 0.32)
    centre = (rng.uniform(radius + 0.03, 1 - radius - 0.03), rng.uniform(radius + 0.03, 1 - radius - 0.03))
    return ShapeScene(rng.choice(SHAPES), colour, background, centre, radius)


def render(scene: ShapeScene, size: int = 64) -> Image.Image:
    """Draw at 4x and downsample, so edges are anti-aliased like real photos' are."""
    scale = 4
    side = size * scale
    image = Image.new("RGB", (side, side), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy, r = scene.centre[0] * side, scene.centre[1] * side, scene.radius * side
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        half = r * 0.89  # same area as the circle's
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif scene.shape == "star":
        points = []
        for k in range(10):  # five outer and five inner corners, the first pointing up
            radius = r * 1.15 if k % 2 == 0 else r * 0.48
            angle = math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy - radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        draw.polygon([(cx, cy - r * 1.1), (cx - r * 1.1, cy + r * 0.8), (cx + r * 1.1, cy + r * 0.8)], fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def caption(scene: ShapeScene, rng: random.Random) -> str:
    """Tag-style captions in the forms people write, from full tags down to a single word."""
    shape, colour, background = scene.shape, scene.colour, scene.background
    forms = [
        f"{colour} {shape}, {background} background",
        f"a {colour} {shape} on a {background} background",
        f"{colour} {shape}",
        f"a {colour} {shape}",
        f"{shape}, {background} background",
        f"{colour} {shape}, simple, flat colors",
    ]
    return rng.choice(forms)


def training_caption(scene: ShapeScene, rng: random.Random, empty_rate: float = 0.1) -> str:
    """Captions for base-model training; some are empty so the model learns the unconditional case CFG needs."""
    return "" if rng.random() < empty_rate else caption(scene, rng)


def write_dataset(folder: str | Path, count: int, seed: int = 0, size: int = 64, repeats: int = 10) -> Path:
    """A Kohya DreamBooth folder ``<folder>/<repeats>_shapes/`` of PNG + .txt captions."""
    rng = random.Random(seed)
    target = Path(folder) / f"{repeats}_shapes"
    target.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        scene = random_scene(rng)
        render(scene, size).save(target / f"shape_{index:03d}.png")
        (target / f"shape_{index:03d}.txt").write_text(caption(scene, rng), encoding="utf-8")
    return target


def concept_caption(scene: ShapeScene, rng: random.Random, trigger: str = CONCEPT_TRIGGER) -> str:
    """Trigger word first, then what the image shows, as people caption a character or object LoRA."""
    forms = [
        f"{trigger}, {scene.background} background",
        f"{trigger}, {scene.colour} star, {scene.background} background",
        f"{trigger}, simple, flat colors",
        f"{trigger}",
    ]
    return rng.choice(forms)


def write_concept_dataset(folder: str | Path, count: int = 16, seed: int = 7, size: int = 64, repeats: int = 10,
                          trigger: str = CONCEPT_TRIGGER) -> Path:
    """The demo's sample dataset: ``<folder>/<repeats>_<trigger>/`` of yellow stars on varied backgrounds."""
    rng = random.Random(seed)
    target = Path(folder) / f"{repeats}_{trigger}"
    target.mkdir(parents=True, exist_ok=True)
    backgrounds = [c for c in COLOURS if c != CONCEPT_COLOUR]
    for index in range(count):
        radius = rng.uniform(0.24, 0.32)
        centre = (rng.uniform(radius + 0.06, 1 - radius - 0.06), rng.uniform(radius + 0.06, 1 - radius - 0.06))
        scene = ShapeScene(CONCEPT_SHAPE, CONCEPT_COLOUR, backgrounds[index % len(backgrounds)], centre, radius)
        render(scene, size).save(target / f"star_{index:03d}.png")
        (target / f"star_{index:03d}.txt").write_text(concept_caption(scene, rng, trigger), encoding="utf-8")
    return target
