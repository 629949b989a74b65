from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_trainer.dataset.tag_editor import (
    AddTags,
    Lowercase,
    MoveToFront,
    RemoveDuplicates,
    RemoveTags,
    RenameTag,
    ReplaceText,
    SortTags,
    SpacesToUnderscores,
    TagFilter,
    UnderscoresToSpaces,
    apply_edit,
    broken_links_shown_note,
    caption_of,
    edit_caption,
    make_edit,
    multiline_note,
    open_folder,
    record_step,
    redo,
    reload,
    revert,
    save,
    select,
    split_tags,
    tag_counts,
    undo,
    unsaved_images,
)
from lora_trainer.errors import UserError


def make_dataset(folder: Path, captions: dict[str, str | None]) -> Path:
    """Images are never decoded by the editor, so a few bytes stand in for each image file."""
    for name, caption in captions.items():
        image = folder / name
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(b"not decoded")
        if caption is not None:
            image.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return folder


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(
        tmp_path / "10_zkstar",
        {
            "a.png": "zkstar, yellow star, blue_background",
            "b.jpg": "yellow star,  zkstar ,simple background, yellow star",
            "c.webp": "red circle",
            "d.png": None,
            "e.PNG": "",
        },
    )


def names(images) -> list[str]:
    return [image.name for image in images]


def test_open_lists_sd_scripts_images_with_stripped_tags_and_ignores_other_files(dataset):
    (dataset / "notes.txt").write_text("not an image caption", encoding="utf-8")
    (dataset / "f.gif").write_bytes(b"gif")
    (dataset / "g.Png").write_bytes(b"mixed case is not an sd-scripts extension")
    editor = open_folder(dataset)
    assert names(editor.images) == ["a.png", "b.jpg", "c.webp", "d.png", "e.PNG"]
    assert editor.tags[dataset / "b.jpg"] == ("yellow star", "zkstar", "simple background", "yellow star")
    assert editor.tags[dataset / "d.png"] == () and editor.tags[dataset / "e.PNG"] == ()


def test_recursive_open_reaches_subfolders_but_not_hidden_backup_folders(tmp_path):
    root = make_dataset(tmp_path / "train", {"10_a/x.png": "x", "5_b/deep/y.png": "y", ".caption-backups/z.png": "z"})
    assert names(open_folder(root).images) == []
    assert names(open_folder(root, recursive=True).images) == ["x.png", "y.png"]


def test_counts_and_filters_select_the_images_a_user_asks_for(dataset):
    editor = open_folder(dataset)
    assert tag_counts(editor)[:2] == [("yellow star", 2), ("zkstar", 2)]
    assert names(select(editor, TagFilter(all_of=("zkstar", "yellow star")))) == ["a.png", "b.jpg"]
    assert names(select(editor, TagFilter(any_of=("red circle", "blue_background")))) == ["a.png", "c.webp"]
    assert names(select(editor, TagFilter(none_of=("zkstar",)))) == ["c.webp", "d.png", "e.PNG"]
    assert names(select(editor, TagFilter(caption_regex=r"^yellow"))) == ["b.jpg"]
    assert names(select(editor, TagFilter(untagged=True))) == ["d.png", "e.PNG"]
    with pytest.raises(UserError, match="not valid"):
        TagFilter(caption_regex="(unclosed")


@pytest.mark.parametrize(
    "edit, before, after",
    [
        (AddTags(("zkstar",), position=0), ("a", "b"), ("zkstar", "a", "b")),
        (AddTags(("x",), position=1), ("a", "b"), ("a", "x", "b")),
        (AddTags(("x",)), ("a", "b"), ("a", "b", "x")),
        (AddTags(("x",), position=-2), ("a", "b"), ("a", "x", "b")),
        (AddTags(("a", "x")), ("a", "b"), ("a", "b", "x")),
        (RemoveTags(("a", "c")), ("a", "b", "c"), ("b",)),
        (ReplaceText("star", "circle"), ("yellow star", "zkstar"), ("yellow circle", "zkcircle")),
        (ReplaceText(r"^(\w+) hair$", r"\1_hair", regex=True), ("red hair", "hairband"), ("red_hair", "hairband")),
        (ReplaceText("solo", ""), ("solo", "star"), ("star",)),
        (ReplaceText(", simple background", "", whole_caption=True), ("star", "simple background"), ("star",)),
        (RenameTag("1girl", "one girl"), ("1girl", "one girl", "x"), ("one girl", "x")),
        # a comma or a line break put into a tag separates tags, as the saved caption will: no fake "b, c" tag
        (ReplaceText("x", "b, c"), ("zk", "x"), ("zk", "b", "c")),
        (ReplaceText(r"\s+", "\n", regex=True), ("zk", "long hair"), ("zk", "long", "hair")),
        (RenameTag("zk", "p, q"), ("zk", "q", "x"), ("p", "q", "x")),
        (RemoveDuplicates(), ("a", "b", "a"), ("a", "b")),
        (SortTags(keep_first=1), ("zkstar", "b", "A", "c"), ("zkstar", "A", "b", "c")),
        (MoveToFront(("zkstar",)), ("a", "zkstar", "b"), ("zkstar", "a", "b")),
        (MoveToFront(("zkstar",)), ("a", "b"), ("a", "b")),
        (Lowercase(), ("Yellow Star",), ("yellow star",)),
        (UnderscoresToSpaces(), ("blue_background", "^_^", "o_o"), ("blue background", "^_^", "o_o")),
        (SpacesToUnderscores(), ("blue background",), ("blue_background",)),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, tuple) else None,
)
def test_each_edit_turns_tags_into_what_its_name_promises(edit, before, after):
    assert edit.apply(before) == after


def test_batch_edit_touches_only_the_selection_and_undo_redo_walk_the_history(dataset):
    editor = open_folder(dataset)
    a, b, c = dataset / "a.png", dataset / "b.jpg", dataset / "c.webp"
    stars = select(editor, TagFilter(all_of=("zkstar",)))
    edited = apply_edit(editor, MoveToFront(("zkstar",)), stars)
    edited = apply_edit(edited, RemoveDuplicates(), stars)
    edited = apply_edit(edited, RenameTag("red circle", "circle"))
    assert edited.tags[b] == ("zkstar", "yellow star", "simple background")
    assert edited.tags[c] == ("circle",)
    assert names(unsaved_images(edited)) == ["b.jpg", "c.webp"]
    assert editor.tags[b][0] == "yellow star"  # the original value is untouched: edits return new states
    back = undo(undo(undo(edited)))
    assert back.tags == editor.tags and not back.can_undo
    forward = redo(redo(back))
    assert forward.tags[b] == ("zkstar", "yellow star", "simple background") and forward.tags[c] == ("red circle",)
    # a new edit after undo drops the redo branch
    branched = apply_edit(undo(edited), AddTags(("new",)), [a])
    assert not branched.can_redo
    assert apply_edit(editor, RemoveTags(("absent",))) is editor  # nothing changed, nothing to undo


def test_per_image_edit_and_revert(dataset):
    editor = open_folder(dataset)
    d = dataset / "d.png"
    edited = edit_caption(editor, d, " zkstar,  star ,, ")
    assert caption_of(edited, d) == "zkstar, star"
    assert revert(edited).tags == editor.tags


def test_save_writes_only_changed_captions_after_backing_them_up(dataset):
    untouched = {name: os.stat(dataset / name).st_mtime_ns for name in ("a.txt", "b.txt")}
    editor = apply_edit(open_folder(dataset), AddTags(("zkstar",), position=0))  # a and b already have it
    saved, result = save(editor)
    assert sorted(path.name for path in result.written) == ["c.txt", "d.txt", "e.txt"]
    assert {name: os.stat(dataset / name).st_mtime_ns for name in untouched} == untouched
    assert (dataset / "c.txt").read_text(encoding="utf-8") == "zkstar, red circle"
    assert (dataset / "d.txt").read_text(encoding="utf-8") == "zkstar"  # a caption file is created where none was
    assert result.backup_folder.parent == dataset / ".caption-backups"
    assert (result.backup_folder / "c.txt").read_text(encoding="utf-8") == "red circle"
    assert not unsaved_images(saved)
    assert save(saved)[1].written == ()
    # the saved state can be edited and saved again without a false "changed on disk"
    save(apply_edit(saved, RemoveTags(("zkstar",)), [dataset / "c.webp"]))
    assert (dataset / "c.txt").read_text(encoding="utf-8") == "red circle"


def test_an_image_without_tags_is_saved_as_an_empty_line_which_trains_and_an_undo_restores(dataset):
    """sd-scripts stops on a 0-byte caption file (read_caption asserts), and so does this trainer; an empty first line
    trains as an empty caption in both. Refusing such saves also refused saving the undo of an edit of a blank caption."""
    from lora_trainer.dataset.caption_files import training_caption

    editor = apply_edit(open_folder(dataset), RemoveTags(("red circle",)), [dataset / "c.webp"])
    editor, result = save(editor)
    assert (dataset / "c.txt").read_bytes() == b"\n" and result.without_tags == (dataset / "c.txt",)
    assert training_caption((dataset / "c.txt").read_text(encoding="utf-8")) == ""
    (dataset / "e.txt").write_text("   \n", encoding="utf-8")  # blank, as a tagger left it
    editor, _ = save(apply_edit(reload(editor)[0], AddTags(("zkstar",)), [dataset / "e.PNG"]))
    editor, result = save(undo(editor))
    assert not unsaved_images(editor) and result.without_tags == (dataset / "e.txt",)
    assert training_caption((dataset / "e.txt").read_text(encoding="utf-8")) == ""


def test_images_sharing_a_stem_share_their_caption_and_are_edited_together(tmp_path):
    folder = make_dataset(tmp_path / "d", {"a.png": "x", "a.jpg": "x"})
    editor = edit_caption(open_folder(folder), folder / "a.png", "y")
    assert editor.tags[folder / "a.jpg"] == ("y",)
    save(editor)
    assert (folder / "a.txt").read_text(encoding="utf-8") == "y"
    # tags given per image (auto-tagging): one caption file holds one text, the first image's
    tagged = record_step(open_folder(folder), "auto-tag", {folder / "a.png": ("y", "w8"), folder / "a.jpg": ("y", "w16")})
    assert tagged.tags[folder / "a.png"] == tagged.tags[folder / "a.jpg"] == ("y", "w8")
    assert not unsaved_images(reload(save(tagged)[0])[0])


def test_a_face_crop_without_its_own_caption_shows_the_source_s_which_training_reads(tmp_path):
    """sd-scripts trains char_100_80_40_48.png on char.txt when it has no caption of its own: the editor shows those
    tags (it showed none, and Add wrote a new caption of the added tag alone); an edit goes to the crop's own file."""
    folder = make_dataset(tmp_path / "d", {"char.png": "zk, red hair\nalt line", "char_100_80_40_48.png": None})
    crop = folder / "char_100_80_40_48.png"
    editor = open_folder(folder)
    assert editor.tags[crop] == ("zk", "red hair") and not unsaved_images(editor)
    save(apply_edit(editor, AddTags(("face",)), [crop]))
    assert (folder / "char_100_80_40_48.txt").read_text(encoding="utf-8") == "zk, red hair, face\nalt line"
    assert (folder / "char.txt").read_text(encoding="utf-8") == "zk, red hair\nalt line"


def test_a_caption_edited_elsewhere_blocks_save_and_reload_reports_it(dataset):
    editor = apply_edit(open_folder(dataset), AddTags(("mine",)), [dataset / "a.png"])
    (dataset / "a.txt").write_text("their version", encoding="utf-8")
    (dataset / "c.txt").write_text("red circle, theirs", encoding="utf-8")
    (dataset / "new.png").write_bytes(b"x")
    (dataset / "e.PNG").unlink()
    with pytest.raises(UserError, match="changed on disk"):
        save(editor)
    assert (dataset / "a.txt").read_text(encoding="utf-8") == "their version"

    reloaded, report = reload(editor)
    assert names(report.conflicts) == ["a.png"]
    assert names(report.updated) == ["c.webp"]
    assert names(report.added) == ["new.png"] and names(report.removed) == ["e.PNG"]
    assert reloaded.tags[dataset / "a.png"][-1] == "mine"  # unsaved work is never dropped
    assert reloaded.tags[dataset / "c.webp"] == ("red circle", "theirs")
    taken = revert(reloaded, [dataset / "a.png"])
    assert taken.tags[dataset / "a.png"] == ("their version",)
    _, result = save(reloaded)  # after the report, saving keeps mine and backs theirs up
    assert (dataset / "a.txt").read_text(encoding="utf-8").endswith("mine")
    assert (result.backup_folder / "a.txt").read_text(encoding="utf-8") == "their version"


def test_a_non_utf8_caption_is_listed_and_left_alone_while_the_rest_opens(dataset):
    (dataset / "c.txt").write_bytes("红色, 圆".encode("gbk"))
    editor = open_folder(dataset)
    assert "re-save it as UTF-8" in editor.unreadable[dataset / "c.webp"]
    saved, result = save(apply_edit(editor, AddTags(("zkstar",))))
    assert (dataset / "c.txt").read_bytes() == "红色, 圆".encode("gbk")


def test_a_multiline_caption_shows_and_edits_the_first_line_training_reads_and_keeps_the_others(dataset):
    """sd-scripts trains on the first line (each line is an alternative with --enable_wildcard): merging the lines into
    one on save would start training the others."""
    (dataset / "c.txt").write_text("red circle\nsecond line tag, not trained\n", encoding="utf-8")
    editor = open_folder(dataset)
    assert names(editor.multiline) == ["c.webp"]
    assert editor.tags[dataset / "c.webp"] == ("red circle",)
    assert "1 caption has lines after the first (c.webp): training reads only the first" in multiline_note(editor)
    saved, _ = save(apply_edit(editor, AddTags(("zkstar",), position=0)))
    assert (dataset / "c.txt").read_text(encoding="utf-8") == "zkstar, red circle\nsecond line tag, not trained\n"
    assert (dataset / "a.txt").read_text(encoding="utf-8") == "zkstar, yellow star, blue_background"
    assert multiline_note(open_folder(dataset / "..")) is None


def test_pictures_that_are_links_to_nothing_are_named_not_silently_missing(dataset, tmp_path):
    """A library on a drive not mounted: check, prep and training name such links; the editor cannot show them."""
    (dataset / "gone.png").symlink_to(tmp_path / "unmounted" / "gone.png")
    (dataset / "sub").mkdir()
    (dataset / "sub" / "deep.jpg").symlink_to(tmp_path / "unmounted" / "deep.jpg")
    editor = open_folder(dataset)
    assert names(editor.broken_links) == ["gone.png"] and "gone.png" not in names(editor.images)
    assert broken_links_shown_note(editor).startswith("not shown: gone.png links to a file that is not there")
    assert names(open_folder(dataset, recursive=True).broken_links) == ["gone.png", "deep.jpg"]
    (dataset / "gone.png").unlink()
    assert broken_links_shown_note(reload(open_folder(dataset))[0]) is None


def test_an_image_extension_is_refused_as_the_caption_extension(dataset):
    """Saving would write text into the images sharing a stem (a.png's caption a.png)."""
    for extension in (".png", "JPG", ".webp"):
        with pytest.raises(UserError, match="is an image extension: give the captions' own"):
            open_folder(dataset, caption_extension=extension)
    with pytest.raises(UserError, match="'../x' is not a file extension"):
        open_folder(dataset, caption_extension="../x")
    assert open_folder(dataset, caption_extension="caption").caption_extension == ".caption"


def test_split_tags_treats_commas_and_line_breaks_alike():
    assert split_tags(" a, b ,,c\nd \n") == ("a", "b", "c", "d")


def test_edits_can_be_named_as_data_for_the_api_and_cli(dataset):
    editor = open_folder(dataset)
    edit = make_edit("add", tags=["zkstar"], position=0)
    assert apply_edit(editor, edit).tags[dataset / "c.webp"] == ("zkstar", "red circle")
    with pytest.raises(UserError, match="Did you mean 'rename'"):
        make_edit("renam", old="a", new="b")
    with pytest.raises(UserError, match="'sort'"):
        make_edit("sort", by_frequency=True)


def test_sort_by_frequency_or_length_as_the_tag_editor_extension_sorts(tmp_path):
    """Most frequent tags first is the order people clean booru captions in; it sorted alphabetically only."""
    folder = make_dataset(tmp_path / "5_zkchar", {"a.png": "zkchar, solo, red dress, smile",
                                                  "b.png": "zkchar, smile, solo, long hair", "c.png": "zkchar, solo"})
    editor = open_folder(folder)
    by_count = apply_edit(editor, make_edit("sort", by="frequency", descending=True, keep_first=1))
    assert by_count.tags[folder / "a.png"] == ("zkchar", "solo", "smile", "red dress")  # 3, 2, 1 of 3 images
    assert by_count.tags[folder / "b.png"] == ("zkchar", "solo", "smile", "long hair")
    rarest = apply_edit(editor, make_edit("sort", by="frequency"))
    assert rarest.tags[folder / "a.png"] == ("red dress", "smile", "solo", "zkchar")  # ties alphabetically
    longest = apply_edit(editor, make_edit("sort", by="length", descending=True))
    assert longest.tags[folder / "b.png"] == ("long hair", "zkchar", "smile", "solo")
    assert apply_edit(editor, make_edit("sort", descending=True)).tags[folder / "c.png"] == ("zkchar", "solo")
    assert by_count.undo_steps[-1].description == "Sort tags by frequency, descending after the first 1"
    with pytest.raises(UserError, match="by must be one of alphabetical, frequency, length"):
        make_edit("sort", by="count")
    with pytest.raises(UserError, match="has no parameter '_counts'"):
        make_edit("sort", _counts={"a": 1})


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_a_link_back_to_a_parent_folder_is_read_once_not_for_ever(tmp_path):
    """A recursive open raised a raw OSError (too many levels of links) after 40 levels, with a path thousands of
    characters long: the API answered 500."""
    folder = make_dataset(tmp_path / "d", {"a.png": "x", "sub/b.png": "y"})
    os.symlink(folder, folder / "sub" / "back to top")
    os.symlink(folder / "sub", folder / "sub again")  # the same folder twice: its images once
    assert names(open_folder(folder, recursive=True).images) == ["a.png", "b.png"]


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_a_linked_caption_becomes_the_images_own_file_and_the_shared_one_stays(tmp_path):
    """Saving replaced the link with a file and said nothing; the shared caption kept its text."""
    folder = make_dataset(tmp_path / "d", {"a.png": None})
    (tmp_path / "shared.txt").write_text("zkchar, shared", encoding="utf-8")
    os.symlink(tmp_path / "shared.txt", folder / "a.txt")
    editor, result = save(apply_edit(open_folder(folder), AddTags(("solo",))))
    assert result.unlinked == (folder / "a.txt",) and not (folder / "a.txt").is_symlink()
    assert (folder / "a.txt").read_text(encoding="utf-8") == "zkchar, shared, solo"
    assert (tmp_path / "shared.txt").read_text(encoding="utf-8") == "zkchar, shared"


def test_a_draft_of_unsaved_edits_round_trips_as_data_and_lays_them_over_the_folder_read_again(tmp_path):
    """The draft a restart brings back: only unsaved images, their caption as a save writes it (lines after the first
    kept), shared captions (a.png, a.jpg) edited together, a face crop's edit that will go to its own file."""
    from datetime import datetime, timezone

    from lora_trainer.dataset import tag_drafts

    folder = make_dataset(tmp_path / "数据 集", {"a.png": "x", "a.jpg": "x", "m.png": "one\nalt line", "z.png": "z",
                                                  "char.png": "zk", "char_100_80_40_48.png": None})
    crop = folder / "char_100_80_40_48.png"
    editor = edit_caption(edit_caption(open_folder(folder), folder / "a.png", "y"), folder / "m.png", "one, two")
    editor = apply_edit(editor, AddTags(("face",)), [crop])
    at = datetime(2026, 12, 3, 14, 5, tzinfo=timezone.utc)
    draft = tag_drafts.draft_of(editor, at)
    assert [(edit.name, edit.caption) for edit in draft.edits] == [
        ("a.jpg", "y"), ("a.png", "y"), ("char_100_80_40_48.png", "zk, face"), ("m.png", "one, two\nalt line")]
    assert tag_drafts.draft_from_data(tag_drafts.draft_as_data(draft)) == draft
    assert tag_drafts.draft_of(open_folder(folder), at) is None  # nothing unsaved, no draft

    restored, outcome = tag_drafts.restore(open_folder(folder), draft)
    assert {image: restored.tags[image] for image in unsaved_images(restored)} == \
        {image: editor.tags[image] for image in unsaved_images(editor)}
    assert len(outcome.restored) == 4 and not outcome.left_out
    assert [step.description for step in restored.undo_steps] == [
        f"Restore unsaved edits from {tag_drafts.shown_time(at)} (before the restart)"]
    save(restored)
    assert (folder / "m.txt").read_text(encoding="utf-8") == "one, two\nalt line"
    assert (folder / "char_100_80_40_48.txt").read_text(encoding="utf-8") == "zk, face"
    with pytest.raises(ValueError, match="draft format 2, which this version does not read"):
        tag_drafts.draft_from_data({**tag_drafts.draft_as_data(draft), "tag_editor_draft": 2})
