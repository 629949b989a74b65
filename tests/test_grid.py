"""Grid axes: strength lists read like the X/Y/Z plot's, oversized grids need a confirmation, a run's files are found
and ordered by training progress (the grids themselves: test_grid_plan.py)."""

from __future__ import annotations

import shutil

import pytest
from reference import REFERENCE

from lora_trainer.errors import UserError
from lora_trainer.grid.axes import check_size, parse_values, run_files


@pytest.mark.parametrize("text, values", [
    ("0.2-1.0 (+0.2)", [0.2, 0.4, 0.6, 0.8, 1.0]),
    ("0-1 [3]", [0.0, 0.5, 1.0]),
    ("1, -0.5, 1.5", [1.0, -0.5, 1.5]),
    ("1-0 (-0.5)", [1.0, 0.5, 0.0]),
    ("1-3", [1.0, 2.0, 3.0]),  # no step: 1, as the X/Y/Z plot reads it
    ("0-1, 0.5", [0.0, 1.0, 0.5]),
])
def test_strength_lists_and_ranges_read_like_the_xyz_plot(text, values):
    assert parse_values(text) == pytest.approx(values)


def test_bad_axes_are_refused_with_a_reason():
    with pytest.raises(UserError, match="not a number"):
        parse_values("0.5, strong")
    with pytest.raises(UserError, match="step must move"):
        parse_values("0-1 (-0.1)")
    for huge in ("0-1 [1000000000]", "0-1 (+0.000000001)", "0.5, 0-1 [1000]"):  # counted, not built, to be refused
        with pytest.raises(UserError, match="an axis takes at most 1000"):
            parse_values(huge)
    with pytest.raises(UserError, match="confirm"):
        check_size(21, 20)


def test_run_files_are_found_from_any_of_them_and_ordered_by_training_progress(tmp_path):
    for name in ("tinylora-000001.safetensors", "tinylora.safetensors"):
        shutil.copy(REFERENCE / "kohya-fixtures" / "lora-baseline" / name, tmp_path / name)
    shutil.copy(REFERENCE / "kohya-fixtures" / "lora-baseline" / "tinylora.safetensors", tmp_path / "tinylora_other.safetensors")
    files = run_files(tmp_path / "tinylora-000001.safetensors")
    assert [f.path.name for f in files] == ["tinylora-000001.safetensors", "tinylora.safetensors"]
    assert [f.epoch for f in files] == [1, 2] and files[0].label == "epoch 1 (80 steps)"
    assert files[1].label == "epoch 2 (160 steps)"  # sd-scripts' finished run


def test_a_stopped_runs_final_file_is_labelled_as_stopped_early(tmp_path):
    """Stop and save writes the final name: in the grid it must not pass for the finished run."""
    from safetensors.torch import load_file, save_file

    from lora_trainer.safe_io import read_safetensors_metadata

    source = REFERENCE / "kohya-fixtures" / "lora-baseline" / "tinylora.safetensors"
    metadata = {**read_safetensors_metadata(source), "ss_epoch": "1", "ss_steps": "22"}  # of ss_max_train_steps 160
    save_file(load_file(source), str(tmp_path / "tinylora.safetensors"), metadata)
    save_file(load_file(source), str(tmp_path / "tinylora-000001.safetensors"), {**metadata, "ss_steps": "20"})
    labels = [f.label for f in run_files(tmp_path / "tinylora.safetensors")]
    assert labels == ["epoch 1 (20 steps)", "epoch 1 (22 of 160 steps: stopped early)"]


def test_a_step_file_is_labelled_by_its_step_not_by_the_epochs_completed_before_it(tmp_path):
    """sd-scripts saves a step file with ss_epoch = the epochs completed: step 10 of epoch 1 showed as "epoch 0"."""
    for source in (REFERENCE / "kohya-fixtures" / "lora-toml-variant").glob("tinylora_toml*.safetensors"):
        shutil.copy(source, tmp_path / source.name)
    labels = [f.label for f in run_files(tmp_path / "tinylora_toml.safetensors")]
    assert labels == ["step 10", "epoch 1 (20 steps)", "epoch 2 (40 steps)"]


def test_a_final_file_renamed_after_training_keeps_its_epochs(tmp_path):
    """char.safetensors renamed char_v2 (ss_output_name still char) was a run of one file, and each char-00000N a
    run of its own; a later run trained as char (another session) stays apart."""
    from safetensors.torch import load_file, save_file

    from lora_trainer.safe_io import read_safetensors_metadata

    source = REFERENCE / "kohya-fixtures" / "lora-baseline"
    for name, target in (("tinylora-000001", "char-000001"), ("tinylora", "char_v2"), ("tinylora", "char")):
        metadata = {**read_safetensors_metadata(source / f"{name}.safetensors"), "ss_output_name": "char"}
        save_file(load_file(source / f"{name}.safetensors"), str(tmp_path / f"{target}.safetensors"), metadata)
    files = run_files(tmp_path / "char_v2.safetensors")
    assert [(f.path.name, f.label) for f in files] == [("char-000001.safetensors", "epoch 1 (80 steps)"),
                                                       ("char_v2.safetensors", "epoch 2 (160 steps)")]
    later = {**read_safetensors_metadata(source / "tinylora-000001.safetensors"), "ss_output_name": "char",
             "ss_session_id": "2"}
    save_file(load_file(source / "tinylora-000001.safetensors"), str(tmp_path / "char-000003.safetensors"), later)
    assert [f.path.name for f in run_files(tmp_path / "char_v2.safetensors")] == [
        "char-000001.safetensors", "char_v2.safetensors"]


def _copy_with(tmp_path, source_name: str, target: str, **changes) -> None:
    """A kohya fixture saved as ``target`` with its metadata changed (a value of None: the key left out)."""
    from safetensors.torch import load_file, save_file

    from lora_trainer.safe_io import read_safetensors_metadata

    source = REFERENCE / "kohya-fixtures" / "lora-baseline" / f"{source_name}.safetensors"
    metadata = {**read_safetensors_metadata(source), **changes}
    save_file(load_file(source), str(tmp_path / f"{target}.safetensors"),
              {key: value for key, value in metadata.items() if value is not None})


def test_a_file_whose_training_progress_is_unknown_comes_after_those_whose_progress_is_known(tmp_path):
    """A file without ss_steps (its metadata stripped by another tool) cannot be placed among the others: the epoch
    axis puts it after them rather than before the first epoch."""
    _copy_with(tmp_path, "tinylora-000001", "run-000001", ss_steps=None, ss_output_name="run")
    _copy_with(tmp_path, "tinylora-000001", "run-000002", ss_output_name="run", ss_epoch="2", ss_steps="100")
    _copy_with(tmp_path, "tinylora", "run", ss_output_name="run")
    assert [f.path.stem for f in run_files(tmp_path / "run.safetensors")] == ["run-000002", "run", "run-000001"]


def test_a_run_whose_files_all_lack_their_progress_keeps_its_final_file_last(tmp_path):
    """Every file's ss_steps stripped: the final file (the last epoch) came first, before epoch 1, as the file that
    goes first of two at equal steps."""
    for source, target in (("tinylora-000001", "run-000001"), ("tinylora-000001", "run-000002"), ("tinylora", "run")):
        _copy_with(tmp_path, source, target, ss_steps=None, ss_output_name="run")
    assert [f.path.stem for f in run_files(tmp_path / "run.safetensors")] == ["run-000001", "run-000002", "run"]


def test_a_renamed_final_files_run_takes_epoch_files_without_a_session_id_and_not_those_of_another_name(tmp_path):
    """sd-scripts before ss_session_id (early 2023) wrote none: such an epoch file of the name the final file was
    trained under cannot be told apart and stays on its epoch axis; an epoch file renamed into that name from
    another run (its ss_output_name says which) does not."""
    _copy_with(tmp_path, "tinylora", "char_v2", ss_output_name="char")
    _copy_with(tmp_path, "tinylora-000001", "char-000001", ss_output_name="char", ss_session_id=None)
    _copy_with(tmp_path, "tinylora-000001", "char-000002", ss_output_name="dogs", ss_session_id=None, ss_steps="100")
    assert [f.path.stem for f in run_files(tmp_path / "char_v2.safetensors")] == ["char-000001", "char_v2"]


def test_two_grids_saved_in_the_same_second_keep_both(tmp_path, monkeypatch):
    """Grids are named by the time to the second: a second grid from another browser tab or the API in that second
    overwrote the first one and its cells."""
    from PIL import Image

    from lora_trainer.grid import render

    monkeypatch.setattr(render.time, "strftime", lambda pattern: "20261205-120000")
    saved = []
    for colour in ("red", "blue"):
        cell = Image.new("RGB", (8, 8), colour)
        saved.append(render.save_grid(cell, [[cell]], [["Steps: 1"]], tmp_path, colour))
    (first, first_cells), (second, second_cells) = saved
    assert first != second and first_cells[0] != second_cells[0]
    assert Image.open(first).getpixel((0, 0)) == (255, 0, 0) and Image.open(second).getpixel((0, 0)) == (0, 0, 255)
    assert Image.open(first_cells[0]).getpixel((0, 0)) == (255, 0, 0)
