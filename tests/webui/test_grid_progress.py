"""The Prompt-Lora-Grid inside the (stand-in) WebUI: progress across the whole grid and Interrupt/Skip through the
WebUI's ``shared.state``."""

from __future__ import annotations

from pathlib import Path


def run_grid_tab(w, monkeypatch, on_cell=None):
    """The grid tab's Generate on the "cats" run: epochs 1-2 × strengths 0.5, 1 with the baseline column
    (6 cells, 5 distinct: the baseline is the same in both rows). Records the WebUI's state at every image."""
    from lora_trainer.app.ui import grid_tab
    from lora_trainer.webui import extension

    seen = []
    original = w.processing.process_images

    def process_images(p):
        state = w.shared.state
        seen.append((state.job_count, state.job_no, state.textinfo, w.call_queue.queue_lock.locked()))
        if on_cell:
            on_cell(len(seen), "before")
        processed = original(p)
        if on_cell:
            on_cell(len(seen), "after")
        return processed

    monkeypatch.setattr(w.processing, "process_images", process_images)
    services = extension.services()
    result = grid_tab.generate_grid(services, "cats", "strength", "0.5, 1", "epoch", "", 1.0, "a red circle", "", 3,
                                    "Euler", 1, 64, 64, 5.0, "", True, False)
    return services, seen, result


def grey(image) -> bool:
    return image.getextrema() == ((128, 128), (128, 128), (128, 128))


def test_the_webui_progress_counts_cells_across_the_whole_grid(webui, monkeypatch):
    _, seen, (_, cells, _, _, status) = run_grid_tab(webui, monkeypatch)
    assert [s[0] for s in seen] == [5] * 5  # job_count: the grid's cells, set before the first image
    assert [s[1] for s in seen] == [0, 1, 2, 3, 4]  # job_no advances cell by cell
    assert [s[2] for s in seen] == [f"Prompt-Lora-Grid: cell {i} of 5" for i in range(1, 6)]
    assert all(s[3] for s in seen)  # the WebUI's queue is held through the grid (txt2img waits)
    assert webui.shared.state.job_no == 5 and webui.shared.state.job == ""  # ended once, after the last cell
    assert not webui.call_queue.queue_lock.locked()
    assert status.startswith("Grid saved") and len(cells) == 6 and not any(grey(c) for c in cells)
    # the console's "Total progress" bar: the grid's 5 cells × 1 step, every step counted, closed after the grid
    assert webui.shared.total_tqdm.bar is None
    assert webui.shared.total_tqdm.closed[-1] == {"total": 5, "done": 5}


def test_interrupt_stops_the_grid_and_keeps_the_finished_cells(webui, monkeypatch):
    def press_interrupt(cell, moment):
        if cell == 3 and moment == "after":  # while cell 3 is drawn (the WebUI's sampler cuts it short)
            webui.shared.state.interrupt()

    _, seen, (path, cells, _, _, status) = run_grid_tab(webui, monkeypatch, press_interrupt)
    assert len(seen) == 3  # no cell after the interrupted one
    assert status.startswith("Interrupted after 2 of 5 distinct images (the baseline cells share one); the rest are "
                             "grey. Grid saved")
    assert Path(path).is_file()
    # row 1: baseline, 0.5, 1 → the first two drawn, the third (cut short) grey; row 2: baseline shared, rest grey
    assert [grey(c) for c in cells] == [False, False, True, False, True, True]
    assert webui.shared.state.job == "" and not webui.call_queue.queue_lock.locked()


def test_interrupt_before_the_first_cell_finished_saves_nothing_and_says_so(webui, monkeypatch):
    def press_interrupt(cell, moment):
        if cell == 1 and moment == "before":
            webui.shared.state.interrupt()

    services, _, (path, cells, _, _, status) = run_grid_tab(webui, monkeypatch, press_interrupt)
    assert path is None and cells == [] and status == "Interrupted before the first cell finished: nothing was saved."
    assert not list(services.settings.grids_folder.rglob("*.png"))


def test_skip_leaves_that_cell_grey_and_the_grid_goes_on(webui, monkeypatch):
    def press_skip(cell, moment):
        if cell == 2 and moment == "after":
            webui.shared.state.skip()

    _, seen, (_, cells, _, _, status) = run_grid_tab(webui, monkeypatch, press_skip)
    assert len(seen) == 5 and status.startswith("1 of 5 distinct images (the baseline cells share one) were skipped; they are grey. Grid saved")
    assert [grey(c) for c in cells] == [False, True, False, False, False, False]


def test_a_grid_names_samplers_as_the_webuis_txt2img_takes_them(webui_modules):
    """Its txt2img takes exact names only (any other: its default sampler, said in the console alone): aliases in any
    case become names, a name with a schedule type after it stays (WebUI 1.9+ splits it), others are unknown."""
    from lora_trainer.webui.host import WebUIHost

    host = WebUIHost()
    assert [host.sampler(name) for name in ("Euler a", "K_EULER_A", "euler", "Euler Karras", "Euler SGMUniform")] == [
        "Euler a", "Euler a", "Euler", "Euler Karras", "Euler SGMUniform"]
    assert host.sampler("Eular a") is None and host.sampler("Karras") is None


def test_the_grid_offers_the_webuis_visible_samplers(webui_modules, monkeypatch):
    from modules import sd_samplers

    from lora_trainer.webui.host import WebUIHost

    monkeypatch.setattr(sd_samplers, "samplers_hidden", {"DDIM"})
    names = WebUIHost().sampler_names()
    assert names == [s.name for s in sd_samplers.all_samplers if s.name != "DDIM"] and "DDIM" not in names


def test_a_grid_over_the_webuis_maximum_image_size_is_refused_before_any_image(webui, monkeypatch):
    """Its setting "Maximum image size" (img_max_size_mp), which caps its X/Y/Z plot, caps the grid tab too."""
    monkeypatch.setitem(webui.shared.opts.data, "img_max_size_mp", 0.02)  # 6 cells of 64×64 are 0.025 megapixels
    _, seen, (path, _, _, _, status) = run_grid_tab(webui, monkeypatch)
    assert "0.02 (the WebUI's \"Maximum image size\" setting)" in status and path is None and not seen


def test_the_grid_is_labelled_in_the_webuis_grid_font(webui, monkeypatch, tmp_path):
    """Its setting "Font for image grids that have text" (``images.get_font``), where a Chinese or Japanese user names
    a font that has their characters, labels the grid tab's grids as it labels the WebUI's own."""
    import string

    from grid_fonts import FAMILY, font_with

    from lora_trainer.grid import render

    monkeypatch.setitem(webui.shared.opts.data, "font", str(font_with(tmp_path / "own.ttf", string.printable)))
    used = []
    monkeypatch.setattr(render, "label_font", lambda *asked, label_font=render.label_font:
                        used.append(label_font(*asked)) or used[-1])
    _, _, (path, _, _, _, status) = run_grid_tab(webui, monkeypatch)
    assert status.startswith("Grid saved") and used and all(font.getname() == FAMILY for font in used)
