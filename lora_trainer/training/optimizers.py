"""Optimizers by sd-scripts' ``--optimizer_type`` names (case-insensitive), with ``--optimizer_args key=value``.

What sd-scripts takes from torch we take from torch. Lion and Adafactor are small implementations of our own, so the
runtime needs neither lion_pytorch nor transformers: ``Lion`` follows the paper's update (as lion_pytorch does, with
its defaults) and ``Adafactor`` follows transformers' ``Adafactor``, which is what sd-scripts builds — torch's own
``torch.optim.Adafactor`` is a different variant: it always uses the relative step ``min(lr, 1/sqrt(t))`` scaled by
the parameter's RMS (no fixed learning rate, so no ``relative_step=False``/``scale_parameter=False``, no
``warmup_init``, no ``beta1``), adds ``eps1`` as a floor of the variance instead of to the squared gradient, and
decays weights by the base rate instead of the effective one. The common Kohya preset
``scale_parameter=False relative_step=False warmup_init=False`` cannot be expressed with it.
8-bit and paged optimizers (bitsandbytes), D-Adaptation (dadaptation) and Prodigy (prodigyopt) are optional
packages, imported only when asked for.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..compat import has_fused_kernels
from ..errors import UserError
from .flat_adamw import FlatAdamW


@dataclass(frozen=True)
class OptimizerSource:
    """Where an ``--optimizer_type`` comes from and what sd-scripts adds to the user's arguments."""

    module: str  # import path of the module that holds the class
    class_name: str
    pip_package: str | None = None  # None: part of torch or of this package
    fixed_kwargs: dict = field(default_factory=dict)  # always passed (SGDNesterov's nesterov=True)
    default_kwargs: dict = field(default_factory=dict)  # added to the user's arguments when absent (shown in ss_optimizer)


def _bnb(class_name: str, **default_kwargs) -> OptimizerSource:
    return OptimizerSource("bitsandbytes.optim", class_name, "bitsandbytes", default_kwargs=default_kwargs)


def _dadapt(class_name: str, experimental: bool = False) -> OptimizerSource:
    return OptimizerSource("dadaptation.experimental" if experimental else "dadaptation", class_name, "dadaptation")


OPTIMIZERS: dict[str, OptimizerSource] = {
    "AdamW": OptimizerSource("torch.optim", "AdamW"),
    "SGDNesterov": OptimizerSource("torch.optim", "SGD", fixed_kwargs={"nesterov": True}, default_kwargs={"momentum": 0.9}),
    "SGD": OptimizerSource("torch.optim", "SGD"),
    "Lion": OptimizerSource(__name__, "Lion"),
    "Adafactor": OptimizerSource(__name__, "Adafactor"),
    "AdamW8bit": _bnb("AdamW8bit"),
    "PagedAdamW8bit": _bnb("PagedAdamW8bit"),
    "PagedAdamW": _bnb("PagedAdamW"),
    "PagedAdamW32bit": _bnb("PagedAdamW32bit"),
    "Lion8bit": _bnb("Lion8bit"),
    "PagedLion8bit": _bnb("PagedLion8bit"),
    "AdEMAMix8bit": _bnb("AdEMAMix8bit"),
    "PagedAdEMAMix8bit": _bnb("PagedAdEMAMix8bit"),
    "SGDNesterov8bit": OptimizerSource("bitsandbytes.optim", "SGD8bit", "bitsandbytes", fixed_kwargs={"nesterov": True},
                                       default_kwargs={"momentum": 0.9}),
    "DAdaptation": _dadapt("DAdaptAdamPreprint", experimental=True),
    "DAdaptAdamPreprint": _dadapt("DAdaptAdamPreprint", experimental=True),
    "DAdaptAdaGrad": _dadapt("DAdaptAdaGrad"),
    "DAdaptAdam": _dadapt("DAdaptAdam"),
    "DAdaptAdan": _dadapt("DAdaptAdan"),
    "DAdaptAdanIP": _dadapt("DAdaptAdanIP", experimental=True),
    "DAdaptLion": _dadapt("DAdaptLion"),
    "DAdaptSGD": _dadapt("DAdaptSGD"),
    "Prodigy": OptimizerSource("prodigyopt", "Prodigy", "prodigyopt"),
    **{name: OptimizerSource("schedulefree", name, "schedulefree")
       for name in ("AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree")},
}
_BY_LOWER_NAME = {name.lower(): source for name, source in OPTIMIZERS.items()}


def parse_optimizer_args(optimizer_args: list[str] | None, option: str = "optimizer_args") -> dict:
    """``["weight_decay=0.01", "betas=0.9,0.999"]`` → ``{"weight_decay": 0.01, "betas": (0.9, 0.999)}``.

    Values are Python literals, read with ``ast.literal_eval`` as sd-scripts reads them (``True``, ``1e-8``, tuples);
    ``--lr_scheduler_args`` are read the same way (``option`` names it in messages).
    """
    kwargs = {}
    for argument in optimizer_args or []:
        key, separator, text = argument.partition("=")
        if not separator or not key.strip():
            raise UserError(f"--{option} {argument!r}: write key=value, e.g. weight_decay=0.01 betas=0.9,0.999")
        try:
            kwargs[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise UserError(f"--{option} {argument!r}: the value must be a Python literal "
                            f"(a number, True/False, a tuple like 0.9,0.999 or a quoted string)") from None
    return kwargs


def _import_class(module_path: str, class_name: str, optimizer_type: str, pip_package: str | None) -> type:
    try:
        module = importlib.import_module(module_path)
    except ImportError:
        package = pip_package or module_path.split(".")[0]
        raise UserError(
            f"--optimizer_type {optimizer_type} needs the Python package {package}: run `pip install {package}` into the "
            f"extension's private extras folder (or into this Python environment when training without the WebUI)"
        ) from None
    optimizer_class = getattr(module, class_name, None)
    if optimizer_class is None:
        raise UserError(f"--optimizer_type {optimizer_type}: {module_path} has no {class_name}; "
                        f"the installed {pip_package or module_path} is probably too old, upgrade it")
    return optimizer_class


# Their average of squared gradients lives in the weights' dtype: with fp16 weights, squares under 6e-8 round to zero
# and m / (√v + ε) divides by zero (ε = 1e-8 is zero in fp16 too). 8-bit and 32-bit bitsandbytes states, our
# Adafactor (fp32 state) and sign or momentum updates (Lion, SGD) do not have the problem.
_FP16_MOMENTS = {"adamw", "adam", "nadam", "radam", "adamax", "adagrad", "prodigy", "dadaptation", "dadaptadampreprint",
                 "dadaptadagrad", "dadaptadam", "dadaptadan", "dadaptadanip"}


def moments_underflow_in_fp16(optimizer_type: str) -> bool:
    return optimizer_type.rpartition(".")[2].lower() in _FP16_MOMENTS


def _unknown(optimizer_type: str) -> UserError:
    return UserError(f"--optimizer_type {optimizer_type!r} is not known; use one of: {', '.join(OPTIMIZERS)}, "
                     f"a torch.optim class name (e.g. RAdam) or a module.Class path")


def check_optimizer_name(optimizer_type: str) -> None:
    """An unknown name is refused with the options, before a job is queued or a model loaded; a dotted path or a
    known name whose package is missing is said when the optimizer is made."""
    name = optimizer_type or "AdamW"
    if name.lower() in _BY_LOWER_NAME or "." in name:
        return
    found = getattr(torch.optim, name, None)
    if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
        raise _unknown(name)


def check_optimizer_importable(optimizer_type: str) -> None:
    """The optimizer's package imported in the trainer's process, before the model loads and the latents cache: a
    missing bitsandbytes or prodigyopt is said in seconds. (The queue asks ``missing_package`` first, which looks into
    the extension's extras folder too: only the trainer's process has it on its path.)"""
    _resolve(optimizer_type)


def missing_package(optimizer_type: str | None, extras_folder: Path | None = None) -> str | None:
    """The pip package ``optimizer_type`` needs that neither this Python nor ``extras_folder`` (the WebUI extension's
    private folder, which the trainer's process has on its path) holds; found without importing it, so the WebUI's
    process can ask. None when nothing is missing, or the optimizer is torch's, ours or a dotted path."""
    source = _BY_LOWER_NAME.get((optimizer_type or "AdamW").lower())
    if source is None or source.pip_package is None:
        return None
    module = source.module.split(".")[0]
    if extras_folder is not None and ((extras_folder / module).is_dir() or (extras_folder / f"{module}.py").is_file()):
        return None  # as pip --target leaves it (the import system would cache a folder made after its first look)
    if module in sys.modules:  # imported already, or None: known to be missing
        return None if sys.modules[module] is not None else source.pip_package
    return None if importlib.util.find_spec(module) is not None else source.pip_package


def check_optimizer_installed(optimizer_type: str | None, extras_folder: Path | None = None) -> None:
    """Before a job is queued: a missing bitsandbytes (the 6–12 GB tiers' AdamW8bit) or prodigyopt said at once, with
    how to install it — the Train tab's Install extras button where the trainer has the extras folder (the WebUI) —
    instead of when the job's turn comes."""
    package = missing_package(optimizer_type, extras_folder)
    if package is None:
        return
    install = (f"in the Train tab's Advanced, tick {package} among the optional trainer extras and press Install extras"
               if extras_folder is not None else f"run `{sys.executable} -m pip install {package}`")
    raise UserError(f"--optimizer_type {optimizer_type} needs the Python package {package}, which is not installed: "
                    f"{install}, or choose AdamW, which needs none", "optimizer_type")


def _resolve(optimizer_type: str) -> tuple[type, OptimizerSource | None]:
    """The optimizer class; like sd-scripts, other names are looked up in torch.optim, dotted ones are imported."""
    source = _BY_LOWER_NAME.get((optimizer_type or "AdamW").lower())
    if source is not None:
        return _import_class(source.module, source.class_name, optimizer_type or "AdamW", source.pip_package), source
    if "." in optimizer_type:
        module_path, _, class_name = optimizer_type.rpartition(".")
        optimizer_class = _import_class(module_path, class_name, optimizer_type, None)
    else:
        optimizer_class = getattr(torch.optim, optimizer_type, None)
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise _unknown(optimizer_type)
    return optimizer_class, None


def _adafactor_kwargs(kwargs: dict) -> dict:
    """sd-scripts' Adafactor defaults: relative step on unless switched off, and always on with ``warmup_init``."""
    kwargs = dict(kwargs)
    kwargs.setdefault("relative_step", True)
    if kwargs.get("warmup_init", False):
        kwargs["relative_step"] = True
    return kwargs


def is_schedule_free(optimizer_type: str | None) -> bool:
    """sd-scripts' test (any ``…ScheduleFree``, ProdigyPlus's too): it keeps two sets of weights, trains on one and is
    used as the other, and makes its own schedule."""
    return (optimizer_type or "").lower().endswith("schedulefree")


@contextmanager
def evaluating(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """A schedule-free optimizer's weights as they are to be used (sampled, validated, saved), then back to the ones
    it trains on; nothing for other optimizers, nor inside an outer ``evaluating``."""
    switch = callable(getattr(optimizer, "eval", None)) and optimizer.param_groups[0].get("train_mode", False)
    if switch:
        optimizer.eval()
    try:
        yield
    finally:
        if switch:
            optimizer.train()


def takes_its_own_step(optimizer_type: str | None, optimizer_args: list[str] | None) -> bool:
    """Adafactor on its relative step (sd-scripts' default for it): the learning rates and the schedule go unused."""
    if (optimizer_type or "").lower() != "adafactor":
        return False
    return bool(_adafactor_kwargs(parse_optimizer_args(optimizer_args))["relative_step"])


def make_optimizer(optimizer_type: str, param_groups: list[dict], learning_rate: float,
                   optimizer_args: list[str] | None) -> torch.optim.Optimizer:
    """The optimizer sd-scripts' ``get_optimizer`` would build for these options (``""`` means AdamW).

    Each group keeps its own ``lr``. With Adafactor's relative step the rates are kept for display only: the
    optimizer computes its own step size, as sd-scripts' ``adafactor:<lr>`` schedule does.
    """
    optimizer_class, source = _resolve(optimizer_type)
    kwargs = parse_optimizer_args(optimizer_args)
    if source is not None:
        kwargs = {**kwargs, **{k: v for k, v in source.default_kwargs.items() if k not in kwargs}}
        if optimizer_class is Adafactor:
            kwargs = _adafactor_kwargs(kwargs)
    fixed_kwargs = source.fixed_kwargs if source is not None else {}
    speed = {}
    if optimizer_class is torch.optim.AdamW and not {"fused", "foreach"} & kwargs.keys():
        if kwargs.keys() <= _FLAT_ADAMW_ARGUMENTS and all(FlatAdamW.supports(g["params"]) for g in param_groups):
            optimizer_class = FlatAdamW  # the same steps, without the per-tensor overhead; not shown in ss_optimizer
        elif has_fused_kernels({p.device.type for g in param_groups for p in g["params"]}):
            speed = {"fused": True}  # one kernel for all parameters: ~4x faster steps on CPU too
    try:
        optimizer = optimizer_class(param_groups, lr=learning_rate, **fixed_kwargs, **speed, **kwargs)
    except (TypeError, ValueError, RuntimeError) as error:  # RuntimeError: e.g. fused=True where torch has no such kernel
        raise UserError(f"--optimizer_type {optimizer_type or 'AdamW'} with --optimizer_args "
                        f"{' '.join(optimizer_args or [])!r}: {error}") from None
    optimizer.sd_scripts_kwargs = kwargs  # what ss_optimizer shows, sd-scripts' filled-in defaults included
    if is_schedule_free(optimizer_type):
        optimizer.train()  # they start in neither mode
    return optimizer


_FLAT_ADAMW_ARGUMENTS = {"betas", "eps", "weight_decay", "maximize"}


def clip_grad_norm_(optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor], max_norm: float) -> None:
    """sd-scripts' ``--max_grad_norm``: the gradients scaled to a global norm of at most ``max_norm``; a
    ``FlatAdamW`` clips its gathered gradients (one norm and one multiply instead of two per tensor)."""
    if isinstance(optimizer, FlatAdamW):
        optimizer.clip_grad_norm_(max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def optimizer_label(optimizer: torch.optim.Optimizer, optimizer_args: list[str] | None = None) -> str:
    """sd-scripts' ``ss_optimizer``: ``<module>.<class>`` plus ``(key=value,…)`` when arguments were given.

    e.g. ``torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))``. The arguments are those
    ``make_optimizer`` used; for an optimizer made elsewhere, those parsed from ``optimizer_args``.
    """
    kwargs = getattr(optimizer, "sd_scripts_kwargs", None)
    if kwargs is None:
        kwargs = parse_optimizer_args(optimizer_args)
    shown = torch.optim.AdamW if isinstance(optimizer, FlatAdamW) else type(optimizer)  # the same algorithm
    name = getattr(shown, "sd_scripts_name", f"{shown.__module__}.{shown.__name__}")
    arguments = ",".join(f"{key}={value}" for key, value in kwargs.items())
    return name + (f"({arguments})" if arguments else "")


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), with lion_pytorch's defaults.

    c = β1·m + (1 − β1)·g;  θ ← θ − lr·(sign(c) + λ·θ);  m ← β2·m + (1 − β2)·g
    """

    sd_scripts_name = "lion_pytorch.lion_pytorch.Lion"  # the class sd-scripts trains with, as its ss_optimizer names it

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 use_triton: bool = False, decoupled_weight_decay: bool = False):
        """lion-pytorch 0.2.3's arguments (sd-scripts' pin): ``use_triton`` picks its GPU kernel for the same update;
        ``decoupled_weight_decay`` divides the decay by the starting ``lr``, so the decay per step follows the
        schedule's shape but not its size."""
        if lr <= 0.0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not all(0.0 <= beta <= 1.0 for beta in betas):
            raise ValueError(f"betas must lie in [0, 1], got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})
        self.decay_divisor = lr if decoupled_weight_decay else 1.0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, weight_decay = group["lr"], group["weight_decay"] / self.decay_divisor
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param)
                momentum = state["exp_avg"]
                # decoupled decay on the old weights equals the paper's −lr·λ·θ term
                param.mul_(1.0 - lr * weight_decay)
                param.add_(torch.sign(momentum * beta1 + param.grad * (1.0 - beta1)), alpha=-lr)
                momentum.mul_(beta2).add_(param.grad, alpha=1.0 - beta2)
        return loss


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm(2) / math.sqrt(tensor.numel())


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018) with the arguments and defaults of transformers' ``Adafactor``.

    ``relative_step``: step size ``min(1e-2, 1/sqrt(t))`` (``1e-6·t`` with ``warmup_init``) instead of ``lr``;
    ``scale_parameter``: the step is multiplied by ``max(eps[1], RMS(θ))``. Matrices keep factored row/column
    second moments; the update is clipped to RMS ``clip_threshold``; ``beta1`` adds momentum.
    """

    sd_scripts_name = "transformers.optimization.Adafactor"  # the class sd-scripts trains with, as its ss_optimizer names it

    def __init__(self, params, lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, beta1: float | None = None, weight_decay: float = 0.0, scale_parameter: bool = True,
                 relative_step: bool = True, warmup_init: bool = False):
        if warmup_init and not relative_step:
            raise ValueError("warmup_init=True needs relative_step=True")
        if not relative_step and not lr:
            raise ValueError("relative_step=False needs a learning rate")
        super().__init__(params, {"lr": lr, "eps": tuple(eps), "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                                  "beta1": beta1, "weight_decay": weight_decay, "scale_parameter": scale_parameter,
                                  "relative_step": relative_step, "warmup_init": warmup_init})

    @property
    def uses_relative_step(self) -> bool:
        return any(group["relative_step"] for group in self.param_groups)

    @staticmethod
    def step_size(group: dict, step: int, param_rms: float) -> float:
        size = group["lr"]
        if group["relative_step"]:
            size = min(1e-6 * step if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            size = size * max(group["eps"][1], param_rms)
        return size

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            sizes = [self._update(param, group) for param in group["params"] if param.grad is not None]
            if sizes:  # the group's rate as transformers' AdafactorSchedule reports it: its first parameter's step
                group["step_size"] = sizes[0]
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> float:
        grad = param.grad.float()
        weights = param.float()  # low-precision weights are updated in fp32 and written back
        state = self.state[param]
        factored = grad.dim() >= 2
        if not state:
            state["step"] = 0
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(grad.shape[:-1], dtype=grad.dtype, device=grad.device)
                state["exp_avg_sq_col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:], dtype=grad.dtype, device=grad.device)
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            if group["beta1"] is not None:
                state["exp_avg"] = torch.zeros_like(grad)
        state["step"] += 1
        step_size = self.step_size(group, state["step"], float(_rms(weights)))
        decay = 1.0 - state["step"] ** group["decay_rate"]
        squared = grad * grad + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(decay).add_(squared.mean(dim=-1), alpha=1.0 - decay)
            col.mul_(decay).add_(squared.mean(dim=-2), alpha=1.0 - decay)
            row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
            update = row_factor * col.unsqueeze(-2).rsqrt() * grad
        else:
            state["exp_avg_sq"].mul_(decay).add_(squared, alpha=1.0 - decay)
            update = state["exp_avg_sq"].rsqrt() * grad
        update = update / (_rms(update) / group["clip_threshold"]).clamp(min=1.0) * step_size
        if group["beta1"] is not None:
            update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
        if group["weight_decay"]:
            weights.add_(weights, alpha=-group["weight_decay"] * step_size)
        weights.sub_(update)
        if weights is not param:
            param.copy_(weights)
        return step_size
