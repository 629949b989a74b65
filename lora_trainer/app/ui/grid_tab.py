"""The Prompt-Lora-Grid tab: pick a training run (or LoRAs), two axes and the generation settings; the plan
(``grid.plan``) runs through ``services.host`` only, so under the WebUI the cells are the WebUI's own txt2img
images and standalone they are ours. Handlers are plain functions (tests call them directly)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import gradio as gr

from ...errors import UserError
from ...grid.axes import run_files, typed_values
from ...grid.plan import (AXIS_KINDS, DEFAULT_X_AXIS, DEFAULT_Y_AXIS, LOSS_COLUMNS, AxisSpec, GridRequest,
                          checked_setting, loss_rows, loss_text, plan_for_host, promote, run_grid, unfinished_images)
from ...networks.activation import LoraLibrary
from ...sampling.txt2img import GenerationSettings
from .compat import table


def library_of(services) -> LoraLibrary:
    """The Lora folder as the host sees it: the same names ``<lora:…>`` resolves to."""
    return services.lora_library()


def training_runs(services) -> list[str]:
    """Runs in the Lora folder: every final file that has numbered epoch siblings (under its own name, or the name
    it was trained under: ``char_v2`` renamed from ``char``), newest first, then the others."""
    library = library_of(services)
    entries = library.entries()
    stems = {e.name for e in entries}

    def names(entry) -> set[str]:  # a final file's own name, and the one it was trained under
        return {entry.name} if _numbered_head(entry.name) else {entry.name} | ({entry.alias} if entry.alias else set())

    runs = [e for e in entries if not _numbered_head(e.name)
            and any(s.startswith(n + "-") and _saved_along(s[len(n) + 1:]) for n in names(e) for s in stems)]
    heads = stems | {n for e in runs for n in names(e)}
    singles = [e for e in entries if e not in runs and _numbered_head(e.name) not in heads]
    return [e.name for e in sorted(runs, key=_newest_first)] + [e.name for e in sorted(singles, key=_newest_first)]


def _numbered_head(name: str) -> str | None:
    """``char`` for ``char-000003`` or ``char-step00000185``; None for a name saved along no run."""
    head, _, tail = name.rpartition("-")
    return head if head and _saved_along(tail) else None


def _saved_along(suffix: str) -> bool:
    """An epoch (``000003``) or step (``step00000185``) file's suffix: a file saved along a run, not a run of its own."""
    return suffix.isdigit() or (suffix.startswith("step") and suffix[4:].isdigit())


def _newest_first(entry) -> float:
    try:
        return -entry.path.stat().st_mtime
    except OSError:  # replaced or removed since the listing: last
        return 0.0


def generate_grid(services, run: str, x_kind: str, x_values: str, y_kind: str, y_values: str, strength,
                  prompt: str, negative: str, seed, sampler: str, steps, width, height, cfg, checkpoint: str,
                  baseline: bool, confirmed: bool, scheduler: str = "", progress=None, session: dict | None = None):
    """→ (grid image path, cell images, losses rows, epoch choices update, status). ``session``: the browser tab's
    own state (a ``gr.State``), where the grid leaves its stop flag for that tab's Interrupt, and no other tab's."""
    stop = threading.Event()
    if session is not None:
        session["stop"] = stop
    _RUNNING.add(stop)
    try:
        width, height = checked_setting("width", width, "Width"), checked_setting("height", height, "Height")
        settings = GenerationSettings(prompt or "", negative or "", int(steps), sampler, float(cfg), int(seed),
                                      width, height, scheduler=scheduler or "")
        request = GridRequest(AxisSpec(x_kind, typed_values(x_kind, x_values)),
                              AxisSpec(y_kind, typed_values(y_kind, y_values)), settings, lora=run or "",
                              # cleared: the run's <lora:name:weight> tag says it, else 1 (0 is a strength)
                              strength=None if strength in (None, "") else float(strength),
                              checkpoint=checkpoint or None, baseline=bool(baseline), confirmed=bool(confirmed))
        plan, base = plan_for_host(request, library_of(services), services.host)
        report = (lambda done, total: progress((done, total), desc="Generating the grid")) if progress is not None else None
        result = run_grid(services.host, plan, services.settings.grids_folder, report, stop.is_set)
    except UserError as error:
        return None, [], table([], LOSS_COLUMNS), gr.update(), f"⚠ {error}"
    finally:
        _RUNNING.discard(stop)
        if session is not None and session.get("stop") is stop:
            del session["stop"]
    losses = table(loss_rows(plan), LOSS_COLUMNS)
    epochs = [str(p) for p in plan.files]
    if result.path is None:
        note = ("Interrupted before the first cell finished: nothing was saved." if result.stopped else
                "No cell finished (every one was skipped): nothing was saved.")
    else:
        note = f"Grid saved: {result.path} ({result.seconds:.1f} s"
        note = (f"Checkpoint {base}, the one the LoRA was trained on. " if base else "") + note
        note += f", switching LoRAs {result.switching_seconds:.2f} s)." if result.switching_seconds else ")."
        if unfinished := unfinished_images(result, plan):
            note = f"{unfinished[0].upper()}{unfinished[1:]}. {note}"
    if plan.notes:  # what the plan did to the prompt, step files left out
        note += " " + " ".join(f"{n.rstrip('.')}." for n in plan.notes)
    warnings = [*result.warnings, *getattr(services.host, "take_warnings", lambda: [])()]  # labels drawn as boxes too
    if warnings:
        note += " " + " ".join(f"⚠ {w}" for w in warnings)
    best = str(plan.best_epoch) if plan.best_epoch else (epochs[-1] if epochs else None)
    cells = [image for row in result.cells for image in row]
    grid_path = str(result.path) if result.path else None
    return grid_path, cells if result.path else [], losses, gr.update(choices=epochs, value=best), note


def form_updates(fields: list[str], values: list, samplers: list[str]) -> list:
    """The "From txt2img" button: new values for the grid's fields named in ``fields`` (GenerationSettings
    names); a None value keeps the field as it is, a sampler the list lacks is added to it."""
    updates = []
    for field, value in zip(fields, values):
        if value is None:
            updates.append(gr.update())
        elif field == "sampler":
            updates.append(gr.update(choices=samplers if value in samplers else samplers + [value], value=value))
        else:
            updates.append(value)
    return updates


# the stop flags of the grids generating now, in every browser tab
_RUNNING: set[threading.Event] = set()
_CONFIRM_SECONDS = 10


def interrupt(services, session: dict | None = None) -> str:
    """Stops the grid this browser tab (``session``) started, after its current image; another tab's grid goes on
    (the WebUI's own Interrupt stops whatever the WebUI generates, a grid too). A tab without a grid of its own stops
    the grids that are running when pressed twice within ``_CONFIRM_SECONDS``: one started in a tab since reloaded or
    closed would hold the generator otherwise."""
    session = session if session is not None else {}
    stop = session.get("stop")
    if stop is not None:
        stop.set()
        return "Interrupting after the current image…"
    running = list(_RUNNING)
    if not running:
        return "No grid of this tab is being generated: nothing to interrupt."
    asked, session["others_asked"] = session.get("others_asked"), time.monotonic()
    if asked is None or time.monotonic() - asked > _CONFIRM_SECONDS:
        return (f"No grid of this tab is being generated; another tab's grid is (or this tab's before a reload): press "
                f"Interrupt again within {_CONFIRM_SECONDS} s to stop it.")
    del session["others_asked"]
    for other in running:
        other.set()
    return "Interrupting the grid another tab started, after the current image…"


def stop_every_grid(grids_folder: Path) -> list[str]:
    """At the app's exit: every tab's grid stops after the image being drawn, saving those drawn. Its thread is one of
    the server's workers, which Python waits for at exit: the app went on drawing the whole grid after Ctrl-C or
    SIGTERM. Returns a line for the exit to say, if a grid was drawing."""
    running = list(_RUNNING)
    for stop in running:
        stop.set()
    if not running:
        return []
    grids = "a Grid tab's grid stops" if len(running) == 1 else f"{len(running)} Grid tab grids stop"
    return [f"{grids} after the image being drawn, then saves the images drawn by then (if any) in {grids_folder}"]


def promote_epoch(services, epoch_file: str, final_name: str, strength) -> str:
    try:
        if not epoch_file:
            raise UserError("Generate a grid first, then pick the epoch to promote.")
        name = (final_name or "").strip() or _run_name(Path(epoch_file))
        promotion = promote(Path(epoch_file), services.settings.lora_folder, name, float(strength))
    except UserError as error:
        return f"⚠ {error}"
    services.host.refresh_loras()
    return promotion.message


def _run_name(path: Path) -> str:
    """The final name an epoch file is promoted to by default: its run's final file, renamed after training too."""
    head, _, tail = path.stem.rpartition("-")
    if not (head and tail.isdigit()):
        return path.stem
    if path.with_name(head + path.suffix).exists():
        return head
    from ...grid.axes import is_final_file
    from ...safe_io import read_safetensors_metadata

    renamed = [p for p in path.parent.glob(f"*{path.suffix}") if is_final_file(p)
               and read_safetensors_metadata(p).get("ss_output_name") == head]
    return renamed[0].stem if len(renamed) == 1 else head


def preferred_weight(services, run: str) -> float:
    """The run's Lora card weight (its preset's, or the user's), which Promote keeps unless changed; 1 without one."""
    import json

    try:
        path = _run_path(services, run)
        card = json.loads(Path(path).with_suffix(".json").read_text(encoding="utf-8-sig")) if path else {}
        return float(card.get("preferred weight") or 1.0)
    except (OSError, ValueError, TypeError, AttributeError, UserError):
        return 1.0


def _run_path(services, run: str) -> Path | None:
    """The picked run's file: a name in the Lora folder, or a path."""
    return library_of(services).resolve(run) if run and not Path(run).is_file() else Path(run) if run else None


def run_summary(services, run: str) -> str:
    """The run's files with their recorded losses, shown when a run is picked."""
    try:
        path = _run_path(services, run)
        if path is None:
            return ""
        from ...grid.plan import epoch_losses

        files = run_files(path)
        losses = epoch_losses(files)
        return "\n".join(f"- {f.label}" + (f" — {loss_text(losses[f.path])}" if f.path in losses else "") for f in files)
    except UserError as error:
        return f"⚠ {error}"


def build(services):
    defaults = services.host.generation_defaults()
    samplers = services.host.sampler_names()
    if defaults.sampler not in samplers:
        samplers.insert(0, defaults.sampler)
    with gr.Blocks(analytics_enabled=False) as blocks:
        with gr.Row():
            runs = gr.Dropdown(training_runs(services), label="Training run or LoRA (Lora folder)", scale=3)
            refresh = gr.Button("🔄", scale=0)
            run = gr.Textbox(label="Run / LoRA used by the grid", elem_id="lora_trainer_grid_run", scale=3)
        run_files_text = gr.Markdown()
        with gr.Row():
            x_kind = gr.Dropdown(list(AXIS_KINDS), value=DEFAULT_X_AXIS[0], label="X axis (columns)")
            x_values = gr.Textbox(value=DEFAULT_X_AXIS[1], label="X values", elem_id="lora_trainer_grid_x_values")
            y_kind = gr.Dropdown(list(AXIS_KINDS), value=DEFAULT_Y_AXIS[0], label="Y axis (rows)")
            y_values = gr.Textbox(value=DEFAULT_Y_AXIS[1], label="Y values (epoch: empty = every epoch file)")
            strength = gr.Number(value=1.0, label="Strength where no axis sets it")
        txt2img_form = getattr(services.host, "txt2img_form", None)  # the WebUI's txt2img page, when hosted there
        with gr.Row():
            prompt = gr.Textbox(value=defaults.prompt, label="Prompt", lines=2, scale=3, elem_id="lora_trainer_grid_prompt")
            negative = gr.Textbox(value=defaults.negative_prompt, label="Negative prompt", lines=2, scale=2,
                                  elem_id="lora_trainer_grid_negative")
            if txt2img_form is not None:
                from_txt2img = gr.Button("From txt2img", scale=0, elem_id="lora_trainer_grid_from_txt2img")
        with gr.Row():
            seed = gr.Number(value=defaults.seed, precision=0, label="Seed (-1: random, then the same in every cell)")
            sampler = gr.Dropdown(samplers, value=defaults.sampler, label="Sampler")
            schedulers = services.host.scheduler_names()
            scheduler = gr.Dropdown(schedulers, value=defaults.scheduler or (schedulers[0] if schedulers else None),
                                    label="Schedule type", visible=bool(schedulers))
            steps = gr.Slider(1, 150, value=defaults.steps, step=1, label="Steps", elem_id="lora_trainer_grid_steps")
            width = gr.Slider(64, 2048, value=defaults.width, step=8, label="Width")
            height = gr.Slider(64, 2048, value=defaults.height, step=8, label="Height")
            cfg = gr.Slider(1, 30, value=defaults.cfg_scale, step=0.5, label="CFG scale")
            checkpoint = gr.Dropdown([""] + list(services.host.checkpoints()), value="", label="Checkpoint (empty: the run's base model if listed, else the current one)")
        with gr.Row():
            baseline = gr.Checkbox(value=True, label="Baseline column without the LoRA")
            confirmed = gr.Checkbox(value=False, label="I confirm grids of more than 400 images")
            generate = gr.Button("Generate", variant="primary", elem_id="lora_trainer_grid_generate")
            stop = gr.Button("Interrupt", elem_id="lora_trainer_grid_interrupt")
        status = gr.Markdown(elem_id="lora_trainer_grid_status")
        grid_image = gr.Image(label="Grid", type="filepath", interactive=False, elem_id="lora_trainer_grid_image")
        cells = gr.Gallery(label="Cells", columns=6, height=360, elem_id="lora_trainer_grid_cells")
        losses = gr.Dataframe(headers=LOSS_COLUMNS, interactive=False,
                              label="Losses the trainer recorded")
        with gr.Row():
            epoch = gr.Dropdown([], label="Promote this file", scale=3)
            promote_strength = gr.Number(value=1.0, label="Preferred weight")
            final_name = gr.Textbox(label="Final name in the Lora folder (empty: the run's name)")
            promote_button = gr.Button("Promote", elem_id="lora_trainer_grid_promote")
        promote_status = gr.Markdown()

        if txt2img_form is not None:
            txt2img_form.connect(from_txt2img, {"prompt": prompt, "negative_prompt": negative, "seed": seed,
                                                "sampler": sampler, "scheduler": scheduler, "steps": steps,
                                                "width": width, "height": height, "cfg_scale": cfg},
                                 lambda fields, values: form_updates(fields, values, samplers))
        refresh.click(lambda: gr.update(choices=training_runs(services)), None, runs)
        runs.change(lambda name: name, runs, run)
        run.change(lambda name: (run_summary(services, name), preferred_weight(services, name)), run,
                   [run_files_text, promote_strength])

        session = gr.State({})  # one per browser tab: its Interrupt stops its own grid

        def on_generate(*args, progress=gr.Progress()):
            *form, tab = args
            return generate_grid(services, *form, progress=progress, session=tab)

        generate.click(on_generate, [run, x_kind, x_values, y_kind, y_values, strength, prompt, negative, seed, sampler,
                                     steps, width, height, cfg, checkpoint, baseline, confirmed, scheduler, session],
                       [grid_image, cells, losses, epoch, status])
        stop.click(lambda tab: interrupt(services, tab), session, status, queue=False)
        promote_button.click(lambda *a: promote_epoch(services, *a), [epoch, final_name, promote_strength], promote_status)
    return blocks
