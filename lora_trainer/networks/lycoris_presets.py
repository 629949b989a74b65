"""Which layers a network trains: sd-scripts' LoRA targets, or a LyCORIS preset (``network_args preset=…``).

A LyCORIS preset, built in or a TOML file, picks layers in the model sd-scripts trains (its own UNet, transformers'
CLIP): every Linear/Conv2d inside a block whose class it lists (``Transformer2DModel``, ``ResnetBlock2D``,
``CrossAttnDownBlock2D``, ``CLIPMLP``, ``Linear`` …), and the layers whose module path it names (``conv_in``,
``time_embedding.linear_1``; regular expressions matched from the start, or shell patterns with ``use_fnmatch``),
less ``exclude_name``. A block named in the name list is not taken by its class. k×k convolutions get modules only
where the preset enables them (``enable_conv``) or a block map gives them a ``dim``. Keys a file leaves out keep the
``full`` preset's values, as LyCORIS keeps its defaults. sd-scripts' SDXL UNet has no ``TimestepEmbedding`` class and
none of those names, so on SDXL the embedding and in/out layers are never chosen by them; its text encoder 2's
``text_projection`` is no target here (the WebUI could not load it), so ``Linear`` does not choose it.

Block maps (``module_algo_map`` by class, ``name_algo_map`` by path) give layers their own algorithm and options,
as LyCORIS resolves them: a layer chosen by name takes the first name entry that matches it, else the entry of its
own class; a layer chosen by its block takes the entry of the innermost mapped class around it (the block's own
included), and inherits ``algo`` from the mapped classes further out.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .. import toml_text
from ..errors import UserError
from .naming import ATTENTION, CONV, NORM, UNET, Target
from .registry import algorithm_name, trainable_algorithms

_UNET_BLOCKS = frozenset({"Transformer2DModel", "BasicTransformerBlock", "CrossAttention", "FeedForward", "GEGLU",
                          "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding", "Linear", "Conv2d",
                          # sd-scripts' SD1/SD2 UNet groups its layers in Diffusers' blocks (its SDXL UNet does not)
                          "CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D"})
_TEXT_ENCODER_BLOCKS = frozenset({"CLIPTextTransformer", "CLIPEncoder", "CLIPEncoderLayer", "CLIPAttention",
                                  "CLIPSdpaAttention", "CLIPMLP", "Linear"})
# the model roots: LyCORIS names their layers with a doubled "_" (lora_unet__down_blocks…) that no reader loads
_ROOTS = frozenset({"UNet2DConditionModel", "SdxlUNet2DConditionModel", "CLIPTextModel", "CLIPTextModelWithProjection"})
# Blocks of other model families that LyCORIS's own presets list: in an SD model they match nothing, there as here.
_OTHER_MODELS_BLOCKS = frozenset({
    "HunYuanDiTBlock", "DoubleStreamBlock", "SingleStreamBlock", "SingleDiTBlock", "MMDoubleStreamBlock",
    "MMSingleStreamBlock", "WanAttentionBlock", "HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock",
    "JointTransformerBlock", "FinalLayer", "QwenImageTransformerBlock", "LensTransformerBlock",
    "Ideogram4TransformerBlock", "ZImageTransformerBlock", "AceStepEncoderLayer", "AceStepDiTLayer", "TextFusionBlock",
    "Block", "PatchEmbed", "LLMAdapterTransformerBlock", "SelfAttention", "Attention", "MT5Block", "BertLayer",
    "BertAttention", "MT5LayerSelfAttention", "Gemma2Attention", "Gemma2FlashAttention2", "Gemma2SdpaAttention",
    "Gemma2MLP", "Qwen3Attention", "Qwen3FlashAttention2", "Qwen3SdpaAttention", "Qwen3MLP"})


Options = tuple[tuple[str, object], ...]  # a block map entry: NetworkSpec field → value, e.g. (("algorithm", "lokr"),)
_BY_NAME = -1  # a layer the preset chooses by its path, not by a block around it


@dataclass(frozen=True)
class Preset:
    unet_modules: frozenset[str]  # block class names
    unet_names: tuple[str, ...]  # module paths or patterns
    text_encoder_modules: frozenset[str]
    text_encoder_names: tuple[str, ...]
    convs: bool  # k×k convolutions get modules (at conv_dim, LyCORIS's default: network_dim)
    exclude: tuple[str, ...] = ()
    use_fnmatch: bool = False
    module_options: tuple[tuple[str, Options], ...] = ()  # module_algo_map: block class → options
    name_options: tuple[tuple[str, Options], ...] = ()  # name_algo_map: path or pattern → options, in file order

    def chooses(self, target: Target, train_norm: bool = False) -> bool:
        return (train_norm or target.group != NORM) and self._chosen_block(target) is not None

    def options(self, target: Target) -> dict[str, object]:
        """The block maps' NetworkSpec fields for a chosen ``target`` ({} when no entry applies)."""
        by_class = dict(self.module_options)
        layer_class = target.sd_scripts_blocks[-1][0]
        start = self._chosen_block(target)
        if start == _BY_NAME:
            path = target.sd_scripts_path
            named = dict(self.name_options)
            found = named[path] if path in named else next((o for p, o in self.name_options if self._matches((p,), path)), None)
            return dict(by_class.get(layer_class, ()) if found is None else found)
        options, algorithm = {}, None
        for index, (cls, block) in enumerate(target.sd_scripts_blocks[start:]):
            if cls in by_class and (index == 0 or not self._matches(self.exclude, block)):
                options = dict(by_class[cls])
                algorithm = options.get("algorithm", algorithm)
        return {**options, "algorithm": algorithm} if algorithm else options

    def _chosen_block(self, target: Target) -> int | None:
        """_BY_NAME when the preset names the layer, else the index in ``sd_scripts_blocks`` of the outermost
        block that chooses it by class; None when it is not chosen."""
        modules, names = ((self.unet_modules, self.unet_names) if target.component == UNET
                          else (self.text_encoder_modules, self.text_encoder_names))
        path = target.sd_scripts_path
        if self._matches(self.exclude, path):
            return None
        if self._matches(names, path):
            return _BY_NAME
        return next((index for index, (cls, block) in enumerate(target.sd_scripts_blocks)
                     if cls in modules and not self._matches(self.exclude, block) and not self._matches(names, block)), None)

    def _matches(self, patterns: tuple[str, ...], path: str) -> bool:
        if self.use_fnmatch:
            return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)
        return path in patterns or any(re.match(pattern, path) for pattern in patterns)

    def all_options(self) -> list[dict[str, object]]:
        return [dict(options) for _, options in self.module_options + self.name_options]


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
              "exclude_name": "exclude", "use_fnmatch": "use_fnmatch", "module_algo_map": "module_options",
              "name_algo_map": "name_options"}
_REFUSED_KEYS = {"target_module": "LyCORIS's wrapper keys (not lycoris.kohya's)", "target_name": "LyCORIS's wrapper keys (not lycoris.kohya's)",
                 "lora_prefix": "other name prefixes than Kohya's"}
# a block map entry's options, as LyCORIS passes them to a module → (NetworkSpec field, type)
_MAP_OPTIONS = {"algo": ("algorithm", str), "dim": ("dim", int), "alpha": ("alpha", float), "factor": ("factor", int),
                "full_matrix": ("full_matrix", bool), "decompose_both": ("decompose_both", bool),
                "weight_decompose": ("dora", bool), "block_size": ("unit", int), "use_tucker": ("tucker", bool),
                "unbalanced_factorization": ("unbalanced_factorization", bool), "constraint": ("constraint", float),
                "rescaled": ("rescaled", bool), "train_on_input": ("ia3_on_input", bool),
                "use_scalar": ("use_scalar", bool)}
_MAP_REFUSED = {
    "wd_on_output": "LyCORIS applies network_args' wd_on_output to every layer and ignores it here; set it in network_args",
    **dict.fromkeys(("dropout", "rank_dropout", "module_dropout"),
                    "LyCORIS stops with a dropout in a block map (it passes it twice); set it in network_args")}


def lycoris_preset(name: str) -> Preset:
    """A built-in preset by name, else a preset file (TOML, as LyCORIS reads it) by path."""
    if name in LYCORIS_PRESETS:
        return LYCORIS_PRESETS[name]
    if name == "ia3":
        raise UserError("network_args preset=ia3: LyCORIS's ia3 preset names its layers by short paths (to_k, k_proj "
                        "…) that, matched from the start of a module path, choose no layer of an SD model (LyCORIS "
                        f"4.1.3 makes an empty network from it); use algo=ia3 with one of {', '.join(LYCORIS_PRESETS)} "
                        "or a preset file (train_on_input = true in a name_algo_map entry for the input side)")
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
        raw = toml_text.loads(text.decode("utf-8-sig"), where)
    except UnicodeDecodeError as error:
        raise UserError(f"{where}: not UTF-8 ({error}); re-save it as UTF-8") from error
    refused = [f"{key} ({_REFUSED_KEYS[key]})" for key, value in raw.items() if key in _REFUSED_KEYS and value]
    unknown = sorted(set(raw) - _FILE_KEYS.keys() - _REFUSED_KEYS.keys())
    if refused or unknown:
        problems = ([f"not supported: {', '.join(refused)}"] if refused else []) + (
            [f"unknown keys: {', '.join(unknown)} (known: {', '.join(_FILE_KEYS)})"] if unknown else [])
        raise UserError(f"{where}: {'; '.join(problems)}")
    fields = {}
    for key, value in raw.items():
        if key not in _FILE_KEYS:
            continue  # an empty wrapper key
        if key.endswith("_algo_map"):
            fields[_FILE_KEYS[key]] = _block_map(where, key, value)
            continue
        expected = bool if key in ("enable_conv", "use_fnmatch") else list
        if not isinstance(value, expected) or (expected is list and not all(isinstance(v, str) for v in value)):
            kind = "true or false" if expected is bool else "a list of strings"
            raise UserError(f"{where}: {key} must be {kind}, got {value!r}")
        fields[_FILE_KEYS[key]] = value if expected is bool else (frozenset(value) if key.endswith("_module") else tuple(value))
    known_classes = {"unet_target_module": _UNET_BLOCKS, "text_encoder_target_module": _TEXT_ENCODER_BLOCKS,
                     "module_algo_map": _UNET_BLOCKS | _TEXT_ENCODER_BLOCKS}
    for key, known in known_classes.items():
        roots = sorted(set(raw.get(key, ())) & _ROOTS)
        if roots:
            raise UserError(f"{where}: {key} lists the model root {', '.join(roots)}: LyCORIS names its layers "
                            "lora_unet__… / lora_te__… then, which no reader loads; list its blocks instead")
        strangers = sorted(set(raw.get(key, ())) - known - _OTHER_MODELS_BLOCKS)
        if strangers:
            raise UserError(f"{where}: {key} lists {', '.join(strangers)}, no block of an SD model here; "
                            f"known: {', '.join(sorted(known))}")
    if not fields.get("use_fnmatch", False):
        for key in ("unet_target_name", "text_encoder_target_name", "exclude_name", "name_algo_map"):
            for pattern in raw.get(key, ()):
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise UserError(f"{where}: {key} {pattern!r} is not a regular expression ({error}); "
                                    "or set use_fnmatch = true for shell patterns") from error
    return replace(LYCORIS_PRESETS[LYCORIS_DEFAULT], **fields)


def _block_map(where: str, key: str, table: object) -> tuple[tuple[str, Options], ...]:
    """``[module_algo_map.CrossAttention] algo = "lokr", factor = 8`` → (("CrossAttention", (("algorithm", "lokr"),
    ("factor", 8))),), each option checked."""
    if not isinstance(table, dict) or not all(isinstance(entry, dict) for entry in table.values()):
        raise UserError(f'{where}: {key} must be a table of tables, e.g. [{key}.CrossAttention] algo = "lokr"')
    entries = []
    for name, entry in table.items():
        at = f"{where}: [{key}.{name}]"
        options = []
        for option, value in entry.items():
            if option in _MAP_REFUSED:
                raise UserError(f"{at} {option}: {_MAP_REFUSED[option]}")
            if option not in _MAP_OPTIONS:
                raise UserError(f"{at} {option} is not supported in a block map (supported: {', '.join(_MAP_OPTIONS)})")
            field, kind = _MAP_OPTIONS[option]
            if kind is str:
                if algorithm_name(str(value)) not in trainable_algorithms():
                    raise UserError(f"{at} algo = {value!r} is not trained here; use one of locon, "
                                    f"{', '.join(trainable_algorithms())}")
                value = algorithm_name(str(value))
            elif kind is bool and not isinstance(value, bool):
                raise UserError(f"{at} {option} must be true or false, got {value!r}")
            elif kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise UserError(f"{at} {option} must be a whole number, got {value!r}")
            elif kind is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise UserError(f"{at} {option} must be a number, got {value!r}")
                value = float(value)
            if option == "dim" and value < 1:
                raise UserError(f"{at} dim must be at least 1, got {value}")
            if option == "alpha" and value == 0:
                raise UserError(f"{at} alpha = 0: LyCORIS reads it as unset (the network's alpha); leave it out")
            options.append((field, value))
        entries.append((name, tuple(options)))
    return tuple(entries)


def targeted(target: Target, preset: Preset | None, with_convs: bool, train_norm: bool = False) -> bool:
    """Whether ``target`` gets a module: sd-scripts' LoRA (attention blocks and text encoders, plus the ResBlock and
    sampler layers with ``conv_dim``) when ``preset`` is None, else the LyCORIS preset's choice (norm layers in
    its blocks too with ``train_norm``)."""
    if preset is None:
        return target.group == ATTENTION or (target.group == CONV and with_convs)
    return preset.chooses(target, train_norm)
