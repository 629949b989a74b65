"""A tag editor's unsaved edits as a draft: plain data that a shell keeps on disk while edits are unsaved, and lays
over the folder read again after a restart. No file is read or written here (``app.tag_sessions`` does that).

A draft names the folder and how it was read, and holds, for each image with unsaved edits only, its caption text as
``tag_editor.save`` would write it and the stamp of the caption file the edits were made on (``CaptionStamp``, what
``caption_files.find_changed_on_disk`` compares). Restoring compares that stamp with the one the new reading took, by
the same ``CaptionStamp.same_content``: a caption another program changed since (or an image that is gone) is not
overwritten; it is named, and its text handed back to the caller to keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath

from lora_trainer.dataset import tag_editor
from lora_trainer.dataset.caption_files import NO_FILE, CaptionStamp
from lora_trainer.dataset.tag_editor import TagEditor

DRAFT_FORMAT = 1  # the "tag_editor_draft" value a draft file carries; a later format is refused, not misread


@dataclass(frozen=True)
class DraftEdit:
    """One image's unsaved caption: its name relative to the folder (``/`` separators), the caption file's text as a
    save would write it, and the stamp of the caption file that text was edited from."""

    name: str
    caption: str
    stamp: CaptionStamp


@dataclass(frozen=True)
class Draft:
    folder: Path
    recursive: bool
    caption_extension: str
    saved_at: datetime  # with its time zone
    edits: tuple[DraftEdit, ...]


def draft_of(editor: TagEditor, saved_at: datetime) -> Draft | None:
    """The editor's unsaved edits as a draft; None when nothing is unsaved."""
    edits = tuple(DraftEdit(image.relative_to(editor.folder).as_posix(), tag_editor.caption_text(editor, image),
                            editor.stamps.get(editor.caption_path(image), NO_FILE))
                  for image in tag_editor.unsaved_images(editor))
    if not edits:
        return None
    return Draft(editor.folder, editor.recursive, editor.caption_extension, saved_at, edits)


def draft_as_data(draft: Draft) -> dict:
    return {
        "tag_editor_draft": DRAFT_FORMAT,
        "folder": str(draft.folder),
        "recursive": draft.recursive,
        "caption_extension": draft.caption_extension,
        "saved_at": draft.saved_at.isoformat(timespec="seconds"),
        "images": [{"name": edit.name, "caption": edit.caption, "caption_file": _stamp_as_data(edit.stamp)}
                   for edit in draft.edits],
    }


def _stamp_as_data(stamp: CaptionStamp) -> dict:
    return {"exists": stamp.exists, "size": stamp.size, "mtime_ns": stamp.mtime_ns, "digest": stamp.digest.hex()}


def _stamp_from_data(data: dict) -> CaptionStamp:
    if not data["exists"]:
        return NO_FILE
    return CaptionStamp(True, int(data["size"]), int(data["mtime_ns"]), bytes.fromhex(data["digest"]))


def draft_from_data(data) -> Draft:
    """A draft from its data form; ``ValueError`` saying what is wrong with it (a file cut short, edited by hand, or
    written by a later version)."""
    if not isinstance(data, dict) or "tag_editor_draft" not in data:
        raise ValueError("it is not a tag-editor draft")
    if data["tag_editor_draft"] != DRAFT_FORMAT:
        raise ValueError(f"it has draft format {data['tag_editor_draft']!r}, which this version does not read")
    try:
        edits = []
        for entry in data["images"]:
            if not isinstance(entry["name"], str) or not isinstance(entry["caption"], str):
                raise TypeError("a name or caption is not text")
            edits.append(DraftEdit(entry["name"], entry["caption"], _stamp_from_data(entry["caption_file"])))
        saved_at = datetime.fromisoformat(data["saved_at"])
        return Draft(Path(data["folder"]), bool(data["recursive"]), str(data["caption_extension"]),
                     saved_at if saved_at.tzinfo else saved_at.astimezone(), tuple(edits))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"a field is missing or malformed ({type(error).__name__}: {error})") from None


@dataclass(frozen=True)
class DraftRestore:
    """What restoring a draft did: the images that show its edits again, and the edits left out because their
    caption file changed on disk since (``changed_on_disk``) or their image is no longer there to edit (``gone``)."""

    saved_at: datetime
    restored: tuple[Path, ...]
    changed_on_disk: tuple[DraftEdit, ...] = ()
    gone: tuple[DraftEdit, ...] = ()

    @property
    def left_out(self) -> tuple[DraftEdit, ...]:
        return self.changed_on_disk + self.gone


def restore(editor: TagEditor, draft: Draft) -> tuple[TagEditor, DraftRestore]:
    """Lay the draft's edits over a freshly read editor as one undoable step (Undo brings back the captions on disk);
    an edit whose caption file is no longer the one it was made on, or whose image is gone or unreadable now, is
    left out and returned."""
    after, changed, gone = {}, [], []
    for edit in draft.edits:
        image = editor.folder / PurePosixPath(edit.name)
        if image not in editor.tags:  # deleted, renamed, or its caption unreadable now
            gone.append(edit)
        elif not editor.stamps.get(editor.caption_path(image), NO_FILE).same_content(edit.stamp):
            changed.append(edit)
        else:  # the file is the one the edit was made on, so its lines after the first are those the draft holds
            after[image] = tag_editor.split_tags(edit.caption.partition("\n")[0])
    when = shown_time(draft.saved_at)
    restored = tag_editor.record_step(editor, f"Restore unsaved edits from {when} (before the restart)", after)
    shown = tuple(image for image in after if restored.tags[image] != editor.tags[image])
    return restored, DraftRestore(draft.saved_at, shown, tuple(changed), tuple(gone))


def shown_time(moment: datetime) -> str:
    """A draft's time as a user reads it: this machine's local time, to the minute."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def _names(edits: tuple[DraftEdit, ...], limit: int = 5) -> str:
    return ", ".join(edit.name for edit in edits[:limit]) + (", …" if len(edits) > limit else "")


def restore_note(outcome: DraftRestore, left_out_kept_in: str | None) -> str:
    """What opening the folder restored, in sentences: the count and the draft's time, then the edits left out, by
    name, and where their texts are (``left_out_kept_in``, said by the caller: a file, or the texts themselves)."""
    note = ""
    if outcome.restored:
        note = (f"Restored {len(outcome.restored)} unsaved caption edit(s) from {shown_time(outcome.saved_at)} (before "
                "the restart): Save them, or Undo to go back to the captions on disk.")
    if outcome.changed_on_disk:
        note += (f" {len(outcome.changed_on_disk)} draft edit(s) not restored: their captions changed on disk since: "
                 f"{_names(outcome.changed_on_disk)}.")
    if outcome.gone:
        note += (f" {len(outcome.gone)} draft edit(s) not restored: their images are gone or their captions "
                 f"unreadable: {_names(outcome.gone)}.")
    if outcome.left_out and left_out_kept_in:
        note += f" Their texts are kept in {left_out_kept_in}."
    return note.strip()
