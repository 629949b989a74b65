"""What an artist sees of a grid where the mutation review found no test: labels, order, the star, strengths."""

from __future__ import annotations

import pytest

from lora_trainer.grid.bench import make_epoch_files
from lora_trainer.grid.plan import AxisSpec, GridRequest, plan_grid
from lora_trainer.networks.activation import LoraLibrary
from lora_trainer.sampling.txt2img import GenerationSettings

SETTINGS = GenerationSettings("zkstar, shapes", steps=1, sampler="Euler", cfg_scale=5.0, seed=7, width=64, height=64)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    make_epoch_files(folder, "tinylora", epochs=2, seed=0)
    make_epoch_files(folder, "style", epochs=1, seed=1)
    return folder


def prompts(plan) -> list[list[str]]:
    return [[cell.settings.prompt for cell in row] for row in plan.cells]


def test_epochs_by_lora_rows_name_the_baseline_by_the_run_it_leaves_out(loras):
    """Epoch columns × style rows: the baseline keeps the row's style, so "no LoRA" above it was untrue."""
    plan = plan_grid(GridRequest(AxisSpec("epoch", []), AxisSpec("lora", ["style"]), SETTINGS, lora="tinylora"),
                     LoraLibrary([loras]))
    assert prompts(plan)[0][0] == "zkstar, shapes <lora:style:1>"
    assert plan.column_labels[0] == "without tinylora"
    by_strength = plan_grid(GridRequest(AxisSpec("epoch", []), AxisSpec("strength", ["1"]), SETTINGS, lora="tinylora"),
                            LoraLibrary([loras]))
    assert prompts(by_strength)[0][0] == "zkstar, shapes" and by_strength.column_labels[0] == "no LoRA"
