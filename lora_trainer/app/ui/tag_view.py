"""What the Dataset Tag Editor tab shows, as plain functions over the tag-editor core: one page of the filtered
images, the tag frequency list, selection ranges and the undo/redo history. No gradio here; the tab only wires
these to components, so a folder of 10,000 images costs one page of work per click."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ...dataset import tag_editor
from ...dataset.caption_files import BACKUP_MANIFEST, BackupSummary
from ...dataset.tag_editor import TagEditor, TagFilter
from ...errors import UserError
from ..tag_sessions import FREQUENCY_ROWS  # the rest is reached by typing in the tag search
from ..tag_sessions import backup_title

PAGE_SIZE = 48


@dataclass(frozen=True)
class Page:
    number: int  # 1-based, clamped to the pages there are
    pages: int
    images: tuple[Path, ...]  # this page's images, in folder order
    first_index: int  # 1-based position of images[0] among the filtered images
    filtered: int
    total: int


def page_of(editor: TagEditor, filtered: tuple[Path, ...], number: int, page_size: int = PAGE_SIZE) -> Page:
    pages = max(1, math.ceil(len(filtered) / page_size))
    number = min(max(1, int(number)), pages)
    start = (number - 1) * page_size
    return Page(number, pages, filtered[start:start + page_size], start + 1, len(filtered), len(editor.images))


def page_text(page: Page, selected: int, unsaved: int) -> str:
    if not page.filtered:
        return f"No image matches the filter ({page.total} in the folder)."
    last = page.first_index + len(page.images) - 1
    return (f"Page {page.number} of {page.pages}: images {page.first_index}–{last} of {page.filtered} shown "
            f"({page.total} in the folder); {selected} selected; {unsaved} unsaved")


def item_label(editor: TagEditor, image: Path, index: int, selected: bool, unsaved: bool) -> str:
    """The caption under a thumbnail: position (for range selection), markers, the image's tags."""
    marks = ("☑ " if selected else "") + ("* " if unsaved else "")
    return shown(f"{marks}#{index} {image.name}: {tag_editor.caption_of(editor, image) or '(no tags)'}")


def shown(text: str) -> str:
    """``text`` for the page: a file name that is not UTF-8 (GBK bytes unpacked on Linux, lone surrogates to Python)
    shows its undecodable bytes as � — the browser's JSON cannot carry them, and the page failed to draw."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def frequency_rows(counts: list[tuple[str, int]], query: str = "", sort: str = "frequency",
                   limit: int = FREQUENCY_ROWS) -> list[list]:
    """``[tag, count]`` rows, filtered by a substring ``query``, sorted by frequency or name, at most ``limit``. A tag
    matches as written and as it reads: ``hair \\(style\\)`` is found by ``(style)`` too (the prompt escapes are the
    WebUI's, not the user's words)."""
    query = query.strip().casefold()
    rows = [[tag, count] for tag, count in counts if query in tag.casefold() or query in _unescaped(tag).casefold()]
    if sort == "name":
        rows.sort(key=lambda row: (row[0].casefold(), row[0]))
    return rows[:limit]


def _unescaped(tag: str) -> str:
    return re.sub(r"\\([()\[\]])", r"\1", tag)


def index_range(filtered: tuple[Path, ...], start: int, end: int) -> tuple[Path, ...]:
    """Images ``start``…``end`` (1-based, inclusive, either order) of the filtered list: the shift-click range."""
    if not filtered:
        raise UserError("range selection: no image matches the filter")
    try:
        first, last = sorted((int(start), int(end)))
    except (TypeError, ValueError):
        raise UserError("range selection: give two image numbers (the # under the thumbnails)") from None
    if first < 1 or last > len(filtered):
        raise UserError(f"range selection: numbers go from 1 to {len(filtered)}; got {first}–{last}")
    return filtered[first - 1:last]


def toggled(selection: tuple[str, ...], name: str) -> tuple[str, ...]:
    return tuple(n for n in selection if n != name) if name in selection else selection + (name,)


def history_rows(editor: TagEditor) -> list[list]:
    """One row per step, oldest first: done steps, then the steps undone (redo-able), newest undo last."""
    done = [[i + 1, step.description, "done", len(step.after)] for i, step in enumerate(editor.undo_steps)]
    undone = [[len(done) + i + 1, step.description, "undone", len(step.after)]
              for i, step in enumerate(reversed(editor.redo_steps))]
    return done + undone


def filter_from_fields(all_of: str, any_of: str, none_of: str, regex: str, untagged: bool) -> TagFilter:
    return TagFilter(tag_editor.split_tags(all_of or ""), tag_editor.split_tags(any_of or ""),
                     tag_editor.split_tags(none_of or ""), (regex or "").strip() or None, bool(untagged))


def with_tag(field_text: str, tag: str) -> str:
    """``field_text`` (comma-separated tags) with ``tag`` added, or removed when it is already there (click twice)."""
    tags = tag_editor.split_tags(field_text or "")
    return tag_editor.join_tags(tuple(t for t in tags if t != tag) if tag in tags else tags + (tag,))


def backup_label(summary: BackupSummary) -> str:
    """A backup in the tab's Backups list: ``2026-12-05 17:02:44 — 3 captions``, and how many captions its save
    created (a restore removes them)."""
    if summary.problem:
        return shown(f"{backup_title(summary.name)} — its {BACKUP_MANIFEST} cannot be read")
    label = f"{backup_title(summary.name)} — {summary.captions} caption{'' if summary.captions == 1 else 's'}"
    return shown(label + (f" (its save created {summary.created})" if summary.created else ""))
