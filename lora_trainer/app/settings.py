"""The extension's settings as one dataclass, whatever holds them (the WebUI's Settings page or the standalone
app's command line), so the tabs, the API and the job runner read the same object."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class AppSettings:
    lora_folder: Path  # where finished LoRAs go (the WebUI's models/Lora)
    data_folder: Path  # the job database, job folders, grids
    dataset_roots: list[Path] = field(default_factory=list)  # datasets may only be read/edited below these
    checkpoint_folders: list[Path] = field(default_factory=list)
    unload_checkpoint_while_training: bool = True
    allow_unauthenticated_remote: bool = False  # --listen without --api-auth: refuse the API unless this is set
    api_credentials: dict[str, str] = field(default_factory=dict)  # user -> password (the WebUI's --api-auth)
    max_body_bytes: int = 1_000_000
    extras_folder: Path | None = None  # optional trainer packages installed on request (the extension's extras/)
    cuda_device: str | None = None  # the WebUI's --device-id: the trainer trains on the GPU the WebUI generates on

    @property
    def jobs_database(self) -> Path:
        return self.data_folder / "jobs.sqlite"

    @property
    def jobs_folder(self) -> Path:
        return self.data_folder / "jobs"

    @property
    def grids_folder(self) -> Path:
        return self.data_folder / "grids"

    @property
    def tag_drafts_folder(self) -> Path:
        """The tag editor's unsaved edits, one JSON draft per folder, so that a restart loses none."""
        return self.data_folder / "tag-drafts"

    def roots(self) -> list[Path]:
        """Every folder a request may name: datasets, LoRAs, checkpoints and our own data."""
        return [*self.dataset_roots, self.lora_folder, *self.checkpoint_folders, self.data_folder]


def parse_api_auth(text: str | None) -> dict[str, str]:
    """The WebUI's ``--api-auth user:pass[,user2:pass2]``."""
    credentials = {}
    for pair in (text or "").split(","):
        if ":" in pair:
            user, password = pair.strip().split(":", 1)
            credentials[user] = password
    return credentials
