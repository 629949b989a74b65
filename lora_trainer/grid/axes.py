"""Grid axes as users type them: strength lists and ranges, and the epoch files of a training run."""

from __future__ import annotations

import csv
import io
import math
import random
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from ..errors import UserError
from ..safe_io import read_safetensors_metadata

MAX_CELLS = 400
MAX_AXIS_VALUES = 1000  # counted before any list is made: "0-1 [10000000]" must not fill the memory to be refused

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_RANGE = re.compile(rf"^\s*({_NUMBER})\s*-\s*({_NUMBER})\s*(?:\(\s*({_NUMBER})\s*\))?\s*$")  # no step: 1
_COUNT = re.compile(rf"^\s*({_NUMBER})\s*-\s*({_NUMBER})\s*\[\s*(\d+)\s*\]\s*$")
_WHOLE_RANGE = re.compile(r"^\s*([+-]?\d+)\s*-\s*([+-]?\d+)\s*(?:\(\s*([+-]?\d+)\s*\)|\[\s*(\d+)\s*\])?\s*$")
_DECIMAL_COMMA = re.compile(r"(?<![\d.])(\d+),(\d+)(?![\d.])")  # 0,8: no space after the comma
SEED_RANGE = 4294967294  # the X/Y/Z plot's fixed seeds for -1: random.randrange(4294967294)


def split_values(text: str) -> list[str]:
    """Axis values as the X/Y/Z plot splits them (``csv.reader``): comma separated, a value holding a comma in double
    quotes (``"1girl, standing", "1girl, sitting"``), the spaces around a value dropped, blanks skipped."""
    rows = csv.reader(io.StringIO(text or ""), skipinitialspace=True)
    return [value.strip() for row in rows for value in row if value.strip()]


def typed_values(kind: str, text: str) -> list[str]:
    """An axis's values as typed in one line (the Grid tab's field, the API's string, the CLI's ``--x KIND:VALUES``):
    a strength axis's kept whole for ``parse_values``, which tells a decimal comma (0,8) from a list (0, 8) only in
    the whole text; any other split as ``split_values`` splits (quotes keep a comma)."""
    return [text or ""] if kind == "strength" else split_values(text)


def parse_values(text: str) -> list[float]:
    """Strengths as the X/Y/Z plot reads a number axis: ``0.2-1.0 (+0.2)``, ``1-3`` (step 1), ``0-1 [5]`` (5 evenly
    spaced values, rounded to 4 significant digits where that keeps them apart, so labels and tags read 0.25, not
    0.2500001) or ``0, 0.5, 1``, split as ``split_values`` splits. Where it differs: a range stops at its end
    (``0-1 (+0.3)`` gives 0, 0.3, 0.6, 0.9; the X/Y/Z plot's ``np.arange(start, end + step)`` goes on to 1.2), and
    ``0,8`` (a decimal comma, no space after it) is refused rather than read as the strengths 0 and 8."""
    _refuse_decimal_commas(text)
    values: list[float] = []
    for part in split_values(text):
        if match := _RANGE.match(part):
            start, end, step = (Decimal(g or "1") for g in match.groups())
            if step == 0 or (end - start) * step < 0:
                raise UserError(f"range {part!r}: the step must move from {start} towards {end}")
            _check_count(part, int((end - start) / step) + 1, len(values))
            value = start
            while (value <= end) if step > 0 else (value >= end):
                values.append(float(value))
                value += step
        elif match := _COUNT.match(part):
            start, end, count = float(match.group(1)), float(match.group(2)), int(match.group(3))
            _check_count(part, count, len(values))
            if count < 1:
                raise UserError(f"range {part!r}: give at least 1 value in the brackets, such as {start:g}-{end:g} [5]")
            inside = [start + (end - start) * i / (count - 1) for i in range(1, count - 1)]
            values += [start] if count == 1 else [start, *_short(inside), end]
        else:
            try:
                value = float(part)
            except ValueError:
                raise UserError(f"{part!r} is not a number or a range such as 0.2-1.0 (+0.2)") from None
            if not math.isfinite(value):
                raise UserError(f"{part!r} is not a strength a LoRA can take: give a finite number such as 0.8")
            values.append(value)
    if not values:
        raise UserError(f"no values in {text!r}")
    return values


def _short(values: list[float]) -> list[float]:
    """``values`` to 4 significant digits, or to as few more as keep them as many distinct values as before."""
    for digits in range(4, 17):
        rounded = [float(f"{value:.{digits}g}") for value in values]
        if len(set(rounded)) == len(set(values)):
            return rounded
    return values


def _refuse_decimal_commas(text: str) -> None:
    """``0,8`` splits into the strengths 0 and 8; where the decimal reading is a strength (up to 2) and the split one
    is not, it was meant as 0.8."""
    for match in _DECIMAL_COMMA.finditer(text or ""):
        whole, fraction = match.groups()
        if float(f"{whole}.{fraction}") <= 2 < max(int(whole), int(fraction)):
            raise UserError(f"{match.group()!r} reads as the two strengths {whole} and {fraction}: for "
                            f"{whole}.{fraction} write a point ({whole}.{fraction}), for two strengths a space after "
                            f"the comma ({whole}, {fraction})")


def whole_numbers(values: list[str]) -> list[str]:
    """Epoch or seed values with the X/Y/Z plot's whole-number ranges written out: ``1-3`` (1, 2, 3), ``1-9 (+2)``
    (1, 3, 5, 7, 9), ``1-10 [5]`` (5 evenly spaced, rounded down as it rounds them: 1, 3, 5, 7, 10); anything else
    stays as it is, for the axis to read or refuse."""
    written: list[str] = []
    for value in values:
        match = _WHOLE_RANGE.match(value)
        if match is None:
            written.append(value)
            continue
        start, end = int(match.group(1)), int(match.group(2))
        if match.group(4) is not None:
            count = int(match.group(4))
            _check_count(value, count, len(written))
            if count < 1:
                raise UserError(f"range {value!r}: give at least 1 value in the brackets, such as {start}-{end} [5]")
            step = (end - start) / (count - 1) if count > 1 else 0
            written += [str(int(start + step * i)) for i in range(count - 1)] + ([str(end)] if count > 1 else [])
            continue
        step = int(match.group(3) or 1)
        if step == 0 or (end - start) * step < 0:
            raise UserError(f"range {value!r}: the step must move from {start} towards {end}")
        _check_count(value, (end - start) // step + 1, len(written))
        written += [str(n) for n in range(start, end + (1 if step > 0 else -1), step)]
    return written


def fixed_seeds(seeds: list[int]) -> list[int]:
    """A seed axis's -1 values drawn once, each its own random seed, as the X/Y/Z plot fixes them: the cells keep
    the seed their label shows and two -1 values are two columns, not one image twice."""
    return [random.randrange(SEED_RANGE) if seed == -1 else seed for seed in seeds]


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
    run = run_name(path)
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
    """By steps; at equal steps the final file first. Files without steps after the others, their final file last
    (it ends the run), the numbered ones in their names' order."""
    unknown, numbered = file.steps is None, _NUMBERED.match(file.path.stem) is not None
    return unknown, file.steps or 0, numbered != unknown, file.path.name


def _numbered_or_final(folder: Path, run: str, suffix: str, final: bool) -> list[Path]:
    return [p for p in folder.glob(f"{glob_escape(run)}*{suffix}")
            if (final and p.stem == run) or ((m := _NUMBERED.match(p.stem)) and m.group("run") == run)]


def _same_run(final: dict[str, str], other: dict[str, str]) -> bool:
    if other.get("ss_output_name") != final.get("ss_output_name"):
        return False
    sessions = final.get("ss_session_id"), other.get("ss_session_id")
    return None in sessions or sessions[0] == sessions[1]  # another run trained under the name since


def run_name(path: Path) -> str:
    """The name the run a file belongs to was trained under: ``char`` for ``char-000003``, ``char-step…`` and ``char``."""
    match = _NUMBERED.match(Path(path).stem)
    return match.group("run") if match else Path(path).stem


def is_final_file(path: Path) -> bool:
    """Neither ``<run>-000003`` nor ``<run>-step…``: a run's final file (or a promoted one)."""
    return _NUMBERED.match(Path(path).stem) is None


def is_step_file(path: Path) -> bool:
    """``<run>-step00000050``: saved at a step, between epochs (its ss_epoch counts the epochs completed)."""
    return step_of(path) is not None


def step_of(path: Path) -> int | None:
    """The global step a step file's name gives (``<run>-step00000050``: 50), None for other files."""
    match = _NUMBERED.match(Path(path).stem)
    return int(match.group("step")) if match and match.group("step") else None


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def _describe(path: Path) -> EpochFile:
    metadata = read_safetensors_metadata(path)  # {} for an unreadable file: it still gets a name-based label
    epoch = int(metadata["ss_epoch"]) if metadata.get("ss_epoch", "").isdigit() else None
    steps = int(metadata["ss_steps"]) if metadata.get("ss_steps", "").isdigit() else None
    # a step file's ss_epoch counts the epochs completed before it: "epoch 0 (10 steps)" read as the start
    if (step := step_of(path)) is not None:
        label = f"step {step}"
    else:
        label = f"epoch {epoch}" if epoch is not None else path.stem
    planned = int(metadata["ss_max_train_steps"]) if metadata.get("ss_max_train_steps", "").isdigit() else None
    if steps is not None and planned and steps < planned and is_final_file(path):
        label += f" ({steps} of {planned} steps: stopped early)"  # a run's final file, saved where a stop cut it short
    elif steps is not None and not is_step_file(path):
        label += f" ({steps} steps)"
    return EpochFile(path, epoch, steps, label)


def check_size(rows: int, columns: int, confirmed: bool = False) -> None:
    if rows == 0 or columns == 0:
        raise UserError("the grid has an axis with no values")
    if rows * columns > MAX_CELLS and not confirmed:
        raise UserError(f"{rows} × {columns} = {rows * columns} images; confirm grids of more than {MAX_CELLS} cells")
