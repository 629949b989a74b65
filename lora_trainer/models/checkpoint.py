"""Read a model file, say what it is, and build our models from it.

One function, ``detect_architecture``, looks at tensor names and shapes and returns a ``ModelConfig``; everything
else follows from that config. Weights are read lazily (safetensors mmap, or ``torch.load(mmap=True,
weights_only=True)``) and converted tensor by tensor into the target dtype, so loading never holds a second full
copy of the model.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import UserError
from .configs import FULL_SIZE, SD1, SD2, SDXL, ModelConfig, TextEncoderSlot
from .text_encoders import build_text_encoder
from .unet import UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig, normalize_vae_state_dict

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
ARCHITECTURE_METADATA_KEY = "lora_trainer.architecture"  # JSON overrides for what shapes cannot tell (head counts)


# --- reading tensors lazily --------------------------------------------------------------------------------


class TensorSource:
    """Names, shapes and dtypes of a file's tensors, and each tensor on demand."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype], getter, metadata):
        self.path = path
        self.shapes = shapes
        self.dtypes = dtypes
        self._get = getter
        self.metadata: dict[str, str] = metadata

    @classmethod
    def from_dict(cls, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> TensorSource:
        return cls(
            path,
            {key: tuple(value.shape) for key, value in tensors.items()},
            {key: value.dtype for key, value in tensors.items()},
            tensors.__getitem__,
            metadata or {},
        )

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get(self, key: str) -> torch.Tensor:
        return self._get(key)

    def with_renamed(self, mapping: dict[str, str]) -> TensorSource:
        """A view whose keys are renamed by ``mapping`` (new -> old); keys not in it are dropped."""
        return TensorSource(
            self.path,
            {new: self.shapes[old] for new, old in mapping.items()},
            {new: self.dtypes[old] for new, old in mapping.items()},
            lambda key: self._get(mapping[key]),
            self.metadata,
        )


def open_tensors(path: str | Path) -> TensorSource:
    """Open a ``.safetensors`` or (safely) a ``.ckpt``/``.pt`` file; every failure is a ``UserError`` naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file. Check the path (and the quotes around paths with spaces).")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a model file: give a .safetensors/.ckpt file or a Diffusers model folder.")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error.strerror}). Check its permissions.") from error
    if size == 0:
        raise UserError(f"{path} is empty (0 bytes): the download or copy did not finish. Download it again.")
    if path.suffix.lower() == ".safetensors":
        return _open_safetensors(path)
    return _open_pickle(path)


def _open_safetensors(path: Path) -> TensorSource:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        keys = list(handle.keys())
        shapes, dtypes = {}, {}
        for key in keys:
            tensor_slice = handle.get_slice(key)
            shapes[key] = tuple(tensor_slice.get_shape())
            dtypes[key] = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype(), torch.float32)
        metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(
            f"{path} is not a readable .safetensors file ({error}). It is probably truncated or not a model: "
            "download it again."
        ) from error
    return TensorSource(path, shapes, dtypes, handle.get_tensor, metadata)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _open_pickle(path: Path) -> TensorSource:
    import pickle
    import zipfile

    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as handle:
        start = handle.read(2)
    if not is_zip and not (len(start) == 2 and start[0] == 0x80 and 2 <= start[1] <= 5):  # a pickle's PROTO opcode
        raise UserError(f"{path} is not a checkpoint: neither the zip nor the pickle a .ckpt/.pt is (damaged, or another "
                        "kind of file renamed); download it again or pick another file")
    try:
        # by name: torch < 2.2 (the WebUI's 2.1) maps a file given as a string only
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        raise UserError(
            f"{path} needs unsafe unpickling to load (it stores Python objects, not just tensors), which could run "
            "code from the file. Convert it to .safetensors with a tool you trust, or use a .safetensors version."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable checkpoint ({error}). It is probably truncated: download it again.") from error
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a dictionary of tensors: it is not a model checkpoint.")
    return TensorSource.from_dict(path, {key: value for key, value in data.items() if isinstance(value, torch.Tensor)})


# --- what kind of model is this ----------------------------------------------------------------------------


class UnknownArchitecture(UserError):
    pass


NETWORK_KIND = "a LoRA/LyCORIS network (put it in models/Lora)"
# (key pattern, what it is): files people mistake for SD checkpoints, named so the message can say what they are.
_OTHER_FILE_KINDS = [
    (re.compile(r"(^|\.)joint_blocks\."), "a Stable Diffusion 3 model"),
    (re.compile(r"(^|\.)double_blocks\."), "a Flux model"),
    (re.compile(r"(^|\.)(down_blocks|up_blocks)\..*(down|up)samplers|^model\.diffusion_model\..*\.time_mixer"), None),
    (re.compile(r"^lora_(unet|te\d?)_|\.lora_down\.|\.lora_A\.|\.hada_w1_a$|\.lokr_w1$"), NETWORK_KIND),
    (re.compile(r"^(string_to_param|emb_params|clip_[lg])$"), "a textual-inversion embedding (put it in embeddings/)"),
    (re.compile(r"^(encoder|decoder)\.(conv_in|down|up|mid)"), "a standalone VAE (give it with --vae)"),
    (re.compile(r"^model\.diffusion_model\.(joint_blocks|double_blocks|layers\.0\.)"), "a non-UNet diffusion model"),
]


def looks_like_network(keys: list[str]) -> bool:
    """Whether a file's keys are a LoRA/LyCORIS network's rather than a model's."""
    return _what_else_is_it(keys) == NETWORK_KIND


def _what_else_is_it(keys: list[str]) -> str | None:
    for pattern, kind in _OTHER_FILE_KINDS:
        if kind and any(pattern.search(key) for key in keys):
            return kind
    return None


def native_resolution(checkpoint: Path) -> int | None:
    """The image size a checkpoint was trained at (SD1 512, SDXL 1024, the tiny model 64), from a .safetensors file's
    header or a Diffusers folder's configs (its family's, as it loads); None for other files (a .ckpt would be
    unpickled whole just to ask) and where the header does not say."""
    if Path(checkpoint).is_dir():
        from .diffusers_format import diffusers_family

        family = diffusers_family(Path(checkpoint))
        return family.resolution if family else None
    if Path(checkpoint).suffix.lower() != ".safetensors":
        return None
    try:
        return detect_architecture(open_tensors(checkpoint))[0].resolution
    except (UserError, OSError):
        return None


def detect_architecture(source: TensorSource, overrides: dict | None = None) -> tuple[ModelConfig, str]:
    """Return the model config for a file's tensors and the reason for the verdict, or raise ``UnknownArchitecture``."""
    shapes = source.shapes
    unet_keys = [k for k in shapes if k.startswith("model.diffusion_model.")]
    if not unet_keys and any(k.startswith("model_ema.") for k in shapes):
        shapes = _ema_as_model_shapes(shapes)
        unet_keys = [k for k in shapes if k.startswith("model.diffusion_model.")]
    if "model.diffusion_model.input_blocks.0.0.weight" not in shapes:
        kind = _what_else_is_it(list(shapes))
        found = f"it looks like {kind}" if kind else f"its {len(shapes)} tensors start with " + ", ".join(
            sorted({k.split(".")[0] for k in shapes})[:5]
        )
        raise UnknownArchitecture(
            f"{source.path} is not an SD1/SD2/SDXL checkpoint: {found}. Use a Stable Diffusion 1.x, 2.x or SDXL model."
        )

    if "model.diffusion_model.label_emb.0.0.weight" in shapes:
        if "conditioner.embedders.1.model.ln_final.weight" not in shapes and any(
            k.startswith("conditioner.embedders.0.model.") for k in shapes
        ):
            raise UnknownArchitecture(f"{source.path} is an SDXL refiner, which is not supported: use an SDXL base model.")
        family, reason = SDXL, "UNet has label_emb (size conditioning) and two text encoders"
    elif any(k.startswith("cond_stage_model.model.") for k in shapes) or _linear_proj_in(shapes):
        family, reason = SD2, "OpenCLIP text encoder / linear proj_in"
    else:
        family, reason = SD1, "CLIP ViT-L text encoder, conv proj_in"

    config = _config_from_shapes(family, shapes, {**_metadata_overrides(source.metadata), **(overrides or {})})
    if config == dataclasses.replace(family, prediction_type=config.prediction_type):
        reason += ", full-size"
    else:
        reason += ", non-standard widths read from the tensors"
    return config, reason


def _linear_proj_in(shapes) -> bool:
    return any(k.endswith(".proj_in.weight") and len(s) == 2 for k, s in shapes.items() if k.startswith("model.diffusion_model."))


def _metadata_overrides(metadata: dict[str, str]) -> dict:
    text = metadata.get(ARCHITECTURE_METADATA_KEY)
    return json.loads(text) if text else {}


def _config_from_shapes(family: ModelConfig, shapes: dict, overrides: dict) -> ModelConfig:
    """The family's config with every width, depth and count replaced by what the tensors say."""
    unet = _unet_config_from_shapes(family.unet, shapes, overrides.get("unet", {}))
    slots = tuple(
        _text_encoder_slot_from_shapes(slot, shapes, override)
        for slot, override in zip(family.text_encoders, overrides.get("text_encoders", [{}] * len(family.text_encoders)))
    )
    vae = _vae_config_from_shapes(family.vae, shapes, overrides.get("vae", {}))
    resolution = overrides.get("resolution", family.resolution)
    return dataclasses.replace(family, unet=unet, text_encoders=slots, vae=vae, resolution=resolution)


def _unet_config_from_shapes(base: UNetConfig, shapes: dict, override: dict) -> UNetConfig:
    p = "model.diffusion_model."
    model_channels, in_channels = shapes[p + "input_blocks.0.0.weight"][:2]
    out_channels = shapes[p + "out.2.weight"][0]
    # A level ends where input_blocks holds a Downsample (".op."); levels' widths come from their first ResBlock.
    stage_count = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith(p + "input_blocks."))
    downsample_stages = sorted({int(k.split(".")[3]) for k in shapes if k.startswith(p + "input_blocks.") and ".op." in k})
    num_res_blocks = (downsample_stages[0] - 1) if downsample_stages else stage_count - 1
    per_level = num_res_blocks + 1
    levels = len(downsample_stages) + 1
    channel_mult, depths = [], []
    for level in range(levels):
        first = 1 + level * per_level
        out_ch = shapes[f"{p}input_blocks.{first}.0.out_layers.3.weight"][0]
        channel_mult.append(out_ch // model_channels)
        depths.append(_transformer_depth(shapes, f"{p}input_blocks.{first}.1."))
    context = next((s[1] for k, s in shapes.items() if k.startswith(p) and k.endswith("attn2.to_k.weight")), base.context_dim)
    label = shapes.get(p + "label_emb.0.0.weight")
    fields = dict(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        transformer_depth=tuple(depths),
        transformer_depth_middle=_transformer_depth(shapes, f"{p}middle_block.1."),
        context_dim=context,
        use_linear_projection=_linear_proj_in(shapes),
        adm_in_channels=label[1] if label else None,
    )
    config = dataclasses.replace(base, **fields)
    if config.head_dim and min(model_channels * m for m, d in zip(channel_mult, depths) if d) < config.head_dim:
        config = dataclasses.replace(config, num_heads=1, head_dim=None)  # tiny models: narrower than one head
    return dataclasses.replace(config, **_tuples(override))


def _transformer_depth(shapes: dict, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[1]) for k in shapes if k.startswith(prefix + "transformer_blocks.")}
    return len(indices)


def _text_encoder_slot_from_shapes(slot: TextEncoderSlot, shapes: dict, override: dict) -> TextEncoderSlot:
    p = slot.prefix
    base = slot.config
    if base.layout == "hf_clip":
        vocab, width = shapes.get(p + "text_model.embeddings.token_embedding.weight", (base.vocab_size, base.width))
        positions = shapes.get(p + "text_model.embeddings.position_embedding.weight", (base.max_positions,))[0]
        layer_re = re.compile(re.escape(p) + r"text_model\.encoder\.layers\.(\d+)\.")
        mlp = shapes.get(p + "text_model.encoder.layers.0.mlp.fc1.weight", (base.mlp_width,))[0]
        projection = shapes.get(p + "text_projection.weight", (None,))[0]
    else:
        vocab, width = shapes.get(p + "token_embedding.weight", (base.vocab_size, base.width))
        positions = shapes.get(p + "positional_embedding", (base.max_positions,))[0]
        layer_re = re.compile(re.escape(p) + r"transformer\.resblocks\.(\d+)\.")
        mlp = shapes.get(p + "transformer.resblocks.0.mlp.c_fc.weight", (base.mlp_width,))[0]
        projection = shapes.get(p + "text_projection", (None, None))[1]
    layers = {int(m.group(1)) for k in shapes if (m := layer_re.match(k))}
    config = dataclasses.replace(
        base,
        vocab_size=vocab,
        max_positions=positions,
        width=width,
        layers=len(layers) if layers else base.layers,
        mlp_width=mlp,
        heads=base.heads if width == base.width else max(1, width // 64),
        # a tower without text_projection has none (Diffusers' SD2 encoder); a file without the tower keeps the default
        projection_dim=projection if layers or base.layout == "hf_clip" else base.projection_dim,
    )
    slot_fields = {k: v for k, v in override.items() if k in ("skip_layers", "final_norm")}
    config_fields = {k: v for k, v in override.items() if k not in slot_fields}
    return dataclasses.replace(slot, config=dataclasses.replace(config, **_tuples(config_fields)), **slot_fields)


def _vae_config_from_shapes(base: VAEConfig, shapes: dict, override: dict) -> VAEConfig:
    p = "first_stage_model."
    if p + "encoder.conv_in.weight" not in shapes:
        return dataclasses.replace(base, **_tuples(override))
    base_channels, in_channels = shapes[p + "encoder.conv_in.weight"][:2]
    levels = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith(p + "encoder.down."))
    mult = tuple(shapes[f"{p}encoder.down.{i}.block.0.conv2.weight"][0] // base_channels for i in range(levels))
    blocks = 1 + max(int(k.split(".")[5]) for k in shapes if k.startswith(p + "encoder.down.0.block."))
    z_channels = shapes[p + "post_quant_conv.weight"][0] if p + "post_quant_conv.weight" in shapes else base.z_channels
    out_channels = shapes[p + "decoder.conv_out.weight"][0]
    fields = dict(base_channels=base_channels, channel_mult=mult, num_res_blocks=blocks, z_channels=z_channels,
                  in_channels=in_channels, out_channels=out_channels)
    return dataclasses.replace(base, **fields, **_tuples(override))


def _tuples(override: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in override.items()}


def architecture_overrides(config: ModelConfig) -> dict:
    """What ``detect_architecture`` cannot read off shapes, to store as ``ARCHITECTURE_METADATA_KEY`` metadata."""
    return {
        "unet": {"num_heads": config.unet.num_heads, "head_dim": config.unet.head_dim, "norm_groups": config.unet.norm_groups},
        "text_encoders": [{"heads": slot.config.heads, "activation": slot.config.activation} for slot in config.text_encoders],
        "vae": {"norm_groups": config.vae.norm_groups, "scaling_factor": config.vae.scaling_factor},
        "prediction_type": config.prediction_type,
        "resolution": config.resolution,
    }


# --- EMA ---------------------------------------------------------------------------------------------------


def _ema_as_model_shapes(shapes: dict) -> dict:
    return {**shapes, **{new: shapes[old] for new, old in _ema_names(shapes).items()}}


def _ema_names(keys) -> dict[str, str]:
    """LDM stores EMA weights as ``model_ema.<name without dots>``; map them back to ``model.diffusion_model.*``."""
    # The dotless names are ambiguous only in theory; rebuild them from the regular names when present,
    # otherwise from a full-size UNet of each family.
    ema = {k[len("model_ema."):]: k for k in keys if k.startswith("model_ema.") and k not in ("model_ema.num_updates", "model_ema.decay")}
    names = {}
    for candidate in _all_unet_names(keys):
        dotless = "diffusion_model" + candidate.replace(".", "")
        if dotless in ema:
            names["model.diffusion_model." + candidate] = ema[dotless]
    return names


def _all_unet_names(keys) -> set[str]:
    regular = {k[len("model.diffusion_model."):] for k in keys if k.startswith("model.diffusion_model.")}
    if regular:
        return regular
    names = set()
    for config in (SD1, SD2, SDXL):
        with on_meta():
            names |= set(UNetModel(config.unet).state_dict())
    return names


# --- building the models ------------------------------------------------------------------------------------


@dataclass
class StableDiffusion:
    """A loaded model: its config, its three parts, and where it came from."""

    config: ModelConfig
    unet: UNetModel
    text_encoders: list[nn.Module]
    vae: AutoencoderKL | None
    path: Path | None = None
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    def to(self, device=None, dtype=None) -> StableDiffusion:
        for module in self.modules():
            module.to(device=device, dtype=dtype)
        return self

    def modules(self) -> Iterator[nn.Module]:
        yield self.unet
        yield from self.text_encoders
        if self.vae is not None:
            yield self.vae


_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_", "kaiming_normal_",
          "xavier_uniform_", "xavier_normal_")


@contextmanager
def on_meta():
    """Build modules on the meta device without running their weight initialisers: on meta tensors those go through
    torch's decompositions, whose first use imports torch._dynamo and sympy — ~75 MB and seconds of start-up for
    numbers that are overwritten by the checkpoint anyway."""
    originals = {name: getattr(nn.init, name) for name in _INITS}

    def skipping(original):
        return lambda tensor, *args, **kwargs: tensor if tensor.is_meta else original(tensor, *args, **kwargs)

    for name, original in originals.items():
        setattr(nn.init, name, skipping(original))
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, original in originals.items():
            setattr(nn.init, name, original)


def build_models(config: ModelConfig, device: str | torch.device = "meta"):
    """Instantiate the UNet, text encoders and VAE of ``config`` (on the meta device by default: no memory)."""
    with on_meta() if str(device) == "meta" else torch.device(device):
        unet = UNetModel(config.unet)
        text_encoders = [build_text_encoder(slot.config) for slot in config.text_encoders]
        vae = AutoencoderKL(config.vae)
    return unet, text_encoders, vae


def load_checkpoint(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vae_path: str | Path | None = None,
    vae_dtype: torch.dtype | None = None,
    prediction_type: str | None = None,
    use_ema: bool = False,
    overrides: dict | None = None,
) -> StableDiffusion:
    """Load a single-file checkpoint or a Diffusers folder into our models.

    ``prediction_type`` overrides the eps/v detection; ``use_ema`` takes the EMA UNet weights when the file has both.
    """
    path = Path(path)
    if path.is_dir():
        from .diffusers_format import open_diffusers_folder

        source, folder_overrides = open_diffusers_folder(path)
        overrides = {**folder_overrides, **(overrides or {})}
    else:
        source = open_tensors(path)
    config, reason, notes, source = identify(source, path, prediction_type, use_ema, overrides)
    unet, text_encoders, vae = build_models(config)
    _load_part(unet, source, config.unet_prefix, dtype, device, "UNet")
    for slot, encoder in zip(config.text_encoders, text_encoders):
        _load_part(encoder, source, slot.prefix, dtype, device, "text encoder", fill_missing=_position_ids)
    vae_dtype = vae_dtype or dtype
    if vae_path is not None:
        vae_source = _vae_source(Path(vae_path))
        vae_shapes = {config.vae_prefix + key: shape for key, shape in vae_source.shapes.items()}
        config = dataclasses.replace(config, vae=_vae_config_from_shapes(config.vae, vae_shapes, {}))
        with on_meta():
            vae = AutoencoderKL(config.vae)
        _load_part(vae, vae_source, "", vae_dtype, device, "VAE")
        notes.append(f"VAE from {vae_path}")
    elif any(k.startswith(config.vae_prefix) for k in source.shapes):
        _load_part(vae, source, config.vae_prefix, vae_dtype, device, "VAE")
    else:
        vae = None
        notes.append("no VAE baked in: give one with --vae to encode or decode images")
    model = StableDiffusion(config, unet, text_encoders, vae, path, reason, notes)
    for module in model.modules():
        module.eval().requires_grad_(False)
    return model


def identify(
    source: TensorSource,
    path: Path,
    prediction_type: str | None = None,
    use_ema: bool = False,
    overrides: dict | None = None,
) -> tuple[ModelConfig, str, list[str], TensorSource]:
    """Architecture, eps/v, and which UNet weights to use: (config, reason, notes, the source to load from)."""
    config, reason = detect_architecture(source, overrides)
    notes: list[str] = []
    source = _choose_unet_weights(source, use_ema, notes)
    config = _with_prediction_type(config, source, path, prediction_type, overrides, notes)
    return config, reason, notes, source


def _with_marked_schedule(config: ModelConfig, source: TensorSource, notes: list[str]) -> ModelConfig:
    """A v-prediction file with the ztsnr marker was trained on the zero-terminal-SNR schedule, and trains on it."""
    if "ztsnr" not in source.shapes or config.prediction_type != "v_prediction" or config.schedule.zero_terminal_snr:
        return config
    notes.append("zero terminal SNR schedule (the file's ztsnr marker)")
    return dataclasses.replace(config, schedule=dataclasses.replace(config.schedule, zero_terminal_snr=True))


def _choose_unet_weights(source: TensorSource, use_ema: bool, notes: list[str]) -> TensorSource:
    ema = _ema_names(source.shapes)
    has_regular = "model.diffusion_model.input_blocks.0.0.weight" in source.shapes
    if ema and (use_ema or not has_regular):
        notes.append("UNet weights from the EMA copy")
        mapping = {k: k for k in source.shapes if not k.startswith("model.diffusion_model.")}
        return source.with_renamed({**mapping, **ema})
    if use_ema:
        notes.append("--use_ema was asked for but the file has no EMA weights; using the regular ones")
    return source


def _with_prediction_type(config, source, path, override, overrides, notes) -> ModelConfig:
    """eps or v, decided like the WebUI: the user, a .yaml beside the file, metadata, else a test forward (SD2); and a
    v-prediction file's ztsnr marker, whoever decided."""
    if override:
        notes.append(f"prediction type {override} (set by the user)")
        return _with_marked_schedule(config.with_prediction(override), source, notes)
    if (declared := declared_prediction(source, path, overrides)) is not None:
        prediction, how = declared
        notes.append(f"prediction type {prediction} ({how})")
        return _with_marked_schedule(config.with_prediction(prediction), source, notes)
    if config.name == "sd2" and config.unet == FULL_SIZE["sd2"].unet:
        prediction = "v_prediction" if _responds_like_v_prediction(source, config) else "epsilon"
        notes.append(f"prediction type {prediction} (from a test forward, as the WebUI decides)")
        return config.with_prediction(prediction)
    return config


def _yaml_prediction(path: Path) -> str | None:
    """The prediction type a .yaml beside the checkpoint (the WebUI's config file) declares."""
    yaml_file = None if path.is_dir() else path.with_suffix(".yaml")
    if yaml_file is None or not yaml_file.exists():
        return None
    text = yaml_file.read_text(encoding="utf-8", errors="replace")
    return "v_prediction" if re.search(r"parameterization:\s*[\"']?v[\"']?\s*$", text, re.M) else "epsilon"


def declared_prediction(source: TensorSource, path: Path, overrides: dict | None = None) -> tuple[str, str] | None:
    """eps or v as the file says it, and how it says so: a .yaml beside it, its metadata (ours or modelspec's), a
    Diffusers folder's config (``overrides``), the v_pred marker; None where only a test forward (``identify``) could
    tell. The loader and the job queue's checks read it alike."""
    if prediction := _yaml_prediction(path):
        return prediction, f"from {path.with_suffix('.yaml').name}"
    declared = _prediction_from_metadata(source.metadata) or (overrides or {}).get("prediction_type")
    if declared := declared or _metadata_overrides(source.metadata).get("prediction_type"):
        return declared, "declared by the file"
    if "v_pred" in source.shapes:  # the marker v-prediction SDXL files (NoobAI-XL v-pred) carry, as ComfyUI reads it
        return "v_prediction", "the file's v_pred marker"
    return None


def declared_prediction_type(source: TensorSource, path: Path) -> str | None:
    """The prediction type of ``declared_prediction``, without how it was said."""
    declared = declared_prediction(source, path)
    return None if declared is None else declared[0]


def _prediction_from_metadata(metadata: dict[str, str]) -> str | None:
    value = metadata.get("modelspec.prediction_type", "")
    if value in ("v", "v_prediction"):
        return "v_prediction"
    if value in ("epsilon", "eps"):
        return "epsilon"
    if metadata.get("ss_v_parameterization") in ("True", "true"):
        return "v_prediction"
    architecture = metadata.get("modelspec.architecture", "")
    if architecture.endswith("-v") or "768-v" in architecture:
        return "v_prediction"
    return None


def _responds_like_v_prediction(source: TensorSource, config: ModelConfig) -> bool:
    """The WebUI's test: at t=999 a v-model's output minus a constant 0.5 input averages below -1."""
    with on_meta():
        unet = UNetModel(config.unet)
    _load_part(unet, source, config.unet_prefix, torch.float32, "cpu", "UNet")
    with torch.no_grad():
        x = torch.full((1, 4, 8, 8), 0.5)
        out = unet(x, torch.tensor([999.0]), torch.full((1, 2, config.unet.context_dim), 0.5))
    return (out - x).mean().item() < -1


def _position_ids(key: str, module: nn.Module) -> torch.Tensor | None:
    # Many SD1 files lack position_ids or carry them as broken floats (76.9999): always use the exact range.
    if key.endswith("position_ids"):
        return torch.arange(module.state_dict()[key].shape[-1]).unsqueeze(0)
    return None


def _load_part(module, source, prefix, dtype, device, part_name, fill_missing=None) -> None:
    expected = module.state_dict()
    state = {}
    missing = []
    for key, placeholder in expected.items():
        filled = fill_missing(key, module) if fill_missing else None
        if filled is not None:
            state[key] = filled.to(device)
            continue
        if prefix + key not in source.shapes:
            missing.append(prefix + key)
            continue
        if source.shapes[prefix + key] != tuple(placeholder.shape):
            raise UserError(
                f"{source.path}: tensor {prefix + key} has shape {list(source.shapes[prefix + key])}, "
                f"expected {list(placeholder.shape)} for this {part_name}. The file is damaged or of another architecture."
            )
        tensor = source.get(prefix + key)
        target = dtype if placeholder.is_floating_point() else placeholder.dtype
        state[key] = tensor.to(device=device, dtype=target)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"{source.path}: the {part_name} is incomplete, missing {shown}. The file is damaged or pruned too far.")
    module.load_state_dict(state, strict=True, assign=True)


def _vae_source(path: Path) -> TensorSource:
    """A separate VAE file (LDM keys with or without prefix, or diffusers keys); small enough to read whole."""
    raw = open_tensors(path)
    try:
        state = normalize_vae_state_dict({key: raw.get(key) for key in raw.keys()})
    except ValueError as error:
        raise UserError(f"{path}: {error}") from error
    return TensorSource.from_dict(path, state, raw.metadata)


# --- facts about a file ------------------------------------------------------------------------------------


def dtype_histogram(source: TensorSource) -> dict[str, int]:
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    return dict(Counter(names.get(dtype, str(dtype).removeprefix("torch.")) for dtype in source.dtypes.values()))
