from __future__ import annotations

import codecs
import os
from pathlib import Path

import pytest

from lora_trainer.dataset import caption_files
from lora_trainer.dataset.caption_files import (
    NO_FILE,
    caption_path_for,
    load_caption_file,
    read_caption,
    training_caption,
    write_captions,
)
from lora_trainer.errors import UserError


def test_caption_path_sits_beside_the_image_and_adds_the_missing_dot():
    assert caption_path_for(Path("d/10_dog/a.b.png")) == Path("d/10_dog/a.b.txt")
    assert caption_path_for(Path("d/x.JPG"), "caption") == Path("d/x.caption")


@pytest.mark.parametrize(
    "data",
    [
        "zkstar, 星, yellow star".encode("utf-8"),
        codecs.BOM_UTF8 + "zkstar, 星, yellow star".encode("utf-8"),
        "zkstar, 星, yellow star".encode("utf-16"),  # Python writes the BOM
        codecs.BOM_UTF16_BE + "zkstar, 星, yellow star".encode("utf-16-be"),
    ],
    ids=["utf8", "utf8-bom", "utf16-le-bom", "utf16-be-bom"],
)
def test_utf8_and_bom_files_read_the_same_without_the_bom_glued_to_the_first_tag(tmp_path, data):
    path = tmp_path / "a.txt"
    path.write_bytes(data)
    assert read_caption(path) == "zkstar, 星, yellow star"


def test_gbk_caption_names_the_file_and_the_fix_unless_the_encoding_is_given(tmp_path):
    path = tmp_path / "猫 cat.txt"
    path.write_bytes("猫, 可爱".encode("gbk"))
    with pytest.raises(UserError) as raised:
        read_caption(path)
    assert str(path) in str(raised.value) and "re-save it as UTF-8" in str(raised.value)
    assert read_caption(path, encoding="gbk") == "猫, 可爱"


def test_multiline_caption_trains_on_its_first_line_like_sd_scripts(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"  zkstar, star \r\nsecond line\r\n\r\nthird\r")
    assert read_caption(path) == "zkstar, star"
    assert read_caption(path, enable_wildcard=True) == "zkstar, star\nsecond line\nthird"
    assert load_caption_file(path).text == "  zkstar, star \nsecond line\n\nthird\n"
    assert training_caption("") == ""


def test_missing_caption_reads_as_no_file_and_read_caption_says_so(tmp_path):
    assert load_caption_file(tmp_path / "none.txt").stamp == NO_FILE
    with pytest.raises(UserError, match="does not exist"):
        read_caption(tmp_path / "none.txt")


def test_write_keeps_previous_versions_in_a_timestamped_backup_and_writes_utf8(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_bytes(codecs.BOM_UTF8 + b"old a")
    (data / "sub" / "b.txt").write_text("old b", encoding="utf-8")
    stamps = {p: load_caption_file(p).stamp for p in (data / "a.txt", data / "sub" / "b.txt", data / "c.txt")}
    result = write_captions(
        {data / "a.txt": "new, 星", data / "sub" / "b.txt": "new b", data / "c.txt": "brand new"},
        tmp_path / "backups",
        stamps,
    )
    assert (data / "a.txt").read_bytes() == "new, 星".encode("utf-8")
    assert (data / "c.txt").read_text(encoding="utf-8") == "brand new"
    assert result.backup_folder.parent == tmp_path / "backups"
    assert (result.backup_folder / "a.txt").read_bytes() == codecs.BOM_UTF8 + b"old a"
    assert (result.backup_folder / "sub" / "b.txt").read_text(encoding="utf-8") == "old b"
    assert not list(data.rglob("*.tmp"))
    # the returned stamps let the same files be written again without a false conflict
    second = write_captions({data / "a.txt": "newer"}, tmp_path / "backups", result.written)
    assert second.backup_folder != result.backup_folder
    assert (second.backup_folder / "a.txt").read_text(encoding="utf-8") == "new, 星"


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_an_edited_caption_keeps_its_permissions_and_a_new_one_gets_the_usual_ones(tmp_path):
    """Saving in the tag editor changes the text, not who may read or edit the file."""
    shared, new = tmp_path / "shared.txt", tmp_path / "new.txt"
    shared.write_text("old", encoding="utf-8")
    shared.chmod(0o664)  # group-editable, as on a team's dataset share
    previous = os.umask(0o022)
    try:
        write_captions({shared: "edited", new: "fresh"}, tmp_path / "backups")
    finally:
        os.umask(previous)
    assert oct(shared.stat().st_mode & 0o777) == oct(0o664)
    assert oct(new.stat().st_mode & 0o777) == oct(0o644)


def test_a_file_edited_elsewhere_since_reading_blocks_the_whole_save(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a", encoding="utf-8")
    b.write_text("b", encoding="utf-8")
    stamps = {a: load_caption_file(a).stamp, b: load_caption_file(b).stamp}
    b.write_text("b edited in another tool", encoding="utf-8")
    with pytest.raises(UserError) as raised:
        write_captions({a: "mine a", b: "mine b"}, tmp_path / "backups", stamps)
    assert str(b) in str(raised.value) and str(a) not in str(raised.value)
    assert a.read_text(encoding="utf-8") == "a"
    assert b.read_text(encoding="utf-8") == "b edited in another tool"
    assert not (tmp_path / "backups").exists()


def test_a_caption_created_elsewhere_is_not_overwritten_when_none_was_expected(tmp_path):
    new = tmp_path / "new.txt"
    new.write_text("hand-written", encoding="utf-8")
    with pytest.raises(UserError, match="changed on disk"):
        write_captions({new: "tagger output"}, None, {new: NO_FILE})
    assert new.read_text(encoding="utf-8") == "hand-written"


def test_a_failed_write_changes_no_caption_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a", encoding="utf-8")
    b.write_text("b", encoding="utf-8")
    real = caption_files._write_synced

    def failing_for_b(target: Path, data: bytes) -> Path:
        if target == b:
            raise OSError("disk full")
        return real(target, data)

    monkeypatch.setattr(caption_files, "_write_synced", failing_for_b)
    with pytest.raises(UserError, match="no caption was changed"):
        write_captions({a: "new a", b: "new b"}, None)
    assert a.read_text(encoding="utf-8") == "a" and b.read_text(encoding="utf-8") == "b"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt"]


def test_backup_is_a_copy_where_hard_links_are_not_possible(tmp_path, monkeypatch):
    caption = tmp_path / "a.txt"
    caption.write_text("old", encoding="utf-8")

    def no_hard_links(source, target):
        raise OSError("hard links not supported")

    monkeypatch.setattr(caption_files.os, "link", no_hard_links)
    result = write_captions({caption: "new"}, tmp_path / "backups", {caption: load_caption_file(caption).stamp})
    assert (result.backup_folder / "a.txt").read_text(encoding="utf-8") == "old"
    assert caption.read_text(encoding="utf-8") == "new"


def test_backups_are_listed_newest_first_with_what_each_holds_and_named_never_by_path(tmp_path, monkeypatch):
    """The Tag Editor tab and the API offer a folder's backups to restore, the one the last save made first."""
    from datetime import datetime

    a, b, backups = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / ".caption-backups"
    a.write_text("first", encoding="utf-8")
    for name in ("2026-12-05_17-02-44", "2026-12-05_17-02-44_2", "2026-12-05_17-02-44_10", "2026-12-04_09-00-00"):
        monkeypatch.setattr(caption_files, "_backup_folder", lambda backup_dir, name=name: _made(backup_dir / name))
        _saving_at(monkeypatch, caption_files.backup_time(name))
        write_captions({a: f"saved at {name}", b: "new"} if name.endswith("_10") else {a: f"saved at {name}"}, backups)
    (backups / "2026-12-06_00-00-00").mkdir()  # no manifest: a folder copied in by hand, not a backup
    assert [p.name for p in caption_files.restorable_backups(backups)] == [
        "2026-12-05_17-02-44_10", "2026-12-05_17-02-44_2", "2026-12-05_17-02-44", "2026-12-04_09-00-00"]
    newest = caption_files.backup_summaries(backups)[0]
    assert (newest.name, newest.time, newest.captions, newest.created) == (
        "2026-12-05_17-02-44_10", datetime(2026, 12, 5, 17, 2, 44), 1, 1)  # a.txt kept, b.txt created by that save
    assert caption_files.backup_named(backups, "2026-12-04_09-00-00") == backups / "2026-12-04_09-00-00"
    for name in ("../..", "..", "/etc", "x/../2026-12-04_09-00-00", "C:\\Windows", ""):
        with pytest.raises(UserError, match="is not a backup's name") as refused:
            caption_files.backup_named(backups, name)
        assert refused.value.field == "backup"
    with pytest.raises(caption_files.BackupNotFound, match="holds no backup '2026-12-06_00-00-00'"):
        caption_files.backup_named(backups, "2026-12-06_00-00-00")
    assert caption_files.restorable_backups(tmp_path / "none") == []


def _saving_at(monkeypatch, local) -> None:
    """Saves from now on record ``local`` (this machine's time) as their time."""
    from datetime import datetime, timezone

    class At(datetime):
        @classmethod
        def now(cls, tz=None):
            return local.astimezone(timezone.utc)

    monkeypatch.setattr(caption_files, "datetime", At)


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True)
    return folder


def test_a_read_only_caption_on_windows_stops_the_save_before_any_caption_changes(tmp_path, monkeypatch):
    """Windows refuses to replace a read-only file: it failed after the other captions were replaced (a save half
    done, said only as "could not replace 1 of 4")."""
    files = {tmp_path / f"{name}.txt": name for name in ("a", "b", "c")}
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    held = tmp_path / "b.txt"
    real_access = os.access
    monkeypatch.setattr(caption_files, "_ON_WINDOWS", True)
    monkeypatch.setattr(caption_files.os, "access", lambda path, mode: Path(path) != held and real_access(path, mode))
    with pytest.raises(UserError, match=r"1 caption file\(s\) are read-only.*b\.txt.*Clear their read-only attribute"):
        write_captions({path: "new" for path in files}, tmp_path / "backups")
    assert {path.read_text(encoding="utf-8") for path in files} == {"a", "b", "c"}
    assert not (tmp_path / "backups").exists()


def test_the_newest_backup_is_the_last_saved_whatever_its_name_says(tmp_path, monkeypatch):
    """Names are local times: in the hour repeated when clocks go back (or after a wrong clock) the restore's own
    backup could sort below another, and "restoring the newest undoes this" restored that other one."""
    from datetime import datetime

    a, backups = tmp_path / "a.txt", tmp_path / ".caption-backups"
    a.write_text("first", encoding="utf-8")
    for name, saved in (("2026-10-25_02-30-00", datetime(2026, 10, 25, 2, 30)), ("2026-10-25_02-10-00_b", datetime(2026, 12, 1))):
        monkeypatch.setattr(caption_files, "_backup_folder", lambda backup_dir, name=name: _made(backup_dir / name))
        _saving_at(monkeypatch, saved)
        write_captions({a: f"after {name}"}, backups)
    assert [p.name for p in caption_files.restorable_backups(backups)] == ["2026-10-25_02-10-00_b", "2026-10-25_02-30-00"]


def _pictures(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # only its name matters to a restore


def _dataset_with_backup(tmp_path: Path) -> tuple[Path, Path]:
    dataset = tmp_path / "set"
    _pictures(dataset / "sub" / "a.png")
    (dataset / "sub" / "a.txt").write_text("before", encoding="utf-8")
    result = write_captions({dataset / "sub" / "a.txt": "after"}, dataset / ".caption-backups")
    return dataset, result.backup_folder


def test_a_restore_writes_and_removes_only_captions_of_its_dataset_whatever_the_manifest_says(tmp_path):
    """Backups travel inside the dataset: a shared dataset's crafted manifest overwrote, read and deleted files
    anywhere on disk through one restore (the API's and the tab's default pick, the newest)."""
    import json

    dataset, backup = _dataset_with_backup(tmp_path)
    victim = tmp_path / "victim.py"
    victim.write_text("mine", encoding="utf-8")
    manifest = backup / caption_files.BACKUP_MANIFEST
    honest = json.loads(manifest.read_text(encoding="utf-8"))
    (dataset / ".git").mkdir()
    (dataset / ".git" / "config").write_text("[core]", encoding="utf-8")
    for crafted in ({**honest, "files": {"a.txt": "../../../victim.py"}},
                    {**honest, "files": {"a.txt": str(victim)}},
                    {**honest, "files": {"../../../victim.py": "../../sub/a.txt"}},
                    {**honest, "created": ["../../../victim.py"]},
                    {**honest, "files": {"a.txt": "../../sub/a.png"}},
                    {**honest, "files": {"a.txt": "../../.git/config"}}):  # inside the dataset, in a hidden folder
        manifest.write_text(json.dumps(crafted), encoding="utf-8")
        with pytest.raises(UserError, match="nothing was restored"):
            caption_files.restore_backup(backup, dataset, dataset / ".caption-backups")
        assert victim.read_text(encoding="utf-8") == "mine" and (dataset / ".git" / "config").read_text() == "[core]"
        assert (dataset / "sub" / "a.txt").read_text(encoding="utf-8") == "after"
    # a file of the dataset that is no picture's caption (a notes.txt, a config): left alone, said
    (dataset / "notes.txt").write_text("mine", encoding="utf-8")
    manifest.write_text(json.dumps({**honest, "files": {**honest["files"], "a.txt": "../../notes.txt"}}), encoding="utf-8")
    with pytest.raises(UserError, match="no caption of a picture that is still there"):
        caption_files.restore_backup(backup, dataset, dataset / ".caption-backups")
    assert (dataset / "notes.txt").read_text(encoding="utf-8") == "mine"
    manifest.write_text(json.dumps(honest), encoding="utf-8")
    caption_files.restore_backup(backup, dataset, dataset / ".caption-backups")
    assert (dataset / "sub" / "a.txt").read_text(encoding="utf-8") == "before"


def test_a_folder_deleted_since_is_not_brought_back_by_a_restore(tmp_path):
    import shutil

    dataset, backup = _dataset_with_backup(tmp_path)
    _pictures(dataset / "b.png", dataset / "c.png")
    (dataset / "b.txt").write_text("b", encoding="utf-8")
    shutil.rmtree(dataset / "sub")
    with pytest.raises(UserError, match="nothing to restore"):
        caption_files.restore_backup(backup, dataset, dataset / ".caption-backups")
    assert not (dataset / "sub").exists()
    result = write_captions({dataset / "b.txt": "b2", dataset / "c.txt": "c"}, dataset / ".caption-backups")
    (dataset / "sub").mkdir()
    restored = caption_files.restore_backup(result.backup_folder, dataset, dataset / ".caption-backups")
    assert restored.left_out == () and not (dataset / "c.txt").exists()
    (dataset / "b.png").unlink()  # a picture deleted since: its caption stays in the backup, said
    restored = caption_files.restore_backup(restored.backup_folder, dataset, dataset / ".caption-backups")
    assert restored.left_out == (dataset / "b.txt",) and "picture or folder was deleted" in restored.left_out_note


def test_a_backup_whose_files_did_not_all_get_kept_is_not_offered(tmp_path, monkeypatch):
    """The manifest was written first: a failed backup left a folder of a manifest alone, listed as the newest and
    restored with a FileNotFoundError; a missing file in a backup is said before anything changes."""
    dataset = tmp_path / "set"
    _pictures(dataset / "a.png")
    (dataset / "a.txt").write_text("before", encoding="utf-8")
    real_write = caption_files._write_synced

    def full_disk(*arguments, **keywords):
        raise OSError(28, "No space left on device")

    def writes_but_no_backups(target, data):  # the captions' temporaries are written; the backup's copies are not
        return full_disk() if ".caption-backups" in str(target) else real_write(target, data)

    monkeypatch.setattr(caption_files.os, "link", full_disk)
    monkeypatch.setattr(caption_files, "_write_synced", writes_but_no_backups)
    with pytest.raises(UserError, match="Could not back up the previous captions.*no caption was changed"):
        write_captions({dataset / "a.txt": "after"}, dataset / ".caption-backups")
    monkeypatch.undo()
    assert caption_files.restorable_backups(dataset / ".caption-backups") == []
    assert (dataset / "a.txt").read_text(encoding="utf-8") == "before"

    result = write_captions({dataset / "a.txt": "after"}, dataset / ".caption-backups")
    (result.backup_folder / "a.txt").unlink()
    with pytest.raises(UserError, match="a.txt is missing from the backup"):
        caption_files.restore_backup(result.backup_folder, dataset, dataset / ".caption-backups")


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need a privilege on Windows")
def test_the_backup_of_a_linked_caption_is_a_copy_that_keeps_its_text(tmp_path):
    """Linux hard-links the symbolic link itself: the "backup" followed the shared caption's later changes (or
    pointed nowhere), and a restore wrote the shared file's current text."""
    dataset, shared = tmp_path / "set", tmp_path / "shared.txt"
    _pictures(dataset / "a.png")
    shared.write_text("shared v1", encoding="utf-8")
    (dataset / "a.txt").symlink_to(shared)
    result = write_captions({dataset / "a.txt": "own"}, dataset / ".caption-backups")
    shared.write_text("shared v2", encoding="utf-8")
    kept = result.backup_folder / "a.txt"
    assert not kept.is_symlink() and kept.read_text(encoding="utf-8") == "shared v1"
    caption_files.restore_backup(result.backup_folder, dataset, dataset / ".caption-backups")
    assert (dataset / "a.txt").read_text(encoding="utf-8") == "shared v1"


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need a privilege on Windows")
def test_captions_saved_through_a_linked_sub_folder_are_restored_through_it(tmp_path):
    """A recursive session follows a linked folder (10_b → elsewhere); its save promised --restore, which then refused
    the backup as naming files outside the dataset."""
    dataset, elsewhere = tmp_path / "set", tmp_path / "elsewhere" / "10_b"
    _pictures(elsewhere / "x.png")
    (elsewhere / "x.txt").write_text("before", encoding="utf-8")
    dataset.mkdir()
    (dataset / "10_b").symlink_to(elsewhere, target_is_directory=True)
    result = write_captions({dataset / "10_b" / "x.txt": "after"}, dataset / ".caption-backups")
    caption_files.restore_backup(result.backup_folder, dataset, dataset / ".caption-backups")
    assert (elsewhere / "x.txt").read_text(encoding="utf-8") == "before"


def test_a_created_caption_that_cannot_be_removed_is_said_and_the_rest_is_restored(tmp_path, monkeypatch):
    dataset = tmp_path / "set"
    _pictures(dataset / "a.png", dataset / "b.png")
    (dataset / "a.txt").write_text("before", encoding="utf-8")
    result = write_captions({dataset / "a.txt": "after", dataset / "b.txt": "new"}, dataset / ".caption-backups")
    real_unlink = Path.unlink

    def held_open(path, missing_ok=False):
        if path.name == "b.txt":
            raise PermissionError(13, "in use by another process")
        return real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", held_open)
    restored = caption_files.restore_backup(result.backup_folder, dataset, dataset / ".caption-backups")
    assert (dataset / "a.txt").read_text(encoding="utf-8") == "before"
    assert restored.not_removed == (dataset / "b.txt",) and restored.removed == ()
    assert "could not be removed" in restored.left_out_note


def _unrecorded_backup(dataset: Path, name: str, files: dict[str, str]) -> Path:
    """A backup as saves made it before backups had a manifest (2026-12-05): its files laid out relative to their
    common folder, which nothing recorded."""
    folder = dataset / ".caption-backups" / name
    for relative, text in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text, encoding="utf-8")
    return folder


def _kohya_dataset(tmp_path: Path) -> Path:
    dataset = tmp_path / "数据 集"
    _pictures(dataset / "10_a" / "1.png", dataset / "10_a" / "2.PNG", dataset / "10_b" / "3.jpg")
    for relative in ("10_a/1.txt", "10_a/2.txt", "10_b/3.txt"):
        (dataset / relative).write_text("now", encoding="utf-8")
    return dataset


def test_a_backup_made_before_backups_had_a_manifest_is_listed_and_restored_where_its_captions_were(tmp_path):
    """Saves before 2026-12-05 kept backups without saying where their files go back: they were not listed, and the
    only undo of such a save was copying files back by hand, guessing the folder."""
    from datetime import datetime

    dataset = _kohya_dataset(tmp_path)
    backups = dataset / ".caption-backups"
    one_folder = _unrecorded_backup(dataset, "2026-12-01_10-00-00", {"1.txt": "one", "2.txt": "two"})
    two_folders = _unrecorded_backup(dataset, "2026-12-02_10-00-00", {"10_a/1.txt": "a1", "10_b/3.txt": "b3"})
    summaries = caption_files.backup_summaries(backups)
    assert [(s.name, s.time, s.captions, s.created) for s in summaries] == [
        ("2026-12-02_10-00-00", datetime(2026, 12, 2, 10), 2, 0), ("2026-12-01_10-00-00", datetime(2026, 12, 1, 10), 2, 0)]

    restored = caption_files.restore_backup(one_folder, dataset, backups)
    assert {path.relative_to(dataset).as_posix(): path.read_text(encoding="utf-8") for path in restored.restored} == {
        "10_a/1.txt": "one", "10_a/2.txt": "two"}  # below 10_a, the only folder with pictures 1 and 2
    assert (dataset / "10_b" / "3.txt").read_text(encoding="utf-8") == "now"
    caption_files.restore_backup(two_folders, dataset, backups)
    assert [(dataset / name).read_text(encoding="utf-8") for name in ("10_a/1.txt", "10_a/2.txt", "10_b/3.txt")] == [
        "a1", "two", "b3"]
    # each restore kept what it replaced in a backup with a manifest: the newest undoes the last restore
    caption_files.restore_backup(caption_files.restorable_backups(backups)[0], dataset, backups)
    assert (dataset / "10_a" / "1.txt").read_text(encoding="utf-8") == "one"


def test_a_backup_without_a_manifest_that_fits_two_folders_or_none_restores_nothing_and_says_why(tmp_path):
    dataset = _kohya_dataset(tmp_path)
    _pictures(dataset / "10_b" / "1.webp")  # 1.txt now fits 10_a and 10_b alike
    both = _unrecorded_backup(dataset, "2026-12-01_10-00-00", {"1.txt": "one"})
    with pytest.raises(UserError, match=r"fit as well below .*10_a and .*10_b.*copy its files back by hand"):
        caption_files.restore_backup(both, dataset, dataset / ".caption-backups")
    unrelated = _unrecorded_backup(dataset, "2026-12-02_10-00-00", {"notes.md": "mine"})
    with pytest.raises(UserError, match="0 of its 1 files are captions of pictures"):
        caption_files.restore_backup(unrelated, dataset, dataset / ".caption-backups")
    assert {(dataset / name).read_text(encoding="utf-8") for name in ("10_a/1.txt", "10_b/3.txt")} == {"now"}
    assert not (dataset / "10_b" / "1.txt").exists()


def test_a_save_cut_off_before_its_manifest_is_no_backup_to_restore(tmp_path, monkeypatch):
    """A save killed while its backup was kept (its copies made, no manifest yet) was listed as a backup of before
    manifests, the newest, and the default restore put back the captions it had not changed."""
    dataset = _kohya_dataset(tmp_path)
    backups = dataset / ".caption-backups"
    first = write_captions({dataset / "10_a" / "1.txt": "v2"}, backups).backup_folder
    monkeypatch.setattr(caption_files, "_backup_folder", lambda backup_dir: _made(backup_dir / "2099-01-01_00-00-00"))

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(caption_files, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        write_captions({dataset / "10_a" / "1.txt": "v3"}, backups)
    assert (backups / "2099-01-01_00-00-00" / "1.txt").is_file()  # its copy made, its manifest not
    assert caption_files.restorable_backups(backups) == [first]


def test_an_unfinished_mark_that_cannot_be_removed_does_not_fail_the_save(tmp_path, monkeypatch):
    """An antivirus holding the new mark for a moment on Windows: the save failed with a bare PermissionError."""
    dataset = _kohya_dataset(tmp_path)
    real_unlink = Path.unlink

    def held(path, missing_ok=False):
        if path.name == caption_files.UNFINISHED_BACKUP:
            raise PermissionError(13, "The process cannot access the file")
        return real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", held)
    result = write_captions({dataset / "10_a" / "1.txt": "v2"}, dataset / ".caption-backups")
    assert (dataset / "10_a" / "1.txt").read_text(encoding="utf-8") == "v2"
    assert caption_files.restorable_backups(dataset / ".caption-backups") == [result.backup_folder]


def test_a_backup_without_a_manifest_goes_back_only_where_most_of_its_files_fit(tmp_path):
    """Three of alice's four pictures deleted since, bob's folder with pictures 1 and 2: the backup of alice's
    captions was restored over bob's, the folder where the most (two of four) fit."""
    dataset = tmp_path / "set"
    _pictures(dataset / "10_alice" / "4.png", dataset / "5_bob" / "1.png", dataset / "5_bob" / "2.png")
    (dataset / "5_bob" / "1.txt").write_text("bob", encoding="utf-8")
    alice = _unrecorded_backup(dataset, "2026-12-01_10-00-00", {f"{n}.txt": f"alice {n}" for n in "1234"})
    with pytest.raises(UserError, match="2 of its 4 files are captions of pictures in .* \\(more than half must be\\)"):
        caption_files.restore_backup(alice, dataset, dataset / ".caption-backups")
    assert (dataset / "5_bob" / "1.txt").read_text(encoding="utf-8") == "bob"


def test_what_file_browsers_leave_in_a_backup_without_a_manifest_is_not_a_caption(tmp_path):
    dataset = _kohya_dataset(tmp_path)
    backups = dataset / ".caption-backups"
    kept = _unrecorded_backup(dataset, "2026-12-01_10-00-00", {"1.txt": "one", ".DS_Store": "x", "Thumbs.db": "x"})
    _unrecorded_backup(dataset, "2026-12-02_10-00-00", {"desktop.ini": "x"})  # nothing but that: no backup
    assert [(s.name, s.captions) for s in caption_files.backup_summaries(backups)] == [("2026-12-01_10-00-00", 1)]
    restored = caption_files.restore_backup(kept, dataset, backups)
    assert [path.relative_to(dataset).as_posix() for path in restored.restored] == ["10_a/1.txt"]


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need a privilege on Windows")
def test_a_backup_folder_that_is_a_link_leading_elsewhere_is_not_offered(tmp_path):
    """A dataset brings its own .caption-backups: a time-named link to a folder elsewhere was the newest backup, and
    the default restore wrote what that folder held into the dataset."""
    dataset = _kohya_dataset(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "1.txt").write_text("secret", encoding="utf-8")
    (dataset / ".caption-backups").mkdir()
    (dataset / ".caption-backups" / "2099-01-01_00-00-00").symlink_to(elsewhere, target_is_directory=True)
    assert caption_files.restorable_backups(dataset / ".caption-backups") == []
    with pytest.raises(caption_files.BackupNotFound):
        caption_files.backup_named(dataset / ".caption-backups", "2099-01-01_00-00-00")


def test_a_backups_listed_time_is_its_names_however_long_its_copies_take(tmp_path, monkeypatch):
    """The manifest's time was taken after the copies: a save whose copies took a second was listed a second after
    its folder's name (the API's time and name disagreed)."""
    import time as clock

    dataset = _kohya_dataset(tmp_path)
    real_link = os.link

    def slow_link(source, target):
        clock.sleep(1.05)  # 10,000 captions on a slow disk
        return real_link(source, target)

    monkeypatch.setattr(caption_files.os, "link", slow_link)
    write_captions({dataset / "10_a" / "1.txt": "v2"}, dataset / ".caption-backups")
    (listed,) = caption_files.backup_summaries(dataset / ".caption-backups")
    assert listed.time == caption_files.backup_time(listed.name)
