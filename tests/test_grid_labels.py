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
