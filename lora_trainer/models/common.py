"""Small pieces every model shares: gradient checkpointing, 1×1 convolutions, dtype helpers."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointedModel(nn.Module):
    """A model whose blocks may be recomputed in the backward pass to save memory (``gradient_checkpointing``)."""

    gradient_checkpointing: bool = False

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def run_block(self, block: Callable[..., torch.Tensor], *args):
        """Call ``block(*args)``, recomputing its activations in backward when checkpointing is on and gradients flow.

        Not tied to ``training``: a LoRA run keeps the base model in eval mode and still needs the memory saving.
        """
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


class PointwiseConv2d(nn.Conv2d):
    """A 1×1 convolution computed as a matrix product over the channels: the same weight, name and result, without a
    convolution's per-call setup, which costs more than the arithmetic on small feature maps (half the time on a CPU)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_conv2d(x, self.weight, self.bias)


def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1×1 ``weight`` (stride 1, no padding, or given as a matrix) as a matrix
    product over the channels."""
    weight = weight.flatten(1)  # a matrix stays itself: no autograd node
    pixels = x.flatten(2)  # (batch, channels, height·width)
    if bias is None:
        out = torch.matmul(weight, pixels)
    else:
        out = torch.baddbmm(bias[:, None], weight.expand(len(x), -1, -1), pixels)
    return out.unflatten(2, x.shape[2:])


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp16' / 'float16' / torch.float16 -> torch.float16, with a clear message for anything else."""
    if isinstance(name, torch.dtype):
        return name
    aliases = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown precision {name!r}: use fp32, fp16 or bf16")
    return DTYPES[key]
