"""The main job on the embedded default: train a LoRA on the sample dataset, then draw its epoch × strength grid.

The tiny base model has never seen a star; the sample dataset (16 yellow stars captioned "zkstar, …") teaches
it one behind the trigger word. The run writes Kohya-format epoch files and a grid whose columns go from "no
LoRA" to strength 1, so the concept visibly appears as training and strength progress.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .build import TINY_MODEL_PATH
from .shapes import CONCEPT_TRIGGER

SAMPLE_DATASET = Path(__file__).resolve().parents[1] / "assets" / "sample-dataset"
DEMO_PROMPT = CONCEPT_TRIGGER
DEMO_EPOCHS = 8
SAVE_EVERY = 2
DEMO_STRENGTHS = (0.5, 1.0)
DEMO_RESOLUTION = 64  # the tiny model's native size


def training_arguments(out: Path, epochs: int = DEMO_EPOCHS) -> list[str]:
    """sd-scripts options of the demo run: what a user would type for this dataset."""
    return [
        "--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", str(SAMPLE_DATASET),
        "--output_dir", str(out), "--output_name", CONCEPT_TRIGGER, "--caption_extension", ".txt",
        "--resolution", str(DEMO_RESOLUTION), "--train_batch_size", "4", "--max_train_epochs", str(epochs), "--save_every_n_epochs", str(SAVE_EVERY),
        "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "8",
        "--learning_rate", "2e-3", "--text_encoder_lr", "5e-4", "--optimizer_type", "AdamW", "--lr_scheduler", "constant",
        "--cache_latents", "--seed", "42", "--max_data_loader_n_workers", "0",
    ]


def run_demo(out: str | Path, epochs: int = DEMO_EPOCHS, seed: int = 11) -> Path:
    from ..app.standalone_host import StandaloneHost
    from ..grid.axes import run_files
    from ..grid.plan import AxisSpec, GridRequest, plan_grid, run_grid
    from ..sampling.txt2img import GenerationSettings
    from ..train_network import main as train

    out = Path(out)
    started = time.perf_counter()
    print(f"training a LoRA for '{CONCEPT_TRIGGER}' on the tiny base model ({epochs} epochs) …", flush=True)
    if train(training_arguments(out / "lora", epochs)) != 0:
        raise SystemExit(2)
    trained = time.perf_counter() - started
    # the Prompt-Lora-Grid tab's own path: epochs × strengths of the run, plus a "no LoRA" column
    host = StandaloneHost([], [out / "lora"], default_checkpoint=TINY_MODEL_PATH)
    settings = GenerationSettings(DEMO_PROMPT, steps=20, sampler="DPM++ 2M Karras", cfg_scale=5.0, seed=seed,
                                  width=DEMO_RESOLUTION, height=DEMO_RESOLUTION)
    strengths = AxisSpec("strength", [", ".join(f"{s:g}" for s in DEMO_STRENGTHS)])
    plan = plan_grid(GridRequest(strengths, AxisSpec("epoch", []), settings, lora=CONCEPT_TRIGGER), host.library)
    grid = run_grid(host, plan, out / "grid")
    files = run_files(out / "lora" / f"{CONCEPT_TRIGGER}.safetensors")
    print(f"trained in {trained:.0f} s", file=sys.stderr)  # each file was said as it was saved
    print(f"grid ({len(files)} epochs × {len(DEMO_STRENGTHS)} strengths + no LoRA) in {grid.seconds:.0f} s", file=sys.stderr)
    return grid.path
