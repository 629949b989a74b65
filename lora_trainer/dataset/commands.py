"""``python -m lora_trainer dataset …``: argument parsing and printing over ``health``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    from lora_trainer.dataset.health import HealthSettings, check_dataset

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
    )
    report = check_dataset(args.folder, settings)
    print(report.to_json() if args.json else report.to_text())
    if report.errors:
        raise SystemExit(1)  # scripts can run `dataset check DIR && train …`


def _add_bucket_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-bucket-reso", type=int, default=256)
    parser.add_argument("--max-bucket-reso", type=int, default=1024)
    parser.add_argument("--bucket-reso-steps", type=int, default=64)


def add_dataset_commands(subparsers) -> None:
    """Register ``dataset check`` on the CLI's sub-command list."""
    dataset = subparsers.add_parser("dataset", help="check or prepare a training image folder")
    commands = dataset.add_subparsers(dest="dataset_command", required=True)

    check = commands.add_parser(
        "check", help="health report: what sd-scripts will do with a --train_data_dir folder",
        description="Read-only. Exit status 1 when the report has errors (training would fail or train nothing).")
    check.add_argument("folder", type=Path, help="the folder holding <repeats>_<name> image folders")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--resolution", type=parse_resolution, default=(512, 512), help="512 or 512,768 (default 512)")
    check.add_argument("--batch-size", type=int, default=1)
    check.add_argument("--trigger", help="the trigger word every caption should contain")
    check.add_argument("--no-buckets", action="store_true", help="check as if enable_bucket were off")
    check.add_argument("--bucket-no-upscale", action="store_true")
    check.add_argument("--caption-extension", default=".txt")
    _add_bucket_options(check)
    check.set_defaults(run=run_check)

