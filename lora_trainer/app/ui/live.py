"""The live view of a job as plain data, rebuilt from its event file: what the Train tab polls every second.

Reading the job store and the event file (never browser state) is what lets a reloaded page or a second browser
show the same run.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

from ...training.events import format_seconds, outliers_sentence, read_events

NOTIFY_STATUSES = ("finished", "failed", "stopped", "paused", "interrupted")
WARNINGS_SHOWN = 5  # the trainer's latest warnings under the progress line


@dataclass
class LiveView:
    status: str = "queued"
    phase: str = ""
    step: int = 0
    total: int = 0
    epoch: int = 0
    loss: list[tuple[int, float]] = field(default_factory=list)
    average: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    seconds_per_step: float | None = None
    memory_mib: float | None = None
    samples: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    recommended_epoch: int | None = None
    recommendation: str = ""
    outliers: list = field(default_factory=list)  # [path, loss] of the images learnt clearly less well
    error: str = ""
    timed_steps: int = 0
    first_step_at: tuple[int, float] | None = None  # (step, event time) of the run's first step, and of its latest
    last_step_at: tuple[int, float] | None = None

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """The steps left at the pace since the first step, which counts the saves, samples and validations that
        fall due between steps and leaves out the first step's warm-up (allocation, kernel choice, compilation)."""
        if not self.total:
            return None
        if self.first_step_at and self.last_step_at and self.last_step_at[0] > self.first_step_at[0]:
            per_step = (self.last_step_at[1] - self.first_step_at[1]) / (self.last_step_at[0] - self.first_step_at[0])
        elif self.seconds_per_step is not None:
            per_step = self.seconds_per_step
        else:
            return None
        return max(0, self.total - self.step) * per_step


def apply_event(view: LiveView, event: dict, smoothing: float = 0.2) -> LiveView:
    """Fold one event into the view (in place; returns it). it/s is an exponential average of step times from the
    second step on (the first warms up)."""
    kind = event.get("event")
    if kind == "step" and "phase" in event:
        view.phase = f"{event['phase']} {event.get('done', 0)}/{event.get('total', 0)}"
    elif kind == "step":
        view.phase = "training"
        view.step, view.total, view.epoch = event["step"], event.get("total", view.total), event.get("epoch", view.epoch)
        if event.get("loss") is not None:  # sd-scripts (--backend) prints only its running average
            view.loss.append((view.step, float(event["loss"])))
        if event.get("average") is not None:
            view.average.append((view.step, float(event["average"])))
        lr = event.get("lr")
        view.learning_rate = [float(v) for v in (lr if isinstance(lr, list) else [lr] if lr is not None else [])]
        if event.get("seconds"):
            seconds = float(event["seconds"])
            view.timed_steps += 1
            view.seconds_per_step = seconds if view.timed_steps <= 2 else \
                (1 - smoothing) * view.seconds_per_step + smoothing * seconds  # the second replaces the warm-up step
        if event.get("time") is not None:
            mark = (view.step, float(event["time"]))
            view.first_step_at = view.first_step_at or mark
            view.last_step_at = mark
        if event.get("memory_mib") is not None:
            view.memory_mib = float(event["memory_mib"])
    elif kind == "start":
        view.phase = "starting"
    elif kind == "epoch":
        view.epoch = event.get("epoch", view.epoch)
    elif kind == "validation":
        view.validation.append((event.get("step", view.step), float(event["loss"])))
    elif kind == "sample":
        view.samples.append(event["path"])
    elif kind == "saved":
        view.files.append(event["path"])
    elif kind == "warning":
        view.warnings.append(str(event.get("message", "")))
    elif kind == "error":
        view.error = str(event.get("message", ""))
    elif kind == "end":
        view.phase = "done"
        view.recommended_epoch = event.get("recommended_epoch")
        view.recommendation = event.get("reason") or ""
        view.outliers = list(event.get("highest_loss_images") or [])
    return view


def view_of(events: list[dict], status: str = "running", message: str | None = None) -> LiveView:
    view = LiveView(status=status)
    for event in events:
        apply_event(view, event)
    if status == "failed" and not view.error:
        view.error = message or "the trainer stopped with an error"
    return view


def read_view(events_path: str | Path, status: str, message: str | None = None) -> LiveView:
    events, _ = read_events(events_path)
    return view_of(events, status, message)


def progress_text(view: LiveView) -> str:
    """One Markdown line: status, step/total, epoch, it/s, ETA, lr, memory; under it the trainer's latest warnings
    (what it left out, changed or could not do), the recommended epoch and the error."""
    parts = [f"**{view.status}**"]
    if view.total:
        parts.append(f"step {view.step}/{view.total} ({view.fraction:.0%})")
    elif view.phase:
        parts.append(view.phase)
    if view.epoch:
        parts.append(f"epoch {view.epoch}")
    if view.seconds_per_step:
        speed = 1 / view.seconds_per_step
        parts.append(f"{speed:.2f} it/s" if speed >= 1 else f"{view.seconds_per_step:.2f} s/it")
    if view.eta_seconds is not None and view.status == "running":
        parts.append(f"ETA {format_seconds(view.eta_seconds)}")
    if view.loss:
        parts.append(f"loss {view.loss[-1][1]:.4f}" + (f" (avg {view.average[-1][1]:.4f})" if view.average else ""))
    elif view.average:  # sd-scripts (--backend) prints only its running average
        parts.append(f"avg loss {view.average[-1][1]:.4f}")
    if view.learning_rate:
        parts.append("lr " + " / ".join(f"{lr:.2e}" for lr in view.learning_rate))
    if view.memory_mib is not None:
        parts.append(f"memory {view.memory_mib / 1024:.1f} GiB")
    text = " · ".join(parts)
    text += "".join(f"\n\n⚠ {warning}" for warning in view.warnings[-WARNINGS_SHOWN:])
    if len(view.warnings) > WARNINGS_SHOWN:  # a sample prompt failing at every epoch must not push the rest away
        text += f"\n\n{len(view.warnings) - WARNINGS_SHOWN} earlier warnings are in the job's events.jsonl (its folder)"
    if view.status == "paused":  # it trains on when resumed: a verdict on the epochs so far would read as final
        return text + ("\n\n**Error:** " + view.error if view.error else "")
    if view.recommended_epoch:
        text += f"\n\nRecommended epoch: **{view.recommended_epoch}**" + (f" ({view.recommendation})" if view.recommendation else "")
    if view.outliers:
        text += f"\n\n{outliers_sentence(view.outliers)}"
    if view.error:
        text += f"\n\n**Error:** {view.error}"
    return text


LOSS_SERIES = (("loss", "#aabee6"), ("average", "#1e50c8"), ("validation", "#dc7814"))


def thinned(values: list[tuple[int, float]], columns: int, last_step: int) -> list[tuple[int, float]]:
    """At most the lowest and the highest point of each of ``columns`` pixel columns, in step order, and the last
    point as it is: the curve a long run draws, its spikes kept, in a few kilobytes (every step of 90,000 was 2 MiB
    of SVG sent each second to every open Train tab)."""
    if len(values) <= 2 * columns:
        return values
    steps = [step for step, _ in values]
    if steps != sorted(steps):
        values = sorted(values)
        steps = [step for step, _ in values]
    losses = [value for _, value in values]
    kept, start = {len(values) - 1}, 0
    for column in range(1, columns + 1):  # slices and bisection: no Python step per point
        end = bisect.bisect_left(steps, column * last_step / columns, start) if column < columns else len(values)
        if end > start:
            part = losses[start:end]
            kept.update((start + part.index(min(part)), start + part.index(max(part))))
        start = end
    return [values[index] for index in sorted(kept)]


def loss_plot(view: LiveView, size: tuple[int, int] = (640, 240)) -> str:
    """The loss curves (loss, running average, validation) as inline SVG: a few kilobytes of text per poll, drawn by
    the browser, where a picture would leave a file in gradio 4's cache at every poll of a long run."""
    width, height = size
    margin = 36
    left, top, right, bottom = margin, 8, width - 8, height - margin
    parts = [f'<svg class="lora-trainer-loss-plot" viewBox="0 0 {width} {height}" width="100%" '
             f'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="11">',
             f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="white" stroke="#a0a0a0"/>']
    series = [(name, colour, getattr(view, name)) for name, colour in LOSS_SERIES]
    if not any(values for _, _, values in series):
        parts.append(f'<text x="{left + 8}" y="{height // 2}" fill="#787878">loss appears here once training steps run</text>')
        return "".join(parts) + "</svg>"
    last_step = max(view.total, *(max(values)[0] for _, _, values in series if values), 1)
    series = [(name, colour, thinned(values, int(right - left), last_step)) for name, colour, values in series]
    points = [p for _, _, values in series for p in values]  # each column's extremes: the whole curve's too
    low, high = min(v for _, v in points), max(v for _, v in points)
    high = high if high > low else low + 1e-6

    def xy(step: float, value: float) -> tuple[float, float]:
        return left + (right - left) * step / last_step, top + (bottom - top) * (1 - (value - low) / (high - low))

    for name, colour, values in series:
        if len(values) == 1:
            x, y = xy(*values[0])
            parts.append(f'<circle class="{name}" cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>')
        elif values:
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(*p) for p in values))
            parts.append(f'<polyline class="{name}" fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
    parts.append(f'<text x="2" y="{top + 10}" fill="#505050">{high:.3f}</text>')
    parts.append(f'<text x="2" y="{bottom}" fill="#505050">{low:.3f}</text>')
    parts.append(f'<text x="{left}" y="{height - margin + 18}" fill="#505050">step 0 … {last_step}   '
                 f'light: loss  dark: average  orange: validation</text>')
    return "".join(parts) + "</svg>"
