"""The trainer's GPU paths on a real CUDA device: each mixed precision, --fp8_base, gradient checkpointing, SDXL with
cached text-encoder outputs, xformers (where it is installed), the out-of-memory advice and NCCL's collectives.

Skipped where PyTorch sees no CUDA GPU (CI and the 2-core development machines have none): ``.ci/device-check`` runs
them on a lent GPU. The CPU suite covers the same options' logic; these check that the CUDA kernels, autocast and the
grad scaler do what the CPU cannot show.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import test_training
from safetensors.torch import load_file

from lora_trainer.bench import write_random_checkpoint
from lora_trainer.models import attention as attention_module
from lora_trainer.models.configs import SDXL
from lora_trainer.tiny_model.build import TINY_MODEL_PATH, tiny_like
from lora_trainer.train_network import main as train_main
from lora_trainer.training.distributed import World, agree_on_command, agree_on_seed, finish, sum_gradients
from lora_trainer.training.events import read_events

dataset = test_training.dataset  # the fixture: the sample dataset under a CJK path with spaces, 2 repeats

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: .ci/device-check runs these on one")


def train(dataset: Path, out: Path, *extra: str, model: Path = TINY_MODEL_PATH) -> tuple[int, list[dict]]:
    code = train_main([
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(dataset), "--output_dir", str(out),
        "--output_name", "star", "--resolution", "64", "--train_batch_size", "4", "--network_module", "networks.lora",
        "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3", "--max_train_epochs", "2",
        "--cache_latents", "--seed", "3", "--caption_extension", ".txt", "--max_data_loader_n_workers", "0",
        "--device", "cuda", *extra,
    ])
    events, _ = read_events(out / "star.events.jsonl")
    return code, events


def learned(out: Path) -> torch.Tensor:
    """Everything the run learned, as one vector: the up factors start at zero, so they are the change itself."""
    weights = load_file(str(out / "star.safetensors"))
    return torch.cat([weights[k].float().flatten() for k in sorted(weights) if k.endswith("lora_up.weight")])


def losses(events: list[dict]) -> list[float]:
    return [e["loss"] for e in events if e["event"] == "step" and "loss" in e]


@pytest.fixture(scope="module")
def fp32_run(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp32")
    code, events = train(dataset, out, "--mixed_precision", "no")
    assert code == 0 and events[0]["device"] == "cuda:0"
    return out


@pytest.mark.parametrize("precision", [
    ["--mixed_precision", "fp16"],  # autocast and the grad scaler
    ["--mixed_precision", "bf16"],
    ["--mixed_precision", "bf16", "--full_bf16"],
    ["--mixed_precision", "fp16", "--full_fp16", "--optimizer_type", "Lion", "--learning_rate", "1e-4"],
], ids=["fp16", "bf16", "full_bf16", "full_fp16"])
def test_each_mixed_precision_learns_what_fp32_learns_on_the_gpu(dataset, fp32_run, tmp_path, precision):
    code, events = train(dataset, tmp_path, *precision)
    assert code == 0, [e for e in events if e["event"] == "error"]
    assert len(losses(events)) == 16 and all(0 < loss < 10 for loss in losses(events))
    change, reference = learned(tmp_path), learned(fp32_run)
    assert change.isfinite().all() and change.abs().max() > 0
    if "Lion" not in precision:  # same optimizer and learning rate: the same direction, up to rounding
        assert torch.cosine_similarity(change, reference, dim=0) > 0.8


def test_fp8_base_keeps_the_frozen_weights_in_fp8_and_starts_from_the_same_loss(dataset, tmp_path):
    code, bf16 = train(dataset, tmp_path / "bf16", "--mixed_precision", "bf16")
    assert code == 0
    code, fp8 = train(dataset, tmp_path / "fp8", "--mixed_precision", "bf16", "--fp8_base")
    assert code == 0, [e for e in fp8 if e["event"] == "error"]
    assert fp8[0]["fp8_saved_mib"] > 0
    # the same seed draws the same noise: only the base weights' rounding differs at the first step
    assert losses(fp8)[0] == pytest.approx(losses(bf16)[0], rel=0.1)
    assert learned(tmp_path / "fp8").isfinite().all()


def test_gradient_checkpointing_learns_the_same_weights_on_the_gpu(dataset, fp32_run, tmp_path):
    code, events = train(dataset, tmp_path, "--mixed_precision", "no", "--gradient_checkpointing")
    assert code == 0, [e for e in events if e["event"] == "error"]
    assert torch.cosine_similarity(learned(tmp_path), learned(fp32_run), dim=0) > 0.99


def test_sdxl_with_cached_text_encoder_outputs_trains_in_bf16_on_the_gpu(dataset, tmp_path):
    model = write_random_checkpoint(tiny_like(SDXL), tmp_path / "tiny sdxl.safetensors")
    code, events = train(dataset, tmp_path / "out", "--mixed_precision", "bf16", "--network_train_unet_only",
                         "--cache_text_encoder_outputs", model=model)
    assert code == 0, [e for e in events if e["event"] == "error"]
    assert events[0]["model"] == "SDXL" and all(0 < loss < 10 for loss in losses(events))
    assert any(key.startswith("lora_unet_") for key in load_file(str(tmp_path / "out" / "star.safetensors")))


needs_xformers = pytest.mark.skipif(not attention_module.xformers_installed(),
                                    reason="needs xformers: .ci/device-check installs the wheel it carries")


@pytest.fixture
def xformers_calls(monkeypatch) -> list[tuple]:
    """Each call of xformers' kernel, by query shape and dtype: proof that --xformers ran it, not SDPA."""
    import xformers.ops

    kernel, calls = xformers.ops.memory_efficient_attention, []

    def counted(q, k, v, *args, **kwargs):
        out = kernel(q, k, v, *args, **kwargs)
        calls.append((tuple(q.shape), q.dtype))  # the calls that ran (a build for another torch fails each)
        return out

    monkeypatch.setattr(xformers.ops, "memory_efficient_attention", counted)
    yield calls
    attention_module.set_attention_backend("auto")


@pytest.fixture
def working_xformers() -> None:
    problem = attention_module.xformers_problem(torch.device("cuda"))
    if problem:  # PyPI's wheels are each made for one torch: the test below shows what --xformers does then
        pytest.skip(problem)


@needs_xformers
@pytest.mark.usefixtures("working_xformers")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("tokens, context, channels, heads", [
    (4096, 4096, 320, 8),  # SD1.5's first self-attention at 512 px (head 40)
    (1024, 77, 640, 10),  # SDXL's cross-attention to the prompt (head 64)
    (256, 77, 1280, 20),  # SD2's deepest (head 64)
    (256, 256, 32, 4),  # the tiny model's (heads of 8, 16 and 24 channels)
], ids=["sd15-self", "sdxl-cross", "sd2-cross", "tiny"])
def test_xformers_attention_equals_sdpa_forward_and_backward(xformers_calls, dtype, tokens, context, channels, heads):
    generator = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, n, channels, device="cuda", dtype=dtype, generator=generator) for n in (tokens, context, context))
    # a random upstream gradient: the gradient of a mean over millions of outputs underflows in half precision
    upstream = torch.randn(2, tokens, channels, device="cuda", dtype=dtype, generator=generator)
    results = {}
    for backend in ("xformers", "sdpa"):
        attention_module.set_attention_backend(backend)
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention_module.attention(*inputs, heads)
        out.backward(upstream)
        results[backend] = [out.float(), *(t.grad.float() for t in inputs)]
    assert xformers_calls == [((2, tokens, heads, channels // heads), dtype)]
    output_tolerance = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}[dtype]
    gradient_tolerance = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-3}[dtype]
    for index, (ours, sdpa) in enumerate(zip(results["xformers"], results["sdpa"])):
        tolerance = output_tolerance if index == 0 else gradient_tolerance
        assert sdpa.abs().max() > 0 and (ours - sdpa).abs().max() <= tolerance * sdpa.abs().max()


@needs_xformers
@pytest.mark.usefixtures("working_xformers")
def test_the_vae_attention_of_latent_caching_runs_in_xformers(xformers_calls):
    """The VAE's single head of 512 channels, without gradients (the encoder only caches latents), on its transposed
    (B, C, H·W) → (B, H·W, C) tokens, which xformers takes only made contiguous."""
    attention_module.set_attention_backend("xformers")
    q = torch.randn(1, 512, 64 * 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    with torch.no_grad():
        ours = attention_module.attention(q, q, q, 1)
        attention_module.set_attention_backend("sdpa")
        sdpa = attention_module.attention(q, q, q, 1)
    assert len(xformers_calls) == 1 and (ours.float() - sdpa.float()).abs().max() <= 2e-2 * sdpa.float().abs().max()


@needs_xformers
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_xformers_training_learns_what_sdpa_learns(dataset, tmp_path, xformers_calls, precision):
    code, sdpa_events = train(dataset, tmp_path / "sdpa", "--mixed_precision", precision, "--sdpa")
    assert code == 0 and not xformers_calls  # --sdpa keeps an installed xformers out
    problem = attention_module.xformers_problem(torch.device("cuda"))
    code, events = train(dataset, tmp_path / "xformers", "--mixed_precision", precision, "--xformers")
    assert code == 0, [e for e in events if e["event"] == "error"]
    said = [e["message"] for e in events if e["event"] == "warning" and "xformers" in e["message"]]
    in_the_model = {dtype for shape, dtype in xformers_calls if shape != attention_module.PROBE_SHAPE}  # not the probes'
    if problem:  # a build for another torch: said at the start, and the run is SDPA's
        assert said == [f"--xformers: {problem}. Attention uses SDPA instead (PyTorch's own kernel, the same attention)"]
        assert not in_the_model
    else:
        assert not said and DTYPES[precision] in in_the_model  # the UNet's, under autocast
    assert losses(events)[0] == pytest.approx(losses(sdpa_events)[0], rel=0.05)  # the same noise, the same start
    change, reference = learned(tmp_path / "xformers"), learned(tmp_path / "sdpa")
    assert change.isfinite().all() and torch.cosine_similarity(change, reference, dim=0) > 0.9


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def test_running_out_of_gpu_memory_names_the_options_that_lower_memory(dataset, tmp_path, capsys):
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(2**20 / total)  # 1 MiB: the first weights overflow it
    try:
        code, events = train(dataset, tmp_path, "--mixed_precision", "no")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert code == 2
    message = capsys.readouterr().err
    assert "out of CUDA memory" in message and "--gradient_checkpointing" in message and "--mixed_precision bf16" in message
    assert events[-1]["event"] == "error" and "--gradient_checkpointing" in events[-1]["message"]


def _nccl_rank(rank: int, size: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    # a rank left waiting fails the test in a minute instead of hanging it
    dist.init_process_group("nccl", init_method=f"file://{init_file}", timeout=timedelta(minutes=1), rank=rank, world_size=size)
    # a World of at least 2 takes the distributed path even on a one-GPU machine, where NCCL allows one rank only
    world = World(rank, max(size, 2))
    parameters = [torch.nn.Parameter(torch.zeros(3, 2, device="cuda")),
                  torch.nn.Parameter(torch.zeros(4, device="cuda", dtype=torch.bfloat16))]
    parameters[0].grad = torch.arange(6.0, device="cuda").reshape(3, 2) * (rank + 1)
    parameters[1].grad = torch.full((4,), 0.5 * (rank + 1), device="cuda", dtype=torch.bfloat16)
    sum_gradients(world, parameters)
    seed = agree_on_seed(world, 1234 if rank == 0 else 99)  # CPU tensors travel through the GPU for NCCL
    command = agree_on_command(world, "save" if rank == 0 else None, signalled=False)
    torch.save({"grads": [p.grad.cpu() for p in parameters], "seed": seed, "command": command}, f"{out}/{rank}.pt")
    finish(world)


def test_nccl_sums_gradients_and_shares_rank_0s_decisions(tmp_path):
    size = min(2, torch.cuda.device_count())
    torch.multiprocessing.spawn(_nccl_rank, args=(size, str(tmp_path / "init"), str(tmp_path)), nprocs=size)
    total = sum(rank + 1 for rank in range(size))
    for rank in range(size):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(result["grads"][0], torch.arange(6.0).reshape(3, 2) * total)
        assert result["grads"][1].dtype == torch.bfloat16
        assert torch.equal(result["grads"][1], torch.full((4,), 0.5 * total, dtype=torch.bfloat16))
        assert result["seed"] == 1234 and result["command"] == "save"
