"""``python -m lora_trainer grid RUN``: the Prompt-Lora-Grid without the browser. The plan is the Grid tab's, the
API's and the demo's (``plan.py``), drawn by the standalone app's host on our own model code; the grid's path is the
one line on stdout (scripts capture it), everything else goes to stderr."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError
from .axes import typed_values
from .plan import AXIS_KINDS, DEFAULT_X_AXIS, DEFAULT_Y_AXIS, AxisSpec


def axis_option(text: str) -> AxisSpec:
    """``--x KIND[:VALUES]``: the kind, then the values as the Grid tab reads its field (an epoch axis without
    values: every file of the run)."""
    kind, _, values = text.partition(":")
    kind = kind.strip().lower()
    return AxisSpec(kind, typed_values(kind, values.strip()))


def add_grid_command(commands) -> None:
    from ..app.standalone import DEFAULT_DATA
    from ..cli import DEFAULT_LORA_FOLDER

    kinds = ", ".join(AXIS_KINDS)
    grid = commands.add_parser(
        "grid", help="a training run's epochs × strengths (or LoRAs, prompts, seeds, checkpoints), as the Grid tab",
        description="The Prompt-Lora-Grid tab from the command line: each cell is the image its prompt's <lora:…> tag "
                    "gives, the same seed everywhere; a progress bar on stderr, the grid's path on stdout.")
    grid.add_argument("training_run", metavar="RUN",
                      help="a training run or LoRA by its name in the Lora folders (name@e3: its epoch 3; or as a "
                           "prompt's <lora:name:weight>), or the path of one of its .safetensors files (its run's epoch "
                           "files are found beside it)")
    grid.add_argument("--x", type=axis_option, default=":".join(DEFAULT_X_AXIS), metavar="KIND[:VALUES]",
                      help=f"the columns: KIND is one of {kinds}; VALUES as in the Grid tab: comma separated, a value "
                           'holding a comma in double quotes, ranges such as 1-10 [5] or 0-1 (+0.25) '
                           f"(default: {':'.join(DEFAULT_X_AXIS)})")
    grid.add_argument("--y", type=axis_option, default=":".join(DEFAULT_Y_AXIS), metavar="KIND[:VALUES]",
                      help="the rows, as --x (default: epoch: every epoch file of the run)")
    grid.add_argument("--strength", help="the LoRA's strength where no axis sets it (default: the weight of a RUN given "
                                         "as <lora:name:weight>, else 1)")
    grid.add_argument("--no-baseline", action="store_true", help="leave out the column without the LoRA")
    grid.add_argument("--yes", action="store_true", help="draw a grid of more than 400 images (the Grid tab asks first)")
    grid.add_argument("--prompt", help="the prompt of every cell, which the grid adds each cell's <lora:…> tag to "
                                       "(default: zkstar on the tiny model, else empty)")
    grid.add_argument("--negative", help="negative prompt")
    grid.add_argument("--model", type=Path, help="checkpoint file or Diffusers folder, as generate takes it "
                                                 "(default: the tiny shapes model, also named tiny-sd)")
    grid.add_argument("--sampler", help="Euler, Euler a, DPM++ 2M Karras, DPM++ 2S a Karras, DDIM "
                                        "(default: DPM++ 2M Karras)")
    grid.add_argument("--steps", type=int, help="default: 20")
    grid.add_argument("--cfg-scale", "--cfg", type=float, help="default: 5 on the tiny model, else 7")
    grid.add_argument("--seed", type=int, help="one seed for every cell; -1 draws one (default: 11 on the tiny model, "
                                               "else -1)")
    grid.add_argument("--width", type=int, help="default: the model's own size (the tiny model 64, SD1 512, SDXL "
                                                "1024)")
    grid.add_argument("--height", type=int, help="default: the model's own size")
    grid.add_argument("--clip-skip", type=int, help="default: 1")
    grid.add_argument("--lora-dir", type=Path, action="append",
                      help=f"where LoRA names are looked up (repeatable; default: {DEFAULT_LORA_FOLDER} and "
                           f"{DEFAULT_DATA / 'Lora'}, the app's, where they exist); a RUN given as a path adds its own "
                           "folder")
    grid.add_argument("--out", type=Path, default=DEFAULT_DATA / "grids",
                      help=f"where the grid and its cells are saved (default: {DEFAULT_DATA / 'grids'}, where the app "
                           "started in the same folder saves its grids)")
    grid.set_defaults(run=draw_grid)


def draw_grid(args) -> Path | None:
    """Plan the grid as the Grid tab does, say what the plan noted and the losses the trainer recorded, draw it with
    a bar over the cells, then print its path. Ctrl-C stops after the cell being drawn."""
    from ..app.standalone_host import StandaloneHost
    from ..cli import default_lora_folders, model_path
    from ..console import progress_callback
    from ..models.checkpoint import native_resolution
    from .axes import parse_values
    from .plan import (SETTING_RANGES, GridRequest, LoraNameShadowed, LoraNotFound, checked_setting, host_sampler,
                       lora_tag, missing_epoch, plan_for_host, run_grid, save_result, unfinished_images)

    strengths = [None] if args.strength is None else parse_values(args.strength)
    if len(strengths) != 1:
        raise UserError(f"--strength {args.strength}: give one strength, such as 0.8 (several go on an axis: "
                        f"--x strength:{args.strength})")
    run_file = _run_file(args.training_run)
    folders = [folder.resolve() for folder in args.lora_dir or default_lora_folders()]
    if run_file is not None and not any(run_file.is_relative_to(folder) for folder in folders):
        folders.append(run_file.parent)  # last: its names win over a file of the same name elsewhere
    checkpoint = model_path(args.model)  # as generate takes it
    host = StandaloneHost([], folders, default_checkpoint=checkpoint)
    name = (lora_tag(args.training_run) or (args.training_run,))[0]
    if run_file is None and host.library.resolve(name) is None:
        if missing := missing_epoch(name, host.library):
            raise UserError(missing)
        raise UserError(f"no LoRA or training run named {name!r} in {' or '.join(map(str, folders))}; "
                        "give its name there, the path of one of its files, or its folder with --lora-dir")
    defaults = host.generation_defaults()
    native = native_resolution(checkpoint) if args.width is None or args.height is None else None
    given = {"prompt": args.prompt, "negative_prompt": args.negative, "steps": args.steps, "cfg_scale": args.cfg_scale,
             "seed": args.seed, "clip_skip": args.clip_skip,  # 0 is refused below, not taken for "not given"
             "width": native if args.width is None else args.width, "height": native if args.height is None else args.height}
    given = {key: checked_setting(key, value, f"--{key.replace('_', '-')}") if key in SETTING_RANGES else value
             for key, value in given.items() if value is not None}
    settings = dataclasses.replace(defaults, **given,
                                   sampler=host_sampler(host, args.sampler or defaults.sampler, "--sampler"))
    request = GridRequest(_checkpoint_files(args.x), _checkpoint_files(args.y), settings,
                          lora=str(run_file or args.training_run), strength=strengths[0],
                          checkpoint=str(checkpoint) if args.model else None, baseline=not args.no_baseline,
                          confirmed=args.yes)
    try:
        plan, _ = plan_for_host(request, host.library, host)
    except LoraNotFound as error:  # the Lora folders here are --lora-dir's, read afresh: no refresh to wait for
        raise error.advised("check the name, or add the folder that has it with --lora-dir" if error.by_name else
                            "add its folder with --lora-dir") from None
    except LoraNameShadowed as error:
        raise error.advised("rename or move one of the two files, then run the grid command again") from None
    except UserError as error:
        if error.field == "confirmed":
            raise UserError(f"{error}: add --yes to draw it") from None
        raise
    for note in plan.notes:
        print(f"warning: {note}", file=sys.stderr)
    for line in _loss_lines(plan):
        print(line, file=sys.stderr)
    stop, saving = threading.Event(), threading.Event()

    def stopping() -> bool:  # asked before each cell: where it says stop, the grid is assembled and saved
        if stop.is_set():
            saving.set()
        return stop.is_set()

    with _stopped_by_ctrl_c(stop, saving, args.out):
        with progress_callback("cell", "grid") as progress:
            def drawn(done: int, total: int) -> None:
                progress(done, total)
                if done == total:  # the last cell: the grid is assembled and saved next
                    saving.set()

            result = run_grid(host, plan, None, drawn, stopping)  # the host logs a LoRA it leaves out as it does
        try:
            save_result(result, plan, args.out)
        except KeyboardInterrupt:
            print(f"\ninterrupted while saving into {args.out}: what was written there by then stays (the grid is "
                  "written first, then its cells)", file=sys.stderr)
            raise SystemExit(130) from None
    if result.path is None:
        print("interrupted before the first cell finished: nothing was saved" if result.stopped else
              "no cell finished (every one was skipped): nothing was saved", file=sys.stderr)
    elif unfinished := unfinished_images(result, plan):
        print(unfinished, file=sys.stderr)
    for warning in result.warnings:  # labels drawn as boxes: which font to install
        print(f"warning: {warning}", file=sys.stderr)
    if result.path is not None:
        rows, columns = plan.size
        print(f"grid of {rows} × {columns} images in {result.seconds:.1f} s", file=sys.stderr)
        print(result.path)
    if result.stopped:
        raise SystemExit(130)  # as an interrupted command: a script must not take the grid for a whole one
    if result.path is None:
        raise SystemExit(1)
    return result.path


def _run_file(run: str) -> Path | None:
    """RUN as a file path (a name such as ``char_v1.5`` is not one), or None for a name; a path that is not there is
    refused."""
    from ..networks.activation import LORA_SUFFIXES
    from .plan import is_lora_tag

    path = Path(run)
    if is_lora_tag(run) or not ("/" in run or "\\" in run or path.suffix.lower() in LORA_SUFFIXES):
        return None
    if not path.is_file():
        raise UserError(f"{run}: no such LoRA file; give one of the run's .safetensors files, or the run's name")
    return path.resolve()


def _checkpoint_files(axis: AxisSpec) -> AxisSpec:
    """A checkpoint axis's values as --model takes them (files, Diffusers folders, tiny-sd: the bundled model); one
    that is not there is refused now, where the host would find it missing only at its cells, after drawing the cells
    before them."""
    from ..cli import model_path

    if axis.kind != "checkpoint":
        return axis
    return dataclasses.replace(axis, values=[str(model_path(Path(value), "checkpoint axis:")) for value in axis.values])


def _loss_lines(plan) -> list[str]:
    """The Grid tab's table of the losses the trainer recorded, as text (nothing where it recorded none)."""
    from .plan import LOSS_COLUMNS, loss_rows

    rows = [[name, _loss(training), _loss(validation), best] for name, training, validation, best in loss_rows(plan)]
    if not rows:
        return []
    widths = [max(len(str(row[i])) for row in [LOSS_COLUMNS, *rows]) for i in range(len(LOSS_COLUMNS))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in [LOSS_COLUMNS, *rows]]


def _loss(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


@contextlib.contextmanager
def _stopped_by_ctrl_c(stop: threading.Event, saving: threading.Event, folder: Path) -> Iterator[None]:
    """While the cells are drawn, Ctrl-C sets ``stop``: the grid ends after the cell being drawn and saves the cells
    drawn so far (the others grey); a second Ctrl-C stops at once, saving nothing. Once ``saving`` is set, the grid
    and its cells are being written to ``folder``: Ctrl-C lets that finish (cut short, it left the cells without the
    grid), saying so; one more stops it, keeping what was written. Outside the main thread (no signals there), or
    where Ctrl-C is ignored (a script's background job), it does nothing."""
    before = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if before is None or before == signal.SIG_IGN:
        yield
        return
    at_once = before if callable(before) else signal.default_int_handler
    pressed_while_saving = threading.Event()

    def pressed(signum, frame) -> None:
        if saving.is_set() and not pressed_while_saving.is_set():
            pressed_while_saving.set()
            print(f"\nsaving the grid in {folder} first (Ctrl-C again stops, keeping what is saved by then)",
                  file=sys.stderr)
        elif stop.is_set() or saving.is_set():
            at_once(signum, frame)
        else:
            stop.set()
            print("\nstopping after the current cell, then saving the cells drawn (Ctrl-C again while the cell is "
                  "drawn stops at once, saving nothing)", file=sys.stderr)

    signal.signal(signal.SIGINT, pressed)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
