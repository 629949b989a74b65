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
])
def test_strength_lists_and_ranges_read_like_the_xyz_plot(text, values):
    assert parse_values(text) == pytest.approx(values)


def test_bad_axes_are_refused_with_a_reason():
    with pytest.raises(UserError, match="not a number"):
        parse_values("0.5, strong")
    with pytest.raises(UserError, match="step must move"):
        parse_values("0-1 (-0.1)")
    with pytest.raises(UserError, match="confirm"):
        check_size(21, 20)


def test_run_files_are_found_from_any_of_them_and_ordered_by_training_progress(tmp_path):
    for name in ("tinylora-000001.safetensors", "tinylora.safetensors"):
        shutil.copy(REFERENCE / "kohya-fixtures" / "lora-baseline" / name, tmp_path / name)
    shutil.copy(REFERENCE / "kohya-fixtures" / "lora-baseline" / "tinylora.safetensors", tmp_path / "tinylora_other.safetensors")
    files = run_files(tmp_path / "tinylora-000001.safetensors")
    assert [f.path.name for f in files] == ["tinylora-000001.safetensors", "tinylora.safetensors"]
    assert [f.epoch for f in files] == [1, 2] and files[0].label == "epoch 1 (80 steps)"
