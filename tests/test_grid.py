"""Epoch × strength grids: the run's files are found and ordered, every cell shares the seed, strength 0 is the base."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from reference import REFERENCE, TINY_KOHYA_CHECKPOINT

from lora_trainer.errors import UserError
from lora_trainer.grid.axes import check_size, parse_values, run_files
from lora_trainer.grid.render import epoch_strength_grid
from lora_trainer.models.checkpoint import load_checkpoint
from lora_trainer.sampling.txt2img import GenerationSettings


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


def test_grid_cells_share_the_seed_and_strength_zero_equals_the_base_image(tmp_path):
    model = load_checkpoint(TINY_KOHYA_CHECKPOINT, dtype=torch.float32)
    files = run_files(REFERENCE / "kohya-fixtures" / "lora-baseline" / "tinylora.safetensors")
    settings = GenerationSettings("shapes, red circle", steps=3, sampler="Euler", seed=5, width=64, height=64, cfg_scale=5)
    result = epoch_strength_grid(model, settings, files, [0.0, 1.0], out=tmp_path)
    assert len(result.cells) == 2 and all(len(row) == 3 for row in result.cells)
    arrays = [[np.asarray(c) for c in row] for row in result.cells]
    for row in arrays:
        assert np.array_equal(row[0], arrays[0][0])  # the baseline column is one image
        assert np.array_equal(row[1], row[0])  # strength 0 changes nothing
    assert not np.array_equal(arrays[1][2], arrays[1][0])
    assert result.path.is_file() and len(result.cell_paths) == 6
    assert result.image.size[0] > 3 * 64 and result.image.size[1] > 2 * 64
    weights_after = {k: v.clone() for k, v in model.unet.state_dict().items()}
    fresh = load_checkpoint(TINY_KOHYA_CHECKPOINT, dtype=torch.float32)
    assert all(torch.equal(weights_after[k], v) for k, v in fresh.unet.state_dict().items())  # restored exactly
