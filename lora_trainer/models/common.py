"""Small pieces every model shares: gradient checkpointing, dtype helpers."""

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
