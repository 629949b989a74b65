"""The Dataset Tag Editor tab in a real browser, on a folder of 200 captioned images: open it (one page of 48
thumbnails, not 200), filter by clicking a tag in the frequency list, batch-replace a tag on the filtered images,
undo and redo, save; then the caption files on disk hold exactly the edit, and the previous versions are backed up;
"Train on this folder" fills the Train tab's dataset box and shows that tab."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import expect
from PIL import Image

IMAGES = 200
PAGE_SIZE = 48  # tag_view.PAGE_SIZE: what one page of the gallery shows
WAIT_MS = 120_000  # upper bound for a loaded CI machine; an idle one answers each click in well under a second


def _caption(index: int) -> str:
    """Half the images smile with red hair; a quarter have red hair without the smile tag (outside the filter)."""
    if index % 2 == 0:
        return "1girl, red_hair, smile"
    return "1boy, red_hair" if index % 4 == 1 else "1boy, blue_hair"


def _make_folder(folder: Path) -> dict[Path, str]:
    folder.mkdir(parents=True)
    captions = {}
    for index in range(IMAGES):
        Image.new("RGB", (32, 32), (index, 90, 255 - index)).save(folder / f"img_{index:03d}.png")
        captions[folder / f"img_{index:03d}.txt"] = _caption(index)
    for path, text in captions.items():
        path.write_text(text, encoding="utf-8")
    return captions


def _markdown(page, elem_id: str):
    return page.locator(f"#{elem_id}").first  # gradio 3.41 repeats a Markdown's elem_id on its inner element


def _thumbnails(data: Path) -> int:
    return sum(1 for _ in (data / "thumbnails").rglob("*.jpg"))


def _on_disk(captions: dict[Path, str]) -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in captions}


# [thumbnails reaching past the right edge of the gallery's box (cut off, or hidden behind a sideways scroll),
#  thumbnails in the first row]
_THUMBNAIL_FIT = """() => { const box = document.querySelector('#lora_trainer_tags_gallery').getBoundingClientRect();
    const images = [...document.querySelectorAll('#lora_trainer_tags_gallery img')].map(i => i.getBoundingClientRect());
    return [images.filter(r => r.right > box.right + 1).length,
            images.filter(r => Math.abs(r.top - images[0].top) < 1).length]; }"""


def test_filter_replace_undo_redo_save_in_the_browser(page, app_folders, screenshot, open_tab):
    folder = app_folders["data"].parent / "tags200"  # the app's working folder: an allowed dataset root
    before = _make_folder(folder)
    page_info, status = _markdown(page, "lora_trainer_tags_page_info"), _markdown(page, "lora_trainer_tags_status")
    gallery = page.locator("#lora_trainer_tags_gallery")
    thumbnails_before = _thumbnails(app_folders["data"])

    open_tab("Dataset Tag Editor")
    page.locator("#lora_trainer_tags_folder textarea").fill(str(folder))
    page.click("#lora_trainer_tags_open")
    expect(status).to_contain_text(f"{IMAGES} images.", timeout=WAIT_MS)
    expect(page_info).to_contain_text(f"Page 1 of 5: images 1–{PAGE_SIZE} of {IMAGES} shown")
    expect(gallery.locator("img")).to_have_count(PAGE_SIZE)
    expect(gallery.locator("img").first).to_have_attribute("alt", "#1 img_000.png: 1girl, red_hair, smile")
    assert _thumbnails(app_folders["data"]) - thumbnails_before == PAGE_SIZE  # only the page shown was made
    # no step yet: the empty History keeps its column names (gradio 3 headed an empty update "1 2 3 4")
    expect(page.get_by_role("table", name="History").locator("thead")).to_contain_text("step")
    screenshot("opened")
    for width in (1024, 1280, 1400, 1600, 1920):  # a grid of thumbnails that fits the gallery's box at common widths
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(300)
        cut, first_row = page.evaluate(_THUMBNAIL_FIT)
        assert cut == 0 and 5 <= first_row <= 16, (width, cut, first_row)

    page.locator("#lora_trainer_tags_frequency").get_by_role("cell", name="smile", exact=True).click()
    expect(page.locator("#lora_trainer_tags_all_of textarea")).to_have_value("smile", timeout=WAIT_MS)
    expect(page_info).to_contain_text(f"Page 1 of 3: images 1–{PAGE_SIZE} of 100 shown ({IMAGES} in the folder)",
                                      timeout=WAIT_MS)
    expect(gallery.locator("img").nth(1)).to_have_attribute("alt", "#2 img_002.png: 1girl, red_hair, smile")
    screenshot("filtered")

    page.locator("#lora_trainer_tags_find textarea").fill("red_hair")
    page.locator("#lora_trainer_tags_replacement textarea").fill("crimson hair")
    page.click("#lora_trainer_tags_apply")
    expect(status).to_contain_text("Replace text: 100 image(s) changed (not saved yet).", timeout=WAIT_MS)
    expect(page_info).to_contain_text("100 unsaved")
    expect(gallery.locator("img").first).to_have_attribute("alt", "* #1 img_000.png: 1girl, crimson hair, smile")
    screenshot("replaced")

    page.click("#lora_trainer_tags_undo")
    expect(status).to_contain_text("Undone.", timeout=WAIT_MS)
    expect(page_info).to_contain_text("0 unsaved")
    expect(gallery.locator("img").first).to_have_attribute("alt", "#1 img_000.png: 1girl, red_hair, smile")
    expect(page.get_by_role("table", name="History")).to_contain_text("undone")
    screenshot("undone")

    page.click("#lora_trainer_tags_redo")
    expect(status).to_contain_text("Redone.", timeout=WAIT_MS)
    expect(page_info).to_contain_text("100 unsaved")
    expect(gallery.locator("img").first).to_have_attribute("alt", "* #1 img_000.png: 1girl, crimson hair, smile")
    assert _on_disk(before) == before  # nothing is written before Save
    screenshot("redone")

    page.click("#lora_trainer_tags_save")
    expect(status).to_contain_text("Saved 100 caption file(s). Backup:", timeout=WAIT_MS)
    expect(page_info).to_contain_text("0 unsaved")
    screenshot("saved")

    edited = {path for path, text in before.items() if "smile" in text}
    expected = {path: text.replace("red_hair", "crimson hair") if path in edited else text
                for path, text in before.items()}
    assert _on_disk(before) == expected  # the smiling images changed; "1boy, red_hair" outside the filter did not
    backups = list((folder / ".caption-backups").iterdir())
    assert len(backups) == 1 and backups[0].name in status.inner_text()
    assert {path.name: path.read_text(encoding="utf-8") for path in backups[0].rglob("*.txt")} == \
        {path.name: before[path] for path in edited}

    page.click("#lora_trainer_tags_train")
    dataset_box = page.locator("#lora_trainer_dataset textarea")
    expect(dataset_box).to_be_visible(timeout=WAIT_MS)  # the Train tab is shown, without a click on its title
    expect(dataset_box).to_have_value(str(folder))
