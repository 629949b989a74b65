"""xformers' path, through a stand-in for its kernel: xformers runs on CUDA only and no build of it installs beside
the CPU torch here. tests/test_cuda.py runs the real one where a lent GPU has a matching build."""

from __future__ import annotations

import platform
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lora_trainer.models import attention
from lora_trainer.training.options import options_from
from lora_trainer.training.trainer import choose_attention


@pytest.fixture
def kernel_calls(monkeypatch) -> list[tuple]:
    """An installed "xformers 0.0.99" whose kernel is SDPA on xformers' (batch, tokens, heads, width) layout and, like
    every real kernel, refuses a head width that is not contiguous; returns the strides it was given."""
    calls = []

    def memory_efficient_attention(q, k, v):
        calls.append(tuple(t.stride(-1) for t in (q, k, v)))
        if any(t.stride(-1) != 1 for t in (q, k, v)):
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`: query.stride(-1) > 1")
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    install_fake_xformers(monkeypatch, memory_efficient_attention)
    return calls


def install_fake_xformers(monkeypatch, kernel) -> None:
    package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    package.__version__, package.ops, ops.memory_efficient_attention = "0.0.99", ops, kernel
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(attention, "_XFORMERS_AVAILABLE", True)
    monkeypatch.setattr(attention, "_backend", attention._backend)  # restored after the test


def sdpa(q, k, v, heads):
    attention.set_attention_backend("sdpa")
    return attention.attention(q, k, v, heads)


def test_the_vaes_transposed_tokens_reach_xformers_contiguous(kernel_calls):
    """The VAE's attention sees (B, C, H·W) features as (B, H·W, C): a transpose. Passed as they were, every xformers
    kernel refused them ("query.stride(-1) > 1"), so --xformers failed while caching latents, on a working build."""
    features = torch.randn(1, 32, 64)  # channels, pixels
    tokens = features.transpose(1, 2)  # (1, 64 tokens, 32 channels), not contiguous
    out = attention._xformers_attention(tokens, tokens, tokens, 1)
    assert kernel_calls == [(1, 1, 1)] and out is not None
    assert torch.allclose(out, sdpa(tokens, tokens, tokens, 1), atol=1e-6)


def test_a_shape_no_xformers_kernel_takes_runs_in_sdpa(monkeypatch):
    """xformers' dispatcher refuses some shapes (a 512-wide head on a build with flash kernels only) before computing:
    that call runs in SDPA, the same attention, instead of stopping the run; the shape is not offered again."""
    asked = []

    def refuses(q, k, v):
        asked.append(q.shape[-1])
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs")

    install_fake_xformers(monkeypatch, refuses)
    monkeypatch.setattr(attention, "_refused_by_xformers", set())
    monkeypatch.setattr(attention, "_use_xformers", lambda q, mask, causal: True)  # as on a GPU
    q, k, v = torch.randn(3, 2, 16, 64)
    for _ in range(3):
        assert torch.allclose(attention.attention(q, k, v, 4), sdpa(q, k, v, 4), atol=1e-6)
    assert asked == [16]  # once for 16-wide heads in fp32 without gradients
    attention.attention(q, k, v, 2)
    assert asked == [16, 32]  # another width is asked


def test_an_xformers_build_that_cannot_run_is_found_before_the_run_and_said(monkeypatch):
    """PyPI's xformers wheels are each made for one torch: another torch imports them with a warning, and their first
    call fails. Found by a probe at the start, --xformers gives way to SDPA with the reason instead of a traceback."""
    def broken(q, k, v):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore detail")

    install_fake_xformers(monkeypatch, broken)
    problem = attention.xformers_problem(torch.device("cpu"))
    assert problem == "xformers 0.0.99 cannot run here: CUDA error: no kernel image is available for execution on the device"
    options = options_from({"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d", "xformers": True})
    monkeypatch.setattr("lora_trainer.training.trainer.xformers_problem", lambda device: problem)
    warnings = choose_attention(options, torch.device("cuda"))
    assert attention._backend == "sdpa"
    assert warnings == [f"--xformers: {problem}. Attention uses SDPA instead (PyTorch's own kernel, the same attention)"]


def test_a_build_for_another_torch_is_named_with_what_it_was_built_for(monkeypatch):
    """What xformers itself keeps when its compiled part does not load (xformers._cpp_lib), as PyPI's 0.0.35 (torch
    2.10, Python 3.10) did under a lent GPU's torch 2.11 and Python 3.12: every kernel then answers "No operator
    found", which tells the user less than the versions do."""
    def no_operator(q, k, v):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n query")

    install_fake_xformers(monkeypatch, no_operator)
    cpp_lib = types.ModuleType("xformers._cpp_lib")
    cpp_lib._cpp_library_load_exception = types.SimpleNamespace(
        build_info=types.SimpleNamespace(torch_version="2.10.0+cu128", python_version="3.10.19"))
    monkeypatch.setitem(sys.modules, "xformers._cpp_lib", cpp_lib)
    problem = attention.xformers_problem(torch.device("cpu"))
    assert problem == ("xformers 0.0.99 was built for torch 2.10.0+cu128 and Python 3.10.19 (this is torch "
                       f"{torch.__version__}, Python {platform.python_version()}), so its kernels do not load; install "
                       f"the xformers build made for torch {torch.__version__}")
    kernel_said = "xformers 0.0.99 cannot run here: No operator found for `memory_efficient_attention_forward` with inputs"
    # a record naming this very torch and Python: the versions are not the cause, so they are not blamed
    cpp_lib._cpp_library_load_exception.build_info = types.SimpleNamespace(
        torch_version=torch.__version__, python_version=platform.python_version())
    assert attention.xformers_problem(torch.device("cpu")) == kernel_said
    monkeypatch.delitem(sys.modules, "xformers._cpp_lib")  # no record: the kernel's own first line
    assert attention.xformers_problem(torch.device("cpu")) == kernel_said


def test_generation_under_no_grad_finds_a_working_build_working(kernel_calls):
    """The standalone app draws under torch.no_grad (and the WebUI under inference mode): the probe's backward must not
    fail there, or a working xformers would be taken for a broken one for the rest of the process."""
    with torch.no_grad():
        assert attention.xformers_problem(torch.device("cpu")) is None
    with torch.inference_mode():
        assert attention.xformers_problem(torch.device("cpu")) is None
    assert len(kernel_calls) == 2


def test_a_working_xformers_build_is_used_when_asked(kernel_calls, monkeypatch):
    assert attention.xformers_problem(torch.device("cpu")) is None and kernel_calls  # the probe ran the kernel
    options = options_from({"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d", "xformers": True})
    monkeypatch.setattr("lora_trainer.training.trainer.xformers_problem", lambda device: None)  # the GPU's answer
    assert choose_attention(options, torch.device("cuda")) == [] and attention._backend == "xformers"
