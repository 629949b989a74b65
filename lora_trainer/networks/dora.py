"""DoRA (Liu et al. 2024): a learned magnitude per output row (or input column) over the low-rank direction.

With V = W + s·ΔW (the underlying algorithm at multiplier 1), W' = V ⊙ (1 + m·(magnitude/‖V‖ − 1)).
The norm runs per output row when ``dora_scale`` is [out, 1, …] (LyCORIS's default since 3.2) and per input
column when it is [1, in, …] (the WebUI's convention). The multiplier interpolates the magnitude factor, as
LyCORIS's own forward does; the WebUI and ComfyUI instead blend W → W' linearly, which agrees only at m = 1,
and the WebUI always normalises over the input axis, which is wrong for output-axis files.
"""

from __future__ import annotations

import torch

from .registry import Delta, Modifier, Tensors, register_modifier


def column_norms(v: torch.Tensor, on_output: bool) -> torch.Tensor:
    axis = 0 if on_output else 1
    moved = v.transpose(0, axis)
    norms = moved.reshape(moved.shape[0], -1).norm(dim=1)
    shape = [1] * v.dim()
    shape[axis] = -1
    return norms.reshape(shape)


def apply(tensors: Tensors, weight: torch.Tensor, delta: Delta, multiplier: float) -> Delta:
    magnitude = tensors["dora_scale"]
    on_output = magnitude.shape[0] == weight.shape[0] and (magnitude.dim() < 2 or magnitude.shape[1] == 1)
    v = weight + delta.weight
    factor = magnitude.reshape(column_norms(v, on_output).shape) / (column_norms(v, on_output) + torch.finfo(v.dtype).eps)
    if multiplier != 1:
        factor = multiplier * (factor - 1) + 1
    return Delta(v * factor - weight, delta.bias)


def init_magnitude(weight: torch.Tensor, on_output: bool) -> torch.Tensor:
    """The base weight's own norms, so that W' = W at step 0; [out, 1, …] or [1, in, …] as the axis says."""
    return column_norms(weight.float(), on_output)


register_modifier(Modifier("dora", frozenset({"dora_scale"}), apply))
