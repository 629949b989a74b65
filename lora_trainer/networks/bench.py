"""``python -m lora_trainer bench networks``: merging LoRA/LoHa/LoKr into a full-size SD1.5 of random weights.

Prints the time to apply each network merged, to change its strength, to restore, and the memory it holds.
"""

from __future__ import annotations

import gc

import torch

from ..bench import timed
from ..process_memory import rss_mib
from ..models.checkpoint import build_models
from ..models.configs import SD1
from .apply import MergedNetworks, Strength
from .files import group_tensors
from .network import create_network
from .spec import NetworkSpec

CASES = {
    "LoRA rank 32": NetworkSpec(dim=32, alpha=16),
    "LoHa rank 16": NetworkSpec(algorithm="loha", dim=16, alpha=8),
    "LoKr factor 8 rank 16": NetworkSpec(algorithm="lokr", dim=16, alpha=8, factor=8),
}




def _random_model(dtype: torch.dtype):
    unet, text_encoders, _ = build_models(SD1)
    generator = torch.Generator().manual_seed(0)
    for module in (unet, *text_encoders):
        module.to_empty(device="cpu")
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        module.to(dtype)
    return unet, text_encoders


def run(dtype: str = "fp16") -> None:
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    unet, text_encoders = _random_model(torch_dtype)
    rss = rss_mib()  # None on macOS
    print(f"SD1.5 of random {dtype} weights on CPU, {torch.get_num_threads()} threads; model RSS "
          f"{'unknown' if rss is None else f'{rss:.0f} MiB'}", flush=True)
    for label, spec in CASES.items():
        network = create_network(SD1, unet, text_encoders, spec)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
        file = group_tensors({k: v.detach().to(torch_dtype) for k, v in network.state_dict().items()})
        del network
        gc.collect()
        merged = MergedNetworks.for_model(SD1, unet, text_encoders)
        # The fit check computes each ΔW on the meta device, where torch 2.13 (not the WebUI's 2.1 nor Forge's 2.3)
        # imports torch._dynamo at the first out-of-place arithmetic (LoHa's and LoKr's products, not LoRA's in-place
        # scale): once per process. A network is checked once; the apply after it reuses the check.
        check = timed(lambda: merged.check(file))
        apply = timed(lambda: merged.set_networks([(file, Strength(1.0))]))
        held = merged.held_bytes() / 2**20
        change = timed(lambda: merged.set_networks([(file, Strength(0.5))]))
        block_change = timed(lambda: merged.set_networks([(file, Strength(0.5, 0.8))]))
        restore = timed(merged.restore)
        gc.collect()
        print(f"{label} ({len(file.modules)} modules): check {check:.2f} s, apply {apply:.2f} s, strength change {change:.2f} s "
              f"(unet only {block_change:.2f} s), restore {restore:.2f} s, held while applied {held:.0f} MiB (original weights + cached deltas)", flush=True)
