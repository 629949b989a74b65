"""Grid axes as users type them: strength lists and ranges, and the epoch files of a training run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from ..errors import UserError
from ..safe_io import read_safetensors_metadata

MAX_CELLS = 400
MAX_AXIS_VALUES = 1000  # counted before any list is made: "0-1 [10000000]" must not fill the memory to be refused

_RANGE = re.compile(r"^\s*(-?[\d.]+)\s*-\s*(-?[\d.]+)\s*(?:\(\s*([+-]?[\d.]+)\s*\))?\s*$")  # no step: 1
_COUNT = re.compile(r"^\s*(-?[\d.]+)\s*-\s*(-?[\d.]+)\s*\[\s*(\d+)\s*\]\s*$")


def parse_values(text: str) -> list[float]:
    """``0.2-1.0 (+0.2)``, ``1-3`` (step 1), ``0-1 [5]`` (5 evenly spaced values) or ``0, 0.5, 1`` — the X/Y/Z plot's
    syntax."""
    values: list[float] = []
    for part in re.split(r",(?![^(\[]*[)\]])", text):
        if not part.strip():
            continue
        if match := _RANGE.match(part):
            start, end, step = (Decimal(g or "1") for g in match.groups())
            if step == 0 or (end - start) * step < 0:
                raise UserError(f"range {part.strip()!r}: the step must move from {start} towards {end}")
            _check_count(part, int((end - start) / step) + 1, len(values))
            value = start
            while (value <= end) if step > 0 else (value >= end):
                values.append(float(value))
                value += step
        elif match := _COUNT.match(part):
            start, end, count = float(match.group(1)), float(match.group(2)), int(match.group(3))
            _check_count(part, count, len(values))
            values += [start] if count == 1 else [start + (end - start) * i / (count - 1) for i in range(count)]
        else:
            try:
                values.append(float(part))
            except ValueError:
                raise UserError(f"{part.strip()!r} is not a number or a range such as 0.2-1.0 (+0.2)") from None
    if not values:
        raise UserError(f"no values in {text!r}")
    return values


def _check_count(part: str, count: int, before: int) -> None:
    if before + count > MAX_AXIS_VALUES:
        raise UserError(f"{part.strip()!r} makes {count} values; an axis takes at most {MAX_AXIS_VALUES}: use a larger "
                        "step or fewer values")


@dataclass(frozen=True)
class EpochFile:
    path: Path
    epoch: int | None  # from ss_epoch (None: unknown)
    steps: int | None
    label: str


_NUMBERED = re.compile(r"^(?P<run>.+?)-(?:(?P<epoch>\d{6})|step(?P<step>\d{8}))$")


def run_files(final_or_any: str | Path) -> list[EpochFile]:
    """Every file of the run ``<name>.safetensors`` belongs to: ``<name>-000001``…, ``<name>-step…``, the final
    file; ordered by training progress, labelled from their metadata. A final file renamed after training
    (``char_v2``, trained as ``char``) keeps the numbered files of the name it was trained under, as its
    ``ss_output_name`` (and ``ss_session_id`` where both have one) says."""
    path = Path(final_or_any)
    match = _NUMBERED.match(path.stem)
    run = match.group("run") if match else path.stem
    candidates = _numbered_or_final(path.parent, run, path.suffix, final=True)
    metadata = read_safetensors_metadata(path)
    trained_as = metadata.get("ss_output_name", "")
    if not match and trained_as and trained_as != run:  # renamed: its epochs still carry the old name
        candidates += [p for p in _numbered_or_final(path.parent, trained_as, path.suffix, final=False)
                       if _same_run(metadata, read_safetensors_metadata(p))]
    if not candidates:
        raise UserError(f"{path}: no files of this training run found")
    files = [_describe(p) for p in candidates]
    return sorted(files, key=_training_progress)


def _training_progress(file: EpochFile) -> tuple:
    """By steps; at equal steps the final file first."""
    return file.steps if file.steps is not None else 1 << 60, _NUMBERED.match(file.path.stem) is not None, file.path.name


def _numbered_or_final(folder: Path, run: str, suffix: str, final: bool) -> list[Path]:
    return [p for p in folder.glob(f"{glob_escape(run)}*{suffix}")
            if (final and p.stem == run) or ((m := _NUMBERED.match(p.stem)) and m.group("run") == run)]


def _same_run(final: dict[str, str], other: dict[str, str]) -> bool:
    if other.get("ss_output_name") != final.get("ss_output_name"):
        return False
    sessions = final.get("ss_session_id"), other.get("ss_session_id")
    return None in sessions or sessions[0] == sessions[1]  # another run trained under the name since


def is_final_file(path: Path) -> bool:
    """Neither ``<run>-000003`` nor ``<run>-step…``: a run's final file (or a promoted one)."""
    return _NUMBERED.match(Path(path).stem) is None


def is_step_file(path: Path) -> bool:
    """``<run>-step00000050``: saved at a step, between epochs (its ss_epoch counts the epochs completed)."""
    match = _NUMBERED.match(path.stem)
    return bool(match and match.group("step"))


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def _describe(path: Path) -> EpochFile:
    metadata = read_safetensors_metadata(path)  # {} for an unreadable file: it still gets a name-based label
    epoch = int(metadata["ss_epoch"]) if metadata.get("ss_epoch", "").isdigit() else None
    steps = int(metadata["ss_steps"]) if metadata.get("ss_steps", "").isdigit() else None
    if is_step_file(path):  # its ss_epoch counts the epochs completed before it: "epoch 0 (10 steps)" read as the start
        label = f"step {int(_NUMBERED.match(path.stem).group('step'))}"
    else:
        label = f"epoch {epoch}" if epoch is not None else path.stem
    planned = int(metadata["ss_max_train_steps"]) if metadata.get("ss_max_train_steps", "").isdigit() else None
    if steps is not None and planned and steps < planned and not re.search(r"-(\d{6}|step\d{8})$", path.stem):
        label += f" ({steps} of {planned} steps: stopped early)"  # a run's final file, saved where a stop cut it short
    elif steps is not None and not is_step_file(path):
        label += f" ({steps} steps)"
    return EpochFile(path, epoch, steps, label)


def check_size(rows: int, columns: int, confirmed: bool = False) -> None:
    if rows == 0 or columns == 0:
        raise UserError("the grid has an axis with no values")
    if rows * columns > MAX_CELLS and not confirmed:
        raise UserError(f"{rows} × {columns} = {rows * columns} images; confirm grids of more than {MAX_CELLS} cells")
