"""The grid's picture: labels in a font that draws their characters (Chinese and Japanese among them)."""

from __future__ import annotations

import logging

import pytest
from PIL import Image, ImageFont

from grid_fonts import FAMILY, font_with

from lora_trainer.grid import render
from lora_trainer.grid.render import assemble, find_fallback_fonts, label_font, undrawable

CJK_LABEL = "red background, 蓝色背景"


@pytest.fixture
def no_font_said(monkeypatch):
    monkeypatch.setattr(render, "_said_no_font", [])


def test_the_default_font_has_no_chinese_glyphs():
    assert undrawable(render._default_font(12), CJK_LABEL) == set("蓝色背景")


def test_a_chinese_label_falls_back_to_an_installed_cjk_font(tmp_path, monkeypatch, no_font_said, caplog):
    """``--x 'prompt:red background, 蓝色背景'`` drew □□□□: Pillow's default font has no CJK glyph."""
    cjk = font_with(tmp_path / "NotoSansCJK-Regular.ttc", CJK_LABEL)
    monkeypatch.setattr(render, "system_fallback_fonts", lambda: (cjk,))
    font = label_font(12, CJK_LABEL)
    assert font.getname() == FAMILY and undrawable(font, CJK_LABEL) == set()
    # a label of Latin letters keeps Pillow's font
    assert label_font(12, "red background").getname() != FAMILY
    assert not caplog.records


def test_without_a_cjk_font_the_grid_is_drawn_and_the_log_says_once_what_to_install(monkeypatch, no_font_said, caplog):
    monkeypatch.setattr(render, "system_fallback_fonts", lambda: ())
    cells = [[Image.new("RGB", (64, 64), "red")] * 2]
    with caplog.at_level(logging.WARNING, logger="lora_trainer.grid.render"):
        for _ in range(2):
            assert assemble(cells, ["蓝色"], ["no LoRA", "蓝色背景"], "zkstar", "").size[0] > 128
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 1 and "蓝色背景" in said[0] and "Noto Sans CJK" in said[0]


def test_a_bitmap_font_draws_chinese_labels_as_question_marks_instead_of_failing(monkeypatch, no_font_said):
    """Pillow < 10.1 (the WebUI pins 9.5) has only a Latin-1 bitmap font: a Chinese label raised UnicodeEncodeError
    after every cell had been drawn, and the grid was lost."""
    bitmap = ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") else None
    if bitmap is None:
        pytest.skip("Pillow < 10.1 draws with its bitmap font already")
    monkeypatch.setattr(render, "_default_font", lambda size: bitmap)
    monkeypatch.setattr(render, "system_fallback_fonts", lambda: ())
    grid = assemble([[Image.new("RGB", (64, 64), "red")]], ["蓝色"], ["背景"], "蓝色背景 | seed 1", "")
    assert grid.width > 64


def test_the_hosts_own_grid_font_labels_the_grid(tmp_path, no_font_said):
    """The WebUI's setting "Font for image grids that have text" (a Chinese user's font there) labels our grid."""
    own = font_with(tmp_path / "own.ttf", CJK_LABEL)
    assert label_font(12, CJK_LABEL, own).getname() == FAMILY
    assert label_font(12, "red", tmp_path / "missing.ttf").getname() != FAMILY  # unreadable: Pillow's


def test_fallback_fonts_are_found_by_name_in_the_font_folders_preferred_first(tmp_path):
    for name in ("DejaVuSans.ttf", "wqy-zenhei.ttc", "noto/NotoSansCJK-Bold.ttc", "noto/NotoSansCJK-Regular.ttc",
                 "msyh.ttc", "Arial.ttf", "NotoSansCJK-Regular.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [path.relative_to(tmp_path).as_posix() for path in find_fallback_fonts([tmp_path, tmp_path / "none"])] == [
        "msyh.ttc", "noto/NotoSansCJK-Regular.ttc", "noto/NotoSansCJK-Bold.ttc", "wqy-zenhei.ttc", "DejaVuSans.ttf"]


def text_boxes(layout) -> dict[str, list[tuple[int, int, int, int]]]:
    """Each drawn text's box, as Pillow measures it in the layout's font."""
    from PIL import ImageDraw

    from lora_trainer.grid.render import LINE_SPACING

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def boxes(texts):
        return [measure.multiline_textbbox(at, text, font=layout.font, spacing=LINE_SPACING) for at, text in texts]

    return {"title": boxes([layout.title]), "columns": boxes(layout.column_labels), "rows": boxes(layout.row_labels)}


@pytest.mark.parametrize("columns", [
    ["no LoRA", "blue background, simple", "red background", "zkstar_trigger_word_of_a_long_run"],
    ["no LoRA", "蓝色背景，简单的背景", "蓝色背景"],
])
def test_labels_and_the_title_stay_inside_their_room_on_64_px_cells(columns, tmp_path, monkeypatch, no_font_said):
    """At 64 px cells the title was cut off ("…4 steps, CFG!") and "blue background, simple" ran into the next
    column's label: each is wrapped (by words, a longer word or Chinese between characters) to its column."""
    import string

    from lora_trainer.grid.render import grid_layout

    cjk = font_with(tmp_path / "NotoSansCJK-Regular.ttc", string.printable + "".join(columns))
    monkeypatch.setattr(render, "system_fallback_fonts", lambda: (cjk,))
    rows = ["epoch 1 (10 steps)\n* recommended\nval loss 0.1500", "epoch 2 (20 steps)\nval loss 0.1700"]
    title = "zkstar, shapes, simple background | seed 11 | DPM++ 2M Karras, 4 steps, CFG 5, 64x64"
    cells = [[Image.new("RGB", (64, 64), "red")] * len(columns)] * len(rows)
    legend = "Lora hashes: tinylora-000001: 0123456789ab, tinylora: ba9876543210"
    grid, layout = assemble(cells, rows, columns, title, legend), grid_layout((64, 64), rows, columns, title, legend)
    assert grid.size == layout.size
    boxes = text_boxes(layout)
    left, top = layout.cells_at
    for c, ((_, text), box) in enumerate(zip(layout.column_labels, boxes["columns"])):
        assert left + 64 * c <= box[0] and box[2] <= left + 64 * (c + 1), (text, box)  # inside its own column
        assert box[1] >= boxes["title"][0][3] and box[3] <= top  # below the title, above the cells
        assert text.replace("\n", "").replace(" ", "") == columns[c].replace(" ", "")  # every character, in order
    assert layout.column_labels[1][1].count("\n") >= 1  # the long label wrapped
    title_box = boxes["title"][0]
    assert title_box[0] >= 0 and title_box[2] <= grid.width and layout.title[1].replace("\n", " ") == title
    assert all(box[2] <= left for box in boxes["rows"])  # row labels left of the cells
    assert layout.title[1].count("\n") >= 1  # wrapped, not cut off at the grid's edge



def test_a_row_label_taller_than_its_row_is_cut_to_its_row_and_never_reaches_the_legend(no_font_said):
    """A long prompt-axis row label at 64 px cells started above its row, ran into the next row's label, and on the
    last row over the Lora hashes legend."""
    from lora_trainer.grid.render import grid_layout

    long = "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile, outdoors, blue sky, city"
    rows = [long * 2, long * 2, "short"]
    layout = grid_layout((64, 64), rows, ["no LoRA", "1"], "zkstar", "Lora hashes: a: 0123456789ab")
    boxes = text_boxes(layout)
    top = layout.cells_at[1]
    for r, box in enumerate(boxes["rows"]):
        assert top + 64 * r <= box[1] and box[3] <= top + 64 * (r + 1), (r, box)  # inside its own row
    assert layout.row_labels[0][1].endswith("…") and layout.row_labels[2][1] == "short"
    assert boxes["rows"][-1][3] <= layout.legend[0][1]


def test_a_long_word_is_broken_between_the_characters_a_reader_sees(no_font_said):
    """Broken between code points, an accent written on its own (macOS file names) began a line, and an emoji family
    fell apart at its joiners."""
    from lora_trainer.grid.render import grid_layout

    decomposed = "cafe\u0301" * 12  # NFD, as macOS stores names
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467" * 8
    thai, flags = "\u0e01\u0e34\u0e19" * 12, "\U0001F1EF\U0001F1F5" * 12  # a vowel mark above; two letters a flag
    for label in (decomposed, family, thai, flags):
        text = grid_layout((64, 64), ["1"], [label], "", "").column_labels[0][1]
        lines = text.split("\n")
        assert len(lines) > 1
        assert not any(line[0] in "\u0301\u200d\u0e34" or line[-1] == "\u200d" for line in lines)
        if label == flags:
            assert all(len(line) % 2 == 0 for line in lines)  # never half a flag


def test_the_missing_font_advice_names_a_cjk_font_only_for_east_asian_text(monkeypatch, no_font_said, caplog):
    monkeypatch.setattr(render, "system_fallback_fonts", lambda: ())
    with caplog.at_level(logging.WARNING, logger="lora_trainer.grid.render"):
        label_font(12, "zkstar \U0001F468\u200d\U0001F469")
    said = caplog.records[-1].getMessage()
    assert "a font that has them" in said and "CJK" not in said


def test_a_64_px_columns_recommended_epoch_keeps_its_words_whole():
    """"* recommended" under an epoch on 64 px cells was broken mid-word at the smallest font (10 px): a word that
    fits the column stays whole, and "recommended", which does not, takes its short form."""
    from lora_trainer.grid.plan import recommended_label
    from lora_trainer.grid.render import grid_layout

    label = recommended_label("epoch 1 (10 steps)\nval loss 0.1500")
    layout = grid_layout((64, 64), ["strength 1"], ["no LoRA", label, "epoch 2 (20 steps)\nval loss 0.1700"])
    lines = layout.column_labels[1][1].split("\n")
    assert "* rec." in lines
    words = set(label.split()) | {"rec."}
    assert all(word in words for line in lines for word in line.split()), lines  # no word cut in two
    assert [word for line in layout.column_labels[2][1].split("\n") for word in line.split()] == \
        "epoch 2 (20 steps) val loss 0.1700".split()
