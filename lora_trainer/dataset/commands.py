"""``python -m lora_trainer dataset …``: argument parsing and printing over ``health`` and ``preprocess``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..console import progress_callback


def parse_resolution(text: str) -> tuple[int, int]:
    """sd-scripts' ``--resolution``: ``512`` or ``512,768`` (width, height)."""
    try:
        sides = [int(part) for part in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a resolution; write 512 or 512,768") from None
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a resolution; write 512 or 512,768")
    return sides[0], sides[-1]


def run_check(args) -> None:
    from lora_trainer.dataset.health import HealthSettings, bucket_limits_for, check_dataset, check_dataset_config

    low, high = bucket_limits_for(args.resolution)  # limits not given follow the resolution, as the API's check
    args.min_bucket_reso = low if args.min_bucket_reso is None else args.min_bucket_reso
    args.max_bucket_reso = high if args.max_bucket_reso is None else args.max_bucket_reso

    settings = HealthSettings(
        resolution=args.resolution,
        batch_size=args.batch_size,
        enable_bucket=not args.no_buckets,
        min_bucket_reso=args.min_bucket_reso,
        max_bucket_reso=args.max_bucket_reso,
        bucket_reso_steps=args.bucket_reso_steps,
        bucket_no_upscale=args.bucket_no_upscale,
        caption_extension=args.caption_extension,
        trigger=args.trigger,
        max_token_length=args.max_token_length,
        shuffle_caption=args.shuffle_caption,
        keep_tokens=args.keep_tokens,
        keep_tokens_separator=args.keep_tokens_separator,
        random_crop=args.random_crop,
        cache_latents=args.cache_latents,
        face_crop=args.face_crop,
    )
    if args.folder.is_file() and args.folder.suffix.lower() in (".toml", ".json"):  # a --dataset_config
        report = check_dataset_config(args.folder, settings, {
            "resolution": ",".join(map(str, args.resolution)), "train_batch_size": args.batch_size,
            "enable_bucket": not args.no_buckets, "min_bucket_reso": args.min_bucket_reso,
            "max_bucket_reso": args.max_bucket_reso, "bucket_reso_steps": args.bucket_reso_steps,
            "bucket_no_upscale": args.bucket_no_upscale, "caption_extension": args.caption_extension,
            "random_crop": args.random_crop})
    else:
        report = check_dataset(args.folder, settings)
    print(report.to_json() if args.json else report.to_text())
    if report.errors:
        raise SystemExit(1)  # scripts can run `dataset check DIR && train …`


def run_prep(args) -> None:
    from lora_trainer.dataset.preprocess import PrepSettings, prepare_dataset

    settings = PrepSettings(
        size=args.size,
        buckets=args.buckets,
        crop=args.crop,
        no_upscale=args.no_upscale,
        flip=args.flip,
        face_emphasis_repeats=args.face_emphasis,
        caption_extension=args.caption_extension,
        overwrite=args.overwrite,
    )
    with progress_callback("image", "preparing") as progress:
        result = prepare_dataset(args.source, args.out, settings, progress=None if args.quiet else progress)
    print(result.summary())


def _add_bucket_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-bucket-reso", type=int, help="default 256, or the resolution's shorter side below it")
    parser.add_argument("--max-bucket-reso", type=int, help="default 1024, or the resolution's longer side above it")
    parser.add_argument("--bucket-reso-steps", type=int, default=64)
    parser.add_argument("--shuffle-caption", action="store_true",
                        help="check as a run with --shuffle_caption: is the trigger among the tags kept in place?")
    parser.add_argument("--keep-tokens", type=int, default=0, help="the tags --shuffle_caption keeps in place")
    parser.add_argument("--keep-tokens-separator", default="",
                        help="the text before it is kept in place (sd-scripts' --keep_tokens_separator, e.g. |||)")
    parser.add_argument("--max-token-length", type=int, choices=(75, 150, 225), default=75,
                        help="the tokens training reads of a caption (sd-scripts' --max_token_length; default 75)")


def add_dataset_commands(subparsers) -> None:
    """Register ``dataset check``, ``dataset prep`` and ``dataset tags`` on the CLI's sub-command list."""
    dataset = subparsers.add_parser("dataset", help="check or prepare a training image folder")
    commands = dataset.add_subparsers(dest="dataset_command", required=True)

    check = commands.add_parser(
        "check", help="health report: what sd-scripts will do with a --train_data_dir folder",
        description="Read-only. Exit status 1 when the report has errors (training would fail or train nothing).")
    check.add_argument("folder", type=Path, help="the folder holding <repeats>_<name> image folders, or a "
                       "--dataset_config TOML (its values win over these options, as in sd-scripts)")
    check.add_argument("--json", action="store_true", help="print the report as JSON: every size, file and near-duplicate, where the text names the "
                       "commonest sizes and 5 files of each kind of finding")
    check.add_argument("--resolution", type=parse_resolution, default=(512, 512), help="512 or 512,768 (default 512)")
    check.add_argument("--batch-size", type=int, default=1)
    check.add_argument("--trigger", help="the trigger word every caption should contain")
    check.add_argument("--no-buckets", action="store_true",
                       help="check as if enable_bucket were off (buckets are on here, as the Kohya GUI trains; "
                            "sd-scripts' command line has them off unless --enable_bucket)")
    check.add_argument("--bucket-no-upscale", action="store_true")
    check.add_argument("--random-crop", action="store_true",
                       help="check as a run with --random_crop: without buckets, a larger image trains a patch at "
                            "its own size")
    check.add_argument("--cache-latents", action="store_true",
                       help="check as a run with --cache_latents: without buckets, every image is resized to the "
                            "resolution")
    check.add_argument("--face-crop", action="store_true",
                       help="check as a run with --face_crop_aug_range: without buckets, a larger image whose name "
                            "gives its face (name_<cx>_<cy>_<w>_<h>.png) is cut around it at the resolution")
    check.add_argument("--caption-extension", default=".txt",
                       help="default .txt, as the taggers and the Kohya GUI write; sd-scripts' own default is .caption")
    _add_bucket_options(check)
    check.set_defaults(run=run_check)

    prep = commands.add_parser(
        "prep", help="crop and resize a folder of images into a new folder (sources are never changed)")
    prep.add_argument("source", type=Path, help="the folder of source images (sub-folders are mirrored)")
    prep.add_argument("out", type=Path, help="a new or empty folder outside the source")
    prep.add_argument("--size", type=int, default=512, help="square side in pixels (default 512)")
    prep.add_argument("--buckets", action="store_true",
                      help="crop each image to its sd-scripts bucket for a --size x --size resolution instead of a square")
    prep.add_argument("--crop", choices=["centre", "center", "focal"], default="centre",
                      help="keep the middle (sd-scripts' crop) or the most interesting part (faces, else detail)")
    prep.add_argument("--no-upscale", action="store_true", help="never enlarge: small images are only cropped")
    prep.add_argument("--flip", action="store_true", help="also write a mirrored copy of every image")
    prep.add_argument("--face-emphasis", type=int, metavar="REPEATS",
                      help="add a '<REPEATS>_<name> face' folder of face close-ups (needs opencv-python-headless<4.12)")
    prep.add_argument("--caption-extension", default=".txt")
    prep.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT (files of the same name are replaced)")
    prep.add_argument("--quiet", action="store_true")
    prep.set_defaults(run=run_prep)

    from .tag_commands import add_tags_command

    add_tags_command(commands)

