"""Learning-rate schedules by sd-scripts' ``--lr_scheduler`` names, as pure multipliers of the base learning rate.

sd-scripts (``train_util.get_scheduler_fix``) builds transformers' schedulers; ``lr_factor`` computes the same
curves with the same float arithmetic, so a run here follows the very same learning rates step for step.
``step`` is the 0-based optimizer step: the factor used by the first ``optimizer.step()`` is ``lr_factor(…, 0, …)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..errors import UserError

SCHEDULER_NAMES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                   "cosine_with_min_lr", "inverse_sqrt", "warmup_stable_decay", "piecewise_constant", "adafactor")

# --lr_scheduler_args a built-in schedule takes: sd-scripts passes them on to its transformers/diffusers function,
# so these are that function's parameters less the ones sd-scripts fills itself (and last_epoch: see below)
SCHEDULE_ARGUMENTS = {"cosine": ("num_cycles",), "polynomial": ("lr_end",), "cosine_with_min_lr": ("min_lr",),
                      "warmup_stable_decay": ("warmup_type", "decay_type"), "piecewise_constant": ("step_rules",)}
WSD_SHAPES = ("linear", "cosine", "1-sqrt")
NO_WARMUP = ("constant", "adafactor", "piecewise_constant")  # the rules of piecewise_constant give every rate

# transformers' polynomial schedule decays towards this absolute learning rate, not towards 0
POLYNOMIAL_END_LR = 1e-7


def check_scheduler_name(name: str) -> str:
    """The scheduler's name as the curves know it; ``adafactor:<lr>`` (what sd-scripts writes) counts as ``adafactor``."""
    base = name.split(":", 1)[0]
    if base not in SCHEDULER_NAMES:
        raise UserError(f"--lr_scheduler {name!r} is not known; use one of: {', '.join(SCHEDULER_NAMES)}")
    return base


def steps_or_fraction(value: int | float | str) -> int | float:
    """sd-scripts' ``int_or_float`` for ``--lr_warmup_steps``/``--lr_decay_steps``: ``"10%"`` (up to ``"100%"``, or a
    TOML's ``1.0``: the whole run) and numbers below 1 are a fraction of all steps (a float), 1 and more a whole number
    of steps (an int, which is how a TOML file or a command line written from it must show it: sd-scripts reads any
    float as a fraction). ValueError says what is wrong."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("give a number of steps, a fraction below 1 or a percentage such as 10%")
    text = str(value).strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError("give a number of steps, a fraction below 1 or a percentage such as 10%") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError("must be a number of steps, a fraction or a percentage, not negative")
    if text.endswith("%") or (isinstance(value, float) and value == 1.0):
        if number > 1:
            raise ValueError("a percentage of the run cannot pass 100%")
        return number
    if number < 1:
        return number
    if number != int(number):
        raise ValueError("a number of steps must be whole (or give a fraction below 1)")
    return int(number)


def resolve_warmup(lr_warmup_steps: int | float | str | None, total_steps: int, option: str = "--lr_warmup_steps") -> int:
    """Warm-up (or ``--lr_decay_steps``) in optimizer steps; sd-scripts turns a fraction into steps with
    ``int(ratio * total_steps)`` (rounding down)."""
    if lr_warmup_steps is None:
        return 0
    try:
        value = steps_or_fraction(lr_warmup_steps)
    except ValueError as error:
        raise UserError(f"{option} {lr_warmup_steps!r}: {error}") from None
    return int(value * total_steps) if isinstance(value, float) else value


@dataclass(frozen=True)
class ScheduleShape:
    """What ``--lr_scheduler_args`` change in a built-in schedule (transformers' and diffusers' defaults otherwise)."""

    cosine_cycles: float = 0.5  # cosine: half a cosine
    lr_end: float = POLYNOMIAL_END_LR  # polynomial: the absolute rate it decays to
    min_lr: float | None = None  # cosine_with_min_lr: the floor as a rate, instead of --lr_scheduler_min_lr_ratio
    warmup_type: str = "linear"  # warmup_stable_decay: linear, cosine or 1-sqrt
    decay_type: str = "cosine"
    step_rules: tuple[tuple[int, float], ...] = ()  # piecewise_constant: (before this step, factor) …, then
    last_factor: float = 1.0


def schedule_shape(name: str, arguments: list[str] | None) -> ScheduleShape:
    """``--lr_scheduler_args`` of the built-in schedule ``name``, read and checked as sd-scripts' functions take them."""
    from .optimizers import parse_optimizer_args

    name = check_scheduler_name(name)
    given = parse_optimizer_args(arguments, "lr_scheduler_args")
    allowed = SCHEDULE_ARGUMENTS.get(name, ())
    if "last_epoch" in given:
        raise UserError("--lr_scheduler_args last_epoch: to go on from a later step use --resume (a saved state) or "
                        "--initial_step/--initial_epoch")
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        takes = f"takes {', '.join(allowed)}" if allowed else "takes none"
        raise UserError(f"--lr_scheduler_args {', '.join(unknown)}: --lr_scheduler {name} {takes}; the built-in schedules "
                        "also read --lr_scheduler_num_cycles, --lr_scheduler_power and --lr_scheduler_min_lr_ratio")
    values = {}
    for key in ("num_cycles", "lr_end", "min_lr"):
        if key in given:
            value = given[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise UserError(f"--lr_scheduler_args {key}={value!r}: give a number, not below 0")
            values["cosine_cycles" if key == "num_cycles" else key] = float(value)
    for key in ("warmup_type", "decay_type"):
        if key in given:
            if given[key] not in WSD_SHAPES:
                raise UserError(f"--lr_scheduler_args {key}={given[key]!r}: give one of {', '.join(WSD_SHAPES)} (quoted)")
            values[key] = given[key]
    if name == "piecewise_constant":
        values["step_rules"], values["last_factor"] = _step_rules(given.get("step_rules"))
    return ScheduleShape(**values)


def check_schedule(name: str, warmup: int | float | str | None, arguments: list[str] | None) -> ScheduleShape:
    """The built-in schedule ``name``'s ``--lr_scheduler_args``, refused (as is a warm-up it does not take) before work."""
    if check_scheduler_name(name) in NO_WARMUP and _asks_warmup(warmup):
        raise UserError(f"--lr_scheduler {name} takes no warm-up; set --lr_warmup_steps 0 or use constant_with_warmup")
    return schedule_shape(name, arguments)


def _asks_warmup(warmup: int | float | str | None) -> bool:
    try:
        return bool(warmup) and float(str(warmup).rstrip("%")) != 0
    except ValueError:  # unreadable: given all the same (resolve_warmup names the format)
        return True


def _step_rules(text) -> tuple[tuple[tuple[int, float], ...], float]:
    """diffusers' ``step_rules``: ``"1:10,0.1:20,0.005"`` is ×1 before step 10, ×0.1 before step 20, then ×0.005."""
    example = "--lr_scheduler_args \"step_rules='1:10,0.1:20,0.005'\" (×1 before step 10, ×0.1 before 20, then ×0.005)"
    if not isinstance(text, str):
        raise UserError(f"--lr_scheduler piecewise_constant needs its rules as a quoted string, e.g. {example}")
    *rules, last = [part.strip() for part in text.split(",")]
    try:
        pairs = [(int(steps), float(factor)) for factor, steps in (rule.split(":") for rule in rules)]
        last_factor = float(last)
    except ValueError:
        raise UserError(f"--lr_scheduler_args step_rules={text!r}: write factor:step pairs, then the last factor, "
                        f"e.g. {example}") from None
    return tuple(sorted(pairs)), last_factor


def _warmup_factor(step: int, warmup_steps: int) -> float:
    return float(step) / float(max(1, warmup_steps))


def _progress(step: int, total_steps: int, warmup_steps: int) -> float:
    return float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))


def lr_factor(name: str, step: int, total_steps: int, warmup_steps: int, num_cycles: int = 1, power: float = 1.0,
              min_lr_ratio: float | None = None, initial_lr: float | None = None, decay_steps: int = 0,
              timescale: int | None = None, shape: ScheduleShape = ScheduleShape()) -> float:
    """The multiplier of each group's learning rate at 0-based optimizer ``step``.

    As in sd-scripts: ``cosine`` is one half cosine (``num_cycles`` does not apply), ``cosine_with_restarts`` has
    ``num_cycles`` hard restarts, ``cosine_with_min_lr`` runs ``num_cycles / 2`` cosines down to ``min_lr_ratio``.
    ``polynomial`` decays to 1e-7 in absolute terms, so it needs the optimizer's ``initial_lr``. ``inverse_sqrt``
    falls as 1/√step after the warm-up (``timescale``: the warm-up, or 10 000 without one). ``warmup_stable_decay``
    holds the rate after the warm-up and spends its last ``decay_steps`` on ``num_cycles / 2`` cosines down to
    ``min_lr_ratio`` (0 when not given). ``piecewise_constant`` steps through ``shape.step_rules``. ``adafactor``
    keeps the rate: Adafactor's relative step sets its own. ``shape`` holds what ``--lr_scheduler_args`` change.
    """
    name = check_scheduler_name(name)
    if name in ("constant", "adafactor"):
        return 1.0
    if name == "piecewise_constant":
        return next((factor for before, factor in shape.step_rules if step < before), shape.last_factor)
    if name == "warmup_stable_decay":
        return _warmup_stable_decay(step, total_steps, warmup_steps, decay_steps, num_cycles, min_lr_ratio or 0.0,
                                    shape.warmup_type, shape.decay_type)
    if step < warmup_steps:
        return _warmup_factor(step, warmup_steps)
    if name == "constant_with_warmup":
        return 1.0
    if name == "inverse_sqrt":
        timescale = timescale or warmup_steps or 10_000
        return 1.0 / math.sqrt((step + timescale - warmup_steps) / timescale)
    if name == "linear":
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))
    if name == "cosine":
        progress = _progress(step, total_steps, warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * shape.cosine_cycles * 2.0 * progress)))
    if name == "cosine_with_restarts":
        progress = _progress(step, total_steps, warmup_steps)
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))
    if name == "cosine_with_min_lr":
        if shape.min_lr is not None:
            min_lr_ratio = shape.min_lr / initial_lr
        if min_lr_ratio is None:
            raise UserError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
        progress = _progress(step, total_steps, warmup_steps)
        factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles / 2) * 2.0 * progress))
        return max(0, factor * (1 - min_lr_ratio) + min_lr_ratio)
    # polynomial
    if initial_lr is None:
        raise ValueError("the polynomial schedule needs the optimizer's initial_lr")
    lr_end = shape.lr_end
    if step > total_steps:
        return lr_end / initial_lr
    pct_remaining = 1 - (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return ((initial_lr - lr_end) * pct_remaining**power + lr_end) / initial_lr


# torch's schedulers that cannot be built from key=value literals, or do not step once per optimizer step
_NOT_FROM_LITERALS = {"LambdaLR": "takes a function", "MultiplicativeLR": "takes a function",
                      "SequentialLR": "takes other schedulers", "ChainedScheduler": "takes other schedulers",
                      "ReduceLROnPlateau": "steps on a validation metric, not once per optimizer step",
                      "LRScheduler": "is the base class of the others", "_LRScheduler": "is the base class of the others"}


def scheduler_class(name: str) -> type:
    """``--lr_scheduler_type``: a class of ``torch.optim.lr_scheduler``, by name or full path. sd-scripts imports any
    module a config names; here only torch's schedulers, so that a job's settings (an API body) cannot run code."""
    module, _, class_name = name.rpartition(".")
    found = getattr(torch.optim.lr_scheduler, class_name, None)
    ours = module in ("", "torch.optim.lr_scheduler") and isinstance(found, type)
    # before the subclass test: torch 2.1's ReduceLROnPlateau is no LRScheduler, and deserves its own reason
    if ours and class_name in _NOT_FROM_LITERALS:
        raise UserError(f"--lr_scheduler_type {name}: it {_NOT_FROM_LITERALS[class_name]}; use another scheduler")
    if not ours or not issubclass(found, torch.optim.lr_scheduler.LRScheduler):
        raise UserError(f"--lr_scheduler_type {name!r}: give a class of torch.optim.lr_scheduler (e.g. CosineAnnealingLR, "
                        "OneCycleLR, StepLR); schedulers of other modules are not imported here")
    return found


def check_custom_scheduler(name: str, arguments: list[str] | None, warmup: int | float | str | None) -> tuple[type, dict]:
    """``--lr_scheduler_type``'s class and its keyword arguments, refused as sd-scripts refuses them with a warm-up."""
    from .optimizers import parse_optimizer_args

    found = scheduler_class(name)
    if _asks_warmup(warmup):
        raise UserError(f"--lr_scheduler_type {name} takes no warm-up, as in sd-scripts: set --lr_warmup_steps 0")
    return found, parse_optimizer_args(arguments, "lr_scheduler_args")


def _warmup_stable_decay(step: int, total_steps: int, warmup_steps: int, decay_steps: int, num_cycles: int,
                         floor: float, warmup_type: str = "linear", decay_type: str = "cosine") -> float:
    """transformers' WSD schedule as sd-scripts calls it: a warm-up from the floor (linear, cosine or 1-sqrt), the
    rest of the steps not decayed stable, then the decay to the floor (``num_cycles / 2`` cosines, linear or 1-sqrt)."""
    stable_steps = total_steps - warmup_steps - decay_steps
    if step < warmup_steps:
        progress = float(step) / float(max(1, warmup_steps))
        factor = {"linear": progress, "cosine": 0.5 * (1.0 - math.cos(math.pi * progress)),
                  "1-sqrt": 1.0 - math.sqrt(1.0 - progress)}[warmup_type]
        return max(0.0, factor * (1.0 - floor) + floor)
    if step < warmup_steps + stable_steps:
        return 1.0
    if step < warmup_steps + stable_steps + decay_steps:
        progress = float(step - warmup_steps - stable_steps) / float(max(1, decay_steps))
        factor = {"linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * float(num_cycles / 2) * 2.0 * progress)),
                  "1-sqrt": 1.0 - math.sqrt(progress)}[decay_type]
        return max(0.0, factor * (1.0 - floor) + floor)
    return floor


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup: int | float | str | None = 0,
                   num_cycles: int = 1, power: float = 1.0, min_lr_ratio: float | None = None,
                   scheduler_type: str | None = None, scheduler_args: list[str] | None = None,
                   decay: int | float | str | None = 0, timescale: int | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """A ``LambdaLR`` over ``lr_factor``; step it once per optimizer step, as sd-scripts does.

    ``warmup`` is steps or a fraction (see ``resolve_warmup``). An Adafactor with ``relative_step`` gets the constant
    schedule whatever ``name`` says, because sd-scripts forces ``adafactor:<lr>`` there. ``scheduler_type`` (a torch
    scheduler class, with ``scheduler_args``) replaces ``name`` altogether, as sd-scripts' ``--lr_scheduler_type`` does.
    """
    schedule_free = callable(getattr(optimizer, "eval", None))  # its own schedule: sd-scripts' dummy scheduler
    if scheduler_type and not schedule_free:
        found, kwargs = check_custom_scheduler(scheduler_type, scheduler_args, warmup)
        try:
            return found(optimizer, **kwargs)
        except (TypeError, ValueError) as error:
            raise UserError(f"--lr_scheduler_type {scheduler_type} with --lr_scheduler_args "
                            f"{' '.join(scheduler_args or []) or '(none)'}: {error}") from None
    name = check_scheduler_name(name)
    warmup_steps = resolve_warmup(warmup, total_steps)
    if getattr(optimizer, "uses_relative_step", False):
        name = "adafactor"
    if schedule_free:
        name, warmup_steps, scheduler_args = "constant", 0, None
    shape = check_schedule(name, warmup_steps, scheduler_args)
    initial_lr = optimizer.defaults.get("lr")
    if name == "polynomial" and not (initial_lr and initial_lr > shape.lr_end):
        raise UserError(f"--lr_scheduler polynomial decays to {shape.lr_end}; --learning_rate must be larger than that")

    decay_steps = resolve_warmup(decay, total_steps, "--lr_decay_steps")

    def factor_at(step: int) -> float:
        return lr_factor(name, step, total_steps, warmup_steps, num_cycles, power, min_lr_ratio, initial_lr, decay_steps,
                         timescale, shape)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor_at)


def advance(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> None:
    """Moves ``scheduler`` on by ``steps`` optimizer steps that are not trained (a run going on at a later step)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before")  # meant here
        for _ in range(steps):
            scheduler.step()
