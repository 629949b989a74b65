"""What the Train tab shows a user, pinned where a mutation review of its handlers (``app/ui/train_tab.py``) and the
live view (``app/ui/live.py``) found nothing noticing a change: the progress line, the loss plot, the boxes a poll
fills, the messages of Start, Validate, Check, the job buttons, the import and the exports."""

from __future__ import annotations

from lora_trainer.app.ui.live import progress_text, view_of

STEPS = [{"event": "start"}, *({"event": "step", "step": s, "total": 10, "epoch": 1, "loss": 1.0 / s, "average": 0.5,
                                "lr": [1e-4], "seconds": 0.5} for s in range(1, 5))]


# --- the live view ---------------------------------------------------------------------------------------------------

def test_the_trainers_warnings_show_under_the_progress_line_the_latest_five():
    """The trainer says what it changed or could not do as warning events (a file another program held saved under
    another name, a sample prompt that failed, an earlier run's files moved aside): the view kept them and the tab
    never showed them."""
    held = ("star.safetensors is held by another program. Saved as star (1).safetensors instead: rename it once that "
            "program lets go of the file")
    text = progress_text(view_of([*STEPS, {"event": "warning", "message": held}], "running"))
    assert text.startswith("**running** · step 4/10") and f"\n\n⚠ {held}" in text
    failed = [{"event": "warning", "message": f"sample prompt {n} at step 4 failed (OSError: disk full)"} for n in range(1, 9)]
    for status in ("running", "paused", "finished"):
        text = progress_text(view_of([*STEPS, *failed], status))
        assert [line for line in text.split("\n\n") if line.startswith("⚠")] == [
            f"⚠ sample prompt {n} at step 4 failed (OSError: disk full)" for n in range(4, 9)], text
        assert "3 earlier warnings are in the job's events.jsonl (its folder)" in text


def test_an_sd_scripts_backend_run_shows_its_average_loss_in_the_progress_line():
    """sd-scripts prints only its running average (avr_loss), which the plot drew and the progress line left out: a
    --backend run showed no loss number at all."""
    steps = [{"event": "step", "step": s, "total": 6, "epoch": 1, "average": 0.5 / s, "seconds": 1.0} for s in (1, 2)]
    text = progress_text(view_of([{"event": "start", "backend": "sd-scripts"}, *steps], "running"))
    assert "step 2/6 (33%) · epoch 1 · 1.00 it/s · ETA 0:04 · avg loss 0.2500" in text, text
