"""``python -m lora_trainer bench grid``: a 10 epochs × 5 strengths grid on the tiny model through the standalone host,
with the share of the time spent switching LoRAs (target: at most 5 %).

The epoch files are made directly (random LoRA weights that grow with the epoch, sd-scripts' names and metadata),
so the figure measures the grid, not a training run; tests and the browser tests use the same maker.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path


def make_epoch_files(folder: Path, name: str = "tinylora", epochs: int = 2, seed: int = 0, dim: int = 4,
                     steps_per_epoch: int = 10, scale: float = 0.05) -> list[Path]:
    """``<name>-000001.safetensors`` … and the final ``<name>.safetensors`` (the last epoch) for the tiny model, each
    with ``ss_epoch``, ``ss_steps``, ``ss_output_name`` and the trainer's recorded losses; the weights of epoch e
    are e/epochs of the last one, so later epochs change the image more."""
    import torch

    from ..models.checkpoint import load_checkpoint
    from ..networks.network import base_metadata, create_network, save_network
    from ..networks.spec import NetworkSpec
    from ..tiny_model.build import TINY_MODEL_PATH

    model = load_checkpoint(TINY_MODEL_PATH)
    spec = NetworkSpec(dim=dim, alpha=float(dim))
    network = create_network(model.config, model.unet, model.text_encoders, spec)
    generator = torch.Generator().manual_seed(seed)
    final = {key: (torch.randn(value.shape, generator=generator) * scale if "lora_up" in key else value.detach().clone())
             for key, value in network.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    training = {str(e): round(0.2 - 0.1 * e / epochs, 4) for e in range(1, epochs + 1)}
    validation = {str(e): round(0.15 + 0.02 * abs(e - (epochs + 1) // 2), 4) for e in range(1, epochs + 1)}
    paths = []
    for epoch in range(1, epochs + 1):
        tensors = {key: value * (epoch / epochs) if "lora_up" in key else value for key, value in final.items()}
        recorded = {"epoch_training_loss": {k: v for k, v in training.items() if int(k) <= epoch},
                    "epoch_validation_loss": {k: v for k, v in validation.items() if int(k) <= epoch}}
        metadata = {**base_metadata(model.config, spec, name), "ss_output_name": name, "ss_epoch": str(epoch),
                    "ss_steps": str(epoch * steps_per_epoch), "lora_trainer.losses": json.dumps(recorded)}
        stem = name if epoch == epochs else f"{name}-{epoch:06d}"
        paths.append(save_network(tensors, folder / f"{stem}.safetensors", metadata, dtype="fp32"))
    return paths


def main(argv: list[str] | None = None) -> int:
    from ..app.standalone_host import StandaloneHost
    from ..bench import timed
    from ..sampling.txt2img import GenerationSettings
    from .plan import AxisSpec, GridRequest, plan_grid, run_grid

    parser = argparse.ArgumentParser(prog="python -m lora_trainer bench grid", description=__doc__)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "lora-trainer-bench-grid")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--strengths", default="0.2-1.0 (+0.2)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)

    loras = args.work_dir / "loras"
    started = time.perf_counter()
    files = make_epoch_files(loras, "benchlora", args.epochs)
    print(f"made {len(files)} epoch files in {time.perf_counter() - started:.1f} s")
    host = StandaloneHost([], [loras])
    settings = GenerationSettings("zkstar", steps=args.steps, sampler="DPM++ 2M Karras", cfg_scale=5.0, seed=11,
                                  width=64, height=64)
    host.generate(settings)  # load the model first: the figure is about the grid, not the model load
    # and apart from it, what the first LoRA of a process costs once (on torch 2.13 a LyCORIS file's first fit check
    # imports torch._dynamo: its products on the meta device go through torch._refs; a LoRA's in-place scale does not)
    plain = timed(lambda: host.generate(settings))
    first_lora = timed(lambda: host.generate(dataclasses.replace(settings, prompt=f"{settings.prompt} <lora:{files[0].stem}:1>")))
    print(f"first LoRA used in this process: {first_lora - plain:.2f} s more than a generation without one (once per "
          "process, not part of the grid's figure)")
    request = GridRequest(AxisSpec("strength", [args.strengths]), AxisSpec("epoch", []), settings, lora="benchlora")
    plan = plan_grid(request, host.library)
    rows, columns = plan.size
    result = run_grid(host, plan, args.work_dir / "grid")
    share = result.switching_seconds / result.seconds
    print(f"grid {rows} epochs × {columns - 1} strengths + no LoRA ({rows * columns} cells, "
          f"{len({c.key for row in plan.cells for c in row})} generated): {result.seconds:.2f} s total, "
          f"switching LoRAs {result.switching_seconds:.3f} s = {share:.1%} (target ≤ 5 %)")
    print(f"grid image: {result.path}")
    return 0 if share <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
