"""``bench tags``: the tag editor on a generated folder of 10,000 small images with captions — open, frequency table,
a batch replace across all images, and a save of 1,000 changed captions (issue #4's goals: 1 s, 100 ms, 2 s)."""

from __future__ import annotations

import io
import random
import shutil
import time
from pathlib import Path

from PIL import Image

from lora_trainer.dataset.tag_editor import (
    AddTags,
    ReplaceText,
    apply_edit,
    open_folder,
    save,
    tag_counts,
)

IMAGE_COUNT = 10_000
SAVED_COUNT = 1_000
_VOCABULARY = [f"tag {index}" for index in range(2_000)] + ["yellow star", "blue background", "simple background"]


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (250, 220, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(folder: Path, count: int = IMAGE_COUNT, seed: int = 0) -> Path:
    """``count`` 8×8 PNGs with 10–30 tags each, the trigger word first, in one ``10_zkstar`` folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    png = _tiny_png()
    for index in range(count):
        image = folder / f"image_{index:05d}.png"
        image.write_bytes(png)
        tags = ["zkstar"] + rng.sample(_VOCABULARY, rng.randint(10, 30))
        image.with_suffix(".txt").write_text(", ".join(tags), encoding="utf-8")
    return folder


def _timed(label: str, goal_s: float, action):
    start = time.perf_counter()
    result = action()
    elapsed = time.perf_counter() - start
    verdict = "ok" if elapsed <= goal_s else "over goal"
    print(f"{label:<44} {elapsed * 1000:8.1f} ms   (goal {goal_s * 1000:.0f} ms, {verdict})")
    return result


def run(work_dir: Path) -> None:
    """Generate the folder under ``work_dir`` (reused when it is already there) and print the four figures."""
    folder = Path(work_dir) / "bench-tags" / "10_zkstar"
    backups = Path(work_dir) / "bench-tags" / "caption-backups"
    if not folder.is_dir() or sum(1 for _ in folder.glob("*.png")) != IMAGE_COUNT:
        start = time.perf_counter()
        make_folder(folder)
        print(f"generated {IMAGE_COUNT} images with captions in {time.perf_counter() - start:.1f} s: {folder}")
    editor = _timed(f"open {IMAGE_COUNT} images with captions", 1.0, lambda: open_folder(folder, backup_dir=backups))
    counts = _timed("frequency table", 0.1, lambda: tag_counts(editor))
    print(f"  {len(counts)} distinct tags; most frequent: {counts[0][0]} ({counts[0][1]})")
    replaced = _timed(
        f"batch replace across all {len(editor.images)}",
        0.1,
        lambda: apply_edit(editor, ReplaceText("tag 1", "tag one")),
    )
    print(f"  {sum(1 for _ in replaced.undo_steps[-1].after)} images changed")
    to_save = apply_edit(editor, AddTags(("bench",), position=1), editor.images[:SAVED_COUNT])
    saved, result = _timed(f"save {SAVED_COUNT} changed captions (with backup)", 2.0, lambda: save(to_save))
    print(f"  previous versions kept in {result.backup_folder} (deleted at the end of the run)")
    # put the folder back as it was, so that a second run measures the same thing
    save(apply_edit(saved, ReplaceText("bench", ""), saved.images[:SAVED_COUNT]))
    shutil.rmtree(backups)
