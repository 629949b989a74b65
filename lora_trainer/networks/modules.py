"""Trainable network modules: thin nn.Module shells over the algorithm files' tensors and delta functions.

A module's state dict is exactly what the file stores under its Kohya name (``lora_down.weight``, ``alpha``,
``hada_w1_a``, ``dora_scale`` …). While the network is applied it is its layer's forward: LoRA through
output + up(down(x)) (cheap, with sd-scripts' dropout, rank dropout and module dropout) or, on a small product,
through the merged weight W + s·up·down; every other algorithm through ΔW from the same pure function that merging
uses, so training and merging cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..models.common import conv2d, pointwise_conv2d
from .dora import init_magnitude
from .naming import Target
from .registry import INITIALISERS, delta_by, find_algorithm, load_builtin, modifiers_for
from .registry import scale as registry_scale
from .spec import NetworkSpec


# the factor(s) LyCORIS multiplies by a trained ``scalar`` when it saves a module (ΔW is linear in each)
SCALAR_FACTORS = {"lora": ("lora_up.weight",), "loha": ("hada_w1_a",), "lokr": ("lokr_w1", "lokr_w1_a"),
                  "glora": ("a2.weight", "b2.weight")}
RANK_SCALED = ("lora", "dylora", "loha", "lokr", "glora")  # the algorithms scaled by α/r, which store alpha
_POINTWISE = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1}
# Below this many multiply-adds in the layer's product (rows of x × the weight's size) a LoRA runs as one product
# with the merged weight W + s·up·down: there the per-call cost of x·downᵀ·upᵀ's extra products, forward and
# backward, outweighs their arithmetic (a tiny model's layers: LoRA took 40 % of its step on a CPU, 25 % after),
# while above it the merged weight's gradient (rows × out × in) costs more than it saves (even at ≈ 2**24 on a
# 2-core CPU; far higher on a GPU). Only in fp32: the half-precision paths (GPUs) stay sd-scripts' factored sums.
MERGE_BELOW = 2**23


class _Holder(nn.Module):
    """Holds one tensor as ``weight`` so the state dict says ``lora_down.weight`` like sd-scripts' files."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(tensor)


class _Ranks(nn.Module):
    """DyLoRA's ``lora_down``/``lora_up``: one parameter per rank (rows of down, columns of up), as sd-scripts' DyLoRA
    holds them, stored as one ``weight``. A step trains one block of ranks and leaves the others without a gradient,
    so the optimizer does not move them (no momentum carried over, no weight decay) and counts each rank's own steps."""

    def __init__(self, tensor: torch.Tensor, dim: int):
        super().__init__()
        self.dim = dim
        for index, part in enumerate(tensor.split(1, dim)):
            self.register_parameter(f"rank_{index}", nn.Parameter(part.clone()))  # sd-scripts: lora_A.0, lora_A.1 …

    @property
    def ranks(self) -> list[nn.Parameter]:
        return list(self._parameters.values())

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat(self.ranks, self.dim)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        value = state_dict[key]
        if value.shape != self.weight.shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, the shape in "
                              f"current model is {tuple(self.weight.shape)}.")
            return
        with torch.no_grad():
            for rank, part in zip(self.ranks, value.split(1, self.dim)):
                rank.copy_(part)

    @torch.no_grad()
    def mul_(self, factor: float) -> None:
        for rank in self.ranks:
            rank.mul_(factor)


class NetworkModule(nn.Module):
    """One network module on one layer; ``fresh`` makes a trainable one, ``from_tensors`` wraps a file's tensors."""

    def __init__(self, target: Target, layer_weight: torch.Tensor, conv: dict | None, tensors: dict[str, torch.Tensor],
                 spec: NetworkSpec | None = None, norm: Callable | None = None):
        super().__init__()
        spec = spec or NetworkSpec()
        self.target = target
        self.norm = norm  # a norm layer's normalisation with other weight and bias (``norm_function``), else None
        self._delta_kind = find_algorithm(tensors), modifiers_for(tensors)
        found = self._delta_kind[0].name
        self.algorithm = "dylora" if spec.algorithm == "dylora" and found == "lora" else found
        self.conv = conv  # stride/padding/dilation/groups of a Conv2d layer, None for Linear
        self.multiplier = 1.0
        self.dropout = spec.dropout or 0.0
        self.rank_dropout = spec.rank_dropout
        self.module_dropout = spec.module_dropout
        self.unit = spec.unit
        # LyCORIS drops the module's output and one set of ranks for the whole batch, unscaled; sd-scripts the
        # hidden ranks, per sample, rescaled: each network library's own dropouts
        self.lycoris_dropouts = spec.network_module == "lycoris.kohya"
        # LoRA+ raises the rate of the weights named lora_up; LyCORIS's DyLoRA names its up weights up_list.N, so
        # there it raises none (sd-scripts' DyLoRA: lora_B, its up)
        self.loraplus_raises_up = not (self.algorithm == "dylora" and self.lycoris_dropouts)
        for suffix, tensor in tensors.items():
            tensor = tensor.to(layer_weight.device)
            if not tensor.is_floating_point() or suffix in ("alpha", "scale"):  # fixed numbers, not trained
                self.register_buffer(suffix, tensor)
            elif self.algorithm == "dylora" and suffix in ("lora_down.weight", "lora_up.weight"):
                self.add_module(suffix.removesuffix(".weight"), _Ranks(tensor.float(), 0 if suffix == "lora_down.weight" else 1))
            elif suffix.endswith(".weight"):
                self.add_module(suffix.removesuffix(".weight"), _Holder(tensor.float()))
            else:
                self.register_parameter(suffix, nn.Parameter(tensor.float()))
        self._base_weight = [layer_weight]  # a list: not a parameter of ours
        self._pointwise = conv == _POINTWISE and layer_weight.shape[2:] == (1, 1)
        self.merge_below = MERGE_BELOW
        self._mergeable = (self._plain_lora and "lora_mid" not in self._modules and norm is None and target.rows is None
                           and target.parameter == "weight" and (conv is None or conv["groups"] == 1))
        self._fixed_numbers: dict[str, float] = {}  # the buffers as numbers (_refresh_scale); until then, the buffers
        self._refresh_scale(tensors)  # as given (on the CPU): a model built on the meta device has meta buffers
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_scale(module._buffers))

    @classmethod
    def fresh(cls, target: Target, layer_weight: torch.Tensor, conv: dict | None, rank: int, alpha: float, spec: NetworkSpec,
              stored_shape: torch.Size | None = None, bias_shape: torch.Size | None = None) -> NetworkModule:
        """Initialised as sd-scripts/LyCORIS do, so that it changes nothing until trained."""
        shape = stored_shape or layer_weight.shape  # the layer's shape as the file's writer saw it
        load_builtin()
        tensors = INITIALISERS[spec.algorithm](shape, rank, spec, bias_shape)
        if spec.algorithm not in RANK_SCALED:  # no α/r: no alpha, or the algorithm's own (OFT's constraint)
            return cls(target, layer_weight, conv, tensors, spec)
        if spec.dora:
            tensors["dora_scale"] = init_magnitude(layer_weight, spec.dora_on_output)
        if spec.use_scalar:  # ΔW × a trained scalar from 0, its usually-zero factor random instead (LyCORIS)
            tensors["scalar"] = torch.tensor(0.0)
        decomposed = spec.algorithm != "lokr" or "lokr_w2_b" in tensors or "lokr_w1_b" in tensors
        if not decomposed:  # no rank in a LoKr with both factors full: LyCORIS stores alpha = dim, so every reader's scale is 1
            alpha = rank
        elif spec.rs_lora:  # scale α/√r, stored so that alpha / r gives it
            alpha = alpha * math.sqrt(rank)
        tensors["alpha"] = torch.tensor(float(alpha))
        return cls(target, layer_weight, conv, tensors, spec)

    @classmethod
    def fresh_norm(cls, target: Target, layer_weight: torch.Tensor, has_bias: bool, spec: NetworkSpec,
                   norm: Callable) -> NetworkModule:
        """A trained norm layer (LyCORIS ``train_norm``): γ and β shifts, zero at step 0, no rank or alpha."""
        tensors = {"w_norm": torch.zeros(layer_weight.shape)}
        if has_bias:
            tensors["b_norm"] = torch.zeros(layer_weight.shape)
        return cls(target, layer_weight, None, tensors, spec, norm)

    # --- what the file stores --------------------------------------------------------------------------------

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as the file stores them: a trained ``scalar`` (LyCORIS ``use_scalar``) folded into its factor."""
        # the state dict's entries, gathered by hand: dynamo before torch 2.4 (Forge's 2.3) cannot trace state_dict()
        tensors = {**self._parameters, **self._buffers, **{f"{name}.weight": m.weight for name, m in self._modules.items()}}
        scalar = tensors.pop("scalar", None)
        if scalar is not None:
            for key in SCALAR_FACTORS.get(self.algorithm, ()):
                if key in tensors:
                    tensors[key] = tensors[key] * scalar
        return tensors

    @torch.no_grad()
    def scale_(self, name: str, factor: float) -> None:
        """Multiplies the trained factor stored as ``name`` (a file tensor's suffix) by ``factor``, in place."""
        holder = self._modules.get(name.removesuffix(".weight"))
        if isinstance(holder, _Ranks):
            holder.mul_(factor)
        else:  # the parameter itself: a file tensor may be a product (a trained scalar folded in)
            self.get_parameter(name).mul_(factor)

    # --- forward ---------------------------------------------------------------------------------------------

    def _project(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x through a weight shaped as the layer's (or, for a Linear or 1×1 convolution, as a matrix)."""
        if self.conv is None:
            return F.linear(x, weight.flatten(1), bias)  # a matrix stays itself: no autograd node
        if self._pointwise:
            return pointwise_conv2d(x, weight, bias)  # skips the convolution's per-call setup
        if weight.dim() == 2:  # the layer's weight as a matrix
            weight = weight.view(self._base_weight[0].shape)
        return conv2d(x, weight, bias, **self.conv)

    def layer_output(self, layer: nn.Module, layer_forward: Callable, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward while the network is applied: its output for ``x`` with this module's change."""
        if self._dropped():
            return layer_forward(x)
        if self._merges(x):  # the product as a matrix: no reshaping (each a node in the autograd graph) where none is needed
            down, up, scale = self._lora_factors(x.dtype)
            weight = torch.addmm(self._base_weight[0].flatten(1), up.flatten(1), down.flatten(1),
                                 alpha=self.multiplier * scale)
            return self._project(x, weight, layer.bias)
        return self._changed(x, layer_forward(x))

    def changed_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The layer's ``output`` for input ``x`` with this module's change added at the current multiplier."""
        return output if self._dropped() else self._changed(x, output)

    def _dropped(self) -> bool:
        """Module dropout, drawn from torch's generator as sd-scripts and LyCORIS draw it: gradient checkpointing
        restores that one for its recompute, which must take the same modules (Python's random would draw anew)."""
        return bool(self.training and self.module_dropout and float(torch.rand(1)) < self.module_dropout)

    def _merges(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes through the merged weight (see ``MERGE_BELOW``): a plain LoRA without dropout on its
        hidden ranks, in fp32, on a small product."""
        if not self._mergeable or (self.training and (self.dropout or self.rank_dropout)):
            return False
        base = self._base_weight[0]
        rows = x.numel() // x.shape[-1 if self.conv is None else 1]
        return x.dtype == base.dtype == torch.float32 and rows * base.numel() < self.merge_below

    def _changed(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not self._plain_lora:
            base = self._base_weight[0].detach()
            delta = delta_by(*self._delta_kind, {**self.file_tensors(), **self._fixed_numbers}, base, self.multiplier)
            weight, bias = delta.weight, delta.bias
            if self.training and self.rank_dropout:  # LyCORIS: whole output rows of ΔW, unscaled
                kept = (torch.rand(weight.shape[0], device=weight.device) > self.rank_dropout).to(weight.dtype)
                weight = weight * kept.view(-1, *(1,) * (weight.dim() - 1))
                bias = None if bias is None else bias * kept
            weight, bias = [None if t is None else t.to(x.dtype) for t in (weight, bias)]
            if self.norm is not None:  # the normalised input times Δγ, plus Δβ
                return output + self.norm(x, weight=weight, bias=bias)
            change = self._project(x, weight)
            if bias is not None:
                change = change + (bias if self.conv is None else bias[:, None, None])
            return output + change
        hidden, up, scale = self._lora_hidden(x)
        up = up.reshape(up.shape[0], -1)
        if self.training and self.dropout and self.lycoris_dropouts:  # on the module's output: keep it apart
            change = F.linear(hidden, up) if self.conv is None else torch.matmul(up, hidden.flatten(2)).view(output.shape)
            return output + F.dropout(change * (self.multiplier * scale), p=self.dropout)
        # up-projection, scaling and sum as one matrix-multiply-add: a third of the ops of output + up(·)·scale
        if self.conv is None:
            flat = torch.addmm(output.reshape(-1, output.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), up.t(),
                               alpha=self.multiplier * scale)
        else:
            flat = torch.baddbmm(output.flatten(2), up.expand(len(hidden), -1, -1), hidden.flatten(2),
                                 alpha=self.multiplier * scale)
        return flat.view(output.shape)

    @property
    def _plain_lora(self) -> bool:
        """down (through a Tucker core), then up: LoRA/DyLoRA without DoRA (every other case goes through ΔW)."""
        return self.algorithm in ("lora", "dylora") and "dora_scale" not in self._parameters

    def _lora_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """down(x) with the dropouts on the ranks, the up weight and α/r (adjusted by rank dropout and DyLoRA)."""
        down, up, scale = self._lora_factors(x.dtype)
        if "lora_mid" not in self._modules:
            hidden = self._project(x, down)
        else:  # Tucker: the 1×1 down, then the core with the layer's kernel, stride and padding
            hidden = conv2d(F.conv2d(x, down), self._modules["lora_mid"].weight.to(x.dtype), **self.conv)
        if self.training and self.dropout and not self.lycoris_dropouts:
            hidden = F.dropout(hidden, p=self.dropout)
        if self.training and self.rank_dropout:
            rank = down.shape[0]
            shared = self.lycoris_dropouts  # one mask for the batch, unscaled (LyCORIS)
            mask = (torch.rand(1 if shared else hidden.shape[0], rank, device=hidden.device) > self.rank_dropout).to(hidden.dtype)
            if self.conv:
                mask = mask[:, :, None, None]
            else:
                mask = mask.reshape(mask.shape[0], *(1,) * (hidden.dim() - 2), rank)
            hidden = hidden * mask
            if not shared:  # sd-scripts: per sample, rescaled so the expected output is unchanged
                scale = scale / (1 - self.rank_dropout)
        return hidden, up, scale

    def _lora_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        """down, up (a trained scalar folded in) in ``dtype`` and α/r, DyLoRA's ranks of this step taken."""
        scale = self.lora_scale
        if self.training and self.algorithm == "dylora":
            down, up, scale = self._dylora_slice(scale)
        else:
            down, up = self._modules["lora_down"].weight, self._modules["lora_up"].weight
        if "scalar" in self._parameters:  # not .get(): dynamo before torch 2.2 cuts the graph at a dict's .get
            up = up * self._parameters["scalar"]
        return down.to(dtype), up.to(dtype), scale

    def _refresh_scale(self, tensors) -> None:
        """α / r (or the file's ``scale``) and the fixed buffers as numbers, read when the module is made or loaded:
        read in every forward they would make each layer wait for the GPU, and cut a torch.compile graph at each
        layer."""
        down = self._modules.get("lora_down")
        fixed = {k: tensors[k] for k in self._buffers}  # alpha, scale, IA3's on_input: one number each
        if any(t.is_meta for t in fixed.values()):
            return  # loaded onto a model without data: keep the scale it was made with
        self.lora_scale = registry_scale(fixed, down.weight.shape[0]) if down is not None else 1.0
        self._fixed_numbers = {k: t.item() for k, t in fixed.items()}  # what ΔW algorithms read instead of the buffers

    def _dylora_slice(self, scale):
        """DyLoRA (Valipour et al.): each step trains one block of ``unit`` ranks at a random depth b and uses the
        ranks below it frozen, so every prefix of the ranks is a usable LoRA afterwards. The ranks above the block are
        not used and, like the frozen ones, get no gradient."""
        downs, ups = self._modules["lora_down"].ranks, self._modules["lora_up"].ranks
        rank = len(downs)
        b = int(torch.randint(rank // self.unit, ())) * self.unit  # torch's generator: see module dropout
        used = b + self.unit
        down = torch.cat([*(r.detach() for r in downs[:b]), *downs[b:used]])
        up = torch.cat([*(r.detach() for r in ups[:b]), *ups[b:used]], dim=1)
        return down, up, scale * math.sqrt(rank / used)


def norm_function(layer: nn.Module) -> Callable | None:
    """``f(x, weight=…, bias=…)``: a GroupNorm/LayerNorm layer's normalisation with other γ and β; None for others."""
    if isinstance(layer, nn.GroupNorm):
        return partial(F.group_norm, num_groups=layer.num_groups, eps=layer.eps)
    if isinstance(layer, nn.LayerNorm):
        return partial(F.layer_norm, normalized_shape=layer.normalized_shape, eps=layer.eps)
    return None


def layer_and_weight(target: Target, component: nn.Module) -> tuple[nn.Module, torch.Tensor, dict | None]:
    layer = component.get_submodule(target.module)
    weight = getattr(layer, target.parameter)
    if target.rows is not None:
        weight = weight[target.rows[0] : target.rows[1]]
    conv = None
    if isinstance(layer, nn.Conv2d):
        conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
    return layer, weight, conv
