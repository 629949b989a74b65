"""Small pieces every model shares: gradient checkpointing, convolutions that pick their CPU kernel, dtype helpers."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.utils.checkpoint import checkpoint

from ..compat import is_compiling, is_in_torch_dispatch_mode


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


# A CPU convolution whose im2col buffer (batch × input channels × kernel area × output pixels) holds fewer elements than
# this is cheaper through torch's own im2col + matrix product than through oneDNN, whose per-call setup (≈ 0.1–0.15 ms)
# outweighs the arithmetic: a small model's 3×3 convolutions at 16×16 pixels and below, forward and backward (measured
# on x86_64 with AVX2, torch 2.13: the reference training run's step 5–11 % faster). Larger ones stay on oneDNN. Above
# a batch of 2 the bound halves with each doubling: torch's kernel unfolds one sample at a time, so its cost grows with
# the batch where oneDNN's setup does not (8 images with guidance, a batch of 16, generated 16 % slower at 2**18; per
# shape, forward and backward, the crossing lay at 2**17 for a batch of 4 and 2**16 for 8).
IM2COL_BELOW = 2**18


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> torch.Tensor:
    """``F.conv2d``, with a small fp32 convolution on the CPU computed by torch's im2col kernel (see ``IM2COL_BELOW``).
    Compiling, FLOP counting and fake tensors see the plain convolution, which they know."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and groups == 1 and not isinstance(padding, str)
            and _pair(dilation) == (1, 1) and torch.backends.mkldnn.enabled and not is_compiling()
            and not is_in_torch_dispatch_mode()):
        kernel, stride, padding = weight.shape[2:], _pair(stride), _pair(padding)
        rows = (x.shape[2] + 2 * padding[0] - kernel[0]) // stride[0] + 1
        columns = (x.shape[3] + 2 * padding[1] - kernel[1]) // stride[1] + 1
        batch = x.shape[0]
        if batch * x.shape[1] * kernel[0] * kernel[1] * rows * columns < IM2COL_BELOW * 2 // max(batch, 2):
            return torch._C._nn.thnn_conv2d(x, weight, kernel, bias, stride, padding)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same weights, names and result) whose small CPU convolutions take the cheaper kernel (``conv2d``)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super()._conv_forward(x, weight, bias)
        return conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


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
