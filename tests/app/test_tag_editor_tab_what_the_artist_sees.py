"""The Dataset Tag Editor tab and its sessions as an artist meets them: the status line, the gallery, the tag list,
the history and the caption files after Save. Each test pins a behaviour that a mutation review found untested."""

from __future__ import annotations


from lora_trainer.app.ui import tag_editor_tab as tab

VIEW = {name: index for index, name in enumerate(tab.OUTPUTS)}


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
