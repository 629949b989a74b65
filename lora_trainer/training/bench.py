"""``python -m lora_trainer bench train``: the issue's reference run, timed the way sd-scripts' figures were, and
``--size small|sd15|sdxl``: random-weight models of real architectures, for images/s, peak memory and FLOP utilisation.

sd-scripts on the 2-core reference machine: 0.130 s/step (median, first step excluded), 33.9 s wall (≈ 10.5 s of it
before the first step), 599 MB peak RSS for: tiny-sd15 checkpoint, ``10_shapes`` DreamBooth folder, resolution 128,
batch 2, 2 epochs, dim 4 / alpha 4, AdamW lr 1e-4 constant, fp32, latents cached in memory, no loader workers. Hosts
differ in speed by more than the goals do, so ``--sd-scripts CHECKOUT --rounds N`` runs sd-scripts' own script
alternately with ours and scales our figures to that machine by the ratios: the whole wall time by the whole wall
time's ratio, and also phase by phase, because hosts differ unevenly: one may start a run (imports, loading, caching)
as fast as the reference machine and train at half its speed, and sd-scripts spends a third of its run starting while
ours spends a tenth.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import process_memory
from ..errors import UserError
from ..models.configs import SD1, SDXL, ModelConfig
from .events import read_events
from .sd_scripts_backend import python_of

REFERENCE = {"seconds_per_step": 0.130, "wall_seconds": 33.9, "peak_rss_mb": 599}  # sd-scripts on the reference machine
REFERENCE_BEFORE_FIRST_STEP = 10.5  # seconds of its wall time


def reference_arguments(fixtures: Path, out: Path) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(fixtures / "model" / "tiny-sd15.safetensors"),
        "--train_data_dir", str(fixtures / "dataset" / "train"), "--output_dir", str(out), "--output_name", "tinylora",
        "--resolution", "128", "--train_batch_size", "2", "--max_train_epochs", "2", "--network_module", "networks.lora",
        "--network_dim", "4", "--network_alpha", "4", "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
        "--lr_scheduler", "constant", "--mixed_precision", "no", "--cache_latents", "--max_data_loader_n_workers", "0",
        "--caption_extension", ".txt", "--seed", "42", "--save_precision", "float",
    ]


@dataclass(frozen=True)
class RunFigures:
    seconds_per_step: float  # mean over every step, the first included, as sd-scripts' progress bar counts
    wall_seconds: float  # the whole process: imports, loading, caching, training, saving
    peak_rss_mb: float
    first_step_seconds: float  # from the interpreter's start to the end of the first step


def phase_scaled_wall(ours: RunFigures, theirs: RunFigures) -> float:
    """Our wall time on the reference machine, each phase scaled by sd-scripts' ratio for it: up to the end of the
    first step, and the rest (training and saving)."""
    reference_rest = REFERENCE["wall_seconds"] - REFERENCE_BEFORE_FIRST_STEP
    return (ours.first_step_seconds * REFERENCE_BEFORE_FIRST_STEP / theirs.first_step_seconds
            + (ours.wall_seconds - ours.first_step_seconds) * reference_rest / (theirs.wall_seconds - theirs.first_step_seconds))


# Runs the command's script as __main__ in a fresh interpreter and prints its start (epoch seconds), wall time and peak
# RSS as JSON last; after process_memory's source, so any Python measures alike (sd-scripts' has no lora_trainer).
_MEASURED = (
    "import json, runpy, sys, time\n"
    "started, epoch = time.perf_counter(), time.time()\n"
    "sys.argv = {argv!r}\n"
    "try:\n"
    "    {call}\n"
    "finally:\n"
    "    print(json.dumps({{'started': epoch, 'wall': time.perf_counter() - started,"
    " 'peak_rss_mb': peak_rss_mib()}}))\n"
)


_OUR_COMMAND = "from lora_trainer.train_network import main; sys.exit(main(sys.argv[1:]))"


# sd-scripts' steps bar once its first step is done
SD_SCRIPTS_FIRST_STEP = re.compile(r"steps:\s+\d+%\|[^|]*\|\s*1/\d+")


def run_measured(python: str, argv: list[str], call: str, cwd: Path | None = None,
                 first_step_done: re.Pattern | None = None) -> tuple[dict, str, float | None]:
    """The figures the script printed, its stderr, and when (epoch seconds) its stderr first matched
    ``first_step_done`` (None without a pattern or a match)."""
    code = Path(process_memory.__file__).read_text(encoding="utf-8") + "\n" + _MEASURED.format(argv=argv, call=call)
    process = subprocess.Popen([python, "-c", code], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=cwd)
    chunks, first_step = [], []

    def read_stderr() -> None:  # tqdm redraws with carriage returns: read as it comes, not by lines
        while chunk := process.stderr.read1(65536):
            chunks.append(chunk)
            if first_step_done and not first_step:
                if first_step_done.search(b"".join(chunks[-2:]).decode("utf-8", "replace")):
                    first_step.append(time.time())

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    stdout = process.stdout.read().decode("utf-8", "replace")
    process.wait()
    reader.join()
    stderr = b"".join(chunks).decode("utf-8", "replace")
    if process.returncode != 0:
        raise SystemExit(f"{argv[0]} failed:\n{stderr[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1]), stderr, first_step[0] if first_step else None


def ours(fixtures: Path) -> tuple[RunFigures, float, float]:
    """Our reference run: its figures, the median step (first excluded) and the time from start event to first step."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        arguments = reference_arguments(fixtures, out)
        figures, _, _ = run_measured(sys.executable, ["train_network", *arguments], _OUR_COMMAND)
        events, _ = read_events(out / "tinylora.events.jsonl")
    steps = [e for e in events if e["event"] == "step" and "loss" in e]
    start = next(e["time"] for e in events if e["event"] == "start")
    mean = sum(e["seconds"] for e in steps) / len(steps)
    median = statistics.median(e["seconds"] for e in steps[1:])
    first_step = steps[0]["time"] - figures["started"]
    return RunFigures(mean, figures["wall"], figures["peak_rss_mb"], first_step), median, steps[0]["time"] - start


def progress_bar_seconds(stderr: str) -> tuple[int, float]:
    """Steps and elapsed seconds of the last completed ``steps`` progress bar (tqdm) sd-scripts printed."""
    bars = re.findall(r"steps: 100%\|[^|]*\| (\d+)/\1 \[(?:(\d+):)?(\d+):(\d+)<", stderr)
    if not bars:
        raise ValueError("no finished 'steps' progress bar in sd-scripts' output")
    total, hours, minutes, seconds = bars[-1]
    return int(total), int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)


def sd_scripts(checkout: Path, fixtures: Path, extra: Sequence[str]) -> RunFigures:
    """sd-scripts' own ``train_network.py`` on the same run, in its checkout's Python."""
    with tempfile.TemporaryDirectory() as folder:
        arguments = [*reference_arguments(fixtures, Path(folder)), "--save_model_as", "safetensors", *extra]
        script = checkout / "train_network.py"
        figures, stderr, first_step = run_measured(python_of(checkout), [str(script), *arguments],
                                                f"runpy.run_path({str(script)!r}, run_name='__main__')", cwd=checkout,
                                                first_step_done=SD_SCRIPTS_FIRST_STEP)
    steps, elapsed = progress_bar_seconds(stderr)
    if first_step is None:
        raise SystemExit("sd-scripts' output showed no finished first step")
    return RunFigures(elapsed / steps, figures["wall"], figures["peak_rss_mb"], first_step - figures["started"])


def _line(name: str, figures: RunFigures) -> str:
    return (f"{name}: {figures.seconds_per_step:.3f} s/step (mean), {figures.wall_seconds:.1f} s wall "
            f"({figures.first_step_seconds:.1f} s to the end of the first step), peak RSS {figures.peak_rss_mb:.0f} MB")


def run(fixtures: Path, checkout: Path | None = None, rounds: int = 1, extra: Sequence[str] = ()) -> None:
    """Our reference run ``rounds`` times; with an sd-scripts checkout, its run alternately with ours (the same
    host's load for both), and our figures scaled to the reference machine by the ratios."""
    if not (fixtures / "model" / "tiny-sd15.safetensors").is_file():
        raise UserError(f"bench train: sd-scripts' fixtures are not in {fixtures}; give their folder with --fixtures "
                        "(kohya-fixtures in the reference facts) or set LORA_TRAINER_REFERENCE to the reference folder")
    pairs = []
    for _ in range(rounds):
        theirs = sd_scripts(checkout, fixtures, extra) if checkout else None
        if theirs:
            print(_line("sd-scripts", theirs), flush=True)
        mine, median, to_first_step = ours(fixtures)
        print(f"{_line('ours', mine)}; {median:.3f} s/step median (first excluded), "
              f"{to_first_step:.1f} s from start event to first step", flush=True)
        pairs.append((mine, theirs))
    print(f"sd-scripts on the reference machine: {REFERENCE['seconds_per_step']} s/step, {REFERENCE['wall_seconds']} s wall, "
          f"{REFERENCE['peak_rss_mb']} MB; goal ≤ 0.10 s/step, ≤ 15 s, ≤ 450 MB")
    if checkout:
        ratios = {field: statistics.median(getattr(m, field) / getattr(t, field) for m, t in pairs)
                  for field in ("seconds_per_step", "wall_seconds", "peak_rss_mb")}
        print("ours / sd-scripts (median of the pairs): " + ", ".join(f"{k} {v:.2f}×" for k, v in ratios.items()))
        print("scaled to the reference machine: " + ", ".join(
            f"{k} {REFERENCE[k]:.3g} → {REFERENCE[k] * ratios[k]:.3g}" for k in ("seconds_per_step", "wall_seconds")))
        phased = [phase_scaled_wall(m, t) for m, t in pairs]
        print(f"wall time scaled phase by phase (start to the first step, then the rest): {statistics.median(phased):.1f} s "
              f"(median; pairs {', '.join(f'{w:.1f}' for w in phased)}); goal ≤ 15 s")


@dataclass(frozen=True)
class BenchSize:
    """A random-weight model to train, and how it is usually trained."""

    config: ModelConfig
    batch: int
    train_text_encoder: bool  # False: UNet only, with the text encoders' outputs cached (the usual SDXL recipe)
    rank: int = 16


# "small": SD1's topology with its real text encoder and VAE, and a UNet of 128 instead of 320 channels, at 256 px
SIZES = {
    "small": BenchSize(dataclasses.replace(SD1, unet=dataclasses.replace(SD1.unet, model_channels=128), resolution=256),
                       batch=2, train_text_encoder=True),
    "sd15": BenchSize(SD1, batch=4, train_text_encoder=True),
    "sdxl": BenchSize(SDXL, batch=2, train_text_encoder=False),
}

# dense bf16 tensor-core peaks (TFLOP/s) by device name, most specific first
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
               ("RTX 4090", 165.2), ("RTX 4080", 97.5), ("RTX 3090", 71.0), ("A10G", 70.0), ("T4", 65.0))


def peak_tflops(device_name: str) -> float | None:
    return next((peak for name, peak in PEAK_TFLOPS if name in device_name), None)


def training_flops(config: ModelConfig, batch: int, resolution: int, train_text_encoder: bool, rank: int) -> int:
    """The model FLOPs of one LoRA training step at ``resolution``: forward, and backward into the network (the
    frozen weights get no gradients), counted on the meta device; no recomputation, so it is the MFU numerator."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..models.checkpoint import build_models
    from ..models.tokenizer import CLIPTokenizer
    from ..networks.network import create_network
    from ..networks.spec import NetworkSpec
    from .text import encode_captions, sdxl_vector

    unet, text_encoders, _ = build_models(config)
    for part in (unet, *text_encoders):
        part.requires_grad_(False)
    network = create_network(config, unet, text_encoders, NetworkSpec(dim=rank, alpha=rank),
                             train_text_encoder=train_text_encoder).apply_to().train()
    for module in network.values():  # the factored products: the model's FLOPs, not a small layer's shortcut
        module.merge_below = 0
    captions = ["a photo of a bench image"] * batch
    latent = resolution // 8
    with FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(train_text_encoder):
            context, pooled = encode_captions(config, text_encoders, captions, CLIPTokenizer.default())
        if not train_text_encoder:  # cached outputs: the encoders do not run in a step
            counter.flop_counts.clear()
        y = None
        if config.needs_size_conditioning:
            sizes = [(resolution, resolution)] * batch
            y = sdxl_vector(pooled, sizes, [(0, 0)] * batch, sizes)
        noisy = torch.zeros(batch, config.unet.in_channels, latent, latent, device="meta")
        prediction = unet(noisy, torch.zeros(batch, dtype=torch.long, device="meta"), context, y)
        prediction.float().square().mean().backward()
    return counter.get_total_flops()


def run_size(size: str, work_dir: Path | None, steps: int, batch: int | None, resolution: int | None,
             gradient_checkpointing: bool, peak: float | None, extra: list[str] = ()) -> None:
    """Train a LoRA on random weights of ``size`` through the real command and report the step speed and memory;
    ``extra``: more trainer arguments (``--xformers``, ``--torch_compile``), named in the report."""
    from ..bench import write_random_checkpoint
    from ..tiny_model.shapes import write_dataset

    chosen = SIZES[size]
    batch = batch or chosen.batch
    resolution = resolution or chosen.config.resolution
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        folder = Path(folder)
        checkpoint = write_random_checkpoint(chosen.config, folder / f"random-{size}.safetensors")
        print(f"{size}: random fp16 checkpoint of {checkpoint.stat().st_size / 2**30:.2f} GiB written", flush=True)
        write_dataset(folder / "data", batch * 2, size=resolution, repeats=1)
        arguments = [
            "--pretrained_model_name_or_path", str(checkpoint), "--train_data_dir", str(folder / "data"),
            "--output_dir", str(folder / "out"), "--output_name", "bench", "--resolution", str(resolution),
            "--train_batch_size", str(batch), "--max_train_steps", str(steps), "--network_module", "networks.lora",
            "--network_dim", str(chosen.rank), "--network_alpha", str(chosen.rank), "--optimizer_type", "AdamW",
            "--learning_rate", "1e-4", "--mixed_precision", "bf16" if cuda else "no", "--cache_latents", "--sdpa",
            "--max_data_loader_n_workers", "0", "--seed", "0", "--save_precision", "fp16",
        ]
        if not chosen.train_text_encoder:
            arguments += ["--network_train_unet_only", "--cache_text_encoder_outputs"]
        if gradient_checkpointing:
            arguments.append("--gradient_checkpointing")
        arguments += extra
        figures, _, _ = run_measured(sys.executable, ["train_network", *arguments], _OUR_COMMAND)
        events, _ = read_events(folder / "out" / "bench.events.jsonl")
    timed = [e for e in events if e["event"] == "step" and "loss" in e][2:]  # the first steps warm the kernels up
    if not timed:
        raise SystemExit(f"bench train --size {size}: give --steps of 3 or more (the first 2 are warm-up)")
    per_step = statistics.median(e["seconds"] for e in timed)
    memory = max(e.get("memory_mib") or 0 for e in timed)
    flops = training_flops(dataclasses.replace(chosen.config, resolution=resolution), batch, resolution,
                           chosen.train_text_encoder, chosen.rank)
    achieved = flops / per_step / 1e12
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    peak = peak or (peak_tflops(device) if cuda else None)
    utilisation = f"{100 * achieved / peak:.1f} % of {peak:g} TFLOP/s" if peak else "MFU needs --peak-tflops on this device"
    print(f"{size} ({chosen.config.label} architecture, {resolution} px, batch {batch}, LoRA rank {chosen.rank}, "
          f"{'bf16' if cuda else 'fp32'}{', gradient checkpointing' if gradient_checkpointing else ''}"
          f"{'' if chosen.train_text_encoder else ', UNet only with cached text-encoder outputs'}"
          f"{''.join(f', {argument}' for argument in extra)}) on {device}:")
    print(f"  {batch / per_step:.2f} images/s ({per_step:.3f} s/step, median of {len(timed)}), "
          f"peak {'VRAM' if cuda else 'RSS'} {memory / 1024:.2f} GiB, {flops / 1e12:.2f} TFLOP per step = "
          f"{achieved:.2f} TFLOP/s, {utilisation}; {figures['wall']:.0f} s wall")
