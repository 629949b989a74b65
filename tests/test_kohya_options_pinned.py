"""A Kohya user's command line and --config_file TOML, pinned to sd-scripts' own reading of them (48d368fa,
train_network.py's setup_parser and train_util's read_config_from_file, verify_training_args, prepare_dataset_args).
Pure: nothing here loads a model."""

from __future__ import annotations

import re

import pytest

from lora_trainer.errors import UserError
from lora_trainer.training.options import parse_args

COMMAND = ["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "d"]


@pytest.mark.parametrize("given", ["4.0,2.0", "2.0", "2.0,3.0,4.0", "two,four"])
def test_a_face_crop_range_sd_scripts_stops_on_is_refused_before_any_work(given):
    """prepare_dataset_args asserts two numbers, the smaller first; a reversed range trained at one fixed scale here."""
    with pytest.raises(UserError, match=re.escape(f"--face_crop_aug_range {given!r}: give two numbers, the smaller "
                                                  'first ("2.0,4.0"')):
        parse_args([*COMMAND, "--face_crop_aug_range", given])
    assert parse_args([*COMMAND, "--face_crop_aug_range", "2,2"])[0].face_crop_aug_range == "2,2"


def test_a_config_file_with_sd_scripts_old_spelling_caption_extention_reads_it_as_sd_scripts_does(tmp_path):
    """--caption_extention is an option of sd-scripts' parser (its --output_config writes it from an old command), and
    prepare_dataset_args puts it in place of caption_extension."""
    config = tmp_path / "args.toml"
    config.write_text('caption_extension = ".caption"\ncaption_extention = ".txt"\n', encoding="utf-8")
    assert parse_args([*COMMAND, "--config_file", str(config)])[0].caption_extension == ".txt"


@pytest.mark.parametrize("written", ["9007199254740993", '"9007199254740993"'])
def test_a_whole_number_beyond_a_floats_precision_is_that_number_to_the_last_digit(written, tmp_path):
    """sd-scripts' type=int reads --seed 9007199254740993 as it is (a float would be off by one): this trainer said it
    was "not a whole number"; a file's number, or its text, reads as the command line reads it."""
    assert parse_args([*COMMAND, "--seed", "9007199254740993"])[0].seed == 9007199254740993
    config = tmp_path / "args.toml"
    config.write_text(f"seed = {written}\n", encoding="utf-8")
    assert parse_args([*COMMAND, "--config_file", str(config)])[0].seed == 9007199254740993
