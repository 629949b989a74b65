"""Grids asked for over the HTTP API: planned by the caller, drawn in the background one at a time (one model, one
GPU) by one worker thread, each stoppable as the Grid tab's Interrupt and the grid command's Ctrl-C stop theirs:
after the image being drawn, keeping the images drawn so far. ``close`` stops them all before the process exits: a
daemon thread still inside torch when Python finalizes ended the process with ``terminate called without an active
exception`` (a C++ abort) instead of its exit lines."""

from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import threading
import time
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

ACTIVE_GRID = ("queued", "running")


@dataclasses.dataclass
class GridStatus:
    id: str
    created: float  # time.time(), as a job's
    status: str = "queued"  # queued, running, finished, stopped, failed
    started: float | None = None
    done: int = 0
    total: int = 0
    message: str | None = None
    image: Path | None = None
    seconds: float | None = None
    best_epoch: str | None = None
    stop: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)


class GridQueue:
    def __init__(self, host, folder: Path):
        self.host, self.folder = host, Path(folder)
        self._grids: dict[str, GridStatus] = {}
        self._waiting: collections.deque[tuple[GridStatus, object]] = collections.deque()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._closed = False
        # Ctrl-C again while close() waited: the worker is left inside torch, so the process must end without Python's
        # finalization (os._exit), which would abort in C++ under it
        self.abandoned = False

    def submit(self, plan) -> GridStatus:
        """Queue a ``grid.plan.GridPlan``; its worker starts where none runs."""
        status = GridStatus(secrets.token_hex(8), time.time(), total=len({cell.key for row in plan.cells for cell in row}))
        status.best_epoch = str(plan.best_epoch) if plan.best_epoch else None
        with self._lock:
            if self._closed:
                raise UserError("the server is shutting down; ask for the grid again once it runs")
            self._grids[status.id] = status
            self._waiting.append((status, plan))
            if self._worker is None:
                # a daemon, so that a host which never closes us (the WebUI killed) is not held open; close() joins it
                self._worker = threading.Thread(target=self._work, name="lora-trainer-grids", daemon=True)
                self._worker.start()
        return status

    def get(self, grid_id: str) -> GridStatus | None:
        return self._grids.get(grid_id)

    def all(self) -> list[GridStatus]:
        """Newest first."""
        return sorted(self._grids.values(), key=lambda grid: grid.created, reverse=True)

    def stop(self, grid_id: str) -> GridStatus:
        """A running grid stops after the image being drawn and keeps those drawn (status ``stopped`` once it has);
        a queued one leaves the queue at once. Raises UserError for a grid that has ended."""
        with self._lock:
            status = self._grids[grid_id]
            if status.status == "queued":
                self._drop(status, "removed from the queue before it started: nothing was drawn")
            elif status.status == "running":
                status.stop.set()
                status.message = "stopping after the image being drawn"
            else:
                raise UserError(f"grid {grid_id} is {status.status}; only a queued or running grid can be stopped")
        return status

    def close(self) -> list[GridStatus]:
        """Drop the queued grids, stop the running one after its image and wait for it; returns the grids this
        stopped or dropped (none on a second call)."""
        with self._lock:
            self._closed = True
            dropped = [status for status, _ in self._waiting]
            for status in dropped:
                self._drop(status, "dropped from the queue: the server stopped before it started")
            running = [status for status in self._grids.values() if status.status == "running"]
            for status in running:
                status.stop.set()
            worker = self._worker
        if running:
            log.warning("LoRA Trainer: stopping grid %s after the image being drawn…", running[0].id)
        if worker is not None:
            try:
                worker.join()
            except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or a SIGTERM/Ctrl-Break made SystemExit, again
                self.abandoned = True
                log.warning("LoRA Trainer: stopping at once; the grid's images saved before stay in %s", self.folder)
        return [status for status in running + dropped if status.status == "stopped"]  # not one that ended meanwhile

    def _drop(self, status: GridStatus, message: str) -> None:
        self._waiting = collections.deque(item for item in self._waiting if item[0] is not status)
        status.status, status.message = "stopped", message

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    self._worker = None
                    return
                status, plan = self._waiting.popleft()
                status.status, status.started = "running", time.time()
            self._draw(status, plan)

    def _draw(self, status: GridStatus, plan) -> None:
        from ..grid.plan import run_grid, unfinished_images

        started = time.perf_counter()

        def progress(done: int, total: int) -> None:
            status.done, status.total = done, total

        try:
            result = run_grid(self.host, plan, self.folder / status.id, progress, status.stop.is_set)
            status.image = result.path
            message = ("no cell finished (interrupted or skipped): nothing was saved" if result.path is None else
                       unfinished_images(result, plan))
            warnings = getattr(self.host, "take_warnings", lambda: [])()  # a LoRA not found or not fitting
            message = "; ".join(filter(None, [message, *plan.notes, *result.warnings, *warnings])) or None
            ended = "stopped" if result.stopped else "finished"
        except Exception as error:  # noqa: BLE001 - reported through GET /grids/{id}
            ended, message = "failed", str(error)
            if not isinstance(error, UserError):
                log.exception("LoRA Trainer: grid %s failed", status.id)
        status.seconds = round(time.perf_counter() - started, 3)
        status.message, status.status = message, ended  # the status last: a client that sees it sees the rest


def grids_at_exit(grids: list[GridStatus]) -> list[str]:
    """A line for each grid the exit stopped or dropped (``GridQueue.close``): what was kept, and that nothing asks
    for it again (grids are kept in memory only)."""
    lines = []
    for grid in grids:
        if grid.image is not None:
            lines.append(f"grid {grid.id} was stopped after {grid.done} of {grid.total} images; those are saved in "
                         f"{grid.image}")
        elif grid.started is not None:
            lines.append(f"grid {grid.id} was stopped before its first image finished: nothing was saved; ask for it "
                         "again once the app runs")
        else:
            lines.append(f"grid {grid.id} ({grid.total} images) was dropped before it started; ask for it again once "
                         "the app runs")
    return lines
