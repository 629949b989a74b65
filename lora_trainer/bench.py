"""``python -m lora_trainer bench <area>``: speed and memory figures, printed (never asserted in tests).

Each measurement runs in a fresh subprocess so peak RSS belongs to that measurement alone.
"""

from __future__ import annotations

import importlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REFERENCE_NAMES = {"sd15": "sd1", "sdxl": "sdxl", "sd2": "sd2"}


def timed(action) -> float:
    """Seconds ``action()`` takes."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def write_random_checkpoint(config, path: Path) -> Path:
    """A checkpoint of ``config`` (a ModelConfig) with random fp16 weights and the real key names, for benchmarks;
    its architecture metadata makes it read back as ``config`` whatever its widths."""
    from .models.checkpoint import ARCHITECTURE_METADATA_KEY, architecture_overrides, build_models
    from .safe_io import save_safetensors

    unet, text_encoders, vae = build_models(config)
    parts = [(config.unet_prefix, unet), (config.vae_prefix, vae)]
    parts += [(slot.prefix, encoder) for slot, encoder in zip(config.text_encoders, text_encoders)]
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for prefix, module in parts:
        for key, meta in module.state_dict().items():
            if meta.is_floating_point():
                tensors[prefix + key] = (torch.randn(meta.shape, generator=generator) * 0.02).half()
            else:
                tensors[prefix + key] = torch.arange(meta.shape[-1]).expand(meta.shape).clone()
    return save_safetensors(tensors, path, {ARCHITECTURE_METADATA_KEY: json.dumps(architecture_overrides(config))})


def _measure_load(path: Path) -> dict:
    """Runs in a child process: load to fp16 on CPU, report seconds and peak RSS."""
    code = (
        "import json, time, torch\n"
        "from lora_trainer.models.checkpoint import load_checkpoint\n"
        "from lora_trainer.process_memory import peak_rss_mib\n"
        "t = time.perf_counter()\n"
        f"model = load_checkpoint({str(path)!r}, dtype=torch.float16)\n"
        "seconds = time.perf_counter() - t\n"
        "print(json.dumps({'seconds': seconds, 'peak_rss_mib': peak_rss_mib(),"
        " 'architecture': model.config.label}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_load(work_dir: Path | None, models: list[str]) -> None:
    from .models.configs import FULL_SIZE

    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        for name in models:
            path = Path(folder) / f"random-{name}-fp16.safetensors"
            started = time.perf_counter()
            write_random_checkpoint(FULL_SIZE[REFERENCE_NAMES[name]], path)
            size = path.stat().st_size / 2**30
            print(f"{name}: wrote a random fp16 checkpoint of {size:.2f} GiB in {time.perf_counter() - started:.0f} s", flush=True)
            figures = _measure_load(path)
            print(f"{name}: load to fp16 on CPU {figures['seconds']:.1f} s, peak RSS {figures['peak_rss_mib']:.0f} MiB "
                  f"(file {size * 1024:.0f} MiB) — detected {figures['architecture']}", flush=True)
            path.unlink()


def bench_generate() -> None:
    from .cli import load_for_inference
    from .sampling.txt2img import GenerationSettings, txt2img

    started = time.perf_counter()
    model = load_for_inference(None, None, None, "auto", None)
    print(f"tiny model: load {time.perf_counter() - started:.2f} s")
    size = model.config.resolution
    for batch, steps, sampler in ((1, 20, "Euler a"), (8, 20, "DPM++ 2M Karras")):
        settings = GenerationSettings(prompt="a red circle", steps=steps, sampler=sampler, seed=1, width=size, height=size,
                                      batch_size=batch)
        txt2img(model, settings)  # warm-up
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            txt2img(model, settings)
            runs.append(time.perf_counter() - started)
        print(f"tiny model: {batch} image(s) {size}x{size}, {steps} steps {sampler}: {min(runs):.2f} s (best of 3)")


def run_bench(area: str, args) -> None:
    print(f"machine: {_machine()}")
    if area == "load":
        bench_load(args.work_dir, [m.strip() for m in args.models.split(",") if m.strip()])
    elif area == "generate":
        bench_generate()
    elif area == "networks":
        from .networks.bench import run

        run(args.precision)
    elif area == "tags":
        from .dataset.bench_tags import run

        run(args.work_dir or Path(tempfile.gettempdir()) / "lora-trainer-bench-tags")
    elif area == "prep":
        from .dataset.bench_prep import run

        run(args.work_dir or Path(tempfile.gettempdir()) / "lora-trainer-bench-prep")
    elif area == "train":
        from .training.bench import run, run_size
        from .training.sd_scripts_backend import checkout_of

        if args.size == "reference":
            checkout = checkout_of(f"sd-scripts={args.sd_scripts}") if args.sd_scripts else None
            run(args.fixtures, checkout, args.rounds, args.sd_scripts_arg)
        else:
            run_size(args.size, args.work_dir, args.steps, args.batch, args.resolution, args.gradient_checkpointing,
                     args.peak_tflops, args.train_arg)
    else:  # the app's benches parse their own arguments
        module = {"ui": ".app.bench_ui", "api": ".app.bench_api", "grid": ".grid.bench", "tags-ui": ".app.ui.bench_tags_ui"}[area]
        main = importlib.import_module(module, __package__).main
        if main(["--work-dir", str(args.work_dir)] if args.work_dir and area != "ui" else []):
            print(f"bench {area}: a target was missed (see above)")
