"""The tag editor's view model: pages, frequency list, range selection, history."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_trainer.app.ui import tag_view
from lora_trainer.dataset import tag_editor
from lora_trainer.errors import UserError


@pytest.fixture
def editor(tmp_path: Path):
    for i in range(100):
        (tmp_path / f"img_{i:03d}.png").write_bytes(b"")
        (tmp_path / f"img_{i:03d}.txt").write_text("zkchar, red" if i % 4 == 0 else "zkchar, blue", encoding="utf-8")
    return tag_editor.open_folder(tmp_path)


def test_pages_hold_48_images_and_clamp_to_the_pages_there_are(editor):
    filtered = tag_editor.select(editor, tag_editor.TagFilter())
    first, last = tag_view.page_of(editor, filtered, 1), tag_view.page_of(editor, filtered, 99)
    assert len(first.images) == 48 and first.pages == 3 and first.first_index == 1
    assert last.number == 3 and len(last.images) == 4 and last.first_index == 97
    assert tag_view.page_text(last, 2, 1) == "Page 3 of 3: images 97–100 of 100 shown (100 in the folder); 2 selected; 1 unsaved"
    red = tag_editor.select(editor, tag_editor.TagFilter(all_of=("red",)))
    assert tag_view.page_of(editor, red, 1).filtered == 25


def test_frequency_rows_search_sort_and_limit():
    counts = [("zkchar", 100), ("blue", 75), ("red", 25)]
    assert tag_view.frequency_rows(counts) == [["zkchar", 100], ["blue", 75], ["red", 25]]
    assert tag_view.frequency_rows(counts, sort="name") == [["blue", 75], ["red", 25], ["zkchar", 100]]
    assert tag_view.frequency_rows(counts, query="E") == [["blue", 75], ["red", 25]]
    assert tag_view.frequency_rows(counts, limit=1) == [["zkchar", 100]]


def test_tag_search_finds_escaped_brackets_by_what_they_read():
    counts = [("hair \\(style\\)", 5), ("artist \\[name\\]", 3), ("smile", 2)]
    assert tag_view.frequency_rows(counts, query="(style)") == [["hair \\(style\\)", 5]]
    assert tag_view.frequency_rows(counts, query="\\(style") == [["hair \\(style\\)", 5]]
    assert tag_view.frequency_rows(counts, query="[name]") == [["artist \\[name\\]", 3]]


def test_range_selection_is_inclusive_in_either_order_and_checked(editor):
    filtered = tag_editor.select(editor, tag_editor.TagFilter())
    assert [p.name for p in tag_view.index_range(filtered, 5, 3)] == ["img_002.png", "img_003.png", "img_004.png"]
    with pytest.raises(UserError, match="from 1 to 100"):
        tag_view.index_range(filtered, 0, 3)
    assert tag_view.toggled(("a", "b"), "a") == ("b",) and tag_view.toggled(("b",), "a") == ("b", "a")


def test_history_lists_done_then_undone_steps(editor):
    edited = tag_editor.apply_edit(editor, tag_editor.RemoveTags(("red",)))
    edited = tag_editor.apply_edit(edited, tag_editor.Lowercase())  # changes nothing: no step
    edited = tag_editor.apply_edit(edited, tag_editor.AddTags(("solo",)))
    edited = tag_editor.undo(edited)
    assert tag_view.history_rows(edited) == [[1, "Remove red", "done", 25], [2, "Add solo at the end", "undone", 100]]


def test_filter_fields_and_clicked_tags():
    assert tag_view.filter_from_fields("a, b", "", "c", " x+ ", True) == tag_editor.TagFilter(("a", "b"), (), ("c",), "x+", True)
    assert tag_view.with_tag("a, b", "c") == "a, b, c" and tag_view.with_tag("a, b", "a") == "b"
