"""The tag editor's core, with no UI in it: a folder of images and their comma-separated tags held in memory as an
immutable ``TagEditor`` value; edits, filters, undo/redo and reload are pure functions that return a new value, and
``save`` writes only the captions that changed, through ``caption_files.write_captions`` (backup first, all-or-nothing,
never over a file someone else edited since it was read).

Every edit is a small frozen dataclass (``AddTags``, ``ReplaceText``, …) that turns one image's tags into new tags,
so the WebUI, the CLI and the API describe edits as data. ``apply_edit`` runs one over a selection and records the
images it changed (their tags before and after) as one undo step; the history costs memory in proportion to what
changed, not to the size of the dataset, so it is unlimited.

Two images with the same stem (``a.png`` and ``a.jpg``) share ``a.txt``, as they do in sd-scripts; an edit of one is
applied to both, so what the editor shows is what training reads. For the same reason a caption's tags are its first
line (sd-scripts trains on that line alone; with ``--enable_wildcard`` each line is an alternative): the lines after
it are kept as they are and written back below the edited first line.
"""

from __future__ import annotations

import difflib
import os
import re
from collections import Counter
from dataclasses import MISSING, dataclass, field, fields, replace
from itertools import chain
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping, Protocol

from lora_trainer.dataset.caption_files import (
    NO_FILE,
    CaptionStamp,
    ImageCaptions,
    caption_path_for,
    checked_caption_extension,
    load_caption_file,
    read_image_captions,
    write_captions,
)
from lora_trainer.dataset.layouts import (broken_links_note, caption_candidates, captions_leading_outside, is_picture_suffix,
                                         other_caption_extension, outside_links_note)
from lora_trainer.errors import UserError
from lora_trainer.safe_io import resolves_below

Tags = tuple[str, ...]

DEFAULT_BACKUP_FOLDER = ".caption-backups"


def is_training_image(name: str) -> bool:
    """Whether sd-scripts would train on a file with this name (by extension)."""
    return is_picture_suffix(os.path.splitext(name)[1])


def _is_listed_image(name: str) -> bool:
    """A picture the editor lists: a training image that is not hidden (macOS's ``._name.jpg``: sd-scripts' glob
    skips it)."""
    return is_training_image(name) and not name.startswith(".")


def split_tags(caption: str) -> Tags:
    """``"a, b ,,c\\nd"`` → ``("a", "b", "c", "d")``: commas and line breaks separate tags; blanks are dropped."""
    return tuple([tag for tag in map(str.strip, caption.replace("\n", ",").split(",")) if tag])


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def _unique(tags: Iterable[str]) -> Tags:
    return tuple(dict.fromkeys(tags))


def _compiled(pattern: str, field: str | None = None) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise UserError(f"The regular expression {pattern!r} is not valid: {error}.", field) from None


# ---------------------------------------------------------------------------------------------------------------
# Edits: one image's tags in, new tags out.


class TagEdit(Protocol):
    def apply(self, tags: Tags) -> Tags: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class AddTags:
    """Insert tags at ``position`` (0 = front, None = end, negative counts from the end); tags already there stay put."""

    tags: Tags
    position: int | None = None

    def apply(self, tags: Tags) -> Tags:
        missing = tuple(tag for tag in _unique(self.tags) if tag not in tags)
        if not missing:
            return tags
        at = len(tags) if self.position is None else self.position
        at = max(0, len(tags) + at + 1) if at < 0 else min(at, len(tags))
        return tags[:at] + missing + tags[at:]

    def describe(self) -> str:
        where = "at the end" if self.position is None else f"at position {self.position}"
        return f"Add {join_tags(self.tags)} {where}"


@dataclass(frozen=True)
class RemoveTags:
    tags: Tags

    def apply(self, tags: Tags) -> Tags:
        unwanted = set(self.tags)
        return tuple(tag for tag in tags if tag not in unwanted)

    def describe(self) -> str:
        return f"Remove {join_tags(self.tags)}"


@dataclass(frozen=True)
class ReplaceText:
    """Replace text inside each tag (or in the whole caption), plainly or as a regular expression; a tag that becomes
    empty disappears, and a whole-caption replacement may split or merge tags."""

    find: str
    replacement: str
    regex: bool = False
    whole_caption: bool = False

    def __post_init__(self) -> None:
        if not self.find:
            raise UserError("Replace needs some text to find.", "find")
        if self.regex:
            pattern = _compiled(self.find, "find")
            try:  # a group the pattern lacks (\2, \g<name>) failed at the first tag it matched; sub reads the
                pattern.sub(self.replacement, "")  # replacement before it searches
            except (re.error, IndexError) as error:
                raise UserError(f"Replace: the replacement {self.replacement!r} does not fit the pattern {self.find!r} "
                                f"({error}); refer to its groups as \\1 or \\g<name>", "replacement") from None

    def _replace(self, text: str) -> str:
        if self.regex:
            return _compiled(self.find).sub(self.replacement, text)
        return text.replace(self.find, self.replacement)

    def apply(self, tags: Tags) -> Tags:
        if self.whole_caption:
            caption = join_tags(tags)
            if not self.regex and self.find not in caption:
                return tags
            return split_tags(self._replace(caption))
        if self.regex:
            replaced = tuple([self._replace(tag).strip() for tag in tags])
        else:  # inlined: a replace across 10,000 captions runs this for every tag of every image
            find, replacement = self.find, self.replacement
            if find not in "\n".join(tags):  # then in no tag either: most images, in most replaces
                return tags
            replaced = tuple([tag.replace(find, replacement).strip() if find in tag else tag for tag in tags])
        if any("," in tag or "\n" in tag for tag in replaced):  # a comma or a line break made there separates tags
            return split_tags(", ".join(replaced))
        return replaced if all(replaced) else tuple(tag for tag in replaced if tag)

    def describe(self) -> str:
        kind = "regex" if self.regex else "text"
        return f"Replace {kind} {self.find!r} with {self.replacement!r}" + (" in whole captions" if self.whole_caption else "")


@dataclass(frozen=True)
class RenameTag:
    """Rename one tag exactly; where the new name is already present the two merge at the first one's place."""

    old: str
    new: str

    def apply(self, tags: Tags) -> Tags:
        if self.old not in tags:
            return tags
        new = split_tags(self.new)  # "b, c" is two tags, as the caption file will say
        return _unique(part for tag in tags for part in (new if tag == self.old else (tag,)))

    def describe(self) -> str:
        return f"Rename {self.old} to {self.new}"


@dataclass(frozen=True)
class RemoveDuplicates:
    def apply(self, tags: Tags) -> Tags:
        return _unique(tags)

    def describe(self) -> str:
        return "Remove duplicate tags"


SORT_ORDERS = ("alphabetical", "frequency", "length")


@dataclass(frozen=True)
class SortTags:
    """Sort, leaving the first ``keep_first`` tags (the trigger word) in place: alphabetically (case-insensitive), by
    ``frequency`` (how many of the folder's images carry the tag, as the tag list counts them) or by ``length``, ties
    alphabetically; ``descending`` puts the most frequent or longest first — the tag-editor extension's sort orders."""

    keep_first: int = 0
    by: str = "alphabetical"
    descending: bool = False
    _counts: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)  # by frequency: the folder's

    def __post_init__(self):
        if self.by not in SORT_ORDERS:
            raise UserError(f"Sort tags: by must be one of {', '.join(SORT_ORDERS)}, not {self.by!r}.", "by")

    def for_editor(self, editor: TagEditor) -> SortTags:
        return replace(self, _counts=dict(tag_counts(editor))) if self.by == "frequency" else self

    def apply(self, tags: Tags) -> Tags:
        head, tail = tags[: self.keep_first], tags[self.keep_first:]
        if self.by == "alphabetical":
            return head + tuple(sorted(tail, key=lambda tag: (tag.casefold(), tag), reverse=self.descending))
        sign = -1 if self.descending else 1
        measure = (lambda tag: self._counts.get(tag, 0)) if self.by == "frequency" else len
        return head + tuple(sorted(tail, key=lambda tag: (sign * measure(tag), tag.casefold(), tag)))

    def describe(self) -> str:
        order = "" if self.by == "alphabetical" and not self.descending else \
            f" by {self.by}{', descending' if self.descending else ''}"
        return f"Sort tags{order}" + (f" after the first {self.keep_first}" if self.keep_first else "")


@dataclass(frozen=True)
class MoveToFront:
    """Move these tags (a trigger word, say) to the front, in this order, where an image has them."""

    tags: Tags

    def apply(self, tags: Tags) -> Tags:
        present = tuple(tag for tag in _unique(self.tags) if tag in tags)
        return present + tuple(tag for tag in tags if tag not in present)

    def describe(self) -> str:
        return f"Move {join_tags(self.tags)} to the front"


@dataclass(frozen=True)
class Lowercase:
    def apply(self, tags: Tags) -> Tags:
        return tuple(tag.lower() for tag in tags)

    def describe(self) -> str:
        return "Lowercase tags"


def underscores_to_spaces(tag: str) -> str:
    # sd-scripts' WD14 tagger keeps tags of 3 characters or fewer as they are: kaomoji such as ^_^ or o_o.
    return tag.replace("_", " ") if len(tag) > 3 else tag


@dataclass(frozen=True)
class UnderscoresToSpaces:
    def apply(self, tags: Tags) -> Tags:
        return tuple(underscores_to_spaces(tag) for tag in tags)

    def describe(self) -> str:
        return "Underscores to spaces"


@dataclass(frozen=True)
class SpacesToUnderscores:
    def apply(self, tags: Tags) -> Tags:
        return tuple(tag.replace(" ", "_") for tag in tags)

    def describe(self) -> str:
        return "Spaces to underscores"


@dataclass(frozen=True)
class SetTags:
    """The per-image edit: these tags, exactly."""

    tags: Tags

    def apply(self, tags: Tags) -> Tags:
        return tuple(self.tags)

    def describe(self) -> str:
        return f"Set tags to {join_tags(self.tags)}"


# The names the CLI, the WebUI and the API use for edits, e.g. {"edit": "add", "tags": ["zkstar"], "position": 0}.
EDIT_KINDS: dict[str, type] = {
    "add": AddTags,
    "remove": RemoveTags,
    "replace": ReplaceText,
    "rename": RenameTag,
    "remove_duplicates": RemoveDuplicates,
    "sort": SortTags,
    "move_to_front": MoveToFront,
    "lowercase": Lowercase,
    "underscores_to_spaces": UnderscoresToSpaces,
    "spaces_to_underscores": SpacesToUnderscores,
    "set": SetTags,
}


def make_edit(kind: str, **parameters) -> TagEdit:
    """Build an edit from its name and parameters (lists become tuples); a wrong name or parameter is a UserError."""
    if kind not in EDIT_KINDS:
        close = difflib.get_close_matches(kind, EDIT_KINDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else f" Known edits: {', '.join(EDIT_KINDS)}."
        raise UserError(f"Unknown tag edit {kind!r}.{hint}")
    values = {name: tuple(value) if isinstance(value, list) else value for name, value in parameters.items()}
    edit_fields = {f.name: f for f in fields(EDIT_KINDS[kind]) if not f.name.startswith("_")}
    takes = ", ".join(edit_fields) or "no parameters"
    unknown = sorted(set(values) - set(edit_fields))
    missing = [name for name, f in edit_fields.items() if f.default is MISSING and name not in values]
    if unknown or missing:
        problem = f"has no parameter {unknown[0]!r}" if unknown else f"needs {missing[0]}"
        raise UserError(f"Tag edit {kind!r} {problem}; it takes {takes}.", unknown[0] if unknown else missing[0])
    for name, value in values.items():  # checked here: a wrong type would fail only when the edit runs
        kinds = _PARAMETER_KINDS.get(str(edit_fields[name].type))
        if kinds and not _is_kind(value, kinds[0]):
            raise UserError(f"Tag edit {kind!r}: {name} must be {kinds[1]}, not {value!r}.", name)
    return EDIT_KINDS[kind](**values)


def _is_kind(value, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:  # True is an int to Python, not a position
        return False
    return isinstance(value, types) and (not isinstance(value, tuple) or all(isinstance(tag, str) for tag in value))


# what each annotation of an edit's parameters takes, and how to say it
_PARAMETER_KINDS = {"Tags": ((tuple,), "a list of tags"), "int | None": ((int, type(None)), "a whole number or null"),
                    "int": ((int,), "a whole number"), "str": ((str,), "text"), "bool": ((bool,), "true or false")}


# ---------------------------------------------------------------------------------------------------------------
# The editor's state.


@dataclass(frozen=True)
class Step:
    """One undoable step: the tags of the images it changed, before and after."""

    description: str
    before: Mapping[Path, Tags]
    after: Mapping[Path, Tags]


@dataclass(frozen=True)
class TagEditor:
    """A folder's images and tags in memory. ``tags`` is what the user sees, ``on_disk`` what the caption files held
    when last read or saved (their first lines); ``later_lines`` the text after the first line of a multi-line caption,
    kept as it is; images whose caption could not be read are listed in ``unreadable`` and left alone."""

    folder: Path
    recursive: bool
    caption_extension: str
    backup_dir: Path | None
    images: tuple[Path, ...]
    tags: Mapping[Path, Tags]
    on_disk: Mapping[Path, Tags]
    stamps: Mapping[Path, CaptionStamp]
    siblings: Mapping[Path, tuple[Path, ...]]
    later_lines: Mapping[Path, str] = field(default_factory=dict)
    unreadable: Mapping[Path, str] = field(default_factory=dict)
    broken_links: tuple[Path, ...] = ()  # pictures that are links to nothing: listed, not shown
    # the folders every picture and caption must resolve below (the app's allowed folders; None: anywhere), and the
    # links found leading elsewhere (pictures, their captions, sub-folders): listed, their pictures not shown
    within: tuple[Path, ...] | None = None
    outside_links: tuple[Path, ...] = ()
    undo_steps: tuple[Step, ...] = ()
    redo_steps: tuple[Step, ...] = ()

    def caption_path(self, image: Path) -> Path:
        return caption_path_for(image, self.caption_extension)

    @property
    def multiline(self) -> tuple[Path, ...]:
        """Images whose caption has lines after the first, which training reads only with ``--enable_wildcard``."""
        return tuple(image for image in self.images if image in self.later_lines)

    @property
    def can_undo(self) -> bool:
        return bool(self.undo_steps)

    @property
    def can_redo(self) -> bool:
        return bool(self.redo_steps)


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class _FolderScan:
    images: tuple[Path, ...]
    tags: dict[Path, Tags]
    stamps: dict[Path, CaptionStamp]
    later_lines: dict[Path, str]
    unreadable: dict[Path, str]
    broken_links: tuple[Path, ...]
    outside_links: tuple[Path, ...]


@dataclass(frozen=True)
class _Pictures:
    found: list[Path]
    broken: list[Path]  # links to nothing (a drive not mounted)
    outside: list[Path]  # pictures and sub-folders that are links leading outside the allowed folders
    with_links: set[str]  # folders holding links to files other than pictures, whose captions may be such links


def find_images(folder: Path, recursive: bool = False) -> list[Path]:
    """The images sd-scripts would train on in ``folder`` (and its sub-folders, hidden ones skipped, when
    ``recursive``), sorted by folder, then name; not hidden files (macOS's ``._name.jpg``: its glob skips them)."""
    return _find_pictures(folder, recursive).found


def _find_pictures(folder: Path, recursive: bool, within: tuple[Path, ...] | None = None) -> _Pictures:
    """``find_images``, and what was found on the way: the pictures that are links to nothing, and with ``within``
    the links leading outside those folders (only links are resolved: a dataset without them costs nothing more)."""
    found: list[tuple[str, str, str]] = []  # (folder, name, path) as strings: sorted before any Path is built
    broken: list[str] = []
    outside: list[str] = []
    with_links: set[str] = set()
    pending, seen = [str(folder)], {os.path.realpath(folder)}
    while pending:
        current = pending.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.is_dir():
                    # hidden folders hold our own backups (and .git and the like), never training images; a folder
                    # reached again through a link (one back to a parent loops for ever) is read once
                    if recursive and not entry.name.startswith(".") and (real := os.path.realpath(entry.path)) not in seen:
                        seen.add(real)
                        if within is not None and not resolves_below(real, within):
                            outside.append(entry.path)
                        else:
                            pending.append(entry.path)
                elif _is_listed_image(entry.name):
                    # outside before missing, as for a path a request names: nothing is said of what lies elsewhere
                    if within is not None and entry.is_symlink() and not resolves_below(entry.path, within):
                        outside.append(entry.path)
                    elif entry.is_file():
                        found.append((current, entry.name, entry.path))
                    elif entry.is_symlink() and not os.path.exists(entry.path):
                        broken.append(entry.path)
                elif within is not None and entry.is_symlink():
                    with_links.add(current)
    return _Pictures([Path(path) for _, _, path in sorted(found)], [Path(path) for path in sorted(broken)],
                     [Path(path) for path in sorted(outside)], with_links)


def empty_folder_note(editor: TagEditor) -> str | None:
    """What to do when a folder opened without its sub-folders shows no image but its sub-folders hold some: a Kohya
    training folder (``train/10_zkchar/``) is opened so. A sub-folder that is a link leading outside the allowed
    folders is not looked into: including sub-folders would not show it."""
    if editor.images or editor.recursive:
        return None
    with os.scandir(editor.folder) as entries:
        holders = sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(".")
                         and (editor.within is None or resolves_below(entry.path, editor.within))
                         and any(_is_listed_image(name) for name in os.listdir(entry.path)))
    if not holders:
        return None
    shown = ", ".join(holders[:3]) + (f" and {len(holders) - 3} more" if len(holders) > 3 else "")
    return f"no images in {editor.folder} itself, but its sub-folders hold some ({shown}): open one, or include sub-folders"


def _scan(folder: Path, recursive: bool, caption_extension: str, within: tuple[Path, ...] | None = None) -> _FolderScan:
    pictures = _find_pictures(folder, recursive, within)
    images, outside = pictures.found, list(pictures.outside)
    if within is not None and pictures.with_links:  # a picture whose caption leads elsewhere is left out, unread
        leading_out = {image: links for image in images if str(image.parent) in pictures.with_links
                       and (links := captions_leading_outside(image, caption_extension, within))}
        images = [image for image in images if image not in leading_out]
        outside = sorted({*outside, *chain.from_iterable(leading_out.values())})
    captions, tags, later_lines = _read_tags(images, caption_extension)
    return _FolderScan(tuple(images), tags, captions.stamps, later_lines, captions.unreadable, tuple(pictures.broken),
                       tuple(outside))


def _read_tags(images: list[Path], caption_extension: str) -> tuple[ImageCaptions, dict[Path, Tags], dict[Path, str]]:
    """The images' caption files read: as read, the tags of their first lines, and their later lines where any."""
    captions = read_image_captions(images, caption_extension)
    tags, later_lines = {}, {}
    for image, text in captions.texts.items():
        if not captions.stamps[caption_path_for(image, caption_extension)].exists:
            text = _face_crop_source_caption(image, caption_extension) or text
        first, _, later = text.partition("\n")  # sd-scripts trains on the first line only
        tags[image] = split_tags(first)
        if later.strip():
            later_lines[image] = later
    return captions, tags, later_lines


def _face_crop_source_caption(image: Path, caption_extension: str) -> str | None:
    """A face crop without its own caption (``a_120_80_40_48.png``) trains on its source's (``a.txt``), as sd-scripts
    reads it: shown as its tags, and saved to its own file once edited (the source's caption stays as it is)."""
    for candidate in caption_candidates(image, caption_extension)[1:]:
        try:
            found = load_caption_file(candidate)
        except UserError:
            return None
        if found.stamp.exists:
            return found.text
    return None


def _siblings(images: Iterable[Path]) -> dict[Path, tuple[Path, ...]]:
    """Images that share a caption file: same folder, same stem (compared as the file system does: normcase folds case
    on Windows), as strings, which is cheaper than building 10,000 caption paths."""
    by_caption: dict[str, list[Path]] = {}
    for image in images:
        by_caption.setdefault(os.path.normcase(os.path.splitext(str(image))[0]), []).append(image)
    return {image: tuple(group) for group in by_caption.values() if len(group) > 1 for image in group}


def open_folder(
    folder: Path,
    *,
    recursive: bool = False,
    caption_extension: str = ".txt",
    backup_dir: Path | str | None = DEFAULT_BACKUP_FOLDER,
    within: Iterable[Path] | None = None,
) -> TagEditor:
    """Read a folder's images (sd-scripts' extensions; sub-folders too when ``recursive``, hidden ones skipped) and
    their captions. ``backup_dir`` is where ``save`` keeps previous versions (relative to ``folder``; None: none).
    With ``within`` (the app's allowed folders) a picture, caption or sub-folder that is a link leading outside them is
    never read or written: its pictures are left out and the links named (``outside_links``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder.")
    caption_extension = checked_caption_extension(caption_extension)
    within = None if within is None else tuple(Path(root) for root in within)
    scan = _scan(folder, recursive, caption_extension, within)
    return TagEditor(
        folder=folder,
        recursive=recursive,
        caption_extension=caption_extension,
        backup_dir=None if backup_dir is None else folder / backup_dir,
        images=scan.images,
        tags=_frozen(scan.tags),
        on_disk=_frozen(scan.tags),
        stamps=_frozen(scan.stamps),
        siblings=_frozen(_siblings(scan.images)),
        later_lines=_frozen(scan.later_lines),
        unreadable=_frozen(scan.unreadable),
        broken_links=scan.broken_links,
        within=within,
        outside_links=scan.outside_links,
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading the state: tags, counts, filters.


def caption_of(editor: TagEditor, image: Path) -> str:
    return join_tags(editor.tags.get(image, ()))


def caption_text(editor: TagEditor, image: Path) -> str:
    """The caption file's text for the image's tags: the first line, then the lines after it as they were read."""
    later = editor.later_lines.get(image)
    return caption_of(editor, image) + (f"\n{later}" if later else "")


def broken_links_shown_note(editor: TagEditor) -> str | None:
    """Pictures that are links to nothing cannot be shown or captioned; check, prep and training name them too."""
    return f"not shown: {broken_links_note(list(editor.broken_links))}" if editor.broken_links else None


def outside_links_shown_note(editor: TagEditor) -> str | None:
    return f"not shown: {outside_links_note(list(editor.outside_links))}" if editor.outside_links else None


def as_sentence(note: str) -> str:
    return f"{note[0].upper()}{note[1:]}{'' if note.endswith('.') else '.'}"


def folder_notes(editor: TagEditor) -> list[str]:
    """What opening the folder found, as sentences (captions under the other usual extension, multi-line captions,
    links to nothing or leading outside the allowed folders): the tab, the API and ``dataset tags`` say it."""
    notes = (other_extension_note(editor), multiline_note(editor), broken_links_shown_note(editor),
             outside_links_shown_note(editor))
    return [as_sentence(note) for note in notes if note]


def captions_elsewhere(editor: TagEditor, images: Iterable[Path] | None = None) -> tuple[str, int] | None:
    """The other usual caption extension (sd-scripts' default is .caption, the taggers write .txt) of the captions
    beside images (of ``images``, default all) that have none of the editor's extension, and how many; None when
    there are none."""
    found = Counter(other for image in (editor.images if images is None else images) if image in editor.tags
                    and not editor.stamps.get(editor.caption_path(image), NO_FILE).exists
                    and (other := other_caption_extension(image, editor.caption_extension)))
    return found.most_common(1)[0] if found else None


def other_extension_note(editor: TagEditor) -> str | None:
    """Images with captions only under the other usual extension: edited so, they would get a second caption file."""
    if (elsewhere := captions_elsewhere(editor)) is None:
        return None
    other, count = elsewhere
    return (f"{count} image(s) have no {editor.caption_extension} caption but a {other} one beside them: open the folder "
            f"with the caption extension {other} to edit those (an edit here writes new {editor.caption_extension} "
            "files beside them)")


def multiline_note(editor: TagEditor) -> str | None:
    if not editor.multiline:
        return None
    count = len(editor.multiline)
    return (f"{count} caption{'s have' if count > 1 else ' has'} lines after the first "
            f"({', '.join(path.name for path in editor.multiline[:3])}{', …' if count > 3 else ''}): training reads only "
            "the first (each line is an alternative with --enable_wildcard); the editor edits that line and keeps the others")


def tag_counts(editor: TagEditor, images: Iterable[Path] | None = None) -> list[tuple[str, int]]:
    """How many images carry each tag (among ``images``, default all), most frequent first, then by name."""
    tags = editor.tags
    selected = tags.values() if images is None else [tags[image] for image in images if image in tags]
    counts = Counter(chain.from_iterable(map(set, selected)))  # no Python loop per tag: 200,000 tags in 10,000 images
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


@dataclass(frozen=True)
class TagFilter:
    """Images that have all of ``all_of``, at least one of ``any_of`` (when given), none of ``none_of``, whose caption
    matches ``caption_regex`` (searched in ``"tag1, tag2, …"``), and — with ``untagged`` — no tags at all."""

    all_of: Tags = ()
    any_of: Tags = ()
    none_of: Tags = ()
    caption_regex: str | None = None
    untagged: bool = False

    def __post_init__(self) -> None:
        if self.caption_regex:
            _compiled(self.caption_regex)

    def matches(self, tags: Tags) -> bool:
        if self.untagged and tags:
            return False
        present = set(tags)
        if not present.issuperset(self.all_of):
            return False
        if self.any_of and present.isdisjoint(self.any_of):
            return False
        if not present.isdisjoint(self.none_of):
            return False
        return not self.caption_regex or _compiled(self.caption_regex).search(join_tags(tags)) is not None


NO_FILTER = TagFilter()


def select(editor: TagEditor, tag_filter: TagFilter) -> tuple[Path, ...]:
    """The editable images that pass the filter, in folder order."""
    tags = editor.tags
    if tag_filter == NO_FILTER:  # the usual case, and on 10,000 images worth not testing each one
        return tuple(image for image in editor.images if image in tags)
    return tuple(image for image in editor.images if image in tags and tag_filter.matches(tags[image]))


def unsaved_images(editor: TagEditor) -> tuple[Path, ...]:
    tags, on_disk = editor.tags, editor.on_disk
    return tuple(image for image in editor.images if tags.get(image) != on_disk.get(image))


# ---------------------------------------------------------------------------------------------------------------
# Changing the state: edits, undo, redo.


def _with_tags(editor: TagEditor, new_tags: Mapping[Path, Tags]) -> Mapping[Path, Tags]:
    merged = dict(editor.tags)
    merged.update((image, tags) for image, tags in new_tags.items() if image in merged)
    return MappingProxyType(merged)


def record_step(editor: TagEditor, description: str, after: Mapping[Path, Tags]) -> TagEditor:
    """New tags for some images as one undoable step (edits use it; so does auto-tagging, whose tags differ per image).
    Images sharing a caption file (``a.png``, ``a.jpg``) get the tags of the first of them given: one file, one text."""
    shared: dict[Path, Tags] = {}
    for image, tags in after.items():
        group = [image, *(sibling for sibling in editor.siblings.get(image, ()) if sibling in editor.tags)]
        if not any(member in shared for member in group):
            shared.update(dict.fromkeys(group, tags))
    changed = {image: tags for image, tags in shared.items() if editor.tags.get(image, tags) != tags}
    if not changed:
        return editor
    step = Step(description, MappingProxyType({image: editor.tags[image] for image in changed}), MappingProxyType(changed))
    return replace(editor, tags=_with_tags(editor, changed), undo_steps=editor.undo_steps + (step,), redo_steps=())


def _with_siblings(editor: TagEditor, images: Iterable[Path]) -> list[Path]:
    chosen = dict.fromkeys(image for image in images if image in editor.tags)
    for image in list(chosen):
        chosen.update(dict.fromkeys(sibling for sibling in editor.siblings.get(image, ()) if sibling in editor.tags))
    return list(chosen)


def apply_edit(editor: TagEditor, edit: TagEdit, images: Iterable[Path] | None = None) -> TagEditor:
    """Apply one edit to the selected images (default: every editable image) as one undoable step."""
    targets = list(editor.tags) if images is None else _with_siblings(editor, images)
    tags = editor.tags
    if hasattr(edit, "for_editor"):  # an edit that reads the whole folder (a sort by frequency)
        edit = edit.for_editor(editor)
    return record_step(editor, edit.describe(), {image: edit.apply(tags[image]) for image in targets})


def edit_caption(editor: TagEditor, image: Path, caption: str) -> TagEditor:
    """The per-image edit: the caption as typed, split into tags."""
    return apply_edit(editor, SetTags(split_tags(caption)), [image])


def undo(editor: TagEditor) -> TagEditor:
    if not editor.undo_steps:
        return editor
    step = editor.undo_steps[-1]
    return replace(
        editor,
        tags=_with_tags(editor, step.before),
        undo_steps=editor.undo_steps[:-1],
        redo_steps=editor.redo_steps + (step,),
    )


def redo(editor: TagEditor) -> TagEditor:
    if not editor.redo_steps:
        return editor
    step = editor.redo_steps[-1]
    return replace(
        editor,
        tags=_with_tags(editor, step.after),
        undo_steps=editor.undo_steps + (step,),
        redo_steps=editor.redo_steps[:-1],
    )


def revert(editor: TagEditor, images: Iterable[Path] | None = None) -> TagEditor:
    """Throw away unsaved edits (of ``images``, default all) as one undoable step: those images show their caption
    files as they are now, read again (another program may have changed one since the folder was read); a caption that
    cannot be read now, or has become a link leading outside ``within``, goes back to the text last read."""
    chosen = unsaved_images(editor) if images is None else _with_siblings(editor, images)
    discarded = [image for image in chosen if editor.tags[image] != editor.on_disk[image]]
    if editor.within is not None:
        discarded = [image for image in discarded
                     if not captions_leading_outside(image, editor.caption_extension, editor.within)]
    if discarded:
        captions, tags, later_lines = _read_tags(discarded, editor.caption_extension)
        kept_later = {image: text for image, text in editor.later_lines.items() if image not in tags}
        editor = replace(editor, on_disk=_frozen(editor.on_disk | tags),
                         stamps=_frozen(editor.stamps | captions.stamps),
                         later_lines=_frozen(kept_later | later_lines))
    return record_step(editor, "Revert to the saved captions", {image: editor.on_disk[image] for image in chosen})


# ---------------------------------------------------------------------------------------------------------------
# Disk: save and reload.


@dataclass(frozen=True)
class SaveResult:
    written: tuple[Path, ...]
    backup_folder: Path | None
    without_tags: tuple[Path, ...] = ()  # caption files written with an empty first line: an empty caption
    unlinked: tuple[Path, ...] = ()  # caption files that were links (to a shared caption): now files of their own


def save(editor: TagEditor) -> tuple[TagEditor, SaveResult]:
    """Write the captions of the images with unsaved edits (and only those), keeping the previous versions in a new
    folder under ``editor.backup_dir``. If another program changed any of them since they were read, nothing is
    written and the ``UserError`` lists them: ``reload`` first."""
    changed = unsaved_images(editor)
    texts = {editor.caption_path(image): caption_text(editor, image) for image in changed}
    # an image without tags gets an empty first line, which sd-scripts and this trainer train as an empty caption
    # (as a blank caption file): a 0-byte file stops both. Undoing an edit of a blank caption and saving restores it.
    without_tags = tuple(path for path, text in texts.items() if not text)
    texts.update(dict.fromkeys(without_tags, "\n"))
    # a caption that is a link (to one caption several folders share) becomes this image's own file: writing through
    # the link would change the other images' captions behind the editor's back
    unlinked = tuple(path for path in texts if path.is_symlink())
    result = write_captions(texts, editor.backup_dir, {path: editor.stamps.get(path, NO_FILE) for path in texts},
                            editor.within)
    saved = editor.on_disk | {image: editor.tags[image] for image in changed}
    stamps = editor.stamps | dict(result.written)
    return (
        replace(editor, on_disk=_frozen(saved), stamps=_frozen(stamps)),
        SaveResult(tuple(texts), result.backup_folder, without_tags, unlinked),
    )


@dataclass(frozen=True)
class ReloadReport:
    """What changed on disk since the folder was read: ``updated`` now shows the other program's version (it had no
    unsaved edits here); ``conflicts`` were changed there *and* here — the edits made here are kept and a ``save``
    would replace the other version (after backing it up); ``revert`` takes the other version instead."""

    updated: tuple[Path, ...] = ()
    conflicts: tuple[Path, ...] = ()
    added: tuple[Path, ...] = ()
    removed: tuple[Path, ...] = ()
    unreadable: tuple[Path, ...] = ()


def reload(editor: TagEditor, why: str = "Reload captions changed on disk") -> tuple[TagEditor, ReloadReport]:
    """Read the folder again without losing unsaved edits; see ``ReloadReport`` for what happens to each image.
    ``why`` names the undo step of the captions that changed on disk (a restored backup, another program)."""
    scan = _scan(editor.folder, editor.recursive, editor.caption_extension, editor.within)
    old_images, new_images = set(editor.images), set(scan.images)
    updated, conflicts = [], []
    tags = {}
    for image in scan.images:
        if image not in scan.tags:
            continue
        caption = editor.caption_path(image)
        if image not in editor.tags:
            tags[image] = scan.tags[image]
        elif scan.stamps[caption].same_content(editor.stamps.get(caption, NO_FILE)):
            tags[image] = editor.tags[image]
        elif editor.tags[image] == editor.on_disk[image] or editor.tags[image] == scan.tags[image]:
            updated.append(image)
            tags[image] = scan.tags[image]
        else:
            conflicts.append(image)
            tags[image] = editor.tags[image]
    reloaded = replace(
        editor,
        images=scan.images,
        tags=_frozen({image: editor.tags.get(image, tags[image]) for image in tags}),
        on_disk=_frozen(scan.tags),
        stamps=_frozen(scan.stamps),
        siblings=_frozen(_siblings(scan.images)),
        later_lines=_frozen(scan.later_lines),
        unreadable=_frozen(scan.unreadable),
        broken_links=scan.broken_links,
        outside_links=scan.outside_links,
    )
    # the other program's versions arrive as an undoable step, so undo never silently mixes two histories
    reloaded = record_step(reloaded, why, {image: tags[image] for image in updated})
    report = ReloadReport(
        updated=tuple(updated),
        conflicts=tuple(conflicts),
        added=tuple(image for image in scan.images if image not in old_images),
        removed=tuple(image for image in editor.images if image not in new_images),
        unreadable=tuple(scan.unreadable),
    )
    return reloaded, report
