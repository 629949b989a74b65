"""Grids as data: a request (two axes, a LoRA or training run, the generation settings) becomes a plan of cells,
each one complete ``GenerationSettings`` whose prompt carries the ``<lora:…>`` tags; ``run_grid`` sends the cells
to a host (``app.host.Host``: our own sampler standalone, the WebUI's txt2img there), so a cell is exactly the
image a user later gets by typing that prompt.

Axis kinds: ``epoch`` (files of a training run, found automatically), ``strength`` (lists or ranges as in the X/Y/Z
plot), ``lora`` (LoRA names, two such axes combine a character and a style), ``prompt`` (Prompt S/R: the first
value is searched in the prompt and replaced by each value), ``seed`` and ``checkpoint`` ("trained on the base
model, used on a fine-tune"). Every cell shares the seed unless the seed is an axis; the baseline column shows the
row without the LoRA(s) the columns bring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from PIL import Image

from ..errors import UserError
from ..safe_io import atomic_path, read_safetensors_metadata, replace_path, write_text
from ..sampling.txt2img import GenerationSettings
from .axes import (EpochFile, check_size, fixed_seeds, glob_escape, is_final_file, is_step_file, parse_values, run_files,
                   run_name, step_of, whole_numbers)
from .render import (GridResult, assemble, axes_infotext, check_megapixels, grid_font_file, grid_infotext,
                     megapixel_limit, no_font_advice, save_grid)

log = logging.getLogger(__name__)

AXIS_KINDS = ("epoch", "strength", "lora", "prompt", "seed", "checkpoint")
# why a kind cannot be on both axes (two LoRA axes combine a character and a style; two prompt axes replace two texts)
_ONE_AXIS_ONLY = {"epoch": "every cell would stack two epoch files of the run",
                  "strength": "a cell takes the x axis's strength, so every row would be the same",
                  "seed": "a cell takes the x axis's seed, so every row would be the same",
                  "checkpoint": "a cell takes the x axis's checkpoint, so every row would be the same"}
# the axes a grid starts with (the Grid tab's fields, the CLI's --x and --y): strengths across, every epoch file down
DEFAULT_X_AXIS = ("strength", "0.2-1.0 (+0.2)")
DEFAULT_Y_AXIS = ("epoch", "")
LOSSES_KEY = "lora_trainer.losses"  # written by the trainer (training/trainer.py, judgement())


class LoraResolver(Protocol):
    def resolve(self, name: str) -> Path | None: ...  # a LoraLibrary has ``folders`` too, which errors name


class LoraNotFound(UserError):
    """A LoRA the Lora folders do not hold (``by_name``: no file of that name; else a file outside them): ``subject``
    says which and where was searched, ``advice`` what to do, which the grid command says in its own terms."""

    def __init__(self, subject: str, advice: str, field: str | None, by_name: bool):
        super().__init__(f"{subject}; {advice}", field)
        self.subject, self.by_name = subject, by_name

    def advised(self, advice: str) -> LoraNotFound:
        return LoraNotFound(self.subject, advice, self.field, self.by_name)


class LoraNameShadowed(UserError):
    """A grid's file whose ``<lora:stem>`` means another file to the generator: ``subject`` says which two, ``note``
    what the other one is where known, ``advice`` how to part them in the tab's terms (the Lora list refreshed after
    the move), which the grid command, reading its folders afresh each time, says in its own (``advised``)."""

    def __init__(self, subject: str, advice: str, note: str = ""):
        super().__init__(f"{subject}: {advice}{note}")
        self.subject, self.note = subject, note

    def advised(self, advice: str) -> LoraNameShadowed:
        return LoraNameShadowed(self.subject, advice, self.note)


@dataclass
class AxisSpec:
    kind: str
    values: list[str] = field(default_factory=list)  # epoch: empty = every file of the run


@dataclass
class GridRequest:
    x: AxisSpec
    y: AxisSpec
    settings: GenerationSettings
    lora: str = ""  # the LoRA or training run the axes vary around: a name the host knows, a file path or a <lora:…> tag
    strength: float | None = None  # used where no axis sets the strength; None: a <lora:name:weight> tag's, else 1
    checkpoint: str | None = None  # host checkpoint title; None: the host's current one
    baseline: bool = True
    confirmed: bool = False


@dataclass(frozen=True)
class EpochLoss:
    training: float | None
    validation: float | None


@dataclass(frozen=True)
class GridCell:
    settings: GenerationSettings
    checkpoint: str | None
    loras: tuple[tuple[Path, float], ...]  # what the prompt's tags resolve to

    @property
    def key(self) -> tuple:
        s = self.settings
        return (s.prompt, s.negative_prompt, s.seed, s.steps, s.sampler, s.cfg_scale, s.width, s.height, self.checkpoint)


@dataclass
class GridPlan:
    cells: list[list[GridCell]]
    row_labels: list[str]
    column_labels: list[str]
    title: str
    legend: str  # "Lora hashes" of every file the grid uses
    files: list[Path]
    epoch_losses: dict[Path, EpochLoss] = field(default_factory=dict)
    best_epoch: Path | None = None  # the file of the run's recommended epoch, where the grid shows it
    notes: list[str] = field(default_factory=list)  # what the plan changed or left out of the request, in sentences
    file_stats: dict[Path, tuple[int, int]] = field(default_factory=dict)  # size and mtime of each file, when planned
    infotext: dict[str, str] = field(default_factory=dict)  # the grid PNG's Script, X/Y Type and Values
    baseline: bool = False  # the first column is the row without what the columns bring

    @property
    def size(self) -> tuple[int, int]:
        return len(self.cells), len(self.cells[0]) if self.cells else 0


@dataclass(frozen=True)
class _AxisValue:
    label: str
    loras: tuple[Path, ...] = ()  # LoRA files this value adds (epoch, lora)
    strength: float | None = None
    prompt: tuple[str, str] | None = None  # (search, replacement)
    seed: int | None = None
    checkpoint: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# Reading axes.


_LOSS_KINDS = ("epoch_training_loss", "epoch_validation_loss", "step_validation_loss")


def recorded_losses(files: list[EpochFile]) -> dict[str, dict[str, float]]:
    """The losses the trainer recorded in the run's files (each holds them up to its own step): ``epoch_training_loss``
    and ``epoch_validation_loss`` by epoch, ``step_validation_loss`` by step. The newest file's record, completed by
    the older files whose records agree with it where both have a value: a run's files (resumed, or copied by a
    promotion) share one history, while an earlier run's files left under the same name (more epochs, other losses)
    would have put their epochs into this run's."""
    records = []
    # oldest first; at equal times (FAT's 2 s, a touch) the final file last: a new run always rewrites it
    for file in sorted(files, key=lambda f: ((_stat(f.path) or (0, 0))[1], is_final_file(f.path), f.steps or 0)):
        text = read_safetensors_metadata(file.path).get(LOSSES_KEY)
        try:
            data = json.loads(text) if text else {}
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and any(data.get(kind) for kind in _LOSS_KINDS):
            records.append({kind: dict(data.get(kind) or {}) for kind in _LOSS_KINDS})
    if not records:
        return {}
    merged = records.pop()  # the newest, by modification time
    for record in reversed(records):
        if all(merged[kind].get(key, value) == value for kind in _LOSS_KINDS for key, value in record[kind].items()):
            for kind in _LOSS_KINDS:
                merged[kind] = {**record[kind], **merged[kind]}
    return merged


def epoch_losses(files: list[EpochFile], recorded: dict[str, dict[str, float]] | None = None) -> dict[Path, EpochLoss]:
    """Each file's losses as the trainer recorded them (``recorded``: the run's record, ``recorded_losses``, read from
    ``files`` where not given): an epoch file's (or the final file's) epoch losses; a step file's validation loss at
    its step (the epoch losses of its ss_epoch describe other weights)."""
    recorded = recorded_losses(files) if recorded is None else recorded
    losses = {}
    for file in files:
        if is_step_file(file.path):
            validation = recorded.get("step_validation_loss", {}).get(str(file.steps))
            if validation is not None:
                losses[file.path] = EpochLoss(None, validation)
            continue
        if file.epoch is None:
            continue
        key = str(file.epoch)
        train, validation = recorded.get("epoch_training_loss", {}).get(key), recorded.get("epoch_validation_loss", {}).get(key)
        if train is not None or validation is not None:
            losses[file.path] = EpochLoss(train, validation)
    return losses


def recommended_epoch(recorded: dict[str, dict[str, float]]) -> int | None:
    """The run's recommended epoch, as the trainer made it at its end and ``lora inspect`` makes it again from a
    file: ``recommended_from_recorded`` over the run's record (``recorded_losses`` of all its files: those on a grid's
    axis alone may stop before the epochs that decide it). None where no file recorded losses (sd-scripts' runs)."""
    from ..training.evaluation import recommended_from_recorded

    advice = recommended_from_recorded(recorded)
    return advice.epoch if advice else None


def best_epoch(shown: list[EpochFile], run: list[EpochFile], recorded: dict[str, dict[str, float]],
               notes: list[str]) -> Path | None:
    """The file of the run's recommended epoch (from its record, ``recorded``) among the ``shown`` ones (the axis's),
    which the grid stars; where the axis leaves it out, none is starred (the best of those shown is not the run's
    best) and ``notes`` says to add it, or, where the run kept no file of it, how to keep one."""
    from ..training.evaluation import unkept_epoch

    epoch = recommended_epoch(recorded)
    if epoch is None:
        return None
    # the first of a kind in training order: at equal steps the final file, which a grid shows before its copy
    found = next((f.path for f in shown if f.epoch == epoch and not is_step_file(f.path)), None)
    if found is None and any(f.epoch == epoch and not is_step_file(f.path) for f in run):
        notes.append(f"The recommended epoch {epoch} is not on the epoch axis: add it.")
    elif found is None:
        notes.append(f"The recommended epoch is {epoch}, and {unkept_epoch(epoch)}.")
    return found


def recommended_label(label: str) -> str:
    """An epoch's grid label marked as the trainer's recommendation: ``* recommended`` on a line of its own under the
    first (a column's label is as wide as its cell: a longer first line ran into the next column's; in one too narrow
    for the word, ``* rec.``: ``render.SHORT_FORMS``), in characters the picture's default font draws (it has no ★:
    the Grid tab's table stars it)."""
    first, newline, rest = label.partition("\n")
    return f"{first}\n* recommended{newline}{rest}"


def loss_text(loss: EpochLoss | None) -> str:
    if loss is None:
        return ""
    if loss.validation is not None:
        return f"val loss {loss.validation:.4f}"
    return f"loss {loss.training:.4f}" if loss.training is not None else ""


LOSS_COLUMNS = ["epoch file", "training loss", "validation loss", "best epoch"]


def loss_rows(plan: GridPlan) -> list[list]:
    """The losses the trainer recorded for the grid's epoch files, one row each (``LOSS_COLUMNS``), the trainer's
    recommendation starred: the Grid tab's table, the CLI's lines."""
    return [[Path(path).stem, loss.training, loss.validation, "★ recommended" if path == plan.best_epoch else ""]
            for path, loss in plan.epoch_losses.items()]


def lora_tag(text: str) -> tuple[str, float | None] | None:
    """A ``<lora:name:weight>`` (or ``<lyco:…>``) tag as a prompt holds it, copied into a grid's LoRA or run: its
    name and its weight (None where it gives none), read as the WebUI reads the tag; None for anything else (a name,
    a path). A tag that sets more than one strength (te and unet apart, dyn, lbw) is refused: a grid draws each LoRA
    at one strength."""
    from ..networks.activation import parse_lora_call

    items = _tag_items(text)
    if items is None:
        return None
    call = parse_lora_call(items)
    if call.unet_multiplier != call.te or call.dyn is not None or call.blocks is not None:
        raise UserError(f"{text.strip()} sets more than one strength, and a grid draws each LoRA at one: give "
                        f"<lora:{call.name}:{call.te:g}>")
    return call.name, call.te if len(items) > 1 else None


def is_lora_tag(text: str) -> bool:
    """``text`` is one ``<lora:…>`` tag (which names a LoRA as a prompt does: never by a path)."""
    return _tag_items(text) is not None


def _tag_items(text: str) -> list[str] | None:
    from ..models.prompt import EXTRA_NETWORK
    from ..networks.activation import TAG_NAMES

    match = EXTRA_NETWORK.fullmatch(text.strip())
    return match.group(2).split(":") if match and match.group(1) in TAG_NAMES else None


def missing_epoch(name: str, library: LoraResolver) -> str | None:
    """Where ``name`` is ``run@eN`` of a run the Lora folders hold, which kept no file of epoch N: says so and which
    epochs it has (None otherwise), where "no LoRA named 'run@e99'" sent the user looking for a file."""
    from ..networks.activation import EPOCH_SUFFIX

    match = EPOCH_SUFFIX.match(name.strip())
    run = library.resolve(match.group("run")) if match else None
    if run is None:
        return None
    epochs = sorted({f.epoch for f in run_files(run) if f.epoch is not None and not is_step_file(f.path)})
    have = f"it has epochs {', '.join(map(str, epochs))}" if epochs else "none of its files says its epoch"
    return f"{name.strip()!r}: the run {match.group('run')!r} has no epoch {int(match.group('epoch'))} ({have})"


def resolve_lora(name: str, library: LoraResolver, field_name: str = "LoRA", field: str = "lora") -> Path:
    """A LoRA as the host will find it from ``<lora:stem>``: by name (or a ``<lora:name:weight>`` tag's), or a file
    path whose stem the host resolves to that same file. ``field``: the request's key the mistakes name."""
    text = name.strip()
    if not text:
        raise UserError(f"{field_name}: no LoRA given; pick a training run or type a LoRA name", field)
    try:
        tag = lora_tag(text)
    except UserError as error:
        raise UserError(f"{field_name}: {error}", field) from None
    text = tag[0] if tag else text
    path = Path(text)
    folders = [str(folder) for folder in getattr(library, "folders", [])]
    where = f"the Lora folder{'s' if len(folders) > 1 else ''}" + (f" ({', '.join(folders)})" if folders else "")
    if not tag and path.suffix and path.is_file():
        found = library.resolve(path.stem)
        if found is None or Path(found).resolve() != path.resolve():
            raise LoraNotFound(f"{field_name}: {path} is not in {where}, which the generator reads",
                               "copy or promote it there (or add its folder to the Lora folders)", field, by_name=False)
        return path.resolve()
    found = library.resolve(text)
    if found is None and (missing := missing_epoch(text, library)):
        raise UserError(f"{field_name}: {missing}", field)
    if found is None:
        raise LoraNotFound(f"{field_name}: no LoRA named {text!r} in {where}",
                           "check the name (a file added since the list was read shows after a refresh)", field,
                           by_name=True)
    return Path(found).resolve()


def _run_file(request: GridRequest, library: LoraResolver, field_name: str = "training run") -> Path:
    """The file the request's run is found from (``run_files``) and drawn with where no axis brings a LoRA: the LoRA
    its name or path gives, except where a name is only the ``ss_output_name`` of the file found (the run's final
    ``NAME.safetensors`` not saved yet, the run still training): then the run's latest file of its own name beside
    it. sd-scripts names a run's files ``NAME``, ``NAME-000001`` and ``NAME-step00000050``; another file trained
    under the name (``zkstar r2``, a resized copy or a copy of an epoch) is neither its final file nor one of its
    epochs, while the final file renamed after training (``char_v2``: the same network and training session, trained
    further than the run's last file of its own name) stays the run's."""
    found = resolve_lora(request.lora, library, field_name)
    name = request.lora.strip()
    found_metadata = read_safetensors_metadata(found)
    if found.stem == name or found_metadata.get("ss_output_name") != name or not is_final_file(found):
        return found
    try:
        latest = run_files(found.with_name(f"{name}{found.suffix}"))[-1].path
    except UserError:  # no file of the run's own name: the file found is all there is (renamed after training)
        return found
    latest_metadata = read_safetensors_metadata(latest)
    same = ("ss_network_module", "ss_network_dim", "ss_network_alpha")
    sessions = {found_metadata.get("ss_session_id"), latest_metadata.get("ss_session_id")} - {None}
    if ([_value(found_metadata.get(key)) for key in same] == [_value(latest_metadata.get(key)) for key in same]
            and len(sessions) <= 1
            and _steps(found_metadata) > _steps(latest_metadata)):
        return found
    return latest


def _value(text: str | None) -> float | str | None:
    """A metadata value as a number where it is one: alpha "8" and "8.0" are one value (a run resumed across the
    version that began writing a file's whole alpha as sd-scripts does)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def _steps(metadata: dict[str, str]) -> int:
    try:
        return int(metadata.get("ss_steps", ""))
    except ValueError:
        return -1


def _run_of(request: GridRequest, library: LoraResolver) -> list[EpochFile]:
    return run_files(_run_file(request, library))


def _axis_values(axis: AxisSpec, request: GridRequest, library: LoraResolver,
                 notes: list[str]) -> tuple[list[_AxisValue], list[EpochFile]]:
    values = [v for v in (str(v).strip() for v in axis.values) if v]
    if axis.kind in ("epoch", "seed"):
        values = whole_numbers(values)  # 1-10 [5], 1-3: the X/Y/Z plot's whole-number ranges
    if axis.kind == "epoch":
        run = files = _run_of(request, library)
        if values:
            files = _chosen_files(files, values, notes)
        if not files:
            raise UserError(f"epoch axis: none of the epochs {', '.join(values)} is among the run's files")
        losses = epoch_losses(files, recorded_losses(run))  # the run's record, as the star and the table read it
        labels = [f.label + (f"\n{loss_text(losses.get(f.path))}" if f.path in losses else "") for f in files]
        return [_AxisValue(label, loras=(f.path,)) for f, label in zip(files, labels)], files
    if axis.kind == "strength":
        return [_AxisValue(f"strength {s:g}", strength=s) for s in parse_values(", ".join(values))], []
    if axis.kind == "lora":
        return [_lora_value(v, library) for v in values], []
    if axis.kind == "prompt":
        if unbalanced := next((v for v in values if any(v.count(a) != v.count(b) for a, b in ("()", "[]", "{}"))), None):
            raise UserError(f"prompt axis: {unbalanced!r} opens a bracket it does not close: values are split at each "
                            'comma, as in the X/Y/Z plot; put a value that holds a comma in double quotes, such as '
                            '"(red hair, blue eyes:1.2)"')
        if values and values[0] not in request.settings.prompt and values[0] not in request.settings.negative_prompt:
            raise UserError(f"prompt axis: {values[0]!r} (the first value) does not occur in the prompt or the negative "
                            "prompt; the first value is the text each value replaces, as in Prompt S/R")
        return [_AxisValue(v, prompt=(values[0], v)) for v in values], []
    if axis.kind == "seed":
        try:
            seeds = [int(v) for v in values]
        except ValueError:
            raise UserError(f"seed axis: {', '.join(values)} must be whole numbers") from None
        low, high = SETTING_RANGES["seed"][1:]  # below -1 the standalone host drew a new random seed at each image
        if (wrong := next((seed for seed in seeds if not low <= seed <= high), None)) is not None:
            raise UserError(f"seed axis: {wrong} is not a seed; give whole numbers from -1 (random) to {high}")
        return [_AxisValue(f"seed {seed}", seed=seed) for seed in fixed_seeds(seeds)], []
    if axis.kind == "checkpoint":  # a file or a Diffusers folder by its name, a title as the host lists it
        return [_AxisValue(Path(v).name if Path(v).is_dir() else Path(v).stem if Path(v).suffix else v, checkpoint=v)
                for v in values], []
    raise UserError(f"axis kind {axis.kind!r} is unknown; use one of {', '.join(AXIS_KINDS)}")


def _lora_value(value: str, library: LoraResolver) -> _AxisValue:
    """A LoRA axis's value: a LoRA, drawn at the cell's strength, or a ``<lora:name:weight>`` tag, at its weight."""
    path = resolve_lora(value, library, "LoRA axis", None)
    weight = (lora_tag(value) or (None, None))[1]
    return _AxisValue(path.stem if weight is None else f"{path.stem}:{weight:g}", loras=(path,), strength=weight)


_STEP_VALUE = re.compile(r"^step\s*(\d+)$", re.IGNORECASE)


def _chosen_files(files: list[EpochFile], values: list[str], notes: list[str]) -> list[EpochFile]:
    """The epoch axis's values: epoch numbers pick epoch files and the final file (by ss_epoch); ``step 50`` picks a
    step file (sd-scripts saves it with the epochs completed as ss_epoch: "1" would also pick a snapshot inside
    epoch 2)."""
    wanted = {int(v) for v in values if v.isdigit()}
    steps = {int(m.group(1)) for v in values if (m := _STEP_VALUE.match(v))}
    unknown = [v for v in values if not v.isdigit() and not _STEP_VALUE.match(v)]
    if unknown:
        raise UserError(f"epoch axis: {', '.join(unknown)} is not an epoch number; give numbers such as 2, 4, 6 "
                        "(or step 50 for a file saved at a step)")
    epoch_files = [f for f in files if not is_step_file(f.path)]
    step_files = {step_of(f.path): f for f in files if is_step_file(f.path)}
    missing = sorted(wanted - {f.epoch for f in epoch_files})
    if missing:  # a row silently left out reads as a grid of the epochs asked for
        have = ", ".join(str(f.epoch) for f in epoch_files if f.epoch is not None) or "none numbered"
        said = f"epoch {missing[0]} is" if len(missing) == 1 else f"epochs {', '.join(map(str, missing))} are"
        raise UserError(f"epoch axis: {said} not among the run's files (epochs {have})")
    if missing := sorted(steps - set(step_files)):
        have = ", ".join(map(str, sorted(step_files))) or "none"
        raise UserError(f"epoch axis: step {', '.join(map(str, missing))} is not among the run's step files (steps {have})")
    if step_files and not steps:
        notes.append(f"The run's files saved at steps ({', '.join(f'step {s}' for s in sorted(step_files))}) are not "
                     f"on the epoch axis: add them to it as step {min(step_files)}.")
    return [f for f in files if (f.epoch in wanted and not is_step_file(f.path)) or
            (is_step_file(f.path) and step_of(f.path) in steps)]


def _grid_lora_files(request: GridRequest, library: LoraResolver) -> set[Path]:
    """Every file the grid's axes may put in a cell: each file of the run, each LoRA of a LoRA axis. Names that do not
    resolve are left to the axes, which say so."""
    files: set[Path] = set()
    with contextlib.suppress(UserError):
        if request.lora.strip():
            files |= {f.path.resolve() for f in _run_of(request, library)}
    for axis in (request.x, request.y):
        for value in axis.values if axis.kind == "lora" else ():
            with contextlib.suppress(UserError):
                files.add(resolve_lora(str(value), library, "LoRA axis", None))
    return files


def _without_grid_tags(prompt: str, files: set[Path], library: LoraResolver, notes: list[str]) -> str:
    """The prompt without the ``<lora:…>`` tags that name one of ``files`` (by file name, alias or ``name@eN``, as
    the host resolves them): left in, every cell stacked its own file on the tag's and the "no LoRA" column had
    one. Tags of other LoRAs stay in every cell, the baseline too; ``notes`` says both."""
    from ..models.prompt import EXTRA_NETWORK
    from ..networks.activation import TAG_NAMES

    removed, kept = [], []

    def take(match: re.Match) -> str:
        if match.group(1) not in TAG_NAMES:
            return match.group(0)
        found = library.resolve(match.group(2).split(":")[0].strip())
        chosen = removed if found is not None and Path(found).resolve() in files else kept
        chosen.append(match.group(0))
        return "" if chosen is removed else match.group(0)

    cleaned = EXTRA_NETWORK.sub(take, prompt).rstrip()  # only the tag goes: the rest is the text the host encodes
    if removed:
        notes.append(f"The grid took {' '.join(removed)} out of the prompt: it sets that LoRA in each cell itself, and "
                     "the baseline has none.")
    if kept:
        notes.append(f"{' '.join(kept)} {'stays' if len(kept) == 1 else 'stay'} in every cell, the baseline too.")
    return cleaned


# ---------------------------------------------------------------------------------------------------------------
# The plan.


def _cell(request: GridRequest, seed: int, parts: list[_AxisValue], fallback_lora: Path | None) -> GridCell:
    # a strength axis's value, else the request's; a LoRA axis's tag keeps its own weight
    strength = next((p.strength for p in parts if p.strength is not None and not p.loras), request.strength)
    loras = tuple((path, strength if part.strength is None else part.strength) for part in parts for path in part.loras)
    if not loras and fallback_lora is not None:
        loras = ((fallback_lora, strength),)
    prompt, negative = request.settings.prompt, request.settings.negative_prompt
    for part in parts:
        if part.prompt:  # in both, as the WebUI's Prompt S/R replaces
            prompt, negative = prompt.replace(*part.prompt), negative.replace(*part.prompt)
    cell_seed = next((p.seed for p in parts if p.seed is not None), seed)
    checkpoint = next((p.checkpoint for p in parts if p.checkpoint is not None), request.checkpoint)
    tags = "".join(f" <lora:{path.stem}:{weight:g}>" for path, weight in loras)
    settings = dataclasses.replace(request.settings, prompt=prompt + tags, negative_prompt=negative, seed=cell_seed,
                                   batch_size=1)
    return GridCell(settings, checkpoint, loras)


def base_model_title(files: list[Path], checkpoints: dict[str, Path]) -> str | None:
    """The host's title for the checkpoint the LoRAs were trained on (their ``ss_sd_model_name``, one for all), if
    it lists that file: a LoRA is compared on its own base model, and on another one of other widths it fits nothing."""
    names = {read_safetensors_metadata(path).get("ss_sd_model_name") for path in files if path.suffix == ".safetensors"}
    if len(names) != 1 or None in names:
        return None
    (name,) = names
    return next((title for title, path in checkpoints.items() if Path(path).name == Path(name).name), None)


def plan_on_base_model(request: GridRequest, library: LoraResolver, checkpoints: dict[str, Path],
                       current: Path | None = None) -> tuple[GridPlan, str | None]:
    """``plan_grid``; with no checkpoint asked, on the LoRAs' own base model where the host lists it (its title is
    returned, else None: the host's current model, ``current`` where the host says which). The cells a checkpoint axis
    does not set take it, as they take a checkpoint asked: the plan is not made twice (each making reads every epoch
    file's metadata and hashes). A LoRA made for another model family than its cell's checkpoint is refused here."""
    plan = plan_grid(request, library)
    base = None if request.checkpoint else base_model_title(plan.files, checkpoints)
    if base is not None:
        cells = [[cell if cell.checkpoint is not None else dataclasses.replace(cell, checkpoint=base) for cell in row]
                 for row in plan.cells]
        plan = dataclasses.replace(plan, cells=cells)
    _check_model_families(plan, checkpoints, current)
    return plan, base


def current_checkpoint(host) -> Path | None:
    """The checkpoint ``host`` draws a cell without one on, where it says: its loaded model, else the one it loads
    first (standalone). None where it does not say: the family check then passes those cells."""
    return getattr(host, "loaded_checkpoint", None) or getattr(host, "default_checkpoint", None)


def plan_for_host(request: GridRequest, library: LoraResolver, host,
                  checkpoints: dict[str, Path] | None = None) -> tuple[GridPlan, str | None]:
    """``plan_on_base_model`` over the ``host``'s checkpoints (``checkpoints``, where the caller listed them already)
    and the model it draws on now, refused where the cells come to more megapixels than the host takes, as the
    X/Y/Z plot refuses them: how the Grid tab, the API and the CLI plan a grid."""
    plan, base = plan_on_base_model(request, library, host.checkpoints() if checkpoints is None else checkpoints,
                                    current_checkpoint(host))
    check_megapixels(*plan.size, request.settings.width, request.settings.height, megapixel_limit(host))
    return plan, base


# each generation setting's type and range, checked when the grid is asked for (not when its first cell fails)
SETTING_RANGES = {"steps": (int, 1, 150), "seed": (int, -1, 2**32 - 1), "width": (int, 64, 2048),
                  "height": (int, 64, 2048), "clip_skip": (int, 1, 12), "cfg_scale": (float, 0.0, 100.0)}


# settings that must be a multiple of a step: an image's sides (the latent image is an eighth of it)
SETTING_MULTIPLES = {"width": 8, "height": 8}


def checked_setting(key: str, value, name: str) -> int | float:
    """A setting of ``SETTING_RANGES`` as its type; a value of another type, out of its range or, for the image's
    sides, not a multiple of 8 (``SETTING_MULTIPLES``; the nearest ones suggested) is refused, naming ``name`` (the
    API's key, the CLI's option, the tab's field). True and false are not numbers here (Python counts them as ints)."""
    kind, low, high = SETTING_RANGES[key]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or kind is int and value != int(value)
            or not low <= value <= high):
        raise UserError(f"{name}: give a {'whole ' if kind is int else ''}number from {low} to {high}", name)
    step = SETTING_MULTIPLES.get(key)
    if step and value % step:
        below = int(value) // step * step
        nearest = [side for side in (below, below + step) if low <= side <= high]
        raise UserError(f"{name}: {value:g} is not a multiple of {step} (the image's sides must be); give "
                        f"{' or '.join(map(str, nearest))}", name)
    return kind(value)


def host_sampler(host, name: str, field: str) -> str:
    """``name`` as the ``host`` names that sampler; one it lacks is refused (``field``: the option or key to name),
    where the WebUI would draw every cell with its default sampler instead."""
    named = host.sampler(name)
    if named is None:
        raise UserError(f"{field}: {name!r} is not a sampler here; use one of {', '.join(host.sampler_names())}", field)
    return named


def _check_model_families(plan: GridPlan, checkpoints: dict[str, Path], current: Path | None) -> None:
    """An SDXL LoRA on an SD1 checkpoint (or the reverse) fits no layer: the host skips it, every cell equals the
    baseline, and its warning came after the whole grid (once a session). Files or checkpoints that do not say
    their family pass."""
    from functools import cache

    families = cache(checkpoint_family)
    pairs = {(path, cell.checkpoint) for row in plan.cells for cell in row for path, _ in cell.loras}
    for path, title in sorted(pairs, key=lambda pair: (str(pair[0]), pair[1] or "")):
        checkpoint = checkpoints.get(title) if title else current
        if checkpoint is None and title and Path(title).exists():  # a file or a Diffusers folder
            checkpoint = Path(title)
        made_for = lora_families(path)
        family = families(Path(checkpoint)) if checkpoint and made_for else None
        if family and family not in made_for:
            lora_kind = "/".join(sorted(made_for))
            raise UserError(f"{path.name} is an {lora_kind} LoRA and the checkpoint {Path(checkpoint).name} is {family}: it "
                            f"fits none of its layers and every cell would equal the baseline; pick an {lora_kind} "
                            f"checkpoint, or a LoRA trained on {family}", "checkpoint")


_SDXL_KEY_PREFIXES = ("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_",
                      "lora_unet_output_blocks_")  # sd-scripts' SDXL names; SD1/SD2 use lora_te_, lora_unet_down_blocks_…
_SD1_SD2_KEY_PREFIXES = ("lora_te_", "lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")


def lora_families(path: Path) -> set[str]:
    """The model families a LoRA file is made for: {"SD1"}, {"SD2"}, {"SDXL"} from its metadata, else from its
    tensor names ({"SD1", "SD2"}: their names are the same); empty when it does not say."""
    from ..networks.activation import sd_version_of

    version = sd_version_of(read_safetensors_metadata(path))
    if version != "unknown":
        return {version}
    if Path(path).suffix.lower() != ".safetensors":
        return set()
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception:  # noqa: BLE001 - an unreadable file says nothing here; the host reports it when loading
        return set()
    if any(key.startswith(_SDXL_KEY_PREFIXES) for key in keys):
        return {"SDXL"}
    return {"SD1", "SD2"} if any(key.startswith(_SD1_SD2_KEY_PREFIXES) for key in keys) else set()


def checkpoint_family(path: Path) -> str | None:
    """"SD1", "SD2" or "SDXL" from a .safetensors checkpoint's tensor names and shapes (its header only) or a
    Diffusers folder's configs; None for other files (a .ckpt would be unpickled whole) and files that are not a known
    model."""
    from ..models.checkpoint import detect_architecture, open_tensors
    from ..models.diffusers_format import diffusers_family

    if Path(path).is_dir():
        family = diffusers_family(Path(path))
        return family.label if family else None
    if Path(path).suffix.lower() != ".safetensors" or not Path(path).is_file():
        return None
    try:
        return detect_architecture(open_tensors(path))[0].label.removesuffix("-v")
    except UserError:
        return None


def _strength_of(request: GridRequest) -> float:
    """The strength where no axis sets one: the request's, or the weight of the ``<lora:name:weight>`` tag it names
    its LoRA by (the two differing are refused), else 1."""
    try:
        weight = (lora_tag(request.lora) or (None, None))[1]
    except UserError:
        return 1.0 if request.strength is None else request.strength  # said where the LoRA is resolved, naming it
    if weight is not None and request.strength is not None and weight != request.strength:
        raise UserError(f"strength: {request.strength:g}, and {request.lora.strip()} says {weight:g}: give one of them "
                        "and leave the other out", "strength")
    return next((s for s in (request.strength, weight) if s is not None), 1.0)


def _axis_values_of(name: str, axis: AxisSpec, request: GridRequest, library: LoraResolver, notes: list[str]):
    """``_axis_values``, its mistakes naming the axis (the API's field) unless they name a field of their own."""
    try:
        return _axis_values(axis, request, library, notes)
    except UserError as error:
        error.field = error.field or name  # the same error (a LoraNotFound stays one, for the CLI's advice)
        raise


def plan_grid(request: GridRequest, library: LoraResolver) -> GridPlan:
    """Cells row by row (y values), columns = baseline (optional) + x values. Raises UserError for an empty axis, an
    unknown LoRA, and more than 400 cells unless ``request.confirmed``."""
    for name, axis in (("x", request.x), ("y", request.y)):
        if axis.kind not in AXIS_KINDS:
            raise UserError(f"axis kind {axis.kind!r} is unknown; use one of {', '.join(AXIS_KINDS)}", name)
        if axis.kind != "epoch" and not [v for v in axis.values if str(v).strip()]:
            raise UserError(f"the {axis.kind} axis has no values", name)
    if request.x.kind == request.y.kind and request.x.kind in _ONE_AXIS_ONLY:
        raise UserError(f"y: both axes are {request.x.kind} axes, and {_ONE_AXIS_ONLY[request.x.kind]}; pick "
                        f"another kind for y, or put every {request.x.kind} on the x axis", "y")
    request = dataclasses.replace(request, strength=_strength_of(request))
    notes: list[str] = []
    prompt = _without_grid_tags(request.settings.prompt, _grid_lora_files(request, library), library, notes)
    request = dataclasses.replace(request, settings=dataclasses.replace(request.settings, prompt=prompt))
    xs, x_files = _axis_values_of("x", request.x, request, library, notes)
    ys, y_files = _axis_values_of("y", request.y, request, library, notes)
    for name, values, other in (("x", xs, request.y), ("y", ys, request.x)):
        if other.kind == "strength" and (weighted := next((v for v in values if v.loras and v.strength is not None), None)):
            raise UserError(f"{name}: {weighted.label} gives its LoRA a weight, and the strength axis sets each cell's: "
                            "leave the weights out of the LoRA axis", name)
    try:
        check_size(len(ys), len(xs) + int(request.baseline), request.confirmed)
    except UserError as error:
        raise UserError(str(error), "confirmed") from None
    brings_lora = any(axis.kind in ("epoch", "lora") for axis in (request.x, request.y))
    fallback = None if brings_lora else _run_file(request, library, "LoRA")
    seed = request.settings.resolved_seed()

    cells = []
    for y in ys:
        row = []
        if request.baseline:
            row.append(_baseline(request, seed, y))
        row += [_cell(request, seed, [x, y], fallback) for x in xs]
        cells.append(row)

    files = list(dict.fromkeys(path for row in cells for cell in row for path, _ in cell.loras))
    _check_names_resolve(files, library)
    epoch_files = x_files or y_files
    run = _run_of(request, library) if epoch_files else []
    recorded = recorded_losses(run)  # read once for the table and the star
    losses = epoch_losses(epoch_files, recorded)
    best = best_epoch(epoch_files, run, recorded, notes) if epoch_files else None
    x_name = xs[0].label if request.x.kind == "lora" and len(xs) == 1 else "LoRA"
    baseline_label = "no LoRA" if request.x.kind != "lora" else f"without {x_name}"
    if request.x.kind == "epoch" and request.y.kind == "lora":  # the baseline keeps the row's LoRA (_baseline)
        baseline_label = f"without {run_name(run[-1].path)}"  # its final file saved or not
    if request.x.kind == "seed":  # the columns' seeds are not the baseline's: say which one it drew
        baseline_label += f", seed {seed}"
    s = request.settings
    # a seed axis gives each column (or row) its own seed: "seed 11" was the baseline's alone
    seeds = "seeds per column" if request.x.kind == "seed" else "seeds per row" if request.y.kind == "seed" else f"seed {seed}"
    title = f"{s.prompt} | {seeds} | {s.sampler}, {s.steps} steps, CFG {s.cfg_scale:g}, {s.width}x{s.height}"

    def label(value: _AxisValue, kind: str) -> str:
        return recommended_label(value.label) if kind == "epoch" and best and value.loras == (best,) else value.label

    return GridPlan(
        cells=cells,
        row_labels=[label(y, request.y.kind) for y in ys],
        column_labels=([baseline_label] if request.baseline else []) + [label(x, request.x.kind) for x in xs],
        title=title,
        legend=lora_hashes(files),
        files=files,
        epoch_losses=losses,
        best_epoch=best,
        notes=notes,
        file_stats={path: _stat(path) for path in files},
        infotext=axes_infotext({"X": (request.x, xs), "Y": (request.y, ys)}),
        baseline=request.baseline,
    )


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def changed_since_planned(plan: GridPlan, cell: GridCell) -> str | None:
    """Why ``cell`` cannot be drawn as planned: one of its LoRA files was deleted or rewritten since (the host would
    draw without it, or with other weights, under the planned label and hash); None when they are as planned."""
    for path, _ in cell.loras:
        planned = plan.file_stats.get(path)
        if planned is None:
            continue
        now = _stat(path)
        if now is None:
            return f"{path.name} was deleted"
        if now != planned:
            return f"{path.name} changed"
    return None


def _check_names_resolve(files: list[Path], library: LoraResolver) -> None:
    """Each file the cells name by ``<lora:stem>`` must be the one that name resolves to: a file of the same name
    in another folder wins in the host (the last one listed), and its images would pass for this file's."""
    for path in files:
        found = library.resolve(path.stem)
        if found is not None and Path(found).resolve() != Path(path).resolve():
            raise LoraNameShadowed(f"<lora:{path.stem}> means {found} to the generator, not {path} of this grid",
                                   "rename or move one of the two files, then refresh",
                                   _earlier_promotion(Path(found), Path(path)))


def _baseline(request: GridRequest, seed: int, y: _AxisValue) -> GridCell:
    """The row without what the columns bring: when the columns are LoRAs (LoRA A × B, epochs × a style) the row's
    own LoRA stays; otherwise no LoRA at all, with the row's prompt, seed and checkpoint."""
    if request.x.kind in ("epoch", "lora"):
        return _cell(request, seed, [y], None)
    return _cell(request, seed, [dataclasses.replace(y, loras=())], None)


def lora_hashes(files: list[Path]) -> str:
    """The infotext's ``Lora hashes`` value: ``name: addnet hash`` (the first 12 hex digits of the tensor data's
    SHA-256, which the WebUI shows and civitai looks up)."""
    from ..hashing import tensor_data_sha256

    return ", ".join(f"{path.stem}: {tensor_data_sha256(path)[:12]}" for path in files)


# ---------------------------------------------------------------------------------------------------------------
# Running a plan through a host.


def run_grid(host, plan: GridPlan, out_folder: Path | None, progress: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> GridResult:
    """Generate every cell through ``host.generate`` (identical cells once) inside ``host.batch`` when the host has
    one (its progress then spans the grid), between cells honouring ``should_stop`` and the host's Interrupt, then
    assemble the grid and save it and every cell with infotext. An interrupted grid keeps the cells finished so far
    (the others grey) and says so in ``GridResult.stopped``; a cell the host cut short is grey too, and so is a cell
    whose LoRA file was deleted or rewritten since the plan (the reason written on it). When not one cell finished,
    nothing is saved (``GridResult.path`` stays None)."""
    started = time.perf_counter()
    switching_before = getattr(host, "switching_seconds", 0.0)  # hosts that merge LoRAs themselves measure it
    unique = list(dict.fromkeys(cell.key for row in plan.cells for cell in row))
    done: dict[tuple, object] = {}
    skipped: dict[tuple, str] = {}  # cells whose files changed since planning: grey, with the reason written on them
    stopped = False
    by_key = {cell.key: cell for row in plan.cells for cell in row}
    batch = getattr(host, "batch", None)
    steps = sum(by_key[key].settings.steps for key in unique)
    with batch(len(unique), "Prompt-Lora-Grid", steps) if batch else contextlib.nullcontext():
        for index, key in enumerate(unique):
            if (should_stop and should_stop()) or host.interrupted():
                stopped = True
                break
            cell = by_key[key]
            if reason := changed_since_planned(plan, cell):
                skipped[key] = reason
                log.warning("Prompt-Lora-Grid: a cell was left grey: %s since the grid was planned", reason)
            elif (image := host.generate(cell.settings, cell.checkpoint)) is not None:
                done[key] = image
            if progress:
                progress(index + 1, len(unique))
        else:
            stopped = host.interrupted() and len(done) < len(unique)
    width, height = plan.cells[0][0].settings.width, plan.cells[0][0].settings.height
    blank = Image.new("RGB", (width, height), (128, 128, 128))
    font_file = grid_font_file(host)
    undrawn: dict[str, None] = {}  # the labels' and the grey cells' characters no font draws: one warning says them
    images = [[done[c.key].image if c.key in done else _grey_cell(blank, skipped[c.key], font_file, undrawn)
               if c.key in skipped else blank for c in row] for row in plan.cells]
    infos = [[done[c.key].infotext if c.key in done else "" for c in row] for row in plan.cells]
    legend = f"Lora hashes: {plan.legend}" if plan.legend else ""
    grid = assemble(images, plan.row_labels, plan.column_labels, plan.title, legend, font_file, undrawn)
    warnings = [no_font_advice("".join(undrawn))] if undrawn else []
    switching = getattr(host, "switching_seconds", 0.0) - switching_before
    result = GridResult(grid, images, time.perf_counter() - started, switching, stopped=stopped,
                        finished=len(done), total=len(unique), infotexts=infos, warnings=warnings)
    return result if out_folder is None else save_result(result, plan, Path(out_folder))


def save_result(result: GridResult, plan: GridPlan, out_folder: Path) -> GridResult:
    """``run_grid``'s grid and every cell it drew saved in ``out_folder`` with their infotext (``result.path`` and
    ``cell_paths`` set); nothing where not one cell finished. Apart from drawing for the grid command, whose Ctrl-C
    stops the drawing but not the save."""
    if result.finished:
        result.path, result.cell_paths = save_grid(
            result.image, result.cells, result.infotexts, out_folder,
            grid_infotext(result.infotexts, {**plan.infotext, "Lora hashes": plan.legend}))
    return result


def unfinished_images(result: GridResult, plan: GridPlan) -> str | None:
    """What a grid that did not draw every image says (None where it drew them all), in the images of its rows ×
    columns that the grid's own line counts, where the cells counted were distinct images (the baseline shared by
    every row is drawn once): "2 of 7 cells" read wrong beside "grid of 3 × 3 images"."""
    if not result.stopped and result.finished >= result.total:
        return None
    rows, columns = plan.size
    images = "images"
    if result.total < rows * columns:
        baseline_once = plan.baseline and len({row[0].key for row in plan.cells}) == 1
        shared = "the baseline cells share one" if baseline_once and rows * columns - result.total == rows - 1 \
            else "identical cells share one"
        images = f"distinct images ({shared})"
    if result.stopped:
        return f"interrupted after {result.finished} of {result.total} {images}; the rest are grey"
    return f"{result.total - result.finished} of {result.total} {images} were skipped; they are grey"


def _grey_cell(blank: Image.Image, reason: str, font_file: str | None = None,
               undrawn: dict[str, None] | None = None) -> Image.Image:
    """A grey cell that says why it was not drawn, wrapped to its width as the labels are, in a font sized to the
    cell as theirs (the default 10 px could not be read on a 1024 px cell in the grid), chosen as theirs."""
    from PIL import ImageDraw

    from .render import _wrap, drawable, label_font

    cell = blank.copy()
    font = label_font(max(10, cell.width // 16), reason, font_file, undrawn)
    draw = ImageDraw.Draw(cell)
    draw.multiline_text((3, 3), "\n".join(_wrap(drawable(reason, font), font, cell.width - 6, draw)),
                        fill=(255, 255, 255), font=font)
    return cell


def _keep_as_epoch_file(target: Path) -> Path | None:
    """The file a promotion would replace (by default the run's final file: its last epoch, which sd-scripts saves
    under no other name) is kept under its epoch's name, ``<name>-000008.safetensors``, where it stays on the grid's
    epoch axis; where that name is taken or the epoch unknown, the promotion is refused instead. Returns the new
    name, or None when that epoch's file is already there (the final file was a copy of it)."""
    epoch = read_safetensors_metadata(target).get("ss_epoch", "") if target.suffix == ".safetensors" else ""
    kept = target.with_name(f"{target.stem}-{int(epoch):06d}{target.suffix}") if epoch.isdigit() else None
    if kept is not None and kept.exists() and filecmp.cmp(kept, target, shallow=False):
        return None  # the final file is a copy of that epoch (an earlier promotion): nothing to keep
    if kept is None or kept.exists():
        raise UserError(f"promote: {target} would be replaced, and it cannot be kept as an epoch file "
                        f"({'its epoch is unknown' if kept is None else f'{kept.name} exists'}); give another final name")
    try:
        replace_path(target, kept)
    except PermissionError as error:
        raise UserError(f"promote: {target} could not be renamed to {kept.name} ({error.strerror}): another program has "
                        "it open (the WebUI or ComfyUI after using it?); close it, or give another final name") from None
    return kept


@dataclass(frozen=True)
class Promotion:
    """What ``promote`` did, for the sentence the Grid tab shows."""

    source: Path  # the epoch file promoted
    path: Path  # the final file written
    strength: float
    kept: Path | None = None  # the earlier file of that name, renamed to keep it (its epoch's name)
    card_from: Path | None = None  # the run's card the new card was made from

    @property
    def message(self) -> str:
        text = f"Promoted {self.source.name} to {self.path} with preferred weight {self.strength:g}."
        if self.kept is not None:
            text += f" The earlier {self.path.name} is kept as {self.kept.name}."
        if self.card_from is not None:
            text += f" Its card (activation text, description …) is a copy of {self.card_from.name}."
        return text


def promote(epoch_file: Path, lora_folder: Path, final_name: str, strength: float) -> Promotion:
    """Copy the chosen epoch as ``<final_name>.safetensors`` (atomically) into its own folder, or into the Lora
    folder when it is outside it, and record ``strength`` as the card's preferred weight in ``<final_name>.json``,
    keeping the card's other fields (a new card starts from the run's). A name another folder of the Lora folder
    has already is refused: ``<lora:name>`` would mean only one of the two files."""
    from ..app.paths import plain_name

    epoch_file, lora_folder = Path(epoch_file), Path(lora_folder)
    if not epoch_file.is_file():
        raise UserError(f"promote: {epoch_file} does not exist")
    name = plain_name(final_name, "final name")
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise UserError(f"promote: give the preferred weight as a number (such as 0.8), not {strength!r}") from None
    in_library = epoch_file.resolve().is_relative_to(lora_folder.resolve())
    target = (epoch_file.parent if in_library else lora_folder) / f"{name}{epoch_file.suffix}"
    if (other := _same_name_elsewhere(target, lora_folder)) is not None:
        raise UserError(f"promote: {target} would have the name of {other}, and <lora:{name}> would mean only one of "
                        f"them to the generator; give another final name, or rename or move {other.name}"
                        f"{_earlier_promotion(other, epoch_file)}")
    theirs, ours = (read_safetensors_metadata(path).get("ss_output_name") for path in (target, epoch_file))
    if target.exists() and theirs and ours and theirs != ours:  # another run's LoRA (and card) under that name
        raise UserError(f"promote: {target.name} is another LoRA (trained as {theirs!r}), which the promotion would "
                        "replace; give another final name")
    kept = None
    if not (target.exists() and target.resolve() == epoch_file.resolve()):
        if target.exists() and not filecmp.cmp(target, epoch_file, shallow=False):
            kept = _keep_as_epoch_file(target)
        with atomic_path(target) as temporary:
            shutil.copyfile(epoch_file, temporary)
    card_path = target.with_suffix(".json")
    card, card_from = {}, None
    if card_path.exists():
        try:
            card = json.loads(card_path.read_text(encoding="utf-8-sig"))
        except (OSError, json.JSONDecodeError):
            raise UserError(f"promote: {card_path} is not valid JSON; fix or delete it, then promote again") from None
    if not card:
        card, card_from = _run_card(epoch_file, card_path)
    if not card:
        from ..app.user_metadata import card_metadata, network_shape

        card = card_metadata(read_safetensors_metadata(target), {}, 1.0, network_shape(target)) \
            if target.suffix == ".safetensors" else {}
    card["preferred weight"] = float(strength)
    write_text(card_path, json.dumps(card, indent=4, ensure_ascii=False))
    return Promotion(epoch_file, target, strength, kept, card_from)


def _earlier_promotion(other: Path, of_run: Path) -> str:
    """Said where ``other`` was trained by the same run: Promote wrote to the Lora folder's top before 2026-12-05, so a
    run in a subfolder promoted then left its final file there."""
    names = [read_safetensors_metadata(path).get("ss_output_name") if path.suffix == ".safetensors" else None
             for path in (other, of_run)]
    if names[0] and names[0] == names[1]:
        return (f" ({other.name} is an earlier promotion of this run: Promote wrote to the Lora folder's top before "
                "2026-12-05, and now writes beside the run; delete it or move it beside the run)")
    return ""


def _same_name_elsewhere(target: Path, lora_folder: Path) -> Path | None:
    """A LoRA file of ``target``'s name in another folder of the Lora folder (where the generator looks)."""
    from ..networks.activation import LORA_SUFFIXES, in_state_folder

    if not lora_folder.is_dir():
        return None
    for path in sorted(lora_folder.rglob(f"{glob_escape(target.stem)}.*")):
        elsewhere = path.parent.resolve() != target.parent.resolve()
        if (path.stem == target.stem and path.suffix.lower() in LORA_SUFFIXES and elsewhere and path.is_file()
                and not in_state_folder(path) and not any(part.startswith(".") for part in path.relative_to(lora_folder).parts)):
            return path
    return None


def _run_card(epoch_file: Path, card_path: Path) -> tuple[dict, Path | None]:
    """The card beside the run's final file (the user's activation text and description), for a new final name."""
    try:
        finals = [f.path for f in run_files(epoch_file) if is_final_file(f.path)]
    except UserError:
        return {}, None
    for final in finals:
        source = final.with_suffix(".json")
        if source != card_path and source.is_file():
            try:
                card = json.loads(source.read_text(encoding="utf-8-sig"))
            except (OSError, json.JSONDecodeError):
                continue  # the user's broken card is theirs to fix; the new one starts from the metadata
            if isinstance(card, dict) and card:
                return card, source
    return {}, None
