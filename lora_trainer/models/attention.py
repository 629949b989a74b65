"""Multi-head attention on (batch, tokens, channels) tensors, shared by the UNet, text encoders and VAE.

SDPA is the default; xformers is used when it is installed, the tensors are on CUDA and no mask is needed,
because its memory-efficient kernel is still the leanest on older consumer GPUs.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

_XFORMERS_AVAILABLE = importlib.util.find_spec("xformers") is not None
_backend = "auto"  # "auto" | "sdpa" | "xformers"


def xformers_installed() -> bool:
    return _XFORMERS_AVAILABLE


def set_attention_backend(name: str) -> None:
    """Choose "auto", "sdpa" or "xformers" for every attention call in the process."""
    global _backend
    if name not in ("auto", "sdpa", "xformers"):
        raise ValueError(f"unknown attention backend {name!r}: use auto, sdpa or xformers")
    if name == "xformers" and not _XFORMERS_AVAILABLE:
        raise ValueError("attention backend 'xformers' was asked for but xformers is not installed")
    _backend = name


def _use_xformers(q: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> bool:
    if _backend == "sdpa" or not _XFORMERS_AVAILABLE or mask is not None or causal:
        return False
    return q.is_cuda


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention. q: (B, Nq, C), k/v: (B, Nk, C); returns (B, Nq, C)."""
    batch, _, channels = q.shape
    head_dim = channels // heads
    if _use_xformers(q, mask, causal):
        import xformers.ops  # noqa: PLC0415 - optional extra

        q, k, v = [t.reshape(batch, -1, heads, head_dim) for t in (q, k, v)]
        out = xformers.ops.memory_efficient_attention(q, k, v)
        return out.reshape(batch, -1, channels)
    # lists, not generators: dynamo before torch 2.2 (the WebUI's 2.1) cannot unpack a generator without a graph break
    q, k, v = [t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return out.transpose(1, 2).reshape(batch, -1, channels)
