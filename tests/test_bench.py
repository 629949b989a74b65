"""The figures ``bench train`` prints: with ``--size``, the checkpoint it trains on and the two halves of its FLOP
utilisation; with ``--sd-scripts``, sd-scripts' step time and first step read from its progress bar, and our wall
time scaled to the reference machine."""

import dataclasses
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lora_trainer.bench import write_random_checkpoint
from lora_trainer.models.checkpoint import build_models, detect_architecture, open_tensors
from lora_trainer.tiny_model.build import tiny_config
from lora_trainer.training.bench import (
    SD_SCRIPTS_FIRST_STEP,
    SIZES,
    BenchSize,
    RunFigures,
    peak_tflops,
    phase_scaled_wall,
    progress_bar_seconds,
    run_measured,
    run_size,
    training_flops,
)


def test_a_random_benchmark_checkpoint_reads_back_as_the_architecture_it_was_made_for(tmp_path):
    config = dataclasses.replace(tiny_config(), resolution=96)
    path = write_random_checkpoint(config, tmp_path / "random.safetensors")
    detected, _ = detect_architecture(open_tensors(path))
    assert detected == config


def test_the_step_flops_are_forward_plus_a_backward_without_weight_gradients_of_the_frozen_model():
    config = tiny_config()
    unet, _, _ = build_models(config)
    latent = config.resolution // 8
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        unet(torch.zeros(2, 4, latent, latent, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"),
             torch.zeros(2, 77, config.unet.context_dim, device="meta"))
    one = training_flops(config, 1, config.resolution, train_text_encoder=False, rank=4)
    two = training_flops(config, 2, config.resolution, train_text_encoder=False, rank=4)
    assert two == 2 * one  # per image, so images/s and FLOP/s agree
    # backward into the LoRA only: about one more forward (input gradients), not two (no base weight gradients)
    assert 1.8 < two / forward.get_total_flops() < 2.5
    assert training_flops(config, 2, config.resolution, train_text_encoder=True, rank=4) > two  # a trained encoder runs in the step


def test_mfu_is_taken_against_the_cards_dense_bf16_peak():
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert peak_tflops("NVIDIA GeForce GTX 1080") is None  # unknown: the bench asks for --peak-tflops


def test_sd_scripts_step_time_comes_from_its_finished_steps_bar_not_from_the_caching_bars():
    stderr = ("caching latents: 100%|██████████| 16/16 [00:02<00:00,  7.1it/s]\n"
              "steps:   1%|          | 1/160 [00:01<03:10,  1.20s/it]\r"
              "steps:  50%|█████     | 80/160 [00:31<00:30,  2.61it/s, avr_loss=0.1]\r"
              "steps: 100%|██████████| 160/160 [01:02<00:00,  2.56it/s, avr_loss=0.0951]\n")
    assert progress_bar_seconds(stderr) == (160, 62)
    assert progress_bar_seconds("steps: 100%|██████████| 9000/9000 [1:02:03<00:00,  2.4it/s]") == (9000, 3723)
    with pytest.raises(ValueError, match="no finished 'steps' progress bar"):
        progress_bar_seconds("steps:  50%|█████     | 80/160 [00:31<00:30,  2.61it/s]")  # a run that stopped halfway


def test_the_wall_time_scales_phase_by_phase_when_a_host_starts_fast_and_trains_slowly():
    """sd-scripts on a host that starts as fast as the reference machine (10.5 s) and trains at half its speed
    (2 × 23.4 s): a run of ours that starts in 2 s and trains in 20 s there takes 2 + 10 s on the reference machine,
    not the 13 s that the whole wall time's ratio (22 / 57.3) gives."""
    theirs = RunFigures(0.29, 10.5 + 2 * 23.4, 625, first_step_seconds=10.5)
    ours = RunFigures(0.125, 22.0, 350, first_step_seconds=2.0)
    assert phase_scaled_wall(ours, theirs) == pytest.approx(12.0)
    assert 22.0 / theirs.wall_seconds * 33.9 == pytest.approx(13.0, abs=0.05)


def test_the_first_step_of_sd_scripts_is_timed_from_its_steps_bar_as_it_is_drawn():
    """tqdm redraws its bar with carriage returns; the moment ``1/N`` shows is the end of the first step."""
    call = ("sys.stderr.write('caching latents: 100%|#| 1/1\\nsteps:   0%|  | 0/3\\r'); sys.stderr.flush(); time.sleep(0.6); "
            "sys.stderr.write('steps:  33%|# | 1/3 [00:00<00:01]\\r'); sys.stderr.flush(); time.sleep(0.6)")
    figures, stderr, first_step = run_measured(sys.executable, ["fake"], call, first_step_done=SD_SCRIPTS_FIRST_STEP)
    assert "1/3" in stderr
    assert 0.5 < first_step - figures["started"] < figures["wall"] - 0.4
    assert 1.1 < figures["wall"] < 5


def test_peak_memory_of_a_measured_run_counts_what_it_allocated_without_importing_this_package():
    """sd-scripts' interpreter has no lora_trainer: the measuring code must stand alone, and see a 300 MB buffer
    (written: untouched pages take no memory) and no more, even when started from a big process (this test's,
    after hundreds of tests: getrusage would count its size)."""
    call = ("assert not any(m.startswith('lora_trainer') for m in sys.modules); buffer = bytearray(300 * 2**20); "
            "buffer[::4096] = b'x' * (300 * 2**20 // 4096)")
    figures, stderr, _ = run_measured(sys.executable, ["fake"], call)
    assert "Error" not in stderr
    assert 300 < figures["peak_rss_mb"] < 600


def test_the_process_memory_figures_follow_an_allocation():
    """In a fresh process: in a test worker's, freed memory still resident from earlier tests can take the buffer
    without the figures moving."""
    import subprocess
    import sys

    code = ("import torch\nfrom lora_trainer.process_memory import peak_rss_mib, rss_mib\nbefore = rss_mib()\n"
            "buffer = torch.ones(100 * 2**20 // 4)\nprint(rss_mib() - before, peak_rss_mib() - (rss_mib() - 5))")
    grown, peak_over_now = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                     check=True).stdout.split())
    assert grown > 90  # 100 MiB, written
    assert peak_over_now > 0  # the peak is at least what is resident now (the kernel updates it lazily)


def test_a_size_bench_trains_through_the_real_command_and_reports_speed_memory_and_flops(tmp_path, monkeypatch, capsys):
    """``bench train --size``: the same path as small/sd15/sdxl (random checkpoint, the training command, its
    events), on the tiny architecture so that it runs here."""
    monkeypatch.setitem(SIZES, "tiny", BenchSize(dataclasses.replace(tiny_config(), resolution=64), batch=1,
                                                 train_text_encoder=False, rank=2))
    run_size("tiny", tmp_path, steps=3, batch=None, resolution=None, gradient_checkpointing=False, peak=None,
             extra=["--min_snr_gamma=5"])
    report = capsys.readouterr().out
    assert "random fp16 checkpoint" in report
    assert "64 px, batch 1, LoRA rank 2" in report and "UNet only with cached text-encoder outputs" in report
    assert ", --min_snr_gamma=5)" in report  # what was measured is named with its figures
    assert "images/s" in report and "peak RSS" in report and "TFLOP per step" in report and "MFU needs --peak-tflops" in report


def test_bench_train_reads_lora_trainer_reference_and_says_how_to_give_the_fixtures(tmp_path, monkeypatch):
    """Outside the workspace it looked in a folder beside the install ("…/shared/reference/…: no such file") and
    ignored LORA_TRAINER_REFERENCE, which the README names."""
    from lora_trainer.cli import parser
    from lora_trainer.errors import UserError
    from lora_trainer.training.bench import run

    monkeypatch.setenv("LORA_TRAINER_REFERENCE", str(tmp_path / "reference"))
    args = parser().parse_args(["bench", "train"])
    assert args.fixtures == tmp_path / "reference" / "kohya-fixtures"
    with pytest.raises(UserError, match="give their folder with --fixtures .* or set LORA_TRAINER_REFERENCE"):
        run(args.fixtures)
