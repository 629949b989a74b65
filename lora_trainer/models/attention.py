"""Multi-head attention on (batch, tokens, channels) tensors, shared by the UNet, text encoders and VAE.

SDPA is the default; xformers is used when it is installed and runs, the tensors are on CUDA and no mask is
needed, because its memory-efficient kernel is still the leanest on older consumer GPUs.
"""

from __future__ import annotations

import functools
import importlib.util
import platform
import sys

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


PROBE_SHAPE = (1, 8, 1, 64)  # the probe's query: (batch, tokens, heads, head width), a width every kernel takes


def xformers_problem(device: torch.device) -> str | None:
    """Why xformers cannot run attention on ``device``, or None when it can. A build made for another torch or Python
    imports with a warning and fails at its first call (PyPI's wheels target one torch each): found here, before a
    run loads anything, instead of as a traceback in the middle of it."""
    try:
        import xformers  # noqa: PLC0415 - optional extra
        import xformers.ops  # noqa: PLC0415

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        # forward and backward, whatever the caller's context: generation asks under no_grad
        with torch.inference_mode(False), torch.enable_grad():
            q = torch.zeros(PROBE_SHAPE, device=device, dtype=dtype, requires_grad=True)
            xformers.ops.memory_efficient_attention(q, q, q).sum().backward()
    except Exception as error:  # noqa: BLE001 - any failure means: not on this machine
        version = getattr(sys.modules.get("xformers"), "__version__", "")
        # xformers keeps why its compiled part did not load, with what it was built for
        failed_load = getattr(sys.modules.get("xformers._cpp_lib"), "_cpp_library_load_exception", None)
        build = getattr(failed_load, "build_info", None)
        if build is not None and (build.torch_version, build.python_version) != (torch.__version__, platform.python_version()):
            # the usual case, and then its kernel's complaint ("No operator found") says less
            return (f"xformers {version} was built for torch {build.torch_version} and Python {build.python_version} "
                    f"(this is torch {torch.__version__}, Python {platform.python_version()}), so its kernels do not "
                    f"load; install the xformers build made for torch {torch.__version__}")
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:160].rstrip(":")
        return f"xformers {version} cannot run here: {first_line}"
    return None


@functools.lru_cache(maxsize=None)
def _xformers_runs_on(device: torch.device) -> bool:
    return xformers_problem(device) is None


def _use_xformers(q: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> bool:
    if _backend == "sdpa" or not _XFORMERS_AVAILABLE or mask is not None or causal or not q.is_cuda:
        return False
    # unasked ("auto": generation), only a build that runs; asked (--xformers), the trainer has checked it
    return _backend == "xformers" or _xformers_runs_on(q.device)


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor | None:
    """xformers' kernel on (batch, tokens, heads, head width) views, or None for a shape that none of the installed
    build's kernels takes (its dispatcher refuses before computing: SDPA, the same attention, does it instead)."""
    import xformers.ops  # noqa: PLC0415 - optional extra

    batch, _, channels = q.shape
    kind = (channels // heads, q.dtype, q.requires_grad or k.requires_grad or v.requires_grad)
    if kind in _refused_by_xformers:  # asked once: the refusal lists every kernel's reasons, costly to build each call
        return None
    # every kernel wants the head width contiguous: the VAE's (B, C, H·W) → (B, H·W, C) transpose is not
    q, k, v = [t.reshape(batch, -1, heads, channels // heads).contiguous() for t in (q, k, v)]
    try:
        out = xformers.ops.memory_efficient_attention(q, k, v)
    except NotImplementedError:
        _refused_by_xformers.add(kind)
        return None
    return out.reshape(batch, -1, channels)


_refused_by_xformers: set[tuple[int, torch.dtype, bool]] = set()  # (head width, dtype, with gradients)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention. q: (B, Nq, C), k/v: (B, Nk, C); returns (B, Nq, C)."""
    if _use_xformers(q, mask, causal):
        out = _xformers_attention(q, k, v, heads)
        if out is not None:
            return out
    batch, _, channels = q.shape
    head_dim = channels // heads
    # lists, not generators: dynamo before torch 2.2 (the WebUI's 2.1) cannot unpack a generator without a graph break
    q, k, v = [t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return out.transpose(1, 2).reshape(batch, -1, channels)
