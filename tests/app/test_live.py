"""The live view model from an event file: progress, ETA, loss series, samples, files, recommended epoch."""

from __future__ import annotations

import json
import re

from lora_trainer.app.ui.live import loss_plot, progress_text, read_view, view_of

EVENTS = [
    {"event": "start", "images": 16},
    {"event": "step", "phase": "caching latents", "done": 3, "total": 16},
    *({"event": "step", "step": s, "total": 10, "epoch": 1 + (s > 5), "loss": 1.0 / s, "average": 0.5, "lr": [1e-4, 5e-5],
       "seconds": 0.5} for s in range(1, 5)),
    {"event": "sample", "path": "/runs/sample/a_e000001.png"},
    {"event": "saved", "path": "/runs/star-000001.safetensors"},
    {"event": "validation", "step": 4, "loss": 0.3},
]


def test_progress_eta_and_series():
    view = view_of(EVENTS, "running")
    assert (view.step, view.total, view.epoch) == (4, 10, 1)
    assert view.eta_seconds == 6 * 0.5
    assert [step for step, _ in view.loss] == [1, 2, 3, 4] and view.validation == [(4, 0.3)]
    assert view.learning_rate == [1e-4, 5e-5]
    text = progress_text(view)
    assert "step 4/10 (40%)" in text and "2.00 it/s" in text and "ETA 0:03" in text and "lr 1.00e-04 / 5.00e-05" in text


def test_a_slow_first_step_does_not_hold_up_the_eta_or_the_speed():
    """The first step warms up (on a GPU it may compile for minutes); an average seeded with it said hours for a run
    of minutes until dozens of steps had passed."""
    steps = [{"event": "step", "step": 1, "total": 100, "loss": 0.1, "seconds": 60.0, "time": 1000.0}]
    steps += [{"event": "step", "step": s, "total": 100, "loss": 0.1, "seconds": 0.5, "time": 1000.0 + 0.5 * (s - 1)}
              for s in range(2, 6)]
    view = view_of(steps, "running")
    assert view.seconds_per_step == 0.5 and "2.00 it/s" in progress_text(view)
    assert view.eta_seconds == 95 * 0.5
    # a sample every 4 steps costs 2 s: the pace since the first step counts it
    steps += [{"event": "step", "step": 6, "total": 100, "loss": 0.1, "seconds": 2.5, "time": 1000.0 + 2 + 2.5}]
    assert view_of(steps, "running").eta_seconds == 94 * (4.5 / 5)


def test_end_gives_the_recommended_epoch_and_files():
    view = view_of([*EVENTS, {"event": "end", "files": [], "recommended_epoch": 3, "reason": "lowest validation loss"}], "finished")
    assert view.samples == ["/runs/sample/a_e000001.png"] and view.files == ["/runs/star-000001.safetensors"]
    assert "Recommended epoch: **3** (lowest validation loss)" in progress_text(view)
    assert "ETA" not in progress_text(view)
    # a paused job trains on when resumed: its pause's end event is no verdict (it showed "Recommended epoch: 1")
    paused = view_of([*EVENTS, {"event": "end", "files": [], "stopped": True, "recommended_epoch": 1, "reason": "x",
                                "highest_loss_images": [["/a.png", 0.5]]}], "paused")
    assert "Recommended epoch" not in progress_text(paused) and "/a.png" not in progress_text(paused)
    assert progress_text(paused).startswith("**paused**")


def test_failed_job_shows_the_trainer_error_or_the_store_message():
    assert view_of([{"event": "error", "message": "loss became nan"}], "failed", "exit 1").error == "loss became nan"
    assert view_of([], "failed", "CUDA out of memory").error == "CUDA out of memory"
    assert "**Error:** CUDA out of memory" in progress_text(view_of([], "failed", "CUDA out of memory"))


def test_caching_phase_before_the_first_step():
    view = view_of(EVENTS[:2], "running")
    assert "caching latents 3/16" in progress_text(view)


def test_reading_an_event_file_ignores_a_half_written_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EVENTS) + '{"event": "step", "st', encoding="utf-8")
    assert read_view(path, "running").step == 4


def test_loss_plot_draws_the_curves_through_every_step():
    empty, drawn = loss_plot(view_of([], "queued")), loss_plot(view_of(EVENTS, "running"))
    assert "<polyline" not in empty and "loss appears here" in empty
    view = view_of(EVENTS, "running")
    curves = dict(re.findall(r'<polyline class="(\w+)"[^>]* points="([^"]+)"', drawn))
    assert len(curves["loss"].split()) == len(view.loss) and len(curves["average"].split()) == len(view.average)
    heights = [float(point.split(",")[1]) for point in curves["loss"].split()]
    lowest = min(range(len(view.loss)), key=lambda i: view.loss[i][1])
    assert heights[lowest] == max(heights)  # the lowest loss is drawn lowest (SVG's y grows downwards)


def test_sd_scripts_backend_steps_carry_only_the_average_and_still_move_the_view():
    """sd-scripts prints only its running average (avr_loss): the live view read event["loss"] and failed each poll."""
    steps = [{"event": "step", "step": s, "total": 6, "epoch": 1, "average": 0.5 / s, "seconds": 1.0} for s in (1, 2)]
    view = view_of([{"event": "start", "backend": "sd-scripts"}, *steps], "running")
    assert view.step == 2 and view.loss == [] and [step for step, _ in view.average] == [1, 2]
    assert "step 2/6" in progress_text(view) and loss_plot(view)


def test_a_long_run_draws_a_few_points_per_pixel_keeping_its_spike_and_its_last_loss():
    """Every step went into the SVG: 90,000 steps sent 2 MiB to each open Train tab every second."""
    total, spike_step = 90_000, 45_678
    losses = {s: 0.1 + 0.1 * (s % 7) / 6 for s in range(1, total + 1)}  # between 0.1 and 0.2, noisy
    losses[spike_step], losses[total] = 1.0, 0.15  # the last loss lies inside its column's range
    view = view_of([{"event": "step", "step": s, "total": total, "loss": loss, "average": 0.15}
                    for s, loss in losses.items()], "running")
    drawn = loss_plot(view)
    curves = {name: [tuple(map(float, point.split(","))) for point in points.split()]
              for name, points in re.findall(r'<polyline class="(\w+)"[^>]* points="([^"]+)"', drawn)}
    assert 0 < len(curves["loss"]) <= 1200 and 0 < len(curves["average"]) <= 1200
    assert len(drawn) < 64 * 1024
    top, bottom = 8.0, 240 - 36  # the plot's frame: the highest loss is drawn at its top
    assert min(y for _, y in curves["loss"]) == top  # the spike
    last_x, last_y = curves["loss"][-1]
    assert last_x == 640 - 8 and last_y == round(top + (bottom - top) * (1 - (0.15 - 0.1) / (1.0 - 0.1)), 1)
