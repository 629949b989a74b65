"""The job queue's memory: one SQLite file that survives a WebUI restart.

A job row holds its options (the same dict a Kohya TOML holds), its status, where its events and files are, and
the last state folder it saved, so an interrupted job can be resumed with one click.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

STATUSES = ("queued", "running", "finished", "failed", "stopped", "interrupted", "paused")
ACTIVE = ("queued", "running")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    options TEXT NOT NULL,
    folder TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    pid INTEGER,
    message TEXT,
    files TEXT NOT NULL DEFAULT '[]',
    last_state TEXT,
    resumed_from INTEGER
)
"""


@dataclass
class Job:
    id: int
    name: str
    status: str
    options: dict
    folder: Path
    created: float
    started: float | None = None
    finished: float | None = None
    pid: int | None = None
    message: str | None = None
    files: list[str] = field(default_factory=list)
    last_state: str | None = None
    resumed_from: int | None = None

    @property
    def events_path(self) -> Path:
        return self.folder / "events.jsonl"

    @property
    def stop_path(self) -> Path:
        return self.folder / "stop"

    @property
    def state_folder(self) -> Path:
        return self.folder / "states"

    @property
    def config_path(self) -> Path:
        return self.folder / "config.toml"

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "status": self.status, "options": self.options, "folder": str(self.folder),
                "created": self.created, "started": self.started, "finished": self.finished, "message": self.message,
                "files": self.files, "last_state": self.last_state, "resumed_from": self.resumed_from}


# How long after a job was marked running its trainer may start (the earlier run's files are moved out of the way
# in between): a process under the job's pid that started at another time is not its trainer but a later process
# that was given the same number after the trainer died — never to be followed, or killed by a stop.
TRAINER_START_WINDOW = (-5.0, 60.0)


def trainer_alive(job: "Job") -> bool:
    """The job's trainer still runs: its pid is taken, by a process that started when the job did (where the system
    tells a process's start time: Linux, Windows)."""
    if not pid_alive(job.pid):
        return False
    began = process_start_time(job.pid)
    if began is None or job.started is None:
        return True
    earliest, latest = TRAINER_START_WINDOW
    return job.started + earliest <= began <= job.started + latest


def process_start_time(pid: int, windows: bool = os.name == "nt") -> float | None:
    """When process ``pid`` started, in seconds since the epoch; None where the system does not say."""
    try:
        if windows:
            return _windows_process_start(pid)
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, starttime: clock ticks after boot
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return None


def windows_kernel32(kernel32=None):
    """kernel32 (``ctypes.WinDLL``'s, or the one given) with the prototypes of the calls made here: without them ctypes
    reads every result as a C int, and on 64-bit Windows a HANDLE above 2**31 came back cut (or negative)."""
    import ctypes
    from ctypes import wintypes

    kernel32 = kernel32 or ctypes.WinDLL("kernel32")
    for name, restype, argtypes in (
            ("OpenProcess", wintypes.HANDLE, [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]),
            ("GetProcessTimes", wintypes.BOOL, [wintypes.HANDLE] + [wintypes.LPFILETIME] * 4),
            ("GetExitCodeProcess", wintypes.BOOL, [wintypes.HANDLE, wintypes.LPDWORD]),
            ("CloseHandle", wintypes.BOOL, [wintypes.HANDLE])):
        function = getattr(kernel32, name)
        function.restype, function.argtypes = restype, argtypes
    return kernel32


def _windows_process_start(pid: int) -> float | None:
    import ctypes
    from ctypes import wintypes

    kernel32 = windows_kernel32()
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return None
    try:
        times = [wintypes.FILETIME() for _ in range(4)]  # creation, exit, kernel, user
        if not kernel32.GetProcessTimes(handle, *(ctypes.byref(t) for t in times)):
            return None
        created = (times[0].dwHighDateTime << 32) | times[0].dwLowDateTime  # 100 ns since 1601
        return created / 1e7 - 11644473600.0
    finally:
        kernel32.CloseHandle(handle)


def pid_alive(pid: int | None, windows: bool = os.name == "nt") -> bool:
    if not pid:
        return False
    if windows:  # os.kill(pid, 0) there sends Ctrl-C to the process group: it would stop the trainer it asks about
        return _windows_process_running(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _windows_process_running(pid: int, kernel32=None) -> bool:
    import ctypes

    kernel32 = windows_kernel32(kernel32)
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


class JobStore:
    def __init__(self, database: str | Path, jobs_folder: str | Path):
        self.database = Path(database)
        self.jobs_folder = Path(jobs_folder)
        self.database.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.database, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def _row(self, row) -> Job:
        return Job(row["id"], row["name"], row["status"], json.loads(row["options"]), Path(row["folder"]), row["created"],
                   row["started"], row["finished"], row["pid"], row["message"], json.loads(row["files"]),
                   row["last_state"], row["resumed_from"])

    def add(self, name: str, options: dict, resumed_from: int | None = None) -> Job:
        with self._connect() as db:
            cursor = db.execute("INSERT INTO jobs (name, status, options, folder, created, resumed_from) VALUES (?, 'queued', ?, '', ?, ?)",
                                (name, json.dumps(options), time.time(), resumed_from))
            job_id = cursor.lastrowid
            folder = self.jobs_folder / f"job-{job_id:05d}"
            db.execute("UPDATE jobs SET folder = ? WHERE id = ?", (str(folder), job_id))
        folder.mkdir(parents=True, exist_ok=True)
        return self.get(job_id)

    def get(self, job_id: int) -> Job | None:
        if not -2**63 <= job_id < 2**63:  # beyond SQLite's integers: no such job (not an OverflowError)
            return None
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._row(row)

    def all(self) -> list[Job]:
        with self._connect() as db:
            return [self._row(r) for r in db.execute("SELECT * FROM jobs ORDER BY id")]

    def next_queued(self) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1").fetchone()
        return None if row is None else self._row(row)

    def update(self, job_id: int, **fields) -> Job:
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"unknown job status {fields['status']!r}")
        if "files" in fields:
            fields["files"] = json.dumps(fields["files"])
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self._connect() as db:
            db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))
        return self.get(job_id)

    def delete(self, job_id: int) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def recover(self) -> list[Job]:
        """After a restart: a job marked running whose process is gone ends as its events say — finished, stopped
        or failed when the trainer ran to its end while nobody followed it, else "interrupted" (resumable) — with the
        files and the last state its events name; one whose trainer still runs stays running, for the runner to follow
        (``JobRunner.run_next``)."""
        from ..errors import UserError
        from ..training.events import EventLog, read_events  # light: json and paths

        recovered = []
        for job in self.all():
            if job.status == "running" and not trainer_alive(job):
                events, _ = read_events(job.events_path, 0)
                files = [e["path"] for e in events if e["event"] == "saved" and Path(e["path"]).exists()]
                states = [e["path"] for e in events if e["event"] == "state" and e.get("action") == "saved"]
                last = events[-1] if events else {}
                if last.get("event") == "end":
                    status, message = ("stopped", "stopped and saved") if last.get("stopped") else ("finished", None)
                elif last.get("event") == "error":
                    status, message = "failed", last.get("message")
                else:  # its stream ends here too, for a client waiting on it for an end or an error
                    resumable = states or job.last_state
                    status, message = "interrupted", ("the trainer stopped when the app did; " + (
                        "resume continues from the last saved state" if resumable else
                        "it had saved no state to resume from: start the job again"))
                    try:
                        with EventLog(job.events_path) as log:
                            log.emit("error", message=message)
                    except UserError:  # a job folder gone read-only must not stop the server starting
                        pass
                recovered.append(self.update(job.id, status=status, finished=time.time(), message=message, pid=None,
                                             files=files or job.files, last_state=states[-1] if states else job.last_state))
        return recovered
