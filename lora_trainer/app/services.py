"""One object per process that the tabs and the HTTP API share: settings, host, the job store and its runner, the
API's grid queue.

Built once by the WebUI extension (``lora_trainer.webui.extension``) or the standalone app; both call
``Services.create``. The runner's event hook is where the host hears about saved files (Lora list refresh) and
where the Lora card's user metadata is written when a job ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..jobs.runner import JobRunner
from ..jobs.store import Job, JobStore
from ..networks.activation import LoraLibrary
from .grid_queue import GridQueue
from .host import Host
from .settings import AppSettings
from .tag_sessions import TagSessions


CARD_HINTS = "card.json"  # beside a job: what its Lora card should say that the options do not hold


def write_card_hints(job: Job, preferred_weight: float) -> None:
    """The preset's preferred weight, for the Lora card written when the job ends."""
    (job.folder / CARD_HINTS).write_text(json.dumps({"preferred_weight": preferred_weight}), encoding="utf-8")


@dataclass
class Services:
    settings: AppSettings
    host: Host
    store: JobStore
    runner: JobRunner
    tag_sessions: TagSessions = field(default_factory=TagSessions)  # the Tag Editor tab and the API share them
    grids: GridQueue = None  # type: ignore[assignment]  # set by create: it needs the host and the grids folder
    _gpu_released: bool = False
    _lora_library: LoraLibrary | None = None

    @classmethod
    def create(cls, settings: AppSettings, host: Host, start: bool = True, **runner_options) -> Services:
        settings.data_folder.mkdir(parents=True, exist_ok=True)
        store = JobStore(settings.jobs_database, settings.jobs_folder)
        services = cls(settings, host, store, None,  # type: ignore[arg-type]
                       tag_sessions=TagSessions(drafts_folder=settings.tag_drafts_folder),
                       grids=GridQueue(host, settings.grids_folder))
        services.runner = JobRunner(store, on_event=services._on_event, extras_folder=settings.extras_folder,
                                    cuda_device=settings.cuda_device, **runner_options)
        if start:
            services.runner.start()
        return services

    def lora_library(self) -> LoraLibrary:
        """The trainer's Lora folder, listed again, as the host lists LoRAs (the WebUI's "Load models/files in hidden
        directories" setting): where the grid finds runs, as ``<lora:…>`` finds the files it draws them with."""
        hidden = getattr(self.host, "list_hidden_files", True)
        if self._lora_library is None or self._lora_library.list_hidden != hidden:
            self._lora_library = LoraLibrary([self.settings.lora_folder], hidden)
        self._lora_library.refresh()
        return self._lora_library

    def close(self) -> None:
        self.grids.close()  # the grid being drawn ends after its image: no thread may be inside torch at exit
        self.runner.close()
        if self.tag_sessions.drafts is not None:
            self.tag_sessions.drafts.close()  # the last steps' draft written, and its writer ended

    def _on_event(self, job: Job, event: dict) -> None:
        kind = event.get("event")
        if kind == "job" and event["status"] == "running" and self.settings.unload_checkpoint_while_training:
            self.host.release_gpu()
            self._gpu_released = True
        elif kind == "job" and event["status"] != "running" and self._gpu_released:
            self._gpu_released = False
            self.host.restore_gpu()
        elif kind == "saved" and Path(event.get("path", "")).parent.resolve() == self.settings.lora_folder.resolve():
            self.host.refresh_loras()
        elif kind == "end":
            self._finish(job, event)

    def _finish(self, job: Job, event: dict) -> None:
        from .user_metadata import write_card_metadata  # the Lora card's JSON: trigger words, weight, summary

        files = [Path(p) for p in event.get("files", [])]
        if files:
            write_card_metadata(files[-1], event, self._card_hints(job).get("preferred_weight", 1.0))
            self.host.refresh_loras()

    def _card_hints(self, job: Job) -> dict:
        """The job's hints, or those of the job it resumed (a resumed job is a new job with the same intent)."""
        while job is not None:
            try:
                return json.loads((job.folder / CARD_HINTS).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                job = self.store.get(job.resumed_from) if job.resumed_from else None
        return {}
