"""Training-time captions behave as in sd-scripts' process_caption, and tag counts as its ss_tag_frequency."""

from __future__ import annotations

import random

from lora_trainer.dataset.captions import (
    CaptionOptions,
    dataset_tag_frequency,
    merged_tag_frequency,
    process_caption,
    tag_frequency,
)

TAGS = "zkstar, yellow star, blue background, simple, flat colors"


def processed_many(caption: str, options: CaptionOptions, count: int = 200, **progress) -> list[str]:
    return [process_caption(caption, options, random.Random(seed), **progress) for seed in range(count)]


def test_caption_without_options_is_untouched_even_its_spacing():
    assert process_caption("a ,b,  c", CaptionOptions(), random.Random(0)) == "a ,b,  c"


def test_prefix_and_suffix_are_joined_with_spaces():
    options = CaptionOptions(caption_prefix="zkstar", caption_suffix="best quality")
    assert process_caption("yellow star", options, random.Random(0)) == "zkstar yellow star best quality"


def test_shuffle_keeps_the_first_keep_tokens_tags_in_place_and_every_tag_once():
    results = processed_many(TAGS, CaptionOptions(shuffle_caption=True, keep_tokens=1))
    expected_tags = sorted(TAGS.split(", "))
    assert all(result.startswith("zkstar, ") for result in results)
    assert all(sorted(result.split(", ")) == expected_tags for result in results)
    assert len(set(results)) > 10  # it does shuffle


def test_shuffle_with_the_same_seed_gives_the_same_caption_and_draws_like_random_shuffle():
    options = CaptionOptions(shuffle_caption=True)
    first = process_caption(TAGS, options, random.Random(42))
    assert first == process_caption(TAGS, options, random.Random(42))
    tags = TAGS.split(", ")
    random.Random(42).shuffle(tags)  # sd-scripts calls random.shuffle on the stripped tags, nothing before it
    assert first == ", ".join(tags)


def test_keep_tokens_separator_fixes_a_head_and_a_tail():
    caption = "zkstar, style ||| a, b, c ||| masterpiece"
    results = processed_many(caption, CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||"))
    assert all(result.startswith("zkstar, style, ") and result.endswith(", masterpiece") for result in results)
    assert {result[len("zkstar, style, ") : -len(", masterpiece")] for result in results} == {
        "a, b, c", "a, c, b", "b, a, c", "b, c, a", "c, a, b", "c, b, a"
    }


def test_keep_tokens_separator_absent_from_the_caption_falls_back_to_keep_tokens():
    results = processed_many("x, a, b", CaptionOptions(shuffle_caption=True, keep_tokens=1, keep_tokens_separator="|||"))
    assert all(result.startswith("x, ") for result in results)


def test_caption_separator_splits_tags_but_they_are_joined_with_comma_space():
    results = processed_many("a;b;c", CaptionOptions(shuffle_caption=True, caption_separator=";"), count=50)
    assert {tuple(sorted(result.split(", "))) for result in results} == {("a", "b", "c")}


def test_secondary_separator_keeps_a_group_together_then_becomes_the_separator():
    options = CaptionOptions(shuffle_caption=True, secondary_separator=";;;")
    assert set(processed_many("red;;;dress, smile", options, count=50)) == {"red,dress, smile", "smile, red,dress"}


def test_secondary_separator_is_replaced_even_without_shuffle():
    assert process_caption("red;;;dress", CaptionOptions(secondary_separator=";;;"), random.Random(0)) == "red,dress"


def test_caption_dropout_rate_empties_that_share_of_captions_and_draws_first():
    options = CaptionOptions(caption_dropout_rate=0.3)
    results = processed_many(TAGS, options, count=1000)
    dropped = [seed for seed, result in enumerate(results) if result == ""]
    assert dropped == [seed for seed in range(1000) if random.Random(seed).random() < 0.3]
    assert 250 < len(dropped) < 350


def test_caption_dropout_every_n_epochs_empties_every_nth_epoch_counting_from_one():
    options = CaptionOptions(caption_dropout_every_n_epochs=2)
    by_epoch = [process_caption("a, b", options, random.Random(0), epoch=epoch) for epoch in (1, 2, 3, 4)]
    assert by_epoch == ["a, b", "", "a, b", ""]


def test_prefix_is_dropped_with_the_caption():
    options = CaptionOptions(caption_prefix="zkstar", caption_dropout_rate=1.0)
    assert process_caption("star", options, random.Random(0)) == ""


def test_wildcards_choose_one_option_and_escaped_braces_stay_literal():
    options = CaptionOptions(enable_wildcard=True)
    assert set(processed_many("{red|blue} star, {{logo}}", options, count=50)) == {"red star, {logo}", "blue star, {logo}"}


def test_wildcards_are_left_alone_when_not_enabled():
    assert process_caption("{red|blue} star", CaptionOptions(), random.Random(0)) == "{red|blue} star"


def test_multi_line_caption_picks_a_line_with_wildcards_and_the_prefix_sticks_to_the_first_line():
    options = CaptionOptions(enable_wildcard=True, caption_prefix="zk")
    assert set(processed_many("first line\nsecond line", options, count=50)) == {"zk first line", "second line"}


def test_multi_line_caption_without_wildcards_uses_the_first_line():
    assert process_caption("first\nsecond", CaptionOptions(caption_prefix="zk"), random.Random(0)) == "zk first"


def test_tag_dropout_never_drops_kept_tokens():
    options = CaptionOptions(keep_tokens=1, caption_tag_dropout_rate=1.0)
    assert process_caption(TAGS, options, random.Random(0)) == "zkstar"


def test_tag_dropout_drops_each_tag_independently():
    options = CaptionOptions(caption_tag_dropout_rate=0.5)
    lengths = {len(result.split(", ")) if result else 0 for result in processed_many(TAGS, options)}
    assert lengths == {0, 1, 2, 3, 4, 5}


def test_token_warmup_grows_from_min_to_all_tags_over_the_warmup_steps():
    options = CaptionOptions(token_warmup_min=1, token_warmup_step=10)
    counts = [len(process_caption(TAGS, options, random.Random(0), step=step).split(", ")) for step in (0, 5, 9, 10, 50)]
    # floor(step * (5 - 1) / 10) + 1
    assert counts == [1, 3, 4, 5, 5]
    assert process_caption(TAGS, options, random.Random(0), step=0) == "zkstar"  # the first tags, not random ones


def test_token_warmup_below_one_is_a_fraction_of_all_training_steps():
    options = CaptionOptions(token_warmup_min=2, token_warmup_step=0.5)
    # 0.5 * 40 = 20 warm-up steps: floor(10 * (5 - 2) / 20) + 2 = 3 tags at step 10
    assert process_caption(TAGS, options, random.Random(0), step=10, max_train_steps=40) == "zkstar, yellow star, blue background"


def test_a_warmup_fraction_that_rounds_to_no_steps_leaves_the_caption_as_written_as_sd_scripts_does():
    # 0.001 of 500 steps is 0 warm-up steps: sd-scripts turns the warm-up off and never splits the tags
    options = CaptionOptions(token_warmup_step=0.001)
    assert process_caption("a,,b, c ,d,", options, random.Random(0), step=3, max_train_steps=500) == "a,,b, c ,d,"
    longer = CaptionOptions(token_warmup_step=0.01)  # 5 steps: on, and split as in sd-scripts
    assert process_caption("a,,b, c ,d,", longer, random.Random(0), step=7, max_train_steps=500) == "a, , b, c, d, "


def test_empty_tags_survive_as_empty_entries_when_tags_are_split():
    # sd-scripts keeps the empty tag between ",," when splitting without a keep_tokens_separator
    options = CaptionOptions(token_warmup_step=1)
    assert process_caption("a,,b", options, random.Random(0), step=5) == "a, , b"


def test_tag_frequency_is_lowercased_stripped_and_split_on_commas_only():
    counts = tag_frequency(["1girl, Solo, ", "solo,  smile", "", "red;blue"])
    assert counts == {"1girl": 1, "solo": 2, "smile": 1, "red;blue": 1}
    assert list(counts) == ["1girl", "solo", "smile", "red;blue"]  # first-seen order, as json.dumps writes it


def test_dataset_tag_frequency_is_keyed_by_folder_name_and_same_names_add_up():
    frequency = dataset_tag_frequency([("10_star", ["a, b"]), ("1_reg", ["a"]), ("10_star", ["b, c"])])
    assert frequency == {"10_star": {"a": 1, "b": 2, "c": 1}, "1_reg": {"a": 1}}


def test_merged_tag_frequency_counts_a_folder_used_by_two_datasets_once():
    merged = merged_tag_frequency([{"star": {"a": 1}}, {"star": {"a": 5}, "wide": {"b": 2}}])
    assert merged == {"star": {"a": 1}, "wide": {"b": 2}}
