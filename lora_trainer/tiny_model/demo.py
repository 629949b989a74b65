"""The main job on the embedded default: for now, draw a few prompts with the tiny shapes model.

Later issues grow this into "train a LoRA on the sample dataset and draw its epoch × strength grid".
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

DEMO_PROMPTS = ("a red circle", "a blue square", "green triangle, white background", "yellow circle, black background")


def montage(images: list[Image.Image], labels: list[str], columns: int, cell: int = 128) -> Image.Image:
    """A labelled grid: each image scaled to ``cell`` pixels with its label underneath."""
    rows = (len(images) + columns - 1) // columns
    label_height = 14
    sheet = Image.new("RGB", (columns * cell, rows * (cell + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, label) in enumerate(zip(images, labels)):
        x, y = (index % columns) * cell, (index // columns) * (cell + label_height)
        sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        draw.text((x + 2, y + cell + 1), label[:24], fill="black")
    return sheet


def run_demo(out: str | Path, seeds: tuple[int, ...] = (1, 2, 3)) -> Path:
    from ..cli import load_for_inference, save_png
    from ..hashing import short_hash
    from ..safe_io import atomic_path
    from ..sampling.txt2img import GenerationSettings, txt2img

    out = Path(out)
    model = load_for_inference(None, None, None, "auto", None)
    info = {"Model hash": short_hash(model.path), "Model": model.path.stem}
    images, labels = [], []
    for prompt in DEMO_PROMPTS:
        for seed in seeds:
            settings = GenerationSettings(prompt=prompt, steps=20, sampler="DPM++ 2M Karras", cfg_scale=5.0, seed=seed,
                                          width=model.config.resolution, height=model.config.resolution)
            generated = txt2img(model, settings, model_info=info)[0]
            save_png(generated.image, generated.infotext, out / "images", seed)
            images.append(generated.image)
            labels.append(f"{prompt} #{seed}")
    grid = out / "demo-grid.png"
    with atomic_path(grid) as temporary:
        montage(images, labels, columns=len(seeds)).save(temporary, format="PNG")
    return grid
