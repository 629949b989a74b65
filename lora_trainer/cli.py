"""``python -m lora_trainer <command>``: a thin shell over the package; every error a user can cause is one sentence."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .app.standalone import add_ui_command
from .console import utf8_when_redirected
from .dataset.commands import add_dataset_commands
from .errors import UserError
from .grid.commands import add_grid_command
from .networks.tools.commands import add_lora_commands

DEFAULT_LORA_FOLDER = Path("models") / "Lora"  # the WebUI's, as a path from the folder it runs in


def _device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _reference_folder() -> Path:
    """The ecosystem's reference facts: $LORA_TRAINER_REFERENCE, else the workspace's ../shared/reference."""
    return Path(os.environ.get("LORA_TRAINER_REFERENCE") or Path(__file__).resolve().parents[2] / "shared" / "reference")


def default_lora_folders() -> list[Path]:
    """Where LoRA names are looked up without --lora-dir: the WebUI's Lora folder and the one of the app started here
    (``ui``'s default), those that exist (the first when neither does, for the message)."""
    from .app.standalone import DEFAULT_DATA

    candidates = [DEFAULT_LORA_FOLDER, DEFAULT_DATA / "Lora"]
    return [folder for folder in candidates if folder.is_dir()] or candidates[:1]


def _checkpoint(given: Path | None) -> Path:
    """A checkpoint argument: a file or folder, the bundled tiny model by a name the API takes (tiny-sd), or, not
    given, the tiny model."""
    from .tiny_model.build import TINY_MODEL_PATH, bundled_model

    return TINY_MODEL_PATH if given is None else bundled_model(given) or given


def model_path(given: Path | None, option: str = "--model") -> Path:
    """A model as generate and grid take it (``_checkpoint``): a checkpoint file, a Diffusers folder, tiny-sd, or,
    not given, the tiny model; anything else is refused in one sentence naming ``option``, before any work."""
    from .models.diffusers_format import is_diffusers_folder

    path = _checkpoint(given)
    if path.is_file() or is_diffusers_folder(path):
        return path
    found = " is a folder but not a Diffusers model (no unet/config.json)" if path.is_dir() else ": no such file"
    raise UserError(f"{option} {given}{found}; give a .safetensors or .ckpt file, a Diffusers model folder, or tiny-sd")


def load_for_inference(model: Path | None, vae: Path | None, precision: str | None, device: str, prediction: str | None):
    import torch

    from .models.checkpoint import load_checkpoint
    from .models.common import parse_dtype

    device = _device(device)
    dtype = parse_dtype(precision or ("fp16" if device == "cuda" else "fp32"))
    path = model_path(model)
    return load_checkpoint(path, dtype=dtype, device=device, vae_path=vae, prediction_type=prediction,
                           vae_dtype=torch.float32 if device == "cpu" else None)


def save_png(image, infotext: str, folder: Path, seed: int) -> Path:
    """WebUI-style ``00012-1234.png`` with the ``parameters`` text chunk, written atomically."""
    from .sampling.txt2img import write_png

    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name[:5]) for p in folder.glob("*.png") if p.name[:5].isdigit()]
    return write_png(image, folder / f"{max(numbers, default=-1) + 1:05d}-{seed}.png", infotext)


def generate(args) -> list[Path]:
    from tqdm import tqdm

    from .models.prompt import prompt_problems
    from .sampling.samplers import sampler_name
    from .sampling.txt2img import GenerationSettings, model_infotext, txt2img

    for option, value, low in (("--steps", args.steps, 1), ("--cfg-scale", args.cfg_scale, 0), ("--seed", args.seed, -1),
                               ("--batch-size", args.batch_size, 1), ("--clip-skip", args.clip_skip, 1)):
        if not value >= low:  # before the model loads (--steps 0 died in the sampler); nan is not a number here
            raise UserError(f"{option} {value:g}: give {low} or more", option)
    try:
        sampler_name(args.sampler)
    except ValueError as error:
        raise UserError(str(error), "--sampler") from None
    for text in (args.prompt, args.negative):
        for problem in prompt_problems(text):
            print(f"warning: {problem}", file=sys.stderr)
    model = load_for_inference(args.model, args.vae, args.precision, args.device, args.prediction_type)
    _, extra = apply_prompt_loras(args.prompt, model, args.lora_dir or default_lora_folders())
    resolution = model.config.resolution
    settings = GenerationSettings(
        prompt=args.prompt,
        negative_prompt=args.negative,
        steps=args.steps,
        sampler=args.sampler,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        width=args.width or resolution,
        height=args.height or resolution,
        batch_size=args.batch_size,
        clip_skip=args.clip_skip,
        extra_infotext=extra,
    )
    info = model_infotext(model.path)
    with tqdm(total=args.steps, desc="sampling", unit="step", disable=args.quiet) as bar:
        images = txt2img(model, settings, callback=lambda step, total: bar.update(1), model_info=info)
    paths = [save_png(g.image, g.infotext, args.out, g.seed) for g in images]
    for path in paths:
        print(path)
    return paths


def apply_prompt_loras(prompt: str, model, folders: list[Path]) -> tuple[list[tuple[str, Path]], dict[str, str]]:
    """The prompt's ``<lora:name:weight>`` tags merged into the model as the WebUI would (each one left out is said);
    the LoRAs used and their ``Lora hashes`` infotext."""
    from .networks.activation import LoraLibrary, lora_hashes_infotext, merge_prompt_loras
    from .networks.apply import MergedNetworks

    library = LoraLibrary(folders)
    merged = MergedNetworks.for_model(model.config, model.unet, model.text_encoders)
    used, skipped = merge_prompt_loras(prompt, library, merged, model.config)
    for _, message in skipped:
        print(f"warning: {message}", file=sys.stderr)
    return used, lora_hashes_infotext(used, library)


def inspect_model(args) -> None:
    from .models.inspect import inspect_checkpoint

    print("\n".join(inspect_checkpoint(_checkpoint(args.file), with_hashes=not args.no_hash).lines()))


def demo(args) -> None:
    from .tiny_model.demo import run_demo

    print(run_demo(args.out))


def build_tiny_model(args) -> None:
    from .tiny_model.build import TINY_MODEL_PATH, BuildSettings, build

    build(args.out or TINY_MODEL_PATH, BuildSettings.quick() if args.quick else BuildSettings(seed=args.seed))


def bench(args) -> None:
    from .bench import run_bench

    run_bench(args.area, args)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m lora_trainer", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    g = commands.add_parser("generate", help="txt2img from a checkpoint (default: the embedded tiny model)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--model", type=Path, help="checkpoint file or Diffusers folder (default: the tiny shapes model, "
                   "also named tiny-sd)")
    g.add_argument("--vae", type=Path, help="a separate VAE file")
    g.add_argument("--sampler", default="Euler a", help="Euler, Euler a, DPM++ 2M Karras, DPM++ 2S a Karras, DDIM")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--cfg-scale", "--cfg", type=float, default=7.0)
    g.add_argument("--seed", type=int, default=-1)
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--batch-size", "-n", type=int, default=1)
    g.add_argument("--clip-skip", type=int, default=1)
    g.add_argument("--precision", choices=["fp32", "fp16", "bf16"])
    g.add_argument("--device", default="auto")
    g.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="override eps/v detection")
    g.add_argument("--lora-dir", type=Path, action="append",
                   help=f"where <lora:name:weight> tags of the prompt are looked up (repeatable; default: "
                        f"{DEFAULT_LORA_FOLDER} and lora-trainer-data/Lora, the app's, where they exist)")
    g.add_argument("--out", type=Path, default=Path("outputs") / "txt2img")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(run=generate)

    m = commands.add_parser("model", help="model file tools").add_subparsers(dest="model_command", required=True)
    i = m.add_parser("inspect", help="say what kind of model a file is")
    i.add_argument("file", type=Path, help="a checkpoint file or Diffusers folder, or tiny-sd (the bundled model)")
    i.add_argument("--no-hash", action="store_true", help="skip hashing (fast on big files)")
    i.set_defaults(run=inspect_model)

    d = commands.add_parser("demo", help="the main job on the embedded default (tiny model)")
    d.add_argument("--out", type=Path, default=Path("outputs") / "demo")
    d.set_defaults(run=demo)

    b = commands.add_parser("build-tiny-model", help="train the embedded tiny base model from scratch on CPU")
    b.add_argument("--out", type=Path)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quick", action="store_true", help="a few steps only, to check the script")
    b.set_defaults(run=build_tiny_model)

    bench_parser = commands.add_parser("bench", help="print speed and memory figures")
    bench_parser.add_argument("area", choices=["load", "generate", "networks", "train", "tags", "prep", "ui", "api", "grid", "tags-ui"])
    bench_parser.add_argument("--work-dir", type=Path, help="where to write the random full-size checkpoints")
    bench_parser.add_argument("--models", default="sd15,sdxl")
    bench_parser.add_argument("--fixtures", type=Path, default=_reference_folder() / "kohya-fixtures",
                              help="sd-scripts' fixture folder (train; default: kohya-fixtures in $LORA_TRAINER_REFERENCE, "
                                   "else in the workspace's ../shared/reference)")
    bench_parser.add_argument("--precision", default="fp16", choices=["fp16", "fp32", "bf16"], help="weights dtype (networks)")
    bench_parser.add_argument("--size", default="reference", choices=["reference", "small", "sd15", "sdxl"],
                              help="train: sd-scripts' reference run on the tiny fixture, or random weights of a small "
                                   "SD1-architecture model, SD1.5 or SDXL (images/s, peak memory, FLOP utilisation)")
    bench_parser.add_argument("--sd-scripts", type=Path, metavar="CHECKOUT",
                              help="train: also run sd-scripts' train_network.py from this checkout on the reference run, "
                                   "alternately with ours, and print the ratios")
    bench_parser.add_argument("--rounds", type=int, default=1, help="train: how many times to run the reference run (each)")
    bench_parser.add_argument("--sd-scripts-arg", action="append", default=[], metavar="ARG",
                              help="train: an extra argument for sd-scripts (e.g. --sd-scripts-arg=--tokenizer_cache_dir=DIR)")
    bench_parser.add_argument("--steps", type=int, default=12, help="train --size: optimizer steps (the first 2 are warm-up)")
    bench_parser.add_argument("--batch", type=int, help="train --size: batch size (default per size)")
    bench_parser.add_argument("--resolution", type=int, help="train --size: pixels (default: the size's native resolution)")
    bench_parser.add_argument("--gradient-checkpointing", action="store_true", help="train --size: as on 6–12 GB cards")
    bench_parser.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                              help="train --size: an extra trainer argument (e.g. --train-arg=--xformers)")
    bench_parser.add_argument("--peak-tflops", type=float, help="train --size: the device's dense bf16 peak, for MFU "
                                                                "(known GPUs are looked up)")
    bench_parser.set_defaults(run=bench)

    add_dataset_commands(commands)
    add_lora_commands(commands)
    add_grid_command(commands)
    add_ui_command(commands)
    return root


def hyphenated(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with sd-scripts' underscored spelling of our ``--long-options`` (``--caption_extension``, which
    ``train_network`` and the hints of ``dataset check`` use) written with hyphens, as ``parser`` and its
    sub-commands spell them; what follows ``--`` and the values after ``=`` stay as they are. (Registered as second
    names instead, they made every shortened option ambiguous: ``--batch`` matched ``--batch-size`` and ``--batch_size``.)"""
    spelled: set[str] = set()
    words, current = list(argv), parser

    def learn(of: argparse.ArgumentParser) -> None:  # the options of the command named so far, not of the others
        spelled.update(option for action in of._actions for option in action.option_strings if option.startswith("--"))

    learn(current)
    for index, word in enumerate(words):
        if word == "--":
            break
        commands = next((a.choices for a in current._actions if isinstance(a, argparse._SubParsersAction)), {})
        if word in commands:
            current = commands[word]
            learn(current)
            continue
        option, equals, value = word.partition("=")
        if option.startswith("--") and "_" in option and option not in spelled:
            hyphens = "--" + option[2:].replace("_", "-")
            if hyphens in spelled:
                words[index] = hyphens + equals + value
    return words


def main(argv: list[str] | None = None) -> int:
    utf8_when_redirected()
    commands = parser()
    args = commands.parse_args(hyphenated(sys.argv[1:] if argv is None else argv, commands))
    try:
        args.run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `… | head` stopped reading: it has what it wanted, and a traceback would follow it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail again
        return 1
    return 0
