"""``dataset tags``: the tag editor's batch edits from the command line, and ``--restore`` of the backups every save
keeps (the undo path of a caption edit once the editor that made it is gone)."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from lora_trainer.cli import main


def folder_of(root: Path, captions: dict[str, str | bytes | None]) -> Path:
    """Images named by ``captions``' keys, each with that caption (bytes as they are; None: no caption file)."""
    root.mkdir(parents=True, exist_ok=True)
    for stem, caption in captions.items():
        Image.new("RGB", (8, 8)).save(root / f"{stem}.png")
        if isinstance(caption, bytes):
            (root / f"{stem}.txt").write_bytes(caption)
        elif caption is not None:
            (root / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return root


def captions(folder: Path) -> dict[str, str]:
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.txt"))}


def test_edits_run_in_the_order_given_on_the_images_the_filter_picks(tmp_path, capsys):
    folder = folder_of(tmp_path / "10_数据 集", {"a": "1girl, long_hair, smile", "b": "1girl, smile, smile", "c": "cat, 1girl"})
    before = captions(folder)
    assert main(["dataset", "tags", str(folder), "--with", "1girl", "--without", "cat", "--remove", "zk",
                 "--add-front", "zk", "--dedupe", "--underscores-to-spaces", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 captions change (2 picked by the filter)" in out and "dry run: nothing written" in out
    assert "a.png: '1girl, long_hair, smile' → 'zk, 1girl, long_hair, smile'" in out
    assert captions(folder) == before and not (folder / ".caption-backups").exists()

    assert main(["dataset", "tags", str(folder), "--with", "1girl", "--without", "cat", "--add-front", "zk",
                 "--dedupe", "--underscores-to-spaces"]) == 0
    assert captions(folder) == {"a": "zk, 1girl, long hair, smile", "b": "zk, 1girl, smile", "c": "cat, 1girl"}
    # the order matters: removing the trigger after adding it leaves no trigger
    assert main(["dataset", "tags", str(folder), "--add-front", "zk", "--remove", "zk"]) == 0
    assert "zk" not in captions(folder)["a"].split(", ")


def test_without_an_edit_the_tags_are_listed_by_frequency(tmp_path, capsys):
    folder = folder_of(tmp_path / "set", {"a": "zk, smile", "b": "zk, smile, hat", "c": "zk"})
    assert main(["dataset", "tags", str(folder), "--top", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == ["3 tags in 3 image(s):", "     3  zk", "     2  smile",
                                                    "… 1 more (--top 3 lists them all)"]


def test_restore_puts_back_the_exact_bytes_and_removes_the_captions_the_save_created(tmp_path, capsys):
    original = "\ufeffzk, smile\r\nsecond line\r\n".encode("utf-8")  # a BOM and Windows line ends: rewritten by a save
    folder = folder_of(tmp_path / "set", {"a": original, "b": "zk, hat", "none": None})
    assert main(["dataset", "tags", str(folder), "--add", "new tag"]) == 0
    assert "(--restore puts it back)" in capsys.readouterr().out
    assert (folder / "none.txt").read_text(encoding="utf-8") == "new tag"  # an image without a caption got one
    edited = captions(folder)

    assert main(["dataset", "tags", str(folder), "--restore"]) == 0
    out = capsys.readouterr().out
    assert "restored 2 caption file(s) and removed 1 that the save had created" in out
    assert (folder / "a.txt").read_bytes() == original and (folder / "b.txt").read_text(encoding="utf-8") == "zk, hat"
    assert not (folder / "none.txt").exists()

    # the restore kept what it replaced: restoring the newest backup again undoes the restore, created caption too
    assert main(["dataset", "tags", str(folder), "--restore"]) == 0
    assert captions(folder) == edited


def test_a_dataset_moved_with_its_backups_restores_into_its_new_place(tmp_path, capsys):
    folder = folder_of(tmp_path / "old place", {"a": "zk"})
    assert main(["dataset", "tags", str(folder), "--add", "hat"]) == 0
    moved = tmp_path / "new place"
    shutil.move(str(folder), str(moved))
    assert main(["dataset", "tags", str(moved), "--restore"]) == 0
    assert captions(moved) == {"a": "zk"} and not folder.exists()


def test_restore_mistakes_are_one_sentence_and_change_nothing(tmp_path, capsys):
    folder = folder_of(tmp_path / "set", {"a": "zk"})
    assert main(["dataset", "tags", str(folder), "--restore"]) == 2
    assert "holds no backup that --restore can put back" in capsys.readouterr().err
    handmade = folder / ".caption-backups" / "my copy"  # neither a manifest nor a save's time as its name
    handmade.mkdir(parents=True)
    (handmade / "a.txt").write_text("old", encoding="utf-8")
    assert main(["dataset", "tags", str(folder), "--restore", str(handmade)]) == 2
    assert "copy its files back by hand" in capsys.readouterr().err
    assert main(["dataset", "tags", str(folder), "--restore", "--add", "x"]) == 2
    assert "so it takes no edits: run that in a command of its own" in capsys.readouterr().err
    assert captions(folder) == {"a": "zk"}


def test_a_backup_from_before_backups_had_a_manifest_is_restored_as_the_newest(tmp_path, capsys):
    folder = folder_of(tmp_path / "set", {"a": "zk"})
    earlier = folder / ".caption-backups" / "2026-12-01_09-00-00"  # saved then: no manifest, laid out from the folder
    earlier.mkdir(parents=True)
    (earlier / "a.txt").write_text("old", encoding="utf-8")
    assert main(["dataset", "tags", str(folder), "--restore"]) == 0
    assert captions(folder) == {"a": "old"} and "restored 1 caption file(s)" in capsys.readouterr().out


def test_a_kohya_root_folder_is_refused_with_the_way_to_its_images(tmp_path, capsys):
    """The folder --train_data_dir and `dataset check` take: the images are a level down; it did nothing, exit 0."""
    folder_of(tmp_path / "train" / "10_zk", {"a": "zk"})
    assert main(["dataset", "tags", str(tmp_path / "train"), "--add", "hat"]) == 2
    err = capsys.readouterr().err
    assert "its sub-folders hold some (10_zk)" in err and "Add --recursive" in err
    assert main(["dataset", "tags", str(tmp_path / "train"), "--recursive", "--add", "hat"]) == 0
    assert captions(tmp_path / "train" / "10_zk") == {"a": "zk, hat"}


def test_captions_under_the_other_usual_extension_are_not_doubled_by_new_txt_files(tmp_path, capsys):
    """sd-scripts' default is .caption; an edit with the default .txt wrote new .txt captions beside them."""
    folder = folder_of(tmp_path / "set", {"a": None, "b": None})
    for stem in "ab":
        (folder / f"{stem}.caption").write_text("zk, smile", encoding="utf-8")
    assert main(["dataset", "tags", str(folder), "--add-front", "zkchar"]) == 2
    assert "2 of the images these edits change have no .txt caption but a .caption one" in capsys.readouterr().err
    assert not list(folder.glob("*.txt"))
    assert main(["dataset", "tags", str(folder)]) == 0  # listing says it as a note
    assert "note: 2 image(s) have no .txt caption but a .caption one" in capsys.readouterr().out
    assert main(["dataset", "tags", str(folder), "--caption-extension", ".caption", "--add-front", "zkchar"]) == 0
    assert (folder / "a.caption").read_text(encoding="utf-8") == "zkchar, zk, smile"


def test_a_stray_caption_of_the_other_extension_stops_only_edits_that_would_touch_its_image(tmp_path, capsys):
    folder = folder_of(tmp_path / "set", {"a": "1girl", "b": "1girl", "old": None})
    (folder / "old.caption").write_text("cat", encoding="utf-8")
    assert main(["dataset", "tags", str(folder), "--with", "1girl", "--add", "smile"]) == 0
    assert captions(folder) == {"a": "1girl, smile", "b": "1girl, smile"}
    assert main(["dataset", "tags", str(folder), "--add", "hat"]) == 2  # old.png would get an old.txt of "hat"
    assert "1 of the images these edits change" in capsys.readouterr().err and not (folder / "old.txt").exists()


def test_option_mistakes_are_one_sentence_and_restore_takes_nothing_it_would_ignore(tmp_path, capsys):
    import pytest

    folder = folder_of(tmp_path / "set", {"a": "zk"})
    for arguments, said in ((["--add", ""], "argument --add: give one or more tags"),
                            (["--top", "0"], "argument --top: give a whole number from 1 up"),
                            (["--keep-first", "-1", "--sort"], "argument --keep-first: give a whole number from 0 up")):
        with pytest.raises(SystemExit) as stopped:  # argparse's own exit, not a traceback
            main(["dataset", "tags", str(folder), *arguments])
        assert stopped.value.code == 2 and said in capsys.readouterr().err
    for arguments, said in ((["--keep-first", "1", "--add", "x"], "--keep-first is how many tags --sort leaves"),
                            (["--replace-regex", "^(.*)$", "\\2"], "the replacement '\\\\2' does not fit the pattern"),
                            (["--restore", "--dry-run"], "--restore puts a whole backup back as it is, so it takes no "
                                                         "--dry-run"),
                            (["--restore", "--with", "zk"], "so it takes no --with"),
                            (["--restore", ""], "--restore: give a backup's name or folder"),
                            (["--restore", "--recursive"], "so it takes no --recursive"),
                            (["--restore", "2026-01-01_00-00-00"], "holds no backup '2026-01-01_00-00-00'"),
                            (["--restore", str(tmp_path / "nowhere" / "x")], "no such folder")):
        assert main(["dataset", "tags", str(folder), *arguments]) == 2
        assert said in capsys.readouterr().err
    assert captions(folder) == {"a": "zk"}


def test_restore_takes_a_backup_by_the_name_its_folder_has(tmp_path, capsys):
    folder = folder_of(tmp_path / "set", {"a": "zk"})
    assert main(["dataset", "tags", str(folder), "--add", "hat"]) == 0
    name = next((folder / ".caption-backups").iterdir()).name
    assert main(["dataset", "tags", str(folder), "--restore", name]) == 0
    assert captions(folder) == {"a": "zk"}


def test_options_take_sd_scripts_underscored_spelling_too(tmp_path, capsys):
    """`dataset check` tells users to train with --caption_extension; the same spelling here was "unrecognized"."""
    folder = folder_of(tmp_path / "set", {"a": None})
    (folder / "a.caption").write_text("zk", encoding="utf-8")
    assert main(["dataset", "tags", str(folder), "--caption_extension", ".caption", "--add_front", "zkchar"]) == 0
    assert (folder / "a.caption").read_text(encoding="utf-8") == "zkchar, zk"


def test_a_reader_that_stops_reading_ends_the_command_without_a_traceback(tmp_path):
    """`lora inspect … --json | head` ended in a BrokenPipeError traceback once head had what it wanted."""
    import os
    import subprocess
    import sys

    folder = folder_of(tmp_path / "set", {"a": ", ".join(f"tag number {index}" for index in range(6000))})
    reading = subprocess.Popen([sys.executable, "-m", "lora_trainer", "dataset", "tags", str(folder), "--top", "6000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert reading.stdout.read(20)  # more than a pipe holds is still to come
    reading.stdout.close()
    assert reading.wait(timeout=60) == 1
    assert b"Traceback" not in reading.stderr.read()


def test_a_caption_that_cannot_be_read_is_named_with_its_fix_and_left_alone(tmp_path, capsys):
    """An edit over a folder with a caption saved in a local encoding (GBK, Latin-1) changes the others; the one it
    cannot read is said by name with how to fix it, not silently skipped."""
    folder = folder_of(tmp_path / "set", {"a": "zk, hat", "b": "zk, caf\xe9".encode("latin-1")})
    assert main(["dataset", "tags", str(folder), "--add", "smile"]) == 0
    out = capsys.readouterr().out
    assert "b.txt is not UTF-8" in out and "re-save it as UTF-8" in out and "left alone" in out
    assert (folder / "b.txt").read_bytes() == "zk, caf\xe9".encode("latin-1")
    assert (folder / "a.txt").read_text(encoding="utf-8") == "zk, hat, smile"
