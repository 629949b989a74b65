"""The ``--dataset_config`` file (TOML or JSON) as sd-scripts reads it (``library/config_util.py``, kohya-reference §4).

A file has a ``[general]`` table and ``[[datasets]]``, each with ``[[datasets.subsets]]``. A dataset is DreamBooth when
none of its subsets has ``metadata_file``, fine-tuning when all have it, ControlNet when all have
``conditioning_data_dir`` (only where ControlNet subsets are supported: ``--masked_loss`` in train_network); mixing is
an error. Each option is looked up subset → dataset → general → command-line arguments → default, first non-None
wins, exactly as sd-scripts' ``BlueprintGenerator`` does, so command-line caption and bucket options act as
fallbacks in TOML mode (``train_batch_size`` stands for ``batch_size``, ``dataset_repeats`` for ``num_repeats``).

Where we differ, always towards telling the user: unknown keys name the table, the closest valid key and, when the
key is valid elsewhere, the table it belongs in (sd-scripts prints voluptuous' "extra keys not allowed"); an integer is
accepted where a float is expected (``validation_split = 0``); values sd-scripts would crash on later (no
resolution, bucket sizes that contradict it, a non-positive batch size or step, an unknown resize filter, a dataset
without subsets) are refused here with the fix. Paths are kept as written; sd-scripts resolves relative paths against
the current directory, and so does everything that opens them.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from lora_trainer import toml_text
from lora_trainer.dataset.buckets import BucketSettings, adjusted_bucket_range
from lora_trainer.dataset.caption_files import checked_caption_extension
from lora_trainer.dataset.captions import CaptionOptions
from lora_trainer.errors import UserError
from lora_trainer.safe_io import read_utf8

DREAMBOOTH = "dreambooth"
FINE_TUNING = "fine_tuning"
CONTROLNET = "controlnet"

RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


# --- value kinds: a check and the type named in messages ------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    description: str
    convert: Callable[[Any], Any]  # raises ValueError when the value does not fit


def _exact(*types: type) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        # bool is an int in Python, but `num_repeats = true` is a mistake, not 1
        if isinstance(value, bool) and bool not in types:
            raise ValueError
        if not isinstance(value, types):
            raise ValueError
        return value

    return convert


def _float(value: Any) -> float:
    return float(_exact(int, float)(value))


def _resolution(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (value[0], value[1])
    raise ValueError


def _float_pair(value: Any) -> tuple[float, float]:
    if isinstance(value, list) and len(value) == 2:
        return (_float(value[0]), _float(value[1]))
    raise ValueError


BOOL = _Kind("true or false", _exact(bool))
INT = _Kind("a whole number", _exact(int))
FLOAT = _Kind("a number", _float)
STR = _Kind('a quoted string', _exact(str))
TABLE = _Kind("a table", _exact(dict))
RESOLUTION = _Kind("a number or [width, height] (e.g. 512 or [512, 768])", _resolution)
FLOAT_PAIR = _Kind("two numbers [low, high]", _float_pair)

# sd-scripts' ConfigSanitizer groups; "ascendable" keys may also be written in an outer table
SUBSET_ASCENDABLE = {
    "color_aug": BOOL, "face_crop_aug_range": FLOAT_PAIR, "flip_aug": BOOL, "num_repeats": INT, "random_crop": BOOL,
    "shuffle_caption": BOOL, "keep_tokens": INT, "keep_tokens_separator": STR, "secondary_separator": STR,
    "caption_separator": STR, "enable_wildcard": BOOL, "token_warmup_min": INT, "token_warmup_step": FLOAT,
    "caption_prefix": STR, "caption_suffix": STR, "custom_attributes": TABLE, "resize_interpolation": STR,
}
DROPOUT_ASCENDABLE = {"caption_dropout_every_n_epochs": INT, "caption_dropout_rate": FLOAT, "caption_tag_dropout_rate": FLOAT}
DREAMBOOTH_ASCENDABLE = {"caption_extension": STR, "class_tokens": STR, "cache_info": BOOL}
DREAMBOOTH_DISTINCT = {"image_dir": STR, "is_reg": BOOL, "alpha_mask": BOOL}
FINE_TUNING_DISTINCT = {"metadata_file": STR, "image_dir": STR, "alpha_mask": BOOL}
CONTROLNET_ASCENDABLE = {"caption_extension": STR, "cache_info": BOOL}
CONTROLNET_DISTINCT = {"image_dir": STR, "conditioning_data_dir": STR}
DATASET_ASCENDABLE = {
    "batch_size": INT, "bucket_no_upscale": BOOL, "bucket_reso_steps": INT, "enable_bucket": BOOL,
    "max_bucket_reso": INT, "min_bucket_reso": INT, "validation_seed": INT, "validation_split": FLOAT,
    "resolution": RESOLUTION, "network_multiplier": FLOAT, "resize_interpolation": STR,
}
REQUIRED = {DREAMBOOTH: ("image_dir",), FINE_TUNING: ("metadata_file",), CONTROLNET: ("image_dir", "conditioning_data_dir")}

_SUBSET_SCHEMA = {
    DREAMBOOTH: {**SUBSET_ASCENDABLE, **DREAMBOOTH_DISTINCT, **DREAMBOOTH_ASCENDABLE, **DROPOUT_ASCENDABLE},
    FINE_TUNING: {**SUBSET_ASCENDABLE, **FINE_TUNING_DISTINCT, **DROPOUT_ASCENDABLE},
    CONTROLNET: {**SUBSET_ASCENDABLE, **CONTROLNET_DISTINCT, **CONTROLNET_ASCENDABLE, **DROPOUT_ASCENDABLE},
}
_DATASET_SCHEMA = {
    DREAMBOOTH: {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE, **DREAMBOOTH_ASCENDABLE, **DROPOUT_ASCENDABLE},
    FINE_TUNING: {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE, **DROPOUT_ASCENDABLE},
    CONTROLNET: {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE, **CONTROLNET_ASCENDABLE, **DROPOUT_ASCENDABLE},
}


def _general_schema(support_controlnet: bool) -> dict[str, _Kind]:
    return {
        **DATASET_ASCENDABLE, **SUBSET_ASCENDABLE, **DREAMBOOTH_ASCENDABLE,
        **(CONTROLNET_ASCENDABLE if support_controlnet else {}), **DROPOUT_ASCENDABLE,
    }


# command-line names that differ from the file's
CLI_NAME_TO_CONFIG_NAME = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}


# --- the resolved configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubsetConfig:
    """One subset with every option resolved (sd-scripts' names); ``kind`` is the dataset's kind."""

    kind: str
    image_dir: Path | None = None
    metadata_file: Path | None = None
    conditioning_data_dir: Path | None = None
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    cache_info: bool = False
    alpha_mask: bool = False
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    custom_attributes: Mapping[str, Any] = field(default_factory=dict)
    resize_interpolation: str | None = None

    @property
    def caption_options(self) -> CaptionOptions:
        return CaptionOptions(**{f.name: getattr(self, f.name) for f in fields(CaptionOptions)})


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset: its kind, resolved options and subsets. With ``enable_bucket`` the min/max bucket sizes are
    already snapped to the step as sd-scripts does (its metadata stores them as ``None`` when buckets are off)."""

    kind: str
    subsets: tuple[SubsetConfig, ...]
    resolution: tuple[int, int] | None = None
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_seed: int | None = None
    validation_split: float = 0.0
    resize_interpolation: str | None = None
    prior_loss_weight: float = 1.0
    debug_dataset: bool = False

    @property
    def is_dreambooth(self) -> bool:
        return self.kind == DREAMBOOTH

    @property
    def bucket_settings(self) -> BucketSettings:
        if self.resolution is None:
            raise UserError("This dataset has no resolution; set resolution = 512 (or [width, height]) or pass --resolution.")
        return BucketSettings(
            self.resolution, self.enable_bucket, self.min_bucket_reso, self.max_bucket_reso,
            self.bucket_reso_steps, self.bucket_no_upscale,
        )


@dataclass(frozen=True)
class DatasetGroupConfig:
    """All datasets of a run, plus what sd-scripts would only log (duplicate or zero-repeat subsets it ignores)."""

    datasets: tuple[DatasetConfig, ...]
    warnings: tuple[str, ...] = ()


_SUBSET_FIELDS = tuple(f.name for f in fields(SubsetConfig) if f.name != "kind")
_DATASET_FIELDS = tuple(f.name for f in fields(DatasetConfig) if f.name not in ("kind", "subsets"))


# --- reading and checking ---------------------------------------------------------------------------------------


def read_config_file(path: Path) -> dict:
    """The raw tables of a ``.toml`` or ``.json`` dataset config; syntax errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Dataset config {path} does not exist; check the path given to --dataset_config.")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise UserError(f"Dataset config {path} must end in .toml or .json (sd-scripts reads only those).")
    text = read_utf8(path, "Dataset config")
    try:
        loaded = toml_text.loads(text, f"Dataset config {path}") if suffix == ".toml" else json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"Dataset config {path} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno}).") from None
    if not isinstance(loaded, dict):
        raise UserError(f"Dataset config {path} must hold a [general] table and [[datasets]] tables.")
    return loaded


def _where_else(key: str, kind: str | None, support_controlnet: bool) -> str | None:
    """Where a key that is not allowed in this table would be read, if anywhere."""
    if key in DREAMBOOTH_ASCENDABLE and kind == FINE_TUNING:
        return "a DreamBooth dataset (subsets with image_dir and caption files, no metadata_file)"
    if key in SUBSET_ASCENDABLE or key in DROPOUT_ASCENDABLE or key in DREAMBOOTH_ASCENDABLE:
        return "[general], [[datasets]] or [[datasets.subsets]]"
    if key in DATASET_ASCENDABLE:
        return "[general] or [[datasets]]"
    if key in ("image_dir", "is_reg", "alpha_mask", "metadata_file"):
        return "[[datasets.subsets]]"
    if key == "conditioning_data_dir":
        return "[[datasets.subsets]] of a ControlNet dataset (read only with --masked_loss)"
    if key == "subsets":
        return "[[datasets]], written as [[datasets.subsets]]"
    if key in ("general", "datasets"):
        return "the top level of the file"
    return None


def _unknown_key(source: str, key: str, table: str, allowed: Mapping[str, Any], kind: str | None,
                 support_controlnet: bool) -> UserError:
    belongs = _where_else(key, kind, support_controlnet)
    if belongs:
        return UserError(f"{source}: {key} cannot be set in {table}; it belongs in {belongs}.")
    closest = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.5)
    hint = f"did you mean {closest[0]}?" if closest else f"valid keys there: {', '.join(sorted(allowed))}."
    return UserError(f"{source}: unknown key {key!r} in {table}; {hint}")


def _checked_table(source: str, table: str, values: Any, schema: Mapping[str, _Kind], kind: str | None,
                   support_controlnet: bool, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise UserError(f"{source}: {table} must be a table of key = value lines.")
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key in extra:
            continue
        if key not in schema:
            raise _unknown_key(source, key, table, {**schema, **dict.fromkeys(extra)}, kind, support_controlnet)
        value_kind = schema[key]
        try:
            checked[key] = value_kind.convert(value)
        except (ValueError, TypeError):
            hint = " (write it without quotes)" if isinstance(value, str) and value_kind is not STR else ""
            raise UserError(f"{source}: {key} in {table} must be {value_kind.description}, not {value!r}{hint}.") from None
    return checked


def _dataset_kind(source: str, table: str, subsets: list, support_controlnet: bool) -> str:
    if support_controlnet and all("conditioning_data_dir" in subset for subset in subsets):
        return CONTROLNET
    if all("metadata_file" in subset for subset in subsets):
        return FINE_TUNING
    if all("metadata_file" not in subset for subset in subsets):
        return DREAMBOOTH
    raise UserError(
        f"{source}: {table} mixes subsets with metadata_file (fine-tuning) and without (DreamBooth folders); "
        "put them in two separate [[datasets]]."
    )


def _cli_values(cli_args: Mapping[str, Any] | object | None) -> dict[str, Any]:
    """Command-line options as fallbacks, under the file's names, with "512,768"-style strings parsed as sd-scripts'
    ``prepare_dataset_args`` does."""
    if cli_args is None:
        return {}
    items = cli_args.items() if isinstance(cli_args, Mapping) else vars(cli_args).items()
    values = {CLI_NAME_TO_CONFIG_NAME.get(name, name): value for name, value in items}
    resolution = values.get("resolution")
    if isinstance(resolution, str):
        try:
            sides = tuple(int(side) for side in resolution.split(","))
        except ValueError:
            raise UserError(f'--resolution {resolution!r} must be "512" or "512,768".') from None
        if len(sides) not in (1, 2):
            raise UserError(f'--resolution {resolution!r} must be "512" or "512,768".')
        values["resolution"] = (sides[0], sides[-1])
    elif isinstance(resolution, int):
        values["resolution"] = (resolution, resolution)
    face_crop = values.get("face_crop_aug_range")
    if isinstance(face_crop, str):
        try:
            low, high = (float(part) for part in face_crop.split(","))
        except ValueError:
            raise UserError(f'--face_crop_aug_range {face_crop!r} must be two numbers "low,high".') from None
        values["face_crop_aug_range"] = (low, high)
    return values


def _look_up(name: str, layers: list[Mapping[str, Any]], default: Any) -> Any:
    for layer in layers:
        value = layer.get(name)
        if value is not None:
            return value
    return default


def _field_default(cls: type, name: str) -> Any:
    for f in fields(cls):
        if f.name == name:
            return f.default if f.default_factory is MISSING else f.default_factory()
    raise KeyError(name)


def _subset_config(kind: str, layers: list[Mapping[str, Any]]) -> SubsetConfig:
    values = {name: _look_up(name, layers, _field_default(SubsetConfig, name)) for name in _SUBSET_FIELDS}
    for name in ("image_dir", "metadata_file", "conditioning_data_dir"):
        if values[name] is not None:
            values[name] = Path(values[name])
    extension = values["caption_extension"]
    if extension and not extension.startswith("."):
        values["caption_extension"] = "." + extension
    if values["face_crop_aug_range"] is not None:
        values["face_crop_aug_range"] = tuple(values["face_crop_aug_range"])
    values["custom_attributes"] = dict(values["custom_attributes"] or {})
    return SubsetConfig(kind=kind, **values)


def _check_dataset_values(source: str, table: str, dataset: DatasetConfig) -> DatasetConfig:
    if dataset.batch_size < 1:
        raise UserError(f"{source}: batch_size of {table} is {dataset.batch_size}; it must be 1 or more.")
    interpolations = [dataset.resize_interpolation] + [subset.resize_interpolation for subset in dataset.subsets]
    for interpolation in interpolations:
        if interpolation is not None and interpolation not in RESIZE_INTERPOLATIONS:
            closest = difflib.get_close_matches(interpolation, RESIZE_INTERPOLATIONS, n=1)
            hint = f"did you mean {closest[0]}?" if closest else f"use one of {', '.join(RESIZE_INTERPOLATIONS)}."
            raise UserError(f"{source}: resize_interpolation {interpolation!r} in {table} is not a resize filter; {hint}")
    for number, subset in enumerate(dataset.subsets, 1):
        if subset.face_crop_aug_range is not None and subset.face_crop_aug_range[0] > subset.face_crop_aug_range[1]:
            raise UserError(f"{source}: face_crop_aug_range in {table} must be [low, high] with low <= high.")
        if subset.caption_extension:
            command_line = source.startswith("--")  # folders named on the command line: said in its options
            try:
                checked_caption_extension(subset.caption_extension, "--caption_extension" if command_line else "caption_extension")
            except UserError as error:
                where = f"{source}: {error}" if command_line else f"{source}: [[datasets.subsets]] #{number} of {table}: {error}"
                raise UserError(where, "caption_extension") from None
    if dataset.resolution is None:
        sizes = "512 for SD1, 768 for SD2-768, 1024 for SDXL"
        if source.startswith("--"):  # folders named on the command line: there is no file to set it in
            raise UserError(f"{source}: no --resolution; give the training size ({sizes}; or width,height), around "
                            "which the images are bucketed.", "resolution")
        raise UserError(f"{source}: {table} has no resolution; set resolution = 512 (or [width, height]; {sizes}) in "
                        "[general] or [[datasets]], or pass --resolution.", "resolution")
    if min(dataset.resolution) < 1:
        raise UserError(f"{source}: resolution of {table} is {dataset.resolution}; both sides must be positive.")
    if not dataset.enable_bucket:
        step = dataset.bucket_reso_steps
        if step > 0 and any(side % step for side in dataset.resolution):
            down = "x".join(str(max(step, side // step * step)) for side in dataset.resolution)
            up = "x".join(str(-(-side // step) * step) for side in dataset.resolution)
            width, height = dataset.resolution
            sizes = " or ".join(dict.fromkeys((down, up)))  # below the step both round to it: one size, said once
            if source.startswith("--"):  # folders named on the command line: said in its options
                raise UserError(f"{source}: --resolution {width},{height} is not a multiple of --bucket_reso_steps {step}; "
                                f"use {sizes.replace('x', ',')}, or add --enable_bucket.", "resolution")
            raise UserError(f"{source}: resolution {width}x{height} of {table} is not a multiple of bucket_reso_steps "
                            f"{step}; use {sizes}, or turn on enable_bucket.")
        return dataset
    try:
        min_reso, max_reso = adjusted_bucket_range(
            dataset.resolution, dataset.min_bucket_reso, dataset.max_bucket_reso, dataset.bucket_reso_steps
        )
    except UserError as error:
        raise UserError(f"{source}: {table}: {error}") from None
    return replace(dataset, min_bucket_reso=min_reso, max_bucket_reso=max_reso)


def _same_subset(a: SubsetConfig, b: SubsetConfig) -> bool:
    # sd-scripts' Subset.__eq__: by image folder (and conditioning folder), or by metadata file for fine-tuning
    if a.kind == FINE_TUNING:
        return a.metadata_file == b.metadata_file
    return a.image_dir == b.image_dir and a.conditioning_data_dir == b.conditioning_data_dir


def resolve_dataset_config(
    user_config: Mapping[str, Any],
    source: str | Path = "dataset config",
    cli_args: Mapping[str, Any] | object | None = None,
    support_controlnet: bool = False,
) -> DatasetGroupConfig:
    """Check a loaded config against sd-scripts' schema and resolve every option (subset → dataset → general →
    ``cli_args`` → default). ``cli_args`` holds command-line options by their sd-scripts names (a mapping or an
    object such as the trainer's options); ``source`` names the file in messages."""
    source = str(source)
    for key in user_config:
        if key not in ("general", "datasets"):
            raise _unknown_key(source, key, "the top level", {"general": None, "datasets": None}, None, support_controlnet)
    general = _checked_table(
        source, "[general]", user_config.get("general", {}), _general_schema(support_controlnet), None, support_controlnet
    )
    raw_datasets = user_config.get("datasets", [])
    if not isinstance(raw_datasets, list) or not raw_datasets:
        raise UserError(f"{source}: no [[datasets]] table; add one with at least one [[datasets.subsets]] (image_dir = ...).")
    cli = _cli_values(cli_args)

    datasets: list[DatasetConfig] = []
    warnings: list[str] = []
    for dataset_number, raw_dataset in enumerate(raw_datasets, start=1):
        table = f"[[datasets]] #{dataset_number}"
        if not isinstance(raw_dataset, dict):
            raise UserError(f"{source}: {table} must be a table.")
        raw_subsets = raw_dataset.get("subsets", [])
        if not isinstance(raw_subsets, list) or not all(isinstance(subset, dict) for subset in raw_subsets):
            raise UserError(f"{source}: subsets of {table} must be [[datasets.subsets]] tables.")
        if not raw_subsets:
            raise UserError(f"{source}: {table} has no [[datasets.subsets]]; add one with image_dir = \"...\".")
        kind = _dataset_kind(source, table, raw_subsets, support_controlnet)
        dataset_values = _checked_table(source, table, raw_dataset, _DATASET_SCHEMA[kind], kind, support_controlnet, ("subsets",))

        subsets: list[SubsetConfig] = []
        for subset_number, raw_subset in enumerate(raw_subsets, start=1):
            subset_table = f"[[datasets.subsets]] #{subset_number} of {table}"
            subset_values = _checked_table(source, subset_table, raw_subset, _SUBSET_SCHEMA[kind], kind, support_controlnet)
            for required in REQUIRED[kind]:
                if required not in subset_values:
                    raise UserError(f"{source}: {subset_table} has no {required}; add {required} = \"path/to/folder\".")
            subset = _subset_config(kind, [subset_values, dataset_values, general, cli])
            name = subset.metadata_file if kind == FINE_TUNING else subset.image_dir
            if subset.num_repeats < 1:
                warnings.append(f"{source}: {subset_table} ({name}) is ignored: num_repeats is {subset.num_repeats}, below 1.")
                continue
            if any(_same_subset(subset, earlier) for earlier in subsets):
                warnings.append(f"{source}: {subset_table} ({name}) is ignored: the same folder is already a subset of {table}.")
                continue
            subsets.append(subset)

        values = {name: _look_up(name, [dataset_values, general, cli], _field_default(DatasetConfig, name)) for name in _DATASET_FIELDS}
        if values["resolution"] is not None:
            values["resolution"] = tuple(values["resolution"])
        dataset = DatasetConfig(kind=kind, subsets=tuple(subsets), **values)
        datasets.append(_check_dataset_values(source, table, dataset))
    return DatasetGroupConfig(tuple(datasets), tuple(warnings))


def load_dataset_config(
    path: Path, cli_args: Mapping[str, Any] | object | None = None, support_controlnet: bool = False
) -> DatasetGroupConfig:
    """Read, check and resolve a ``--dataset_config`` file (see ``resolve_dataset_config``)."""
    return resolve_dataset_config(read_config_file(path), Path(path), cli_args, support_controlnet)
