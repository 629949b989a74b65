"""Grid axis values read as the WebUI's X/Y/Z plot reads them (csv quoting, whole-number ranges, fixed seeds), and the
grid PNG's infotext read as PNG Info reads it (the grids themselves: test_grid_plan.py)."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from lora_trainer.errors import UserError
from lora_trainer.grid.axes import parse_values, split_values, whole_numbers

# The WebUI's infotext_utils.parse_generation_parameters, as far as keys and values go: the last line holds the
# parameters when it has 3 or more, a quoted value is JSON.
_WEBUI_PARAMETER = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def webui_parameters(infotext: str) -> dict[str, str]:
    *lines, last = infotext.strip().split("\n")
    if len(_WEBUI_PARAMETER.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt = "\n".join(line for line in lines if not line.startswith("Negative prompt:"))
    parameters = {"Prompt": prompt}
    for key, value in _WEBUI_PARAMETER.findall(last):
        parameters[key] = json.loads(value) if value[:1] == '"' == value[-1:] else value
    return parameters


@pytest.mark.parametrize("text, values", [
    ('"1girl, standing", "1girl, sitting"', ["1girl, standing", "1girl, sitting"]),
    ('a,  b ,, "c ""quoted"""', ["a", "b", 'c "quoted"']),
    ("", []),
])
def test_values_are_split_with_csv_quoting_as_the_xyz_plot_splits_them(text, values):
    assert split_values(text) == values


def test_strengths_take_quotes_and_evenly_spaced_values_read_short():
    assert parse_values('"0.5", 1') == [0.5, 1.0]
    assert parse_values("0-1 [100]")[1:6] == [0.0101, 0.0202, 0.0303, 0.0404, 0.05051]  # labelled as shown
    assert parse_values("0-1 (+0.3)") == pytest.approx([0, 0.3, 0.6, 0.9])  # ours stops at the end (X/Y/Z: 1.2)


@pytest.mark.parametrize("text, message", [
    ("0,8", "for 0.8 write a point (0.8), for two strengths a space after the comma (0, 8)"),
    ("0.5, 1,5", "for 1.5 write a point"),
    ("nan", "'nan' is not a strength a LoRA can take"),
    ("1e999", "'1e999' is not a strength a LoRA can take"),
    ("1..2-3", "is not a number or a range"),
])
def test_a_decimal_comma_and_non_finite_strengths_are_refused(text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_values(text)


def test_whole_number_ranges_are_written_out_as_the_xyz_plots_int_axes_do():
    assert whole_numbers(["1-10 [5]"]) == ["1", "3", "5", "7", "10"]  # np.linspace, rounded down by int()
    assert whole_numbers(["0-10 [5]"]) == ["0", "2", "5", "7", "10"]  # 0, 2.5, 5, 7.5, 10: a fractional step
    assert whole_numbers(["1-3", "8", "9-5 (-2)", "-1", "x"]) == ["1", "2", "3", "8", "9", "7", "5", "-1", "x"]
    with pytest.raises(UserError, match="an axis takes at most 1000"):
        whole_numbers(["1-100000000"])
    with pytest.raises(UserError, match="the step must move from 5 towards 1"):
        whole_numbers(["5-1"])


def test_the_grid_png_carries_its_first_cells_infotext_and_the_axes_as_the_xyz_plot_writes_them(tmp_path):
    from lora_trainer.app.standalone_host import StandaloneHost
    from lora_trainer.grid.bench import make_epoch_files
    from lora_trainer.grid.plan import AxisSpec, GridRequest, plan_grid, run_grid
    from lora_trainer.networks.activation import LoraLibrary
    from lora_trainer.sampling.txt2img import GenerationSettings

    folder = tmp_path / "loras"
    make_epoch_files(folder, "tinylora", epochs=2)
    settings = GenerationSettings("zkstar, shapes", "blurry", steps=1, sampler="Euler", cfg_scale=5.0, seed=7,
                                  width=64, height=64)
    request = GridRequest(AxisSpec("strength", ["0.5, 1"]), AxisSpec("epoch", ["1-2"]), settings, lora="tinylora")
    result = run_grid(StandaloneHost([], [folder]), plan_grid(request, LoraLibrary([folder])), tmp_path / "grid")
    grid = webui_parameters(Image.open(result.path).text["parameters"])
    first_cell = webui_parameters(Image.open(result.cell_paths[0]).text["parameters"])
    assert grid["Prompt"] == first_cell["Prompt"] == "zkstar, shapes"  # the baseline, top left
    assert (grid["Seed"], grid["Steps"], grid["Sampler"], grid["Size"]) == ("7", "1", "Euler", "64x64")
    assert grid["Grid"] == "Prompt-Lora-Grid" and "Script" not in grid  # a Script the WebUI lacks fails its paste
    assert [grid[f"Grid {key}"] for key in ("X Type", "X Values", "Y Type", "Y Values")] == ["strength", "0.5, 1",
                                                                                          "epoch", "1-2"]
    assert grid["Lora hashes"].startswith("tinylora-000001: ") and ", tinylora: " in grid["Lora hashes"]
    assert "Grid" not in first_cell  # the cells keep their own infotext
