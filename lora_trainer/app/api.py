"""The HTTP API under ``/lora-trainer/v1``: training jobs (with Server-Sent Events and webhooks), LoRAs, the dataset
health report, tag-editor sessions and grids, for automation, the WebUI and the standalone app.

Bodies are plain JSON objects read and checked by our own code (the WebUI runs fastapi 0.94 with pydantic 1, Forge
and the standalone app newer ones; plain dicts behave the same under both), documented in the OpenAPI schema with
examples. Every path in a request is resolved and must lie below the configured roots; job options go through
``training.options.options_from`` only — nothing from a request is executed. Errors are always
``{"error": {"code", "message", "field"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import math
import os
import secrets
import shutil
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Mapping

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from fastapi.responses import JSONResponse as _JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from ..dataset import tag_editor
from ..dataset.caption_files import BackupNotFound
from ..errors import UserError, with_closest
from ..jobs.runner import RUNNER_OPTIONS, earlier_files_note, same_run_jobs_note, trimmed_name_note
from ..jobs.store import ACTIVE, Job
from . import tag_sessions
from .grid_queue import GridStatus
from .paths import MissingPath, PathNotAllowed, allowed_path, check_dataset_config_paths, check_metadata_images, plain_name, unquoted
from .services import Services
from .settings import AppSettings
from .tag_sessions import SaveConflict, SessionNotFound, TooManySessions, UnsavedEdits

PREFIX = "/lora-trainer/v1"
log = logging.getLogger("lora_trainer.api")


# ---------------------------------------------------------------------------------------------------------------
# Errors: one JSON shape for every failure.


class JSONResponse(_JSONResponse):
    """JSON whose text may hold file names that are not UTF-8 (GBK bytes unpacked on Linux reach Python as lone
    surrogates): written as ``\\udcXX`` escapes, which a client sends back as the same name; the plain response
    answered 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8", "backslashreplace")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.extra = status, code, message, field, extra


def error_response(status: int, code: str, message: str, field: str | None = None, headers: dict | None = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field, **extra}}, status, headers=headers)


def response_for(error: Exception) -> JSONResponse:
    if isinstance(error, ApiError):
        return error_response(error.status, error.code, error.message, error.field, **error.extra)
    if isinstance(error, PathNotAllowed):
        return error_response(403, "path_not_allowed", str(error), error.field)
    if isinstance(error, MissingPath):
        return error_response(400, "not_found", str(error), error.field)
    if isinstance(error, SessionNotFound):
        return error_response(404, "session_not_found", str(error))
    if isinstance(error, TooManySessions):
        return error_response(409, "too_many_sessions", str(error))
    if isinstance(error, SaveConflict):
        return error_response(409, "save_conflict", str(error), conflicts=error.conflicts)
    if isinstance(error, UnsavedEdits):
        return error_response(409, "unsaved_edits", str(error))
    if isinstance(error, BackupNotFound):  # named in the body, as a path that does not exist
        return error_response(400, "not_found", str(error), error.field)
    if isinstance(error, UserError):
        return error_response(400, "invalid", str(error), getattr(error, "field", None))
    if isinstance(error, RequestValidationError):
        first = error.errors()[0]
        return error_response(400, "invalid", f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}",
                              str(first["loc"][-1]))
    if isinstance(error, HTTPException):
        code = {401: "unauthorized", 403: "forbidden", 404: "not_found"}.get(error.status_code, "http_error")
        return error_response(error.status_code, code, str(error.detail), headers=getattr(error, "headers", None))
    log.exception("LoRA Trainer API: unexpected error", exc_info=error)
    return error_response(500, "internal", f"internal error: {type(error).__name__}: {error}")


class _ErrorsAsJson(APIRoute):
    """Turns whatever a route (or its auth dependency) raises into the error JSON, for our routes only: the WebUI's
    app and other extensions keep their own handlers."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except Exception as error:  # noqa: BLE001 - every failure becomes the documented error JSON
                return response_for(error)

        return route


# ---------------------------------------------------------------------------------------------------------------
# Jobs: a Kohya-TOML-like body → checked options (pure, tested directly).

JOB_FIELDS = ("name", "options", "webhook")
# path options and whether the path must exist already
REFUSED_IN_A_JOB = (*RUNNER_OPTIONS, "config_file", "output_config")  # the runner's, and what would not train
# a request names data, never a program: --backend runs the train_network.py (and venv) of the folder it names
LOCAL_ONLY_OPTIONS = ("backend",)


def checked_name(value: str, field: str) -> str:
    """A name for a job or a file: a bad one is a client mistake (400), not a forbidden path."""
    try:
        return plain_name(value, field)
    except PathNotAllowed as error:
        raise ApiError(400, "invalid_name", str(error), field) from None


def checked_path(value: Any, roots: list[Path], field: str, must_exist: bool) -> Path:
    """Below a root first, then existing: a path outside the roots gets the same answer whether it exists or not."""
    if not isinstance(value, str):
        raise UserError(f"{field}: give a path as a string", field)
    path = allowed_path(value, roots, field, must_exist=False)
    if must_exist and not path.exists():
        raise ApiError(400, "not_found", f"{field}: {value} does not exist", field)
    return path


def _checked_network_args(items: Any, roots: list[Path]) -> list[str]:
    """A LyCORIS preset file (``preset=…toml``) is a request's path too: absolute, inside the roots."""
    from ..training.options import network_preset_file

    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ApiError(400, "invalid", "network_args: give a list of key=value strings", "network_args")
    checked = []
    for item in items:
        if (preset := network_preset_file(item)) is not None:
            if not Path(preset).is_absolute():
                raise ApiError(400, "invalid", f"network_args: preset file {preset} is relative; give an absolute "
                               "path", "network_args")
            item = f"preset={checked_path(preset, roots, 'network_args', must_exist=True)}"
        checked.append(item)
    return checked


def only_fields(body: dict, accepted: Iterable[str], route: str) -> dict:
    """``body``, refused with a 400 naming the first field ``route`` does not take and listing those it does: a
    misspelt field was ignored, and the route did what no field asked (``{"backupp": …}`` restored the newest
    backup)."""
    accepted = list(accepted)
    if unknown := sorted(set(body) - set(accepted)):
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes no fields: send no body, or {}"
        raise ApiError(400, "invalid", f"{with_closest(unknown[:1], accepted)}: not a field of {route}; {takes}",
                       unknown[0])
    return body


def flag(body: dict, name: str, default: bool) -> bool:
    """A true/false field: "maybe" or "yes" is a 400 naming it, not read as true."""
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ApiError(400, "invalid", f"{name}: give true or false", name)
    return value


def is_number(value: Any) -> bool:
    """A JSON number: true and false are not (Python counts them as ints)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def text(body: dict, name: str, default: str) -> str:
    value = body.get(name) or default
    if not isinstance(value, str):
        raise ApiError(400, "invalid", f"{name}: give text", name)
    return value


def _not_json(constant: str):
    """NaN and Infinity, which Python's parser takes and JSON has not: stored in a job, they broke every later
    answer that lists it."""
    raise ValueError(f"{constant} is not a JSON number")


def job_request(body: Any, settings: AppSettings, notes: list[str] | None = None,
                checkpoints: Mapping[str, Path] | None = None) -> tuple[str, dict, str | None]:
    """``{"name", "options": {...}, "webhook"}`` or a flat Kohya-TOML-like object (sections flattened), or the Kohya
    GUI's saved settings in their place → job name, options with every path resolved inside the roots, webhook URL;
    ``notes`` gain what the GUI's settings hold that is not carried over. The options themselves (and the dataset
    they name) are checked once, by ``JobRunner.submit``, before the job is queued.
    The base model may also be named by its title in the host's list (``checkpoints``: ``GET /checkpoints``, the
    WebUI's checkpoint titles), as the Train tab names it."""
    from ..training.kohya_gui import is_gui_config
    from ..training.options import (DATA_URL_OPTIONS, FIELDS, FOREIGN, PATH_OPTIONS, flattened_sections,
                                    gui_settings_options, is_data_url, not_given)

    if not isinstance(body, dict):
        raise ApiError(400, "invalid", "the body must be a JSON object")
    nested = body.get("options", {})
    if not isinstance(nested, dict):
        raise ApiError(400, "invalid", "options: give an object of sd-scripts options", "options")
    try:  # sections flattened, as in a Kohya TOML
        top, inner = (flattened_sections({k: v for k, v in body.items() if k not in JOB_FIELDS}, "body"),
                      flattened_sections(nested, "options"))
        if clash := next((key for key in sorted(top.keys() & inner.keys()) if top[key] != inner[key]), None):
            raise UserError(f"{clash} is given twice, as {top[clash]!r} in the body and {inner[clash]!r} in "
                            "options; keep one", clash)
        options = {**top, **inner}
    except UserError as error:
        raise ApiError(400, "invalid", str(error), error.field) from None
    if is_gui_config(options):  # a Kohya GUI user posts the settings file as it is
        try:
            options = gui_settings_options(options, notes if notes is not None else [], "Kohya GUI settings",
                                           settings.data_folder / "sample-prompts")  # not a path the request chose
        except UserError as error:
            raise ApiError(400, "invalid", str(error), error.field or "LoRA_type") from None
    # an empty path or name means not given (as in a TOML file), not the server's current folder
    options = {k: v for k, v in options.items() if not (k in FIELDS and not_given(k, v))}
    for key in options:
        if key in REFUSED_IN_A_JOB:
            raise ApiError(400, "invalid", f"{key}: set by the job runner; leave it out", key)
        if key in LOCAL_ONLY_OPTIONS and options[key]:
            raise ApiError(400, "invalid", f"{key}: runs the program of the folder it names, which a request may not "
                           "choose; use it from the command line or the Train tab", key)
        if key not in FIELDS and key not in FOREIGN:
            raise ApiError(400, "invalid", f"{key}: not an sd-scripts training option", key)
    name = body.get("name") or options.get("output_name")
    if not isinstance(name, str):
        raise ApiError(400, "invalid", "name: give the job a name as text (it also names the LoRA file by default)", "name")
    given = {"name" if body.get("name") else "output_name": name, "output_name": str(options.get("output_name") or "")}
    name = checked_name(name, "name")
    options["output_name"] = checked_name(str(options.get("output_name") or name), "output_name")
    for field, value in given.items():  # trimmed as the Train tab trims its Output name, and said
        note = trimmed_name_note(field, value, name if field == "name" else options["output_name"])
        if note and notes is not None and note not in notes:
            notes.append(note)
    options.setdefault("output_dir", str(settings.lora_folder))
    roots = settings.roots()
    model = options.get("pretrained_model_name_or_path")
    listed = _listed_checkpoint(model, checkpoints or {}) if isinstance(model, str) else None
    if isinstance(model, str) and listed is None and not Path(unquoted(model)).is_absolute():
        raise ApiError(400, "not_found", f"pretrained_model_name_or_path: {model!r} is not a checkpoint title (GET "
                       "/checkpoints lists them) nor an absolute path", "pretrained_model_name_or_path")
    for key, must_exist in PATH_OPTIONS.items():
        if key == "pretrained_model_name_or_path" and listed is not None:  # the host's own list: no root to check
            options[key] = str(listed)
        elif isinstance(options.get(key), list):
            options[key] = [str(checked_path(value, roots, key, must_exist)) for value in options[key]]
        elif options.get(key) is not None and not (key in DATA_URL_OPTIONS and is_data_url(options[key])):
            options[key] = str(checked_path(options[key], roots, key, must_exist))
    if options.get("network_args") is not None:
        options["network_args"] = _checked_network_args(options["network_args"], roots)
    if options.get("dataset_config"):
        check_dataset_config_paths(Path(options["dataset_config"]), roots, options)
    elif options.get("in_json"):
        image_dir = Path(options["train_data_dir"]) if options.get("train_data_dir") else None
        check_metadata_images(Path(options["in_json"]), image_dir, roots, "in_json")
    webhook = body.get("webhook")
    if webhook is not None:
        parsed = urllib.parse.urlparse(webhook) if isinstance(webhook, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ApiError(400, "invalid", "webhook: give an http:// or https:// URL", "webhook")
    return name, options, webhook


def _listed_checkpoint(model: str, checkpoints: Mapping[str, Path]) -> Path | None:
    """The host's checkpoint ``model`` names: by its title, as the bundled model (``tiny-sd``), or by the very path
    ``GET /checkpoints`` gives beside the title; None for anything else (a path then needs a root)."""
    from ..tiny_model.build import bundled_model

    if (by_name := checkpoints.get(model) or bundled_model(model)) is not None:
        return by_name
    given = Path(unquoted(model))
    if not given.is_absolute() or "\x00" in model:  # a NUL: refused as a path, by allowed_path
        return None

    def where(path: Path, resolved: bool) -> str:
        return os.path.normcase(str(path.resolve() if resolved else Path(os.path.abspath(path))))  # Windows: any case

    # the path as listed first: resolving hundreds of the WebUI's checkpoints at every submit only where it is not
    for resolved in (False, True):
        wanted = where(given, resolved)
        found = next((path for path in checkpoints.values() if where(path, resolved) == wanted), None)
        if found is not None:
            return found
    return None


def job_json(job: Job) -> dict:
    """The job, its events' URL, and whether a webhook waits for its end (not the URL: it may hold a token)."""
    return {**job.as_dict(), "events": f"{PREFIX}/jobs/{job.id}/events",
            "webhook": any((job.folder / name).is_file() for name in (WEBHOOK_FILE, WEBHOOK_CALLED_FILE))}


def job_file(job: Job, name: str) -> Path:
    """The file named ``name`` that the job wrote: a network its ``saved`` events name (where it is now: an earlier
    run's files moved aside are listed there, ``Job.files``) or an image of its ``sample`` events; nothing else (its
    config, its log, other files beside them)."""
    from ..training.events import read_events

    events, _ = read_events(job.events_path)
    written = [*job.files, *(event["path"] for event in events if event["event"] == "sample" and event.get("path"))]
    paths = [path if path.is_absolute() else job.folder / path for path in map(Path, written)]  # the trainer's folder
    named = [path for path in paths if path.name == name]
    if not named:
        names = ", ".join(dict.fromkeys(path.name for path in paths)) or "none yet"
        raise ApiError(404, "file_not_found", f"job {job.id} wrote no file named {name!r}; its networks and sample "
                       f"images: {names}")
    if not named[-1].is_file():
        raise ApiError(404, "file_not_found", f"{name}: job {job.id} wrote it at {named[-1]}, where it is no longer "
                       "(removed since)")
    return named[-1]


def last_end_event(job: Job) -> dict | None:
    from ..training.events import read_events

    events, _ = read_events(job.events_path)
    ends = [event for event in events if event["event"] == "end"]
    return ends[-1] if ends else None


# ---------------------------------------------------------------------------------------------------------------
# Webhooks: called once when a job ends; a failing webhook never touches the job.

WEBHOOK_FILE = "webhook.url"
WEBHOOK_CALLED_FILE = "webhook.called"  # the same URL, once its call was claimed (claim_webhook)


def post_json(url: str, payload: dict, timeout: float = 10.0) -> None:
    request = urllib.request.Request(url, json.dumps(payload).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "lora-trainer"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) checked on submit
        response.read()


def webhook_url(job: Job) -> str | None:
    """The URL the job's end is sent to, whether sent already or not; None where it asked for none."""
    for name in (WEBHOOK_FILE, WEBHOOK_CALLED_FILE):
        if (job.folder / name).is_file():
            return (job.folder / name).read_text(encoding="utf-8").strip()
    return None


def claim_webhook(job: Job) -> str | None:
    """The job's webhook URL for the one caller that renames its file first, None for every other: a job's end is
    sent once whoever sees it (its watcher, a DELETE, a watcher of the Services a "Reload UI" made), across restarts."""
    hook, called = job.folder / WEBHOOK_FILE, job.folder / WEBHOOK_CALLED_FILE
    for _ in range(20):
        try:
            os.replace(hook, called)
            return called.read_text(encoding="utf-8").strip()
        except FileNotFoundError:  # gone: claimed by another, or none asked for
            return None
        except PermissionError:  # Windows: open elsewhere a moment (a resume reading it, an antivirus scan)
            time.sleep(0.1)
    log.warning("LoRA Trainer: the webhook of job %s was not called: %s stayed open elsewhere", job.id, hook)
    return None


def unclaim_webhook(job: Job) -> None:
    try:
        os.replace(job.folder / WEBHOOK_CALLED_FILE, job.folder / WEBHOOK_FILE)
    except OSError as error:  # the job's watcher then finds it claimed: said, as it will not be called
        log.warning("LoRA Trainer: the webhook of job %s will not be called: %s", job.id, error)


def set_webhook(job: Job, url: str | None) -> None:
    """The job's webhook file, and none left from a job of an earlier database that had its folder (a stale
    webhook.called sent a new job's resume to the old job's receiver)."""
    (job.folder / WEBHOOK_CALLED_FILE).unlink(missing_ok=True)
    (job.folder / WEBHOOK_FILE).unlink(missing_ok=True)
    if url:
        (job.folder / WEBHOOK_FILE).write_text(url, encoding="utf-8")


def webhook_payload(job: Job) -> dict:
    return {"job": job_json(job), "end": last_end_event(job)}


def call_webhook(url: str, payload: dict, job_id: int) -> None:
    try:
        post_json(url, payload)
    except Exception as error:  # noqa: BLE001 - a webhook is a courtesy; the job is done either way
        log.warning("LoRA Trainer: webhook %s for job %s failed: %s", url, job_id, error)


def call_webhook_in_background(url: str, job: Job) -> None:
    """Its payload read now (before a DELETE removes the folder), sent without holding up the caller."""
    threading.Thread(target=call_webhook, args=(url, webhook_payload(job), job.id), name=f"lora-trainer-webhook-{job.id}",
                     daemon=True).start()


# The job folders that a watcher of this process waits on, and how many watchers each: an ended job among them has
# its end unsent until its watcher's next poll, which a DELETE in between sends instead (the watcher finds it gone)
_watched: Counter[Path] = Counter()
_watched_lock = threading.Lock()


def is_watched(job: Job) -> bool:
    with _watched_lock:
        return _watched[job.folder.resolve()] > 0


def watch_for_webhook(services: Services, job_id: int, url: str, poll: float = 0.5) -> threading.Thread:
    def watch() -> None:
        while True:
            if services.runner.closed:  # a "Reload UI" made new Services, which watch it again (resume_webhooks)
                return
            job = services.store.get(job_id)
            if job is None:
                return
            if job.status not in ACTIVE:
                break
            time.sleep(poll)
        try:  # read before the claim: a DELETE that finds it claimed removes the folder
            payload = webhook_payload(job)
        except OSError:  # removed already, by a DELETE that claimed the call (the claim below fails), or unreadable
            payload = {"job": job_json(job), "end": None}
        if claim_webhook(job):
            call_webhook(url, payload, job_id)

    def watched(folder: Path) -> None:
        try:
            watch()
        finally:
            with _watched_lock:
                _watched[folder] -= 1

    job = services.store.get(job_id)
    folder = job.folder.resolve() if job else Path()  # (none: the watcher ends at once)
    with _watched_lock:  # counted before the thread runs: a DELETE right after the POST finds the job watched
        _watched[folder] += 1
    thread = threading.Thread(target=watched, args=(folder,), name=f"lora-trainer-webhook-{job_id}", daemon=True)
    thread.start()
    return thread


def resume_webhooks(services: Services) -> None:
    """After a restart: watch again the jobs still queued or running that asked for a webhook, and send the ends of
    those that ended while no app followed them (a trainer trains on after the app closes: its end came unheard)."""
    for job in services.runner.recovered:
        if url := claim_webhook(job):
            call_webhook_in_background(url, job)
    for job in services.store.all():
        hook = job.folder / WEBHOOK_FILE
        if job.status in ACTIVE and hook.is_file():
            watch_for_webhook(services, job.id, hook.read_text(encoding="utf-8").strip())


# ---------------------------------------------------------------------------------------------------------------
# Server-Sent Events from a job's events file.


def _lines_from(path: Path, offset: int) -> tuple[list[bytes], int]:
    """Complete lines from byte ``offset`` and the offset after them (a half-written last line waits)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    return data[:end].splitlines(), offset + end


class EventFeed:
    """One reader of a job's events file, however many clients follow it: 50 event streams cost the server one file
    poll and one status check per interval, not 50, so the trainer beside it keeps its CPU."""

    def __init__(self, path: Path, is_active: Callable[[], bool], poll: float = 0.25):
        self.path, self.is_active, self.poll = path, is_active, poll
        self.lines: list[str] = []  # line n of the file is lines[n - 1]
        self.end_line: int | None = None  # the line of the ``end`` event, once read
        self.done = False
        self._reader: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> EventFeed:
        if self._reader is None:
            self.loop = asyncio.get_running_loop()
            self._reader = self.loop.create_task(self._read())
        return self

    async def _read(self) -> None:
        offset = 0
        while not self.done:
            active = self.is_active()  # before reading: a job that ended before this read has nothing more to write
            lines, offset = _lines_from(self.path, offset)
            for line in lines:
                text = line.decode("utf-8", errors="replace")
                try:
                    event = json.loads(text) if text.strip() else None
                except ValueError:  # a line a full disk tore (the log starts the next on its own): skipped, as
                    event, text = None, ""  # read_events skips it, its number kept so that ids stay line numbers
                self.lines.append(text)
                if self.end_line is None and isinstance(event, dict) and event.get("event") == "end":
                    self.end_line = len(self.lines)
            self.done = self.end_line is not None or (not lines and not active)
            if not self.done:
                await asyncio.sleep(self.poll)

    async def follow(self, after: int, keepalive: float = 15.0) -> AsyncIterator[str]:
        """SSE messages (``id`` = line number, from 1) after line ``after``, until the ``end`` event or until the job is
        no longer active and the file is drained."""
        sent, quiet = after, 0.0
        while True:
            while sent < len(self.lines):
                text = self.lines[sent]
                sent += 1
                if text.strip():
                    yield f"id: {sent}\ndata: {text}\n\n"
                if sent == self.end_line:
                    return
            if self.done and sent >= len(self.lines):
                return
            await asyncio.sleep(self.poll)  # a look at a list in memory: the file is read once, by the feed
            quiet = 0.0 if sent < len(self.lines) else quiet + self.poll
            if quiet >= keepalive:
                quiet = 0.0
                yield ": keep-alive\n\n"


class EventFeeds:
    """The live feed of each job file; a finished feed is replaced on the next request (it then reads the file once)."""

    def __init__(self):
        self._feeds: dict[Path, EventFeed] = {}

    async def follow(self, path: Path, is_active: Callable[[], bool], after: int) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        feed = self._feeds.get(path)
        if feed is None or feed.done or feed.loop is not loop:  # a feed belongs to the loop that reads it
            feed = self._feeds[path] = EventFeed(path, is_active)
        async for message in feed.start().follow(after):
            yield message


# ---------------------------------------------------------------------------------------------------------------
# LoRAs and datasets as JSON.

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
METADATA_KEYS = ("ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                 "ss_network_alpha", "ss_network_args", "ss_epoch", "ss_steps", "ss_num_train_images", "ss_resolution",
                 "ss_learning_rate", "ss_training_comment", "ss_training_started_at", "ss_training_finished_at",
                 "sshs_model_hash", "modelspec.title", "modelspec.architecture")


def lora_json(path: Path, folder: Path) -> dict:
    from ..hashing import file_sha256
    from ..safe_io import read_safetensors_metadata

    metadata = read_safetensors_metadata(path)
    card = path.with_suffix(".json")
    try:
        user_metadata = json.loads(card.read_text(encoding="utf-8-sig")) if card.is_file() else None  # Notepad's BOM
    except (OSError, json.JSONDecodeError):
        user_metadata = None
    sha256 = file_sha256(path)
    stat = path.stat()
    return {"name": path.stem, "path": str(path), "relative_path": path.relative_to(folder).as_posix(),
            "size": stat.st_size, "modified": stat.st_mtime, "sha256": sha256, "short_hash": sha256[:10],
            "metadata": {key: metadata[key] for key in METADATA_KEYS if key in metadata},
            "user_metadata": user_metadata}


def list_loras(folder: Path) -> list[dict]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file())
    return [lora_json(path, folder) for path in files]


def health_json(report) -> dict:
    """The health report's dataclasses as plain JSON (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(report), default=str))


def health_settings_from(body: dict):
    from ..dataset.health import HealthSettings, bucket_limits_for

    only_fields(body, ["path", *sorted(f.name for f in dataclasses.fields(HealthSettings))], "POST /dataset/check")
    values = {key: value for key, value in body.items() if key != "path"}
    if "resolution" in values:
        values["resolution"] = _health_resolution(values["resolution"])
        low, high = bucket_limits_for(values["resolution"])  # bucket limits left out follow the resolution
        values.setdefault("min_bucket_reso", low)
        values.setdefault("max_bucket_reso", high)
    for f in dataclasses.fields(HealthSettings):  # the type each setting's default has: a wrong one is a 400, not a 500
        value, default = values.get(f.name), f.default
        if value is None or f.name == "resolution":
            continue
        wanted = str if default is None else type(default)  # trigger: a word or nothing
        if isinstance(value, bool) != (wanted is bool) or not isinstance(value, wanted):
            raise ApiError(400, "invalid", f"{f.name}: give {'true or false' if wanted is bool else 'a ' + wanted.__name__}",
                           f.name)
    if values.get("batch_size", 1) < 1:  # the report's own check names the command line's --batch-size
        raise ApiError(400, "invalid", f"batch_size: {values['batch_size']} images per step; give 1 or more", "batch_size")
    return HealthSettings(**values)


def _health_resolution(value: Any) -> tuple[int, int]:
    """512, "512", "512,768" or [512, 768] → (width, height)."""
    sides = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        numbers = [int(side) for side in sides if not isinstance(side, bool)]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) not in (1, 2) or len(numbers) != len(sides) or min(numbers) < 1:
        raise ApiError(400, "invalid", 'resolution: give 512, "512,768" or [512, 768]', "resolution")
    return numbers[0], numbers[-1]


# ---------------------------------------------------------------------------------------------------------------
# Routes.


def _body_doc(description: str, examples: dict[str, dict], properties: dict[str, dict] | None = None,
              required: list[str] | None = None) -> dict:
    """An OpenAPI requestBody for a plain-JSON body (``openapi_extra``: the same on fastapi 0.94 and 0.104)."""
    schema: dict = {"type": "object", "properties": properties or {}}
    if required:
        schema["required"] = required
    return {"requestBody": {"required": True, "description": description, "content": {"application/json": {
        "schema": schema, "examples": {name: {"summary": name, "value": value} for name, value in examples.items()}}}}}


AUTOTAG_FIELDS = ("tagger", "mode", "trigger_word", "general_threshold", "character_threshold", "excluded_tags", "selection")

TAG_EDIT_EXAMPLES = {
    "replace": {"op": "replace", "find": "1girl", "replacement": "1woman", "selection": "filtered"},
    "add trigger at the front": {"op": "add", "tags": ["zkchar"], "position": 0, "selection": "all"},
    "remove from two images": {"op": "remove", "tags": ["watermark"], "selection": ["a.png", "sub/b.png"]},
}


def create_router(services: Services) -> APIRouter:
    """Every route under ``/lora-trainer/v1``, without auth (``register`` adds it)."""
    router = APIRouter(prefix=PREFIX, tags=["LoRA Trainer"], route_class=_ErrorsAsJson, default_response_class=JSONResponse)
    settings = services.settings
    sessions = tag_sessions.sessions_of(services)
    feeds = EventFeeds()

    async def json_body(request: Request) -> Any:
        """The body as JSON, refused with 413 beyond ``settings.max_body_bytes`` (before reading it when announced)."""
        limit = settings.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise ApiError(413, "body_too_large", f"the body is larger than {limit} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise ApiError(413, "body_too_large", f"the body is larger than {limit} bytes")
        if not data:
            return {}
        try:
            return json.loads(data, parse_constant=_not_json)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
            raise ApiError(400, "invalid_json", f"the body is not JSON: {error}") from None
        except RecursionError:
            raise ApiError(400, "invalid_json", "the body is nested too deeply") from None

    def object_body(body: Any = Depends(json_body)) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "invalid", "the body must be a JSON object")
        return body

    def no_fields(route: str) -> Any:
        """A dependency of the routes that take no body: a field sent to them is a 400, not silently ignored."""

        def check(body: dict = Depends(object_body)) -> None:
            only_fields(body, (), route)

        return Depends(check)

    def job_or_404(job_id: int) -> Job:
        job = services.store.get(job_id)
        if job is None:
            raise ApiError(404, "job_not_found", f"no job {job_id}")
        return job

    # --- jobs ---------------------------------------------------------------------------------------------

    @router.post("/jobs", status_code=201, summary="Queue a training job",
                 openapi_extra=_body_doc(
                     "sd-scripts options as in a Kohya TOML: either under `options`, or at the top level with the TOML's "
                     "sections as nested objects (flattened as sd-scripts does); or the Kohya GUI's saved settings (its "
                     "JSON, with `LoRA_type`) in their place, read as the GUI reads them, what they hold that is not "
                     "carried over listed under `warnings` in the answer. Paths must lie in the allowed folders; "
                     "`output_dir` defaults to the Lora folder, `output_name` to the job name. `webhook` (optional) "
                     "receives a POST with the job summary when the job ends.",
                     {"options": {"name": "zkchar", "options": {
                         "pretrained_model_name_or_path": "/models/Stable-diffusion/sd15.safetensors",
                         "train_data_dir": "/datasets/zkchar", "resolution": "512", "network_module": "networks.lora",
                         "network_dim": 16, "network_alpha": 8, "learning_rate": 1e-4, "max_train_epochs": 10,
                         "save_every_n_epochs": 2}, "webhook": "http://127.0.0.1:9000/done"},
                      "kohya toml sections": {"name": "zkstyle", "model_arguments": {
                          "pretrained_model_name_or_path": "/models/Stable-diffusion/sd15.safetensors"},
                          "dataset_arguments": {"train_data_dir": "/datasets/zkstyle", "resolution": "512"},
                          "training_arguments": {"max_train_epochs": 8, "learning_rate": 1e-4}}},
                     {"name": {"type": "string", "description": "job name (plain file name)"},
                      "options": {"type": "object", "description": "sd-scripts options by name"},
                      "webhook": {"type": "string", "description": "http(s) URL called when the job ends"}}))
    def submit_job(body: dict = Depends(object_body)):
        """Validated before it is queued (a clear 400/403 otherwise). A job submitted while another runs waits in
        the queue (status `queued`); jobs never run in parallel."""
        notes: list[str] = []
        name, options, webhook = job_request(body, settings, notes, services.host.checkpoints())
        for note in (earlier_files_note(options, services.runner.replaced_folder),
                     same_run_jobs_note(options, services.store.all(), services.runner.replaced_folder)):
            if note:
                notes.append(note)
        job = services.runner.submit(name, options, notes)
        set_webhook(job, webhook)
        if webhook:
            watch_for_webhook(services, job.id, webhook)
        return JSONResponse({**job_json(job), **({"warnings": notes} if notes else {})}, 201)

    @router.get("/jobs", summary="List jobs")
    def list_jobs():
        """Every job, oldest first, with status, options, saved files and last state."""
        return {"jobs": [job_json(job) for job in services.store.all()]}

    @router.get("/jobs/{job_id}", summary="One job")
    def get_job(job_id: int):
        """Status (queued, running, finished, failed, stopped, paused, interrupted), options, files, message."""
        return job_json(job_or_404(job_id))

    def state_change(job_id: int, change: Callable[[], Job]) -> dict:
        job_or_404(job_id)
        try:
            return job_json(change())
        except UserError as error:
            raise ApiError(409, "job_state", str(error)) from None

    @router.post("/jobs/{job_id}/stop", summary="Stop a job (save, then exit)")
    def stop_job(job_id: int, _: None = no_fields("POST /jobs/{id}/stop")):
        """A running job finishes its step, saves the network and its state and exits (killed after the timeout);
        a queued job leaves the queue."""
        return state_change(job_id, lambda: services.runner.stop(job_id))

    @router.post("/jobs/{job_id}/pause", summary="Pause a job (frees the GPU)")
    def pause_job(job_id: int, _: None = no_fields("POST /jobs/{id}/pause")):
        """Like stop, but the job is marked `paused`; `resume` continues from the saved state. Only a running job:
        a queued one has nothing to save (409; stop takes it out of the queue)."""
        return state_change(job_id, lambda: services.runner.stop(job_id, pause=True))

    @router.post("/jobs/{job_id}/resume", status_code=201, summary="Resume a stopped, paused or interrupted job")
    def resume_job(job_id: int, _: None = no_fields("POST /jobs/{id}/resume")):
        """Queues a new job that continues from the job's last saved state; returns the new job (201, as
        `POST /jobs` does: a job was created), with `warnings` where a job queued or running before it writes the same
        run. The job's webhook, if it had one, is called when the new one ends."""
        notes: list[str] = []
        resumed = state_change(job_id, lambda: services.runner.resume(job_id, notes))
        if url := webhook_url(job_or_404(job_id)):  # the run goes on, so whoever waits for its end still does
            set_webhook(services.store.get(resumed["id"]), url)
            watch_for_webhook(services, resumed["id"], url)
        return JSONResponse({**resumed, **({"warnings": notes} if notes else {})}, 201)

    @router.post("/jobs/{job_id}/save", summary="Save the network now")
    def save_job(job_id: int, _: None = no_fields("POST /jobs/{id}/save")):
        """The running job writes its network and state now and goes on."""
        return state_change(job_id, lambda: services.runner.control(job_id, "save"))

    @router.post("/jobs/{job_id}/sample", summary="Draw the sample images now")
    def sample_job(job_id: int, _: None = no_fields("POST /jobs/{id}/sample")):
        """The running job draws its sample prompts now and goes on."""
        return state_change(job_id, lambda: services.runner.control(job_id, "sample"))

    deleting = threading.Lock()

    @router.delete("/jobs/{job_id}", summary="Delete a job")
    def delete_job(job_id: int):
        """Removes the job and its folder (events, config, log); the LoRA files it saved stay. Refused while it
        runs: stop it first. A queued job's webhook is called as for a stop from the queue (status `stopped`)."""
        with deleting:  # one at a time: a second DELETE of the job finds it gone (404)
            job = job_or_404(job_id)
            if job.status == "running":
                raise ApiError(409, "job_running",
                               f"job {job_id} is running; stop it first (POST {PREFIX}/jobs/{job_id}/stop)")
            waiting = [j.id for j in services.store.all()
                       if j.resumed_from == job_id and j.status in ("queued", "running")]
            if waiting:  # its folder holds the state that job resumes from
                raise ApiError(409, "job_running", f"job {waiting[0]} resumes from job {job_id}'s saved state; delete "
                               f"job {job_id} once job {waiting[0]} has ended (or take it out of the queue: POST "
                               f"{PREFIX}/jobs/{waiting[0]}/stop)")
            # a queued job's removal is this DELETE's to send; an ended job's end its watcher's, unless the watcher
            # has not yet seen it end (stopped within its poll): it would find the job gone. One ended under an
            # earlier version, whose webhook.url stayed after its call, has no watcher and is not sent again
            url = claim_webhook(job) if job.status not in ACTIVE and is_watched(job) else None
            if job.status == "queued":
                url = claim_webhook(job)  # before the queue can start it
                try:
                    job = services.runner.dequeue(job_id)
                except UserError:  # queued no longer: started, or taken out by a stop (whose end this one sends)
                    if (job := job_or_404(job_id)).status == "running":
                        if url:  # its watcher calls it when it ends
                            unclaim_webhook(job)
                        raise ApiError(409, "job_running", f"job {job_id} has just started; stop it first (POST "
                                       f"{PREFIX}/jobs/{job_id}/stop)") from None
            if url:  # its end (or its removal from the queue) not yet sent: sent now, without holding up the answer
                call_webhook_in_background(url, job)
            services.store.delete(job_id)
            if job.folder.resolve().is_relative_to(settings.jobs_folder.resolve()):
                shutil.rmtree(job.folder, ignore_errors=True)
            return {"deleted": job_id}

    @router.get("/jobs/{job_id}/files/{name}", summary="Download a network or sample image the job wrote",
                response_class=FileResponse)
    def job_file_download(job_id: int, name: str):
        """By its file name (the last part of a path in the job's `files`, or of a `sample` event's `path`): the
        networks the job saved and the sample images it drew, nothing else; 404 `file_not_found` otherwise."""
        return FileResponse(job_file(job_or_404(job_id), name), filename=name)

    @router.get("/jobs/{job_id}/events", summary="Follow a job's events (Server-Sent Events)",
                responses={200: {"content": {"text/event-stream": {"example": 'id: 3\ndata: {"event": "step", "step": 1, '
                                                                             '"total": 80, "loss": 0.12}\n\n'}}}})
    def job_event_stream(job_id: int, request: Request, after: int | None = None):
        """One message per event line (`data` = the event JSON: start, step, epoch, validation, sample, saved,
        state, warning, error, end), `id` = its line number. Reconnect with the `Last-Event-ID` header (or
        `?after=N`) to continue after line N; the header wins where both are given (an EventSource opened with
        `?after=N` sends that URL again on reconnecting, with the header). The stream ends after the `end` event, or
        when the job is no longer running and every event has been sent."""
        job = job_or_404(job_id)
        header = request.headers.get("last-event-id")
        start = header if header is not None else after
        try:
            start = max(0, int(start or 0))  # ids count from 1: before the first is from the start
        except ValueError:
            raise ApiError(400, "invalid", "Last-Event-ID: give the id of the last event received", "Last-Event-ID") from None

        def is_active() -> bool:
            current = services.store.get(job_id)
            return current is not None and current.status in ACTIVE

        return StreamingResponse(feeds.follow(job.events_path, is_active, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- LoRAs and dataset checks -------------------------------------------------------------------------

    @router.get("/checkpoints", summary="Base models a job can name by title")
    def checkpoints():
        """The host's checkpoints (the WebUI's list, with the titles its own API gives; in the standalone app the
        embedded tiny model and the `--checkpoint-dir` folders): a job's `pretrained_model_name_or_path` may be a
        title from here instead of a path."""
        return {"checkpoints": [{"title": title, "path": str(path)} for title, path in services.host.checkpoints().items()]}

    @router.get("/loras", summary="LoRAs in the Lora folder")
    def loras():
        """Each file with its training metadata (a subset of the `ss_*` keys), the Lora card's user metadata
        (`<name>.json`) and its SHA-256 (the WebUI's AutoV2 hash = `short_hash`). New files are hashed once."""
        return {"folder": str(settings.lora_folder), "loras": list_loras(settings.lora_folder)}

    @router.post("/dataset/check", summary="Dataset health report",
                 openapi_extra=_body_doc("A dataset folder (sd-scripts' `--train_data_dir` layout) and optional "
                                         "settings (resolution, batch_size, caption_extension, trigger, …).",
                                         {"check": {"path": "/datasets/zkchar", "resolution": 512, "trigger": "zkchar"}},
                                         {"path": {"type": "string"}}, ["path"]))
    def dataset_check(body: dict = Depends(object_body)):
        """Images, captions, buckets, steps per epoch, tag frequencies, near-duplicates and findings."""
        from ..dataset.health import check_dataset

        folder = checked_path(body.get("path"), settings.dataset_roots, "path", must_exist=True)
        return health_json(check_dataset(folder, health_settings_from(body), settings.dataset_roots))

    # --- tag-editor sessions ------------------------------------------------------------------------------

    def page_params(request: Request) -> tuple[int, int, int]:
        query = request.query_params
        values = []
        for name, default in (("page", 1), ("page_size", tag_sessions.PAGE_SIZE), ("tag_limit", tag_sessions.FREQUENCY_ROWS)):
            try:
                values.append(int(query.get(name, default)))
            except ValueError:
                raise ApiError(400, "invalid", f"{name} must be a whole number, not {query[name]!r}", name) from None
        page, page_size, tag_limit = values
        return page, page_size, tag_limit

    @router.post("/datasets/open", status_code=201, summary="Open a folder in the tag editor",
                 openapi_extra=_body_doc("The folder of images and captions, `recursive` for sub-folders, "
                                         "`caption_extension` (default `.txt`).",
                                         {"open": {"path": "/datasets/zkchar/10_zkchar", "recursive": False}},
                                         {"path": {"type": "string"}, "recursive": {"type": "boolean"},
                                          "caption_extension": {"type": "string"}}, ["path"]))
    def open_dataset(body: dict = Depends(object_body)):
        """Returns the session id and the first page (images with tags, tag frequencies, history)."""
        from ..dataset.caption_files import checked_caption_extension

        only_fields(body, ("path", "recursive", "caption_extension"), "POST /datasets/open")
        folder = checked_path(body.get("path"), settings.dataset_roots, "path", must_exist=True)
        extension = text(body, "caption_extension", ".txt")
        try:
            checked_caption_extension(extension)
        except UserError as error:
            raise ApiError(400, "invalid", str(error), "caption_extension") from None
        session = sessions.open(folder, recursive=flag(body, "recursive", False), caption_extension=extension,
                                within=settings.dataset_roots)
        empty = tag_editor.empty_folder_note(session.editor)
        draft = session.draft or tag_sessions.DraftOpening()  # the unsaved edits from before a restart
        note = " ".join(([tag_editor.as_sentence(empty)] if empty else []) + tag_editor.folder_notes(session.editor)
                        + ([draft.note] if draft.note else []))
        restored = draft.restored
        return JSONResponse({**tag_sessions.page_of(session), **({"note": note} if note else {}),
                             "restored": len(restored.restored) if restored else 0,
                             "not_restored": [edit.name for edit in restored.left_out] if restored else []}, 201)

    @router.get("/datasets/{session_id}", summary="A page of a tag-editor session")
    def dataset_page(session_id: str, request: Request):
        """Query: `page`, `page_size`, `tag_limit` (tag-frequency rows, default 300), and the filter: `all`, `any`,
        `none` (comma-separated tags), `regex`, `untagged=true`. Given filter keys replace the session's filter (the
        one `"selection": "filtered"` edits); `reset=true` clears it."""
        session = sessions.get(session_id)
        query = request.query_params
        keys = ("all", "any", "none", "regex", "untagged")
        if query.get("reset") == "true" or any(key in query for key in keys):
            data = {key: query[key] for key in keys if key in query}
            if "untagged" in data:
                if data["untagged"].lower() not in ("true", "false", "1", "0"):
                    raise ApiError(400, "invalid", "untagged: give true or false", "untagged")
                data["untagged"] = data["untagged"].lower() in ("true", "1")
            tag_sessions.set_filter(session, tag_sessions.filter_from(data))
        return tag_sessions.page_of(session, *page_params(request))

    @router.get("/datasets/{session_id}/image", summary="One image of a session", response_class=FileResponse)
    def dataset_image(session_id: str, name: str):
        """The image file by its name as a page lists it (only images of the session's folder, resolving below the
        dataset roots: a link made elsewhere since the folder was read is refused too)."""
        session = sessions.get(session_id)
        image = tag_sessions.images_named(session.editor, [name], "name")[0]
        allowed_path(image, settings.dataset_roots, "name", must_exist=False)
        return FileResponse(image)

    @router.post("/datasets/{session_id}/edit", summary="Batch-edit tags (one undo step)",
                 openapi_extra=_body_doc(
                     "`op`: add, remove, replace, rename, dedupe, sort, move_first, lowercase, underscores_to_spaces, "
                     "spaces_to_underscores, set, with its arguments (`tags`, `position`, `find`, `replacement`, "
                     "`regex`, `whole_caption`, `old`, `new`, `keep_first`); `selection`: \"filtered\" (default, the "
                     "session's filter or a `filter` given here), \"all\", or a list of image names.",
                     TAG_EDIT_EXAMPLES, {"op": {"type": "string"}, "selection": {}}, ["op"]))
    def edit_dataset(session_id: str, request: Request, body: dict = Depends(object_body)):
        """Applies one edit to the selection as one undo step (in memory; save writes it); returns the page."""
        session = sessions.get(session_id)
        tag_sessions.apply_request(session, body)
        return tag_sessions.page_of(session, *page_params(request))

    @router.post("/datasets/{session_id}/undo", summary="Undo the last edit")
    def undo_dataset(session_id: str, request: Request, _: None = no_fields("POST /datasets/{sid}/undo")):
        """Takes back the last edit step (nothing is written until save); returns the page."""
        session = sessions.get(session_id)
        session.change(tag_sessions.tag_editor.undo)
        return tag_sessions.page_of(session, *page_params(request))

    @router.post("/datasets/{session_id}/redo", summary="Redo the last undone edit")
    def redo_dataset(session_id: str, request: Request, _: None = no_fields("POST /datasets/{sid}/redo")):
        """Applies again the last undone step; returns the page."""
        session = sessions.get(session_id)
        session.change(tag_sessions.tag_editor.redo)
        return tag_sessions.page_of(session, *page_params(request))

    @router.post("/datasets/{session_id}/save", summary="Write the edited captions",
                 openapi_extra=_body_doc("`overwrite_changed`: replace captions another program changed since they "
                                         "were read (they are backed up); without it such a save is refused with 409 "
                                         "and the list of those images.",
                                         {"save": {}, "overwrite": {"overwrite_changed": True}},
                                         {"overwrite_changed": {"type": "boolean"}}))
    def save_dataset(session_id: str, body: dict = Depends(object_body)):
        """Only the changed captions are written, previous versions backed up, all or nothing."""
        only_fields(body, ("overwrite_changed",), "POST /datasets/{sid}/save")
        return tag_sessions.save_session(sessions.get(session_id), flag(body, "overwrite_changed", False))

    @router.post("/datasets/{session_id}/reload", summary="Read captions changed on disk")
    def reload_dataset(session_id: str, _: None = no_fields("POST /datasets/{sid}/reload")):
        """Keeps unsaved edits; reports updated, conflicting (the edits made here kept; revert takes the other
        versions), added and removed images."""
        return tag_sessions.reload_session(sessions.get(session_id))

    @router.post("/datasets/{session_id}/revert", summary="Discard unsaved edits (one undo step)",
                 openapi_extra=_body_doc(
                     "`selection`: \"all\" (default), \"filtered\" (the session's filter) or a list of image names, as "
                     "for edits. Their unsaved edits go: they show their caption files as they are now, read again "
                     "(another program's versions too, without a reload). Undo brings the edits back.",
                     {"all": {}, "two images": {"selection": ["a.png", "sub/b.png"]}}, {"selection": {}}))
    def revert_dataset(session_id: str, request: Request, body: dict = Depends(object_body)):
        """Returns the page, with `reverted`: the images that went back to their saved captions."""
        only_fields(body, ("selection",), "POST /datasets/{sid}/revert")
        session = sessions.get(session_id)
        reverted = tag_sessions.revert_session(session, body.get("selection"))
        return {**tag_sessions.page_of(session, *page_params(request)), "reverted": reverted}

    @router.get("/datasets/{session_id}/backups", summary="The folder's caption backups, newest first")
    def dataset_backups(session_id: str):
        """Every save keeps the captions it replaced in a backup folder (`FOLDER/.caption-backups/<time>`): each with
        its `name` (to restore it), `time`, how many `captions` it puts back and how many its save `created`."""
        backups = tag_sessions.backups_of(sessions.get(session_id))
        return {"backups": [tag_sessions.backup_as_data(summary) for summary in backups]}

    @router.post("/datasets/{session_id}/restore", summary="Put a caption backup back",
                 openapi_extra=_body_doc(
                     "`backup`: a backup's `name` from GET …/backups (default: the newest, the one the last save or "
                     "restore made). Its captions go back byte for byte and the captions its save created are removed; "
                     "the current ones are kept in a new backup first (`undo_backup`: restoring it undoes this). "
                     "Refused with 409 while the session holds unsaved edits.",
                     {"newest": {}, "by name": {"backup": "2026-12-05_17-02-44"}}, {"backup": {"type": "string"}}))
    def restore_dataset(session_id: str, body: dict = Depends(object_body)):
        """Restores a backup on disk and reads the folder again; answers `restored` and `removed` (caption files),
        `backup`, `backup_folder` and `undo_backup` (where the replaced captions went), `message`."""
        only_fields(body, ("backup",), "POST /datasets/{sid}/restore")
        session = sessions.get(session_id)
        name = body.get("backup")
        if name is not None and not isinstance(name, str):
            raise ApiError(400, "invalid", "backup: give a backup's name as text, as GET …/backups lists it", "backup")
        return tag_sessions.restore_session_backup(session, name)

    @router.delete("/datasets/{session_id}", summary="Close a session")
    def close_dataset(session_id: str):
        """Forgets the session and its unsaved edits (the files stay as last saved)."""
        sessions.get(session_id)  # an unknown one is a 404, as everywhere else
        sessions.close(session_id)
        return {"closed": session_id}

    @router.post("/datasets/{session_id}/autotag", summary="Auto-tag with a local WD14 model",
                 openapi_extra=_body_doc(
                     "`tagger`: a folder with `model.onnx` and `selected_tags.csv` (inside the allowed folders); "
                     "`mode`: skip (only untagged images), append, prepend, overwrite; `trigger_word`; thresholds; "
                     "`selection` as for edits. The tags go into the session as one undo step; save to write them.",
                     {"autotag": {"tagger": "/models/wd14-vit-v2", "mode": "append", "trigger_word": "zkchar",
                                  "general_threshold": 0.35, "selection": "all"}},
                     {"tagger": {"type": "string"}, "mode": {"type": "string"}}, ["tagger"]))
    def autotag_dataset(session_id: str, body: dict = Depends(object_body)):
        """Needs onnxruntime and a local WD14 model; either missing answers 400 naming what to install or download."""
        from ..dataset.tagger import EXISTING_CAPTION_MODES, TagSelection, WD14Tagger

        only_fields(body, AUTOTAG_FIELDS, "POST /datasets/{sid}/autotag")
        session = sessions.get(session_id)
        folder = checked_path(body.get("tagger"), settings.roots(), "tagger", must_exist=True)
        mode = body.get("mode", "skip")
        if mode not in EXISTING_CAPTION_MODES:
            raise ApiError(400, "invalid", f"mode: use one of {', '.join(EXISTING_CAPTION_MODES)}", "mode")
        thresholds = {name: body.get(name, default) for name, default in
                      (("general_threshold", 0.35), ("character_threshold", 0.85))}
        for name, value in thresholds.items():
            if not is_number(value) or not 0 <= value <= 1:
                raise ApiError(400, "invalid", f"{name}: give a number between 0 and 1", name)
        excluded = body.get("excluded_tags", "")
        if isinstance(excluded, list) and all(isinstance(tag, str) for tag in excluded):
            excluded = ", ".join(excluded)
        if not isinstance(excluded, str):
            raise ApiError(400, "invalid", 'excluded_tags: give tags as "a, b" or ["a", "b"]', "excluded_tags")
        trigger = body.get("trigger_word")
        if trigger is not None and not isinstance(trigger, str):
            raise ApiError(400, "invalid", "trigger_word: give the word as text", "trigger_word")
        selection = TagSelection(**thresholds, excluded_tags=frozenset(tag_sessions.tag_editor.split_tags(excluded)))
        try:
            tagger = WD14Tagger(folder, selection)
        except UserError as error:
            raise ApiError(400, "tagger_unavailable", str(error), "tagger") from None
        images = tag_sessions.selected_images(session, body.get("selection", "all"))
        return tag_sessions.autotag(session, tagger, images, mode, trigger or None)

    add_grid_routes(router, services, object_body)

    @router.api_route("/{unknown:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    def no_such_route(unknown: str, request: Request):
        """Last: what no route above takes gets the documented error shape, not FastAPI's {"detail": …}."""
        raise ApiError(404, "not_found", f"no {request.method} {PREFIX}/{unknown}; GET /docs lists the API's routes")

    return router


# ---------------------------------------------------------------------------------------------------------------
# Grids: planned at once (mistakes answer 400), generated in the background one grid at a time.

GRID_FIELDS = ("x", "y", "lora", "strength", "checkpoint", "settings", "baseline", "confirmed")
GRID_SETTINGS = ("prompt", "negative_prompt", "steps", "sampler", "scheduler", "cfg_scale", "seed", "width", "height",
                 "clip_skip")


def _checked_grid_settings(overrides: dict) -> dict:
    from ..grid.plan import SETTING_RANGES, checked_setting

    for key, value in overrides.items():
        if key in SETTING_RANGES:
            overrides = {**overrides, key: checked_setting(key, value, f"settings.{key}")}
        elif not isinstance(value, str):
            raise ApiError(400, "invalid", f"settings.{key}: give text", f"settings.{key}")
    return overrides


def grid_json(status: GridStatus) -> dict:
    return {"id": status.id, "status": status.status, "created": status.created, "started": status.started,
            "progress": {"done": status.done, "total": status.total}, "message": status.message,
            "seconds": status.seconds, "best_epoch": status.best_epoch,
            "image": f"{PREFIX}/grids/{status.id}/image" if status.image else None,
            "image_path": str(status.image) if status.image else None}


def grid_request(body: dict, defaults, roots: list[Path], checkpoints: Mapping[str, Path] | None = None, host=None):
    """The grid body → ``grid.plan.GridRequest`` (generation settings: the host's defaults, overridden by
    ``settings``); a LoRA or a checkpoint given as a path must lie in the allowed folders, a checkpoint otherwise be
    one of the host's titles (``checkpoints``); a sampler one of the ``host``'s, by its name there."""
    from ..grid.plan import AxisSpec, GridRequest, is_lora_tag

    def axis(name: str) -> AxisSpec:
        value = body.get(name)
        if not isinstance(value, dict) or not isinstance(value.get("kind"), str):
            raise ApiError(400, "invalid", f'{name}: give an axis such as {{"kind": "strength", "values": ["0.5", "1"]}}', name)
        values = value.get("values", [])
        if isinstance(values, str):  # as the Grid tab and the X/Y/Z plot split them: quotes keep a comma
            from ..grid.axes import typed_values

            values = typed_values(value["kind"], values)
        values = [str(v) for v in values]
        if value["kind"] == "checkpoint":
            values = [checkpoint(v, f"{name}.values") for v in values]
        if value["kind"] == "lora":  # a path as the `lora` key's: "is not in the Lora folder" said the file existed
            values = [str(checked_path(v, roots, f"{name}.values", must_exist=True))
                      if ("/" in v or "\\" in v) and not is_lora_tag(v) else v for v in values]
        return AxisSpec(value["kind"], values)

    def checkpoint(value: str, field: str) -> str:
        """A title (or file name) of the host's list as it is; anything else is a path, which must lie in the allowed
        folders: a request may not make the server open, or say whether there is, a file elsewhere."""
        listed = checkpoints or {}
        if value in listed or any(value in (Path(path).name, Path(path).stem) for path in listed.values()):
            return value
        return str(checked_path(value, roots, field, must_exist=True))

    if unknown := sorted(set(body) - set(GRID_FIELDS)):  # "baselin": false was dropped, and the grid drew a baseline
        raise ApiError(400, "invalid", f"{unknown[0]}: not a grid key; use {', '.join(GRID_FIELDS)}", unknown[0])
    overrides = body.get("settings") or {}
    unknown = sorted(set(overrides) - set(GRID_SETTINGS)) if isinstance(overrides, dict) else ["settings"]
    if unknown:
        raise ApiError(400, "invalid", f"settings.{unknown[0]}: use {', '.join(GRID_SETTINGS)}", "settings")
    overrides = _checked_grid_settings(overrides)
    if host is not None and "sampler" in overrides:
        from ..grid.plan import host_sampler

        overrides = {**overrides, "sampler": host_sampler(host, overrides["sampler"], "settings.sampler")}
    if body.get("checkpoint") is not None:
        body = {**body, "checkpoint": checkpoint(str(body["checkpoint"]), "checkpoint")}
    lora = str(body.get("lora") or "")
    if ("/" in lora or "\\" in lora) and not is_lora_tag(lora):  # a tag names a LoRA as a prompt does
        lora = str(checked_path(lora, roots, "lora", must_exist=True))
    strength = body.get("strength")  # left out: a <lora:name:weight> tag's weight, else 1
    if "strength" in body and (not is_number(strength) or not math.isfinite(strength)):
        raise ApiError(400, "invalid", "strength: give a number such as 0.8 (the LoRA's weight where no axis sets it)",
                       "strength")
    try:
        return GridRequest(x=axis("x"), y=axis("y"), settings=dataclasses.replace(defaults, **overrides), lora=lora,
                           strength=None if strength is None else float(strength), checkpoint=body.get("checkpoint"),
                           baseline=flag(body, "baseline", True), confirmed=flag(body, "confirmed", False))
    except (TypeError, ValueError) as error:
        raise ApiError(400, "invalid", f"grid: {error}") from None


def add_grid_routes(router: APIRouter, services: Services, object_body: Callable) -> None:
    grids = services.grids

    @router.post("/grids", status_code=202, summary="Make a Prompt-Lora-Grid",
                 openapi_extra=_body_doc(
                     "Two axes (`kind`: epoch, strength, lora, prompt, seed, checkpoint; `values`), the LoRA or training "
                     "run (`lora`: a name in the Lora folder, `name@eN`, a `<lora:name:weight>` tag, or a file path), "
                     "`strength` where no axis sets it (default: the tag's weight, else 1), "
                     "`settings` (prompt, negative_prompt, steps, sampler, cfg_scale, seed, width, height; default: the "
                     "host's txt2img values), `baseline` (a column without the LoRA), `confirmed` (needed above 400 cells).",
                     {"epoch x strength": {"lora": "zkstar", "x": {"kind": "strength", "values": ["0.4", "0.7", "1.0"]},
                                           "y": {"kind": "epoch", "values": []},
                                           "settings": {"prompt": "zkstar, night sky", "seed": 11, "steps": 20}}},
                     {"x": {"type": "object"}, "y": {"type": "object"}, "lora": {"type": "string"}}, ["x", "y"]))
    def create_grid(body: dict = Depends(object_body)):
        """Planned at once (an empty axis, an unknown LoRA or too many cells answer 400), then generated in the
        background; returns the grid id to poll."""
        from ..grid.plan import plan_for_host

        checkpoints = services.host.checkpoints()
        request = grid_request(body, services.host.generation_defaults(), services.settings.roots(), checkpoints,
                               services.host)
        plan, _ = plan_for_host(request, services.lora_library(), services.host, checkpoints)
        return JSONResponse(grid_json(grids.submit(plan)), 202)

    def grid_or_404(grid_id: str) -> GridStatus:
        status = grids.get(grid_id)
        if status is None:
            raise ApiError(404, "grid_not_found", f"no grid {grid_id} (grids are kept until the server restarts)")
        return status

    @router.get("/grids", summary="List grids")
    def list_grids():
        """Every grid asked for since the server started, newest first, with its status and progress."""
        return {"grids": [grid_json(status) for status in grids.all()]}

    @router.get("/grids/{grid_id}", summary="A grid's progress and result")
    def get_grid(grid_id: str):
        """Status (queued, running, finished, stopped, failed), cells done of total, the image once finished."""
        return grid_json(grid_or_404(grid_id))

    @router.post("/grids/{grid_id}/stop", summary="Stop a grid (keeping the images drawn)")
    def stop_grid(grid_id: str):
        """A running grid stops after the image being drawn and saves the images drawn so far, the others grey
        (status `stopped` once it has: poll GET /grids/{id}); a queued grid leaves the queue. 409 once it has ended."""
        grid_or_404(grid_id)
        try:
            return grid_json(grids.stop(grid_id))
        except UserError as error:
            raise ApiError(409, "grid_state", str(error)) from None

    @router.get("/grids/{grid_id}/image", summary="The grid image (PNG)", response_class=FileResponse)
    def grid_image(grid_id: str):
        """The assembled grid with its labels and legend, once the grid has finished (or was stopped)."""
        status = grid_or_404(grid_id)
        if status.image is None:
            raise ApiError(409, "grid_not_ready", f"grid {grid_id} is {status.status}; no image yet")
        return FileResponse(status.image, media_type="image/png")


# ---------------------------------------------------------------------------------------------------------------
# Auth and registration.


def basic_credentials_match(users: Mapping[str, str], authorization: str | None) -> bool:
    """An ``Authorization: Basic …`` header naming one of ``users`` with its password."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return credentials_match(users, user, password)


def credentials_match(users: Mapping[str, str], user: str, password: str) -> bool:
    expected = users.get(user)
    return expected is not None and secrets.compare_digest(password.encode("utf-8"), expected.encode("utf-8"))


class RemotePageGuard:
    """ASGI middleware for the standalone app on the network: the pages and the UI's websocket ask for the API's
    credentials too (the tabs read and write files as the API does); the API routes answer for themselves."""

    def __init__(self, app, settings: AppSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope["path"].startswith(PREFIX):
            return await self.app(scope, receive, send)
        users = self.settings.api_credentials
        authorization = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        if users and basic_credentials_match(users, authorization) or not users and self.settings.allow_unauthenticated_remote:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await receive()  # the connect message, then the refusal (a 403 to the handshake)
            await send({"type": "websocket.close", "code": 1008})
            return
        if users:
            response = PlainTextResponse("LoRA Trainer: sign in with the --api-auth user and password", 401,
                                         headers={"WWW-Authenticate": 'Basic realm="LoRA Trainer"'})
        else:
            response = PlainTextResponse("LoRA Trainer listens on the network without credentials: start it with "
                                         "--api-auth user:password (or --allow-unauthenticated)", 403)
        await response(scope, receive, send)


ALLOW_REMOTE = "(in the WebUI: Settings → LoRA Trainer; the standalone app: --allow-unauthenticated)"


def auth_dependency(settings: AppSettings, listening_remotely: bool) -> Callable:
    """HTTP Basic against ``settings.api_credentials`` (the WebUI's ``--api-auth``), as the wd14-tagger extension
    does; with no credentials, refuse every route when listening remotely unless the setting allows it."""
    basic = HTTPBasic(auto_error=False)

    def check(credentials: HTTPBasicCredentials | None = Depends(basic)) -> None:
        users = settings.api_credentials
        if not users:
            if listening_remotely and not settings.allow_unauthenticated_remote:
                raise ApiError(403, "auth_required", "The LoRA Trainer API is off: the server listens on the network "
                               "without credentials. Start it with --api-auth user:password, or allow unauthenticated "
                               f"remote access {ALLOW_REMOTE}.")
            return
        if credentials is not None and credentials_match(users, credentials.username, credentials.password):
            return
        raise HTTPException(401, "wrong or missing credentials (HTTP Basic, the --api-auth user:password)",
                            headers={"WWW-Authenticate": "Basic"})

    return check


def register(app: FastAPI, services: Services, listening_remotely: bool, own_pages: bool = False) -> None:
    """Add every route to ``app`` behind the auth dependency; with ``own_pages`` (the standalone app, whose pages are
    ours, not the WebUI's) guard the pages with the same credentials on the network. Say at startup what refuses
    remote use."""
    settings = services.settings
    guards_pages = listening_remotely and own_pages
    if listening_remotely and not settings.api_credentials and not settings.allow_unauthenticated_remote:
        refused = f"the pages and the API ({PREFIX}) answer" if guards_pages else f"the API at {PREFIX} answers"
        log.warning("LoRA Trainer: %s 403: the server listens on the network without --api-auth. "
                    "Set --api-auth user:password, or allow unauthenticated remote access %s.", refused, ALLOW_REMOTE)
    app.include_router(create_router(services), dependencies=[Depends(auth_dependency(settings, listening_remotely))])
    if guards_pages:  # the tabs read and write files as the API does: the same credentials
        app.add_middleware(RemotePageGuard, settings=settings)
    resume_webhooks(services)
