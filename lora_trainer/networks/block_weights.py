"""Block weights as users of the LoRA Block Weight extension write them: a vector or a named preset.

A vector has one value per block: BASE (the text encoders), the UNet's input blocks IN00…, the middle block
M00, the output blocks OUT00…. The long form lists every block (26 values for SD1/SD2, 20 for SDXL), the
short form only those with attention, where a plain LoRA has modules (17 and 12). As in the extension, a
short vector gives weight 0 to the blocks it does not list (they matter only for LoCon/LyCORIS files).
Both layouts are derived from the UNet config, so a new architecture needs no table here; presets are per
layout (``BlockScheme``), picked by the loaded UNet's own short layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class BlockScheme:
    """One short block layout and the presets written for it."""

    name: str  # for messages: which models use it
    blocks: tuple[str, ...]  # the short layout, in the extension's order
    presets: dict[str, str]  # name → one value per block, comma separated


# The extension's own default presets (its DEF_WEIGHT_PRESET; 17 values: BASE, IN01, IN02, IN04, IN05, IN07, IN08,
# M00, OUT03…OUT11).
SD1_SCHEME = BlockScheme("SD1/SD2", ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
                                     *(f"OUT{i:02d}" for i in range(3, 12))), {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 17),
})

# SDXL's 12 blocks as the extension lists them (its BLOCKID12). The extension ships no SDXL presets (a 17-value
# preset on SDXL is applied by block name, so "ALL" leaves OUT00–OUT02 at 0); ours mean on SDXL what they mean on
# SD1, level by level: SDXL's attention levels are SD1's second and third (IN04/05, IN07/08 have the same names;
# SD1's OUT03–05 are SDXL's OUT00–02, SD1's OUT06–08 are SDXL's OUT03–05), and SD1's first level has no SDXL
# counterpart.
SDXL_SCHEME = BlockScheme("SDXL", ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6))), {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,1,1,1,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "MIDD": "1,0,1,1,1,1,1,1,1,1,0,0",
    "OUTD": "1,0,0,0,0,0,1,1,1,1,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,1,1",
    "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 12),
})

SCHEMES = (SD1_SCHEME, SDXL_SCHEME)
PRESET_NAMES = tuple(dict.fromkeys(name for scheme in SCHEMES for name in scheme.presets))
PRESETS_17 = SD1_SCHEME.presets  # the extension's defaults, as they are written in its UI


def block_layouts(unet_config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every block, the blocks with attention) of a UNet, as block-weight labels."""
    per_level = unet_config.num_res_blocks + 1
    levels = len(unet_config.channel_mult)
    count = levels * per_level
    attends = [unet_config.transformer_depth[level] > 0 for level in range(levels)]
    inputs_with_attention = {1 + level * per_level + i for level in range(levels) if attends[level] for i in range(unet_config.num_res_blocks)}
    outputs_with_attention = {up * per_level + i for up in range(levels) if attends[levels - 1 - up] for i in range(per_level)}
    every = ("BASE", *(f"IN{i:02d}" for i in range(count)), "M00", *(f"OUT{i:02d}" for i in range(count)))
    short = ("BASE", *(f"IN{i:02d}" for i in sorted(inputs_with_attention)), "M00", *(f"OUT{i:02d}" for i in sorted(outputs_with_attention)))
    return every, short


def scheme_for(unet_config) -> BlockScheme:
    """The presets of this UNet's short layout (SD1/SD2's 17 blocks, SDXL's 12); a layout no scheme has gets none."""
    short = block_layouts(unet_config)[1]
    return next((s for s in SCHEMES if s.blocks == short), BlockScheme("this UNet", short, {}))


def parse_block_weights(value: str | Sequence[float], unet_config, presets: dict[str, str] | None = None) -> dict[str, float]:
    """``"OUTD"``, ``"1,0,0,…"`` or a list of numbers → {block label: weight} for this UNet."""
    scheme = scheme_for(unet_config)
    presets = {**scheme.presets, **(presets or {})}
    if isinstance(value, str):
        if value.strip() in PRESET_NAMES and value.strip() not in presets:
            raise UserError(f"block weights {value.strip()!r}: no such preset for {scheme.name} models "
                            f"({', '.join(presets) or 'none'}); write {len(scheme.blocks)} values")
        text = presets.get(value.strip(), value)
        try:
            numbers = [float(v) for v in text.split(",")]
        except ValueError:
            raise UserError(f"block weights {value!r}: neither a preset ({', '.join(presets)}) nor comma-separated numbers") from None
    else:
        numbers = [float(v) for v in value]
    every, short = block_layouts(unet_config)
    for labels in (every, short):
        if len(numbers) == len(labels):
            weights = dict.fromkeys(every, 0.0)
            weights.update(zip(labels, numbers))
            return weights
    raise UserError(f"block weights {value!r} have {len(numbers)} values; this model takes {len(short)} "
                    f"({', '.join(short)}) or {len(every)} (every block)")
