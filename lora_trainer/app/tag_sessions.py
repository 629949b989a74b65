"""Tag-editor sessions kept on the server, shared by the Dataset Tag Editor tab and the HTTP API.

A session is one open folder (``dataset.tag_editor.TagEditor``, an immutable value) plus the last filter its user
looked through, behind a lock: ``session.change(fn)`` swaps in ``fn(editor)``, so two browser tabs or an API client
and a tab editing the same session never lose each other's steps. The registry keeps the most recently used
sessions (LRU); a closed or evicted session answers with a clear message. Nothing here knows about gradio or
FastAPI: the tab and the routes turn requests into the plain calls below.

Images are named by their path relative to the folder, with ``/`` separators (``sub/a.png``), in the UI and the API.

Unsaved edits outlive the process: with a drafts folder (the data folder's ``tag-drafts/``), every step that changes a
folder's unsaved edits rewrites its draft (``TagDrafts``, the data in ``dataset.tag_drafts``), and saving or closing
removes it; opening the folder after a restart lays the draft over the captions as read then, as one undo step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

from ..dataset import caption_files, tag_drafts, tag_editor
from ..dataset.caption_files import BackupSummary, find_changed_on_disk
from ..dataset.tag_editor import TagEditor, TagFilter, Tags
from ..errors import UserError
from ..safe_io import replace_path, resolves_below, write_text

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 8  # open folders kept in memory; 10,000 images with their history is a few MB each
PAGE_SIZE = 48
# Tag-frequency rows a page carries, as many as the tab lists (a folder of 3,000 tags sent both full lists, 148 KiB,
# with every page, edit and undo).
FREQUENCY_ROWS = 300

# The API's edit names (and the core's own names, so either works) → tag_editor.EDIT_KINDS.
EDIT_NAMES = {
    "add": "add", "remove": "remove", "replace": "replace", "rename": "rename",
    "dedupe": "remove_duplicates", "remove_duplicates": "remove_duplicates", "sort": "sort",
    "move_first": "move_to_front", "move_to_front": "move_to_front", "lowercase": "lowercase",
    "underscores_to_spaces": "underscores_to_spaces", "spaces_to_underscores": "spaces_to_underscores", "set": "set",
}


class SessionNotFound(UserError):
    """The session id is unknown: closed, evicted by newer sessions, or from before a restart."""


class TooManySessions(UserError):
    """Every session that could make room holds unsaved edits."""


class UnsavedEdits(UserError):
    """The session holds unsaved edits, which a restore from a backup would mix with the restored captions."""


class SaveConflict(UserError):
    """Captions changed on disk since they were read; ``conflicts`` names them. Nothing was written."""

    def __init__(self, message: str, conflicts: list[str]):
        super().__init__(message)
        self.conflicts = conflicts


@dataclass(frozen=True)
class DraftOpening:
    """What opening a folder found in its draft: what was restored (None when the draft could not be read), where
    the edits left out are kept, or why the draft could not be read (``problem``, one sentence)."""

    restored: tag_drafts.DraftRestore | None = None
    left_out_kept_in: str | None = None
    problem: str | None = None

    @property
    def note(self) -> str:
        if self.restored is None:
            return self.problem or ""
        return tag_drafts.restore_note(self.restored, self.left_out_kept_in)


@dataclass
class TagSession:
    id: str
    editor: TagEditor
    tag_filter: TagFilter = field(default_factory=TagFilter)
    used: float = field(default_factory=time.monotonic)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    draft: DraftOpening | None = None  # what opening the folder restored from its draft
    on_change: Callable[[TagSession], None] | None = field(default=None, repr=False)  # the registry keeps the draft

    @property
    def folder(self) -> Path:
        return self.editor.folder

    def change(self, update: Callable[[TagEditor], TagEditor]) -> TagEditor:
        """Replace the editor by ``update(editor)`` under the session's lock; returns the new editor. Every change of
        the editor goes through here, so the folder's draft follows each one."""
        with self.lock:
            self.editor = update(self.editor)
            if self.on_change is not None:
                self.on_change(self)
            return self.editor


@dataclass(frozen=True)
class UnsavedFolder:
    """A session's unsaved edits as the process ends: kept in ``draft``, or not, and why (``problem``)."""

    folder: Path
    unsaved: int
    draft: Path | None
    problem: str = ""


def unsaved_edits_at_exit(folders: Iterable[UnsavedFolder]) -> list[str]:
    """A line for each session with unsaved edits as the app stops: kept as a draft (an app that exits without a word
    looks as if it had dropped them), or lost, and why."""
    return [f"{kept.unsaved} unsaved caption edit(s) in {kept.folder} are kept as a draft and come back when you open "
            "that folder again" if kept.draft else
            f"{kept.unsaved} unsaved caption edit(s) in {kept.folder} are lost as the app stops: {kept.problem}"
            for kept in folders]


def _json_text(data: dict, indent: int | None = 1) -> str:
    text = json.dumps(data, ensure_ascii=False, indent=indent)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8 (GBK bytes on Linux): escaped, it reads back the same
        text = json.dumps(data, indent=indent)
    return text


def _file_time() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


# Steps made within this time after one another are written as one draft: a batch edit of 10,000 images would
# otherwise pay for its draft (about 0.2 s to build and write) before the page answers.
DRAFT_DELAY_SECONDS = 0.3


class TagDrafts:
    """Each folder's unsaved edits as a JSON draft in ``folder`` (the data folder's ``tag-drafts/``), one file per
    folder and way of reading it (named by a hash of both), so that a restart (a crash, an update, a closed console)
    loses none. A step only marks its folder due (``follow``); a writer thread writes it a moment later from the
    latest state, only the unsaved images, and only when they changed; a failed write is logged once and never fails
    the edit. A draft that cannot be read is moved aside and named, never deleted.

    ``source_of(editor)`` is the session whose unsaved edits the draft of that editor's folder keeps (the latest
    one there with unsaved edits), or None: no draft."""

    def __init__(self, folder: Path, source_of: Callable[[TagEditor], TagSession | None],
                 delay: float = DRAFT_DELAY_SECONDS):
        self.folder = Path(folder)
        self.source_of, self.delay = source_of, delay
        # draft → the session id and edits it was last written with
        self._kept: dict[Path, tuple[str, tuple[tag_drafts.DraftEdit, ...]]] = {}
        self._failed: dict[Path, str] = {}  # draft → why its last write failed
        self._in_the_way: set[Path] = set()  # unreadable drafts that could not be moved aside: never written over
        self._due: dict[Path, TagEditor] = {}  # drafts to write, by the last editor that changed there
        self._writing = False
        self._hurry = False
        self._closed = False
        self._state = threading.Condition()
        self._writer: threading.Thread | None = None

    def follow(self, editor: TagEditor) -> None:
        """The unsaved edits of ``editor``'s folder changed: its draft is written (or removed) in a moment."""
        with self._state:
            self._due[self._path_of(editor)] = editor
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_due, name="tag-drafts", daemon=True)
                self._writer.start()
            self._state.notify_all()

    def flush(self) -> None:
        """Write what is due now, and return once it is written (before a draft is read, and at exit)."""
        with self._state:
            self._hurry = True
            self._state.notify_all()
            self._state.wait_for(lambda: not self._due and not self._writing)
            self._hurry = False

    def close(self) -> None:
        """Write what is due, then end the writer thread: a Reload UI makes a new registry, and the old one's thread
        would keep it (every session's editor and history) alive for good."""
        self.flush()
        with self._state:
            self._closed = True
            self._state.notify_all()
            writer = self._writer
        if writer is not None:
            writer.join(timeout=5)

    def _write_due(self) -> None:
        while True:
            with self._state:
                self._state.wait_for(lambda: self._due or self._closed)
                if self._closed and not self._due:
                    self._writer = None
                    return
                self._state.wait_for(lambda: self._hurry or self._closed, timeout=self.delay)  # later steps join
                due, self._due, self._writing = self._due, {}, True
            try:
                for editor in due.values():
                    self.keep(editor, self.source_of(editor))
            except Exception:  # a bug here must not stop every later draft
                log.exception("Tag editor: writing a draft of unsaved edits failed")
            finally:
                with self._state:
                    self._writing = False
                    self._state.notify_all()

    def path_for(self, folder: Path, recursive: bool, caption_extension: str) -> Path:
        identity = json.dumps([str(Path(folder).resolve()), bool(recursive), caption_extension])
        return self.folder / f"{hashlib.sha1(identity.encode('utf-8', 'surrogateescape')).hexdigest()[:20]}.json"

    def _path_of(self, editor: TagEditor) -> Path:
        return self.path_for(editor.folder, editor.recursive, editor.caption_extension)

    def keep(self, editor: TagEditor, source: TagSession | None) -> None:
        """Write the draft of ``editor``'s folder from ``source``, the session whose unsaved edits it keeps, or remove
        it when none is given (no session holds unsaved edits there). The writer thread's work."""
        path = self._path_of(editor)
        if path in self._in_the_way:
            return
        draft = tag_drafts.draft_of(source.editor, datetime.now().astimezone()) if source is not None else None
        if draft is None:
            self._kept.pop(path, None)
            try:
                path.unlink(missing_ok=True)
            except OSError as error:
                self._failed_once(path, editor.folder, f"the draft {path} could not be removed ({error})")
            return
        if self._kept.get(path) == (source.id, draft.edits):
            return  # a step that left the unsaved captions as they were (an edit that matched nothing)
        self._kept.pop(path, None)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text(path, _json_text(tag_drafts.draft_as_data(draft), indent=None))  # json's C encoder: 4× faster
        except (OSError, UserError) as error:
            self._failed_once(path, editor.folder, f"the draft {path} could not be written ({error})")
            return
        self._failed.pop(path, None)
        self._kept[path] = (source.id, draft.edits)

    def _failed_once(self, path: Path, folder: Path, problem: str) -> None:
        if path not in self._failed:  # every later step would say it again
            log.warning("Tag editor: %s; the unsaved caption edits in %s are not kept if the app stops before they are "
                        "saved.", problem, folder)
        self._failed[path] = problem

    def where_kept(self, session: TagSession) -> tuple[Path | None, str]:
        """The draft that keeps ``session``'s unsaved edits, or None and why none does."""
        path = self._path_of(session.editor)
        if path in self._in_the_way:
            return None, f"an unreadable draft is in the way at {path}; move it elsewhere"
        if path in self._failed:
            return None, self._failed[path]
        if self._kept.get(path, ("",))[0] != session.id:
            return None, "another session of that folder was edited later, and a folder's draft keeps the latest one's"
        return path, ""

    def restore(self, editor: TagEditor) -> tuple[TagEditor, DraftOpening | None]:
        """The folder's draft, if there is one, laid over the freshly read ``editor`` (one undo step); the edits left
        out (their captions changed on disk since, their images gone) are kept in a file beside it."""
        path = self._path_of(editor)
        self.flush()  # a draft still being written (a session here just saved or closed) is read as it is now
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            draft = tag_drafts.draft_from_data(data)
        except (FileNotFoundError, NotADirectoryError):  # no draft (the drafts folder may not be one: said on writing)
            return editor, None
        except (OSError, ValueError) as error:  # cut short, edited by hand, no access; ValueError: JSON and UTF-8 too
            return editor, self._moved_aside(path, str(error))
        if self.path_for(draft.folder, draft.recursive, draft.caption_extension) != path:
            return editor, self._moved_aside(path, f"it is the draft of {draft.folder}, read another way")
        editor, restored = tag_drafts.restore(editor, draft)
        kept_in = self._keep_left_out(path, draft, restored.left_out) if restored.left_out else None
        return editor, DraftOpening(restored, kept_in)

    def _keep_left_out(self, path: Path, draft: tag_drafts.Draft, left_out: tuple[tag_drafts.DraftEdit, ...]) -> str:
        kept = path.with_name(f"{path.stem}.not-restored-{_file_time()}.json")
        try:
            write_text(kept, _json_text(tag_drafts.draft_as_data(replace(draft, edits=left_out))))
        except (OSError, UserError) as error:  # then in the message itself, so that nothing is lost
            texts = "; ".join(f"{edit.name}: {edit.caption!r}" for edit in left_out)
            return f"this message, as {kept} could not be written ({error}): {texts}"
        return str(kept)

    def _moved_aside(self, path: Path, reason: str) -> DraftOpening:
        aside = path.with_name(f"{path.stem}.unreadable-{_file_time()}.json")
        try:
            replace_path(path, aside)
        except OSError as error:
            self._in_the_way.add(path)
            return DraftOpening(problem=f"The draft of unsaved edits {path} could not be read ({reason}), nor moved "
                                        f"aside ({error}): it stays there untouched, and this folder's edits are not "
                                        "kept as a draft until it is moved elsewhere.")
        return DraftOpening(problem=f"The draft of this folder's unsaved edits could not be read ({reason}); it was "
                                    f"moved to {aside}, where you can open it to take captions from it by hand.")


class TagSessions:
    """Open sessions by id, the least recently used without unsaved edits dropped beyond ``limit`` (edits are never
    dropped: the tab and API clients share the registry, and one client's opens must not throw away another's work).
    Thread-safe."""

    def __init__(self, limit: int = DEFAULT_LIMIT, drafts_folder: Path | None = None):
        self.limit = limit
        self._sessions: OrderedDict[str, TagSession] = OrderedDict()
        self._lock = threading.Lock()
        self.drafts = TagDrafts(drafts_folder, self._draft_source) if drafts_folder is not None else None

    def open(self, folder: Path, *, recursive: bool = False, caption_extension: str = ".txt",
             within: Iterable[Path] | None = None) -> TagSession:
        """Read ``folder`` (already checked against the allowed roots by the caller) into a new session; with
        ``within`` (those roots) its pictures and captions too: links leading elsewhere are left out, and never read,
        served or written by the session. Refused while ``4 × limit`` sessions hold unsaved edits: they are never
        dropped, so they would fill the memory."""
        with self._lock:
            unsaved = [key for key, kept in self._sessions.items() if tag_editor.unsaved_images(kept.editor)]
        if len(unsaved) >= 4 * self.limit:
            raise TooManySessions(f"{len(unsaved)} tag-editor sessions hold unsaved edits; save or close one (DELETE "
                                  f"the session, or Save in the tab) before opening another folder.")
        editor = tag_editor.open_folder(Path(folder), recursive=recursive, caption_extension=caption_extension,
                                        within=within)
        opening = None
        # a live session's edits are in the draft already: laid over this one too, they would be in two sessions
        if self.drafts is not None and self.with_unsaved(editor.folder, recursive=editor.recursive,
                                                         caption_extension=editor.caption_extension) is None:
            editor, opening = self.drafts.restore(editor)
        session = TagSession(secrets.token_urlsafe(12), editor, draft=opening, on_change=self._keep_draft)
        with self._lock:
            self._sessions[session.id] = session
            clean = [key for key, kept in self._sessions.items()
                     if key != session.id and not tag_editor.unsaved_images(kept.editor)]
            for key in clean[: max(0, len(self._sessions) - self.limit)]:
                del self._sessions[key]
        if opening is not None:
            self._keep_draft(session)  # now without the edits left out, which are kept beside it
        return session

    def _keep_draft(self, session: TagSession) -> None:
        """After a change of ``session`` (or its closing): its folder's draft follows."""
        if self.drafts is not None:
            self.drafts.follow(session.editor)

    def _draft_source(self, editor: TagEditor) -> TagSession | None:
        return self.with_unsaved(editor.folder, recursive=editor.recursive, caption_extension=editor.caption_extension)

    def unsaved_at_exit(self) -> list[UnsavedFolder]:
        """Each session with unsaved edits, and the draft that keeps them (``unsaved_edits_at_exit`` says it)."""
        if self.drafts is not None:
            self.drafts.flush()
        with self._lock:
            sessions = list(self._sessions.values())
        found = []
        for session in sessions:
            if unsaved := len(tag_editor.unsaved_images(session.editor)):
                draft, problem = (self.drafts.where_kept(session) if self.drafts is not None
                                  else (None, "no drafts folder is set"))
                found.append(UnsavedFolder(session.folder, unsaved, draft, problem))
        return found

    def with_unsaved(self, folder: Path, *, recursive: bool = False, caption_extension: str = ".txt") -> TagSession | None:
        """The latest open session of ``folder`` (read the same way) that holds unsaved edits: a page reloaded in the
        middle of editing finds them there."""
        if not caption_extension.startswith("."):  # as the editor keeps it
            caption_extension = "." + caption_extension
        with self._lock:
            sessions = list(self._sessions.values())
        for session in reversed(sessions):
            editor = session.editor
            if (editor.folder == Path(folder) and editor.recursive == recursive
                    and editor.caption_extension == caption_extension and tag_editor.unsaved_images(editor)):
                return session
        return None

    def get(self, session_id: str) -> TagSession:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise SessionNotFound(f"Tag-editor session {session_id!r} is not open (closed, replaced by newer ones, "
                                      "or from before a restart); open the folder again.")
            self._sessions.move_to_end(session_id)
        session.used = time.monotonic()
        return session

    def close(self, session_id: str) -> None:
        """Forget the session and its unsaved edits, and so their draft: closing (Discard) is the user's choice."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            self._keep_draft(session)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)


def sessions_of(services) -> TagSessions:
    """The one registry of a ``Services`` object (the tab and the API of one process share it)."""
    return services.tag_sessions


# ---------------------------------------------------------------------------------------------------------------
# Requests as data → core calls.


def image_name(editor: TagEditor, image: Path) -> str:
    return image.relative_to(editor.folder).as_posix()


_NAMES: dict[int, tuple[tuple[Path, ...], dict[str, Path]]] = {}  # id(images) → (those images, name → image)


def _names_of(editor: TagEditor) -> dict[str, Path]:
    """The editor's images by name, made once per folder read (edits keep the same ``images``): the clicked image is
    looked up at every view, and a pass over 10,000 images each time cost more than the view."""
    images = editor.images
    cached = _NAMES.get(id(images))
    if cached is None or cached[0] is not images:  # held here, so its id is no other tuple's while cached
        if len(_NAMES) >= 8:
            _NAMES.clear()
        cached = _NAMES[id(images)] = (images, {image_name(editor, image): image for image in images})
    return cached[1]


def images_named(editor: TagEditor, names: Iterable[str], field: str = "selection") -> list[Path]:
    """Images by their relative names; a name that is not an image of the folder is a UserError naming it."""
    known = _names_of(editor)
    chosen, unknown = [], []
    for name in names:
        if isinstance(name, str) and name in known:  # a number or a list in a request's selection is no name
            chosen.append(known[name])
        else:
            unknown.append(name)
    if unknown:
        shown = ", ".join(repr(name) for name in unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise UserError(f"{field}: {shown} is not an image of {editor.folder}; use the names the page lists.", field)
    return chosen


def _tags(value, field_name: str) -> Tags:
    if value is None:
        return ()
    if isinstance(value, str):
        return tag_editor.split_tags(value)
    if isinstance(value, (list, tuple)) and all(isinstance(tag, str) for tag in value):
        return tuple(tag for text in value for tag in tag_editor.split_tags(text))  # a comma in a caption parts tags
    raise UserError(f"{field_name}: give tags as a list of strings or one comma-separated string.", field_name)


def filter_from(data: dict | None) -> TagFilter:
    """``{"all": [...], "any": [...], "none": [...], "regex": "...", "untagged": bool}`` → TagFilter."""
    data = data or {}
    if not isinstance(data, dict):
        raise UserError('filter: give an object such as {"all": ["red hair"], "untagged": false}.', "filter")
    unknown = sorted(set(data) - {"all", "any", "none", "regex", "untagged"})
    if unknown:
        raise UserError(f"filter: unknown key(s) {', '.join(unknown)}; use all, any, none, regex, untagged.", "filter")
    if not isinstance(data.get("untagged", False), bool):  # "false" would be read as true
        raise UserError("filter.untagged: give true or false.", "filter.untagged")
    if not isinstance(data.get("regex") or "", str):
        raise UserError("filter.regex: give a regular expression as text.", "filter.regex")
    try:
        return TagFilter(all_of=_tags(data.get("all"), "filter.all"), any_of=_tags(data.get("any"), "filter.any"),
                         none_of=_tags(data.get("none"), "filter.none"), caption_regex=data.get("regex") or None,
                         untagged=data.get("untagged", False))
    except UserError as error:
        raise UserError(str(error), error.field or "filter.regex") from None  # the one check TagFilter makes itself


def filter_as_data(tag_filter: TagFilter) -> dict:
    return {"all": list(tag_filter.all_of), "any": list(tag_filter.any_of), "none": list(tag_filter.none_of),
            "regex": tag_filter.caption_regex, "untagged": tag_filter.untagged}


def edit_from(data: dict) -> tag_editor.TagEdit:
    """``{"op": "replace", "find": "x", "replacement": "y"}`` → the core's edit (``op`` names: ``EDIT_NAMES``)."""
    op = data.get("op")
    if op not in EDIT_NAMES:
        raise UserError(f"op: {op!r} is not a tag edit; use one of {', '.join(sorted(set(EDIT_NAMES) - {'remove_duplicates', 'move_to_front'}))}.", "op")
    parameters = {key: value for key, value in data.items() if key not in ("op", "selection", "filter")}
    for key in ("tags",):
        if key in parameters:
            parameters[key] = _tags(parameters[key], key)
    try:
        return tag_editor.make_edit(EDIT_NAMES[op], **parameters)
    except UserError as error:  # said with the op's name as the client wrote it ("dedupe", not the core's name)
        raise UserError(str(error).replace(f"Tag edit {EDIT_NAMES[op]!r}", f"Tag edit {op!r}"), error.field) from None


def selected_images(session: TagSession, selection, tag_filter: TagFilter | None = None) -> list[Path]:
    """``"filtered"`` (the session's current filter, or ``tag_filter``), ``"all"``, or a list of image names."""
    editor = session.editor
    if selection in (None, "filtered"):
        return list(tag_editor.select(editor, tag_filter or session.tag_filter))
    if selection == "all":
        return list(editor.tags)
    if isinstance(selection, list):
        return images_named(editor, selection)
    raise UserError('selection: use "filtered", "all" or a list of image names.', "selection")


def apply_request(session: TagSession, data: dict) -> TagEditor:
    """One batch edit from its data form, as one undo step."""
    edit = edit_from(data)
    tag_filter = filter_from(data["filter"]) if data.get("filter") is not None else None
    with session.lock:
        images = selected_images(session, data.get("selection", "filtered"), tag_filter)
        editor = session.editor
        if isinstance(data.get("selection"), list) and (unreadable := [i for i in images if i in editor.unreadable]):
            # named, yet left alone by every edit: said rather than answered as if the edit were made
            raise UserError(f"selection: the caption of {image_name(editor, unreadable[0])} cannot be edited: "
                            f"{editor.unreadable[unreadable[0]]}", "selection")
        return session.change(lambda editor: tag_editor.apply_edit(editor, edit, images))


def revert_session(session: TagSession, selection="all") -> list[str]:
    """Throw away the unsaved edits of the images ``selection`` picks (as for edits: ``"all"``, ``"filtered"`` or a
    list of names), as one undo step: they show their caption files as they are now (read again: another program's
    version too, without a reload). Returns the names of the images that went back."""
    with session.lock:
        images = selected_images(session, "all" if selection is None else selection)
        steps = len(session.editor.undo_steps)
        editor = session.change(lambda editor: tag_editor.revert(editor, images))
    # no step when nothing was unsaved, or the files now hold the edits
    went_back = editor.undo_steps[-1].after if len(editor.undo_steps) > steps else {}
    return [image_name(editor, image) for image in went_back]


# ---------------------------------------------------------------------------------------------------------------
# What a page shows.


def history(editor: TagEditor) -> dict:
    return {"undo": [step.description for step in editor.undo_steps],
            "redo": [step.description for step in reversed(editor.redo_steps)]}


def page_of(session: TagSession, page: int = 1, page_size: int = PAGE_SIZE, tag_limit: int = FREQUENCY_ROWS) -> dict:
    """One page of the filtered images with their tags, the ``tag_limit`` most frequent tags (of all images and of
    the filtered ones) with how many tags there are, the undo/redo history and what is unsaved: everything a view of
    the folder needs, as JSON-able data."""
    for name, value in (("page", page), ("page_size", page_size)):
        if value < 1:
            raise UserError(f"{name} must be at least 1.", name)
    if tag_limit < 0:
        raise UserError("tag_limit must be 0 or more (the number of tag-frequency rows to send).", "tag_limit")
    with session.lock:
        editor, tag_filter = session.editor, session.tag_filter
    filtered = tag_editor.select(editor, tag_filter)
    pages = max(1, math.ceil(len(filtered) / page_size))
    page = min(page, pages)  # past the end (a filter or an edit shortened the list): the last page, said by "page"
    shown = filtered[(page - 1) * page_size: page * page_size]
    unsaved = set(tag_editor.unsaved_images(editor))
    counts, filtered_counts = tag_editor.tag_counts(editor), tag_editor.tag_counts(editor, filtered)
    return {
        "session": session.id,
        "folder": str(editor.folder),
        "filter": filter_as_data(tag_filter),
        "page": page, "pages": pages, "page_size": page_size,
        "total": len(editor.images), "filtered": len(filtered),
        "images": [{"name": image_name(editor, image), "tags": list(editor.tags[image]), "unsaved": image in unsaved}
                   for image in shown],
        "tag_limit": tag_limit,
        "tag_frequency": [[tag, count] for tag, count in counts[:tag_limit]],
        "tag_frequency_total": len(counts),
        "filtered_tag_frequency": [[tag, count] for tag, count in filtered_counts[:tag_limit]],
        "filtered_tag_frequency_total": len(filtered_counts),
        "unsaved": len(unsaved),
        "unreadable": {image_name(editor, image): reason for image, reason in editor.unreadable.items()},
        "multiline": [image_name(editor, image) for image in editor.multiline],
        "history": history(editor),
    }


def set_filter(session: TagSession, tag_filter: TagFilter) -> None:
    with session.lock:
        session.tag_filter = tag_filter


# ---------------------------------------------------------------------------------------------------------------
# Disk.


def save_session(session: TagSession, overwrite_changed: bool = False) -> dict:
    """Write the unsaved captions (backups first). If another program changed any of them since they were read,
    nothing is written and ``SaveConflict`` names them — unless ``overwrite_changed``: then the folder is reloaded
    (images without edits here take the other version) and the edits made here replace the other versions."""
    with session.lock:
        editor = session.editor
        reloaded = None
        if overwrite_changed:
            editor, reloaded = tag_editor.reload(editor)
        else:
            unsaved = tag_editor.unsaved_images(editor)
            stamps = {editor.caption_path(image): editor.stamps.get(editor.caption_path(image), tag_editor.NO_FILE)
                      for image in unsaved}
            changed = set(find_changed_on_disk(stamps))
            conflicts = [image_name(editor, image) for image in unsaved if editor.caption_path(image) in changed]
            if conflicts:
                raise SaveConflict(f"{len(conflicts)} caption file(s) changed on disk since they were read, so nothing "
                                   f"was saved: {', '.join(conflicts[:10])}. Save with overwrite to keep the edits made "
                                   "here (the other versions are backed up), or reload.", conflicts)
        editor, result = tag_editor.save(editor)
        session.change(lambda _: editor)
    return {
        "written": [path.relative_to(editor.folder).as_posix() for path in result.written],  # caption files
        "without_tags": [path.relative_to(editor.folder).as_posix() for path in result.without_tags],
        "unlinked": [path.relative_to(editor.folder).as_posix() for path in result.unlinked],
        "backup_folder": str(result.backup_folder) if result.backup_folder else None,
        "conflicts_overwritten": [image_name(editor, image) for image in reloaded.conflicts] if reloaded else [],
        "updated_from_disk": [image_name(editor, image) for image in reloaded.updated] if reloaded else [],
    }


def reload_session(session: TagSession) -> dict:
    with session.lock:
        editor, report = tag_editor.reload(session.editor)
        session.change(lambda _: editor)
    return {key: [image_name(editor, image) if image.is_relative_to(editor.folder) else str(image)
                  for image in getattr(report, key)]
            for key in ("updated", "conflicts", "added", "removed", "unreadable")}


def backups_of(session: TagSession) -> list[BackupSummary]:
    """The backups of the session's folder that a restore can put back, newest first (every save keeps one); none
    where the backup folder is a link leading outside the session's allowed folders, whose backups are not read (a
    restore or save through it is refused too)."""
    editor = session.editor
    if editor.backup_dir is None or editor.within is not None and not resolves_below(editor.backup_dir, editor.within):
        return []
    return caption_files.backup_summaries(editor.backup_dir)


def backup_title(name: str) -> str:
    """A backup as a user reads it: its save's time (``2026-12-05 17:02:44``, ``… (2)`` for a later save within that
    second), or its folder's name where that is no time."""
    made = caption_files.backup_time(name)
    if made is None:
        return name
    later = name[20:]
    return made.strftime("%Y-%m-%d %H:%M:%S") + (f" ({later})" if later else "")


def backup_as_data(summary: BackupSummary) -> dict:
    """``{"name", "time", "captions", "created"}`` (``time`` in the server's local time, ISO 8601), and ``problem``
    when its manifest cannot be read."""
    return {"name": summary.name, "time": summary.time.isoformat() if summary.time else None,
            "captions": summary.captions, "created": summary.created, **({"problem": summary.problem} if summary.problem else {})}


def restore_session_backup(session: TagSession, backup_name: str | None = None) -> dict:
    """Put the backup ``backup_name`` (a folder name under the session's backup folder; None: the newest) back on disk
    (``caption_files.restore_backup``: byte for byte, the captions its save created removed, the current ones kept in
    a new backup first), then read the folder again, so the session shows the restored captions. Refused while the
    session holds unsaved edits: saved or undone first, they cannot mix with the restored captions."""
    with session.lock:
        editor = session.editor
        if editor.backup_dir is None:
            raise UserError(f"{editor.folder} is open without a backup folder, so there is no backup to restore.")
        if unsaved := tag_editor.unsaved_images(editor):
            raise UnsavedEdits(f"{len(unsaved)} caption edit(s) in {editor.folder} are not saved: save or undo them "
                               "first, so that the restored captions do not mix with edits made here.")
        if backup_name is None:
            newest = caption_files.restorable_backups(editor.backup_dir)
            if not newest:
                raise caption_files.BackupNotFound(f"backup: {editor.backup_dir} holds no backup that can be put back "
                                                   "(every save keeps one there)", "backup")
            folder = newest[0]
        else:
            folder = caption_files.backup_named(editor.backup_dir, backup_name)
        result = caption_files.restore_backup(folder, editor.folder, editor.backup_dir, editor.within)
        editor, _ = tag_editor.reload(editor, f"Restore the backup of {backup_title(folder.name)}")
        session.change(lambda _: editor)

    def named(path: Path) -> str:  # a backup of a folder moved to another drive names its captions absolutely
        return path.relative_to(editor.folder).as_posix() if path.is_relative_to(editor.folder) else str(path)

    message = f"Restored {len(result.restored)} caption file(s) from the backup of {backup_title(folder.name)}"
    if result.removed:
        message += f" and removed {len(result.removed)} that its save had created"
    message += (f". The captions they replaced are in a new backup, {backup_title(result.backup_folder.name)}: "
                "restoring it (the newest) undoes this.") + (f" {result.left_out_note}" if result.left_out_note else "")
    return {
        "backup": folder.name,
        "restored": [named(path) for path in result.restored],  # caption files
        "removed": [named(path) for path in result.removed],
        "backup_folder": str(result.backup_folder),
        "undo_backup": result.backup_folder.name,
        "message": message,
    }


def autotag(session: TagSession, tagger, images: list[Path], mode: str = "skip", trigger_word: str | None = None,
            on_progress: Callable[[int, int], None] | None = None, batch_size: int = 8) -> dict:
    """Tag ``images`` with ``tagger`` and merge the tags into the session (not the files) as one undo step; the
    user reviews and saves as with any other edit. ``mode`` as in ``dataset.tagger.merged_caption``."""
    from ..dataset.tagger import load_image_for_tagging, merged_caption

    found: dict[Path, Tags] = {}
    unreadable: dict[str, str] = {}
    for start in range(0, len(images), batch_size):
        batch, pictures = [], []
        for image in images[start:start + batch_size]:
            if mode == "skip" and session.editor.tags.get(image):
                continue  # hand-written captions cost no tagging time
            if session.editor.within is not None and not resolves_below(image, session.editor.within):
                unreadable[image_name(session.editor, image)] = "a link leading outside the allowed folders: not read"
                continue  # made since the folder was read
            try:
                pictures.append(load_image_for_tagging(image))
                batch.append(image)
            except (UserError, OSError, ValueError) as error:  # ImageError (a user error) for what training refuses
                unreadable[image_name(session.editor, image)] = str(error)
        for image, tags in zip(batch, tagger.tag(pictures) if pictures else []):
            found[image] = tuple(tags)
        if on_progress:
            on_progress(min(start + batch_size, len(images)), len(images))

    def merge(editor: TagEditor) -> TagEditor:
        new = {}
        for image, tags in found.items():
            merged = merged_caption(editor.tags.get(image, ()), tags, mode, trigger_word)
            if merged is not None:
                new[image] = merged
        # one undo step for the whole run, each image with its own tags: the core's recorder does exactly that
        return tag_editor.record_step(editor, f"Auto-tag with {tagger.name} ({mode})", new)

    before = session.editor
    editor = session.change(merge)
    changed = [image_name(editor, image) for image in found if editor.tags.get(image) != before.tags.get(image)]
    return {"tagged": len(found), "changed": changed, "unreadable": unreadable}
