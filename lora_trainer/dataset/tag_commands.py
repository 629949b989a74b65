"""``python -m lora_trainer dataset tags``: the Dataset Tag Editor's batch edits from a terminal or a script.

The same core as the tab and the API (``tag_editor``): the images a filter picks when the folder is read get the
edits in the order they are given, and only the captions that changed are written, all or nothing, with their
previous versions kept in the folder's backup folder, which ``--restore`` puts back (itself undoable: the versions
it replaces get a backup of their own). ``--dry-run`` shows what would change; with no edit the command lists the
tags by frequency.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .caption_files import RestoreResult, backup_named, restorable_backups, restore_backup
from .tag_editor import (DEFAULT_BACKUP_FOLDER, SORT_ORDERS, TagEditor, TagFilter, apply_edit, as_sentence, caption_of,
                         captions_elsewhere, empty_folder_note, folder_notes, make_edit, open_folder, save, select,
                         split_tags, tag_counts, unsaved_images)

EXAMPLES = 3  # changed captions shown per edit
LATEST = "latest"


class _Edit(argparse.Action):
    """Collects the edits into ``edits`` in command-line order: ``--remove a --add a`` differs from the reverse."""

    def __init__(self, option_strings, dest, kind: str, build, **kwargs):
        super().__init__(option_strings, "edits", **kwargs)
        self.kind, self.build = kind, build

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            edit = (self.kind, self.build(values))
        except argparse.ArgumentTypeError as error:  # an action's own errors are not argparse's to catch
            parser.error(f"argument {option_string}: {error}")
        namespace.edits = [*(getattr(namespace, "edits", None) or []), edit]


def _at_least(low: int):
    def number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"give a whole number from {low} up, not {text!r}")
        return value
    return number


def _tags(text: str) -> tuple[str, ...]:
    tags = split_tags(text)
    if not tags:
        raise argparse.ArgumentTypeError("give one or more tags, separated by commas")
    return tags


def add_tags_command(commands) -> None:
    tags = commands.add_parser(
        "tags", help="batch-edit the captions of an image folder (add, remove, replace, rename, sort …; backed up)",
        description="Edits run in the order given, on the images the filter picks; the captions that change are "
                    "written together, their previous versions kept under FOLDER/.caption-backups. Without an edit: "
                    "the tags by frequency.")
    tags.add_argument("folder", type=Path, help="a folder of images with their caption files")
    tags.add_argument("--recursive", action="store_true", help="also the images in sub-folders (a 10_name layout's root)")
    tags.add_argument("--caption-extension", default=".txt")
    edit = tags.add_argument_group("edits (in the order given)")
    edit.add_argument("--add", metavar="TAGS", action=_Edit, kind="add", build=lambda v: {"tags": _tags(v)},
                      help="add tags at the end where missing")
    edit.add_argument("--add-front", metavar="TAGS", action=_Edit, kind="add",
                      build=lambda v: {"tags": _tags(v), "position": 0}, help="add tags at the front (a trigger word)")
    edit.add_argument("--remove", metavar="TAGS", action=_Edit, kind="remove", build=lambda v: {"tags": _tags(v)})
    edit.add_argument("--replace", nargs=2, metavar=("FIND", "REPLACEMENT"), action=_Edit, kind="replace",
                      build=lambda v: {"find": v[0], "replacement": v[1]}, help="replace text inside tags")
    edit.add_argument("--replace-regex", nargs=2, metavar=("PATTERN", "REPLACEMENT"), action=_Edit, kind="replace",
                      build=lambda v: {"find": v[0], "replacement": v[1], "regex": True},
                      help="the same with a regular expression (\\1 for its groups)")
    edit.add_argument("--rename", nargs=2, metavar=("OLD", "NEW"), action=_Edit, kind="rename",
                      build=lambda v: {"old": v[0], "new": v[1]}, help="rename one tag exactly")
    edit.add_argument("--move-first", metavar="TAGS", action=_Edit, kind="move_to_front", build=lambda v: {"tags": _tags(v)},
                      help="move these tags to the front where present, in this order")
    edit.add_argument("--sort", nargs="?", const="alphabetical", choices=SORT_ORDERS, action=_Edit, kind="sort",
                      build=lambda v: {"by": v}, help="sort tags (default alphabetical), after --keep-first of them")
    for flag, kind, text in (("--dedupe", "remove_duplicates", "remove repeated tags"),
                             ("--lowercase", "lowercase", "lowercase every tag"),
                             ("--underscores-to-spaces", "underscores_to_spaces", "long_hair → long hair (not ^_^)"),
                             ("--spaces-to-underscores", "spaces_to_underscores", "long hair → long_hair")):
        edit.add_argument(flag, nargs=0, action=_Edit, kind=kind, build=lambda v: {}, help=text)
    tags.add_argument("--keep-first", type=_at_least(0), default=0, metavar="N",
                      help="--sort leaves the first N tags in place (as --keep_tokens keeps them in training)")
    chosen = tags.add_argument_group("which images (default: all)")
    chosen.add_argument("--with", dest="with_tags", metavar="TAGS", type=_tags, default=(),
                        help="only images that have all these tags")
    chosen.add_argument("--without", metavar="TAGS", type=_tags, default=(), help="only images that have none of these")
    chosen.add_argument("--matching", metavar="REGEX", help="only images whose caption matches")
    chosen.add_argument("--untagged", action="store_true", help="only images without tags")
    tags.add_argument("--dry-run", action="store_true", help="say what would change; write nothing")
    tags.add_argument("--restore", nargs="?", const=LATEST, metavar="BACKUP",
                      help="put back the captions of a backup folder (default: the newest under FOLDER/.caption-backups; "
                           "the one the last save or restore made), keeping the current ones in a new backup first")
    tags.add_argument("--top", type=_at_least(1), default=30, metavar="N", help="without an edit: list this many tags (default 30)")
    tags.set_defaults(run=run_tags, edits=[])


def run_tags(args) -> None:
    if args.restore is not None:
        if not args.restore.strip():
            raise UserError("--restore: give a backup's name or folder, or nothing for the newest", "restore")
        given = [option for option, value in (("edits", args.edits), ("--dry-run", args.dry_run), ("--with", args.with_tags),
                                              ("--without", args.without), ("--matching", args.matching),
                                              ("--untagged", args.untagged), ("--keep-first", args.keep_first),
                                              ("--recursive", args.recursive)) if value]
        if given:
            raise UserError(f"--restore puts a whole backup back as it is, so it takes no {given[0]}: run that in a "
                            "command of its own", "restore")
        print(restore_report(restore_backup(_backup(args.folder, args.restore), args.folder,
                                            args.folder / DEFAULT_BACKUP_FOLDER)))
        return
    if args.keep_first and not any(kind == "sort" for kind, _ in args.edits):
        raise UserError("--keep-first is how many tags --sort leaves in place: add --sort", "keep_first")
    editor = open_folder(args.folder, recursive=args.recursive, caption_extension=args.caption_extension)
    if empty := empty_folder_note(editor):  # a Kohya root (train/10_zkchar/): the images are a level down
        raise UserError(f"{as_sentence(empty)} Add --recursive to edit them all, or name one of those folders.")
    for note in folder_notes(editor):
        print(f"note: {note}")
    for reason in editor.unreadable.values():  # the tab counts them; here each is named with its fix
        print(f"note: left alone: {reason}")
    tag_filter = TagFilter(all_of=args.with_tags, none_of=args.without, caption_regex=args.matching or None,
                           untagged=args.untagged)
    images = select(editor, tag_filter)
    if not args.edits:
        print(tag_list(editor, images, args.top))
        return
    edited = editor
    for kind, parameters in args.edits:
        if kind == "sort":
            parameters = {**parameters, "keep_first": args.keep_first}
        before, change = edited, make_edit(kind, **parameters)
        edited = apply_edit(edited, change, images)
        print(edit_report(change.describe(), before, edited))
    changed = unsaved_images(edited)
    if elsewhere := captions_elsewhere(editor, changed):  # they would get a second caption file, of this extension
        other, count = elsewhere
        raise UserError(f"{count} of the images these edits change have no {editor.caption_extension} caption but a "
                        f"{other} one beside them: nothing was changed; add --caption-extension {other}, or leave them "
                        "out with --with/--without", "caption_extension")
    print(f"{len(changed)} of {len(editor.images)} captions change ({len(images)} picked by the filter)")
    if args.dry_run or not changed:
        if changed:
            print("dry run: nothing written")
        return
    _, result = save(edited)
    backup = f"; its backup is {result.backup_folder} (--restore puts it back)" if result.backup_folder else ""
    print(f"wrote {len(result.written)} caption file(s){backup}")
    if result.without_tags:
        print(f"{len(result.without_tags)} image(s) now have no tags: their captions are an empty line (an empty "
              "caption in training)")


def _backup(folder: Path, chosen: str) -> Path:
    """The backup folder ``--restore`` names (a path, or a name under the folder's backups as the tab lists them), or
    the newest of ``folder``'s (their names are their times)."""
    backups = folder / DEFAULT_BACKUP_FOLDER
    if chosen != LATEST:
        named = Path(chosen)
        if len(named.parts) == 1 and not named.exists():
            return backup_named(backups, chosen)
        if not named.is_dir():
            raise UserError(f"--restore {chosen}: no such folder; give a backup under {backups}, by its name or path",
                            "restore")
        return named
    found = restorable_backups(backups)
    if not found:
        raise UserError(f"{backups} holds no backup that --restore can put back; "
                        "name one: --restore FOLDER", "restore")
    return found[0]


def restore_report(result: RestoreResult) -> str:
    lines = [f"restored {len(result.restored)} caption file(s)"
             + (f" and removed {len(result.removed)} that the save had created" if result.removed else "")]
    if result.backup_folder:
        lines.append(f"the captions they replaced are in {result.backup_folder} (--restore again undoes this)")
    if result.left_out_note:
        lines.append(result.left_out_note)
    return "\n".join(lines)


def edit_report(description: str, before: TagEditor, after: TagEditor) -> str:
    """One edit's line: what it did and to how many captions, with a few of them before → after."""
    if after is before:  # record_step returns the editor itself when nothing changed
        return f"{description}: no caption changes"
    step = after.undo_steps[-1]
    lines = [f"{description}: {len(step.after)} caption(s)"]
    for image in list(step.after)[:EXAMPLES]:
        lines.append(f"  {image.relative_to(after.folder).as_posix()}: {caption_of(before, image)!r} → "
                     f"{caption_of(after, image)!r}")
    return "\n".join(lines)


def tag_list(editor: TagEditor, images, top: int) -> str:
    counts = tag_counts(editor, images)
    lines = [f"{len(counts)} tags in {len(images)} image(s):"]
    lines += [f"{count:6d}  {tag}" for tag, count in counts[:top]]
    if len(counts) > top:
        lines.append(f"… {len(counts) - top} more (--top {len(counts)} lists them all)")
    return "\n".join(lines)
