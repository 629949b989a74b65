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
