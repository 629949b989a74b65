"""The Dataset Tag Editor tab: a thin gradio shell over ``app.tag_sessions`` (the server-side editor the API shares)
and ``tag_view`` (what a page shows). Handlers are plain functions of the services and the browser's ``TabState``
returning every output in ``OUTPUTS`` order (Open, Save, Reload and Restore then the Backups list), so tests call
them directly. The caption box is among them: when the clicked image's caption changed since the box was filled (a
batch edit, Undo, Discard, Reload, Restore), a view fills it anew where it still holds that text, and where the artist
typed in it (before the event or while it ran: ``fill_caption_box`` reads the box once the view is shown) it keeps the
typed text and the status line says what the caption is now.

Only one page of thumbnails (48) goes to the browser; thumbnails are made when a page first shows them and kept
under the data folder, keyed by file, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import gradio as gr

from ...dataset import tag_editor
from ...errors import UserError
from ...safe_io import resolves_below
from .. import tag_sessions
from ..paths import allowed_path
from . import tag_view
from .compat import table
from .train_tab import TITLE as TRAIN_TAB_TITLE

THUMBNAIL_SIZE = 192
OPERATIONS = {  # label → tag_sessions op
    "Add tags": "add", "Remove tags": "remove", "Replace text": "replace", "Rename tag": "rename",
    "Remove duplicates": "dedupe", "Sort tags": "sort", "Move tags to the front": "move_first",
    "Lowercase": "lowercase", "Underscores to spaces": "underscores_to_spaces", "Spaces to underscores": "spaces_to_underscores",
}
OUTPUTS = ("state", "gallery", "page_info", "frequency", "history", "status", "caption")
CAPTION = OUTPUTS.index("caption")
FREQUENCY_COLUMNS = ["tag", "images"]
HISTORY_COLUMNS = ["#", "step", "state", "images"]


@dataclass(frozen=True)
class TabState:
    session: str = ""
    page: int = 1
    selection: tuple[str, ...] = ()  # image names (relative to the folder)
    current: str = ""  # the image in the per-image editor
    # (image, caption) the caption box was last filled with, or whose change was last said: when the image's caption is
    # another since (a batch edit, Undo, Reload, or the API), the next view fills the box anew, or says so where the
    # artist typed in it; setting a box left stale would take that change back
    opened: tuple[str, str] | None = None
    box: str | None = None  # the caption box's text when the event fired (None: not sent)
    tag_query: str = ""
    discard_asked: bool = False  # Open was pressed over unsaved edits once: pressed again, they are dropped


# ---------------------------------------------------------------------------------------------------------------
# Thumbnails.


def thumbnail(image: Path, cache_folder: Path, size: int = THUMBNAIL_SIZE, within: Iterable[Path] | None = None) -> Path:
    """A small JPEG of ``image`` (made once, reused until the image changes); a grey square, the image unread, where
    it resolves outside ``within`` (the allowed folders: a link made since the folder was read)."""
    from PIL import Image

    from ...dataset.images import ImageError, load_image

    outside = within is not None and not resolves_below(image, within)
    if outside:
        identity = f"outside the allowed folders|{size}"
    else:
        stat = image.stat()
        identity = f"{image.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{size}"
    key = hashlib.sha1(identity.encode("utf-8", "surrogateescape")).hexdigest()  # a name that is not UTF-8 too
    target = cache_folder / key[:2] / f"{key}.jpg"
    if not target.exists():
        from ...safe_io import atomic_path

        try:  # as training reads it (upright, on white, 16 bits scaled), a JPEG decoded at a fraction of its size
            if outside:
                raise ValueError("outside the allowed folders: not read")
            small = load_image(image, at_least=(size, size))
            small.thumbnail((size, size))
        except (ImageError, OSError, ValueError):
            small = Image.new("RGB", (size, size), (90, 90, 90))  # unreadable: a grey square keeps the page usable
        with atomic_path(target) as temporary:
            small.save(temporary, format="JPEG", quality=85)
    return target


def thumbnail_folder(services) -> Path:
    return services.settings.data_folder / "thumbnails"


# ---------------------------------------------------------------------------------------------------------------
# The view.


def _session(services, state: TabState):
    if not state.session:
        raise UserError("Open a dataset folder first.")
    return tag_sessions.sessions_of(services).get(state.session)


def _caption_box(editor, state: TabState) -> tuple[TabState, object, str]:
    """The caption box's update and a note for the status line: when the clicked image's caption is not the one the
    box was filled with, that caption, or, where the artist typed in the box, no change and a note saying what the
    caption is now (typed text is never overwritten); the state remembers the caption shown or said."""
    if not state.current or not state.opened or state.opened[0] != state.current:
        return state, gr.update(), ""
    try:
        image = tag_sessions.images_named(editor, [state.current])[0]
    except UserError:  # gone from the folder since (Reload): Set caption says so
        return state, gr.update(), ""
    now = tag_editor.caption_of(editor, image)
    if now == state.opened[1]:
        return state, gr.update(), ""
    typed = state.box is not None and tag_editor.join_tags(tag_editor.split_tags(state.box)) != state.opened[1]
    state = replace(state, opened=(state.current, now))
    if typed:
        return state, gr.update(), _kept_typed_text(state.current, now)
    return replace(state, box=now), now, ""


def _kept_typed_text(name: str, caption: str) -> str:
    return (f'The caption of {name} is now "{caption}"; the caption box keeps the text you typed: Set caption puts it '
            "in place of that, a click on the image shows the caption now (and selects or unselects it).")


def with_caption_box(services, handler):
    """``handler`` as a view event calls it: the caption box's text comes last among the inputs (``TabState.box``), and
    its fill of the box goes out as ``(image, box when sent, caption)`` for ``fill_caption_box`` to apply once the view
    is shown (text typed while the event ran, minutes for an Auto-tag, is not overwritten); None: the box stays."""

    def run(state_now, *args):
        *inputs, box = args
        outputs = list(handler(services, replace(state_now, box=box), *inputs))
        fill = outputs[CAPTION]
        outputs[CAPTION] = (outputs[0].current, box, fill) if isinstance(fill, str) else None
        return tuple(outputs)

    return run


def fill_caption_box(pending, status: str, box: str) -> tuple:
    """After a view: its fill of the caption box where the box still holds the text it had when the event was sent;
    else the box keeps what was typed meanwhile, and the status line says what the caption is now."""
    if pending is None:
        return gr.update(), gr.update()
    name, sent, caption = pending
    if box == sent:
        return caption, gr.update()
    return gr.update(), f"{status or ''} {_kept_typed_text(name, caption)}".strip()


def render(services, state: TabState, status: str = "") -> tuple:
    """Every output for ``state``: gallery items of the current page, page text, frequency rows, history rows, status
    and the caption box (``_caption_box``)."""
    if not state.session:
        return (state, [], "No folder open.", table([], FREQUENCY_COLUMNS), table([], HISTORY_COLUMNS), status,
                gr.update())
    session = _session(services, state)
    editor, tag_filter = session.editor, session.tag_filter
    state, caption_box, note = _caption_box(editor, state)
    status = f"{status} {note}".strip()
    filtered = tag_editor.select(editor, tag_filter)
    page = tag_view.page_of(editor, filtered, state.page)
    state = replace(state, page=page.number)
    unsaved = set(tag_editor.unsaved_images(editor))
    chosen = set(state.selection)
    cache = thumbnail_folder(services)
    items = []
    for offset, image in enumerate(page.images):
        name = tag_sessions.image_name(editor, image)
        label = tag_view.item_label(editor, image, page.first_index + offset, name in chosen, image in unsaved)
        items.append((str(thumbnail(image, cache, within=editor.within)), label))
    frequency = tag_view.frequency_rows(tag_editor.tag_counts(editor, filtered), state.tag_query)
    info = tag_view.page_text(page, len(state.selection), len(unsaved))
    return (state, items, info, table(frequency, FREQUENCY_COLUMNS), table(tag_view.history_rows(editor), HISTORY_COLUMNS),
            tag_view.shown(status), caption_box)


def _guarded(handler):
    """User mistakes become the status line instead of an error popup; the view stays as it was."""

    def run(services, state: TabState, *args):
        try:
            return handler(services, state, *args)
        except UserError as error:
            try:
                return render(services, state, f"⚠ {error}")
            except UserError:
                return render(services, TabState(), f"⚠ {error}")

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def backup_choices(services, state: TabState) -> dict:
    """The Backups list: the open folder's backups, newest first (the one the last save or restore made), picked."""
    labels = []
    if state.session:
        try:
            labels = [tag_view.backup_label(summary) for summary in tag_sessions.backups_of(_session(services, state))]
        except UserError:  # the session is gone (said in the status line): no list
            pass
    return gr.update(choices=labels, value=labels[0] if labels else None)


def _with_backups(handler):
    """A handler that changes the folder's backups (Open, Save, Reload, Restore): its view, then the Backups list as
    ``backup_choices``. Not every handler: the list reads each backup's manifest."""
    guarded = _guarded(handler)

    def run(services, state: TabState, *args):
        view = guarded(services, state, *args)
        return (*view, backup_choices(services, view[0]))

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


@_with_backups
def open_folder(services, state: TabState, folder: str, recursive: bool, caption_extension: str) -> tuple:
    path = allowed_path(folder, services.settings.dataset_roots, "dataset folder")
    registry = tag_sessions.sessions_of(services)
    if state.session:
        editing = _session(services, state)
        unsaved = len(tag_editor.unsaved_images(editing.editor))
        if unsaved and not state.discard_asked:
            return render(services, replace(state, discard_asked=True),
                          f"⚠ {unsaved} caption edit(s) in {editing.folder} are not saved: Save them, "
                          "or press Open again to drop them.")
        registry.close(state.session)
    reading = {"recursive": bool(recursive), "caption_extension": caption_extension or ".txt"}
    if kept := registry.with_unsaved(path, **reading):  # left by a reloaded page
        unsaved = len(tag_editor.unsaved_images(kept.editor))
        return render(services, TabState(session=kept.id), f"Opened {path} with its {unsaved} unsaved caption edit(s) "
                      "from before (the page was reloaded): Save them, or Undo.")
    session = registry.open(path, **reading, within=services.settings.dataset_roots)
    editor = session.editor
    note = f"Opened {path}: {len(editor.images)} images."
    if empty := tag_editor.empty_folder_note(editor):
        note += f" {empty[0].upper()}{empty[1:]} (tick 'Sub-folders too')."
    if editor.unreadable:
        note += f" {len(editor.unreadable)} caption file(s) could not be read and are left alone."
    note += "".join(f" {sentence}" for sentence in tag_editor.folder_notes(editor))
    if session.draft is not None and session.draft.note:  # edits from before a restart
        note += f" {session.draft.note}"
    return render(services, TabState(session=session.id), note)


@_guarded
def set_filter(services, state: TabState, all_of: str, any_of: str, none_of: str, regex: str, untagged: bool) -> tuple:
    tag_sessions.set_filter(_session(services, state), tag_view.filter_from_fields(all_of, any_of, none_of, regex, untagged))
    return render(services, replace(state, page=1))


@_guarded
def go_to_page(services, state: TabState, page) -> tuple:
    return render(services, replace(state, page=int(page or 1)))


@_guarded
def search_tags(services, state: TabState, query: str) -> tuple:
    return render(services, replace(state, tag_query=query or ""))


def _filtered(services, state: TabState) -> tuple[Path, ...]:
    session = _session(services, state)
    return tag_editor.select(session.editor, session.tag_filter)


@_guarded
def select_all_filtered(services, state: TabState) -> tuple:
    editor = _session(services, state).editor
    names = tuple(tag_sessions.image_name(editor, image) for image in _filtered(services, state))
    return render(services, replace(state, selection=names))


@_guarded
def clear_selection(services, state: TabState) -> tuple:
    return render(services, replace(state, selection=()))


@_guarded
def select_range(services, state: TabState, start, end) -> tuple:
    editor = _session(services, state).editor
    chosen = tag_view.index_range(_filtered(services, state), start, end)
    names = tuple(dict.fromkeys(state.selection + tuple(tag_sessions.image_name(editor, i) for i in chosen)))
    return render(services, replace(state, selection=names))


def click_image(services, state: TabState, index: int) -> tuple:
    """A click in the gallery (``index`` on the page) toggles the image's selection and opens it in the caption
    editor; returns the view, its caption box filled with the image's caption, plus the image's name."""
    try:
        editor = _session(services, state).editor
        page = tag_view.page_of(editor, _filtered(services, state), state.page)
        image = page.images[index]
    except (UserError, IndexError) as error:
        return (*render(services, state, f"⚠ {error}" if isinstance(error, UserError) else ""), gr.update())
    name, caption = tag_sessions.image_name(editor, image), tag_editor.caption_of(editor, image)
    state = replace(state, selection=tag_view.toggled(state.selection, name), current=name, opened=(name, caption),
                    box=caption)
    return (*render(services, state)[:-1], caption, name)


@_guarded
def set_caption(services, state: TabState, caption: str) -> tuple:
    session = _session(services, state)
    if not state.current:
        raise UserError("Click an image first; its caption appears here for editing.")
    image = tag_sessions.images_named(session.editor, [state.current])[0]
    now = tag_editor.caption_of(session.editor, image)
    typed = tag_editor.join_tags(tag_editor.split_tags(caption or ""))
    if state.opened and state.opened[0] == state.current and now not in (state.opened[1], typed):
        # changed where this tab did not show it (the API, another browser tab): said, the typed text kept
        state = replace(state, opened=(state.current, now), box=caption or "")
        return render(services, state, f"⚠ The caption of {state.current} changed outside this tab (the API or "
                      f"another browser tab): it is now \"{now}\". Set caption again puts your text in place of "
                      "that; a click on the image shows the caption now (and selects or unselects it).")
    session.change(lambda editor: tag_editor.edit_caption(editor, image, caption or ""))
    state = replace(state, opened=(state.current, tag_editor.caption_of(session.editor, image)), box=caption or "")
    return render(services, state, f"Caption of {state.current} changed (not saved yet).")


def edit_data(operation: str, tags: str, find: str, replacement: str, regex: bool, whole_caption: bool,
              at_front: bool, keep_first, sort_by: str = "alphabetical", descending: bool = False) -> dict:
    """The batch-edit form → ``tag_sessions`` edit data."""
    op = OPERATIONS.get(operation)
    if op is None:
        raise UserError(f"Pick a batch operation ({', '.join(OPERATIONS)}).")
    if op in ("add", "remove", "move_first"):
        if not tag_editor.split_tags(tags or ""):
            raise UserError(f"{operation}: type the tags, separated by commas.")
        data = {"op": op, "tags": tags}
        if op == "add":
            data["position"] = 0 if at_front else None
        return data
    if op == "replace":
        return {"op": op, "find": find or "", "replacement": replacement or "", "regex": bool(regex),
                "whole_caption": bool(whole_caption)}
    if op == "rename":
        if not (find or "").strip():
            raise UserError("Rename tag: type the tag to rename in 'Find' and its new name in 'Replace with'.")
        return {"op": op, "old": find.strip(), "new": replacement or ""}
    if op == "sort":
        return {"op": op, "keep_first": int(keep_first or 0), "by": sort_by or "alphabetical", "descending": bool(descending)}
    return {"op": op}


@_guarded
def batch_edit(services, state: TabState, scope: str, operation: str, tags: str, find: str, replacement: str,
               regex: bool, whole_caption: bool, at_front: bool, keep_first, sort_by: str = "alphabetical",
               descending: bool = False) -> tuple:
    session = _session(services, state)
    data = edit_data(operation, tags, find, replacement, regex, whole_caption, at_front, keep_first, sort_by, descending)
    if scope == "selected":
        if not state.selection:
            raise UserError("No image is selected: click images, use a range, or apply to the filtered images.")
        data["selection"] = list(state.selection)
    before = len(session.editor.undo_steps)
    editor = tag_sessions.apply_request(session, data)
    changed = len(editor.undo_steps[-1].after) if len(editor.undo_steps) > before else 0
    return render(services, state, f"{operation}: {changed} image(s) changed (not saved yet).")


@_guarded
def undo(services, state: TabState) -> tuple:
    _session(services, state).change(tag_editor.undo)
    return render(services, state, "Undone.")


@_guarded
def redo(services, state: TabState) -> tuple:
    _session(services, state).change(tag_editor.redo)
    return render(services, state, "Redone.")


@_with_backups
def save(services, state: TabState, overwrite_changed: bool) -> tuple:
    try:
        result = tag_sessions.save_session(_session(services, state), bool(overwrite_changed))
    except tag_sessions.SaveConflict as conflict:
        return render(services, state, f"⚠ {conflict}")
    backup = f" Backup: {result['backup_folder']} (Restore puts it back)." if result["backup_folder"] else ""
    if empty := result["without_tags"]:
        backup += (f" ⚠ {len(empty)} without tags ({', '.join(empty[:5])}{', …' if len(empty) > 5 else ''}): they train "
                   "with an empty caption; undo and save again if that is not meant.")
    if linked := result["unlinked"]:
        backup += (f" {len(linked)} caption(s) were links to a shared file ({', '.join(linked[:5])}): each is now a file "
                   "of its own; the shared one is unchanged.")
    return render(services, state, f"Saved {len(result['written'])} caption file(s).{backup}")


@_with_backups
def reload(services, state: TabState) -> tuple:
    report = tag_sessions.reload_session(_session(services, state))
    parts = [f"{len(report[key])} {key}" for key in ("updated", "conflicts", "added", "removed") if report[key]]
    note = "Reloaded: " + (", ".join(parts) if parts else "nothing changed on disk") + "."
    if report["conflicts"]:
        note += (" Conflicts keep the edits made here; Save with overwrite replaces the other versions; Discard "
                 "unsaved edits takes the other versions (of the images shown or selected).")
    return render(services, state, note)


@_guarded
def discard_unsaved(services, state: TabState) -> tuple:
    """Throw away the unsaved edits of the selected images (of those the filter shows when none is selected, as batch
    edits do: never of images out of sight), as one undo step: they show their caption files as they are now (another
    program's versions too, without Reload)."""
    selected, session = list(state.selection), _session(services, state)
    shown = len(_filtered(services, state))  # before the discard, which may change what the filter shows
    if not selected and not shown:
        raise UserError("The filter shows no image: clear it, or select images, to discard their unsaved edits.")
    went_back = tag_sessions.revert_session(session, selected or "filtered")
    which = "selected " if selected else "shown " if shown < len(session.editor.tags) else ""
    if not went_back:
        return render(services, state, f"No {which}image has unsaved edits: nothing to discard.")
    return render(services, state, f"Discarded the unsaved edits of {len(went_back)} {which}image(s): they show their "
                                   "caption files as they are now (Undo brings the edits back).")


@_with_backups
def restore(services, state: TabState, chosen: str) -> tuple:
    """Put the backup picked in the Backups list back on disk and show it (a save regretted after Undo is gone)."""
    session = _session(services, state)
    if not chosen:
        raise UserError("Pick a backup in 'Backups' first: every Save keeps the captions it replaced there.")
    names = {tag_view.backup_label(summary): summary.name for summary in tag_sessions.backups_of(session)}
    if chosen not in names:
        raise UserError(f"The backup {chosen!r} is no longer in {session.editor.backup_dir}; pick one from the list again.")
    return render(services, state, tag_sessions.restore_session_backup(session, names[chosen])["message"])


def click_tag(frequency: list[list], row: int, all_of: str) -> str:
    """Clicking a tag in the frequency list adds it to (or removes it from) the 'all of' filter."""
    try:
        tag = str(frequency[row][0])
    except (IndexError, TypeError):
        return all_of
    return tag_view.with_tag(all_of, tag)


# ---------------------------------------------------------------------------------------------------------------
# Folder tools: preprocessing, auto-tagging, health.


def preprocess(services, source: str, out: str, size, crop: str, flip: bool, face_repeats, buckets: bool) -> str:
    from ...dataset.preprocess import PrepSettings, prepare_dataset

    try:
        roots = services.settings.dataset_roots
        source_path = allowed_path(source, roots, "dataset folder")
        out_path = allowed_path(out, roots, "output folder", must_exist=False)
        settings = PrepSettings(size=int(size), crop=crop, flip=bool(flip), buckets=bool(buckets),
                                face_emphasis_repeats=int(face_repeats) if face_repeats else None)
        return prepare_dataset(source_path, out_path, settings, within=roots).summary()
    except UserError as error:
        return f"⚠ {error}"


def autotag(services, state: TabState, scope: str, tagger_kind: str, model_folder: str, general: float,
            character: float, mode: str, trigger: str) -> tuple:
    """Tag the filtered (or selected) images into the editor as one undo step; nothing is written until Save."""
    try:
        session = _session(services, state)
        images = (tag_sessions.images_named(session.editor, state.selection) if scope == "selected"
                  else list(_filtered(services, state)))
        tagger = _tagger(services, tagger_kind, model_folder, general, character)
        result = tag_sessions.autotag(session, tagger, images, mode=mode, trigger_word=(trigger or "").strip() or None)
    except UserError as error:
        return render(services, state, f"⚠ {error}")
    note = f"Auto-tagged {result['tagged']} image(s); {len(result['changed'])} caption(s) changed (not saved yet)."
    if result["unreadable"]:
        note += f" {len(result['unreadable'])} image(s) could not be read."
    return render(services, state, note)


class _HostInterrogator:
    """The WebUI's DeepBooru / CLIP interrogator behind the tagger protocol (``tag(images) → tags``)."""

    def __init__(self, interrogate, kind: str):
        self.interrogate, self.kind, self.name = interrogate, kind, kind

    def tag(self, images):
        return [{tag: 1.0 for tag in tag_editor.split_tags(self.interrogate(image, self.kind))} for image in images]


def _tagger(services, kind: str, model_folder: str, general: float, character: float):
    if kind in ("DeepBooru", "CLIP"):
        interrogate = getattr(services.host, "interrogate", None)
        if interrogate is None:
            raise UserError(f"{kind} needs the WebUI's interrogator; standalone, use a WD14 ONNX model folder.")
        return _HostInterrogator(interrogate, kind.lower())
    from ...dataset.tagger import TagSelection, WD14Tagger, check_tagger_folder

    if not (model_folder or "").strip():
        raise UserError("WD14: give the folder holding model.onnx and selected_tags.csv.")
    check_tagger_folder(Path(model_folder))
    return WD14Tagger(Path(model_folder), TagSelection(general_threshold=float(general), character_threshold=float(character)))


def health_report(services, folder: str, trigger: str) -> str:
    from ...dataset.health import HealthSettings, check_dataset

    try:
        path = allowed_path(folder, services.settings.dataset_roots, "dataset folder")
        return check_dataset(path, HealthSettings(trigger=(trigger or "").strip() or None),
                             services.settings.dataset_roots).to_text()
    except UserError as error:
        return f"⚠ {error}"


# Copies the folder into the Train tab's dataset textbox (found by elem_id only), tells gradio it changed, then
# shows that tab (found by its title: a plain button in gradio 3's tab bar, role="tab" in 4's).
TRAIN_ON_FOLDER_JS = """(folder) => {
  const root = window.gradioApp ? gradioApp() : document;
  const box = root.querySelector('#lora_trainer_dataset textarea, #lora_trainer_dataset input');
  if (box) { box.value = folder; box.dispatchEvent(new Event('input', {bubbles: true})); }
  const tab = Array.from(root.querySelectorAll('.tab-nav button, button[role="tab"]'))
    .find((button) => button.textContent.trim() === TITLE);
  if (tab) tab.click();
  return [folder];
}""".replace("TITLE", json.dumps(TRAIN_TAB_TITLE))


# ---------------------------------------------------------------------------------------------------------------
# The gradio shell.


def build(services):
    from .compat import js_kwarg

    has_interrogator = getattr(services.host, "interrogate", None) is not None
    roots = services.settings.dataset_roots
    with gr.Blocks(analytics_enabled=False) as blocks:
        state = gr.State(TabState())
        with gr.Row():
            folder = gr.Textbox(label="Dataset folder", value=str(roots[0]) if roots else "", scale=4,
                                elem_id="lora_trainer_tags_folder")
            recursive = gr.Checkbox(label="Sub-folders too", value=True, scale=1)
            extension = gr.Textbox(label="Caption extension", value=".txt", scale=1)
            open_button = gr.Button("Open", variant="primary", scale=1, elem_id="lora_trainer_tags_open")
        status = gr.Markdown(elem_id="lora_trainer_tags_status")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    all_of = gr.Textbox(label="All of", elem_id="lora_trainer_tags_all_of")
                    any_of = gr.Textbox(label="Any of")
                    none_of = gr.Textbox(label="None of")
                    regex = gr.Textbox(label="Caption regex")
                    untagged = gr.Checkbox(label="Untagged only")
                    filter_button = gr.Button("Filter", elem_id="lora_trainer_tags_filter")
                page_info = gr.Markdown(elem_id="lora_trainer_tags_page_info")
                # per screen width (phone … 1536 px and up): 8 columns at 1280 px overflowed the half of the page it gets
                gallery = gr.Gallery(label="Images", columns=6, height=520, allow_preview=False,  # style.css: as many as fit
                                     elem_id="lora_trainer_tags_gallery")
                with gr.Row():
                    previous_page = gr.Button("◀ Previous")
                    page_number = gr.Number(label="Page", value=1, precision=0)
                    next_page = gr.Button("Next ▶")
                with gr.Row():
                    select_all = gr.Button("Select all filtered")
                    clear = gr.Button("Clear selection")
                    range_start = gr.Number(label="From image #", precision=0)
                    range_end = gr.Number(label="to #", precision=0)
                    select_range_button = gr.Button("Select range")
                with gr.Row():
                    current_name = gr.Textbox(label="Image", interactive=False, scale=1)
                    caption = gr.Textbox(label="Caption (this image)", lines=2, scale=4)
                    set_caption_button = gr.Button("Set caption", scale=1)
            with gr.Column(scale=2):
                tag_search = gr.Textbox(label="Search tags")
                frequency = gr.Dataframe(headers=FREQUENCY_COLUMNS, datatype=["str", "number"], interactive=False,
                                         label="Tags (click one to filter by it)", elem_id="lora_trainer_tags_frequency")
                with gr.Group():
                    scope = gr.Radio(["filtered", "selected"], value="filtered", label="Apply to")
                    operation = gr.Dropdown(list(OPERATIONS), value="Replace text", label="Batch operation",
                                            elem_id="lora_trainer_tags_operation")
                    tags = gr.Textbox(label="Tags (add / remove / move to front)")
                    with gr.Row():
                        find = gr.Textbox(label="Find (replace) / tag (rename)", elem_id="lora_trainer_tags_find")
                        replacement = gr.Textbox(label="Replace with / new name", elem_id="lora_trainer_tags_replacement")
                    with gr.Row():
                        use_regex = gr.Checkbox(label="Regex")
                        whole_caption = gr.Checkbox(label="Whole caption")
                        at_front = gr.Checkbox(label="Add at the front")
                    with gr.Row():
                        keep_first = gr.Number(label="Sort: keep first N", value=0, precision=0)
                        sort_by = gr.Dropdown(list(tag_editor.SORT_ORDERS), value="alphabetical", label="Sort by",
                                              elem_id="lora_trainer_tags_sort_by")
                        descending = gr.Checkbox(label="Descending (most frequent, longest first)")
                    apply_button = gr.Button("Apply", variant="primary", elem_id="lora_trainer_tags_apply")
                with gr.Row():
                    undo_button = gr.Button("Undo", elem_id="lora_trainer_tags_undo")
                    redo_button = gr.Button("Redo", elem_id="lora_trainer_tags_redo")
                history = gr.Dataframe(headers=HISTORY_COLUMNS, interactive=False, label="History")
                with gr.Row():
                    overwrite = gr.Checkbox(label="Overwrite captions changed on disk")
                    save_button = gr.Button("Save", variant="primary", elem_id="lora_trainer_tags_save")
                    reload_button = gr.Button("Reload from disk")
                    discard_button = gr.Button("Discard unsaved edits", elem_id="lora_trainer_tags_discard")
                with gr.Row():
                    # every save keeps the captions it replaced; a restore after a restart, when Undo is gone
                    backups = gr.Dropdown([], label="Backups (newest first)", allow_custom_value=True, scale=3,
                                          elem_id="lora_trainer_tags_backups")
                    restore_button = gr.Button("Restore", scale=1, elem_id="lora_trainer_tags_restore")
                train_button = gr.Button("Train on this folder", elem_id="lora_trainer_tags_train")
        with gr.Accordion("Auto-tag", open=False):
            with gr.Row():
                kinds = ["WD14 (ONNX folder)"] + (["DeepBooru", "CLIP"] if has_interrogator else [])
                tagger_kind = gr.Dropdown(kinds, value=kinds[0], label="Tagger")
                model_folder = gr.Textbox(label="WD14 model folder (model.onnx + selected_tags.csv)")
                general = gr.Slider(0, 1, value=0.35, step=0.01, label="General threshold")
                character = gr.Slider(0, 1, value=0.85, step=0.01, label="Character threshold")
                mode = gr.Dropdown(["skip", "append", "prepend", "overwrite"], value="skip", label="Existing captions")
                trigger = gr.Textbox(label="Trigger word first")
                autotag_button = gr.Button("Auto-tag")
        with gr.Accordion("Preprocess into a new folder", open=False):
            with gr.Row():
                prep_out = gr.Textbox(label="Output folder")
                prep_size = gr.Number(label="Size", value=512, precision=0)
                prep_crop = gr.Dropdown(["centre", "focal"], value="centre", label="Crop")
                prep_flip = gr.Checkbox(label="Flipped copies")
                prep_faces = gr.Number(label="Face close-ups: repeats (0 = none)", value=0, precision=0)
                prep_buckets = gr.Checkbox(label="Keep aspect ratio (buckets)")
                prep_button = gr.Button("Preprocess")
            prep_result = gr.Textbox(label="Result", lines=4, interactive=False)
        with gr.Accordion("Dataset health", open=False):
            health_trigger = gr.Textbox(label="Trigger word")
            health_button = gr.Button("Check")
            health_text = gr.Textbox(label="Report", lines=12, interactive=False)

        # a view's fill of the caption box waits in `pending` until the view is shown: fill_caption_box then reads the
        # box as it is (typed into meanwhile, or not)
        pending = gr.State(None)
        view = [state, gallery, page_info, frequency, history, status, pending]

        def on(trigger, handler, inputs, outputs=view):
            event = trigger(with_caption_box(services, handler), [*inputs, caption], outputs)
            return event.then(fill_caption_box, [pending, status, caption], [caption, status])

        on(open_button.click, open_folder, [state, folder, recursive, extension], view + [backups])
        filter_inputs = [state, all_of, any_of, none_of, regex, untagged]
        on(filter_button.click, set_filter, filter_inputs)
        on(page_number.submit, go_to_page, [state, page_number])
        on(previous_page.click, lambda services, s: go_to_page(services, s, s.page - 1), [state])
        on(next_page.click, lambda services, s: go_to_page(services, s, s.page + 1), [state])
        on(tag_search.submit, search_tags, [state, tag_search])
        on(select_all.click, select_all_filtered, [state])
        on(clear.click, clear_selection, [state])
        on(select_range_button.click, select_range, [state, range_start, range_end])

        def on_gallery(s, box, evt: gr.SelectData):  # a click fills the box with the image's caption, as asked
            return click_image(services, replace(s, box=box), evt.index)

        gallery.select(on_gallery, [state, caption], [state, gallery, page_info, frequency, history, status, caption,
                                                      current_name])
        on(set_caption_button.click, set_caption, [state, caption])

        def on_tag(table, all_text, evt: gr.SelectData):
            rows = table.values.tolist() if hasattr(table, "values") else table
            return click_tag(rows, evt.index[0], all_text)

        on(frequency.select(on_tag, [frequency, all_of], [all_of]).then, set_filter, filter_inputs)
        edit_inputs = [state, scope, operation, tags, find, replacement, use_regex, whole_caption, at_front, keep_first,
                       sort_by, descending]
        on(apply_button.click, batch_edit, edit_inputs)
        on(undo_button.click, undo, [state])
        on(redo_button.click, redo, [state])
        on(save_button.click, save, [state, overwrite], view + [backups])
        on(reload_button.click, reload, [state], view + [backups])
        on(discard_button.click, discard_unsaved, [state])
        on(restore_button.click, restore, [state, backups], view + [backups])
        train_button.click(None, [folder], [folder], **js_kwarg(TRAIN_ON_FOLDER_JS))
        on(autotag_button.click, autotag, [state, scope, tagger_kind, model_folder, general, character, mode, trigger])
        prep_button.click(lambda *a: preprocess(services, *a),
                          [folder, prep_out, prep_size, prep_crop, prep_flip, prep_faces, prep_buckets], prep_result)
        health_button.click(lambda *a: health_report(services, *a), [folder, health_trigger], health_text)
    return blocks
