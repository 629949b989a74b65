"""``python -m lora_trainer ui``: the three tabs and the HTTP API on one FastAPI app, on our own model code.

Listens on 127.0.0.1 unless told otherwise; with ``--listen`` the API and the pages require ``--api-auth`` (they
refuse otherwise, unless ``--allow-unauthenticated``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..jobs.store import Job, trainer_alive
from .settings import AppSettings, parse_api_auth

if TYPE_CHECKING:  # the CLI imports this module; torch and gradio load only when the app starts
    from .services import Services

log = logging.getLogger("lora_trainer.ui")

# relative: started from another folder the app has another (empty) job list and Lora folder, so help and the
# startup line name the folder it resolved to
DEFAULT_DATA = Path("lora-trainer-data")


def add_ui_command(commands) -> None:
    ui = commands.add_parser("ui", help="the Train / Tag editor / Grid tabs in a browser, without the WebUI")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    ui.add_argument("--listen", action="store_true",
                    help="listen on every interface (0.0.0.0); the API and the pages then need --api-auth")
    ui.add_argument("--port", type=int, default=7870)
    ui.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help=f"job database, job folders, grids (default: {DEFAULT_DATA} in the current folder"
                         f"{_resolved_for_help(DEFAULT_DATA)})")
    ui.add_argument("--lora-dir", type=Path, help="where finished LoRAs go (default: <data>/Lora)")
    ui.add_argument("--dataset-root", type=Path, action="append", default=[],
                    help="a folder datasets may be read from (repeatable; the bundled sample always is, and the current "
                         "folder when the app serves this machine only)")
    ui.add_argument("--checkpoint-dir", type=Path, action="append", default=[], help="a folder of base checkpoints (repeatable)")
    ui.add_argument("--api-auth", help="user:password[,user2:password2] for the HTTP API (and the pages, with --listen)")
    ui.add_argument("--allow-unauthenticated", action="store_true", help="serve the API to the network without credentials")
    ui.set_defaults(run=run)


def _resolved_for_help(relative: Path) -> str:
    try:
        return ", now " + str(relative.resolve()).replace("%", "%%")  # argparse formats help with %
    except OSError:  # the current folder was deleted: every command builds this help, and the others still work
        return ""


def listens_remotely(args: argparse.Namespace) -> bool:
    return args.listen or args.host not in ("127.0.0.1", "localhost", "::1")


def settings_from(args: argparse.Namespace) -> AppSettings:
    from ..tiny_model.demo import SAMPLE_DATASET

    data = args.data.resolve()
    # the folder it was started in is a convenience on this machine; on the network (started from ~, say) it would
    # open every file below it to each client
    here = [] if listens_remotely(args) else [Path.cwd()]
    return AppSettings(
        lora_folder=(args.lora_dir or data / "Lora").resolve(),
        data_folder=data,
        dataset_roots=[*(p.resolve() for p in args.dataset_root), SAMPLE_DATASET, *here],
        checkpoint_folders=[p.resolve() for p in args.checkpoint_dir],
        allow_unauthenticated_remote=args.allow_unauthenticated,
        api_credentials=parse_api_auth(args.api_auth),
    )


def create_app(services: Services, listening_remotely: bool):
    """One FastAPI app: the API routes under /lora-trainer/v1/ and the tabs at /."""
    import gradio as gr
    from fastapi import FastAPI

    from .api import register
    from .ui import build_tabs

    app = FastAPI(title="LoRA Trainer")
    register(app, services, listening_remotely, own_pages=True)
    tabs = build_tabs(services)  # built outside the page: a Blocks created inside another would render twice
    with gr.Blocks(title="LoRA Trainer", analytics_enabled=False, css=_stylesheet()) as page:
        for blocks, title, elem_id in tabs:
            with gr.Tab(title, elem_id=elem_id):
                blocks.render()
    page.queue()
    return gr.mount_gradio_app(app, page, path="/")


def _stylesheet() -> str:
    """The extension's ``style.css``: the copy a wheel carries in the package (setup.py), or the checkout's own."""
    package = Path(__file__).resolve().parents[1]
    for path in (package / "assets" / "style.css", package.parent / "style.css"):
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return ""


def startup_line(address: str, port: int, settings: AppSettings) -> str:
    """The address, and where the jobs and LoRAs are: started from another folder, the app finds none of them."""
    return (f"LoRA Trainer: http://{address}:{port}/ (jobs in {settings.data_folder}, "
            f"LoRAs in {settings.lora_folder})")


def still_training(jobs: Iterable[Job], data_folder: Path) -> list[str]:
    """A line for each trainer that outlives the app: it runs in its own session (jobs.runner.own_group) so that a
    restart follows it, and an app that exits without a word looks as if it had stopped it; then one for each queued
    job, which nothing starts until the app runs again (a user took the queue for running on, as the trainer does)."""
    jobs = list(jobs)
    running = [f"job {job.id} ({job.name}) is still training in the background (pid {job.pid}); start the app again "
               f"(same data folder: {data_folder}) to follow or stop it"
               for job in jobs if job.status == "running" and trainer_alive(job)]
    queued = [f"job {job.id} ({job.name}) waits in the queue: it starts only when the app starts again (same data "
              f"folder: {data_folder}), after the jobs before it"
              for job in sorted(jobs, key=lambda job: job.id) if job.status == "queued"]
    return running + queued


SHUTDOWN_CANCEL = "timeout graceful shutdown exceeded"  # uvicorn's words for the connections it cancels at exit


class ClosedConnectionsSaidQuietly(logging.Filter):
    """uvicorn cancels the connections still open when its graceful wait ends (a browser page, a client following a
    job's events) and logged that as an error with a 30-line traceback for each: an ordinary exit, said in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        import asyncio

        error = record.exc_info and record.exc_info[1]
        if isinstance(error, asyncio.CancelledError) and SHUTDOWN_CANCEL in " ".join(map(str, error.args)):
            return False  # any other cancel while serving is an error, and said as one
        if SHUTDOWN_CANCEL in record.getMessage():
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "closing the connections still open (browser pages, event streams)", ()
        return True


def _exit_on_terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> None:
    import importlib.util

    missing = [name for name in ("gradio", "fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:  # the base install trains and generates; the app is an extra, kept out of the WebUI's venv
        raise UserError(f"the standalone app needs {', '.join(missing)}, which this install lacks: "
                        "pip install -e \".[ui]\" in the extension's folder (or pip install \"lora-trainer[ui]\")")
    import uvicorn

    from .grid_queue import grids_at_exit
    from .services import Services
    from .standalone_host import StandaloneHost
    from .tag_sessions import unsaved_edits_at_exit
    from .ui.grid_tab import stop_every_grid

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = settings_from(args)
    settings.lora_folder.mkdir(parents=True, exist_ok=True)
    host = StandaloneHost(settings.checkpoint_folders, [settings.lora_folder])
    services = Services.create(settings, host)
    address = "0.0.0.0" if args.listen else args.host
    # uvicorn raises a SIGTERM (Windows' Ctrl-Break: SIGBREAK) again once it has shut down: the default handler then
    # ended the process before the finally below (the runner's hand-over, the lines on trainers still running); a
    # SystemExit runs it
    for name in ("SIGTERM", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _exit_on_terminate)
    try:
        app = create_app(services, listening_remotely=listens_remotely(args))
        log.info("%s", startup_line(address, args.port, settings))
        # open event streams and the page's websocket would hold a graceful shutdown forever
        logging.getLogger("uvicorn.error").addFilter(ClosedConnectionsSaidQuietly())
        uvicorn.run(app, host=address, port=args.port, log_level="warning", timeout_graceful_shutdown=3)
    finally:
        tab_grids = stop_every_grid(settings.grids_folder)  # first: they stop while the API's grid does
        grids = services.grids.close()  # the grid being drawn ends after its image, before Python finalizes
        services.close()
        for line in [*still_training(services.store.all(), settings.data_folder), *grids_at_exit(grids), *tab_grids]:
            log.warning("%s", line)
        for line in unsaved_edits_at_exit(services.tag_sessions.unsaved_at_exit()):
            log.warning("%s", line)
        if services.grids.abandoned:
            logging.shutdown()
            os._exit(130)
