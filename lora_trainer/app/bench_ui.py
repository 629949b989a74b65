"""``python -m lora_trainer bench ui``: how quickly the Train tab answers, on the tiny model.

* Train → first step: from the Start handler (``train_tab.submit``) to the first ``step`` event in the job's
  event file (target ≤ 5 s): validation, queueing, the trainer subprocess, model load, latent cache, one step.
* Event latency: from a step event being written (its ``time``) to the live view model returning it, polling as
  the tab does (every second), so the figure includes the wait for the next poll (target ≤ 1 s).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

POLL_SECONDS = 1.0  # the Train tab's polling interval (train_tab.build: every=1)


def _form(dataset: Path, checkpoint: str) -> dict:
    return {"checkpoint": checkpoint, "dataset": str(dataset), "preset": "character", "tier": "no limit", "algorithm": "LoRA",
            "output_name": "bench_ui", "epochs": 2, "batch_size": 4, "resolution": "64", "network_dim": 8, "network_alpha": 8,
            "unet_lr": 2e-3, "text_encoder_lr": 5e-4, "save_every_n_epochs": None, "sample_every_n_epochs": None,
            "sample_prompt": "", "optimizer": "AdamW", "scheduler": "constant", "extra": ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_trainer bench ui", description=__doc__)
    parser.add_argument("--steps", type=int, default=15, help="step events to measure the latency over")
    args = parser.parse_args(argv)

    from ..tiny_model.build import TINY_MODEL_PATH
    from ..tiny_model.demo import SAMPLE_DATASET
    from ..training.events import read_events
    from .services import Services
    from .settings import AppSettings
    from .standalone_host import StandaloneHost
    from .ui import train_tab

    with tempfile.TemporaryDirectory(prefix="bench-ui-") as folder:
        data = Path(folder)
        settings = AppSettings(lora_folder=data / "Lora", data_folder=data / "data", dataset_roots=[SAMPLE_DATASET],
                               unload_checkpoint_while_training=False)
        services = Services.create(settings, StandaloneHost([], [settings.lora_folder], TINY_MODEL_PATH))
        try:
            checkpoint = next(title for title, path in services.host.checkpoints().items() if Path(path) == TINY_MODEL_PATH)
            pressed = time.perf_counter()
            message, job_id = train_tab.submit(services, _form(SAMPLE_DATASET, checkpoint))
            if job_id is None:
                print(message)
                return 1
            job = services.store.get(job_id)
            first_step = None
            offset = 0
            while first_step is None:
                events, offset = read_events(job.events_path, offset)
                if any(e["event"] == "step" and "phase" not in e for e in events):
                    first_step = time.perf_counter() - pressed
                elif services.store.get(job_id).status not in ("queued", "running"):
                    print(f"the job ended before its first step: {services.store.get(job_id).message}")
                    return 1
                time.sleep(0.01)
            print(f"Train pressed → first step event: {first_step:.2f} s (target ≤ 5 s)")

            views = train_tab.LiveViews()
            latencies, read_costs, seen = [], [], 0
            while len(latencies) < args.steps and services.store.get(job_id).status == "running":
                started = time.perf_counter()
                view = views.view(services.store.get(job_id))
                read_costs.append(time.perf_counter() - started)
                now = time.time()
                events, _ = read_events(job.events_path)
                steps = [e for e in events if e["event"] == "step" and "phase" not in e]
                latencies += [now - e["time"] for e in steps[seen:view.step]]
                seen = view.step
                time.sleep(POLL_SECONDS)
            services.runner.stop(job_id)
            if latencies:
                print(f"step event → live view: mean {statistics.mean(latencies):.2f} s, worst {max(latencies):.2f} s over "
                      f"{len(latencies)} steps, polling every {POLL_SECONDS:g} s (target ≤ 1 s); one poll reads the events and "
                      f"folds them in {1000 * statistics.mean(read_costs):.1f} ms")
            while services.store.get(job_id).status == "running":
                time.sleep(0.2)
        finally:
            services.close()
    return 0
