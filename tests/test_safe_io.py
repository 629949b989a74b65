"""Atomic writes: a new file replaces the old one whole, or the old one stays, also where Windows holds files open
(a LoRA file, a state folder, captions)."""

from __future__ import annotations

import os

import pytest

from lora_trainer import safe_io
from lora_trainer.errors import UserError


def refuse(monkeypatch, times: int, waits: tuple | None = None) -> list:
    """os.replace fails ``times`` times, as Windows fails it while another program has the target open; ``waits``
    replaces the retry delays (None: this system's own). Returns the list of attempts."""
    real, calls = os.replace, []

    def replace(source, target):
        calls.append(target)
        if len(calls) <= times:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        return real(source, target)

    if waits is not None:
        monkeypatch.setattr(safe_io, "REPLACE_RETRY_SECONDS", waits)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_a_rename_refused_for_a_moment_is_tried_again(tmp_path, monkeypatch):
    """An antivirus scan or the search indexer opens each new file briefly: the save waits it out."""
    target = tmp_path / "star.safetensors"
    target.write_text("old", encoding="utf-8")
    calls = refuse(monkeypatch, 2, waits=(0, 0, 0))
    safe_io.write_text(target, "new")
    assert target.read_text(encoding="utf-8") == "new" and len(calls) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["star.safetensors"]  # no temporary left behind


def test_a_file_held_open_for_good_keeps_the_previous_version_and_says_what_to_do(tmp_path, monkeypatch):
    target = tmp_path / "star.safetensors"
    target.write_text("old", encoding="utf-8")
    calls = refuse(monkeypatch, 100, waits=(0, 0))
    with pytest.raises(UserError, match="star.safetensors could not be replaced .*another program has it open.*"
                                        "previous file is unchanged"):
        safe_io.write_text(target, "new")
    assert len(calls) == 3
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["star.safetensors"]


@pytest.mark.skipif(os.name == "nt", reason="POSIX renames")
def test_where_renames_cannot_be_refused_a_permission_error_is_not_waited_on(tmp_path, monkeypatch):
    """On Linux and macOS an open file never blocks a rename: a refusal is final, so there is no retry."""
    calls = refuse(monkeypatch, 1)
    with pytest.raises(UserError, match="could not be replaced"):
        safe_io.write_text(tmp_path / "a.txt", "new")
    assert len(calls) == 1


def test_captions_wait_out_a_brief_lock_too(tmp_path, monkeypatch):
    from lora_trainer.dataset.caption_files import write_captions

    caption = tmp_path / "a.txt"
    caption.write_text("old", encoding="utf-8")
    calls = refuse(monkeypatch, 1, waits=(0, 0))
    write_captions({caption: "new"}, backup_dir=None)
    assert caption.read_text(encoding="utf-8") == "new" and len(calls) == 2


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_a_saved_lora_is_readable_by_other_users_as_any_new_file_is(tmp_path, umask_022):
    """A WebUI run as another user (a service, a container) must be able to load what the trainer saved: the atomic
    save's temporary file once made every LoRA readable by its owner only."""
    import torch

    saved = safe_io.save_safetensors({"w": torch.ones(2)}, tmp_path / "star.safetensors")
    assert oct(saved.stat().st_mode & 0o777) == oct(0o644)
    safe_io.write_text(tmp_path / "notes.txt", "x")
    assert oct((tmp_path / "notes.txt").stat().st_mode & 0o777) == oct(0o644)


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_a_replaced_file_keeps_the_permissions_it_had(tmp_path, umask_022):
    target = tmp_path / "star.safetensors"
    target.write_text("old", encoding="utf-8")
    target.chmod(0o660)  # shared with a group, kept from other users: the user's choice stays
    safe_io.write_text(target, "new")
    assert target.read_text(encoding="utf-8") == "new"
    assert oct(target.stat().st_mode & 0o777) == oct(0o660)


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_a_read_only_file_is_replaced_and_stays_read_only(tmp_path, umask_022):
    """A user who made a LoRA read-only to protect it can still save over it on purpose (a rename replaces it); the
    new file is writable while it is written (else a non-root writer could not open it) and read-only after."""
    target = tmp_path / "star.safetensors"
    target.write_text("old", encoding="utf-8")
    target.chmod(0o444)
    with safe_io.atomic_path(target) as temporary:
        assert temporary.stat().st_mode & 0o200
        temporary.write_text("new", encoding="utf-8")
    assert target.read_text(encoding="utf-8") == "new"
    assert oct(target.stat().st_mode & 0o777) == oct(0o444)


def test_a_file_name_near_the_length_limit_still_saves(tmp_path):
    """80 CJK characters are 240 bytes: the file itself fits in a name's 255, and its temporary must not fail."""
    import torch

    target = tmp_path / ("星" * 80 + ".safetensors")
    safe_io.save_safetensors({"w": torch.ones(2)}, target)
    safe_io.save_safetensors({"w": torch.zeros(2)}, target)  # replacing it too
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_file_name_that_is_not_utf8_saves_beside_itself(tmp_path):
    """GBK bytes unpacked on Linux: the temporary's name was cut as UTF-8, which cannot encode them, so a caption
    save, a prep or a cached latent beside such a picture failed with a traceback."""
    target = tmp_path / (os.fsdecode("星".encode("gbk")) * 100 + ".txt")  # 200 bytes: cut to fit, whole characters
    try:
        safe_io.write_text(target, "zkstar, gbk")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    assert target.read_text(encoding="utf-8") == "zkstar, gbk" and [p.name for p in tmp_path.iterdir()] == [target.name]
    assert len(os.fsencode(safe_io.temporary_beside(target).name)) <= 255


def test_windows_counts_a_path_in_utf16_units():
    """A CJK character is one unit of Windows' 259, an emoji two: not bytes, not code points."""
    assert safe_io.windows_path_length("/模型/😀.png") == len("/模型/") + 2 + len(".png")


class _Registry:
    """winreg with one LongPathsEnabled value (None: the value is absent, as on a Windows 7 machine)."""
    HKEY_LOCAL_MACHINE = "HKLM"

    def __init__(self, value):
        self.value, self.asked = value, []

    def OpenKey(self, root, key):  # noqa: N802 - winreg's names
        import contextlib

        self.asked.append(f"{root}\\{key}")
        return contextlib.nullcontext()

    def QueryValueEx(self, key, name):  # noqa: N802
        if self.value is None:
            raise FileNotFoundError(name)
        return self.value, 4


@pytest.mark.parametrize("value, limits", [(1, None), (0, (259, 247)), (None, (259, 247))])
def test_windows_limits_paths_unless_long_paths_are_enabled(monkeypatch, value, limits):
    import sys

    registry = _Registry(value)
    monkeypatch.setitem(sys.modules, "winreg", registry)
    with monkeypatch.context() as windows:  # only around the call: pathlib consults os.name too
        windows.setattr(os, "name", "nt")
        found = safe_io.windows_path_limits()
    assert found == limits
    assert registry.asked == ["HKLM\\SYSTEM\\CurrentControlSet\\Control\\FileSystem"]
    assert safe_io.windows_path_limits() is None  # Linux and macOS: no such limit


def test_a_hash_cache_another_process_is_writing_is_only_a_cache(tmp_path, monkeypatch):
    """The WebUI and the trainer both keep hashes.json: on Windows a rename refused for good stopped the run as it
    started (the model's hash for ss_new_sd_model_hash) instead of leaving the cache unwritten."""
    from lora_trainer import hashing

    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "hashes.json").write_text("{}", encoding="utf-8")
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    refuse(monkeypatch, 100, waits=(0,))
    assert hashing.file_sha256(model) == "9a129038d9a00aed0cf6a7ea059ca50a813449061ab87848cf1a13eafdf33b2c"
    assert (tmp_path / "cache" / "hashes.json").read_text(encoding="utf-8") == "{}"
