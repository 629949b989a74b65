"""The host of the standalone app: our own model code behind ``app.host.Host``.

One model is kept loaded (by checkpoint path). The ``<lora:…>`` tags of a prompt are read with
``networks.activation`` and merged with ``networks.apply.MergedNetworks``: networks read once stay cached, so
when only strengths change between generations (the grid's inner loop) only the difference is applied, and a
prompt without tags gives the base model's exact image. A LoRA that is missing or does not fit the model is
skipped with one warning per name and generation goes on, as in the WebUI.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..sampling.txt2img import GeneratedImage, GenerationSettings

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


class StandaloneHost:
    name = "standalone"

    def __init__(self, checkpoint_folders: list[Path], lora_folders: list[Path], default_checkpoint: Path | None = None):
        from ..networks.activation import LoraLibrary
        from ..tiny_model.build import TINY_MODEL_PATH

        self.checkpoint_folders = [Path(f) for f in checkpoint_folders]
        self.library = LoraLibrary([Path(f) for f in lora_folders])
        self.default_checkpoint = Path(default_checkpoint) if default_checkpoint else TINY_MODEL_PATH
        self.switching_seconds = 0.0  # time spent merging/unmerging LoRAs, for the grid's measure
        self._lock = threading.RLock()  # one generation at a time: the merged weights are shared
        self._model = None
        self._model_path: Path | None = None
        self._merged = None
        self._released_path: Path | None = None
        self._warned: set[str] = set()
        self._warnings: list[str] = []

    # --- Host -------------------------------------------------------------------------------------------------

    def checkpoints(self) -> dict[str, Path]:
        from ..tiny_model.build import EMBEDDED_TITLE, TINY_MODEL_PATH

        found = {EMBEDDED_TITLE: TINY_MODEL_PATH}
        for folder in self.checkpoint_folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*"), key=lambda p: str(p).lower()):
                if path.suffix.lower() in CHECKPOINT_SUFFIXES and path.is_file():
                    found.setdefault(path.relative_to(folder).as_posix(), path)
        if self.default_checkpoint not in found.values():
            found[self.default_checkpoint.name] = self.default_checkpoint
        return found

    def generation_defaults(self) -> GenerationSettings:
        from ..models.checkpoint import native_resolution
        from ..tiny_model.build import TINY_MODEL_PATH
        from ..tiny_model.shapes import CONCEPT_TRIGGER

        if self.default_checkpoint.resolve() == TINY_MODEL_PATH.resolve():
            # the tiny model draws 64-pixel shapes; the demo's settings show its LoRAs best
            return GenerationSettings(CONCEPT_TRIGGER, steps=20, sampler="DPM++ 2M Karras", cfg_scale=5.0, seed=11,
                                      width=64, height=64)
        size = native_resolution(self.default_checkpoint) or 512  # SDXL draws at 1024: at 512 it gives broken images
        return GenerationSettings("", steps=20, sampler="DPM++ 2M Karras", cfg_scale=7.0, seed=-1, width=size, height=size)

    def sampler_names(self) -> list[str]:
        from ..sampling.samplers import SAMPLERS

        return list(SAMPLERS)

    def sampler(self, name: str) -> str | None:
        from ..sampling.samplers import sampler_name

        try:
            return sampler_name(name)
        except ValueError:
            return None

    def scheduler_names(self) -> list[str]:
        return []  # our sampler names carry their schedule ("DPM++ 2M Karras")

    def generate(self, settings: GenerationSettings, checkpoint: str | None = None,
                 progress: Callable[[int, int], None] | None = None) -> GeneratedImage:
        import dataclasses

        from ..networks.activation import lora_hashes_infotext
        from ..sampling.txt2img import model_infotext, txt2img

        with self._lock:
            model = self._load(self._checkpoint_path(checkpoint))
            used = self._apply_loras(settings.prompt, model)
            extra = {**settings.extra_infotext, **lora_hashes_infotext(used, self.library)}
            image = txt2img(model, dataclasses.replace(settings, extra_infotext=extra), callback=progress,
                            model_info=model_infotext(self._model_path))
            return image[0]

    def interrupted(self) -> bool:
        return False  # no host-wide Interrupt here: the Grid tab, the API and the grid command stop their own grids

    def refresh_loras(self) -> None:
        self.library.refresh()

    def release_gpu(self) -> None:
        with self._lock:
            self._released_path = self._model_path
            self._drop_model()

    def restore_gpu(self) -> None:
        with self._lock:
            if self._released_path is not None and self._model is None:
                self._load(self._released_path)
            self._released_path = None

    # --- for the grid tab -------------------------------------------------------------------------------------

    def take_warnings(self) -> list[str]:
        """Warnings since the last call (each missing or unfit LoRA is reported once per session)."""
        warnings, self._warnings = self._warnings, []
        return warnings

    @property
    def loaded_checkpoint(self) -> Path | None:
        return self._model_path

    # --- internals --------------------------------------------------------------------------------------------

    def _checkpoint_path(self, checkpoint: str | None) -> Path:
        if not checkpoint:
            return self._model_path or self.default_checkpoint
        titles = self.checkpoints()
        if checkpoint in titles:
            return titles[checkpoint]
        path = Path(checkpoint)
        if path.exists():  # a file or a Diffusers folder, as generate loads them
            return path
        raise UserError(f"checkpoint {checkpoint!r} is neither a listed checkpoint nor a file; pick one from the list")

    def _load(self, path: Path):
        import torch

        from ..models.checkpoint import load_checkpoint
        from ..networks.apply import MergedNetworks

        path = Path(path).resolve()
        if self._model is not None and self._model_path == path:
            return self._model
        self._drop_model()
        cuda = torch.cuda.is_available()
        model = load_checkpoint(path, dtype=torch.float16 if cuda else torch.float32, device="cuda" if cuda else "cpu",
                                vae_dtype=torch.float32 if cuda else None)
        self._model, self._model_path = model, path
        self._merged = MergedNetworks.for_model(model.config, model.unet, model.text_encoders)
        return model

    def _drop_model(self) -> None:
        self._model = self._merged = None
        self._model_path = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._warnings.append(message)
            log.warning(message)

    def _apply_loras(self, prompt: str, model) -> list[tuple[str, Path]]:
        """Merge exactly the prompt's LoRAs (nothing when it has no tags); returns (name, file) of those applied."""
        from ..networks.activation import merge_prompt_loras

        started = time.perf_counter()  # reading, checking and merging: all of it is the grid's switching time
        used, skipped = merge_prompt_loras(prompt, self.library, self._merged, model.config)
        for key, message in skipped:
            self._warn(key, message)
        self.switching_seconds += time.perf_counter() - started
        return used
