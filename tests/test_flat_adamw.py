"""FlatAdamW: torch's AdamW steps exactly, over flat tensors, and its states are torch's."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lora_trainer.errors import UserError
from lora_trainer.training.flat_adamw import FlatAdamW
from lora_trainer.training.optimizers import clip_grad_norm_, make_optimizer

SHAPES = [(4, 32), (32, 4), (4, 8, 1, 1), (8, 4, 1, 1), (16,)]


def parameters() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def two_groups(params, **settings) -> list[dict]:
    # the trainer's shape: text encoder and U-Net groups at their own rates
    return [{"params": params[:2], "lr": 1e-2, **settings}, {"params": params[2:], "lr": 3e-3, **settings}]


def train(optimizer, params, steps: int, missing=lambda step: set(), clip: float | None = None) -> None:
    """Steps with the same random gradients for any optimizer; ``missing(step)``: indices left without a gradient,
    as DyLoRA's untrained ranks and dropped modules are."""
    generator = torch.Generator().manual_seed(2)
    for step in range(steps):
        for index, parameter in enumerate(params):
            gradient = torch.randn(parameter.shape, generator=generator)
            parameter.grad = None if index in missing(step) else gradient
        if clip is not None:
            clip_grad_norm_(optimizer, params, clip)
        optimizer.step()
        optimizer.zero_grad()


def equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.detach(), y.detach()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("missing", [lambda step: set(), lambda step: {1, 3} if step % 3 == 2 else {step % 5},
                                     lambda step: {4}],
                         ids=["every-gradient", "some-missing", "one-never-trained"])
@pytest.mark.parametrize("settings", [{}, {"weight_decay": 0.1, "betas": (0.8, 0.95), "eps": 1e-6}, {"maximize": True}],
                         ids=["defaults", "arguments", "maximize"])
def test_steps_are_bit_identical_to_torch_adamw(settings, missing):
    ours, theirs = parameters(), parameters()
    flat = FlatAdamW(two_groups(ours), **settings)
    reference = torch.optim.AdamW(two_groups(theirs), foreach=False, **settings)
    train(flat, ours, 12, missing)
    train(reference, theirs, 12, missing)
    assert equal(ours, theirs)
    theirs, ours_state = reference.state_dict()["state"], flat.state_dict()["state"]
    assert theirs.keys() == ours_state.keys()  # a parameter never stepped has no state, as in torch
    for number, state in theirs.items():
        assert all(torch.equal(ours_state[number][key], value) for key, value in state.items())
    taken = [sum(index not in missing(step) for step in range(12)) for index in range(len(SHAPES))]
    assert {number: float(state["step"]) for number, state in ours_state.items()} == \
        {index: count for index, count in enumerate(taken) if count}  # a step without a gradient is not counted


def test_clipping_the_gathered_gradients_clips_like_torch():
    ours, theirs = parameters(), parameters()
    flat = FlatAdamW(two_groups(ours))
    train(flat, ours, 6, clip=0.5)
    reference = torch.optim.AdamW(two_groups(theirs), foreach=False)
    generator = torch.Generator().manual_seed(2)
    for _ in range(6):
        for parameter in theirs:
            parameter.grad = torch.randn(parameter.shape, generator=generator)
        torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        reference.step()
        reference.zero_grad()
    # the same clip; the global norm summed in another order differs in the last bits
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(ours, theirs))
    unclipped = parameters()
    train(FlatAdamW(two_groups(unclipped)), unclipped, 6)
    assert not all(torch.allclose(x, y, rtol=1e-5) for x, y in zip(ours, unclipped))


def test_a_state_moves_between_torch_adamw_and_flat_adamw_and_training_continues_the_same():
    straight = parameters()
    train(torch.optim.AdamW(two_groups(straight), foreach=False), straight, 10)

    first = parameters()
    torch_half = torch.optim.AdamW(two_groups(first), foreach=False)
    train(torch_half, first, 5)
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    flat = FlatAdamW(two_groups(second))
    flat.load_state_dict(torch_half.state_dict())
    train_from(flat, second, 5, 10)
    assert equal(second, straight)

    third = [torch.nn.Parameter(p.detach().clone()) for p in parameters()]
    flat_half = FlatAdamW(two_groups(third))
    train(flat_half, third, 5)
    fourth = [torch.nn.Parameter(p.detach().clone()) for p in third]
    back = torch.optim.AdamW(two_groups(fourth), foreach=False)
    back.load_state_dict(flat_half.state_dict())
    train_from(back, fourth, 5, 10)
    assert equal(fourth, straight)


def test_its_own_state_loaded_back_in_memory_keeps_the_moments_and_step_counts():
    """A state dict of FlatAdamW holds views of its flat tensors; loading one back into the same optimizer (no file
    in between) once zeroed them before reading them: the moments and step counts were lost."""
    straight = parameters()
    train(FlatAdamW(two_groups(straight)), straight, 10)
    params = parameters()
    optimizer = FlatAdamW(two_groups(params))
    train(optimizer, params, 5)
    optimizer.load_state_dict(optimizer.state_dict())
    assert [float(optimizer.state[p]["step"]) for p in params] == [5.0] * len(params)
    train_from(optimizer, params, 5, 10)
    assert equal(params, straight)


def train_from(optimizer, params, start: int, stop: int) -> None:
    """The steps ``start`` … ``stop - 1`` of ``train``'s gradient sequence."""
    generator = torch.Generator().manual_seed(2)
    for step in range(stop):
        gradients = [torch.randn(p.shape, generator=generator) for p in params]
        if step < start:
            continue
        for parameter, gradient in zip(params, gradients):
            parameter.grad = gradient
        optimizer.step()
        optimizer.zero_grad()


def test_a_parameter_whose_data_was_replaced_still_trains():
    params = parameters()
    optimizer = FlatAdamW(two_groups(params))
    params[0].data = params[0].data.clone() + 1  # e.g. a module moved or loaded by assignment after the optimizer was made
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    train(optimizer, params, 3)
    train(torch.optim.AdamW(two_groups(reference), foreach=False), reference, 3)
    assert equal(params, reference)


def test_make_optimizer_uses_it_where_torch_adamw_would_compute_the_same():
    def made(arguments, params=None):
        return make_optimizer("AdamW", two_groups(params or parameters()), 1e-4, arguments)

    assert type(made(["weight_decay=0.05", "betas=0.9,0.99"])) is FlatAdamW
    for arguments in (["amsgrad=True"], ["foreach=True"], ["fused=False"]):
        assert type(made(arguments)) is torch.optim.AdamW
    mixed = parameters()
    mixed[0] = torch.nn.Parameter(mixed[0].detach().half())  # one group with two dtypes cannot share a flat tensor
    assert type(made([], mixed)) is torch.optim.AdamW


def test_torch_adamw_is_fused_only_where_this_torch_has_the_kernel(monkeypatch):
    """The WebUI's torch 2.1 has no fused CPU AdamW: asking for it there failed the run before its first step."""
    amsgrad = ["amsgrad=True"]  # not FlatAdamW's: torch's AdamW
    fused_on_cpu = bool(make_optimizer("AdamW", two_groups(parameters()), 1e-4, amsgrad).defaults["fused"])
    assert fused_on_cpu is (torch.__version__ >= "2.4")
    for module in (sys.modules["torch.utils._foreach_utils"], sys.modules["torch.optim.optimizer"]):  # as in 2.1
        monkeypatch.setattr(module, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    assert not make_optimizer("AdamW", two_groups(parameters()), 1e-4, amsgrad).defaults["fused"]
    contradiction = ["fused=True", "differentiable=True"]  # torch's RuntimeError, in every version
    with pytest.raises(UserError, match="--optimizer_args 'fused=True differentiable=True': `fused` does not support"):
        make_optimizer("AdamW", two_groups(parameters()), 1e-4, contradiction)  # said, not a traceback


def test_it_does_not_import_torch_dynamo(tmp_path):
    # every torch optimizer's first call imports torch._dynamo, 1-2 s of a short run's start (or of its first save)
    code = ("import sys, torch\n"
            "from lora_trainer.training.flat_adamw import FlatAdamW\n"
            "p = torch.nn.Parameter(torch.ones(3))\n"
            "o = FlatAdamW([p]); p.grad = torch.ones(3); o.clip_grad_norm_(1.0); o.step(); o.zero_grad()\n"
            "o.load_state_dict(o.state_dict())\n"  # a state saved and resumed
            "print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
