from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from lora_trainer.app import tag_sessions
from lora_trainer.app.tag_sessions import SaveConflict, SessionNotFound, TagSessions
from lora_trainer.errors import UserError


@pytest.fixture
def folder(make_dataset):
    return make_dataset(count=6) / "10_zkchar"


def test_page_lists_filtered_images_with_frequencies_and_paging(folder):
    session = TagSessions().open(folder)
    tag_sessions.set_filter(session, tag_sessions.filter_from({"all": ["red"]}))
    first = tag_sessions.page_of(session, page=1, page_size=2)
    assert first["filtered"] == 3 and first["total"] == 6 and first["pages"] == 2
    assert [image["name"] for image in first["images"]] == ["img_000.png", "img_002.png"]
    assert first["images"][0]["tags"] == ["zkchar", "red", "square"]
    assert ["zkchar", 6] in first["tag_frequency"] and ["red", 3] in first["filtered_tag_frequency"]
    assert ["blue", 3] not in first["filtered_tag_frequency"]
    assert [image["name"] for image in tag_sessions.page_of(session, 2, 2)["images"]] == ["img_004.png"]
    past = tag_sessions.page_of(session, 9, 2)  # past the end (a filter shortened the list): the last page, said
    assert past["page"] == 2 and [image["name"] for image in past["images"]] == ["img_004.png"]


def test_a_page_carries_the_most_frequent_tags_up_to_its_limit_and_how_many_there_are(make_dataset):
    """Every page carried both full frequency lists: 3,000 tags made each page, edit and undo 148 KiB."""
    many = ", ".join(f"tag{index:03d}" for index in range(350))
    folder = make_dataset(count=3, tags=[f"zkchar, {many}", "zkchar, red", "zkchar, red"]) / "10_zkchar"
    session = TagSessions().open(folder)
    tag_sessions.set_filter(session, tag_sessions.filter_from({"all": ["red"]}))
    page = tag_sessions.page_of(session)
    assert len(page["tag_frequency"]) == 300 and page["tag_frequency_total"] == 352 and page["tag_limit"] == 300
    assert page["tag_frequency"][:2] == [["zkchar", 3], ["red", 2]]  # the most frequent first
    assert page["filtered_tag_frequency"] == [["red", 2], ["zkchar", 2]] and page["filtered_tag_frequency_total"] == 2
    everything = tag_sessions.page_of(session, tag_limit=1000)
    assert len(everything["tag_frequency"]) == 352 and ["tag349", 1] in everything["tag_frequency"]
    assert tag_sessions.page_of(session, tag_limit=0)["tag_frequency"] == []
    with pytest.raises(UserError, match="tag_limit must be 0 or more"):
        tag_sessions.page_of(session, tag_limit=-1)


def test_filter_keys_none_regex_untagged(make_dataset):
    folder = make_dataset(count=3, tags=["a, b", "b, c", ""]) / "10_zkchar"
    session = TagSessions().open(folder)
    names = lambda data: [tag_sessions.image_name(session.editor, image)
                          for image in tag_sessions.selected_images(session, "filtered", tag_sessions.filter_from(data))]
    assert names({"none": ["a"]}) == ["img_001.png", "img_002.png"]
    assert names({"any": "a, c"}) == ["img_000.png", "img_001.png"]
    assert names({"regex": "^b"}) == ["img_001.png"]
    assert names({"untagged": True}) == ["img_002.png"]
    with pytest.raises(UserError, match="unknown key"):
        tag_sessions.filter_from({"tags": ["a"]})


def test_api_edit_names_map_to_core_edits_and_undo_redo(folder):
    session = TagSessions().open(folder)
    tag_sessions.apply_request(session, {"op": "move_first", "tags": ["square"], "selection": ["img_000.png"]})
    assert session.editor.tags[folder / "img_000.png"] == ("square", "zkchar", "red")
    tag_sessions.apply_request(session, {"op": "replace", "find": "zkchar", "replacement": "zkhero", "selection": "all"})
    assert all("zkhero" in tags and "zkchar" not in tags for tags in session.editor.tags.values())
    assert tag_sessions.history(session.editor)["undo"][-1].startswith("Replace text 'zkchar'")
    session.change(tag_sessions.tag_editor.undo)
    assert session.editor.tags[folder / "img_001.png"] == ("zkchar", "blue", "circle")
    assert len(tag_sessions.history(session.editor)["redo"]) == 1
    with pytest.raises(UserError, match="not a tag edit"):
        tag_sessions.apply_request(session, {"op": "explode"})
    with pytest.raises(UserError, match="not an image"):
        tag_sessions.apply_request(session, {"op": "dedupe", "selection": ["../secret.png"]})


def test_a_tag_holding_a_comma_is_two_tags_and_an_unreadable_caption_is_named_not_skipped(folder):
    """A caption file separates tags by commas: "zkchar, solo" saved as one tag would read back as two (and the image
    would stay unsaved for ever). An edit of an image whose caption could not be read says so."""
    (folder / "img_005.txt").write_bytes("红色".encode("gbk"))
    (folder / "._img_000.png").write_bytes(b"macOS resource fork")  # hidden: neither listed nor given a caption
    session = TagSessions().open(folder)
    assert "._img_000.png" not in [image.name for image in session.editor.images]
    tag_sessions.apply_request(session, {"op": "add", "tags": ["solo, smile"], "selection": ["img_000.png"]})
    assert session.editor.tags[folder / "img_000.png"][-2:] == ("solo", "smile")
    tag_sessions.save_session(session)
    assert tag_sessions.TagSessions().open(folder).editor.tags[folder / "img_000.png"][-2:] == ("solo", "smile")
    with pytest.raises(UserError, match="the caption of img_005.png cannot be edited: Caption file .*img_005.txt is not UTF-8"):
        tag_sessions.apply_request(session, {"op": "add", "tags": ["solo"], "selection": ["img_005.png"]})
    assert tag_sessions.images_named(session.editor, ["img_005.png"], "name") == [folder / "img_005.png"]  # shown still


def test_edit_on_filtered_selection_uses_the_sessions_filter(folder):
    session = TagSessions().open(folder)
    tag_sessions.set_filter(session, tag_sessions.filter_from({"all": ["blue"]}))
    tag_sessions.apply_request(session, {"op": "add", "tags": "sad", "selection": "filtered"})
    with_sad = [image.name for image, tags in session.editor.tags.items() if "sad" in tags]
    assert with_sad == ["img_001.png", "img_003.png", "img_005.png"]


def test_save_writes_changed_captions_and_reports_conflicts(folder):
    session = TagSessions().open(folder)
    tag_sessions.apply_request(session, {"op": "remove", "tags": ["square"], "selection": "all"})
    (folder / "img_002.txt").write_text("someone, else", encoding="utf-8")
    with pytest.raises(SaveConflict) as conflict:
        tag_sessions.save_session(session)
    assert conflict.value.conflicts == ["img_002.png"]
    assert (folder / "img_000.txt").read_text(encoding="utf-8") == "zkchar, red, square"  # nothing written
    report = tag_sessions.save_session(session, overwrite_changed=True)
    assert report["conflicts_overwritten"] == ["img_002.png"]
    assert sorted(report["written"]) == ["img_000.txt", "img_002.txt", "img_004.txt"]
    assert (folder / "img_002.txt").read_text(encoding="utf-8") == "zkchar, red"
    assert report["backup_folder"] is not None
    assert tag_sessions.page_of(session)["unsaved"] == 0


def test_registry_is_lru_limited_and_says_when_a_session_is_gone(folder):
    registry = TagSessions(limit=2)
    first, second = registry.open(folder), registry.open(folder)
    registry.get(first.id)  # used: the second is now the oldest
    third = registry.open(folder)
    assert set(registry.ids()) == {first.id, third.id}
    with pytest.raises(SessionNotFound, match="open the folder again"):
        registry.get(second.id)
    registry.close(first.id)
    with pytest.raises(SessionNotFound):
        registry.get(first.id)


def test_a_session_with_unsaved_edits_is_never_dropped_for_newer_ones(folder):
    """The tab and API clients share the registry: opening folders elsewhere must not throw away someone's edits."""
    registry = TagSessions(limit=2)
    editing = registry.open(folder)
    tag_sessions.apply_request(editing, {"op": "add", "tags": ["solo"], "selection": "all"})
    opened = [registry.open(folder) for _ in range(5)]
    assert registry.get(editing.id) is editing and len(registry.ids()) == 2
    assert opened[-1].id in registry.ids()
    tag_sessions.save_session(editing)  # saved: a clean session again, dropped like any other once the oldest
    registry.open(folder), registry.open(folder)
    with pytest.raises(SessionNotFound):
        registry.get(editing.id)


def test_opening_more_folders_is_refused_while_too_many_sessions_hold_unsaved_edits(folder):
    """Never dropped, they would otherwise fill the server's memory: the client is asked to save or close one."""
    from lora_trainer.app.tag_sessions import TooManySessions

    registry = TagSessions(limit=1)
    for _ in range(4):
        tag_sessions.apply_request(registry.open(folder), {"op": "add", "tags": ["solo"], "selection": "all"})
    with pytest.raises(TooManySessions, match="4 tag-editor sessions hold unsaved edits; save or close one"):
        registry.open(folder)
    registry.close(registry.ids()[0])
    assert registry.open(folder)


def test_services_share_one_registry(services):
    assert tag_sessions.sessions_of(services) is tag_sessions.sessions_of(services)


def test_concurrent_edits_are_all_kept(folder):
    session = TagSessions().open(folder)
    threads = [threading.Thread(target=tag_sessions.apply_request, args=(session, {"op": "add", "tags": [f"t{i}"], "selection": "all"}))
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all({f"t{i}" for i in range(8)} <= set(tags) for tags in session.editor.tags.values())
    assert len(session.editor.undo_steps) == 8


class _ColourTagger:
    name = "colours"

    def tag(self, images):
        return [{"bright": 0.9} if sum(image.getpixel((0, 0))) > 300 else {"dark": 0.8} for image in images]


def test_autotag_merges_into_the_session_as_one_undo_step(make_dataset):
    folder = make_dataset(count=3, tags=["keep, this", None, ""]) / "10_zkchar"
    session = TagSessions().open(folder)
    report = tag_sessions.autotag(session, _ColourTagger(), list(session.editor.images), mode="skip", trigger_word="zk")
    assert report["tagged"] == 2 and report["changed"] == ["img_001.png", "img_002.png"]
    assert session.editor.tags[folder / "img_000.png"] == ("keep", "this")
    assert session.editor.tags[folder / "img_001.png"][0] == "zk"
    assert not (folder / "img_001.txt").exists()  # the files change on save only
    session.change(tag_sessions.tag_editor.undo)
    assert session.editor.tags[folder / "img_001.png"] == ()


def test_autotag_does_not_read_a_picture_that_became_a_link_leading_outside_the_allowed_folders(make_dataset, tmp_path):
    from PIL import Image

    folder = make_dataset(count=2, tags=[None, None]) / "10_zkchar"
    session = TagSessions().open(folder, within=[folder.parent])
    Image.new("RGB", (16, 16), (255, 255, 255)).save(tmp_path / "elsewhere.png")
    (folder / "img_001.png").unlink()
    (folder / "img_001.png").symlink_to(tmp_path / "elsewhere.png")
    report = tag_sessions.autotag(session, _ColourTagger(), list(session.editor.images))
    assert report["tagged"] == 1 and list(report["unreadable"]) == ["img_001.png"]
    assert "leading outside the allowed folders" in report["unreadable"]["img_001.png"]


# ---------------------------------------------------------------------------------------------------------------
# Drafts: unsaved edits outlive a restart.


def restarted(drafts_folder, registry: TagSessions | None = None) -> TagSessions:
    """The process ends (its last draft written, as its exit does) and a new one starts with the same data folder."""
    if registry is not None:
        registry.drafts.flush()
    return TagSessions(drafts_folder=drafts_folder)


def test_unsaved_edits_come_back_after_a_restart_as_one_undoable_step(make_dataset, tmp_path):
    """An hour of tagging was lost without a word when the WebUI or the app restarted (a crash, an update)."""
    folder = make_dataset("数据 集", "10_数据 集", count=4) / "10_数据 集"
    drafts = tmp_path / "data" / "tag-drafts"
    registry = TagSessions(drafts_folder=drafts)
    session = registry.open(folder)
    tag_sessions.apply_request(session, {"op": "add", "tags": ["solo"], "selection": ["img_000.png", "img_001.png"]})
    tag_sessions.apply_request(session, {"op": "replace", "find": "red", "replacement": "crimson", "selection": ["img_000.png"]})

    reopened = restarted(drafts, registry).open(folder)
    tags = reopened.editor.tags
    assert tags[folder / "img_000.png"] == ("zkchar", "crimson", "square", "solo")
    assert tags[folder / "img_001.png"] == ("zkchar", "blue", "circle", "solo")
    assert tag_sessions.page_of(reopened)["unsaved"] == 2
    assert reopened.draft.restored.restored == (folder / "img_000.png", folder / "img_001.png")
    assert reopened.draft.note.startswith("Restored 2 unsaved caption edit(s) from ")
    assert "(before the restart)" in reopened.draft.note
    assert (folder / "img_000.txt").read_text(encoding="utf-8") == "zkchar, red, square"  # the files change on save only
    reopened.change(tag_sessions.tag_editor.undo)  # one step back: the captions on disk
    assert tag_sessions.page_of(reopened)["unsaved"] == 0 and not reopened.editor.undo_steps


def test_a_caption_changed_on_disk_since_the_draft_is_not_overwritten_but_named_and_its_text_kept(folder, tmp_path):
    drafts = tmp_path / "tag-drafts"
    registry = TagSessions(drafts_folder=drafts)
    session = registry.open(folder)
    tag_sessions.apply_request(session, {"op": "add", "tags": ["solo"],
                                         "selection": ["img_000.png", "img_001.png", "img_002.png"]})
    registry = restarted(drafts, registry)
    (folder / "img_001.txt").write_text("edited, elsewhere", encoding="utf-8")
    (folder / "img_002.png").unlink()

    reopened = registry.open(folder)
    assert reopened.editor.tags[folder / "img_000.png"][-1] == "solo"
    assert reopened.editor.tags[folder / "img_001.png"] == ("edited", "elsewhere")
    note = reopened.draft.note
    assert "Restored 1 unsaved caption edit(s)" in note
    assert "1 draft edit(s) not restored: their captions changed on disk since: img_001.png." in note
    assert "1 draft edit(s) not restored: their images are gone or their captions unreadable: img_002.png." in note
    kept = Path(note.split("Their texts are kept in ")[1].rstrip("."))
    assert kept.parent == drafts and [(image["name"], image["caption"]) for image in json.loads(
        kept.read_text(encoding="utf-8"))["images"]] == [("img_001.png", "zkchar, blue, circle, solo"),
                                                        ("img_002.png", "zkchar, red, square, solo")]
    # the draft now holds what was restored, so a second restart neither names img_001 again nor loses img_000
    again = restarted(drafts, registry).open(folder)
    assert "not restored" not in again.draft.note and again.editor.tags[folder / "img_000.png"][-1] == "solo"


def test_saving_or_closing_removes_the_draft_and_a_folder_without_edits_writes_none(folder, tmp_path):
    drafts = tmp_path / "tag-drafts"
    registry = TagSessions(drafts_folder=drafts)
    session = registry.open(folder)
    session.change(tag_sessions.tag_editor.undo)  # nothing to undo: nothing unsaved
    registry.get(session.id)
    registry.drafts.flush()
    assert not drafts.exists() or not list(drafts.iterdir())

    tag_sessions.apply_request(session, {"op": "add", "tags": ["solo"], "selection": "all"})
    registry.drafts.flush()
    assert len(list(drafts.glob("*.json"))) == 1
    tag_sessions.save_session(session)
    registry.drafts.flush()
    assert not list(drafts.glob("*.json"))

    tag_sessions.apply_request(session, {"op": "add", "tags": ["smile"], "selection": "all"})
    registry.drafts.flush()
    assert len(list(drafts.glob("*.json"))) == 1
    registry.close(session.id)  # Discard, or the API's DELETE: the user's choice
    registry.drafts.flush()
    assert not list(drafts.glob("*.json"))
    assert restarted(drafts).open(folder).draft is None


def test_a_draft_that_cannot_be_read_is_named_and_moved_aside_never_deleted(folder, tmp_path):
    drafts = tmp_path / "tag-drafts"
    registry = TagSessions(drafts_folder=drafts)
    tag_sessions.apply_request(registry.open(folder), {"op": "add", "tags": ["solo"], "selection": "all"})
    registry.drafts.flush()
    draft = next(drafts.glob("*.json"))
    draft.write_text('{"tag_editor_draft": 1, "folder": "cut short', encoding="utf-8")

    reopened = restarted(drafts).open(folder)
    assert tag_sessions.page_of(reopened)["unsaved"] == 0 and reopened.draft.restored is None
    note = reopened.draft.note
    assert note.startswith("The draft of this folder's unsaved edits could not be read (")
    moved = Path(note.split("it was moved to ")[1].split(", where")[0])
    assert moved.read_text(encoding="utf-8") == '{"tag_editor_draft": 1, "folder": "cut short'
    assert not draft.exists()  # an edit now writes a new draft, not over the unreadable one


def test_a_draft_that_cannot_be_written_never_fails_the_edit_and_is_said_once(folder, tmp_path, caplog):
    not_a_folder = tmp_path / "tag-drafts"
    not_a_folder.write_text("a file where the drafts folder should be", encoding="utf-8")
    registry = TagSessions(drafts_folder=not_a_folder)
    session = registry.open(folder)
    for tag in ("solo", "smile"):
        tag_sessions.apply_request(session, {"op": "add", "tags": [tag], "selection": ["img_000.png"]})
        registry.drafts.flush()
    assert session.editor.tags[folder / "img_000.png"][-2:] == ("solo", "smile")
    warnings = [record.getMessage() for record in caplog.records if "could not be written" in record.getMessage()]
    assert len(warnings) == 1 and f"the unsaved caption edits in {folder} are not kept" in warnings[0]
    [line] = tag_sessions.unsaved_edits_at_exit(registry.unsaved_at_exit())
    assert line.startswith(f"1 unsaved caption edit(s) in {folder} are lost as the app stops: the draft ")


def test_a_folder_open_with_unsaved_edits_elsewhere_does_not_get_them_twice(folder, tmp_path):
    """The API opens a new session each time: laid over it too, the live session's edits would be in two places."""
    registry = TagSessions(drafts_folder=tmp_path / "tag-drafts")
    editing = registry.open(folder)
    tag_sessions.apply_request(editing, {"op": "add", "tags": ["solo"], "selection": "all"})
    registry.drafts.flush()
    other = registry.open(folder)
    assert other.draft is None and tag_sessions.page_of(other)["unsaved"] == 0
    registry.close(other.id)  # closing the clean one keeps the draft of the one with edits
    registry.drafts.flush()
    assert restarted(tmp_path / "tag-drafts").open(folder).draft.note.startswith("Restored 6 unsaved caption edit(s)")


def test_a_backup_restored_shows_in_the_session_and_is_refused_over_unsaved_edits(folder):
    """A save regretted after a restart (Undo gone): its backup goes back on disk and into the open session."""
    session = TagSessions().open(folder)
    tag_sessions.apply_request(session, {"op": "replace", "find": "red", "replacement": "crimson", "selection": "all"})
    saved = tag_sessions.save_session(session)
    (folder / "img_000.png").with_name("extra.png").write_bytes((folder / "img_000.png").read_bytes())
    tag_sessions.apply_request(session, {"op": "add", "tags": ["new"], "selection": ["img_001.png"]})
    with pytest.raises(tag_sessions.UnsavedEdits, match="1 caption edit.* not saved: save or undo them first"):
        tag_sessions.restore_session_backup(session)
    assert (folder / "img_000.txt").read_text(encoding="utf-8") == "zkchar, crimson, square"  # nothing restored
    session.change(tag_sessions.tag_editor.undo)

    restored = tag_sessions.restore_session_backup(session, Path(saved["backup_folder"]).name)
    assert sorted(restored["restored"]) == ["img_000.txt", "img_002.txt", "img_004.txt"] and restored["removed"] == []
    assert "restoring it (the newest) undoes this" in restored["message"]
    assert (folder / "img_000.txt").read_text(encoding="utf-8") == "zkchar, red, square"
    page = tag_sessions.page_of(session)
    shown = {image["name"]: image["tags"] for image in page["images"]}
    assert shown["img_000.png"] == ["zkchar", "red", "square"] and page["unsaved"] == 0
    assert "extra.png" in shown  # the folder read again from disk
    assert session.editor.undo_steps[-1].description.startswith("Restore the backup of 20")  # History names it
    newest = tag_sessions.backups_of(session)[0]
    assert (newest.name, newest.captions) == (restored["undo_backup"], 3)
    tag_sessions.restore_session_backup(session)  # the newest: the restore's own backup
    assert (folder / "img_000.txt").read_text(encoding="utf-8") == "zkchar, crimson, square"
    assert tag_sessions.page_of(session)["images"][1]["tags"] == ["zkchar", "crimson", "square"]  # after extra.png


def test_revert_takes_the_filtered_or_named_images_back_to_their_saved_captions_as_one_undo_step(folder, tmp_path):
    registry = TagSessions(drafts_folder=tmp_path / "tag-drafts")
    session = registry.open(folder)
    tag_sessions.apply_request(session, {"op": "add", "tags": ["solo"], "selection": "all"})
    registry.drafts.flush()
    assert list((tmp_path / "tag-drafts").glob("*.json"))  # the edits' draft, which the revert must take back too
    tag_sessions.set_filter(session, tag_sessions.filter_from({"all": ["blue"]}))
    assert tag_sessions.revert_session(session, "filtered") == ["img_001.png", "img_003.png", "img_005.png"]
    assert tag_sessions.revert_session(session, ["img_000.png", "img_001.png"]) == ["img_000.png"]
    assert [image.name for image in tag_sessions.tag_editor.unsaved_images(session.editor)] == ["img_002.png", "img_004.png"]
    assert tag_sessions.revert_session(session) == ["img_002.png", "img_004.png"]
    registry.drafts.flush()
    assert not list((tmp_path / "tag-drafts").glob("*.json"))  # nothing unsaved: no draft brings the edits back
    session.change(tag_sessions.tag_editor.undo)
    assert tag_sessions.page_of(session)["unsaved"] == 2
    with pytest.raises(UserError, match="not an image"):
        tag_sessions.revert_session(session, ["../secret.png"])
    registry.drafts.close()


def test_closing_the_drafts_writes_the_last_edit_and_lets_the_old_registry_go(folder, tmp_path):
    """Reload UI makes new Services: the old registry's writer thread waited for good and kept every session's
    editor and history alive (a few MB a folder, at every reload)."""
    import gc
    import weakref

    drafts = tmp_path / "tag-drafts"
    registry = TagSessions(drafts_folder=drafts)
    session = registry.open(folder)
    tag_sessions.apply_request(session, {"op": "add", "tags": ["solo"], "selection": "all"})
    registry.drafts.close()
    assert len(list(drafts.glob("*.json"))) == 1  # the edit made just before is in its draft
    gone = weakref.ref(registry)
    del registry, session
    gc.collect()
    assert gone() is None
