"""What an artist sees of a grid: labels, order, the star, strengths, seeds (first pinned by a mutation review)."""

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


def test_after_a_promotion_the_final_file_comes_before_its_epoch_copy_and_carries_the_star(tmp_path):
    """Promoting epoch 1 makes the final file a copy of it (same epoch, same steps): the grid shows the final file
    first and stars it, not the copy below it."""
    from lora_trainer.grid.axes import run_files
    from lora_trainer.grid.plan import promote

    make_epoch_files(tmp_path, "tinylora", epochs=2, seed=0)
    promote(tmp_path / "tinylora-000001.safetensors", tmp_path, "tinylora", 1.0)
    assert [f.path.name for f in run_files(tmp_path / "tinylora.safetensors")] == [
        "tinylora.safetensors", "tinylora-000001.safetensors", "tinylora-000002.safetensors"]
    plan = plan_grid(GridRequest(AxisSpec("strength", ["1"]), AxisSpec("epoch", []), SETTINGS, lora="tinylora"),
                     LoraLibrary([tmp_path]))
    assert plan.best_epoch.name == "tinylora.safetensors"
    assert ["* recommended" in label for label in plan.row_labels] == [True, False, False]


def test_a_bare_lora_tag_takes_the_grids_strength(loras):
    """<lora:style> gives no weight: it is drawn at the cell's strength and labelled by its name alone."""
    library = LoraLibrary([loras])
    run = plan_grid(GridRequest(AxisSpec("seed", ["1"]), AxisSpec("epoch", ["1"]), SETTINGS, lora="<lora:tinylora>",
                                strength=0.5, baseline=False), library)
    assert prompts(run) == [["zkstar, shapes <lora:tinylora-000001:0.5>"]]
    styled = plan_grid(GridRequest(AxisSpec("lora", ["<lora:style>"]), AxisSpec("lora", ["tinylora"]), SETTINGS, lora="",
                                   strength=0.8), library)
    assert styled.column_labels == ["without style", "style"]
    assert prompts(styled)[0][1] == "zkstar, shapes <lora:style:0.8> <lora:tinylora:0.8>"


def test_a_grid_of_exactly_400_cells_needs_no_confirmation():
    from lora_trainer.errors import UserError
    from lora_trainer.grid.axes import check_size

    check_size(20, 20)
    with pytest.raises(UserError, match="20 × 21 = 420 images; confirm grids of more than 400 cells"):
        check_size(20, 21)


def test_labels_are_an_eighth_of_the_cell_wide_centred_in_their_row_and_below_the_title_with_a_margin():
    from PIL import Image, ImageDraw

    from lora_trainer.grid.render import LINE_SPACING, MARGIN, grid_layout

    layout = grid_layout((512, 512), ["epoch 1"], ["no LoRA", "strength 1"], "zkstar | seed 7")
    if hasattr(layout.font, "size"):  # Pillow < 10.1 (the WebUI's 9.5) has one bitmap font of one size
        assert layout.font.size == 64 and grid_layout((64, 64), ["a"], ["b"]).font.size == 10
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    (_, row_top), text = layout.row_labels[0]
    text_height = measure.multiline_textbbox((0, 0), text, font=layout.font, spacing=LINE_SPACING)[3]
    cells_top = layout.cells_at[1]
    assert abs((row_top - cells_top) - (512 - text_height) / 2) <= 1  # as far from the row's top as from its bottom
    (_, title_top), title = layout.title
    title_bottom = title_top + measure.multiline_textbbox((0, 0), title, font=layout.font, spacing=LINE_SPACING)[3]
    assert layout.column_labels[0][0][1] - title_bottom >= MARGIN


def test_a_seed_axis_takes_the_seeds_the_seed_field_takes(loras):
    """-5 was drawn at a new random seed each time under the label "seed -5" (the standalone host takes any seed
    below 0 as random), where the seed field refuses it."""
    from lora_trainer.errors import UserError

    library = LoraLibrary([loras])
    for value in ("-5", "4294967296"):
        with pytest.raises(UserError, match=rf"seed axis: {value} is not a seed; give whole numbers from -1 \(random\) "
                                            r"to 4294967295"):
            plan_grid(GridRequest(AxisSpec("seed", ["1", value]), AxisSpec("epoch", []), SETTINGS, lora="tinylora"), library)
    plan = plan_grid(GridRequest(AxisSpec("seed", ["0", "4294967295"]), AxisSpec("epoch", ["1"]), SETTINGS, lora="tinylora"),
                     library)
    assert plan.column_labels[1:] == ["seed 0", "seed 4294967295"]
