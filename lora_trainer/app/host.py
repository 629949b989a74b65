"""What the tabs and the API need from whoever hosts them: the WebUI (``lora_trainer.webui.host``) or the
standalone app (``lora_trainer.app.standalone_host``). The grid and the Train tab only talk to this protocol, so
the WebUI's grids go through its own txt2img and the standalone ones through ours, with the same plan."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Protocol

from ..sampling.txt2img import GeneratedImage, GenerationSettings


class Host(Protocol):
    name: str  # "webui", "forge" or "standalone"

    def checkpoints(self) -> dict[str, Path]:
        """Title shown to the user → checkpoint file."""

    def generation_defaults(self) -> GenerationSettings:
        """Prompt, sampler, steps, size, CFG… prefilled in the grid and used by the API's grids (the WebUI's saved
        txt2img defaults when hosted there). A host may also offer ``txt2img_form`` (``webui.txt2img_form``): the
        grid tab then gets a "From txt2img" button that copies the live txt2img values."""

    def sampler_names(self) -> list[str]:
        """The samplers a grid may use: the WebUI's visible ones there (its settings hide some), ours standalone."""

    def sampler(self, name: str) -> str | None:
        """The host's own name for the sampler ``name`` (an alias, any case: "euler_a" → "Euler a"), or None when it
        has none: a grid asked for by name is checked, and run on that name, before anything is drawn."""

    def scheduler_names(self) -> list[str]:
        """The WebUI's schedule types ("Automatic", "Karras", …); empty where samplers carry their schedule."""

    def generate(self, settings: GenerationSettings, checkpoint: str | None = None,
                 progress: Callable[[int, int], None] | None = None) -> GeneratedImage | None:
        """One image; ``settings.prompt`` may hold ``<lora:name:weight>`` tags, applied the way the host applies them.
        None when the host's own Interrupt or Skip cut the image short (nothing worth keeping)."""

    def batch(self, count: int, label: str, steps: int | None = None) -> AbstractContextManager[None]:
        """Around the ``count`` ``generate`` calls of one grid (``steps`` sampling steps in all): the host shows its
        progress across all of them ("cell i of count") and keeps its queue for the grid. Optional: grids run
        without it."""

    def interrupted(self) -> bool:
        """True when the user pressed the host's Interrupt (grids stop between cells)."""

    def refresh_loras(self) -> None:
        """New files were written into the Lora folder: make the host's Lora list show them."""

    def release_gpu(self) -> None:
        """Before a training job: free the host's model memory (the 'unload the checkpoint' setting)."""

    def restore_gpu(self) -> None:
        """After the job: load the model back."""
