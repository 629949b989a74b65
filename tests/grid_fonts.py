"""A font file made for a test: the grid's labels in a font that has their characters, where no such font is
installed (CI has no CJK font)."""

from __future__ import annotations

from pathlib import Path

import pytest

FAMILY = ("Grid Test CJK", "Regular")  # the made font's getname()


def font_with(path: Path, characters: str) -> Path:
    """A TrueType font that draws each of ``characters`` as a filled square (and nothing else: its missing-glyph box
    is empty), standing in for a CJK system font where none is installed."""
    fontBuilder = pytest.importorskip("fontTools.fontBuilder")
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    square = TTGlyphPen(None)
    square.moveTo((100, 0))
    square.lineTo((100, 700))
    square.lineTo((900, 700))
    square.lineTo((900, 0))
    square.closePath()
    builder = fontBuilder.FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder([".notdef", "square"])
    builder.setupCharacterMap({ord(character): "square" for character in set(characters)})
    builder.setupGlyf({".notdef": TTGlyphPen(None).glyph(), "square": square.glyph()})
    builder.setupHorizontalMetrics({".notdef": (500, 0), "square": (1000, 100)})
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": FAMILY[0], "styleName": FAMILY[1]})
    builder.setupOS2(sTypoAscender=800, sTypoDescender=-200, usWinAscent=800, usWinDescent=200)
    builder.setupPost()
    builder.save(str(path))
    return path
