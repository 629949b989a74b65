"""Grid axis values read as the WebUI's X/Y/Z plot reads them: csv quoting, whole-number ranges (the grids themselves:
test_grid_plan.py)."""

from __future__ import annotations

import re

import pytest

from lora_trainer.errors import UserError
from lora_trainer.grid.axes import parse_values, split_values, whole_numbers


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
    assert whole_numbers(["1-3", "8", "9-5 (-2)", "-1", "x"]) == ["1", "2", "3", "8", "9", "7", "5", "-1", "x"]
    with pytest.raises(UserError, match="an axis takes at most 1000"):
        whole_numbers(["1-100000000"])
    with pytest.raises(UserError, match="the step must move from 5 towards 1"):
        whole_numbers(["5-1"])
