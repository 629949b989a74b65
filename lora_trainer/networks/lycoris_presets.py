"""Which layers a network trains: sd-scripts' LoRA targets, or a LyCORIS preset (``network_args preset=…``).

A LyCORIS preset, built in or a TOML file, picks layers in the model sd-scripts trains (its own UNet, transformers'
CLIP): every Linear/Conv2d inside a block whose class it lists (``Transformer2DModel``, ``ResnetBlock2D``,
``CrossAttention``, ``CLIPMLP`` …), and the layers whose module path it names (``conv_in``,
``time_embedding.linear_1``; regular expressions matched from the start, or shell patterns with
``use_fnmatch``), less ``exclude_name``. A block named in the name list is not taken by its class. k×k convolutions
get modules only where the preset enables them (``enable_conv``). Keys a file leaves out keep the ``full`` preset's
values, as LyCORIS keeps its defaults. sd-scripts' SDXL UNet has no ``TimestepEmbedding`` class and none of those
names, so on SDXL the embedding and in/out layers are never chosen. Per-block algorithm maps
(``module_algo_map``/``name_algo_map``, so also the ``ia3`` preset) are refused: a network here has one algorithm.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace
from pathlib import Path

import toml

from ..errors import UserError
from .naming import ATTENTION, CONV, NORM, UNET, Target

_UNET_BLOCKS = frozenset({"Transformer2DModel", "BasicTransformerBlock", "CrossAttention", "FeedForward", "GEGLU",
                          "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding"})
_TEXT_ENCODER_BLOCKS = frozenset({"CLIPTextTransformer", "CLIPEncoder", "CLIPEncoderLayer", "CLIPAttention",
                                  "CLIPSdpaAttention", "CLIPMLP"})
# Blocks of other model families that LyCORIS's own presets list: in an SD model they match nothing, there as here.
_OTHER_MODELS_BLOCKS = frozenset({
    "HunYuanDiTBlock", "DoubleStreamBlock", "SingleStreamBlock", "SingleDiTBlock", "MMDoubleStreamBlock",
    "MMSingleStreamBlock", "WanAttentionBlock", "HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock",
    "JointTransformerBlock", "FinalLayer", "QwenImageTransformerBlock", "LensTransformerBlock",
    "Ideogram4TransformerBlock", "ZImageTransformerBlock", "AceStepEncoderLayer", "AceStepDiTLayer", "TextFusionBlock",
    "Block", "PatchEmbed", "LLMAdapterTransformerBlock", "SelfAttention", "Attention", "MT5Block", "BertLayer",
    "BertAttention", "MT5LayerSelfAttention", "Gemma2Attention", "Gemma2FlashAttention2", "Gemma2SdpaAttention",
    "Gemma2MLP", "Qwen3Attention", "Qwen3FlashAttention2", "Qwen3SdpaAttention", "Qwen3MLP"})


@dataclass(frozen=True)
class Preset:
    unet_modules: frozenset[str]  # block class names
    unet_names: tuple[str, ...]  # module paths or patterns
    text_encoder_modules: frozenset[str]
    text_encoder_names: tuple[str, ...]
    convs: bool  # k×k convolutions get modules (at conv_dim, LyCORIS's default: network_dim)
    exclude: tuple[str, ...] = ()
    use_fnmatch: bool = False

    def chooses(self, target: Target) -> bool:
        modules, names = ((self.unet_modules, self.unet_names) if target.component == UNET
                          else (self.text_encoder_modules, self.text_encoder_names))
        path = target.sd_scripts_path
        if target.group == NORM or self._matches(self.exclude, path):  # LyCORIS trains norms only with train_norm
            return False
        if self._matches(names, path):
            return True
        return any(cls in modules and not self._matches(self.exclude, block) and not self._matches(names, block)
                   for cls, block in target.sd_scripts_blocks)

    def _matches(self, patterns: tuple[str, ...], path: str) -> bool:
        if self.use_fnmatch:
            return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)
        return path in patterns or any(re.match(pattern, path) for pattern in patterns)


_TE = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"})
_IN_OUT = ("conv_in", "conv_out")
_TIME = ("time_embedding.linear_1", "time_embedding.linear_2")
_EVERY_BLOCK = frozenset({"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding"})
LYCORIS_PRESETS = {  # as lycoris-lora 4.1.3's lycoris/config.py, less the blocks of other model families
    "full": Preset(_EVERY_BLOCK, _IN_OUT + _TIME, _TE, (), True),
    "full-lin": Preset(frozenset({"Transformer2DModel", "ResnetBlock2D", "TimestepEmbedding"}), _TIME, _TE, (), False),
    "attn-mlp": Preset(frozenset({"Transformer2DModel", "TimestepEmbedding"}), (), _TE, (), False),
    "attn-only": Preset(frozenset({"CrossAttention"}), (), frozenset({"CLIPAttention", "CLIPSdpaAttention"}), (), False),
    "unet-only": Preset(_EVERY_BLOCK, _IN_OUT + _TIME, frozenset(), (), True),
    "unet-transformer-only": Preset(frozenset({"Transformer2DModel", "TimestepEmbedding"}), (), frozenset(), (), False),
    "unet-convblock-only": Preset(frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D"}), _IN_OUT, frozenset(), (), True),
}
LYCORIS_DEFAULT = "full"

_FILE_KEYS = {"enable_conv": "convs", "unet_target_module": "unet_modules", "unet_target_name": "unet_names",
              "text_encoder_target_module": "text_encoder_modules", "text_encoder_target_name": "text_encoder_names",
              "exclude_name": "exclude", "use_fnmatch": "use_fnmatch"}
_REFUSED_KEYS = {"module_algo_map": "per-block algorithms", "name_algo_map": "per-layer algorithms",
                 "target_module": "LyCORIS's wrapper keys (not lycoris.kohya's)", "target_name": "LyCORIS's wrapper keys (not lycoris.kohya's)",
                 "lora_prefix": "other name prefixes than Kohya's"}


def lycoris_preset(name: str) -> Preset:
    """A built-in preset by name, else a preset file (TOML, as LyCORIS reads it) by path."""
    if name in LYCORIS_PRESETS:
        return LYCORIS_PRESETS[name]
    if name == "ia3":
        raise UserError("network_args preset=ia3: LyCORIS's ia3 preset sets an algorithm per layer, which is not "
                        f"supported; use one of {', '.join(LYCORIS_PRESETS)} or a preset file")
    path = Path(name)
    if path.suffix.lower() != ".toml" and not path.is_file():
        raise UserError(f"network_args preset={name}: not a LyCORIS preset ({', '.join(LYCORIS_PRESETS)}) nor a "
                        "preset file (.toml)")
    try:
        text = path.read_bytes()
    except OSError as error:
        raise UserError(f"network_args preset={name}: cannot read the preset file ({error.strerror or error})") from error
    return _parse_preset_file(path.resolve(), text)


def _parse_preset_file(path: Path, text: bytes) -> Preset:
    where = f"LyCORIS preset file {path}"
    try:
        raw = toml.loads(text.decode("utf-8"))
    except (toml.TomlDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{where}: not valid TOML ({error})") from error
    refused = [f"{key} ({_REFUSED_KEYS[key]})" for key, value in raw.items() if key in _REFUSED_KEYS and value]
    unknown = sorted(set(raw) - _FILE_KEYS.keys() - _REFUSED_KEYS.keys())
    if refused or unknown:
        problems = ([f"not supported: {', '.join(refused)}"] if refused else []) + (
            [f"unknown keys: {', '.join(unknown)} (known: {', '.join(_FILE_KEYS)})"] if unknown else [])
        raise UserError(f"{where}: {'; '.join(problems)}")
    fields = {}
    for key, value in raw.items():
        if key not in _FILE_KEYS:
            continue  # an empty algorithm map
        expected = bool if key in ("enable_conv", "use_fnmatch") else list
        if not isinstance(value, expected) or (expected is list and not all(isinstance(v, str) for v in value)):
            kind = "true or false" if expected is bool else "a list of strings"
            raise UserError(f"{where}: {key} must be {kind}, got {value!r}")
        fields[_FILE_KEYS[key]] = value if expected is bool else (frozenset(value) if key.endswith("_module") else tuple(value))
    for key, known in (("unet_target_module", _UNET_BLOCKS), ("text_encoder_target_module", _TEXT_ENCODER_BLOCKS)):
        strangers = sorted(set(raw.get(key, ())) - known - _OTHER_MODELS_BLOCKS)
        if strangers:
            raise UserError(f"{where}: {key} lists {', '.join(strangers)}, no block of an SD model here; "
                            f"known: {', '.join(sorted(known))}")
    if not fields.get("use_fnmatch", False):
        for key in ("unet_target_name", "text_encoder_target_name", "exclude_name"):
            for pattern in raw.get(key, ()):
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise UserError(f"{where}: {key} {pattern!r} is not a regular expression ({error}); "
                                    "or set use_fnmatch = true for shell patterns") from error
    return replace(LYCORIS_PRESETS[LYCORIS_DEFAULT], **fields)


def targeted(target: Target, preset: Preset | None, with_convs: bool) -> bool:
    """Whether ``target`` gets a module: sd-scripts' LoRA (attention blocks and text encoders, plus the ResBlock and
    sampler layers with ``conv_dim``) when ``preset`` is None, else the LyCORIS preset's choice."""
    if preset is None:
        return target.group == ATTENTION or (target.group == CONV and with_convs)
    return preset.chooses(target)
