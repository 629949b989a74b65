"""Epoch × strength grids on our own sampler (the WebUI tab runs the same plan through its txt2img).

Every cell uses the same seed; a baseline column shows the model without the LoRA. Switching epochs merges the
next file; changing strengths within a row only applies the difference (``MergedNetworks``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..hashing import short_hash
from ..networks.apply import MergedNetworks, Strength
from ..networks.files import read_network
from ..safe_io import atomic_path
from ..sampling.txt2img import GenerationSettings, txt2img, write_png
from .axes import EpochFile, check_size


@dataclass
class GridResult:
    image: Image.Image
    cells: list[list[Image.Image]]
    seconds: float
    switching_seconds: float
    path: Path | None = None
    cell_paths: list[Path] = field(default_factory=list)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def assemble(cells: list[list[Image.Image]], row_labels: list[str], column_labels: list[str], title: str = "") -> Image.Image:
    """Cells with column labels on top, row labels on the left, and a title line."""
    width, height = cells[0][0].size
    font_size = max(10, width // 8)
    font = _font(font_size)
    label_width = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font)) for t in row_labels) + 12
    top = font_size * 2 + 8 + (font_size + 6 if title else 0)
    grid = Image.new("RGB", (label_width + width * len(column_labels), top + height * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((6, 4), title, fill="black", font=font)
    for c, label in enumerate(column_labels):
        draw.text((label_width + c * width + 4, top - font_size - 6), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        draw.text((6, top + r * height + height // 2 - font_size // 2), label, fill="black", font=font)
        for c, cell in enumerate(cells[r]):
            grid.paste(cell, (label_width + c * width, top + r * height))
    return grid


def epoch_strength_grid(model, settings: GenerationSettings, epochs: list[EpochFile], strengths: list[float],
                        baseline: bool = True, out: Path | None = None, progress=None) -> GridResult:
    """Rows = epochs, columns = (no LoRA) + strengths; same seed everywhere."""
    check_size(len(epochs), len(strengths) + int(baseline))
    seed = settings.resolved_seed()
    settings = dataclasses.replace(settings, seed=seed, batch_size=1)
    merged = MergedNetworks.for_model(model.config, model.unet, model.text_encoders)
    started = time.perf_counter()
    switching = 0.0
    base_image = txt2img(model, settings)[0] if baseline else None
    cells, infos = [], []
    total = len(epochs) * len(strengths)
    try:
        for row, epoch in enumerate(epochs):
            network = read_network(epoch.path)
            line, line_infos = ([base_image.image], [base_image.infotext]) if baseline else ([], [])
            for column, strength in enumerate(strengths):
                t = time.perf_counter()
                merged.set_networks([(network, Strength(strength))])
                switching += time.perf_counter() - t
                lora = f"<lora:{epoch.path.stem}:{strength:g}>"
                extra = {"Lora hashes": f"{epoch.path.stem}: {short_hash(epoch.path)}"}
                image = txt2img(model, dataclasses.replace(settings, prompt=f"{settings.prompt} {lora}",
                                                           extra_infotext={**settings.extra_infotext, **extra}))[0]
                line.append(image.image)
                line_infos.append(image.infotext)
                if progress:
                    progress(row * len(strengths) + column + 1, total)
            cells.append(line)
            infos.append(line_infos)
    finally:
        t = time.perf_counter()
        merged.restore()
        switching += time.perf_counter() - t
    columns = (["no LoRA"] if baseline else []) + [f"strength {s:g}" for s in strengths]
    title = f"{settings.prompt} | seed {seed} | {settings.sampler}, {settings.steps} steps, CFG {settings.cfg_scale:g}"
    image = assemble(cells, [e.label for e in epochs], columns, title)
    result = GridResult(image, cells, time.perf_counter() - started, switching)
    if out is not None:
        result.path, result.cell_paths = _save(image, cells, infos, Path(out))
    return result


def _save(image: Image.Image, cells, infos, folder: Path) -> tuple[Path, list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = []
    for r, (row, row_infos) in enumerate(zip(cells, infos)):
        for c, (cell, text) in enumerate(zip(row, row_infos)):
            paths.append(write_png(cell, folder / f"grid-{stamp}-r{r:02d}-c{c:02d}.png", text))
    grid_path = folder / f"grid-{stamp}.png"
    with atomic_path(grid_path) as temporary:
        image.save(temporary, format="PNG")
    return grid_path, paths
