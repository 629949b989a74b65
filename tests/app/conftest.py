"""Shared fixtures for the app-shell tests (API, tabs, tag sessions). Other test files under tests/app use them:

- ``FakeHost``: implements ``lora_trainer.app.host.Host``; records every call in ``host.calls`` (``(name, args)``)
  and returns tiny solid-colour images; ``host.interrupt_after`` (int | None) makes ``interrupted()`` turn True after
  that many ``generate`` calls.
- ``app_settings``: an ``AppSettings`` over tmp folders: ``tmp/loras`` (lora_folder), ``tmp/data`` (data_folder),
  ``tmp/datasets`` (the one dataset root), ``tmp/checkpoints`` (checkpoint folder, holding nothing).
- ``services``: ``Services.create(app_settings, FakeHost(), start=False)`` (the job runner is not started: tests that
  need jobs to run start it, or build their own with ``fast_job_command``); closed after the test.
- ``make_dataset(name="10_thing", count=4, tags=...)``: a DreamBooth-style folder under the dataset root
  (``datasets/<name>/<repeats>_<concept>``... see its docstring) with tiny PNGs and captions; returns the folder.
- ``fast_job_command``: a ``JobRunner`` command (job → argv) running a tiny Python script that writes step events,
  a saved file into the job's output_dir and an end event within a fraction of a second (stops early on a stop file;
  ``FAKE_STEP_SECONDS`` in the environment sets the time per step).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.app.services import Services
from lora_trainer.app.settings import AppSettings
from lora_trainer.sampling.txt2img import GeneratedImage, GenerationSettings


class FakeHost:
    """A Host that records calls and draws nothing: each ``generate`` returns an 8×8 image of one colour."""

    name = "standalone"

    def __init__(self, checkpoints: dict[str, Path] | None = None):
        self.calls: list[tuple[str, tuple]] = []
        self._checkpoints = checkpoints or {}
        self.interrupt_after: int | None = None

    def checkpoints(self) -> dict[str, Path]:
        self.calls.append(("checkpoints", ()))
        return dict(self._checkpoints)

    def generation_defaults(self) -> GenerationSettings:
        self.calls.append(("generation_defaults", ()))
        return GenerationSettings("a photo", steps=4, width=64, height=64, seed=1)

    def sampler_names(self) -> list[str]:
        return ["Euler", "DPM++ 2M Karras"]

    def sampler(self, name: str) -> str | None:
        return next((known for known in self.sampler_names() if known.lower() == name.lower()), None)

    def scheduler_names(self) -> list[str]:
        return []

    def generate(self, settings: GenerationSettings, checkpoint: str | None = None, progress=None) -> GeneratedImage:
        self.calls.append(("generate", (settings, checkpoint)))
        if progress:
            progress(settings.steps, settings.steps)
        shade = (len(self.generated) * 37) % 256
        image = Image.new("RGB", (settings.width or 8, settings.height or 8), (shade, 128, 255 - shade))
        return GeneratedImage(image=image, seed=settings.seed, infotext=f"{settings.prompt}\nSteps: {settings.steps}")

    @property
    def generated(self) -> list[tuple]:
        return [args for name, args in self.calls if name == "generate"]

    def interrupted(self) -> bool:
        return self.interrupt_after is not None and len(self.generated) >= self.interrupt_after

    def refresh_loras(self) -> None:
        self.calls.append(("refresh_loras", ()))

    def take_warnings(self) -> list[str]:
        """What the standalone host says of a LoRA it left out (not found, not fitting), once per generation here."""
        return [f"LoRA left out of {len(self.generated)} images"] if self.generated else []

    def release_gpu(self) -> None:
        self.calls.append(("release_gpu", ()))

    def restore_gpu(self) -> None:
        self.calls.append(("restore_gpu", ()))


@pytest.fixture
def fake_host() -> FakeHost:
    return FakeHost()


@pytest.fixture
def app_settings(tmp_path: Path) -> AppSettings:
    folders = {name: tmp_path / name for name in ("loras", "data", "datasets", "checkpoints")}
    for folder in folders.values():
        folder.mkdir()
    return AppSettings(lora_folder=folders["loras"], data_folder=folders["data"], dataset_roots=[folders["datasets"]],
                       checkpoint_folders=[folders["checkpoints"]])


@pytest.fixture
def services(app_settings: AppSettings, fake_host: FakeHost):
    services = Services.create(app_settings, fake_host, start=False)
    yield services
    services.close()


@pytest.fixture
def make_dataset(app_settings: AppSettings):
    """``make_dataset(name="chars", concept="10_zkchar", count=4, tags=None)`` → ``datasets/<name>``, holding the
    concept folder with ``count`` 16×16 PNGs ``img_000.png``… and captions; ``tags`` (one caption per image, a list
    of strings) defaults to ``"zkchar, red, square"`` / ``"zkchar, blue, circle"`` alternating. A caption of None
    writes no caption file."""

    def make(name: str = "chars", concept: str = "10_zkchar", count: int = 4, tags: list[str | None] | None = None) -> Path:
        folder = app_settings.dataset_roots[0] / name
        images = folder / concept
        images.mkdir(parents=True)
        captions = tags if tags is not None else [("zkchar, red, square" if i % 2 == 0 else "zkchar, blue, circle")
                                                  for i in range(count)]
        for index, caption in enumerate(captions):
            Image.new("RGB", (16, 16), (40 * index % 256, 90, 160)).save(images / f"img_{index:03d}.png")
            if caption is not None:
                (images / f"img_{index:03d}.txt").write_text(caption, encoding="utf-8")
        return folder

    return make


FAKE_TRAINER = textwrap.dedent('''
    """A stand-in trainer for tests: reads our config TOML, writes sd-scripts-like events, one saved file."""
    import json, os, sys, time
    from pathlib import Path
    import toml
    config = toml.load(sys.argv[1])
    events = open(config["events_file"], "a", encoding="utf-8")
    def emit(kind, **fields):
        events.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\\n")
        events.flush()
    total = int(config.get("max_train_steps", 5))
    emit("start", total_steps=total)
    stop_file = Path(config["stop_file"])
    for step in range(1, total + 1):
        if stop_file.exists() and set(stop_file.read_text().split()) & {"stop", "pause"}:
            break
        time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0.02")))
        emit("step", step=step, total=total, epoch=1, loss=0.1, average=0.1, lr=1e-4, seconds=0.02)
    out = Path(config.get("output_dir") or ".") / (config.get("output_name") or "last")
    out = out.with_suffix(".safetensors")
    import numpy
    from safetensors.numpy import save_file
    save_file({"lora_unet_x.lora_down.weight": numpy.zeros((1, 1), numpy.float32)}, str(out), metadata={"ss_output_name": out.stem, "ss_network_dim": "1"})
    emit("saved", path=str(out))
    emit("end", files=[str(out)], recommended_epoch=None, reason="")
''')


@pytest.fixture
def fast_job_command(tmp_path: Path):
    """A JobRunner command running ``FAKE_TRAINER`` on the job's config: ``max_train_steps`` steps (default 5) of
    ``FAKE_STEP_SECONDS`` each (environment variable, default 0.02; raise it to catch a job while it runs)."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER, encoding="utf-8")
    return lambda job: [sys.executable, str(script), str(job.config_path)]
