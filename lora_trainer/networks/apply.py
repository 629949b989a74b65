"""Networks merged into a model's weights: several at once, cheap strength changes, bit-exact restore.

The first time a layer is touched its original weight is copied aside; restore copies it back, so the base
model is bit-identical afterwards whatever happened in between. Each network's contribution to a layer is
kept: for algorithms linear in the multiplier that is ΔW at strength 1, for DoRA/OFT/BOFT the current ΔW(m),
recomputed only for their own layers. A changed layer is always written afresh as original + Σ mᵢ·ΔWᵢ, in a fixed
order (the WebUI's fp8 weights summed in fp16): the weights then depend only on the networks and strengths asked
for now, never on the generations before (adding and subtracting strength changes in fp16 would leave rounding
residue that grows with every X/Y/Z cell). Every delta is computed from the original
weight, so the order networks are listed in does not matter (the WebUI instead feeds each network the weight
patched by the previous ones, which differs only where two weight-dependent networks such as DoRA and OFT sit on
the same layer). A network listed twice is applied twice, its strengths adding up, as in the WebUI.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from .files import MatchReport, ModuleMatch, NetworkFile, match_network
from .naming import Target, model_components, model_targets
from .registry import is_linear_in_multiplier, module_delta


@dataclass(frozen=True)
class Strength:
    """How strongly a network is applied: the WebUI's ``<lora:name:te:unet>`` plus optional block weights."""

    te: float = 1.0
    unet: float | None = None  # None: same as te, as in the WebUI
    blocks: dict[str, float] | None = None  # block label (BASE, IN01, M00, OUT03…) → weight; see block_weights.py

    def for_target(self, target: Target) -> float:
        side = self.te if target.is_text_encoder or self.unet is None else self.unet
        if self.blocks is None:
            return side
        return side * self.blocks.get(target.block, 1.0)


@dataclass
class _Contribution:
    match: ModuleMatch
    linear: bool
    multiplier: float
    weight: torch.Tensor | None  # linear: ΔW(1); otherwise ΔW(multiplier); in the parameter's dtype and device
    bias: torch.Tensor | None

    @property
    def factor(self) -> float:
        """What ``weight`` is added with: the multiplier, or 1 where it is already ΔW(multiplier)."""
        return self.multiplier if self.linear else 1.0


@dataclass
class _Applied:
    network: NetworkFile
    strength: Strength
    report: MatchReport
    contributions: dict[str, _Contribution] = field(default_factory=dict)  # target name → contribution


def network_key(network: NetworkFile) -> object:
    return network.path.resolve() if network.path else id(network)


class MergedNetworks:
    """The networks currently merged into one model (its UNet and text encoders)."""

    def __init__(self, targets: dict[str, Target], components: dict[str, nn.Module], label: str = "this model",
                 store: torch.device | str | None = None):
        self.targets = targets
        self.components = components  # Target.component → the module its paths are relative to
        self.label = label
        # where the originals and the cached ΔW live: None = beside the weights; "cpu" keeps a GPU model's VRAM
        # for generating (the WebUI keeps its backups in RAM too)
        self.store = None if store is None else torch.device(store)
        self._originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._applied: dict[object, _Applied] = {}
        self._modules: dict[str, nn.Module] = {}  # target name → its layer, looked up once
        self._reports: dict[int, tuple[weakref.ref, MatchReport]] = {}  # id(network) → report, while it lives

    @classmethod
    def for_model(cls, config, unet: nn.Module | None, text_encoders: Sequence[nn.Module] | None) -> MergedNetworks:
        return cls(model_targets(config, unet, text_encoders), model_components(config, unet, text_encoders), config.label)

    # --- parameters ------------------------------------------------------------------------------------------

    def _module(self, target: Target) -> nn.Module:
        module = self._modules.get(target.name)
        if module is None:
            module = self._modules[target.name] = self.components[target.component].get_submodule(target.module)
        return module

    def weight_of(self, target: Target) -> torch.Tensor:
        weight = getattr(self._module(target), target.parameter)
        return weight if target.rows is None else weight[target.rows[0] : target.rows[1]]

    def bias_of(self, target: Target) -> torch.Tensor | None:
        bias = getattr(self._module(target), target.bias, None) if target.bias else None
        if bias is None or target.rows is None:
            return bias
        return bias[target.rows[0] : target.rows[1]]

    def _original(self, target: Target) -> tuple[torch.Tensor, torch.Tensor | None]:
        if target.name not in self._originals:
            bias = self.bias_of(target)
            self._originals[target.name] = (self._stored(self.weight_of(target)), None if bias is None else self._stored(bias))
        return self._originals[target.name]

    def _stored(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().clone() if self.store is None else tensor.detach().to(self.store, copy=True)

    @torch.no_grad()
    def _add(self, target: Target, weight: torch.Tensor | None, bias: torch.Tensor | None, factor: float) -> None:
        """Add into the layer as it is (``merge_for_good``: nothing kept to undo it)."""
        if weight is not None:
            own = self.weight_of(target)
            own.add_(weight.to(own.device), alpha=factor)
        if bias is not None:
            own = self.bias_of(target)
            if own is None:
                raise UserError(f"{target.name}: the network changes a bias this layer does not have")
            own.add_(bias.to(own.device), alpha=factor)

    @torch.no_grad()
    def _write(self, names: set[str]) -> None:
        """Each named layer set to its original plus what the applied networks add to it; a layer none of them touches
        any more gets its original bits back, and its copy is let go."""
        parts: dict[str, list[_Contribution]] = {}
        for key in sorted(self._applied, key=str):  # one order for a set of networks, whatever order they came in
            for name, contribution in self._applied[key].contributions.items():
                if name in names:
                    parts.setdefault(name, []).append(contribution)
        for name in names & self._originals.keys():
            target = self.targets[name]
            weight, bias = self._originals[name] if name in parts else self._originals.pop(name)
            _set_sum(self.weight_of(target), weight, [(c.weight, c.factor) for c in parts.get(name, [])])
            if bias is not None:
                _set_sum(self.bias_of(target), bias, [(c.bias, c.factor) for c in parts.get(name, [])])

    # --- networks --------------------------------------------------------------------------------------------

    def check(self, network: NetworkFile) -> MatchReport:
        """How the network fits this model, computed once per network object while it lives: the WebUI asks before
        every generation, for every LoRA of the prompt, and a check computes each layer's ΔW shape."""
        known = self._reports.get(id(network))
        if known is not None and known[0]() is network:
            return known[1]
        report = match_network(network, self.targets, self.weight_of, self.label)
        reports = self._reports  # the callback holds the dict, not self; it runs before the id can be reused
        self._reports[id(network)] = (weakref.ref(network, lambda _, key=id(network): reports.pop(key, None)), report)
        return report

    @property
    def applied(self) -> list[tuple[NetworkFile, Strength]]:
        return [(a.network, a.strength) for a in self._applied.values()]

    def set_networks(self, networks: Sequence[tuple[NetworkFile, Strength]]) -> list[MatchReport]:
        """Make exactly these networks merged at these strengths, computing only what differs from now.

        A network that does not fit raises UserError with its report, and the model is left as it was.
        """
        wanted: dict[tuple[object, int], tuple[NetworkFile, Strength]] = {}
        for network, strength in networks:
            times = sum(k[0] == network_key(network) for k in wanted)  # the same file twice: both apply
            wanted[(network_key(network), times)] = (network, strength)
        reports = {}
        fresh = {}
        for key, (network, strength) in wanted.items():
            if key in self._applied and self._applied[key].network is network:
                reports[key] = self._applied[key].report
                continue
            report = self.check(network)
            if not report.ok:
                raise UserError(report.message())
            reports[key] = report
            fresh[key] = (network, strength, report)

        changed: set[str] = set()
        try:
            for key in [k for k in self._applied if k not in wanted or k in fresh]:
                changed |= self._applied.pop(key).contributions.keys()
            for key, (network, strength) in wanted.items():
                if key in fresh:
                    self._add_network(key, *fresh[key], changed)
                elif self._applied[key].strength != strength:
                    self._restrength(self._applied[key], strength, changed)
        finally:
            self._write(changed)
        return [reports[k] for k in wanted]

    def held_bytes(self) -> int:
        """Memory this object keeps while networks are applied: original weights and cached deltas."""
        tensors = [t for pair in self._originals.values() for t in pair if t is not None]
        tensors += [t for a in self._applied.values() for c in a.contributions.values() for t in (c.weight, c.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def restore(self) -> None:
        """Every touched weight back to its original bits; no network applied."""
        with torch.no_grad():
            for name, (weight, bias) in self._originals.items():
                target = self.targets[name]
                self.weight_of(target).copy_(weight)
                if bias is not None:
                    self.bias_of(target).copy_(bias)
        self._originals.clear()
        self._applied.clear()

    def _contribution(self, match: ModuleMatch, multiplier: float) -> _Contribution:
        weight, _ = self._original(match.target)
        device = self.weight_of(match.target).device
        linear = is_linear_in_multiplier(match.tensors)
        tensors = {k: v.to(device) for k, v in match.tensors.items()}  # ΔW is computed where the model is
        delta = module_delta(tensors, _computable(weight.to(device)), 1.0 if linear else multiplier)
        if delta.bias is not None and self.bias_of(match.target) is None:
            raise UserError(f"{match.target.name}: the network changes a bias this layer does not have")
        keep = lambda t: None if t is None else t.to(self.store or device, _computable(weight).dtype)  # noqa: E731
        return _Contribution(match, linear, multiplier, keep(delta.weight), keep(delta.bias))

    def _add_network(self, key, network: NetworkFile, strength: Strength, report: MatchReport, changed: set[str]) -> None:
        applied = _Applied(network, strength, report)
        self._applied[key] = applied
        try:
            for match in report.matched:
                changed.add(match.target.name)  # its original is kept from here on: written back if this one fails
                applied.contributions[match.target.name] = self._contribution(match, strength.for_target(match.target))
        except Exception:
            del self._applied[key]  # the model stays as it was before this network
            raise

    def _restrength(self, applied: _Applied, strength: Strength, changed: set[str]) -> None:
        applied.strength = strength
        for name, c in applied.contributions.items():
            m = strength.for_target(c.match.target)
            if m == c.multiplier:
                continue
            if not c.linear:
                fresh = self._contribution(c.match, m)
                c.weight, c.bias = fresh.weight, fresh.bias
            c.multiplier = m
            changed.add(name)


def _computable(tensor: torch.Tensor) -> torch.Tensor:
    """fp8 weights (the WebUI's "FP8 weight" setting) have no arithmetic: their deltas are computed in fp16."""
    return tensor.half() if tensor.dtype.itemsize == 1 and tensor.is_floating_point() else tensor


def _set_sum(own: torch.Tensor, original: torch.Tensor, parts: list[tuple[torch.Tensor | None, float]]) -> None:
    """``own`` = original + Σ factor·delta, in place and always in the same order: the result depends only on the parts
    (fp16 rounds each addition, as the WebUI's own merge does). fp8 has no arithmetic: summed in fp16, rounded once."""
    parts = [(delta, factor) for delta, factor in parts if delta is not None and factor != 0]
    target = own if own.dtype.itemsize > 1 or not parts else torch.empty(own.shape, dtype=torch.float16, device=own.device)
    target.copy_(original)
    for delta, factor in parts:
        target.add_(delta.to(target.device, target.dtype), alpha=factor)
    if target is not own:
        own.copy_(target)


@torch.no_grad()
def merge_for_good(config, unet: nn.Module, text_encoders: Sequence[nn.Module],
                   networks: Sequence[tuple[NetworkFile, Strength]]) -> list[MatchReport]:
    """Add networks into a model's weights with nothing kept to undo them (``--base_weights``): no copies of the
    originals or of the deltas, which ``MergedNetworks`` needs for its exact restore. Each layer's ΔW is computed
    from its weight as it is when that network comes, in the order given, as sd-scripts' ``merge_to`` does."""
    model = MergedNetworks.for_model(config, unet, text_encoders)
    reports = []
    for network, strength in networks:
        report = model.check(network)
        if not report.ok:
            raise UserError(report.message())
        for match in report.matched:
            weight = model.weight_of(match.target)
            tensors = {k: v.to(weight.device) for k, v in match.tensors.items()}
            delta = module_delta(tensors, weight, strength.for_target(match.target))
            model._add(match.target, delta.weight, delta.bias, 1.0)
        reports.append(report)
    return reports
