"""``python -m lora_trainer.train_network`` — sd-scripts' train_network.py command line, on our own trainer.

SD1, SD2 and SDXL are told apart from the checkpoint itself; ``sdxl_train_network`` is the same entry point.
"""

from __future__ import annotations

import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def main(argv: list[str] | None = None, prog: str = "python -m lora_trainer.train_network") -> int:
    started = time.time()  # a control word older than this is an earlier run's
    # a stop from the first moment (the job runner sends SIGTERM to a trainer that has not taken a step): while the
    # options are read and torch is imported it ends the run in one sentence, not a traceback or a silent kill
    with _interrupt_on_sigterm():
        try:
            return _main(argv, prog, started)
        except KeyboardInterrupt:
            print("stopped before the run started: nothing was trained or saved", file=sys.stderr)
            return 130


def _main(argv: list[str] | None, prog: str, started: float) -> int:
    from .console import utf8_when_redirected
    from .training.events import EventLog
    from .training.options import (kohya_command, kohya_command_notes, non_default, parse_args, sd_scripts_notes,
                                   write_output_config)

    utf8_when_redirected()
    try:
        options, actions = parse_args(argv, prog)
        entry = "sdxl_train_network.py" if "sdxl" in prog else "train_network.py"
        if actions.print_kohya_command:  # the script for the checkpoint's version, as the backend would run
            from .training.sd_scripts_backend import for_sd_scripts

            script, told = for_sd_scripts(options, unreadable=entry)
            print(kohya_command(told, script))
            for note in [*sd_scripts_notes(told, script), *kohya_command_notes(told, script)]:  # stdout: the line alone
                print(f"note: {note}", file=sys.stderr)
            return 0
        if actions.print_config:
            for name, value in non_default(options).items():
                print(f"{name} = {value!r}")
            return 0
        if options.output_config:
            print(f"wrote {write_output_config(options)}")
            return 0
        from .training.distributed import world_from_env
        from .training.trainer import train

        if entry == "sdxl_train_network.py" and not options.backend:
            from .training.sd_scripts_backend import for_sd_scripts

            if for_sd_scripts(options, unreadable=entry)[0] != entry:  # as train_network does: said, not refused
                actions.notes.append(f"{prog} was given a checkpoint that is not SDXL: it trains for the checkpoint's "
                                     "own version (read from the file), where sd-scripts' sdxl_train_network.py would "
                                     "stop; train_network is the command for it")

        name = options.output_name or "last"
        to_stdout = options.events_file == "-"  # JSON lines for a program reading this process
        events_path = None if to_stdout else (
            options.events_file or str(Path(options.output_dir or "output") / f"{name}.events.jsonl"))
        world = world_from_env()
        main_rank = world.is_main  # under torchrun, rank 0 tells
        with EventLog(events_path if main_rank else None, echo=sys.stdout if to_stdout and main_rank else None,
                      console=sys.stderr if main_rank else None) as events:
            try:
                if options.backend:
                    from .training.sd_scripts_backend import run_sd_scripts

                    log = Path(events_path).with_suffix(".sd-scripts.log") if events_path else \
                        Path(options.output_dir or "output") / f"{name}.sd-scripts.log"
                    run_sd_scripts(options, events, log, started)
                    return 0
                with _interrupt_on_sigterm():
                    train(options, events, actions.notes, started)
            except KeyboardInterrupt:  # before the training loop's own handlers (loading, caching): nothing to save
                if events.ended:  # a second Ctrl-C after the loop gave the signals back: the end event told the outcome
                    print("interrupted after the run ended: the files it listed are saved", file=sys.stderr)
                    return 0
                message = "stopped before the first step (the model was loading or the latents caching): nothing was trained or saved"
                events.emit("end", files=[], steps=0, stopped=True, message=message)
                print(message, file=sys.stderr)
                return 130
            except UserError as error:
                _tell(events, events_path, world, str(error))
                raise
            except Exception as error:  # a bug: the UI and the API show this event; the traceback goes to the console
                if (stopped := _another_process_stopped(error, world)) is not None:
                    _tell(events, events_path, world, stopped)
                    raise UserError(stopped) from None
                _tell(events, events_path, world, f"unexpected {type(error).__name__}: {error}; please report it with the "
                      "traceback from the console or the job's log")
                raise
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _tell(events, events_path: str | None, world, message: str) -> None:
    """The error in the run's one event stream. Under torchrun only rank 0 writes events and its error is the one
    error event; another rank's own failure (its out of memory, its unreadable image) is added as a warning with its
    rank, or the stream would name only the connection rank 0 lost."""
    from .training.events import EventLog

    if world.is_main:
        events.emit("error", message=message)
    elif events_path:
        try:
            with EventLog(events_path) as shared:
                shared.emit("warning", message=f"process {world.rank} of {world.size} stopped: {message}", rank=world.rank)
        except UserError:  # its folder not writable from here: its console says it
            pass


def _another_process_stopped(error: Exception, world) -> str | None:
    """What to say when a collective failed because another torchrun process ended or timed out (gloo's and NCCL's
    words), else None: it is no bug of this one."""
    text = str(error)
    words = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "NCCL", "Broken pipe")
    if not world.distributed or not any(word in text for word in words):
        return None
    return (f"process {world.rank} of {world.size} lost the others ({text.splitlines()[0][:160]}): another process "
            "stopped (its error is in these events or its console) or was waited for too long — rank 0 alone draws "
            "samples and validates; raise --ddp_timeout (minutes) if that takes longer. Nothing was saved after the "
            "last saved file or state; continue from it with --resume")


@contextmanager
def _interrupt_on_sigterm():
    """SIGTERM (and Windows' SIGBREAK) as Ctrl-C until the training loop takes them over (it finishes the step and
    saves): a stop while the model loads ends the event stream as a stop, not with a silent kill."""
    from .training.trainer import stop_signals

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = {}
    try:
        for sig in stop_signals():
            if sig != signal.SIGINT:  # Ctrl-C raises KeyboardInterrupt already
                previous[sig] = signal.signal(sig, interrupt)
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
