"""``python -m lora_trainer bench tags-ui``: the Dataset Tag Editor tab's handlers on a folder of 10,000 images —
first page shown (open + view model + one page of thumbnails; target ≤ 1 s) and a batch replace end to end through
the tab's handler (edit + the re-rendered page; target ≤ 200 ms)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def make_folder(folder: Path, count: int) -> Path:
    """``count`` small PNGs with captions (made once; reused by later runs)."""
    from PIL import Image

    images = folder / "10_bench"
    if images.is_dir() and len(list(images.glob("*.png"))) == count:
        return folder
    images.mkdir(parents=True, exist_ok=True)
    colours = ["red", "blue", "green", "yellow"]
    shapes = ["circle", "square", "star"]
    for i in range(count):
        Image.new("RGB", (256, 256), (i % 256, 80, 160)).save(images / f"img_{i:05d}.png", compress_level=1)
        caption = f"zkbench, {colours[i % 4]}, {shapes[i % 3]}, tag_{i % 97}, solo"
        (images / f"img_{i:05d}.txt").write_text(caption, encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    from ..services import Services
    from ..settings import AppSettings
    from ..standalone_host import StandaloneHost
    from . import tag_editor_tab as tab

    parser = argparse.ArgumentParser(prog="python -m lora_trainer bench tags-ui", description=__doc__)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "lora-trainer-bench-tags-ui")
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args(argv)

    datasets = args.work_dir / "datasets"
    started = time.perf_counter()
    folder = make_folder(datasets / "big", args.images)
    print(f"folder of {args.images} images ready in {time.perf_counter() - started:.1f} s")
    data = args.work_dir / "data"
    settings = AppSettings(lora_folder=args.work_dir / "loras", data_folder=data, dataset_roots=[datasets])
    services = Services.create(settings, StandaloneHost([], [settings.lora_folder]), start=False)
    try:
        started = time.perf_counter()
        state = tab.open_folder(services, tab.TabState(), str(folder), True, ".txt")[0]
        opened = time.perf_counter() - started
        for old in (data / "thumbnails").rglob("*.jpg"):
            old.unlink()  # the first page with cold thumbnails
        started = time.perf_counter()
        tab.go_to_page(services, state, 1)
        first_page = time.perf_counter() - started
        state = tab.click_image(services, state, 0)[0]  # an image in the caption box: every view looks its caption up
        started = time.perf_counter()
        view = tab.batch_edit(services, state, "filtered", "Replace text", "", "solo", "alone", False, False, False, 0)
        replace = time.perf_counter() - started
        print(f"open (read {args.images} captions, first page): {opened * 1000:.0f} ms")
        print(f"first page (view model + 48 thumbnails made): {first_page * 1000:.0f} ms (target ≤ 1000 ms)")
        print(f"batch replace on {args.images} images through the tab's handler: {replace * 1000:.0f} ms (target ≤ 200 ms)"
              f" — {view[tab.OUTPUTS.index('status')]}")
        services.tag_sessions.close(state.session)  # discarded: its draft would be restored by the next run's open
    finally:
        services.close()
    return 0 if first_page <= 1.0 and replace <= 0.2 else 1


if __name__ == "__main__":
    sys.exit(main())
