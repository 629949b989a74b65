"""The Dataset Tag Editor tab's handlers, called as the buttons call them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lora_trainer.app.ui import tag_editor_tab as tab

VIEW = {name: index for index, name in enumerate(tab.OUTPUTS)}


@pytest.fixture
def opened(services, make_dataset):
    folder = make_dataset("chars", "10_zkchar", count=60)
    view = tab.open_folder(services, tab.TabState(), str(folder), True, ".txt")
    return folder, view


def test_open_shows_one_page_with_thumbnails_and_tag_counts(services, opened):
    folder, view = opened
    state, gallery = view[VIEW["state"]], view[VIEW["gallery"]]
    assert state.session and len(gallery) == 48
    thumbnail, label = gallery[0]
    assert thumbnail.startswith(str(services.settings.data_folder / "thumbnails")) and label.startswith("#1 img_000.png: zkchar")
    assert view[VIEW["frequency"]].values.tolist()[0] == ["zkchar", 60]
    assert "Page 1 of 2" in view[VIEW["page_info"]]
    assert len(tab.go_to_page(services, state, 2)[VIEW["gallery"]]) == 12


def test_a_training_folder_opened_without_sub_folders_says_where_its_images_are(services, make_dataset):
    folder = make_dataset("chars", "10_zkchar", count=3)  # the Kohya training folder, chars/10_zkchar/…
    view = tab.open_folder(services, tab.TabState(), str(folder), False, ".txt")
    assert "0 images. No images in" in view[VIEW["status"]] and "(10_zkchar)" in view[VIEW["status"]]
    assert "Sub-folders too" in view[VIEW["status"]]


def test_folders_outside_the_dataset_roots_are_refused_in_the_status_line(services, tmp_path):
    view = tab.open_folder(services, tab.TabState(), str(tmp_path), False, ".txt")
    assert "outside the allowed folders" in view[VIEW["status"]] and not view[VIEW["state"]].session


def test_unsaved_edits_come_back_after_a_restart_said_in_the_status_line(services, opened, app_settings, fake_host):
    """Restarting the WebUI or the app (a crash, an update, a closed console) lost every unsaved caption edit."""
    from lora_trainer.app.services import Services

    folder, view = opened
    state = replace(view[VIEW["state"]], selection=("10_zkchar/img_000.png", "10_zkchar/img_001.png"))
    tab.batch_edit(services, state, "selected", "Add tags", "solo", "", "", False, False, False, 0)
    services.close()  # the app stops

    restarted = Services.create(app_settings, fake_host, start=False)
    try:
        view = tab.open_folder(restarted, tab.TabState(), str(folder), True, ".txt")
        status = view[VIEW["status"]]
        assert "Opened" in status and "Restored 2 unsaved caption edit(s) from " in status
        assert "(before the restart): Save them, or Undo to go back to the captions on disk." in status
        assert view[VIEW["page_info"]].endswith("; 2 unsaved")
        view = tab.undo(restarted, view[VIEW["state"]])
        assert view[VIEW["page_info"]].endswith("; 0 unsaved")
    finally:
        restarted.close()


def test_filter_batch_replace_undo_and_save_write_the_caption_files(services, opened):
    folder, view = opened
    state = view[VIEW["state"]]
    view = tab.set_filter(services, state, "red", "", "", "", False)
    assert "of 30 shown" in view[VIEW["page_info"]]
    view = tab.batch_edit(services, state, "filtered", "Add tags", "solo", "", "", False, False, True, 0)
    assert "30 image(s) changed" in view[VIEW["status"]]
    view = tab.batch_edit(services, state, "filtered", "Replace text", "", "red", "crimson", False, False, False, 0)
    assert view[VIEW["history"]].values.tolist()[-1] == [2, "Replace text 'red' with 'crimson'", "done", 30]
    assert "of 0 shown" not in view[VIEW["page_info"]] and "No image matches" in view[VIEW["page_info"]]
    view = tab.undo(services, state)
    assert view[VIEW["history"]].values.tolist()[-1][2] == "undone" and "of 30 shown" in view[VIEW["page_info"]]
    view = tab.save(services, state, False)
    assert "Saved 30 caption file(s)" in view[VIEW["status"]]
    captions = folder / "10_zkchar"
    assert (captions / "img_000.txt").read_text(encoding="utf-8") == "solo, zkchar, red, square"
    assert (captions / "img_001.txt").read_text(encoding="utf-8") == "zkchar, blue, circle"


def backups_list(view) -> dict:
    """The Backups list that Open, Save, Reload and Restore return after the view."""
    return view[len(tab.OUTPUTS)]


def test_a_regretted_save_is_restored_from_the_backups_list_and_restoring_again_undoes_it(services, opened):
    """A bad batch replace saved yesterday, the app restarted since: Undo is gone, the save's backup is not."""
    import re

    folder, view = opened
    state = view[VIEW["state"]]
    assert backups_list(view)["choices"] == []
    tab.batch_edit(services, state, "filtered", "Replace text", "", "red", "crimson", False, False, False, 0)
    view = tab.save(services, state, False)
    saved = backups_list(view)
    assert len(saved["choices"]) == 1 and saved["value"] == saved["choices"][0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d — 30 captions", saved["value"]), saved["value"]
    caption = folder / "10_zkchar" / "img_000.txt"

    tab.batch_edit(services, state, "filtered", "Add tags", "solo", "", "", False, False, False, 0)
    view = tab.restore(services, state, saved["value"])
    assert "60 caption edit(s) in" in view[VIEW["status"]] and "not saved: save or undo them first" in view[VIEW["status"]]
    assert caption.read_text(encoding="utf-8") == "zkchar, crimson, square"  # nothing restored over the edits
    tab.undo(services, state)

    view = tab.restore(services, state, saved["value"])
    assert caption.read_text(encoding="utf-8") == "zkchar, red, square"
    assert ["red", 30] in view[VIEW["frequency"]].values.tolist() and view[VIEW["page_info"]].endswith("; 0 unsaved")
    assert view[VIEW["status"]].startswith("Restored 30 caption file(s) from the backup of ")
    assert "restoring it (the newest) undoes this" in view[VIEW["status"]]
    after = backups_list(view)
    assert len(after["choices"]) == 2 and after["choices"][1] == saved["value"] and after["value"] == after["choices"][0]
    view = tab.restore(services, state, after["value"])  # the restore's own backup: the restore undone
    assert caption.read_text(encoding="utf-8") == "zkchar, crimson, square"
    assert ["crimson", 30] in view[VIEW["frequency"]].values.tolist() and len(backups_list(view)["choices"]) == 3

    assert "Pick a backup in 'Backups' first" in tab.restore(services, state, "")[VIEW["status"]]
    assert "is no longer in" in tab.restore(services, state, "2020-01-01 00:00:00 — 1 caption")[VIEW["status"]]


def test_unsaved_edits_are_not_dropped_by_opening_a_folder_or_reloading_the_page(services, opened, make_dataset):
    folder, view = opened
    state = view[VIEW["state"]]
    tab.batch_edit(services, state, "filtered", "Add tags", "solo", "", "", False, False, True, 0)
    other = make_dataset("others", "5_zk", count=2)
    view = tab.open_folder(services, state, str(other), True, ".txt")
    assert "60 caption edit(s) in" in view[VIEW["status"]] and "press Open again to drop them" in view[VIEW["status"]]
    assert view[VIEW["state"]].session == state.session  # still the edited folder
    # a reloaded page (a fresh state) reopening the folder finds its edits
    view = tab.open_folder(services, tab.TabState(), str(folder), True, ".txt")
    assert "with its 60 unsaved caption edit(s) from before" in view[VIEW["status"]]
    assert view[VIEW["state"]].session == state.session
    view = tab.open_folder(services, view[VIEW["state"]], str(other), True, ".txt")  # asked once more, then Open again
    view = tab.open_folder(services, view[VIEW["state"]], str(other), True, ".txt")
    assert "Opened" in view[VIEW["status"]] and "2 images" in view[VIEW["status"]]
    assert (folder / "10_zkchar" / "img_000.txt").read_text(encoding="utf-8") == "zkchar, red, square"  # never written


def test_selection_by_click_and_range_then_edit_only_those(services, opened):
    folder, view = opened
    state = view[VIEW["state"]]
    clicked = tab.click_image(services, state, 2)
    state = clicked[VIEW["state"]]
    assert state.selection == ("10_zkchar/img_002.png",) and clicked[-2:] == ("zkchar, red, square", "10_zkchar/img_002.png")
    state = tab.select_range(services, state, 4, 5)[VIEW["state"]]
    assert state.selection == ("10_zkchar/img_002.png", "10_zkchar/img_003.png", "10_zkchar/img_004.png")
    view = tab.batch_edit(services, state, "selected", "Remove tags", "zkchar", "", "", False, False, False, 0)
    assert "3 image(s) changed" in view[VIEW["status"]] and view[VIEW["frequency"]].values.tolist()[0] == ["zkchar", 57]
    view = tab.set_caption(services, replace(state, current="10_zkchar/img_010.png"), "new, caption")
    assert "#11 img_010.png: new, caption" in [label.lstrip("☑* ") for _, label in view[VIEW["gallery"]]]


def test_save_warns_when_a_caption_changed_on_disk(services, opened):
    folder, view = opened
    state = view[VIEW["state"]]
    tab.batch_edit(services, state, "filtered", "Lowercase", "", "", "", False, False, False, 0)
    tab.batch_edit(services, state, "filtered", "Add tags", "solo", "", "", False, False, False, 0)
    (folder / "10_zkchar" / "img_000.txt").write_text("edited elsewhere", encoding="utf-8")
    view = tab.save(services, state, False)
    assert "changed on disk" in view[VIEW["status"]] and "img_000.png" in view[VIEW["status"]]
    assert (folder / "10_zkchar" / "img_001.txt").read_text(encoding="utf-8") == "zkchar, blue, circle"  # nothing written
    view = tab.save(services, state, True)
    assert (folder / "10_zkchar" / "img_000.txt").read_text(encoding="utf-8") == "zkchar, red, square, solo"


def test_tools_report_missing_pieces_clearly(services, opened):
    folder, view = opened
    state = view[VIEW["state"]]
    view = tab.autotag(services, state, "filtered", "WD14 (ONNX folder)", str(folder / "nope"), 0.35, 0.85, "skip", "")
    assert "does not exist" in view[VIEW["status"]]
    view = tab.autotag(services, state, "filtered", "DeepBooru", "", 0.35, 0.85, "skip", "")
    assert "needs the WebUI's interrogator" in view[VIEW["status"]]
    assert "Samples per epoch" in tab.health_report(services, str(folder), "zkchar")
    out = folder.parent / "prepared"
    assert "Wrote 60 images" in tab.preprocess(services, str(folder), str(out), 64, "centre", False, 0, False)
    assert tab.click_tag([["red", 30], ["blue", 30]], 1, "red") == "red, blue"


def test_the_tab_builds(services):
    assert tab.build(services) is not None


def test_sort_by_frequency_from_the_batch_form(services, opened):
    folder, view = opened
    state = view[VIEW["state"]]
    view = tab.batch_edit(services, state, "filtered", "Sort tags", "", "", "", False, False, False, 0, "frequency", False)
    assert view[VIEW["history"]].values.tolist()[-1][1:] == ["Sort tags by frequency", "done", 60]
    tab.save(services, state, False)
    assert (folder / "10_zkchar" / "img_000.txt").read_text(encoding="utf-8") == "red, square, zkchar"  # 30, 30 (ties by name), 60


def test_thumbnails_show_what_trains_and_a_bomb_is_a_grey_square(tmp_path, monkeypatch):
    """A 16-bit PNG showed solid white (training sees its gradient), a transparent picture its hidden pixels (training
    puts them on white), and a scan over Pillow's pixel limit broke the page."""
    import numpy as np
    from PIL import Image

    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # mode I;16
    hidden = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # red, fully transparent
    hidden.save(tmp_path / "clear.png")
    thumbs = tmp_path / "thumbs"
    deep = np.asarray(Image.open(tab.thumbnail(tmp_path / "deep.png", thumbs)).convert("L"), dtype=int)
    assert deep[:, 0].mean() < 40 and deep[:, -1].mean() > 215  # dark to light, as training reads it
    assert np.asarray(Image.open(tab.thumbnail(tmp_path / "clear.png", thumbs))).min() > 240  # white, not red
    Image.new("RGB", (80, 80), (0, 0, 255)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 80×80 is over twice that: a bomb to Pillow
    bomb = tab.thumbnail(tmp_path / "bomb.png", thumbs)
    monkeypatch.undo()
    assert Image.open(bomb).getpixel((0, 0)) == (90, 90, 90)


def test_a_file_name_that_is_not_utf8_shows_instead_of_breaking_the_page(services, make_dataset):
    """GBK bytes unpacked on Linux: the label held lone surrogates, which the browser's JSON cannot carry."""
    import os

    folder = make_dataset("gbk", "10_zkchar", count=2)
    name = os.fsdecode("星".encode("gbk")) + ".png"
    try:
        (folder / "10_zkchar" / "img_001.png").rename(folder / "10_zkchar" / name)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    view = tab.open_folder(services, tab.TabState(), str(folder / "10_zkchar"), False, ".txt")
    labels = [label for _, label in view[VIEW["gallery"]]]
    assert any("\ufffd\ufffd.png" in label for label in labels)
    for text in [*labels, view[VIEW["status"]], view[VIEW["page_info"]]]:
        text.encode("utf-8")  # what gradio's JSON does with every string


def test_the_health_report_names_a_few_files_of_each_kind_of_finding(services, make_dataset):
    folder = make_dataset(count=8)  # no caption has the trigger zkstar
    text = tab.health_report(services, str(folder), "zkstar")
    assert text.count("missing-trigger") == 6 and "missing-trigger      … and 3 more (8 in all)" in text


def _with_links_leading_outside(folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    """``folder`` with b.png -> outside/secret.png (red) and img_001.txt -> outside/secret.txt ("secretword")."""
    from PIL import Image

    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (16, 16), (250, 0, 0)).save(outside / "secret.png")
    (outside / "secret.txt").write_text("secretword", encoding="utf-8")
    (folder / "b.png").symlink_to(outside / "secret.png")
    (folder / "img_001.txt").unlink()
    (folder / "img_001.txt").symlink_to(outside / "secret.txt")
    return folder, outside


def test_links_leading_outside_the_allowed_folders_are_not_shown_nor_made_thumbnails(services, make_dataset, tmp_path):
    """The tab shares the API's sessions: a picture or caption linked to a file elsewhere showed its content."""
    from PIL import Image

    folder, outside = _with_links_leading_outside(make_dataset("links", "10_zkchar", count=2) / "10_zkchar", tmp_path)
    view = tab.open_folder(services, tab.TabState(), str(folder), False, ".txt")
    assert [label.split(": ")[0] for _, label in view[VIEW["gallery"]]] == ["#1 img_000.png"]
    assert ("Not shown: b.png, img_001.txt are links leading outside the allowed folders" in view[VIEW["status"]]
            and "secretword" not in view[VIEW["frequency"]].to_string())
    assert "secretword" not in tab.health_report(services, str(folder.parent), "")
    # a link made after the folder was read: a grey square, the picture unread
    (folder / "img_000.png").unlink()
    (folder / "img_000.png").symlink_to(outside / "secret.png")
    (thumbnail, _), = tab.render(services, view[VIEW["state"]])[VIEW["gallery"]]
    assert Image.open(thumbnail).getpixel((0, 0)) == (90, 90, 90)


def test_preprocess_leaves_out_pictures_and_captions_that_are_links_leading_outside_the_dataset_folders(
        services, make_dataset, tmp_path):
    """Preprocess copied raw/b.png -> /outside/secret.png and b.txt -> /outside/secret.txt into the prepared folder,
    where the Tag Editor then showed them as the dataset's own."""
    raw, _ = _with_links_leading_outside(make_dataset("raw", "10_zkchar", count=2) / "10_zkchar", tmp_path)
    out = services.settings.dataset_roots[0] / "prepared"
    status = tab.preprocess(services, str(raw), str(out), 64, "centre", False, 0, False)
    assert "Wrote 1 images" in status and ("Not prepared: b.png, img_001.txt are links leading outside the allowed "
                                           "folders" in status), status
    assert sorted(path.name for path in out.rglob("*")) == ["img_000.png", "img_000.txt"]
    assert not any(b"secretword" in path.read_bytes() for path in out.rglob("*") if path.is_file())
    (raw / "img_000.png").unlink()
    status = tab.preprocess(services, str(raw), str(out.with_name("again")), 64, "centre", False, 0, False)
    assert status == ("⚠ Nothing was written: b.png, img_001.txt are links leading outside the allowed folders, so they "
                      "are not read here; copy what they link to into the dataset, or allow those folders.")


def test_links_to_the_data_folder_are_not_read_it_is_no_dataset_folder(services, make_dataset):
    """img_001.txt -> <data>/jobs/1/webhook.url showed the job's webhook URL as tags: links were held to every allowed
    folder, the data folder among them."""
    job = services.settings.data_folder / "jobs" / "1"
    job.mkdir(parents=True)
    (job / "webhook.url").write_text("https://hooks.example/secrettoken", encoding="utf-8")
    folder = make_dataset("hooks", "10_zkchar", count=2) / "10_zkchar"
    (folder / "img_001.txt").unlink()
    (folder / "img_001.txt").symlink_to(job / "webhook.url")
    view = tab.open_folder(services, tab.TabState(), str(folder), False, ".txt")
    assert [label.split(": ")[0] for _, label in view[VIEW["gallery"]]] == ["#1 img_000.png"]
    assert "Not shown: img_001.txt is a link leading outside the allowed folders" in view[VIEW["status"]]
    assert "secrettoken" not in view[VIEW["frequency"]].to_string()
    report = tab.health_report(services, str(folder.parent), "")
    assert "secrettoken" not in report and "img_001.txt is a link leading outside" in report, report
