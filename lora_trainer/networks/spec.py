"""What network to train, as one typed object, read from sd-scripts' ``--network_module/_dim/_alpha/_args``.

``networks.lora`` (LoRA, LoCon with ``conv_dim``), ``networks.dylora`` and ``lycoris.kohya`` (``algo=…``)
all become a ``NetworkSpec``; unknown ``network_args`` are refused by name, never ignored.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import UserError, with_closest
from .lr_groups import PRESETS
from .lycoris_presets import LYCORIS_DEFAULT, Preset, lycoris_preset
from .registry import algorithm_name, trainable_algorithms
MODULES = ("networks.lora", "networks.dylora", "lycoris.kohya")


@dataclass(frozen=True)
class NetworkSpec:
    algorithm: str = "lora"  # lora (LoCon when conv_dim is set), loha, lokr, dylora; LyCORIS's full, ia3, diag-oft, boft, glora
    dim: int = 4
    alpha: float = 1.0  # sd-scripts' default: scale 1/dim unless set
    conv_dim: int | None = None  # 3×3 convs get a module only with a conv dim (LoCon)
    conv_alpha: float | None = None  # default 1.0, as sd-scripts
    dropout: float | None = None
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    dora: bool = False  # DoRA magnitude on top (LyCORIS dora_wd)
    dora_on_output: bool = False  # False: input-axis dora_scale, the axis the WebUI reads correctly
    factor: int = -1  # LoKr
    full_matrix: bool = False  # LoKr
    unbalanced_factorization: bool = False  # LoKr: the larger part of the output side in W1
    decompose_both: bool = False  # LoKr
    unit: int = 1  # DyLoRA
    use_scalar: bool = False  # LyCORIS: ΔW times a trained scalar from 0 (folded into a factor in the file)
    rs_lora: bool = False  # LyCORIS rank-stabilised scale α/√r (stored as alpha = α·√r, which every reader turns into it)
    train_norm: bool = False  # LyCORIS: the norm layers inside the preset's blocks get γ/β shifts
    constraint: float = 0.0  # Diag-OFT/BOFT: the bound on its rotations' generators (0: none)
    rescaled: bool = False  # Diag-OFT/BOFT: a trained scale per output channel after the rotation
    ia3_on_input: bool = False  # (IA)³ on the input channels (LyCORIS's train_on_input, in block maps)
    tucker: bool = False  # k×k convolutions as a Tucker core between 1×1 factors (LyCORIS use_tucker)
    network_module: str = "networks.lora"
    network_args: tuple[tuple[str, str], ...] = ()  # as given, recorded in ss_network_args
    preset: str | None = None  # lycoris.kohya: the LyCORIS preset that chooses the layers; None: sd-scripts' LoRA targets
    lycoris: Preset | None = field(default=None, compare=False, repr=False)  # that preset, read

    def __post_init__(self):
        if self.algorithm not in trainable_algorithms():
            why = (_UNLOADABLE_LYCORIS.get(self.algorithm) or (" is a LyCORIS algorithm newer than lycoris-lora 4.1.3, "
                   "whose algorithms this trainer implements; choose" if self.algorithm in _NEWER_LYCORIS else " is not"))
            raise UserError(f"network algorithm {self.algorithm!r}{why} one of {', '.join(trainable_algorithms())}")
        if self.dim < 1:
            raise UserError(f"network_dim must be at least 1, got {self.dim}", "network_dim")
        if self.use_scalar and self.algorithm not in ("lora", "loha", "lokr", "glora"):
            raise UserError(f"use_scalar: LyCORIS's {self.algorithm} has no trained scalar; drop use_scalar")
        low_rank = self.algorithm in ("lora", "loha", "lokr")
        given = [name for name, on in (("dora_wd", self.dora), ("use_tucker", self.tucker), ("rs_lora", self.rs_lora)) if on]
        if given and not low_rank and self.algorithm != "dylora":
            raise UserError(f"algo={self.algorithm}: {', '.join(given)} apply to lora, loha and lokr only; drop them")
        if self.dropout and (self.algorithm not in ("lora", "dylora") or self.dora):
            name = "DoRA" if self.dora else f"algo={self.algorithm}"
            raise UserError(f"--network_dropout / dropout: {name} has no neuron dropout (LyCORIS ignores it there); "
                            "use rank_dropout or module_dropout")
        if self.rs_lora and self.algorithm == "dylora":
            raise UserError("rs_lora: LyCORIS's DyLoRA keeps the α/r scale (it ignores rs_lora); drop rs_lora")
        if self.tucker and self.algorithm == "dylora":
            raise UserError("use_tucker: DyLoRA has no Tucker form; drop use_tucker or use algo=lora")

    @property
    def per_block(self) -> bool:
        """sd-scripts' block mode (networks/lora.py create_network): the UNet's ranks come from the block lists
        whenever block_dims or a block learning rate is given; otherwise the block lists are not read."""
        return self.block_dims is not None or any(key in BLOCK_LR_WEIGHTS for key, _ in self.network_args)

    @property
    def with_convs(self) -> bool:
        return bool(self.conv_dim) or (self.per_block and bool(self.conv_block_dims))

    def for_layer(self, options: Mapping[str, object], kxk: bool) -> NetworkSpec:
        """These options with a LyCORIS block map's ``options`` for one layer (its ``dim``/``alpha`` are the conv
        ones on a k×k convolution, and win over block lists)."""
        if not options:
            return self
        fields = dict(options)
        prefix = "conv_" if kxk else ""
        for name in ("dim", "alpha"):
            if name in fields:
                fields[prefix + name] = fields.pop(name)
                fields[f"{prefix}block_{name}s"] = None
        return dataclasses.replace(self, **fields)

    @property
    def uses_dora(self) -> bool:
        """DoRA on any layer: the network's option, or a block map's."""
        return self.dora or any(options.get("dora") for options in self.map_options())

    def loraplus_ratios(self) -> tuple[float | None, float | None]:
        """LoRA+'s (UNet, text encoder) ratios as sd-scripts reads them: a side's own ratio, else loraplus_lr_ratio."""
        args = dict(self.network_args)
        both = args.get("loraplus_lr_ratio")
        sides = (args.get("loraplus_unet_lr_ratio", both), args.get("loraplus_text_encoder_lr_ratio", both))
        return tuple(None if ratio is None else float(ratio) for ratio in sides)

    @property
    def raises_lora_up(self) -> bool:
        """Whether LoRA+ finds weights to raise: LyCORIS picks them by the name lora_up, which only its LoRA/LoCon
        layers have; sd-scripts' LoRA and DyLoRA raise their up weights."""
        return self.network_module != "lycoris.kohya" or "lora" in self.algorithms

    @property
    def algorithms(self) -> set[str]:
        """The algorithms of every layer: the network's, and those a block map names."""
        return {self.algorithm} | {str(options["algorithm"]) for options in self.map_options() if "algorithm" in options}

    def map_options(self) -> list[dict]:
        """Every block map entry of the LyCORIS preset, as NetworkSpec fields ([] without maps)."""
        return self.lycoris.all_options() if self.lycoris else []

    def metadata_args(self) -> str | None:
        """``ss_network_args`` as sd-scripts writes it: the given args, all values strings."""
        if not self.network_args:
            return None
        return json.dumps(dict(self.network_args))


_BOOL_ARGS = {"dora_wd": "dora", "full_matrix": "full_matrix", "decompose_both": "decompose_both", "train_norm": "train_norm",
              "rs_lora": "rs_lora", "unbalanced_factorization": "unbalanced_factorization", "rescaled": "rescaled",
              "use_scalar": "use_scalar"}
# LyCORIS computes the layer and its change apart instead of through W + ΔW: the same numbers, as we always do;
# rank_dropout_scale and train_on_input its create_network never reads from network_args (4.1.3), so they change
# nothing there either, yet the Kohya GUI writes them into every LyCORIS run's network_args
_SAME_RESULT_ARGS = {"bypass_mode", "rank_dropout_scale", "train_on_input"}
_TUCKER_ARGS = ("use_tucker", "use_cp", "use_conv_cp")  # LyCORIS's name, and its older ones
_FLOAT_ARGS = {"conv_alpha": "conv_alpha", "rank_dropout": "rank_dropout", "module_dropout": "module_dropout", "dropout": "dropout",
               "constraint": "constraint"}
_INT_ARGS = {"conv_dim": "conv_dim", "factor": "factor", "unit": "unit", "block_size": "unit"}
_LIST_ARGS = {"block_dims": int, "block_alphas": float, "conv_block_dims": int, "conv_block_alphas": float}
# Accepted and recorded, handled elsewhere (learning rates belong to the optimizer's parameter groups).
BLOCK_LR_WEIGHTS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")  # any of them: sd-scripts' block mode
BLOCK_LR_ARGS = (*BLOCK_LR_WEIGHTS, "block_lr_zero_threshold")  # the threshold alone starts nothing
LORAPLUS_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
# LyCORIS's algo= names after 4.1.3
_NEWER_LYCORIS = {"abba", "gora", "ralora", "lora2"}
# in 4.1.3, not trained here: what its files would be good for
_UNLOADABLE_LYCORIS = {"tlora": " (T-LoRA, LyCORIS 4.1.3) is not trained here: its files (lambda_layer, a rank mask per "
                                "timestep) load in neither the WebUI nor ComfyUI; choose"}
# LyCORIS options refused when on (off, they change nothing here)
_NOT_HERE = {"train_t5xxl": "an SD model has no T5 encoder", "train_llm_adapter": "an SD model has no LLM adapter"}
# The network_args each module's create_network reads (sd-scripts 48d368fa networks/lora.py and networks/dylora.py,
# lycoris-lora 4.1.3 lycoris/kohya.py): the same command must build the same network, so any other is refused,
# naming the module that reads it, never applied where the real module would ignore it
READ_BY = {
    "networks.lora": {"conv_dim", "conv_alpha", "rank_dropout", "module_dropout", *_LIST_ARGS, *BLOCK_LR_ARGS,
                      *LORAPLUS_ARGS},
    "networks.dylora": {"conv_dim", "conv_alpha", "unit", *LORAPLUS_ARGS},
    "lycoris.kohya": {"conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "algo", "preset", "factor",
                      "decompose_both", "block_size", "constraint", "wd_on_output", "disable_conv_cp", *_TUCKER_ARGS,
                      *_BOOL_ARGS, *_NOT_HERE, *_SAME_RESULT_ARGS, *LORAPLUS_ARGS},
}
_KNOWN = set().union(*READ_BY.values())
# what a module reads instead of an arg it does not (the arg: the module, what it reads or does)
_INSTEAD = {("lycoris.kohya", "unit"): "LyCORIS's DyLoRA reads its blocks of ranks from block_size",
            ("networks.dylora", "block_size"): "sd-scripts' DyLoRA reads its blocks of ranks from unit",
            **{("lycoris.kohya", arg): "LyCORIS trains every layer at network_dim/conv_dim (a preset file's block maps "
                                       "give layers their own dim)" for arg in _LIST_ARGS},
            **{("networks.dylora", arg): "sd-scripts' DyLoRA trains every layer at network_dim" for arg in _LIST_ARGS},
            **{(module, arg): "only networks.lora has block learning rates" for arg in BLOCK_LR_ARGS
               for module in ("lycoris.kohya", "networks.dylora")},
            **{("networks.dylora", arg): "sd-scripts' DyLoRA module has no dropout" for arg in ("rank_dropout", "module_dropout")}}


def _truthy(value: str) -> bool:
    return str(value).lower() != "false"  # LyCORIS 4.1.3's str_bool: anything but "false" is true ("0" too)


def _lycoris_tucker(args: dict[str, str]) -> bool:
    """The Tucker switch as lycoris-lora 4.1.3 reads it: ``use_conv_cp or use_cp or use_tucker`` over the texts, so the
    first one given with any text decides (the Kohya GUI's LoKr passes ``use_cp=False`` beside ``use_tucker``)."""
    return _truthy(next((args[arg] for arg in ("use_conv_cp", "use_cp", "use_tucker") if args.get(arg)), "false"))


def lycoris_reading_notes(network_args: list[str] | None) -> list[str]:
    """Where lycoris-lora 4.1.3 (and so this trainer, to build the same network) reads a switch otherwise than it
    reads: said, with how to get what it says."""
    args = parse_network_args(network_args)
    notes = []
    if args.get("use_tucker") and _truthy(args["use_tucker"]) and not _lycoris_tucker(args):
        first = next(arg for arg in ("use_conv_cp", "use_cp") if args.get(arg))
        notes.append(f"network_args use_tucker={args['use_tucker']} is not used: LyCORIS reads {first}={args[first]}, "
                     f"given too, as its answer (and so does this trainer, to build the same network); drop {first} "
                     "for the Tucker form")
    if args.get("decompose_both", "").lower() == "false":
        notes.append("network_args decompose_both=False decomposes both LoKr factors all the same: LyCORIS passes the "
                     "text on, and any text is true (so does this trainer); leave decompose_both out to keep the first "
                     "factor whole")
    return notes


def network_args_notes(spec: NetworkSpec) -> list[str]:
    """What the network args ask for that the network library they name reads otherwise, or not at all (and so
    neither does this trainer, to build the same network): said, with how to get what they say."""
    args = dict(spec.network_args)
    notes = lycoris_reading_notes([f"{k}={v}" for k, v in spec.network_args]) if spec.network_module == "lycoris.kohya" else []
    unread = [arg for arg in ("block_alphas", "conv_block_dims", "conv_block_alphas") if arg in args and not spec.per_block]
    if unread:
        convs = " (the 3×3 convolutions train only with conv_dim then)" if "conv_block_dims" in unread else ""
        notes.append(f"network_args {', '.join(unread)}: not used without block_dims or a block learning rate "
                     f"(down_lr_weight, mid_lr_weight, up_lr_weight), as sd-scripts reads the block lists only "
                     f"then{convs}; add block_dims to train by block")
    elif spec.per_block and "conv_block_alphas" in args and "conv_block_dims" not in args:
        notes.append(f"network_args conv_block_alphas: not used without conv_block_dims (sd-scripts gives the 3×3 "
                     f"convolutions conv_alpha {1.0 if spec.conv_alpha is None else spec.conv_alpha:g} then); add "
                     "conv_block_dims")
    loraplus = [arg for arg in LORAPLUS_ARGS if arg in args]
    # LyCORIS's LoRA+ picks the weights named lora_up: only its LoRA/LoCon has them (its DyLoRA's are up_list)
    without_up = sorted(spec.algorithms - {"lora"}) if spec.network_module == "lycoris.kohya" else []
    if loraplus and without_up:
        notes.append(f"network_args {', '.join(loraplus)}: LoRA+ raises the rate of the lora_up weights, and the "
                     f"{' and '.join(without_up)} layers have none (LyCORIS picks them by that name), so it changes "
                     "nothing there")
    return notes


def parse_network_args(items: list[str] | None) -> dict[str, str]:
    """``["conv_dim=4", "algo=loha"]`` → {"conv_dim": "4", "algo": "loha"}; a malformed item is named."""
    parsed = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"network_args item {item!r} is not key=value (e.g. conv_dim=4)")
        if key != key.strip():  # its value is read as a number either way, or compared as here after stripping
            raise UserError(f"network_args item {item!r}: sd-scripts reads its key as {key!r}, spaces included, which "
                            f"no network reads, so it trains without it; write {key.strip()}={value.strip()}")
        parsed[key] = value.strip()
    return parsed


def _refuse_unread(network_module: str, args: dict[str, str], network_dropout: float | None) -> None:
    """Refuses the args ``network_module`` does not read (sd-scripts would build another network from the same
    command), naming the module that reads each, then the args no module reads."""
    unread = sorted(args.keys() & _KNOWN - READ_BY[network_module])
    lycoris_only = [arg for arg in unread if arg in READ_BY["lycoris.kohya"] and not any(
        arg in READ_BY[module] for module in MODULES if module != "lycoris.kohya")]
    if lycoris_only:
        instead = []
        if "dropout" in lycoris_only:
            instead.append(f"its dropout is --network_dropout {args['dropout']}" if network_module == "networks.lora"
                           else "sd-scripts' DyLoRA has no neuron dropout")
        instead += [_INSTEAD[network_module, arg] for arg in lycoris_only if (network_module, arg) in _INSTEAD]
        instead = f" ({'; '.join(instead)})" if instead else ""
        raise UserError(f"network_args {', '.join(f'{k}=…' for k in lycoris_only)}: LyCORIS options, which "
                        f"{network_module} would ignore{instead}; use --network_module lycoris.kohya with them")
    if unread:
        readers = {arg: " and ".join(module for module in MODULES if arg in READ_BY[module]) for arg in unread}
        why = dict.fromkeys(_INSTEAD.get((network_module, arg), f"{readers[arg]} read{'' if ' and ' in readers[arg] else 's'} {arg}") for arg in unread)
        them = "it" if len(unread) == 1 else "them"
        raise UserError(f"network_args {', '.join(f'{k}={args[k]}' for k in unread)}: {network_module} does not read "
                        f"{them}, so sd-scripts would build its network without {them} ({'; '.join(why)}); drop {them} "
                        f"or use the --network_module that reads {them}")
    if network_module == "networks.dylora" and network_dropout:
        raise UserError(f"--network_dropout {network_dropout:g}: networks.dylora does not read it (sd-scripts' DyLoRA "
                        "module has no dropout), so sd-scripts would train without it; drop it", "network_dropout")
    unknown = sorted(set(args) - _KNOWN)
    if unknown:
        raise UserError(f"unsupported network_args: {with_closest(unknown, _KNOWN)}")


def _check_block_lr_weights(args: dict[str, str]) -> None:
    """sd-scripts' reading of the block learning rates (lora.py get_block_lr_weight): down/up a comma list or a preset,
    mid a comma list; a single number there stops sd-scripts (it is no preset), and would change nothing here."""
    for arg in ("down_lr_weight", "up_lr_weight"):
        text = args.get(arg)
        if text is not None and "," not in text and text.split("+")[0] not in PRESETS:
            raise UserError(f"network_args {arg}={text}: give one weight per block, comma-separated (12 values, SDXL 9), "
                            f"or a preset ({', '.join(PRESETS)}, optionally +base, e.g. cosine+0.5); sd-scripts stops on "
                            "a single number")
    mid = args.get("mid_lr_weight")
    if mid is not None and mid.split("+")[0] in PRESETS:
        raise UserError(f"network_args mid_lr_weight={mid}: give numbers (1 value, SDXL 3); the presets are for "
                        "down_lr_weight and up_lr_weight, as in sd-scripts")


def spec_from_kohya(network_module: str = "networks.lora", network_dim: int | None = None, network_alpha: float | None = None,
                    network_args: list[str] | dict[str, str] | None = None, network_dropout: float | None = None) -> NetworkSpec:
    """sd-scripts' network options → NetworkSpec, refusing what we would silently mis-train."""
    if network_module not in MODULES:
        raise UserError(f"--network_module {network_module!r} is not supported; use one of {', '.join(MODULES)}")
    args = dict(network_args) if isinstance(network_args, dict) else parse_network_args(network_args)
    _refuse_unread(network_module, args, network_dropout)
    _check_block_lr_weights(args)
    for arg, why in _NOT_HERE.items():
        if arg in args and _truthy(args[arg]):
            raise UserError(f"network_args {arg}={args[arg]}: {why}")
    if "disable_conv_cp" in args:
        raise UserError("network_args disable_conv_cp: LyCORIS reads it from network_args as text, so it never "
                        "turns the Tucker form on; give use_tucker=True")
    fields: dict = {"network_module": network_module, "network_args": tuple(args.items())}
    if network_dim is not None:
        fields["dim"] = int(network_dim)
    if network_alpha is not None:
        fields["alpha"] = float(network_alpha)
    if network_dropout is not None:
        fields["dropout"] = float(network_dropout)
    fields["algorithm"] = "dylora" if network_module == "networks.dylora" else algorithm_name(args.get("algo", "lora"))
    try:
        for arg, name in _BOOL_ARGS.items():
            if arg in args:
                fields[name] = _truthy(args[arg])
        if "decompose_both" in args:  # passed to the module as the text itself, true unless empty
            fields["decompose_both"] = bool(args["decompose_both"])
        if any(arg in args for arg in _TUCKER_ARGS):
            fields["tucker"] = _lycoris_tucker(args)
        if "wd_on_output" in args:
            fields["dora_on_output"] = _truthy(args["wd_on_output"])
        for arg, name in _FLOAT_ARGS.items():
            if arg in args:
                fields[name] = float(args[arg])
        for arg, name in _INT_ARGS.items():
            if arg in args:
                fields[name] = int(args[arg])
        for arg, kind in _LIST_ARGS.items():
            if arg in args:
                fields[arg] = tuple(kind(v) for v in args[arg].split(","))
    except ValueError as error:
        raise UserError(f"network_args: {error}") from error
    if network_module == "lycoris.kohya":
        fields.update(_lycoris_layers(args.get("preset", LYCORIS_DEFAULT), fields))
    if network_module == "networks.dylora" and "conv_dim" in fields:  # sd-scripts' DyLoRA: convolutions as the rest
        dim = fields.get("dim", NetworkSpec.dim)
        if fields["conv_dim"] != dim:
            raise UserError(f"networks.dylora: conv_dim={fields['conv_dim']} must equal --network_dim {dim} (sd-scripts' "
                            f"DyLoRA trains convolutions at the network's rank); give conv_dim={dim}")
        fields["conv_alpha"] = fields.get("alpha", NetworkSpec.alpha)  # conv_alpha is not read there (said by the trainer)
    return dataclasses.replace(NetworkSpec(), **fields)


def forge_problem(spec: NetworkSpec) -> str | None:
    """What Forge's own loader (it reads ``<lora:…>`` there, not this extension) does with a file of ``spec``, where
    it is not what was trained (docs/networks.md)."""
    if spec.algorithm in ("diag-oft", "boft", "ia3"):
        return (f"Forge's own LoRA loader does not apply {spec.algorithm} files (it skips the whole file as a "
                "\"LoRA version mismatch\"); they work in the WebUI 1.10 and ComfyUI — for Forge, train LoRA, LoHa or LoKr")
    if spec.algorithm == "lokr" and spec.tucker:
        return "Forge fails the whole generation on LoKr files with use_tucker; for Forge, train LoKr without it"
    return None


def _lycoris_layers(preset: str, fields: dict) -> dict:
    """LyCORIS's defaults for the layers: its preset (``full`` unless given), convolutions at ``conv_dim`` =
    ``network_dim`` and ``conv_alpha`` = ``network_alpha`` unless given, none where the preset has them off (unless a
    block map gives them a dim), DyLoRA blocks of 4 ranks."""
    layers = lycoris_preset(preset)
    chosen = {"preset": preset, "lycoris": layers,
              "conv_alpha": fields.get("conv_alpha", fields.get("alpha", NetworkSpec.alpha))}
    if fields["algorithm"] == "dylora" and "unit" not in fields:
        chosen["unit"] = 4
    if not layers.convs:
        return {**chosen, "conv_dim": None, "conv_block_dims": None}
    return {**chosen, "conv_dim": fields.get("conv_dim", fields.get("dim", NetworkSpec.dim))}
