"""What a network algorithm is, and how the one that owns a module's stored tensors is found.

A network file stores, per targeted layer, a few tensors under ``<layer name>.<suffix>``. Each algorithm module
registers the suffixes it owns and a pure function from those tensors (plus the layer's base weight and the
user's multiplier) to the change of the layer's weight and bias. Modifiers (DoRA) own extra suffixes and
transform the delta of whichever algorithm they sit on. Adding an algorithm is adding a file that calls
``register``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

Tensors = Mapping[str, torch.Tensor]


class Delta(NamedTuple):
    """The change a network makes to one layer: ``W + weight``, ``b + bias`` (either may be None).

    A NamedTuple, not a frozen dataclass: dynamo before torch 2.4 (Forge's 2.3) cannot build the latter in a
    compiled forward and would cut the graph at every layer."""

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def scaled(self, factor: float) -> Delta:
        return Delta(*[None if t is None else t * factor for t in self])


@dataclass(frozen=True)
class Algorithm:
    name: str
    markers: frozenset[str]  # any of these suffixes present means the module is this algorithm's
    suffixes: frozenset[str]  # every suffix it consumes (markers included)
    # delta(tensors, base weight, multiplier) -> Delta, for the layer as stored in the model
    delta: Callable[[Tensors, torch.Tensor, float], Delta]
    # True when delta(m) == m * delta(1): a strength change is then W += (m2 - m1) * delta(1)
    linear_in_multiplier: bool = True
    accepts: Callable[[Tensors], bool] = lambda tensors: True  # tie-break between algorithms sharing a marker
    uses_weight: bool = False  # whether delta reads the base weight's values (else only its shape)


@dataclass(frozen=True)
class Modifier:
    """Extra tensors that reshape another algorithm's result (DoRA's magnitude vector)."""

    name: str
    suffixes: frozenset[str]
    # apply(tensors, base weight, delta of the underlying algorithm at multiplier 1, multiplier) -> Delta
    apply: Callable[[Tensors, torch.Tensor, Delta, float], Delta]


ALGORITHMS: dict[str, Algorithm] = {}
MODIFIERS: dict[str, Modifier] = {}
# algorithm name → init(weight shape, rank, spec, bias shape or None) -> {suffix: tensor}: the fresh trainable
# tensors, as the file stores them, chosen so that the network changes nothing at step 0
INITIALISERS: dict[str, Callable] = {}


BUILTIN = ("lora", "loha", "lokr", "ia3", "full", "norm", "glora", "oft", "boft", "dora")  # one file each


def load_builtin() -> None:
    """Import the algorithm files (each registers itself); cheap after the first call."""
    if not _loaded:
        for name in BUILTIN:
            importlib.import_module(f"{__package__}.{name}")
        _loaded.append(True)


_loaded: list[bool] = []


def trainable_algorithms() -> tuple[str, ...]:
    """The algorithms a network can train: those whose file registers an initialiser."""
    load_builtin()
    return tuple(INITIALISERS)


def algorithm_name(name: str) -> str:
    """sd-scripts'/LyCORIS's ``algo=`` spelling → the algorithm's name here (LoCon is LoRA on convolutions too)."""
    name = name.lower()
    return "lora" if name == "locon" else name


def register(algorithm: Algorithm) -> Algorithm:
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def register_modifier(modifier: Modifier) -> Modifier:
    MODIFIERS[modifier.name] = modifier
    return modifier


def known_suffixes() -> frozenset[str]:
    load_builtin()
    every = set()
    for owner in (*ALGORITHMS.values(), *MODIFIERS.values()):
        every |= owner.suffixes
    return frozenset(every)


def find_algorithm(tensors: Tensors) -> Algorithm:
    """The algorithm whose marker suffixes are present; ValueError naming the suffixes when none or several."""
    load_builtin()
    candidates = [a for a in ALGORITHMS.values() if a.markers & tensors.keys() and a.accepts(tensors)]
    if len(candidates) != 1:
        what = "no known network algorithm" if not candidates else "several algorithms (" + ", ".join(a.name for a in candidates) + ")"
        raise ValueError(f"{what} for the tensors {', '.join(sorted(tensors))}")
    return candidates[0]


def modifiers_for(tensors: Tensors) -> list[Modifier]:
    load_builtin()
    return [m for m in MODIFIERS.values() if m.suffixes & tensors.keys()]


def unknown_suffixes(tensors: Tensors) -> list[str]:
    """Suffixes neither the module's algorithm nor a modifier consumes: reported, never silently dropped."""
    algorithm = find_algorithm(tensors)
    used = set(algorithm.suffixes)
    for modifier in modifiers_for(tensors):
        used |= modifier.suffixes
    return sorted(set(tensors) - used)


def is_linear_in_multiplier(tensors: Tensors) -> bool:
    return find_algorithm(tensors).linear_in_multiplier and not modifiers_for(tensors)


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """fp32 for the math whatever the storage (fp16 products lose the small deltas); fp64 stays fp64."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def module_delta(tensors: Tensors, weight: torch.Tensor, multiplier: float = 1.0) -> Delta:
    """ΔW (and Δbias) of one layer at ``multiplier``, in the compute dtype, shaped like the layer's weight."""
    return delta_by(find_algorithm(tensors), modifiers_for(tensors), tensors, weight, multiplier)


def delta_by(algorithm: Algorithm, modifiers: list[Modifier], tensors: Tensors, weight: torch.Tensor,
             multiplier: float) -> Delta:
    """``module_delta`` with the algorithm and modifiers already known (a training module's, found once)."""
    dtype = compute_dtype(weight)
    # alpha/scale may come as Python numbers (a module's, read once), which need no conversion
    tensors = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in tensors.items()}
    if algorithm.uses_weight or modifiers:
        weight = weight.to(dtype)
    else:  # only the shape is read: skip converting a large weight
        weight = torch.empty(weight.shape, dtype=dtype, device="meta")
    if not modifiers:
        return algorithm.delta(tensors, weight, multiplier)
    delta = algorithm.delta(tensors, weight, 1.0)
    for modifier in modifiers:
        delta = modifier.apply(tensors, weight, delta, multiplier)
    return delta


# --- helpers shared by the low-rank algorithms --------------------------------------------------------------


def optional(tensors: Tensors, key: str) -> torch.Tensor | None:
    """``tensors.get(key)``, which dynamo before torch 2.2 (the WebUI's 2.1) cannot trace: a ``--torch_compile``
    graph would break at every layer."""
    return tensors[key] if key in tensors else None


def scale(tensors: Tensors, rank: int | None) -> float:
    """α / r; no alpha means α = r (every reader agrees); no rank (both LoKr factors full) means 1.

    A1111's optional ``scale`` key replaces α / r; we honour it when reading, and never write it.
    """
    if "scale" in tensors:
        return float(tensors["scale"])
    alpha = optional(tensors, "alpha")
    if alpha is None or rank is None:
        return 1.0
    return float(alpha) / rank


def has_kernel(shape: torch.Size) -> bool:
    """A k×k convolution's weight shape (not a Linear's nor a 1×1 convolution's)."""
    return any(side != 1 for side in shape[2:])


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0], -1)


def tucker(core: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Rebuild a [out, in, kh, kw] kernel from a Tucker core [r, r, kh, kw] and factors left [r, out], right [r, in]."""
    return torch.einsum("ijhw,ip,jq->pqhw", core, as_matrix(left), as_matrix(right))
