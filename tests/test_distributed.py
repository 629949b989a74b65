"""torchrun --nproc_per_node 2 on the CPU (gloo): two ranks with batch 2 train what one process with batch 4 trains,
and only rank 0 writes files and events."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.tiny_model.build import TINY_MODEL_PATH
from lora_trainer.training.distributed import World
from lora_trainer.training.events import read_events

SAMPLE = Path(__file__).resolve().parents[1] / "lora_trainer" / "assets" / "sample-dataset" / "10_zkstar"


def arguments(data: Path, out: Path, batch: int, latents: tuple[str, ...] = ("--cache_latents",)) -> list[str]:
    return ["-m", "lora_trainer.train_network", "--pretrained_model_name_or_path", str(TINY_MODEL_PATH),
            "--train_data_dir", str(data), "--output_dir", str(out), "--output_name", "star", "--resolution", "64",
            "--train_batch_size", str(batch), "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3",
            "--max_train_epochs", "1", "--seed", "3", "--caption_extension", ".txt", *latents,
            "--max_data_loader_n_workers", "0", "--device", "cpu", "--save_every_n_epochs", "1"]


@pytest.mark.parametrize("latents", [("--cache_latents",), ("--flip_aug", "--color_aug", "--random_crop")],
                         ids=["cached", "encoded-per-rank-with-augmentation"])
def test_two_gloo_ranks_train_the_same_weights_as_one_process_with_the_global_batch(tmp_path, latents):
    """Uncached, each rank encodes only its half of the batch: the augmentation and posterior-noise draws are the
    whole batch's, so each image gets the latent the single process gives it."""
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data / "1_zkstar")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *arguments(data, tmp_path / "single", 4, latents)], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            *arguments(data, tmp_path / "ddp", 2, latents)], env=env, capture_output=True, text=True)
    assert ranks.returncode == 0, ranks.stderr[-3000:]

    one, two = load_file(str(tmp_path / "single" / "star.safetensors")), load_file(str(tmp_path / "ddp" / "star.safetensors"))
    assert one.keys() == two.keys()
    assert all(torch.allclose(one[k].float(), two[k].float(), rtol=1e-3, atol=1e-5) for k in one)
    assert any(not torch.equal(one[k], torch.zeros_like(one[k])) for k in one if "lora_up" in k)  # it did train

    single_events = read_events(tmp_path / "single" / "star.events.jsonl")[0]
    ddp_events = read_events(tmp_path / "ddp" / "star.events.jsonl")[0]
    assert [e["event"] for e in ddp_events].count("start") == 1  # rank 1 wrote nothing
    assert [e["step"] for e in ddp_events if e["event"] == "step"] == [e["step"] for e in single_events if e["event"] == "step"]
    losses = [(a["loss"], b["loss"]) for a, b in zip(*[[e for e in events if e["event"] == "step"] for events in (single_events, ddp_events)])]
    assert all(abs(a - b) < 1e-4 for a, b in losses)
    assert sorted(p.name for p in (tmp_path / "ddp").glob("*.safetensors")) == ["star.safetensors"]


def test_a_global_batch_is_split_into_ordered_slices_even_when_short():
    assert [World(r, 2).shard(4) for r in range(2)] == [slice(0, 2), slice(2, 4)]
    assert [World(r, 2).shard(3) for r in range(2)] == [slice(0, 2), slice(2, 3)]
    assert [World(r, 2).shard(1) for r in range(2)] == [slice(0, 1), slice(1, 1)]  # rank 1 idles, in step
    assert World().shard(5) == slice(0, 5)
