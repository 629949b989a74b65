"""``python -m lora_trainer lora inspect|resize|merge|bake|extract``: parse arguments, call the tools, print."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ...console import progress_callback
from ...errors import UserError


PRECISIONS = ["fp16", "bf16", "fp32", "float"]  # float: sd-scripts' name for fp32
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def network_with_numbers(text: str, most: int) -> tuple[Path, list[float]]:
    """``file[:a[:b]]`` → (file, [a, b]); numbers are read from the right so ``C:\\x.safetensors`` stays a path."""
    numbers: list[float] = []
    head = text
    while len(numbers) < most and ":" in head:
        rest, last = head.rsplit(":", 1)
        if not _NUMBER.match(last):
            break
        numbers.insert(0, float(last))
        head = rest
    if ":" in head and _NUMBER.match(head.rsplit(":", 1)[1]) and not Path(head).exists():
        raise UserError(f"{text}: at most {most} number{'s' if most > 1 else ''} after the file "
                        f"({'FILE:TE:UNET' if most == 2 else 'FILE:WEIGHT'})")
    return Path(head), numbers


def _strength(text: str):
    from ..apply import Strength

    path, numbers = network_with_numbers(text, 2)
    te = numbers[0] if numbers else 1.0
    return path, Strength(te, numbers[1] if len(numbers) > 1 else None)


def _named(path: Path) -> Path:
    """A file, or a LoRA's name as ``<lora:name>`` and ``grid`` take it, looked up in the Lora folders."""
    if path.exists() or len(path.parts) != 1:
        return path
    from ...cli import default_lora_folders
    from ..activation import LoraLibrary

    folders = default_lora_folders()
    found = LoraLibrary(folders).resolve(str(path))
    if found is None:
        raise UserError(f"{path}: no such network file, nor a LoRA of that name in {' or '.join(map(str, folders))}")
    return found


def run_inspect(args) -> None:
    from .inspect import inspect_network

    summaries = [inspect_network(_named(path), top_tags=args.tags) for path in args.files]
    if args.json:
        print("[" + ",\n".join(s.to_json() for s in summaries) + "]" if len(summaries) > 1 else summaries[0].to_json())
        return
    for summary in summaries:
        print("\n".join(summary.lines(every_key=args.all)))


def run_bake(args) -> None:
    from .bake import bake

    with progress_callback("module", "baking") as progress:
        result = bake(args.model, [_strength(text) for text in args.lora], args.out, args.precision, progress)
    print("\n".join(result.lines()))


def run_resize(args) -> None:
    from .resize import resize

    if (args.file is None) == (args.model is None):
        raise UserError("lora resize: give the LoRA to resize once, as FILE or as --model FILE")
    with progress_callback("module", "resizing") as progress:
        result = resize(args.file or args.model, args.out, args.new_rank, args.new_conv_rank, args.dynamic_method,
                        args.dynamic_param, args.precision, progress)
    print("\n".join(result.lines(per_module=args.verbose)))


def run_merge(args) -> None:
    from .merge import merge

    if args.files and args.models:
        raise UserError("lora merge: give the networks once, as FILE[:WEIGHT] … or as sd-scripts' --models FILE …")
    if not args.files and not args.models:
        raise UserError("lora merge: name the networks to merge, as FILE[:WEIGHT] … or as --models FILE … "
                        "--ratios R …")
    if args.ratios and not args.models:
        raise UserError("--ratios weighs the --models files: give the weights as FILE:WEIGHT instead", "ratios")
    inputs = []
    for text in args.files:
        path, numbers = network_with_numbers(text, 1)
        inputs.append((path, numbers[0] if numbers else 1.0))
    if args.models:
        ratios = args.ratios or [1.0] * len(args.models)
        if len(ratios) != len(args.models):
            raise UserError(f"--ratios: give one ratio for each of the {len(args.models)} --models "
                            f"({len(ratios)} given)", "ratios")
        inputs = list(zip(args.models, ratios))
    with progress_callback("module", "merging") as progress:
        result = merge(inputs, args.out, args.mode, args.new_rank, args.new_conv_rank, args.model, args.precision,
                       args.clamp_quantile, progress)
    print("\n".join(result.lines()))


def run_extract(args) -> None:
    from .extract import extract

    with progress_callback("layer", "extracting") as progress:
        result = extract(args.model_org, args.model_tuned, args.out, args.dim, args.conv_dim, args.min_diff,
                         args.clamp_quantile, args.precision, progress)
    print("\n".join(result.lines()))


def add_lora_commands(subparsers) -> None:
    """Register ``lora`` and its tools under the CLI's subcommands."""
    lora = subparsers.add_parser("lora", help="LoRA file tools: inspect, resize, merge, bake, extract")
    tools = lora.add_subparsers(dest="lora_command", required=True)

    i = tools.add_parser("inspect", help="algorithm, rank and alpha, base model, run, tags, trigger words, recommended "
                         "epoch, hashes (--all: per block, and every metadata key)")
    i.add_argument("files", type=Path, nargs="+", metavar="FILE",
                   help="a file, or a LoRA's name as <lora:name> takes it (name@e3: its epoch 3), looked up in "
                        "models/Lora and lora-trainer-data/Lora")
    i.add_argument("--all", action="store_true", help="also the rank and alpha of each block and every metadata key")
    i.add_argument("--json", action="store_true", help="print everything as JSON")
    i.add_argument("--tags", type=int, default=20, help="how many of the most frequent training tags to show")
    i.set_defaults(run=run_inspect)

    b = tools.add_parser("bake", help="merge LoRAs into a checkpoint and save a new single-file checkpoint",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="--lora takes FILE, FILE:STRENGTH or FILE:TE:UNET (as <lora:name:te:unet> in the WebUI)")
    b.add_argument("--model", type=Path, required=True, help="the checkpoint to bake into (.safetensors or .ckpt)")
    b.add_argument("--lora", action="append", required=True, metavar="FILE[:TE[:UNET]]", help="a network to bake; repeat for several")
    b.add_argument("--out", type=Path, required=True, help="the new checkpoint (.safetensors)")
    b.add_argument("--precision", choices=PRECISIONS, default="fp16", help="dtype of the saved checkpoint (default fp16)")
    b.set_defaults(run=run_bake)

    r = tools.add_parser("resize", help="SVD a LoRA/LoCon to a fixed rank or a dynamic one (sd-scripts' resize_lora)")
    r.add_argument("file", type=Path, nargs="?")
    r.add_argument("--model", type=Path, help="the LoRA to resize, as sd-scripts' resize_lora.py names it (or give it first)")
    r.add_argument("--out", "--save_to", type=Path, required=True)
    r.add_argument("--new_rank", type=int, default=4,
                   help="the rank (a module of a lower rank keeps its own); with --dynamic_method the largest rank kept")
    r.add_argument("--new_conv_rank", type=int, help="rank of conv modules, SD1's 1×1 proj_in/out too as sd-scripts "
                   "resizes them (default: --new_rank)")
    r.add_argument("--dynamic_method", choices=["sv_ratio", "sv_fro", "sv_cumulative"])
    r.add_argument("--dynamic_param", type=float, help="sv_ratio: largest/smallest kept; sv_fro, sv_cumulative: share kept (0-1)")
    r.add_argument("--precision", "--save_precision", choices=PRECISIONS, default="fp16")
    r.add_argument("--verbose", action="store_true", help="a line per module (its rank and retained norm)")
    r.set_defaults(run=run_resize)

    g = tools.add_parser("merge", help="several networks with weights into one LoRA (concatenated ranks, or SVD)")
    g.add_argument("files", nargs="*", metavar="FILE[:WEIGHT]")
    g.add_argument("--models", type=Path, nargs="+", help="the networks, as sd-scripts' merge_lora.py takes them")
    g.add_argument("--ratios", type=float, nargs="+", help="their weights, one per --models file (default 1); a weight "
                   "r gives r × ΔW, where merge_lora.py scales up by |r| and down by r (r·|r| × ΔW)")
    g.add_argument("--concat", action="store_const", const="concat", dest="mode", default=argparse.SUPPRESS,
                   help="sd-scripts' merge_lora.py switch for --mode concat (the default)")
    g.add_argument("--out", "--save_to", type=Path, required=True)
    g.add_argument("--mode", choices=["concat", "svd"], default="concat",
                   help="concat: exact, LoRA/LoCon only, rank = sum of ranks; svd: any algorithm, SVD to --new_rank")
    g.add_argument("--new_rank", type=int, help="rank of the merged LoRA (svd)")
    g.add_argument("--new_conv_rank", type=int, help="rank of 3×3 conv modules (svd; default --new_rank)")
    g.add_argument("--model", type=Path, help="the base checkpoint: needed for DoRA/OFT/IA3/GLoRA, and for LoHa/LoKr (svd)")
    g.add_argument("--clamp_quantile", type=float, default=0.99, help="clamp the SVD factors to this quantile, as sd-scripts (1: off)")
    g.add_argument("--precision", "--save_precision", choices=PRECISIONS, default="fp16")
    g.set_defaults(run=run_merge)

    e = tools.add_parser("extract", help="a LoRA from a fine-tuned checkpoint minus its base, by SVD (sd-scripts' extract)")
    e.add_argument("--model_org", "--base", type=Path, required=True, help="the base checkpoint")
    e.add_argument("--model_tuned", "--tuned", type=Path, required=True, help="the fine-tuned checkpoint")
    e.add_argument("--out", "--save_to", type=Path, required=True)
    e.add_argument("--dim", type=int, default=4, help="rank of Linear and 1×1 layers (default 4)")
    e.add_argument("--conv_dim", type=int, help="rank of 3×3 convs; without it ResBlocks are not extracted (as sd-scripts)")
    e.add_argument("--min_diff", type=float, default=0.01, help="text encoders whose weights moved less are skipped")
    e.add_argument("--clamp_quantile", type=float, default=0.99, help="clamp the factors to this quantile (1: off)")
    e.add_argument("--precision", "--save_precision", choices=PRECISIONS, default="fp16")
    e.set_defaults(run=run_extract)
