"""What differs between the torch versions the hosts install: the WebUI 1.10 pins torch 2.1.2, Forge 2.3.1, and this
project is developed and tested on 2.13. Each name here is the newer API, or its older spelling."""

from __future__ import annotations

import contextlib

import torch

try:
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode
except ImportError:  # torch < 2.2
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    def is_in_torch_dispatch_mode() -> bool:
        return _get_current_dispatch_mode() is not None


# torch.compiler.is_compiling: 2.3; before it, torch._utils.is_compiling, which dynamo patches the same way
is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._utils.is_compiling

# dynamo before 2.2 carries every guard along through every traced value, so tracing time grows with the square of the
# guards: an SD1 UNet with a LoRA took 8 minutes under 2.1.2 on a 2-core CPU (46 s without it; 21 s under 2.3.1)
DYNAMO_TRACES_SLOWLY = torch.__version__ < "2.2"  # TorchVersion compares as a version: 2.1.2+cu121 < 2.2

OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: 2.5

SCALES_LOSS_ON_CPU = hasattr(torch.amp, "GradScaler")  # torch.amp.GradScaler("cpu"): 2.3
if SCALES_LOSS_ON_CPU:
    GradScaler = torch.amp.GradScaler
else:  # torch < 2.3: CUDA's scaler, which takes no device (fp16 is trained on CUDA only here)
    class GradScaler(torch.cuda.amp.GradScaler):
        def __init__(self, device: str = "cuda", **kwargs):
            super().__init__(**kwargs)


def autocast(device_type: str, dtype: torch.dtype):
    """Mixed precision in ``dtype``, or nothing for fp32: torch < 2.3 refuses even a disabled CPU autocast in fp32."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` now, None where it is off (per-device calls: torch 2.4)."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def has_fused_kernels(device_types: set[str]) -> bool:
    """Whether torch has fused optimizer kernels (``AdamW(fused=True)``) for every one of these device types: CUDA
    throughout, the CPU since torch 2.4."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return False
    return device_types <= set(_get_fused_kernels_supported_devices())


def native_bf16() -> bool:
    """The GPU computes bf16 itself (not emulated); torch 2.1 (the WebUI's) takes no argument and checks just that."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return torch.cuda.is_bf16_supported()
