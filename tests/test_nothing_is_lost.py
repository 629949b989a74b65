"""What "nothing is lost" promises, checked where a mutation review found no test watching: saves reach the disk before
they replace a file, a failed save leaves no caption changed and no temporary behind, backups keep their text and
go back where they belong, drafts and runs' files are kept."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lora_trainer import safe_io
from lora_trainer.dataset import caption_files
from lora_trainer.dataset.caption_files import load_caption_file, restorable_backups, restore_backup, write_captions
from lora_trainer.errors import UserError


def _pictures(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # only its name matters to a restore


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True)
    return folder


def _files_in(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def _syncs_and_renames(monkeypatch) -> list[tuple[str, int]]:
    """Records, in order, each fsync (the file's inode) and each rename (its source's inode, or a folder's files')."""
    real_fsync, real_replace, happened = os.fsync, os.replace, []

    def fsync(descriptor):
        happened.append(("sync", os.fstat(descriptor).st_ino))
        return real_fsync(descriptor)

    def replace(source, target):
        source = Path(source)
        for path in ([*source.iterdir()] if source.is_dir() else [source]):
            happened.append(("rename", path.stat().st_ino))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return happened


def _synced_before_renamed(happened: list[tuple[str, int]]) -> bool:
    synced = set()
    for kind, inode in happened:
        if kind == "sync":
            synced.add(inode)
        elif inode not in synced:
            return False
    return any(kind == "rename" for kind, _ in happened)


# --- safe_io ---------------------------------------------------------------------------------------------------------

def test_a_saved_file_reaches_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """A power cut right after the rename must find the new file whole, not empty: it is flushed to disk first."""
    target = tmp_path / "star.safetensors"
    target.write_text("old", encoding="utf-8")
    happened = _syncs_and_renames(monkeypatch)
    safe_io.write_text(target, "new")
    assert target.read_text(encoding="utf-8") == "new" and _synced_before_renamed(happened)


def test_a_save_cut_off_midway_leaves_the_previous_lora_whole(tmp_path, monkeypatch):
    """A full disk (or a kill) halfway through writing: the file the WebUI loads is the previous one, byte for byte,
    and no half-written file is left beside it."""
    import safetensors.torch
    import torch

    target = tmp_path / "star.safetensors"
    safe_io.save_safetensors({"w": torch.ones(4)}, target)
    before = target.read_bytes()

    def fills_the_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fills_the_disk)
    with pytest.raises(OSError, match="No space left"):
        safe_io.save_safetensors({"w": torch.zeros(4)}, target)
    assert target.read_bytes() == before and _files_in(tmp_path) == ["star.safetensors"]


def test_checking_that_an_output_folder_is_writable_leaves_nothing_in_it(tmp_path):
    """The probe file is hidden on Linux only: Windows' Explorer shows a ``.write-test-…`` left in the Lora folder."""
    safe_io.check_writable(tmp_path / "Lora", "output folder", "--output_dir")
    assert list((tmp_path / "Lora").iterdir()) == []


def test_a_caption_name_too_long_for_the_file_system_fails_the_save_without_leaving_a_temporary(tmp_path):
    """``photo.png`` of 255 bytes has a ``.caption`` name of 259: the save is refused whole, and the hidden
    temporary (whose name is cut to fit) does not stay behind in the dataset."""
    image = tmp_path / ("p" * 251 + ".png")
    _pictures(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("a", encoding="utf-8")
    caption = caption_files.caption_path_for(image, ".caption")
    with pytest.raises(UserError, match="no caption was changed"):
        write_captions({tmp_path / "a.caption": "new a", caption: "new"}, tmp_path / ".caption-backups")
    assert _files_in(tmp_path) == ["a.caption", "a.png"]
    assert (tmp_path / "a.caption").read_text(encoding="utf-8") == "a"


def test_a_path_below_any_of_the_allowed_folders_is_allowed(tmp_path):
    """The WebUI allows several folders (its Lora folder, the datasets' root …): a caption below the second one saves."""
    first, second = tmp_path / "loras", tmp_path / "datasets"
    first.mkdir()
    _pictures(second / "set" / "a.png")
    result = write_captions({second / "set" / "a.txt": "zk"}, second / "set" / ".caption-backups", within=[first, second])
    assert (second / "set" / "a.txt").read_text(encoding="utf-8") == "zk" and result.backup_folder is not None
    assert safe_io.resolves_below(second / "set", [first, second]) and not safe_io.resolves_below(tmp_path, [first, second])


def test_a_log_folder_given_from_here_is_one_windows_can_make():
    """``.`` and ``..`` name no folder of their own; a part ending in a dot is another thing (Windows drops the dot)."""
    assert safe_io.windows_can_make("./logs/run") and safe_io.windows_can_make("runs/../logs")
    assert not safe_io.windows_can_make("runs./logs")


# --- caption saves ---------------------------------------------------------------------------------------------------

def test_captions_reach_the_disk_before_they_replace_the_old_ones(tmp_path, monkeypatch):
    files = {tmp_path / f"{name}.txt": name for name in ("a", "b", "c")}
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    happened = _syncs_and_renames(monkeypatch)
    write_captions({path: f"new {text}" for path, text in files.items()}, None)
    assert all(path.read_text(encoding="utf-8") == f"new {text}" for path, text in files.items())
    assert _synced_before_renamed(happened)


def test_an_edit_elsewhere_of_the_same_length_still_blocks_the_save(tmp_path):
    """Another tool changed "cat" to "dog" since the tag editor read it: the same size, another text."""
    caption = tmp_path / "a.txt"
    caption.write_text("cat", encoding="utf-8")
    stamp = load_caption_file(caption).stamp
    caption.write_text("dog", encoding="utf-8")
    os.utime(caption, ns=(stamp.mtime_ns, stamp.mtime_ns))  # a file system with coarse times: the same time too
    with pytest.raises(UserError, match="changed on disk since they were read, so nothing was saved"):
        write_captions({caption: "bird"}, tmp_path / ".caption-backups", {caption: stamp})
    assert caption.read_text(encoding="utf-8") == "dog"


def test_a_backup_folder_that_cannot_be_made_changes_no_caption_and_leaves_no_temporary(tmp_path):
    caption, backups = tmp_path / "a.txt", tmp_path / "backups"
    caption.write_text("old", encoding="utf-8")
    backups.write_text("a file where the backups' folder should be", encoding="utf-8")
    with pytest.raises(UserError, match=f"Could not create a backup folder in {backups}.*no caption was changed"):
        write_captions({caption: "new"}, backups)
    assert caption.read_text(encoding="utf-8") == "old" and _files_in(tmp_path) == ["a.txt", "backups"]


def test_a_caption_that_cannot_be_replaced_is_said_with_the_backup_that_undoes_the_others(tmp_path, monkeypatch):
    """One rename refused for good (a file held open on Windows) after the others succeeded: the save says so and
    where the previous versions are, and leaves no temporary beside the caption it could not replace."""
    dataset, backups = tmp_path / "set", tmp_path / "set" / ".caption-backups"
    _pictures(dataset / "a.png", dataset / "b.png")
    for name in "ab":
        (dataset / f"{name}.txt").write_text(f"old {name}", encoding="utf-8")
    real_replace = os.replace

    def b_held(source, target):
        if Path(target).name == "b.txt":
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", b_held)
    monkeypatch.setattr(safe_io, "REPLACE_RETRY_SECONDS", ())
    with pytest.raises(UserError, match=r"Could not replace 1 of 2 captions .*the previous versions are in .*restoring "
                                        "that backup puts them back"):
        write_captions({dataset / "a.txt": "new a", dataset / "b.txt": "new b"}, backups)
    monkeypatch.undo()
    assert [(dataset / f"{name}.txt").read_text(encoding="utf-8") for name in "ab"] == ["new a", "old b"]
    assert not [path for path in dataset.iterdir() if path.name.endswith(".tmp")]
    restore_backup(restorable_backups(backups)[0], dataset, backups)
    assert [(dataset / f"{name}.txt").read_text(encoding="utf-8") for name in "ab"] == ["old a", "old b"]


def test_a_save_interrupted_while_writing_changes_no_caption_and_leaves_no_temporary(tmp_path, monkeypatch):
    """Ctrl-C in the command line's ``dataset tags`` while the new texts are written."""
    files = {tmp_path / f"{name}.txt": name for name in ("a", "b")}
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")

    def interrupted(descriptor):
        raise KeyboardInterrupt

    monkeypatch.setattr(caption_files.os, "fsync", interrupted)
    with pytest.raises(UserError):  # the writers' threads hand it on as a failure
        write_captions({path: "new" for path in files}, None)
    monkeypatch.undo()
    assert _files_in(tmp_path) == ["a.txt", "b.txt"]
    assert [path.read_text(encoding="utf-8") for path in files] == ["a", "b"]


def test_a_manifest_that_cannot_be_written_leaves_no_backup_folder_behind(tmp_path, monkeypatch):
    caption, backups = tmp_path / "a.txt", tmp_path / ".caption-backups"
    caption.write_text("old", encoding="utf-8")

    def full_disk(target, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(caption_files, "write_text", full_disk)
    with pytest.raises(UserError, match="Could not write the backup's manifest .*no caption was changed"):
        write_captions({caption: "new"}, backups)
    assert caption.read_text(encoding="utf-8") == "old" and list(backups.iterdir()) == []


@pytest.mark.skipif(os.name == "nt", reason="hard links and editing in place as on Linux")
def test_the_backup_of_a_caption_with_other_names_keeps_its_text_when_those_are_edited_in_place(tmp_path):
    """A caption hard-linked into another dataset: a backup that linked it too would change with that other name."""
    dataset, other = tmp_path / "set", tmp_path / "other.txt"
    _pictures(dataset / "a.png")
    other.write_text("shared v1", encoding="utf-8")
    os.link(other, dataset / "a.txt")
    result = write_captions({dataset / "a.txt": "own"}, dataset / ".caption-backups")
    with open(other, "r+", encoding="utf-8") as in_place:  # as an editor that writes in place saves it
        in_place.write("shared v2")
    assert (result.backup_folder / "a.txt").read_text(encoding="utf-8") == "shared v1"
    restore_backup(result.backup_folder, dataset, dataset / ".caption-backups")
    assert (dataset / "a.txt").read_text(encoding="utf-8") == "shared v1"


def test_a_dataset_moved_with_its_backups_restores_in_its_new_place(tmp_path):
    old, new = tmp_path / "old" / "set", tmp_path / "new" / "set"
    _pictures(old / "sub" / "a.png")
    (old / "sub" / "a.txt").write_text("before", encoding="utf-8")
    write_captions({old / "sub" / "a.txt": "after"}, old / ".caption-backups")
    new.parent.mkdir()
    shutil.move(old, new)
    restored = restore_backup(restorable_backups(new / ".caption-backups")[0], new, new / ".caption-backups")
    assert restored.restored == (new / "sub" / "a.txt",)
    assert (new / "sub" / "a.txt").read_text(encoding="utf-8") == "before"


def test_a_restore_never_writes_into_another_backup(tmp_path):
    """Backups kept in a visible folder of the dataset: a crafted manifest naming a file of another backup (beside a
    picture there) would overwrite that backup's text, the undo of another save."""
    dataset, backups = tmp_path / "set", tmp_path / "set" / "backups"
    _pictures(dataset / "a.png")
    (dataset / "a.txt").write_text("v1", encoding="utf-8")
    first = write_captions({dataset / "a.txt": "v2"}, backups).backup_folder
    second = write_captions({dataset / "a.txt": "v3"}, backups).backup_folder
    _pictures(first / "a.png")
    manifest = second / caption_files.BACKUP_MANIFEST
    crafted = json.loads(manifest.read_text(encoding="utf-8"))
    crafted["files"] = {"a.txt": f"../{first.name}/a.txt"}
    manifest.write_text(json.dumps(crafted), encoding="utf-8")
    with pytest.raises(UserError, match="which is not a caption of .*nothing was restored"):
        restore_backup(second, dataset, backups)
    assert (first / "a.txt").read_text(encoding="utf-8") == "v1"


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need a privilege on Windows")
def test_a_backup_file_that_is_a_link_leading_outside_the_backup_is_never_read(tmp_path):
    """A shared dataset bringing its own backups: a "backup" linked to a file elsewhere would copy that file's text
    into the dataset, where the API reads it."""
    dataset, secret = tmp_path / "set", tmp_path / "secret.txt"
    secret.write_text("token", encoding="utf-8")
    _pictures(dataset / "a.png")
    (dataset / "a.txt").write_text("before", encoding="utf-8")
    backup = write_captions({dataset / "a.txt": "after"}, dataset / ".caption-backups").backup_folder
    (backup / "a.txt").unlink()
    (backup / "a.txt").symlink_to(secret)
    with pytest.raises(UserError, match="which is not in the backup: nothing was restored"):
        restore_backup(backup, dataset, dataset / ".caption-backups")
    assert (dataset / "a.txt").read_text(encoding="utf-8") == "after"


def test_a_restore_removes_only_created_captions_of_pictures(tmp_path):
    """A crafted manifest listing the dataset's notes.txt as a caption its save created: the restore leaves it."""
    dataset = tmp_path / "set"
    _pictures(dataset / "a.png")
    (dataset / "a.txt").write_text("before", encoding="utf-8")
    (dataset / "notes.txt").write_text("mine", encoding="utf-8")
    backup = write_captions({dataset / "a.txt": "after"}, dataset / ".caption-backups").backup_folder
    manifest = backup / caption_files.BACKUP_MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text(encoding="utf-8")), "created": ["../../notes.txt"]}),
                        encoding="utf-8")
    restored = restore_backup(backup, dataset, dataset / ".caption-backups")
    assert restored.removed == () and (dataset / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert (dataset / "a.txt").read_text(encoding="utf-8") == "before"


@pytest.mark.skipif(not hasattr(time, "tzset"), reason="time zones set by TZ")
def test_in_the_hour_repeated_when_clocks_go_back_the_later_save_is_listed_first(tmp_path, monkeypatch):
    """01:30 summer time, then 01:10 winter time 40 minutes later: the later save is the newest, whatever the clock
    on the wall said."""
    monkeypatch.setenv("TZ", "EST5EDT,M3.2.0,M11.1.0")
    time.tzset()
    try:
        caption, backups = tmp_path / "a.txt", tmp_path / ".caption-backups"
        caption.write_text("v0", encoding="utf-8")
        summer = datetime(2026, 11, 1, 5, 30, tzinfo=timezone.utc)  # 01:30 EDT
        for number, moment in enumerate((summer, summer + timedelta(minutes=40)), start=1):  # 01:10 EST
            class At(datetime):
                @classmethod
                def now(cls, tz=None, moment=moment):
                    return moment.astimezone(tz) if tz else moment.astimezone().replace(tzinfo=None)

            monkeypatch.setattr(caption_files, "datetime", At)
            folder = backups / f"save-{number}"  # names apart from times: only the recorded times order them
            monkeypatch.setattr(caption_files, "_backup_folder", lambda backup_dir, folder=folder: _made(folder))
            write_captions({caption: f"v{number}"}, backups)
        assert [folder.name for folder in restorable_backups(backups)] == ["save-2", "save-1"]
    finally:
        monkeypatch.undo()
        time.tzset()


# --- tag-editor drafts -----------------------------------------------------------------------------------------------

def test_a_draft_whose_caption_is_not_text_is_refused_as_malformed_not_a_crash_on_opening(tmp_path):
    from lora_trainer.dataset import tag_drafts

    data = {"tag_editor_draft": tag_drafts.DRAFT_FORMAT, "folder": str(tmp_path), "recursive": False,
            "caption_extension": ".txt", "saved_at": "2026-12-05T10:00:00+00:00",
            "images": [{"name": "a.png", "caption": 5, "caption_file": {"exists": False}}]}
    with pytest.raises(ValueError, match="a field is missing or malformed .*not text"):
        tag_drafts.draft_from_data(data)


# --- a run's outputs -------------------------------------------------------------------------------------------------

def test_an_earlier_runs_step_files_and_their_cards_are_its_files_too(tmp_path):
    """What a new job of the same name moves aside instead of overwriting: step files as well as epoch files."""
    from lora_trainer.training.outputs import files_of_run

    names = ["run-step00000050.safetensors", "run-step00000050.preview.png", "run-000001.safetensors", "run.safetensors",
             "run.json"]
    for name in names + ["run-step00000060.png", "runner.safetensors"]:  # a picture of no saved step; another run
        (tmp_path / name).write_bytes(b"")
    assert [path.name for path in files_of_run(tmp_path, "run")] == sorted(names)



def _plan(tmp_path: Path, **options):
    from lora_trainer.training.options import options_from
    from lora_trainer.training.outputs import OutputPlan

    return OutputPlan(options_from({"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d",
                                    "output_dir": str(tmp_path), "output_name": "star", **options}))


def test_a_run_without_save_state_leaves_an_earlier_runs_step_states_alone(tmp_path):
    """--save_last_n_steps prunes the states this run writes: an earlier run's, resumable, are not this run's."""
    plan = _plan(tmp_path, save_every_n_steps=10, save_last_n_steps=1)
    for step in (10, 20, 30):
        plan.step_path(step).write_bytes(b"")
        plan.state_path(None, step).mkdir()  # an earlier run's, with --save_state
        plan.prune_steps(step)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "star-step00000010-state", "star-step00000020-state", "star-step00000030-state", "star-step00000030.safetensors"]


def test_the_state_a_save_cut_off_between_its_renames_left_is_kept_at_the_next_start(tmp_path):
    """``<state>.old`` alone is the state --resume reads (the new one never got its name): only an ``.old`` beside a
    whole state is a leftover."""
    plan = _plan(tmp_path)
    for folder in ("star-000001-state.old", "star-000002-state.old", "star-000002-state"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.safetensors").write_bytes(b"x" * 1024)
    long_ago = time.time() - 3600
    for path in tmp_path.rglob("*"):
        os.utime(path, (long_ago, long_ago))
    assert "star-000002-state.old" in plan.remove_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["star-000001-state.old", "star-000002-state"]


def test_a_sample_image_being_drawn_when_the_run_was_killed_leaves_no_temporary_at_the_next_start(tmp_path):
    """A trainer killed (SIGKILL) while writing a sample image left its hidden temporary in the samples folder for
    good; only this run's are removed (another run's, a file of the user's stay), and none being written now."""
    plan = _plan(tmp_path)
    folder = tmp_path / "sample"
    folder.mkdir()
    ours = [folder / ".star_e000001_00_20261205120000_7.png.0a1b2c3d.tmp",
            folder / ".star_000050_01_20261205120000.png.ffffffff.tmp",
            folder / ".star_1000000_104_20261205120000_-3.png.0a1b2c3d.tmp"]  # the 105th prompt, its seed -3
    others = [folder / ".other_e000001_00_20261205120000_7.png.0a1b2c3d.tmp",
              folder / "star_e000001_00_20261205120000_7.png", folder / ".star_notes.txt.0a1b2c3d.tmp"]
    for path in [*ours, *others]:
        path.write_bytes(b"x" * 2048)
    long_ago = time.time() - 3600
    for path in [*ours, *others]:
        os.utime(path, (long_ago, long_ago))
    fresh = folder / ".star_e000002_00_20261205120000_7.png.12345678.tmp"  # a twin run drawing now
    fresh.write_bytes(b"x")
    said = plan.remove_leftovers()
    assert said.startswith("removed what a run named 'star' left when it was killed while saving or drawing samples: ")
    assert all(path.name in said for path in ours)
    assert sorted(folder.iterdir()) == sorted([*others, fresh])


@pytest.mark.parametrize("name, index, seed", [("模" * 66 + "ab", 0, -2147483648), ("模" * 66 + "ab", 104, 4294967295),
                                               ("模" * 66 + "ab", 0, 2**64 - 1)])  # cut in .png, .png, the seed
def test_a_sample_temporary_whose_long_name_was_cut_to_fit_is_removed_at_the_next_start_and_only_ours(
        tmp_path, name, index, seed):
    """A long CJK output name and a long seed (or the 105th prompt): the temporary of a sample image holds only the
    beginning of the image's name (temporary_beside cuts it to 255 bytes), which the clean-up did not match: a run
    killed while drawing it left it for good."""
    from lora_trainer.training.samples import sample_path

    plan = _plan(tmp_path, output_name=name)
    plan.sample_folder.mkdir()
    sample = sample_path(plan.sample_folder, name, index, seed, 1, 0)
    ours = [safe_io.temporary_beside(sample, "0a1b2c3d"),
            safe_io.temporary_beside(sample_path(plan.sample_folder, name, index, seed, None, 50), "ffffffff")]
    assert len(os.fsencode(sample.name)) <= 255 and ".png." not in ours[0].name  # cut
    another = name[:-1] + "星"  # another run's name, as long: its temporaries are cut as ours are
    others = [safe_io.temporary_beside(sample_path(plan.sample_folder, another, index, seed, 1, 0), "0a1b2c3d"),
              safe_io.temporary_beside(plan.sample_folder / f"{name}_e000001_00_notes of the user's.txt", "0a1b2c3d")]
    long_ago = time.time() - 3600
    for path in [*ours, *others]:
        path.write_bytes(b"x" * 2048)
        os.utime(path, (long_ago, long_ago))
    said = plan.remove_leftovers()
    assert said and all(path.name in said for path in ours)
    assert sorted(plan.sample_folder.iterdir()) == sorted(others)


def test_a_state_being_written_by_a_twin_run_is_not_removed_as_a_leftover(tmp_path):
    """The same job started twice by mistake: the second must not delete the first one's state while it is saved."""
    plan = _plan(tmp_path)
    (tmp_path / "star-000001-state.tmp").mkdir()
    (tmp_path / "star-000001-state.tmp" / "model.safetensors").write_bytes(b"x")
    assert plan.remove_leftovers() is None and (tmp_path / "star-000001-state.tmp" / "model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["ckpt", "pt"])
def test_a_ckpt_save_cut_off_midway_leaves_the_previous_file_whole(tmp_path, monkeypatch, kind):
    import torch

    class Network:
        def __init__(self, value):
            self.value = value

        def file_tensors(self):
            return {"lora_unet_x.alpha": torch.tensor(self.value)}

    plan = _plan(tmp_path, save_model_as=kind)
    target = plan.save(Network(1.0), plan.final_path(), {})
    before = target.read_bytes()
    real_save = torch.save

    def fills_the_disk(data, path):
        real_save(data, path)
        Path(path).write_bytes(Path(path).read_bytes()[:20])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(OSError, match="No space left"):
        plan.save(Network(2.0), target, {})
    assert target.read_bytes() == before and _files_in(tmp_path) == [target.name]

# --- resumable states ------------------------------------------------------------------------------------------------

@pytest.fixture
def kept_random_streams():
    """``load_state`` sets the process's random streams (torch's, Python's, numpy's): the next tests get theirs back."""
    import random

    import numpy as np
    import torch

    streams = torch.get_rng_state(), random.getstate(), np.random.get_state()
    yield
    torch.set_rng_state(streams[0])
    random.setstate(streams[1])
    np.random.set_state(streams[2])


def _training_parts(value: float = 1.0):
    """A network, its optimizer, scheduler and generator, as ``save_state`` takes them (no model loaded)."""
    import torch

    from lora_trainer.training.trainer import RunState

    network = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    network(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # moments to keep
    torch.nn.init.constant_(network.weight, value)  # which save a state holds
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator().manual_seed(3)
    return network, optimizer, scheduler, generator, RunState(epoch=1, step=8)


def _state_weight(folder: Path) -> float:
    from safetensors.torch import load_file

    return float(load_file(str(folder / "model.safetensors"))["weight"][0, 0])


def test_a_state_reaches_the_disk_before_it_replaces_the_previous_one(tmp_path, monkeypatch):
    """A power cut right after the save must leave a state that resumes, not empty files under the state's name."""
    from lora_trainer.training.state import save_state

    folder, happened = tmp_path / "star-000001-state", _syncs_and_renames(monkeypatch)
    save_state(folder, *_training_parts(1.0))
    save_state(folder, *_training_parts(2.0))  # the first moved aside, the second renamed into place
    assert _state_weight(folder) == 2.0 and _synced_before_renamed(happened)


def test_saving_a_state_again_leaves_only_the_new_one(tmp_path):
    """The previous state is moved aside while the new one is renamed into place, then removed: no ``.old`` twin
    the size of the network stays beside each state saved twice (a stop's, then the end's)."""
    from lora_trainer.training.state import save_state

    folder = tmp_path / "star-state"
    save_state(folder, *_training_parts(1.0))
    save_state(folder, *_training_parts(2.0))
    assert [path.name for path in tmp_path.iterdir()] == ["star-state"] and _state_weight(folder) == 2.0


def test_what_a_save_killed_just_before_left_does_not_stop_the_next_save(tmp_path):
    """A run killed while saving and resumed at once (its leftovers are fresh, so they are not removed at the start):
    its staging folder and the previous state's ``.old`` beside a whole state are written over, not tripped on."""
    from lora_trainer.training.state import save_state

    folder = tmp_path / "star-000001-state"
    save_state(folder, *_training_parts(1.0))
    for leftover in ("star-000001-state.tmp", "star-000001-state.old"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_bytes(b"half")
    save_state(folder, *_training_parts(2.0))
    assert [path.name for path in tmp_path.iterdir()] == ["star-000001-state"] and _state_weight(folder) == 2.0


def test_a_state_save_that_fails_midway_keeps_the_previous_state_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    from lora_trainer.training import state
    from lora_trainer.training.state import save_state, state_kind

    folder = tmp_path / "star-000001-state"
    save_state(folder, *_training_parts(1.0))

    def fills_the_disk(data, path):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state.torch, "save", fills_the_disk)
    with pytest.raises(OSError, match="No space left"):
        save_state(folder, *_training_parts(2.0))
    monkeypatch.undo()
    assert [path.name for path in tmp_path.iterdir()] == ["star-000001-state"]
    assert state_kind(folder) == "ours" and _state_weight(folder) == 1.0


def test_a_resumed_state_continues_torchs_own_random_stream(tmp_path, kept_random_streams):
    """Network dropout (--network_dropout, rank and module dropout) draws from torch's global generator: a run
    resumed with another stream would train other masks than the uninterrupted one."""
    import torch

    from lora_trainer.training.state import load_state, save_state

    parts = _training_parts()
    torch.manual_seed(5)
    save_state(tmp_path / "state", *parts)
    uninterrupted = torch.rand(4)
    torch.manual_seed(6)  # the resumed process starts from its own seed
    load_state(tmp_path / "state", *parts[:4])
    assert torch.equal(torch.rand(4), uninterrupted)


def test_a_resumed_state_continues_the_learning_rate_schedule(tmp_path, kept_random_streams):
    """A cosine schedule resumed at step 8 goes on from step 8's rate, not from the warm start of step 0."""
    import torch

    from lora_trainer.training.state import load_state, save_state

    def cosine(parts):
        return torch.optim.lr_scheduler.CosineAnnealingLR(parts[1], T_max=16)

    saved = _training_parts()
    scheduler = cosine(saved)
    for _ in range(8):
        saved[1].step()
        scheduler.step()
    save_state(tmp_path / "state", saved[0], saved[1], scheduler, *saved[3:])
    resumed = _training_parts()
    resumed_scheduler = cosine(resumed)
    load_state(tmp_path / "state", resumed[0], resumed[1], resumed_scheduler, resumed[3])
    for _ in range(3):
        for optimizer, stepped in ((saved[1], scheduler), (resumed[1], resumed_scheduler)):
            optimizer.step()
            stepped.step()
        assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_a_save_killed_before_it_removed_the_previous_state_resumes_from_the_new_one(tmp_path):
    """Killed after the new state got its name, before ``<state>.old`` was removed: both are whole, and --resume
    takes the newer, the one the run's events said was saved."""
    from lora_trainer.training.state import readable_state, save_state

    folder = tmp_path / "star-000001-state"
    save_state(tmp_path / "previous", *_training_parts(1.0))
    save_state(folder, *_training_parts(2.0))
    os.replace(tmp_path / "previous", tmp_path / "star-000001-state.old")
    assert _state_weight(readable_state(folder)) == 2.0


def test_a_state_an_antivirus_scan_holds_keeps_the_previous_one_under_its_own_name(tmp_path, monkeypatch):
    """The new state cannot be renamed into place: the previous one is put back where --resume and the job's Resume
    look for it, and the save says so."""
    from lora_trainer.training import state
    from lora_trainer.training.state import save_state

    folder = tmp_path / "star-state"
    save_state(folder, *_training_parts(1.0))
    real_replace = safe_io.replace_path

    def new_state_held(source, target, waits=None):
        if Path(source).name.endswith(".tmp"):
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        return real_replace(source, target, waits)

    monkeypatch.setattr(state, "replace_path", new_state_held)
    with pytest.raises(UserError, match="star-state could not be put in place .*the previous state is kept$"):
        save_state(folder, *_training_parts(2.0))
    assert [path.name for path in tmp_path.iterdir()] == ["star-state"] and _state_weight(folder) == 1.0
