"""Caption processing at training time, as sd-scripts does it (``BaseDataset.process_caption``, kohya-reference §4.4),
and the tag counts it writes as ``ss_tag_frequency``.

Every random choice goes through the ``random.Random`` the caller passes, drawn in sd-scripts' order (dropout,
wildcard line, wildcard choices, shuffle, tag dropout), so a seed reproduces a caption sequence. Order of the steps:

1. ``caption_prefix + " " + caption + " " + caption_suffix`` (each only when non-empty);
2. the whole caption is dropped (becomes "") with ``caption_dropout_rate``, or on every epoch divisible by
   ``caption_dropout_every_n_epochs`` (epochs count from 1, as in sd-scripts);
3. wildcards ``{a|b}`` (``{{``/``}}`` are literal braces) after picking one line of a multi-line caption; without
   wildcards only the first line is kept;
4. when shuffling, warming up (for at least one step: a fraction of the steps that rounds to 0 is off, as in
   sd-scripts) or dropping tags: split on ``caption_separator``; the first ``keep_tokens`` tags, or the
   text before ``keep_tokens_separator`` (and after a second one), stay in place; token warm-up keeps only the first
   tags early in training; the rest are shuffled, then each is dropped with ``caption_tag_dropout_rate``; the tags are
   joined with ", " whatever the separator;
5. ``secondary_separator`` becomes ``caption_separator`` (so ``a;;b`` stays together while shuffling).

Quirks kept: the prefix is glued to the first line and the suffix to the last, before a wildcard line is picked;
without a ``keep_tokens_separator`` empty tags (``a,,b``) survive as empty entries (``a, , b``); the separator
split is only done for step 4, so a caption that is neither shuffled nor warmed up keeps its own spacing.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

_WILDCARD = re.compile(r"\{([^}]+)\}")


@dataclass(frozen=True)
class CaptionOptions:
    """The caption options of one subset, with sd-scripts' names and argparse defaults."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0


# What makes a caption differ between steps, so that --cache_text_encoder_outputs cannot encode it once
VARYING_CAPTION_OPTIONS = ("shuffle_caption", "enable_wildcard", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                           "caption_tag_dropout_rate", "token_warmup_step")


def caching_problems(caption_options) -> list[str]:
    """The ``VARYING_CAPTION_OPTIONS`` that ``caption_options`` (a subset's, or the run's options) turn on."""
    return [name for name in VARYING_CAPTION_OPTIONS if getattr(caption_options, name)]


def with_prefix_and_suffix(caption: str, prefix: str | None, suffix: str | None) -> str:
    if prefix:
        caption = prefix + " " + caption
    if suffix:
        caption = caption + " " + suffix
    return caption


def drops_whole_caption(options: CaptionOptions, rng: random.Random, epoch: int) -> bool:
    """Whether this sample trains with an empty caption; draws from ``rng`` only when a dropout rate is set."""
    dropped = options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate
    every_n = options.caption_dropout_every_n_epochs
    return dropped or (every_n > 0 and epoch % every_n == 0)


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """One random line of a multi-line caption, then each ``{a|b|c}`` replaced by one of its choices."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    # stand-ins for escaped braces must not occur in the caption itself
    open_brace, close_brace = "⦅", "⦆"
    while open_brace in caption or close_brace in caption:
        open_brace += "⦅"
        close_brace += "⦆"
    caption = caption.replace("{{", open_brace).replace("}}", close_brace)
    caption = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(open_brace, "{").replace(close_brace, "}")


def split_kept_tags(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(kept in front, shuffled/dropped, kept at the end) as sd-scripts splits a caption for shuffling."""
    separator = options.caption_separator
    keep_separator = options.keep_tokens_separator
    if keep_separator and keep_separator in caption:
        fixed_part, flexible_part = caption.split(keep_separator, 1)
        fixed_suffix: list[str] = []
        if keep_separator in flexible_part:
            flexible_part, suffix_part = flexible_part.split(keep_separator, 1)
            fixed_suffix = [tag.strip() for tag in suffix_part.split(separator) if tag.strip()]
        fixed = [tag.strip() for tag in fixed_part.split(separator) if tag.strip()]
        flexible = [tag.strip() for tag in flexible_part.split(separator) if tag.strip()]
        return fixed, flexible, fixed_suffix
    tags = [tag.strip() for tag in caption.strip().split(separator)]
    if options.keep_tokens > 0:
        return tags[: options.keep_tokens], tags[options.keep_tokens :], []
    return [], tags, []


def warmup_steps(token_warmup_step: float, max_train_steps: int) -> float:
    """sd-scripts' warm-up length: a value below 1 is a fraction of all training steps (floored)."""
    if token_warmup_step < 1:
        return math.floor(token_warmup_step * max_train_steps)
    return token_warmup_step


def warmup_tag_count(flexible_count: int, step: int, options: CaptionOptions, max_train_steps: int) -> int | None:
    """How many of the shuffleable tags token warm-up keeps at ``step`` (``None``: all of them)."""
    total_steps = warmup_steps(options.token_warmup_step, max_train_steps)
    if not total_steps or step >= total_steps:
        return None
    slope = (flexible_count - options.token_warmup_min) / total_steps
    return math.floor(step * slope) + options.token_warmup_min


def drop_tags(tags: Sequence[str], rate: float, rng: random.Random) -> list[str]:
    """Each tag kept with probability ``1 - rate`` (one draw per tag, in order)."""
    if rate <= 0:
        return list(tags)
    return [tag for tag in tags if rng.random() >= rate]


def process_caption(
    caption: str,
    options: CaptionOptions,
    rng: random.Random,
    epoch: int = 1,
    step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """The text a sample is trained with this time; ``epoch`` counts from 1 and ``step`` is the global step."""
    caption = with_prefix_and_suffix(caption, options.caption_prefix, options.caption_suffix)
    if drops_whole_caption(options, rng, epoch):
        return ""
    if options.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    warming_up = warmup_steps(options.token_warmup_step, max_train_steps) > 0  # a fraction may round to no steps: off
    if options.shuffle_caption or warming_up or options.caption_tag_dropout_rate > 0:
        fixed, flexible, fixed_suffix = split_kept_tags(caption, options)
        kept_count = warmup_tag_count(len(flexible), step, options, max_train_steps)
        if kept_count is not None:
            flexible = flexible[:kept_count]
        if options.shuffle_caption:
            rng.shuffle(flexible)
        flexible = drop_tags(flexible, options.caption_tag_dropout_rate, rng)
        caption = ", ".join(fixed + flexible + fixed_suffix)

    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.caption_separator)
    return caption


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """Tag counts as sd-scripts records them for one folder: split on "," (whatever ``caption_separator`` is),
    stripped, lower-cased, empty tags skipped; prefix/suffix/shuffle are not applied; first-seen order."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip()
            if tag:
                tag = tag.lower()
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def dataset_tag_frequency(folders: Iterable[tuple[str, Iterable[str]]]) -> dict[str, dict[str, int]]:
    """One dataset's ``tag_frequency``: ``{folder name: {tag: count}}`` from (folder name, captions) pairs, where the
    folder name is the image folder's base name (the metadata file's for fine-tuning). Subsets whose folders share
    a name add up, as in sd-scripts."""
    frequency: dict[str, dict[str, int]] = {}
    for folder_name, captions in folders:
        counts = frequency.setdefault(folder_name, {})
        for tag, count in tag_frequency(captions).items():
            counts[tag] = counts.get(tag, 0) + count
    return frequency


def tag_frequency_without(frequency: Mapping[str, Mapping[str, int]], folder: str,
                          captions: Iterable[str]) -> dict[str, dict[str, int]]:
    """``frequency`` less the tags of ``captions`` in ``folder`` (images left out after the count: unreadable ones)."""
    result = {name: dict(counts) for name, counts in frequency.items()}
    counts = result.setdefault(folder, {})
    for tag, count in tag_frequency(captions).items():
        if counts.get(tag, 0) > count:
            counts[tag] -= count
        else:
            counts.pop(tag, None)
    return result


def merged_tag_frequency(datasets: Iterable[Mapping[str, Mapping[str, int]]]) -> dict[str, dict[str, int]]:
    """``ss_tag_frequency`` across datasets: a folder name already seen in an earlier dataset is not counted again."""
    merged: dict[str, dict[str, int]] = {}
    for frequency in datasets:
        for folder_name, counts in frequency.items():
            if folder_name not in merged:
                merged[folder_name] = dict(counts)
    return merged
