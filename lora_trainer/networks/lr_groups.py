"""The optimizer's parameter groups for a network, as sd-scripts builds them.

Text encoders get ``text_encoder_lr`` (else the base learning rate), the UNet ``unet_lr``; block-wise learning
rates (``down_lr_weight``, ``mid_lr_weight``, ``up_lr_weight`` in network_args) split the UNet into one group
per block (a layer outside the blocks stays in ``unet`` at weight 1); LoRA+ puts the ``lora_up`` weights of a side
(not LyCORIS DyLoRA's, as in LyCORIS) into their own group with a multiplied rate. A group
whose rate is 0 or None is dropped, so ``text_encoder_lr=0`` trains the UNet only.
"""

from __future__ import annotations

import math

from ..errors import UserError

PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def _preset(name_with_base: str, length: int) -> list[float]:
    name, _, base = name_with_base.partition("+")
    base = float(base) if base else 0.0
    steps = range(length)
    if name == "cosine":
        return [math.sin(math.pi * (i / (length - 1)) / 2) + base for i in reversed(steps)]
    if name == "sine":
        return [math.sin(math.pi * (i / (length - 1)) / 2) + base for i in steps]
    if name == "linear":
        return [i / (length - 1) + base for i in steps]
    if name == "reverse_linear":
        return [i / (length - 1) + base for i in reversed(steps)]
    if name == "zeros":
        return [base] * length
    raise UserError(f"block learning-rate weight {name_with_base!r}: use numbers or one of {', '.join(PRESETS)} (optionally +base)")


def _values(text: str | None, length: int) -> list[float] | None:
    if text is None:
        return None
    if text.split("+")[0] in PRESETS:
        values = _preset(text, length)
    else:
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise UserError(f"block learning-rate weights {text!r}: comma-separated numbers or a preset ({', '.join(PRESETS)})") from None
    # sd-scripts: too long is cut, too short is padded with 1.0
    return (values + [1.0] * length)[:length]


def block_lr_weights(network_args: dict[str, str], blocks_per_side: int, middle_parts: int, sdxl_layout: bool) -> list[float] | None:
    """Per-block multipliers in sd-scripts' block order (SD: 12 down, 1 mid, 12 up; SDXL: 1, 9, 3, 9, 1), or None."""
    down = _values(network_args.get("down_lr_weight"), blocks_per_side)
    mid = _values(network_args.get("mid_lr_weight"), middle_parts)
    up = _values(network_args.get("up_lr_weight"), blocks_per_side)
    if down is None and mid is None and up is None:
        return None
    threshold = float(network_args.get("block_lr_zero_threshold", 0.0))
    weights = [w if w > threshold else 0.0 for w in (down or [1.0] * blocks_per_side) + (mid or [1.0] * middle_parts) + (up or [1.0] * blocks_per_side)]
    return [1.0, *weights, 1.0] if sdxl_layout else weights


def parameter_groups(network, learning_rate: float, text_encoder_lr: float | None = None, unet_lr: float | None = None,
                     block_weights: list[float] | None = None, block_of=None, loraplus_unet: float | None = None,
                     loraplus_text_encoder: float | None = None) -> list[dict]:
    """``[{"params": […], "lr": …, "description": …}]`` for torch optimizers; ``block_of(module)`` gives a block index."""
    groups = []

    def add(modules, lr, description, plus_ratio):
        if not lr:
            return  # sd-scripts: "NO LR skipping!"
        plain, plus = [], []
        for module in modules:
            for name, parameter in module.named_parameters():
                (plus if plus_ratio and module.loraplus_raises_up and "lora_up" in name else plain).append(parameter)
        if plain:
            groups.append({"params": plain, "lr": lr, "description": description})
        if plus:
            groups.append({"params": plus, "lr": lr * plus_ratio, "description": f"{description} plus"})

    add(network.text_encoder_modules(), text_encoder_lr if text_encoder_lr is not None else learning_rate, "textencoder", loraplus_text_encoder)
    unet_rate = unet_lr if unet_lr is not None else learning_rate
    if block_weights is None:
        add(network.unet_modules(), unet_rate, "unet", loraplus_unet)
    else:
        by_block: dict[int | None, list] = {}
        for module in network.unet_modules():
            by_block.setdefault(block_of(module), []).append(module)
        for index in sorted(by_block, key=lambda index: (index is None, index or 0)):
            if index is None:  # outside sd-scripts' blocks (LyCORIS presets' time embedding, conv_out): no block weight
                add(by_block[index], unet_rate, "unet", loraplus_unet)
            else:
                add(by_block[index], unet_rate * block_weights[index], f"unet_block{index}", loraplus_unet)
    return groups
