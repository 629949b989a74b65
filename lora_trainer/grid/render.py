"""A grid's picture and files: the labelled image assembled from its cells, and every cell saved as a PNG with its
infotext. What the cells are and how they are generated is ``plan.py``'s."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..errors import UserError
from ..sampling.txt2img import write_png

# The X/Y/Z plot's grid keys (Script, X Type, X Values, Fixed X Values…) under a "Grid" prefix: the WebUI's "Send to
# txt2img" pastes "Script" into its script list, and 1.10 fails the whole paste on a title it lacks (scripts.py,
# onload_script_visibility: self.titles.index); "X Type" goes into the X/Y/Z plot's type list, where "strength" is
# none of its choices. Keys it does not know it leaves alone.
GRID_KEY, GRID_NAME = "Grid", "Prompt-Lora-Grid"
_PARAMETER = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # the WebUI's re_param (infotext_utils)

log = logging.getLogger(__name__)


@dataclass
class GridResult:
    image: Image.Image
    cells: list[list[Image.Image]]
    seconds: float
    switching_seconds: float
    path: Path | None = None
    cell_paths: list[Path] = field(default_factory=list)
    stopped: bool = False  # interrupted: the cells not generated are grey
    finished: int = 0  # distinct cells generated (identical cells are drawn once)
    total: int = 0  # distinct cells planned
    infotexts: list[list[str]] = field(default_factory=list)  # each cell's, "" for one not generated
    warnings: list[str] = field(default_factory=list)  # what drawing it went wrong in (labels no font draws)


def _default_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 (the WebUI pins 9.5): a bitmap font of one size, Latin-1 only
        return ImageFont.load_default()


def _font_file(path: str | Path, size: int):
    """The font in ``path`` (the first of a .ttc collection), or None where it cannot be read."""
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:
        return None


# File names of the fonts a label falls back to, preferred first, matched case-insensitively at the start of a
# file's name: those that draw Chinese, Japanese and Korean as Windows (%WINDIR%\Fonts), macOS and Linux (Noto Sans
# CJK, WenQuanYi, Droid Sans Fallback) install them, then wide Latin, Greek and Cyrillic ones. Pillow's default font
# has none of their characters (nor é): 蓝色背景 was drawn as four boxes.
FALLBACK_FONT_NAMES = ("msyh.", "msgothic.", "simhei.", "yugothr.", "malgun.", "pingfang.", "hiragino sans gb.",
                       "ヒラギノ角ゴシック w3.", "stheiti light.", "applesdgothicneo.", "arial unicode.", "notosanscjk",
                       "notoserifcjk", "sourcehansans", "notosanssc-", "notosansjp-", "notosanstc-", "notosanskr-",
                       "wqy-microhei.", "wqy-zenhei.", "droidsansfallback", "segoeui.", "dejavusans.")


def font_folders() -> list[Path]:
    """Where this system keeps its fonts (the user's own too)."""
    home = Path.home()
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        return [Path(os.environ.get("WINDIR", r"C:\Windows")) / "Fonts",
                *([Path(local) / "Microsoft" / "Windows" / "Fonts"] if local else [])]
    if sys.platform == "darwin":
        return [Path("/System/Library/Fonts"), Path("/Library/Fonts"), home / "Library" / "Fonts"]
    return [Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), home / ".local" / "share" / "fonts",
            home / ".fonts"]


def find_fallback_fonts(folders: list[Path]) -> list[Path]:
    """The font files in ``folders`` (searched recursively) that ``FALLBACK_FONT_NAMES`` names, in its order of
    preference, regular weights before bold or light ones of the same name."""
    found = []
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                lowered = unicodedata.normalize("NFC", name).lower()  # macOS may list ギ as キ and a mark
                rank = next((i for i, prefix in enumerate(FALLBACK_FONT_NAMES) if lowered.startswith(prefix)), None)
                if rank is not None and lowered.endswith((".ttf", ".ttc", ".otf", ".otc")):
                    weighted = any(weight in lowered for weight in ("bold", "black", "heavy", "light", "thin", "medium"))
                    found.append((rank, weighted and "regular" not in lowered, lowered, Path(root) / name))
    return [path for *_, path in sorted(found)]


@functools.cache
def system_fallback_fonts() -> tuple[Path, ...]:
    """``find_fallback_fonts`` over this system's font folders, searched once a process."""
    return tuple(find_fallback_fonts(font_folders()))


def undrawable(font, text: str) -> set[str]:
    """The characters of ``text`` that ``font`` has no glyph for: it draws them as its missing-glyph box (the glyph
    of a character no font has), or, as a bitmap font, cannot draw them at all (beyond Latin-1). Spaces are never
    missing."""
    def glyph(character: str):
        mask = font.getmask(character)
        return mask.size, bytes(mask)

    try:
        box = glyph("\U0010FFFF")
    except UnicodeEncodeError:  # a bitmap font: Latin-1 only, and no box
        box = None
    missing = set()
    for character in set(text) - set(" \t\n"):
        try:
            if glyph(character) == box:
                missing.add(character)
        except UnicodeEncodeError:
            missing.add(character)
    return missing


def label_font(size: int, text: str, font_file: str | Path | None = None, undrawn: dict[str, None] | None = None):
    """The font a grid's texts (all of them in ``text``) are drawn in: ``font_file`` (the host's own, such as the
    WebUI's grid font) or Pillow's default; where it has no glyph for some of their characters (Chinese, Japanese,
    Korean), the installed font that draws them all, else the most of them (``system_fallback_fonts``, the first of
    equals). Characters that stay boxes are added to ``undrawn``, whose owner says them in one warning for the whole
    grid (``no_font_advice``: the Grid tab, the API's grid record and the grid command show it); without one, the log
    says once a process which font to install."""
    font = (_font_file(font_file, size) if font_file else None) or _default_font(size)
    missing = undrawable(font, text)
    for path in system_fallback_fonts() if missing else ():
        fallback = _font_file(path, size)
        if fallback is not None and len(fewer := undrawable(fallback, text)) < len(missing):
            font, missing = fallback, fewer
            if not missing:
                break
    in_order = "".join(character for character in dict.fromkeys(text) if character in missing)
    if in_order and undrawn is not None:
        undrawn.update(dict.fromkeys(in_order))
    elif in_order and not _said_no_font:
        _said_no_font.append(in_order)
        log.warning("Prompt-Lora-Grid: %s", no_font_advice(in_order))
    return font


_said_no_font: list[str] = []  # what the log said: once a process, not at every drawing


_EAST_ASIAN_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO", "IDEOGRAPHIC", "FULLWIDTH", "HALFWIDTH")


def no_font_advice(missing: str) -> str:
    """What to install so that the characters ``missing`` are drawn, in one sentence."""
    east_asian = any(unicodedata.name(character, "").startswith(_EAST_ASIAN_SCRIPTS) for character in missing)
    install = ("a CJK font (Noto Sans CJK: fonts-noto-cjk on Debian and Ubuntu, google-noto-sans-cjk-fonts on Fedora; "
               "Windows and macOS come with one)" if east_asian else "a font that has them")
    return (f"no font installed here draws {missing} of the grid's labels: they show as boxes; install {install}, or, "
            "in the WebUI, name a font file that has them in its setting \"Font for image grids that have text\"")


def drawable(text: str, font) -> str:
    """``text`` as ``font`` can draw it: a bitmap font (Pillow < 10.1) raises on characters beyond Latin-1 where a
    TrueType font draws a box, so those become "?"."""
    if isinstance(font, ImageFont.ImageFont):
        return text.encode("latin-1", "replace").decode("latin-1")
    return text


def grid_font_file(host) -> str | None:
    """The font file ``host`` labels its own grids in (the WebUI's setting "Font for image grids that have text",
    else its Roboto), or None: Pillow's default."""
    font = getattr(host, "grid_font", None)
    return font() if font else None


LINE_SPACING = 4  # between the lines of a label
MARGIN = 6  # around the labels, the title and the legend (a column label keeps MARGIN // 2 from its cell's sides)


@dataclass
class GridLayout:
    """Where ``assemble`` draws each text, every one wrapped to the room it has: a column label to its column, a row
    label to the row labels' column (at most two cells wide), the title and the legend to the grid's width."""

    font: ImageFont.FreeTypeFont | ImageFont.ImageFont
    size: tuple[int, int]  # the whole grid's
    cells_at: tuple[int, int]  # the top left cell's corner
    title: tuple[tuple[int, int], str]  # (where, wrapped text); no text: no title
    column_labels: list[tuple[tuple[int, int], str]]
    row_labels: list[tuple[tuple[int, int], str]]
    legend: tuple[tuple[int, int], str]


def grid_layout(cell_size: tuple[int, int], row_labels: list[str], column_labels: list[str], title: str = "",
                legend: str = "", font_file: str | Path | None = None,
                undrawn: dict[str, None] | None = None) -> GridLayout:
    """The texts of ``assemble``'s grid, placed and wrapped (``_wrap``) in ``label_font``'s font (``font_file``
    first), sized to the cells (an eighth of their width, 10 px at least); ``undrawn`` gains what no font draws."""
    width, height = cell_size
    font = label_font(max(10, width // 8), "".join([title, legend, *row_labels, *column_labels]), font_file, undrawn)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def wrapped(text: str, room: int, separator: str = " ") -> str:
        return "\n".join(_wrap(drawable(unicodedata.normalize("NFC", text), font), font, room, measure, separator))

    def bottom(text: str) -> int:
        return int(measure.multiline_textbbox((0, 0), text, font=font, spacing=LINE_SPACING)[3]) if text else 0

    def within_a_row(text: str) -> str:
        """A row label cut to the lines its row has room for, the last ending in "…": a taller one ran into the next
        row's label and, on the last row, over the legend."""
        lines = text.split("\n")
        while len(lines) > 1 and bottom("\n".join(lines)) > height - 2:
            lines = lines[:-1]
            lines[-1] = lines[-1].rstrip(" ,") + "…"
        return "\n".join(lines)

    rows = [within_a_row(wrapped(label, 2 * width - 2 * MARGIN)) for label in row_labels]
    columns = [wrapped(label, width - MARGIN // 2) for label in column_labels]  # the next one starts MARGIN // 2 in
    left = max((int(measure.multiline_textbbox((0, 0), text, font=font, spacing=LINE_SPACING)[2]) for text in rows if text),
               default=0) + 2 * MARGIN
    total_width = left + width * len(columns)
    title_text = wrapped(title, total_width - 2 * MARGIN)
    legend_text = wrapped(legend, total_width - 2 * MARGIN, ", ")  # a legend lists name: hash, name: hash
    column_top = bottom(title_text) + MARGIN + (MARGIN if title_text else 0)
    top = column_top + max(map(bottom, columns), default=0) + MARGIN
    legend_top = top + height * len(rows) + 2
    return GridLayout(
        font=font,
        size=(total_width, legend_top + (bottom(legend_text) + MARGIN if legend_text else 0)),
        cells_at=(left, top),
        title=((MARGIN, MARGIN), title_text),
        column_labels=[((left + c * width + MARGIN // 2, column_top), text) for c, text in enumerate(columns)],
        row_labels=[((MARGIN, top + r * height + (height - bottom(text)) // 2), text) for r, text in enumerate(rows)],
        legend=((MARGIN, legend_top), legend_text),
    )


def assemble(cells: list[list[Image.Image]], row_labels: list[str], column_labels: list[str], title: str = "",
             legend: str = "", font_file: str | Path | None = None,
             undrawn: dict[str, None] | None = None) -> Image.Image:
    """Cells with column labels on top, row labels on the left (labels may have several lines), a title above and a
    legend below, each wrapped to its room (``grid_layout``; ``undrawn`` gains what no font draws)."""
    width, height = cells[0][0].size
    layout = grid_layout((width, height), row_labels, column_labels, title, legend, font_file, undrawn)
    grid = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(grid)
    for at, text in [layout.title, *layout.column_labels, *layout.row_labels, layout.legend]:
        if text:
            draw.multiline_text(at, text, fill="black", font=layout.font, spacing=LINE_SPACING)
    left, top = layout.cells_at
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            grid.paste(cell, (left + c * width, top + r * height))
    return grid


# Words of the grid's own labels and the shorter forms they take where a line cannot hold them: "* recommended"
# under an epoch is 69 px at the smallest font (10 px), wider than a 64 px cell's column.
SHORT_FORMS = {"recommended": "rec."}


def _wrap(text: str, font, width: int, measure, separator: str = " ") -> list[str]:
    """Lines no wider than ``width``: ``text``'s own lines broken between its parts (words; a legend's ``name:
    hash`` after its comma); a part wider than a line by itself in its short form where it has one (``SHORT_FORMS``),
    else broken between its characters (a long name, Chinese or Japanese, which has no spaces)."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for part in paragraph.split(separator):
            if part in SHORT_FORMS and measure.textlength(part, font=font) > width:
                part = SHORT_FORMS[part]
            joined = f"{line}{separator}{part}" if line else part
            if measure.textlength(joined, font=font) <= width:
                line = joined
                continue
            if line:
                lines.append(line)
            line = ""
            for character in _clusters(part):
                if line and measure.textlength(line + character, font=font) > width:
                    lines.append(line)
                    line = ""
                line += character
        lines.append(line)
    return lines


def _clusters(text: str) -> list[str]:
    """``text``'s characters as a reader sees them: an accent written as its own code point (macOS names files so),
    a skin tone or variation selector, and what a zero-width joiner joins stay with the character before them, so
    a line never starts with a bare accent or breaks an emoji family apart."""
    clusters: list[str] = []
    for character in text:
        flag = "\U0001f1e6" <= character <= "\U0001f1ff"  # two regional indicators make one flag
        joins = clusters and (unicodedata.category(character) in ("Mn", "Mc", "Me") or character in "\u200d\ufe0e\ufe0f"
                              or "\U0001f3fb" <= character <= "\U0001f3ff" or clusters[-1].endswith("\u200d")
                              or flag and len(clusters[-1]) == 1 and "\U0001f1e6" <= clusters[-1] <= "\U0001f1ff")
        if joins:
            clusters[-1] += character
        else:
            clusters.append(character)
    return clusters


def axes_infotext(axes: dict[str, tuple]) -> dict[str, str]:
    """The keys the X/Y/Z plot adds to its grid's infotext, for ``{"X": (axis, values), "Y": …}`` (an ``AxisSpec``
    and its planned values), named ``Grid …`` (see GRID_KEY): ``Grid: Prompt-Lora-Grid``, ``Grid X Type``, ``Grid X
    Values`` as typed (CSV quoted where a value holds a comma; none for an epoch axis left empty: every epoch file)
    and, for a seed axis, ``Grid Fixed X Values``: the seeds drawn for its -1 values."""
    parameters = {GRID_KEY: GRID_NAME}
    for letter, (axis, values) in axes.items():
        typed = [str(value).strip() for value in axis.values if str(value).strip()]
        parameters[f"{GRID_KEY} {letter} Type"] = axis.kind
        if typed:  # a strength axis is one text (``0.2-1.0 (+0.2)``, ``0.5, 1``): kept whole
            parameters[f"{GRID_KEY} {letter} Values"] = ", ".join(typed) if axis.kind == "strength" else _csv_line(typed)
        if axis.kind == "seed":
            parameters[f"{GRID_KEY} Fixed {letter} Values"] = ", ".join(str(value.seed) for value in values)
    return parameters


def _csv_line(values: list[str]) -> str:
    """Values as typed into the tab, which ``split_values`` reads back: a value with a comma or a quote quoted."""
    return ", ".join(f'"{value.replace(chr(34), chr(34) * 2)}"' if "," in value or '"' in value else value
                     for value in values)


def grid_infotext(infos: list[list[str]], parameters: dict[str, str]) -> str:
    """The grid's infotext as the X/Y/Z plot writes it: the first generated cell's (top left, unless an interrupt
    left it grey), with ``parameters`` added to its last line, replacing a key it has (an empty value adds nothing),
    quoted as the WebUI quotes a value holding a comma, a colon or a line break. PNG Info and "Send to txt2img" then
    read the prompt, seed, steps and sampler of that cell."""
    first = next((text for row in infos for text in row if text), "")
    lines = first.split("\n") if first else []
    last = lines.pop() if len(lines) > 1 and _PARAMETER.findall(lines[-1]) else ""  # else a prompt: keep it
    added = {key: _quote(value) for key, value in parameters.items() if value}
    kept = [match.group(0).strip().rstrip(",") for match in _PARAMETER.finditer(last)
            if match.group(0).strip() and match.group(1) not in added]
    return "\n".join([*lines, ", ".join([*kept, *(f"{key}: {value}" for key, value in added.items())])])


def _quote(value: str) -> str:
    """The WebUI's ``infotext_utils.quote``."""
    return json.dumps(value, ensure_ascii=False) if any(mark in value for mark in ",\n:") else value


MAX_GRID_MEGAPIXELS = 200  # the WebUI's default "Maximum image size" (img_max_size_mp), which caps its X/Y/Z plot


def megapixel_limit(host) -> float:
    """The host's cap on a grid's size (the WebUI's "Maximum image size" setting), else the WebUI's default."""
    limit = getattr(host, "max_image_megapixels", None)
    return float(limit()) if limit else MAX_GRID_MEGAPIXELS


def check_megapixels(rows: int, columns: int, width: int, height: int, limit: float) -> None:
    """Refuses a grid whose cells come to more than ``limit`` megapixels, as the X/Y/Z plot refuses one over the
    WebUI's "Maximum image size": every cell is held in memory until the grid is assembled."""
    megapixels = rows * columns * width * height / 1_000_000
    if megapixels > limit:
        raise UserError(f"the grid would be {rows} × {columns} images of {width}×{height}: {megapixels:,.0f} megapixels, "
                        f"over the limit of {limit:g} (the WebUI's \"Maximum image size\" setting); use fewer values "
                        "or a smaller width and height")


def save_grid(image: Image.Image, cells, infos, folder: Path, infotext: str = "") -> tuple[Path, list[Path]]:
    """The grid with ``infotext`` (``grid_infotext``'s), then every generated cell as a PNG with its own infotext: the
    grid first, which holds them all, so that a save cut short keeps it. A cell without infotext was never generated
    (an interrupted grid's grey placeholder): not written."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp, reserved = _reserve_stamp(folder)
    try:
        grid_path = write_png(image, reserved, infotext)
        paths = []
        for r, (row, row_infos) in enumerate(zip(cells, infos)):
            for c, (cell, text) in enumerate(zip(row, row_infos)):
                if text:
                    paths.append(write_png(cell, folder / f"grid-{stamp}-r{r:02d}-c{c:02d}.png", text))
    except BaseException:
        if reserved.exists() and not reserved.stat().st_size:
            reserved.unlink()
        raise
    return grid_path, paths


def _reserve_stamp(folder: Path) -> tuple[str, Path]:
    """The time to the second names a grid and its cells; a second grid in the same second (two browser tabs, the
    API) takes ``-2``, ``-3``…: its name is reserved by creating the grid's file, so neither overwrites the other."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        candidate = stamp if n == 1 else f"{stamp}-{n}"
        try:
            with (folder / f"grid-{candidate}.png").open("x"):
                return candidate, folder / f"grid-{candidate}.png"
        except FileExistsError:
            continue
    raise AssertionError("unreachable")
