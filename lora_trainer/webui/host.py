"""``app.host.Host`` inside the WebUI: images through its own txt2img (queue lock, progress, Interrupt), its
checkpoint list, its Lora list and its unload/reload of the model around training.

Progress and Interrupt go through ``shared.state`` as the X/Y/Z plot's do: a grid is one WebUI job (``begin`` once,
``job_count`` = the number of cells before the first ``process_images``, which then leaves it alone and advances
``job_no`` after each cell), so the WebUI's progress (``/internal/progress``, ``/sdapi/v1/progress``) runs across the
whole grid, and its Interrupt stops it; the cell being drawn when Interrupt or Skip came is cut short by the
WebUI's sampler, so it is not kept.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..sampling.txt2img import GeneratedImage, GenerationSettings
from .detect import is_forge
from .txt2img_form import Txt2ImgComponents, saved_txt2img_settings


class WebUIHost:
    def __init__(self, on_refresh: Callable[[], None] | None = None, txt2img_form: Txt2ImgComponents | None = None):
        self.name = "forge" if is_forge() else "webui"
        self.on_refresh = on_refresh  # our own <lora:…> handler's library rescans too
        self.txt2img_form = txt2img_form  # the txt2img components, for the grid tab's "From txt2img"
        self._local = threading.local()  # the batch this thread runs, if any (it holds the queue lock)

    @property
    def list_hidden_files(self) -> bool:
        from .extra_network import list_hidden_files

        return list_hidden_files()

    def checkpoints(self) -> dict[str, Path]:
        from modules import sd_models

        return {title: Path(info.filename) for title, info in sd_models.checkpoints_list.items()}

    def generation_defaults(self) -> GenerationSettings:
        """What the WebUI's txt2img page opens with (its saved ui-config.json), else built-in values."""
        from modules import shared

        side = 1024 if getattr(shared.sd_model, "is_sdxl", False) else 512
        built_in = GenerationSettings(prompt="", steps=20, sampler="Euler a", cfg_scale=7.0, width=side, height=side)
        return saved_txt2img_settings(getattr(shared.cmd_opts, "ui_config_file", None), built_in)

    def sampler_names(self) -> list[str]:
        from modules import sd_samplers

        return list(sd_samplers.visible_sampler_names())

    def sampler(self, name: str) -> str | None:
        """Its exact name, an alias in any case ("k_euler_a"), as the WebUI's own API reads them, or a name with a
        schedule type after it ("DPM++ 2M Karras", from before 1.9): the WebUI's txt2img takes exact names only
        and draws any other with its default sampler, saying so only in its console."""
        from modules import sd_samplers

        if name in sd_samplers.all_samplers_map:
            return name
        if alias := getattr(sd_samplers, "samplers_map", {}).get(name.lower()):
            return alias
        try:
            from modules import sd_schedulers
        except ImportError:
            return None
        for scheduler in sd_schedulers.schedulers:
            for suffix in (scheduler.label, scheduler.name, *(getattr(scheduler, "aliases", None) or [])):
                if name.endswith(f" {suffix}") and name[: -len(suffix) - 1] in sd_samplers.all_samplers_map:
                    return name
        return None

    def scheduler_names(self) -> list[str]:
        try:
            from modules import sd_schedulers
        except ImportError:  # before WebUI 1.9 the schedule was part of the sampler's name
            return []
        return [scheduler.label for scheduler in sd_schedulers.schedulers]

    @contextmanager
    def batch(self, count: int, label: str = "Prompt-Lora-Grid", steps: int | None = None) -> Iterator[None]:
        """``count`` images (``steps`` sampling steps in all) as one WebUI job: the queue held throughout (txt2img
        waits, as it waits for the X/Y/Z plot), ``state.begin`` once, ``job_count`` set before the first image,
        ``textinfo`` naming the cell; the console's "Total progress" bar spans the grid and is closed after it, as
        txt2img closes it after its own images."""
        from modules import shared
        from modules.call_queue import queue_lock

        with queue_lock:
            shared.state.begin(job="lora_trainer_grid")
            shared.state.job_count = count
            if steps:
                shared.total_tqdm.updateTotal(steps)
            self._local.batch = {"label": label, "count": count, "done": 0}
            try:
                yield
            finally:
                self._local.batch = None
                shared.total_tqdm.clear()
                shared.state.end()

    def generate(self, settings: GenerationSettings, checkpoint: str | None = None,
                 progress: Callable[[int, int], None] | None = None) -> GeneratedImage | None:
        from modules import processing, sd_models, shared
        from modules.call_queue import queue_lock

        overrides = {}
        if checkpoint:
            info = sd_models.checkpoints_list.get(checkpoint) or sd_models.get_closet_checkpoint_match(checkpoint)
            if info is None:
                raise UserError(f"checkpoint {checkpoint!r} is not in the WebUI's list; press its refresh button")
            overrides["sd_model_checkpoint"] = info.title
        if settings.clip_skip > 1:
            overrides["CLIP_stop_at_last_layers"] = settings.clip_skip
        seed = settings.resolved_seed()

        def draw():
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=shared.sd_model, prompt=settings.prompt, negative_prompt=settings.negative_prompt,
                seed=seed, sampler_name=settings.sampler, steps=settings.steps, cfg_scale=settings.cfg_scale,
                width=settings.width, height=settings.height, batch_size=1, n_iter=1,
                do_not_save_samples=True, do_not_save_grid=True, override_settings=overrides,
                **({"scheduler": settings.scheduler} if settings.scheduler else {}))
            p.scripts = None
            try:
                return processing.process_images(p)
            finally:
                p.close()

        batch = getattr(self._local, "batch", None)
        if batch is None:
            with queue_lock:
                shared.state.begin(job="lora_trainer")
                try:
                    processed = draw()
                finally:
                    shared.state.end()
        else:  # one cell of a grid: the batch holds the queue and the job
            if shared.state.interrupted:
                return None
            shared.state.skipped = False
            shared.state.job_no = batch["done"]
            shared.state.textinfo = f"{batch['label']}: cell {batch['done'] + 1} of {batch['count']}"
            try:
                processed = draw()
            except Exception:
                if shared.state.interrupted:  # stopped before its first step: nothing to return
                    return None
                raise
            finally:
                batch["done"] += 1
            if shared.state.interrupted or shared.state.skipped:
                return None  # the WebUI's sampler stopped this image early: not a cell worth keeping
        if not processed.images:
            raise UserError("the WebUI returned no image (interrupted?)")
        if progress:
            progress(settings.steps, settings.steps)
        return GeneratedImage(processed.images[0], seed, processed.infotexts[0])

    @property
    def loaded_checkpoint(self) -> Path | None:
        """The WebUI's loaded model file (a grid's cells without a checkpoint are drawn on it)."""
        from modules import shared

        filename = getattr(getattr(shared.sd_model, "sd_checkpoint_info", None), "filename", None)
        return Path(filename) if filename else None

    def max_image_megapixels(self) -> float:
        """The WebUI's "Maximum image size" (``img_max_size_mp``): its X/Y/Z plot refuses larger grids, and so does ours."""
        from modules import shared

        return float(getattr(shared.opts, "img_max_size_mp", 200))

    def grid_font(self) -> str | None:
        """The font the WebUI labels its own grids in (``images.get_font``): its setting "Font for image grids that
        have text" (``font``), else its Roboto; a Chinese or Japanese user's font there labels our grids too."""
        from modules import paths_internal, shared

        font = getattr(shared.opts, "font", "") or getattr(paths_internal, "roboto_ttf_file", None)
        return str(font) if font else None

    def interrupted(self) -> bool:
        from modules import shared

        return bool(shared.state.interrupted or shared.state.stopping_generation)

    def refresh_loras(self) -> None:
        try:
            import networks  # the built-in Lora extension's module, when it is loaded

            networks.list_available_networks()
        except (ImportError, AttributeError):
            pass
        if self.on_refresh:
            self.on_refresh()

    def release_gpu(self) -> None:
        from modules import sd_models

        if hasattr(sd_models, "unload_model_weights"):
            sd_models.unload_model_weights()

    def restore_gpu(self) -> None:
        from modules import sd_models

        if hasattr(sd_models, "reload_model_weights"):
            sd_models.reload_model_weights()
