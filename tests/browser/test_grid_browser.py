"""The Prompt-Lora-Grid tab in a real browser: a two-epoch run appears in the Lora folder, the user picks it, asks for
strengths 0.5 and 1 at 4 steps on the tiny model and presses Generate; the grid shows up and is saved under the
app's data folder with every cell, and the recorded losses mark the recommended epoch."""

from __future__ import annotations

import re
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout, expect
from PIL import Image

from lora_trainer.grid.bench import make_epoch_files

RUN = "browsergrid"
WAIT_MS = 240_000  # upper bound for a loaded CI machine (model load and 5 images); an idle one takes seconds
ERROR_TOAST = ".toast-body.error"  # gradio's popup when a handler raises
FINISHED_OR_FAILED = f"""() => /Grid saved:|⚠/.test(document.querySelector('#lora_trainer_grid_status').innerText)
    || document.querySelector('{ERROR_TOAST}') !== null"""


def pick_option(page, dropdown, label: str, refresh, tries: int = 12) -> None:
    """Refresh the choices, open the dropdown and pick `label`. The refreshed choices arrive asynchronously; a list
    opened before they arrive keeps the old choices on a loaded machine (the CI run of 2026-12-02 waited 30 s for
    it), and a refresh clicked while the page still settles can go unanswered (a later CI run saw no choices for
    90 s), so both are done again until the choice is there."""
    option = page.locator(f"ul.options li[data-testid='dropdown-option'][aria-label='{label}']")  # gradio 3 and 4
    for _ in range(tries - 1):
        refresh()
        dropdown.click()
        try:
            option.click(timeout=5_000)
            return
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    refresh()
    dropdown.click()
    option.click()


def test_epoch_by_strength_grid_in_the_browser(page, app_folders, screenshot, open_tab):
    make_epoch_files(app_folders["lora"], RUN, epochs=2)
    tab = page.locator("#lora_trainer_grid")
    open_tab("Prompt-Lora-Grid")
    refresh = tab.get_by_role("button", name="🔄")  # the run was made after the page was built
    pick_option(page, tab.get_by_label("Training run or LoRA (Lora folder)"), RUN, refresh.click)
    expect(tab.locator("#lora_trainer_grid_run textarea")).to_have_value(RUN)
    expect(tab.get_by_role("listitem").filter(has_text="epoch 1 (10 steps)")).to_be_visible()
    tab.locator("#lora_trainer_grid_x_values textarea").fill("0.5, 1")
    tab.locator("#lora_trainer_grid_steps input[type=number]").fill("4")
    screenshot("settings")

    page.click("#lora_trainer_grid_generate")
    status = page.locator("#lora_trainer_grid_status").first  # gradio 3.41 repeats a Markdown's elem_id inside
    page.wait_for_function(FINISHED_OR_FAILED, timeout=WAIT_MS)
    assert "Grid saved:" in status.inner_text(), (status.inner_text(), page.locator(ERROR_TOAST).all_inner_texts())
    saved = Path(re.search(r"Grid saved: (.+?\.png) \(", status.inner_text()).group(1))
    assert saved.parent == app_folders["data"] / "grids" and saved.is_file()
    shown = tab.locator("#lora_trainer_grid_image img")
    expect(shown).to_be_visible()
    shown.evaluate("image => image.decode()")  # resolves once the image has loaded
    natural = shown.evaluate("image => [image.naturalWidth, image.naturalHeight]")
    with Image.open(saved) as grid:
        assert natural == list(grid.size) and min(grid.size) > 0
    # 2 epochs × (no LoRA, 0.5, 1), each cell saved next to the grid
    expect(tab.locator("#lora_trainer_grid_cells img")).to_have_count(6)
    assert len(list(saved.parent.glob(f"{saved.stem}-r*-c*.png"))) == 6
    losses = tab.get_by_role("table", name="Losses the trainer recorded")
    recommended = losses.get_by_role("row").filter(has_text="★ recommended")
    expect(recommended).to_contain_text(f"{RUN}-000001")  # make_epoch_files records the lowest validation loss there
    screenshot("grid")
