"""``--fp8_base``: the frozen base model's Linear and Conv2d weights stored in float8 (e4m3), computed in the
activations' precision.

A LoRA run never updates the base weights, so they only need to be read: one byte per weight instead of two halves
the memory of an SDXL UNet (5.1 → 2.6 GB). Each layer upcasts its weight for its own matmul, so the math runs in
fp16/bf16 (or fp32 on a CPU) and only the storage is 8-bit. Norms, embeddings and biases keep their precision, as
sd-scripts keeps the text encoder's embeddings. The network's hooks add their change to the layer's output as
before; algorithms that read the base weight (DoRA, OFT, …) upcast it to fp32 themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import autocast_dtype
from .common import Conv2d, PointwiseConv2d

FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8).max  # 448: e4m3fn has no infinity, a larger value would become NaN


def to_fp8(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().clamp(-_FP8_MAX, _FP8_MAX).to(FP8)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return autocast_dtype(x.device.type) or x.dtype


class _LinearOnFp8(torch.autograd.Function):
    """``F.linear`` with a frozen fp8 weight upcast for the product, keeping the fp8 weight (not the upcast copy) for
    the input's gradient: otherwise every frozen layer is held twice until backward, in fp8 and in 16 bits, and
    ``--fp8_base`` without gradient checkpointing uses more memory than no fp8 at all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad.matmul(weight.to(grad.dtype)), None, None  # base weights and biases are frozen


class _ConvOnFp8(torch.autograd.Function):
    """A convolution with a frozen fp8 weight, keeping the fp8 weight for the input's gradient (see ``_LinearOnFp8``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: nn.Conv2d) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.input_shape, ctx.layer = x.shape, layer
        return layer._conv_forward(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        layer = ctx.layer
        grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, weight.to(grad.dtype), grad, layer.stride,
                                                layer.padding, layer.dilation, layer.groups)
        return grad_input, None, None, None


class Fp8Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearOnFp8.apply(x.to(_compute_dtype(x)), self.weight, self.bias)


class Fp8Conv2d(Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":  # padding modes pad first: the upcast path, its copy kept for backward
            dtype = _compute_dtype(x)
            return super()._conv_forward(x.to(dtype), self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))
        return _ConvOnFp8.apply(x.to(_compute_dtype(x)), self.weight, self.bias, self)


_FP8_CLASS = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d, Conv2d: Fp8Conv2d, PointwiseConv2d: Fp8Conv2d}


def store_in_fp8(model: nn.Module) -> int:
    """Every Linear/Conv2d of ``model`` (our 1×1 ``PointwiseConv2d`` too) keeps its weight in fp8 from now on; returns the bytes saved.

    The layers stay the same objects (their class becomes the fp8 subclass), so names, hooks and state-dict keys
    are unchanged.
    """
    saved = 0
    for layer in model.modules():
        fp8_class = _FP8_CLASS.get(type(layer))
        if fp8_class is None:
            continue
        weight = layer.weight
        saved += weight.numel() * (weight.element_size() - 1)
        layer.weight = nn.Parameter(to_fp8(weight), requires_grad=False)
        layer.__class__ = fp8_class
    return saved
