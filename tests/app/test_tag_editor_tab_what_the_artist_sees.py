"""The Dataset Tag Editor tab and its sessions as an artist meets them: the status line, the gallery, the tag list,
the history and the caption files after Save. Each test pins a behaviour that a mutation review found untested."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lora_trainer.app import tag_sessions
from lora_trainer.app.ui import tag_editor_tab as tab
from lora_trainer.errors import UserError

VIEW = {name: index for index, name in enumerate(tab.OUTPUTS)}


@pytest.fixture
def opened(services, make_dataset):
    """chars/10_zkchar: 6 images, img_000 "zkchar, red, square", img_001 "zkchar, blue, circle", alternating."""
    folder = make_dataset("chars", "10_zkchar", count=6)
    view = tab.open_folder(services, tab.TabState(), str(folder / "10_zkchar"), False, ".txt")
    return folder / "10_zkchar", view


def shown_names(view) -> list[str]:
    return [label.lstrip("☑* ").split(": ")[0].split(" ")[1] for _, label in view[VIEW["gallery"]]]


def caption(folder, name: str) -> str:
    return (folder / f"{name}.txt").read_text(encoding="utf-8")


def test_a_folder_whose_sub_folders_hold_only_hidden_files_does_not_send_the_artist_into_them(services, make_dataset):
    """macOS leaves ``._img.png`` beside each picture copied to a USB drive: the tab said the sub-folder held images,
    and with 'Sub-folders too' ticked it showed none."""
    folder = make_dataset("copied", "10_zkchar", count=0)
    (folder / "10_zkchar" / "._img_000.png").write_bytes(b"AppleDouble resource fork")
    status = tab.open_folder(services, tab.TabState(), str(folder), False, ".txt")[VIEW["status"]]
    assert status == f"Opened {folder}: 0 images."


def test_a_sub_folder_linked_from_outside_the_allowed_folders_is_not_looked_into_nor_recommended(
        services, make_dataset, tmp_path):
    """The note looked through the link: it said the folder elsewhere held pictures and sent the artist to a folder
    the tab then refuses to show."""
    from PIL import Image

    elsewhere = tmp_path / "outside" / "10_private"
    elsewhere.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(elsewhere / "img.png")
    folder = services.settings.dataset_roots[0] / "linked"
    folder.mkdir()
    (folder / "10_private").symlink_to(elsewhere, target_is_directory=True)
    status = tab.open_folder(services, tab.TabState(), str(folder), False, ".txt")[VIEW["status"]]
    assert status == f"Opened {folder}: 0 images."
    status = tab.open_folder(services, tab.TabState(), str(folder), True, ".txt")[VIEW["status"]]
    assert status == (f"Opened {folder}: 0 images. Not shown: 10_private is a link leading outside the allowed "
                      "folders, so it is not read here; copy what it links to into the dataset, or allow that folder.")


# ---------------------------------------------------------------------------------------------------------------
# Filters and selection: which images the gallery shows and an edit changes.


def test_all_of_wants_every_tag_none_of_refuses_any_and_the_regex_is_searched_anywhere(services, opened):
    folder, view = opened
    state = view[VIEW["state"]]
    assert shown_names(tab.set_filter(services, state, "zkchar, red", "", "", "", False)) == [
        "img_000.png", "img_002.png", "img_004.png"]
    assert shown_names(tab.set_filter(services, state, "", "", "square, circle", "", False)) == []
    assert shown_names(tab.set_filter(services, state, "", "", "", "circle", False)) == [
        "img_001.png", "img_003.png", "img_005.png"]


def test_the_tag_list_counts_the_filtered_images(services, opened):
    folder, view = opened
    view = tab.set_filter(services, view[VIEW["state"]], "red", "", "", "", False)
    assert view[VIEW["frequency"]].values.tolist() == [["red", 3], ["square", 3], ["zkchar", 3]]


def test_a_range_over_images_already_selected_counts_each_once(services, opened):
    folder, view = opened
    state = tab.click_image(services, view[VIEW["state"]], 0)[VIEW["state"]]
    view = tab.select_range(services, state, 1, 2)
    assert view[VIEW["state"]].selection == ("img_000.png", "img_001.png")
    assert "; 2 selected; " in view[VIEW["page_info"]]


def test_an_image_whose_caption_cannot_be_read_is_not_offered_for_editing(services, make_dataset):
    folder = make_dataset("chars", "10_zkchar", count=3) / "10_zkchar"
    (folder / "img_001.txt").write_bytes("红色".encode("gbk"))
    view = tab.open_folder(services, tab.TabState(), str(folder), False, ".txt")
    assert shown_names(view) == ["img_000.png", "img_002.png"]
    assert "1 caption file(s) could not be read and are left alone." in view[VIEW["status"]]
    page = tag_sessions.page_of(tag_sessions.sessions_of(services).get(view[VIEW["state"]].session))
    assert [image["name"] for image in page["images"]] == ["img_000.png", "img_002.png"]
    assert list(page["unreadable"]) == ["img_001.png"] and page["filtered"] == 2


def test_an_api_edit_of_all_images_ignores_the_filter_the_tab_last_set(services, opened):
    folder, view = opened
    tab.set_filter(services, view[VIEW["state"]], "red", "", "", "", False)
    session = tag_sessions.sessions_of(services).get(view[VIEW["state"]].session)
    tag_sessions.apply_request(session, {"op": "add", "tags": ["solo"], "selection": "all"})
    tag_sessions.apply_request(session, {"op": "add", "tags": ["smile"]})  # the filtered images, by default
    assert [tags[-2:] for tags in session.editor.tags.values()] == [("solo", "smile"), ("circle", "solo")] * 3


def test_a_position_of_true_is_refused_not_read_as_one(services, opened):
    folder, view = opened
    session = tag_sessions.sessions_of(services).get(view[VIEW["state"]].session)
    with pytest.raises(UserError, match="position must be a whole number or null, not True"):
        tag_sessions.apply_request(session, {"op": "add", "tags": ["solo"], "position": True})
    assert not session.editor.undo_steps


# ---------------------------------------------------------------------------------------------------------------
# The status line after an edit, a save, a reload, an auto-tag; the history.


def test_an_edit_that_changes_nothing_says_so(services, opened):
    folder, view = opened
    state = view[VIEW["state"]]
    assert "6 image(s) changed" in tab.batch_edit(services, state, "filtered", "Add tags", "solo", "", "", False, False,
                                                  False, 0)[VIEW["status"]]
    view = tab.batch_edit(services, state, "filtered", "Add tags", "solo", "", "", False, False, False, 0)
    assert view[VIEW["status"]] == "Add tags: 0 image(s) changed (not saved yet)."


def test_saving_an_image_left_without_tags_warns_that_it_trains_with_an_empty_caption(services, opened):
    folder, view = opened
    state = replace(view[VIEW["state"]], current="img_000.png")
    tab.set_caption(services, state, "")
    status = tab.save(services, state, False)[VIEW["status"]]
    assert "⚠ 1 without tags (img_000.txt): they train with an empty caption; undo and save again" in status
    assert caption(folder, "img_000") == "\n"


def test_reload_takes_the_same_edit_made_elsewhere_and_keeps_a_different_one_as_a_conflict(services, opened):
    folder, view = opened
    state = replace(view[VIEW["state"]], selection=("img_000.png", "img_001.png"))
    tab.batch_edit(services, state, "selected", "Add tags", "solo", "", "", False, False, False, 0)
    (folder / "img_000.txt").write_text("zkchar, red, square, solo", encoding="utf-8")  # the same edit, elsewhere
    (folder / "img_001.txt").write_text("zkchar, blue, circle, smile", encoding="utf-8")
    view = tab.reload(services, state)
    assert view[VIEW["status"]] == ("Reloaded: 1 updated, 1 conflicts. Conflicts keep the edits made here; Save with "
                                    "overwrite replaces the other versions; Discard unsaved edits takes the other versions (of "
                                    "the images shown or selected).")
    assert view[VIEW["page_info"]].endswith("; 1 unsaved")


def gallery_caption(view, name: str) -> str:
    return next(label.lstrip("☑* ").split(": ", 1)[1] for _, label in view[VIEW["gallery"]] if f" {name}: " in label)


def test_discard_after_a_reload_conflict_takes_the_other_programs_caption_and_undo_brings_the_edit_back(
        services, opened):
    """Reload kept the edit made here over the tagger's text; the artist wanting the tagger's text had to retype it."""
    folder, view = opened
    state = view[VIEW["state"]]
    tab.batch_edit(services, state, "filtered", "Add tags", "solo", "", "", False, False, False, 0)
    (folder / "img_001.txt").write_text("zkchar, blue, circle, smile", encoding="utf-8")  # a tagger, meanwhile
    assert "1 conflicts" in tab.reload(services, state)[VIEW["status"]]
    view = tab.discard_unsaved(services, state)
    assert view[VIEW["status"]] == ("Discarded the unsaved edits of 6 image(s): they show their caption files as they "
                                    "are now (Undo brings the edits back).")
    assert gallery_caption(view, "img_001.png") == "zkchar, blue, circle, smile"
    assert gallery_caption(view, "img_000.png") == "zkchar, red, square"
    assert view[VIEW["page_info"]].endswith("; 0 unsaved")
    assert view[VIEW["history"]].values.tolist()[-1][1:] == ["Revert to the saved captions", "done", 6]

    view = tab.undo(services, state)
    assert gallery_caption(view, "img_001.png") == "zkchar, blue, circle, solo"
    assert view[VIEW["page_info"]].endswith("; 6 unsaved")
    tab.redo(services, state)
    assert tab.save(services, state, False)[VIEW["status"]] == "Saved 0 caption file(s)."
    assert caption(folder, "img_001") == "zkchar, blue, circle, smile"
    assert caption(folder, "img_000") == "zkchar, red, square"


def test_discard_takes_the_caption_files_as_they_are_now_without_a_reload_and_undo_keeps_both_versions(
        services, opened):
    """Discard took the images back to the text the session read when the folder was opened: a tagger's caption
    written since (no Reload pressed) showed the older text."""
    folder, view = opened
    state = view[VIEW["state"]]
    tab.batch_edit(services, state, "filtered", "Add tags", "solo", "", "", False, False, False, 0)
    (folder / "img_001.txt").write_text("zkchar, blue, circle, smile", encoding="utf-8")  # a tagger, meanwhile
    (folder / "img_002.txt").write_text("zkchar, red, hat\nwildcard line", encoding="utf-8")
    view = tab.discard_unsaved(services, replace(state, selection=("img_001.png", "img_002.png", "img_003.png")))
    assert "Discarded the unsaved edits of 3 selected image(s)" in view[VIEW["status"]]
    assert gallery_caption(view, "img_001.png") == "zkchar, blue, circle, smile"
    assert gallery_caption(view, "img_002.png") == "zkchar, red, hat"
    assert gallery_caption(view, "img_003.png") == "zkchar, blue, circle"
    assert view[VIEW["page_info"]].endswith("; 3 unsaved")
    assert view[VIEW["history"]].values.tolist()[-1][1:] == ["Revert to the saved captions", "done", 3]
    view = tab.undo(services, state)  # one step brings the three edits back, over the files as they are now
    assert gallery_caption(view, "img_001.png") == "zkchar, blue, circle, solo"
    assert view[VIEW["page_info"]].endswith("; 6 unsaved")
    assert tab.save(services, state, False)[VIEW["status"]].startswith("Saved 6 caption file(s).")
    assert caption(folder, "img_001") == "zkchar, blue, circle, solo"
    assert caption(folder, "img_002") == "zkchar, red, square, solo\nwildcard line"
    # the other program wrote the very edit: nothing is left to discard, the image is no longer unsaved
    tab.batch_edit(services, state, "filtered", "Add tags", "smile", "", "", False, False, False, 0)
    (folder / "img_004.txt").write_text("zkchar, red, square, solo, smile", encoding="utf-8")
    view = tab.discard_unsaved(services, replace(state, selection=("img_004.png",)))
    assert view[VIEW["status"]] == "No selected image has unsaved edits: nothing to discard."
    assert view[VIEW["page_info"]].endswith("; 5 unsaved")


def test_discard_with_images_selected_takes_back_only_their_edits_and_says_when_there_are_none(services, opened):
    folder, view = opened
    state = view[VIEW["state"]]
    tab.batch_edit(services, state, "filtered", "Add tags", "solo", "", "", False, False, False, 0)
    chosen = replace(state, selection=("img_002.png", "img_003.png"))
    view = tab.discard_unsaved(services, chosen)
    assert view[VIEW["status"]] == ("Discarded the unsaved edits of 2 selected image(s): they show their caption files "
                                    "as they are now (Undo brings the edits back).")
    assert view[VIEW["page_info"]].endswith("; 4 unsaved") and gallery_caption(view, "img_002.png") == "zkchar, red, square"
    assert tab.discard_unsaved(services, chosen)[VIEW["status"]] == "No selected image has unsaved edits: nothing to discard."
    # a filter on and nothing selected: the images shown, not those out of sight
    state = tab.set_filter(services, state, "blue", "", "", "", False)[VIEW["state"]]
    view = tab.discard_unsaved(services, state)
    assert view[VIEW["status"]] == ("Discarded the unsaved edits of 2 shown image(s): they show their caption files as "
                                    "they are now (Undo brings the edits back).")  # img_001 and img_005; 003 was taken back
    assert view[VIEW["page_info"]].endswith("; 2 unsaved")  # img_000 and img_004, hidden by the filter
    state = tab.set_filter(services, state, "", "", "zkchar", "", False)[VIEW["state"]]  # none: shows no image
    assert tab.discard_unsaved(services, state)[VIEW["status"]] == (
        "⚠ The filter shows no image: clear it, or select images, to discard their unsaved edits.")
    state = tab.set_filter(services, state, "solo", "", "", "", False)[VIEW["state"]]  # all of solo: 000 and 004
    # the filter showed 2 of 6 before the discard (after it, none): said as it was
    assert "edits of 2 shown image(s)" in tab.discard_unsaved(services, state)[VIEW["status"]]
    state = tab.set_filter(services, state, "", "", "", "", False)[VIEW["state"]]
    tab.batch_edit(services, state, "filtered", "Add tags", "solo", "", "", False, False, False, 0)
    state = tab.set_filter(services, state, "solo", "", "", "", False)[VIEW["state"]]  # all 6 shown, none after
    assert "edits of 6 image(s)" in tab.discard_unsaved(services, state)[VIEW["status"]]
    state = tab.set_filter(services, state, "", "", "", "", False)[VIEW["state"]]
    assert tab.discard_unsaved(services, state)[VIEW["status"]] == "No image has unsaved edits: nothing to discard."


def test_the_history_lists_undone_steps_in_the_order_redo_takes_them(services, opened):
    folder, view = opened
    state = view[VIEW["state"]]
    for tag in ("solo", "smile"):
        tab.batch_edit(services, state, "filtered", "Add tags", tag, "", "", False, False, False, 0)
    tab.undo(services, state)
    view = tab.undo(services, state)
    assert [row[1:3] for row in view[VIEW["history"]].values.tolist()] == [
        ["Add solo at the end", "undone"], ["Add smile at the end", "undone"]]
    page = tag_sessions.page_of(tag_sessions.sessions_of(services).get(state.session))
    assert page["history"] == {"undo": [], "redo": ["Add solo at the end", "Add smile at the end"]}


def test_auto_tag_of_the_selection_tags_only_it_and_counts_only_captions_that_change(services, opened, monkeypatch):
    folder, view = opened
    monkeypatch.setattr(services.host, "interrogate", lambda image, kind: "smile, zkchar", raising=False)
    state = replace(view[VIEW["state"]], selection=("img_002.png",))
    view = tab.autotag(services, state, "selected", "DeepBooru", "", 0.35, 0.85, "append", "")
    assert view[VIEW["status"]] == "Auto-tagged 1 image(s); 1 caption(s) changed (not saved yet)."
    view = tab.autotag(services, state, "selected", "DeepBooru", "", 0.35, 0.85, "append", "")
    assert view[VIEW["status"]] == "Auto-tagged 1 image(s); 0 caption(s) changed (not saved yet)."
    session = tag_sessions.sessions_of(services).get(state.session)
    assert [image.name for image, tags in session.editor.tags.items() if "smile" in tags] == ["img_002.png"]


def test_the_caption_box_shows_the_caption_that_batch_edits_undo_discard_and_reload_leave(services, opened):
    """The caption box kept the text it was filled with when the image was clicked: after a batch edit, Undo, Discard
    or Reload had changed that caption, it showed the old one (and Set caption of it took the change back)."""
    folder, view = opened
    clicked = tab.click_image(services, view[VIEW["state"]], 0)
    state = clicked[VIEW["state"]]
    assert clicked[VIEW["caption"]] == "zkchar, red, square" and clicked[len(tab.OUTPUTS)] == "img_000.png"
    view = tab.batch_edit(services, state, "filtered", "Add tags", "solo", "", "", False, False, False, 0)
    assert view[VIEW["caption"]] == "zkchar, red, square, solo"
    view = tab.set_caption(services, view[VIEW["state"]], "zkchar, red, square, solo, smile")  # the box, typed on
    assert view[VIEW["status"]] == "Caption of img_000.png changed (not saved yet)."
    assert view[VIEW["caption"]] == tab.gr.update()  # the box keeps the text as typed
    view = tab.undo(services, view[VIEW["state"]])
    assert view[VIEW["caption"]] == "zkchar, red, square, solo"
    view = tab.discard_unsaved(services, view[VIEW["state"]])
    assert view[VIEW["caption"]] == "zkchar, red, square"
    (folder / "img_000.txt").write_text("zkchar, red, square, hat", encoding="utf-8")  # a tagger, meanwhile
    view = tab.reload(services, view[VIEW["state"]])
    assert view[VIEW["caption"]] == "zkchar, red, square, hat"
    # a view that changes no caption leaves the box as typed
    assert tab.go_to_page(services, view[VIEW["state"]], 1)[VIEW["caption"]] == tab.gr.update()
    # the box set from its new text is no change taken back
    view = tab.set_caption(services, view[VIEW["state"]], "zkchar, red, square, hat, smile")
    assert view[VIEW["status"]] == "Caption of img_000.png changed (not saved yet)."
    tab.save(services, view[VIEW["state"]], False)
    assert caption(folder, "img_000") == "zkchar, red, square, hat, smile"


def test_a_caption_changed_under_the_caption_box_is_not_set_back_unseen(services, opened):
    """A caption changed where the tab did not show it (the API, on the same session): 'Set caption' of the box's
    old text would take the change back for that image, unseen; the box keeps the typed text, to be copied."""
    folder, view = opened
    clicked = tab.click_image(services, view[VIEW["state"]], 0)
    state, shown = clicked[VIEW["state"]], clicked[VIEW["caption"]]
    assert shown == "zkchar, red, square"
    tag_sessions.apply_request(tag_sessions.sessions_of(services).get(state.session), {"op": "add", "tags": "solo"})
    view = tab.set_caption(services, state, shown + ", smile")
    assert view[VIEW["status"]] == ('⚠ The caption of img_000.png changed outside this tab (the API or another browser '
                                    'tab): it is now "zkchar, red, square, solo". Set caption again puts your text in '
                                    'place of that; a click on the image shows the caption now (and selects or '
                                    'unselects it).')
    assert view[VIEW["caption"]] == tab.gr.update()
    again = tab.set_caption(services, view[VIEW["state"]], shown + ", smile")  # as the refusal says
    assert again[VIEW["status"]] == "Caption of img_000.png changed (not saved yet)."
    assert tab.undo(services, again[VIEW["state"]])[VIEW["caption"]] == "zkchar, red, square, solo"
    # the caption now, typed with other spacing, is no change taken back
    assert "changed (not saved yet)" in tab.set_caption(services, state, "zkchar,red ,  square, solo ")[VIEW["status"]]
    tab.save(services, view[VIEW["state"]], False)
    assert caption(folder, "img_000") == "zkchar, red, square, solo"
    clicked = tab.click_image(services, view[VIEW["state"]], 0)
    view = tab.set_caption(services, clicked[VIEW["state"]], clicked[VIEW["caption"]] + ", smile")
    assert view[VIEW["status"]] == "Caption of img_000.png changed (not saved yet)."
    view = tab.set_caption(services, view[VIEW["state"]], "zkchar, smile")  # the box set twice: its own change
    assert view[VIEW["status"]] == "Caption of img_000.png changed (not saved yet)."
    tab.save(services, view[VIEW["state"]], False)
    assert caption(folder, "img_000") == "zkchar, smile"


def test_text_typed_in_the_caption_box_survives_a_batch_edit_of_that_image(services, opened):
    """The box's text rides along with every view's event (``TabState.box``): a batch edit, Undo or Reload that changes
    the clicked image's caption while the artist is typing keeps the typed text, and says what the caption is now;
    Set caption then puts the typed text in its place, as said. The box was overwritten, the typed text lost."""
    folder, view = opened
    state = tab.click_image(services, view[VIEW["state"]], 0)[VIEW["state"]]
    typed = "zkchar, red, square, scarf, outdoors"
    view = tab.batch_edit(services, replace(state, box=typed), "filtered", "Add tags", "solo", "", "", False, False,
                          False, 0)
    assert view[VIEW["caption"]] == tab.gr.update()
    assert view[VIEW["status"]].endswith(
        'The caption of img_000.png is now "zkchar, red, square, solo"; the caption box keeps the text you typed: Set '
        "caption puts it in place of that, a click on the image shows the caption now (and selects or unselects it).")
    view = tab.go_to_page(services, replace(view[VIEW["state"]], box=typed), 1)  # a later view leaves it as well
    assert view[VIEW["caption"]] == tab.gr.update() and "caption box keeps" not in view[VIEW["status"]]
    view = tab.set_caption(services, view[VIEW["state"]], typed)
    assert view[VIEW["status"]] == "Caption of img_000.png changed (not saved yet)."
    tab.save(services, view[VIEW["state"]], False)
    assert caption(folder, "img_000") == typed
    # the box untouched since the click is filled anew, as before
    state = tab.click_image(services, view[VIEW["state"]], 1)[VIEW["state"]]
    view = tab.batch_edit(services, replace(state, box="zkchar, blue, circle, solo"), "filtered", "Remove tags", "solo",
                          "", "", False, False, False, 0)
    assert view[VIEW["caption"]] == "zkchar, blue, circle"


def test_every_view_event_sends_the_caption_box_last_and_fills_it_only_once_the_view_is_shown(services):
    """Without the box as a view's last input the tab cannot tell typed text from the text it filled in (an input
    before it shifts every argument); a view's fill waits in a state for the step after it, which reads the box then."""
    blocks = tab.build(services)
    config = blocks.get_config_file() if hasattr(blocks, "get_config_file") else blocks.config
    kinds = {component["id"]: component.get("type") for component in config["components"]}
    labels = {component["id"]: component.get("props", {}).get("label") for component in config["components"]}
    box = next(id_ for id_, label in labels.items() if label == "Caption (this image)")
    views = [dep for dep in config["dependencies"] if len(dep["outputs"]) > tab.CAPTION
             and kinds[dep["outputs"][tab.CAPTION]] == "state"]  # their caption fill goes to the pending state
    fills = [dep for dep in config["dependencies"] if dep["outputs"][:1] == [box] and len(dep["outputs"]) == 2]
    assert len(views) > 15 and len(fills) == len(views)
    for dep in views + fills + [dep for dep in config["dependencies"] if box in dep["outputs"]]:
        assert dep["inputs"][-1] == box, dep["inputs"]


def test_text_typed_while_a_view_ran_is_kept_and_said(services, opened):
    """The box's text is sent with the click on Apply; a batch edit (an Auto-tag: minutes) that changes the clicked
    image's caption filled the box over what was typed while it ran."""
    folder, view = opened
    state = tab.click_image(services, view[VIEW["state"]], 0)[VIEW["state"]]
    apply = tab.with_caption_box(services, tab.batch_edit)
    out = apply(state, "filtered", "Add tags", "solo", "", "", False, False, False, 0, "zkchar, red, square")
    pending = out[tab.CAPTION]
    assert pending == ("img_000.png", "zkchar, red, square", "zkchar, red, square, solo")
    assert tab.fill_caption_box(pending, out[VIEW["status"]], "zkchar, red, square") == (
        "zkchar, red, square, solo", tab.gr.update())  # the box untouched until the view came: filled
    box, status = tab.fill_caption_box(pending, out[VIEW["status"]], "zkchar, red, square, sca")  # typed meanwhile
    assert box == tab.gr.update() and status.startswith(out[VIEW["status"]])
    assert status.endswith('The caption of img_000.png is now "zkchar, red, square, solo"; the caption box keeps the text '
                           "you typed: Set caption puts it in place of that, a click on the image shows the caption now "
                           "(and selects or unselects it).")
    again = apply(out[0], "filtered", "Remove tags", "not_there", "", "", False, False, False, 0, "zkchar, red, sca")
    assert again[tab.CAPTION] is None  # nothing changed the caption: no fill


def test_a_click_that_finds_no_image_leaves_the_caption_box_and_its_image_as_they_were(services, opened):
    """A click on a page changed meanwhile emptied the box but kept its image: Set caption then emptied that image's
    caption, unasked."""
    folder, view = opened
    clicked = tab.click_image(services, view[VIEW["state"]], 0)
    missed = tab.click_image(services, clicked[VIEW["state"]], 99)
    assert missed[VIEW["caption"]] == tab.gr.update() and missed[len(tab.OUTPUTS)] == tab.gr.update()
    assert missed[VIEW["state"]].current == "img_000.png"
