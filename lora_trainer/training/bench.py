"""``python -m lora_trainer bench train``: the issue's reference run, timed the way sd-scripts' figures were.

sd-scripts on the 2-core reference machine: 0.130 s/step (median, first step excluded), 33.9 s wall, 599 MB peak
RSS for: tiny-sd15 checkpoint, ``10_shapes`` DreamBooth folder, resolution 128, batch 2, 2 epochs, dim 4 /
alpha 4, AdamW lr 1e-4 constant, fp32, latents cached in memory, no loader workers.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .events import read_events

REFERENCE = {"seconds_per_step": 0.130, "wall_seconds": 33.9, "peak_rss_mb": 599}


def reference_arguments(fixtures: Path, out: Path) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(fixtures / "model" / "tiny-sd15.safetensors"),
        "--train_data_dir", str(fixtures / "dataset" / "train"), "--output_dir", str(out), "--output_name", "tinylora",
        "--resolution", "128", "--train_batch_size", "2", "--max_train_epochs", "2", "--network_module", "networks.lora",
        "--network_dim", "4", "--network_alpha", "4", "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
        "--lr_scheduler", "constant", "--mixed_precision", "no", "--cache_latents", "--max_data_loader_n_workers", "0",
        "--caption_extension", ".txt", "--seed", "42", "--save_precision", "float",
    ]


def _child(arguments: list[str]) -> dict:
    code = (
        "import json, resource, sys, time\n"
        "started = time.perf_counter()\n"
        "from lora_trainer.train_network import main\n"
        f"code = main({arguments!r})\n"
        "print(json.dumps({'code': code, 'wall': time.perf_counter() - started,"
        " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(fixtures: Path) -> None:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        figures = _child(reference_arguments(fixtures, out))
        events, _ = read_events(out / "tinylora.events.jsonl")
    steps = [e for e in events if e["event"] == "step" and "loss" in e]
    start = next(e["time"] for e in events if e["event"] == "start")
    first_step = steps[0]["time"]
    per_step = statistics.median(e["seconds"] for e in steps[1:])
    print(f"reference run ({len(steps)} steps): {per_step:.3f} s/step (median, first excluded), "
          f"{figures['wall']:.1f} s wall ({first_step - start + (start - events[0]['time']):.1f} s from start event to first step), "
          f"peak RSS {figures['peak_rss_mb']:.0f} MB")
    print(f"sd-scripts on the reference machine: {REFERENCE['seconds_per_step']} s/step, {REFERENCE['wall_seconds']} s wall, "
          f"{REFERENCE['peak_rss_mb']} MB; goal ≤ 0.10 s/step, ≤ 15 s, ≤ 450 MB")
