"""The Dataset Tag Editor's edits and the dataset preparation around it as an artist meets them: the caption files
after a save, the lines ``dataset tags`` prints, the health report's findings, what ``dataset prep`` writes and the
tags a tagger keeps. Each test pins a behaviour that a mutation review found untested."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from lora_trainer.cli import main
from lora_trainer.dataset.captions import tag_frequency_without
from lora_trainer.dataset.health import check_dataset, token_count_problem
from lora_trainer.dataset.preprocess import PrepSettings, face_folder_name, plan_face_crop, prepare_dataset
from lora_trainer.dataset.tag_editor import (AddTags, ReplaceText, SortTags, apply_edit, folder_notes, open_folder,
                                             save)
from lora_trainer.dataset.tagger import Label, TagSelection, select_tags


def folder_of(root: Path, captions: dict[str, str | None], size: tuple[int, int] = (8, 8)) -> Path:
    """PNGs named by ``captions``' keys, each with that caption (None: no caption file)."""
    root.mkdir(parents=True, exist_ok=True)
    for stem, caption in captions.items():
        Image.new("RGB", size, (200, 120, 40)).save(root / f"{stem}.png")
        if caption is not None:
            (root / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return root


def saved_captions(folder: Path, edit, images=None) -> dict[str, str]:
    """The caption files after ``edit`` and a save."""
    editor = open_folder(folder)
    save(apply_edit(editor, edit, None if images is None else [folder / name for name in images]))
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.txt"))}


# ---------------------------------------------------------------------------------------------------------------
# Batch edits: the caption files after Save.


def test_adding_a_tag_typed_twice_writes_it_once(tmp_path):
    folder = folder_of(tmp_path / "10_zkstar", {"a": "zkstar, smile"})
    assert saved_captions(folder, AddTags(("solo", "solo"))) == {"a": "zkstar, smile, solo"}


def test_replacing_a_word_by_nothing_leaves_no_stray_space_in_the_caption(tmp_path):
    """"red hair" with "red" replaced by nothing is the tag "hair", not " hair" (which the file would keep as a
    double space and the tag list would count apart from "hair")."""
    folder = folder_of(tmp_path / "10_zkstar", {"a": "zkstar, red hair, hair ribbon"})
    assert saved_captions(folder, ReplaceText("red", "")) == {"a": "zkstar, hair, hair ribbon"}


def test_a_whole_caption_replace_that_removes_the_last_tag_leaves_no_trailing_comma(tmp_path):
    folder = folder_of(tmp_path / "10_zkstar", {"a": "zkstar, red circle, blue_background"})
    assert saved_captions(folder, ReplaceText("blue_background", "", whole_caption=True)) == {"a": "zkstar, red circle"}


def test_an_alphabetical_sort_ignores_case_as_a_reader_expects(tmp_path):
    folder = folder_of(tmp_path / "10_zkstar", {"a": "zkstar, Zebra print, apple, Apple"})
    assert saved_captions(folder, SortTags(keep_first=1)) == {"a": "zkstar, Apple, apple, Zebra print"}


def test_a_caption_ending_in_blank_lines_is_not_called_multi_line(tmp_path):
    """An editor that saves "tags\\n\\n" adds no line sd-scripts could train on: no note about lines after the first."""
    folder = folder_of(tmp_path / "10_zkstar", {"a": "zkstar, smile\n\n", "b": "zkstar\n \n"})
    assert folder_notes(open_folder(folder)) == []


# ---------------------------------------------------------------------------------------------------------------
# ``dataset tags``: what it prints and when it refuses.


def test_the_command_shows_three_changed_captions_per_edit(tmp_path, capsys):
    folder = folder_of(tmp_path / "10_zkstar", {name: "smile" for name in "abcd"})
    assert main(["dataset", "tags", str(folder), "--add-front", "zkstar", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "→" in line] == [
        f"  {name}.png: 'smile' → 'zkstar, smile'" for name in "abc"]
    assert "Add zkstar at position 0: 4 caption(s)" in out


def test_a_picture_with_only_a_dot_caption_file_stops_the_command_only_when_an_edit_would_change_it(tmp_path, capsys):
    """``--remove`` of a tag the .caption-only picture does not have changes nothing of it: no second caption file
    would be written, so there is nothing to refuse."""
    folder = folder_of(tmp_path / "10_zkstar", {"a": "zkstar, red", "b": None})
    (folder / "b.caption").write_text("zkstar, blue", encoding="utf-8")
    assert main(["dataset", "tags", str(folder), "--remove", "red"]) == 0
    assert (folder / "a.txt").read_text(encoding="utf-8") == "zkstar" and not (folder / "b.txt").exists()
    assert main(["dataset", "tags", str(folder), "--add", "solo"]) == 2
    assert "have no .txt caption but a .caption one beside them: nothing was changed" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The health report.


def test_a_caption_of_exactly_the_tokens_read_gets_no_warning():
    assert token_count_problem(75) is None and token_count_problem(150, 150) is None
    assert token_count_problem(76)[0] == "caption-over-75" and token_count_problem(151, 150)[0] == "caption-over-150"


def test_an_image_enlarged_exactly_twice_is_called_too_small(tmp_path):
    folder_of(tmp_path / "10_zkstar", {"half": "zkstar"}, size=(256, 256))
    (finding,) = [finding for finding in check_dataset(tmp_path).findings if finding.path == "10_zkstar/half.png"]
    assert finding.kind == "too-small" and "is enlarged 2.0x to fill the 512x512 bucket" in finding.message


def test_a_caption_file_of_spaces_is_a_blank_caption_not_the_empty_file_sd_scripts_stops_on(tmp_path):
    folder_of(tmp_path / "10_zkstar", {"a": " \n", "b": ""})
    findings = {finding.path: finding for finding in check_dataset(tmp_path).findings if finding.path.endswith(".txt")}
    assert findings["10_zkstar/a.txt"].severity == "warning" and findings["10_zkstar/a.txt"].kind == "blank-first-line"
    assert findings["10_zkstar/b.txt"].severity == "error" and findings["10_zkstar/b.txt"].kind == "empty-caption"


def test_a_crop_cutting_off_exactly_five_percent_is_listed(tmp_path):
    folder_of(tmp_path / "10_zkstar", {"a": "zkstar"}, size=(512, 512))
    report = check_dataset(tmp_path)
    report = replace(report, images=tuple(replace(image, cut_off=0.05) for image in report.images))
    assert "Crops cutting off 5% or more: 1 image(s) (largest: 10_zkstar/a.png 5%)" in report.to_text()


# ---------------------------------------------------------------------------------------------------------------
# ``dataset prep``.


def test_pictures_already_at_the_size_are_not_listed_as_enlarged(tmp_path):
    source = folder_of(tmp_path / "raw" / "10_zkstar", {"a": "zkstar"}, size=(64, 64)).parent
    summary = prepare_dataset(source, tmp_path / "prepared", PrepSettings(size=64)).summary()
    assert summary.startswith("Wrote 1 images") and "Enlarged" not in summary


def test_a_face_enlarged_exactly_twice_still_gets_its_close_up():
    plan = plan_face_crop((512, 512), (192, 192, 320, 320), PrepSettings(size=512))
    assert plan is not None and plan.scale == 2.0 and plan.source_box == (128.0, 128.0, 384.0, 384.0)


def test_the_face_folder_of_a_nested_picture_is_named_after_its_concept_folder():
    assert face_folder_name(3, Path("10_zkstar/outfits"), "raw") == "3_zkstar face"


# ---------------------------------------------------------------------------------------------------------------
# The tagger and the tag counts a LoRA carries.


def test_a_tag_at_exactly_its_threshold_is_kept_as_sd_scripts_keeps_it():
    labels = [Label("solo", 0), Label("zkchar_(artist)", 4), Label("sky", 0)]
    probabilities = np.array([0.5, 0.75, 0.25], dtype=np.float32)
    kept = select_tags(probabilities, labels, TagSelection(general_threshold=0.5, character_threshold=0.75))
    assert kept == {"zkchar (artist)": 0.75, "solo": 0.5}


def test_a_tag_no_image_keeps_leaves_the_tag_counts_a_lora_carries():
    frequency = {"10_zkstar": {"zkstar": 2, "unreadable tag": 1}}
    assert tag_frequency_without(frequency, "10_zkstar", ["zkstar, unreadable tag"]) == {"10_zkstar": {"zkstar": 1}}
