"""torchrun --nproc_per_node 2 on the CPU (gloo): two ranks with batch 2 train what one process with batch 4 trains,
and only rank 0 writes files and events."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing
from safetensors.torch import load_file

from lora_trainer.tiny_model.build import TINY_MODEL_PATH
from lora_trainer.training.distributed import World, finish, sum_gradients
from lora_trainer.training.events import read_events

SAMPLE = Path(__file__).resolve().parents[1] / "lora_trainer" / "assets" / "sample-dataset" / "10_zkstar"


def arguments(data: Path, out: Path, batch: int, latents: tuple[str, ...] = ("--cache_latents",)) -> list[str]:
    return ["-m", "lora_trainer.train_network", "--pretrained_model_name_or_path", str(TINY_MODEL_PATH),
            "--train_data_dir", str(data), "--output_dir", str(out), "--output_name", "star", "--resolution", "64",
            "--train_batch_size", str(batch), "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3",
            "--max_train_epochs", "1", "--seed", "3", "--caption_extension", ".txt", *latents,
            "--max_data_loader_n_workers", "0", "--device", "cpu", "--save_every_n_epochs", "1", "--ddp_timeout", "5"]


@pytest.mark.parametrize("latents", [("--cache_latents",), ("--flip_aug", "--color_aug", "--random_crop"),
                                     ("--cache_latents", "--network_module", "networks.dylora", "--network_args", "unit=2")],
                         ids=["cached", "encoded-per-rank-with-augmentation", "dylora"])
def test_two_gloo_ranks_train_the_same_weights_as_one_process_with_the_global_batch(tmp_path, latents):
    """Uncached, each rank encodes only its half of the batch: the augmentation and posterior-noise draws are the
    whole batch's, so each image gets the latent the single process gives it."""
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data / "1_zkstar")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *arguments(data, tmp_path / "single", 4, latents)], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            *arguments(data, tmp_path / "ddp", 2, latents), "--logging_dir", str(tmp_path / "logs")],
                           env=env, capture_output=True, text=True)
    assert ranks.returncode == 0, ranks.stderr[-3000:]

    one, two = load_file(str(tmp_path / "single" / "star.safetensors")), load_file(str(tmp_path / "ddp" / "star.safetensors"))
    assert one.keys() == two.keys()
    # the ranks sum their gradients in another order than one process: where a gradient is rounding noise (DyLoRA's
    # up weights of barely reached layers, ~1e-9), AdamW's normalised step still moves the weight, by a random sign
    assert all(torch.allclose(one[k].float(), two[k].float(), rtol=1e-3, atol=5e-5) for k in one)
    assert any(not torch.equal(one[k], torch.zeros_like(one[k])) for k in one if "lora_up" in k)  # it did train

    single_events = read_events(tmp_path / "single" / "star.events.jsonl")[0]
    ddp_events = read_events(tmp_path / "ddp" / "star.events.jsonl")[0]
    assert [e["event"] for e in ddp_events].count("start") == 1  # rank 1 wrote nothing
    start = ddp_events[0]  # the effective batch is said, as sd-scripts multiplies it
    assert (start["processes"], start["global_batch"]) == (2, 4) and "processes" not in single_events[0]
    assert [e["step"] for e in ddp_events if e["event"] == "step"] == [e["step"] for e in single_events if e["event"] == "step"]
    losses = [(a["loss"], b["loss"]) for a, b in zip(*[[e for e in events if e["event"] == "step"] for events in (single_events, ddp_events)])]
    assert all(abs(a - b) < 1e-4 for a, b in losses)
    assert sorted(p.name for p in (tmp_path / "ddp").glob("*.safetensors")) == ["star.safetensors"]
    assert len(list((tmp_path / "logs").rglob("events.out.tfevents.*"))) == 1  # TensorBoard would draw rank 1's twice


def test_a_global_batch_is_split_into_ordered_slices_even_when_short():
    assert [World(r, 2).shard(4) for r in range(2)] == [slice(0, 2), slice(2, 4)]
    assert [World(r, 2).shard(3) for r in range(2)] == [slice(0, 2), slice(2, 3)]
    assert [World(r, 2).shard(1) for r in range(2)] == [slice(0, 1), slice(1, 1)]  # rank 1 idles, in step
    assert World().shard(5) == slice(0, 5)


def test_the_process_group_gets_a_timeout_only_when_ddp_timeout_is_given(monkeypatch):
    """torch 2.1 (the WebUI's) refuses timeout=None: torchrun without --ddp_timeout failed at its start."""
    import torch.distributed as dist

    from lora_trainer.training.distributed import start

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: calls.append((backend, kwargs)))
    start(World(0, 2), torch.device("cpu"))
    start(World(0, 2), torch.device("cpu"), timeout_minutes=5)
    start(World(), torch.device("cpu"), timeout_minutes=5)  # one process: no group at all
    assert calls == [("gloo", {}), ("gloo", {"timeout": timedelta(minutes=5)})]


def test_gpus_without_nccl_are_refused_before_the_process_group_with_the_way_to_train(monkeypatch):
    """torch's Windows builds have no NCCL: init_process_group failed, and its "NCCL" error was said as "lost the
    others … raise --ddp_timeout"."""
    import torch.distributed as dist

    from lora_trainer.errors import UserError
    from lora_trainer.training.distributed import start

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("the group was started"))
    with pytest.raises(UserError, match="torchrun on 2 GPUs needs NCCL.*train on one GPU without torchrun, or on Linux or WSL"):
        start(World(0, 2), torch.device("cuda", 0))


def test_without_nccl_only_rank_0_says_why_and_every_rank_stops(monkeypatch, capsys):
    """torchrun shares one console: N ranks printed the same paragraph N times."""
    import torch.distributed as dist

    from lora_trainer.train_network import main
    from lora_trainer.training import trainer
    from lora_trainer.training.distributed import start

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("the group was started"))
    monkeypatch.setattr(trainer, "pick_device", lambda *_: torch.device("cuda", 1))  # no GPU needed to get this far
    monkeypatch.setattr(trainer, "start_world", start)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    arguments = ["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", ".", "--events_file", "-"]
    with pytest.raises(SystemExit) as stopped:
        main(arguments)
    assert stopped.value.code == 2
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    assert main(arguments) == 2
    printed = capsys.readouterr()
    assert printed.err.count("needs NCCL") == 1 and '"event": "error"' in printed.out


def _sum_gradients_on_rank(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    # a rank left waiting fails the test in a minute instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", timeout=timedelta(minutes=1), rank=rank, world_size=2)
    parameters = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4, dtype=torch.float16)),
                  torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(2))]
    parameters[0].grad = torch.arange(6.0).reshape(3, 2) * (rank + 1)
    parameters[1].grad = torch.full((4,), 0.5 * (rank + 1), dtype=torch.float16)
    parameters[2].grad = (torch.arange(6.0).reshape(3, 2) * 10 * (rank + 1)).t()  # not contiguous
    if rank == 0:  # rank 1 never touched this one: its share is zero
        parameters[3].grad = torch.ones(5)
    # parameters[4]: no rank trained it (DyLoRA's other ranks): it keeps no gradient, so the optimizer leaves it alone
    sum_gradients(World(rank, 2), parameters)
    torch.save([p.grad for p in parameters], f"{out}/{rank}.pt")
    finish(World(rank, 2))  # the trainer's own shutdown: under torch 2.1 a bare destroy_process_group could hang here


def test_summed_gradients_land_in_their_own_parameters_whatever_their_dtype_or_layout(tmp_path):
    """The gradients travel as one flat buffer per dtype: each must come back to its own parameter, in its shape."""
    torch.multiprocessing.spawn(_sum_gradients_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        grads = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(grads[0], torch.arange(6.0).reshape(3, 2) * 3)
        assert grads[1].dtype == torch.float16 and torch.equal(grads[1], torch.full((4,), 1.5, dtype=torch.float16))
        assert torch.equal(grads[2], (torch.arange(6.0).reshape(3, 2) * 30).t())
        assert torch.equal(grads[3], torch.ones(5))
        assert grads[4] is None


def test_only_rank_0_writes_the_event_stream_even_when_every_rank_fails(tmp_path, monkeypatch, capsys):
    """A failure that every rank meets (a NaN loss, a full disk) is one error event, not one per rank."""
    from lora_trainer.errors import UserError
    from lora_trainer.train_network import main
    from lora_trainer.training import trainer

    def fails(options, events, notes=(), started=None):
        raise UserError("the loss became nan at step 3")

    monkeypatch.setattr(trainer, "train", fails)
    arguments = ["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", str(tmp_path),
                 "--output_dir", str(tmp_path / "out"), "--output_name", "star"]
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(arguments) == 2
        assert "the loss became nan at step 3" in capsys.readouterr().err  # each rank says it on its console
    events, _ = read_events(tmp_path / "out" / "star.events.jsonl")
    assert [e["event"] for e in events] == ["warning", "error"]  # one error: rank 0's; rank 1's said with its rank
    assert events[0]["message"] == "process 1 of 2 stopped: the loss became nan at step 3" and events[0]["rank"] == 1


def test_when_another_process_stops_rank_0_says_so_instead_of_a_bug_to_report(tmp_path, monkeypatch, capsys):
    """Rank 1 ran out of memory (or timed out while rank 0 drew samples): rank 0's collective failed with gloo's
    "Connection closed by peer", which the stream called an unexpected error to report; rank 1's own message
    reached only its console."""
    from lora_trainer.train_network import main
    from lora_trainer.training import trainer

    def lost(options, events, notes=(), started=None):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                           "[127.0.0.1]:10126")

    monkeypatch.setattr(trainer, "train", lost)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", str(tmp_path),
                 "--output_dir", str(tmp_path / "out"), "--output_name", "star"]) == 2
    (error,) = [e for e in read_events(tmp_path / "out" / "star.events.jsonl")[0] if e["event"] == "error"]
    assert error["message"].startswith("process 0 of 2 lost the others (") and "please report" not in error["message"]
    assert "raise --ddp_timeout" in error["message"] and "continue from it with --resume" in error["message"]

