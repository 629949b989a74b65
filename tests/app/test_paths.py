"""Paths from forms and requests stay inside the configured roots, whatever ``..`` or symlinks say."""

from __future__ import annotations

import os

import pytest

from lora_trainer.app.paths import PathNotAllowed, allowed_path, plain_name
from lora_trainer.errors import UserError


@pytest.fixture
def roots(tmp_path):
    datasets = tmp_path / "datasets"
    (datasets / "我的 数据集").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    return [datasets]


def test_a_folder_inside_a_root_is_accepted_with_spaces_and_cjk(roots):
    assert allowed_path(roots[0] / "我的 数据集", roots, "train_data_dir") == (roots[0] / "我的 数据集").resolve()


def test_dot_dot_and_absolute_paths_outside_the_roots_are_refused_naming_the_field(roots, tmp_path):
    for escape in (roots[0] / ".." / "secret", tmp_path / "secret"):
        with pytest.raises(PathNotAllowed, match="train_data_dir: .* is outside the allowed folders") as refused:
            allowed_path(escape, roots, "train_data_dir")
        assert refused.value.field == "train_data_dir"
        assert "Settings → LoRA Trainer" in str(refused.value) and "--dataset-root" in str(refused.value)  # WebUI, standalone


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks on this system")
def test_a_symlink_inside_a_root_that_points_outside_is_refused(roots, tmp_path):
    link = roots[0] / "looks-inside"
    link.symlink_to(tmp_path / "secret", target_is_directory=True)
    with pytest.raises(PathNotAllowed, match="outside the allowed folders"):
        allowed_path(link, roots, "train_data_dir")


def test_missing_paths_say_so_unless_they_are_outputs_to_create(roots):
    with pytest.raises(PathNotAllowed, match="does not exist"):
        allowed_path(roots[0] / "nope", roots, "train_data_dir")
    assert allowed_path(roots[0] / "new out", roots, "output_dir", must_exist=False).name == "new out"


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "CON", "nul.txt", "x:y", "trailing.", ".hidden", "",
                                  "NUL .safetensors", "conin$", "COM¹", "lpt9.png"])  # device names Windows opens as such
def test_names_that_are_not_plain_file_names_on_windows_or_linux_are_refused(name):
    with pytest.raises(PathNotAllowed, match="not a plain file name|empty; type a name"):
        plain_name(name)


def test_plain_names_pass_unchanged():
    assert plain_name(" 星 star-v2_final ") == "星 star-v2_final"


def test_a_missing_path_outside_the_roots_reads_as_outside_so_requests_cannot_probe_the_disk(roots, tmp_path):
    with pytest.raises(PathNotAllowed, match="outside the allowed folders"):
        allowed_path(tmp_path / "secret" / "no such file", roots, "train_data_dir")


def test_a_path_pasted_with_windows_explorers_quotes_is_read_without_them(roots):
    """Explorer's "Copy as path" gives "D:\\datasets\\my set" with its double quotes."""
    folder = roots[0] / "我的 数据集"
    assert allowed_path(f' "{folder}" ', roots, "dataset folder") == folder.resolve()
    with pytest.raises(PathNotAllowed, match="dataset folder: no path given"):
        allowed_path('""', roots, "dataset folder")


def test_a_path_holding_a_nul_character_is_refused_naming_the_field(roots):
    """A request's path with a NUL (``"/data\\u0000x"`` in a JSON body) ended in a 500 from the file system's call."""
    with pytest.raises(UserError, match="train_data_dir: a path cannot hold a NUL character") as refused:
        allowed_path(f"{roots[0]}\x00x", roots, "train_data_dir")
    assert refused.value.field == "train_data_dir" and not isinstance(refused.value, PathNotAllowed)
