"""--dataset_config files are read as sd-scripts reads them, and mistakes are named with their fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_trainer.dataset.captions import CaptionOptions
from lora_trainer.dataset.config import (
    CONTROLNET,
    DREAMBOOTH,
    FINE_TUNING,
    load_dataset_config,
    resolve_dataset_config,
)
from lora_trainer.errors import UserError
from reference import REFERENCE

FIXTURES = REFERENCE / "kohya-fixtures"
# argparse defaults of the options that act as fallbacks (a subset of sd-scripts' parser)
CLI_DEFAULTS = {
    "caption_extension": ".caption", "caption_separator": ",", "keep_tokens": 0, "keep_tokens_separator": "",
    "train_batch_size": 1, "dataset_repeats": 1, "resolution": None, "enable_bucket": False, "min_bucket_reso": 256,
    "max_bucket_reso": 1024, "bucket_reso_steps": 64, "prior_loss_weight": 1.0,
}


def write(tmp_path: Path, text: str, name: str = "dataset.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def one_subset(tmp_path: Path, subset_lines: str, dataset_lines: str = "resolution = 512", general: str = "") -> Path:
    return write(tmp_path, f"[general]\n{general}\n[[datasets]]\n{dataset_lines}\n[[datasets.subsets]]\n{subset_lines}\n")


def error_of(path: Path, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        load_dataset_config(path, **kwargs)
    return str(caught.value)


def test_the_config_sd_scripts_trained_with_parses_unchanged_after_its_paths_are_rewritten(tmp_path):
    text = (FIXTURES / "configs" / "dataset.toml").read_text(encoding="utf-8").replace("{FIXTURES}", str(FIXTURES))
    group = load_dataset_config(write(tmp_path, text), CLI_DEFAULTS)
    (dataset,) = group.datasets
    assert dataset.kind == DREAMBOOTH
    assert (dataset.resolution, dataset.batch_size) == ((128, 128), 2)
    assert (dataset.enable_bucket, dataset.min_bucket_reso, dataset.max_bucket_reso, dataset.bucket_reso_steps) == (True, 64, 256, 64)
    shapes, wide = dataset.subsets
    # the folder is called 10_shapes, but in TOML mode the prefix is not read: num_repeats comes from the file
    assert shapes.image_dir == FIXTURES / "dataset/train/10_shapes"
    assert (shapes.num_repeats, shapes.class_tokens, shapes.flip_aug, shapes.caption_tag_dropout_rate) == (2, "shapes", True, 0.1)
    assert (wide.num_repeats, wide.class_tokens, wide.caption_prefix, wide.caption_dropout_rate) == (1, None, "wide", 0.2)
    for subset in dataset.subsets:  # from [general]
        assert (subset.caption_extension, subset.shuffle_caption, subset.keep_tokens) == (".txt", True, 1)
    assert group.warnings == ()


def test_each_option_is_looked_up_subset_then_dataset_then_general_then_cli_then_default(tmp_path):
    path = write(tmp_path, """
[general]
keep_tokens = 3
caption_prefix = "from general"
[[datasets]]
resolution = 512
keep_tokens = 2
  [[datasets.subsets]]
  image_dir = "a"
  keep_tokens = 1
  [[datasets.subsets]]
  image_dir = "b"
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "c"
""")
    group = load_dataset_config(path, {"keep_tokens": 9, "caption_suffix": "from cli", "token_warmup_min": None})
    a, b = group.datasets[0].subsets
    (c,) = group.datasets[1].subsets
    assert (a.keep_tokens, b.keep_tokens, c.keep_tokens) == (1, 2, 3)
    assert {subset.caption_prefix for subset in (a, b, c)} == {"from general"}
    assert {subset.caption_suffix for subset in (a, b, c)} == {"from cli"}
    assert {subset.token_warmup_min for subset in (a, b, c)} == {1}  # a None on the command line falls to the default


def test_command_line_names_and_strings_are_mapped_like_sd_scripts(tmp_path):
    path = one_subset(tmp_path, 'image_dir = "a"', dataset_lines="")
    group = load_dataset_config(path, {"train_batch_size": 4, "dataset_repeats": 3, "resolution": "512,768", "caption_extension": "txt"})
    dataset = group.datasets[0]
    assert (dataset.batch_size, dataset.resolution) == (4, (512, 768))
    assert (dataset.subsets[0].num_repeats, dataset.subsets[0].caption_extension) == (3, ".txt")


def test_caption_extension_defaults_to_sd_scripts_dot_caption(tmp_path):
    group = load_dataset_config(one_subset(tmp_path, 'image_dir = "a"'), CLI_DEFAULTS)
    assert group.datasets[0].subsets[0].caption_extension == ".caption"


def test_an_image_extension_as_caption_extension_names_the_file_and_the_table(tmp_path):
    """sd-scripts would read each image as its own caption and stop at its first undecodable byte."""
    path = one_subset(tmp_path, 'image_dir = "a"\ncaption_extension = "png"')
    message = error_of(path)
    assert str(path) in message and "[[datasets.subsets]] #1 of [[datasets]] #1" in message
    assert "caption_extension '.png' is an image extension: give the captions' own, such as .txt" in message


def test_subset_caption_options_are_what_the_caption_processor_takes(tmp_path):
    path = one_subset(tmp_path, 'image_dir = "a"\nshuffle_caption = true\nkeep_tokens_separator = "|||"')
    options = load_dataset_config(path).datasets[0].subsets[0].caption_options
    assert options == CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||")


def test_a_typo_names_the_file_the_table_and_the_closest_key(tmp_path):
    path = one_subset(tmp_path, 'image_dir = "a"\nshufle_caption = true')
    message = error_of(path)
    assert str(path) in message
    assert "'shufle_caption'" in message and "[[datasets.subsets]] #1 of [[datasets]] #1" in message
    assert "did you mean shuffle_caption?" in message


def test_a_typo_in_general_is_named_too(tmp_path):
    message = error_of(one_subset(tmp_path, 'image_dir = "a"', general="enable_buckets = true"))
    assert "[general]" in message and "did you mean enable_bucket?" in message


def test_a_dataset_option_in_a_subset_says_where_it_belongs(tmp_path):
    message = error_of(one_subset(tmp_path, 'image_dir = "a"\nbatch_size = 2'))
    assert "batch_size cannot be set in [[datasets.subsets]] #1" in message
    assert "[general] or [[datasets]]" in message


def test_a_subset_path_in_general_says_where_it_belongs(tmp_path):
    message = error_of(one_subset(tmp_path, 'image_dir = "a"', general='image_dir = "x"'))
    assert "image_dir cannot be set in [general]; it belongs in [[datasets.subsets]]" in message


def test_a_quoted_number_is_refused_with_the_fix(tmp_path):
    message = error_of(one_subset(tmp_path, 'image_dir = "a"\nkeep_tokens = "1"'))
    assert "keep_tokens" in message and "whole number" in message and "without quotes" in message


def test_a_boolean_is_not_taken_for_a_number(tmp_path):
    assert "num_repeats" in error_of(one_subset(tmp_path, 'image_dir = "a"\nnum_repeats = true'))


def test_resolution_accepts_a_number_or_a_pair_but_not_a_string(tmp_path):
    assert load_dataset_config(one_subset(tmp_path, 'image_dir = "a"', "resolution = [512, 768]")).datasets[0].resolution == (512, 768)
    assert "[width, height]" in error_of(one_subset(tmp_path, 'image_dir = "a"', 'resolution = "512,768"'))


def test_an_integer_is_accepted_where_a_number_is_expected(tmp_path):
    path = one_subset(tmp_path, 'image_dir = "a"\ncaption_dropout_rate = 0', "resolution = 512\nvalidation_split = 0")
    assert load_dataset_config(path).datasets[0].subsets[0].caption_dropout_rate == 0.0


def test_subsets_with_metadata_file_make_a_fine_tuning_dataset(tmp_path):
    path = one_subset(tmp_path, 'metadata_file = "meta.json"\nimage_dir = "img"')
    dataset = load_dataset_config(path).datasets[0]
    assert dataset.kind == FINE_TUNING and dataset.subsets[0].metadata_file == Path("meta.json")


def test_mixing_fine_tuning_and_dreambooth_subsets_asks_for_two_datasets(tmp_path):
    path = write(tmp_path, '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nmetadata_file = "m.json"\n[[datasets.subsets]]\nimage_dir = "a"\n')
    assert "two separate [[datasets]]" in error_of(path)


def test_caption_extension_in_a_fine_tuning_dataset_explains_it_is_for_dreambooth(tmp_path):
    message = error_of(one_subset(tmp_path, 'metadata_file = "m.json"\ncaption_extension = ".txt"'))
    assert "DreamBooth" in message


def test_controlnet_subsets_need_masked_loss(tmp_path):
    path = one_subset(tmp_path, 'image_dir = "a"\nconditioning_data_dir = "c"')
    assert "--masked_loss" in error_of(path)
    assert load_dataset_config(path, support_controlnet=True).datasets[0].kind == CONTROLNET


def test_a_subset_without_image_dir_is_refused(tmp_path):
    assert "has no image_dir" in error_of(one_subset(tmp_path, "num_repeats = 2"))


def test_a_dataset_without_resolution_says_where_to_set_it(tmp_path):
    message = error_of(one_subset(tmp_path, 'image_dir = "a"', dataset_lines=""))
    assert "no resolution" in message and "--resolution" in message


def test_bucket_sizes_that_contradict_the_resolution_name_the_file(tmp_path):
    path = one_subset(tmp_path, 'image_dir = "a"', "resolution = 512\nenable_bucket = true\nmin_bucket_reso = 768")
    message = error_of(path)
    assert str(path) in message and "min_bucket_reso" in message


def test_a_resolution_off_the_bucket_step_is_refused_with_the_nearest_sizes_unless_bucketing(tmp_path):
    path = one_subset(tmp_path, 'image_dir = "a"', "resolution = [500, 768]")
    message = error_of(path)
    assert str(path) in message and "resolution 500x768" in message and "use 448x768 or 512x768" in message
    (tmp_path / "small").mkdir()
    small = one_subset(tmp_path / "small", 'image_dir = "a"', "resolution = [32, 48]")  # both round to the step
    assert "; use 64x64, or turn on enable_bucket" in error_of(small)  # said "use 64x64 or 64x64"
    bucketed = one_subset(tmp_path, 'image_dir = "a"', "resolution = [500, 768]\nenable_bucket = true")
    assert load_dataset_config(bucketed).datasets[0].resolution == (500, 768)  # the buckets keep to the step


def test_bucket_sizes_are_snapped_to_the_step_as_sd_scripts_does(tmp_path):
    path = one_subset(tmp_path, 'image_dir = "a"', "resolution = 512\nenable_bucket = true\nmin_bucket_reso = 200\nmax_bucket_reso = 1000")
    dataset = load_dataset_config(path).datasets[0]
    assert (dataset.min_bucket_reso, dataset.max_bucket_reso) == (192, 1024)


def test_a_misspelled_resize_filter_gets_the_closest_one(tmp_path):
    assert "did you mean lanczos?" in error_of(one_subset(tmp_path, 'image_dir = "a"\nresize_interpolation = "lanczo"'))


def test_a_batch_size_below_one_is_refused_naming_the_dataset(tmp_path):
    """batch_size = 0 (or a --train_batch_size 0 fallback) would make no batches: said before any work."""
    assert "batch_size of [[datasets]] #1 is 0; it must be 1 or more" in error_of(one_subset(tmp_path, 'image_dir = "a"',
                                                                                          "resolution = 512\nbatch_size = 0"))


def test_duplicate_and_zero_repeat_subsets_are_ignored_with_a_warning(tmp_path):
    path = write(tmp_path, """
[[datasets]]
resolution = 512
[[datasets.subsets]]
image_dir = "a"
[[datasets.subsets]]
image_dir = "a"
num_repeats = 5
[[datasets.subsets]]
image_dir = "b"
num_repeats = 0
""")
    group = load_dataset_config(path)
    assert [subset.image_dir for subset in group.datasets[0].subsets] == [Path("a")]
    assert len(group.warnings) == 2
    assert "already a subset" in group.warnings[0] and "num_repeats is 0" in group.warnings[1]


def test_toml_syntax_errors_give_the_file_and_line(tmp_path):
    path = write(tmp_path, '[general]\nshuffle_caption = true\nkeep_tokens = \n')
    message = error_of(path)
    assert str(path) in message and "line 3" in message


def test_json_configs_are_read_too(tmp_path):
    config = {"general": {"flip_aug": True}, "datasets": [{"resolution": [640, 512], "subsets": [{"image_dir": "a"}]}]}
    path = write(tmp_path, json.dumps(config), "dataset.json")
    dataset = load_dataset_config(path).datasets[0]
    assert dataset.resolution == (640, 512) and dataset.subsets[0].flip_aug


def test_other_file_types_and_missing_files_are_named(tmp_path):
    assert "must end in .toml or .json" in error_of(write(tmp_path, "x", "dataset.yaml"))
    assert "does not exist" in error_of(tmp_path / "nope.toml")


def test_in_memory_configs_from_folders_resolve_the_same_way():
    group = resolve_dataset_config({"datasets": [{"subsets": [{"image_dir": "x", "num_repeats": 10, "class_tokens": "dog", "is_reg": False}]}]},
                                   cli_args={"resolution": "512", "caption_extension": ".txt"})
    subset = group.datasets[0].subsets[0]
    assert (subset.num_repeats, subset.class_tokens, subset.caption_extension) == (10, "dog", ".txt")
