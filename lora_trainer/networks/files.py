"""Network files: read any LoRA-family file into per-module tensors, match them to a model, report what is wrong.

Reading never touches a model. Matching returns a report that names every key that matched nothing, every
module whose tensors make no known algorithm, every NaN/Inf and every shape that does not fit, so a UI can show
one clear per-file message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError
from .naming import Target, alias_table, canonical
from .registry import find_algorithm, known_suffixes, module_delta

# Other tools' suffixes for the same LoRA tensors (Diffusers/PEFT, old Diffusers attention processors).
SUFFIX_ALIASES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight",
    "lora_B.default.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
}


@dataclass
class NetworkFile:
    """A network's tensors grouped per module (module name as stored → our suffix → tensor), and its metadata."""

    modules: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    unreadable_keys: list[str] = field(default_factory=list)  # keys with no suffix any algorithm owns
    # textual-inversion embeddings bundled with the network (``bundle_emb.*``), per name: the WebUI loads them
    embeddings: dict[str, dict] = field(default_factory=dict, repr=False)
    # this file cut to fewer ranks (``dyn=``), kept so a repeated tag gets the same object (incremental strength changes)
    ranks: dict[int, NetworkFile] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.path.stem if self.path else "network"

    @property
    def algorithms(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tensors in self.modules.values():
            try:
                name = find_algorithm(tensors).name
            except ValueError:
                name = "unknown"
            counts[name] = counts.get(name, 0) + 1
        return counts

    @property
    def training_args(self) -> dict:
        try:
            return json.loads(self.metadata.get("ss_network_args") or "{}")
        except json.JSONDecodeError:
            return {}


def split_key(key: str, suffixes: list[str]) -> tuple[str, str] | None:
    """``<module>.<suffix>`` → (module, suffix), trying the longest suffixes first; None when none fits."""
    for suffix in suffixes:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], SUFFIX_ALIASES.get(suffix, suffix)
    return None


def group_tensors(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, path: Path | None = None) -> NetworkFile:
    suffixes = sorted(known_suffixes() | SUFFIX_ALIASES.keys(), key=len, reverse=True)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unreadable = []
    for key, tensor in state_dict.items():
        split = split_key(key, suffixes)
        if split is None or key.startswith("bundle_emb."):
            unreadable.append(key)
            continue
        name, suffix = split
        modules.setdefault(name, {})[suffix] = tensor
    return NetworkFile(modules, dict(metadata or {}), path, unreadable, embeddings=bundled_embeddings(state_dict))


def bundled_embeddings(state_dict: dict[str, torch.Tensor]) -> dict[str, dict]:
    """``bundle_emb.<name>.string_to_param.*`` (SD1/SD2) or ``bundle_emb.<name>.clip_l`` and ``.clip_g`` (SDXL) → per
    name, the data an embedding file holds, which the WebUI's Lora extension makes an embedding of."""
    embeddings: dict[str, dict] = {}
    for key, tensor in state_dict.items():
        if not key.startswith("bundle_emb.") or key.count(".") < 2:
            continue
        _, name, vector = key.split(".", 2)
        data = embeddings.setdefault(name, {})
        if vector.startswith("string_to_param."):
            data["string_to_param"] = {vector.split(".", 1)[1]: tensor}
        else:
            data[vector] = tensor
    return embeddings


def bundled_embedding_tensors(network: NetworkFile) -> dict[str, torch.Tensor]:
    """The ``bundle_emb.*`` tensors as the file stored them, for a tool that rewrites the file (resize)."""
    tensors = {}
    for name, data in network.embeddings.items():
        for vector, value in data.items():
            if vector == "string_to_param":
                tensors |= {f"bundle_emb.{name}.string_to_param.{key}": t for key, t in value.items()}
            else:
                tensors[f"bundle_emb.{name}.{vector}"] = value
    return tensors


def read_network(path: str | Path) -> NetworkFile:
    """A ``.safetensors`` network (or a ``.pt``/``.ckpt`` one, loaded with ``weights_only``: never unpickled code)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such network file")
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
                # copied out of the file's memory map: a mapped file cannot be replaced on Windows, and the WebUI
                # keeps networks it used, so training that name again or promoting an epoch would fail
                state = {key: handle.get_tensor(key).clone() for key in handle.keys()}
        except Exception as error:  # safetensors raises its own types for truncated or foreign files
            raise UserError(f"{path}: not a readable safetensors file ({error}); re-download or re-save it") from error
    elif path.suffix.lower() in (".pt", ".ckpt", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UserError(f"{path}: cannot be read safely as tensors only ({error}); convert it to .safetensors") from error
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        metadata = {}
        if not isinstance(state, dict):
            raise UserError(f"{path}: holds no tensor dictionary")
    else:
        raise UserError(f"{path}: unknown network file type {path.suffix!r}; expected .safetensors (or .pt/.ckpt)")
    return group_tensors(state, metadata, path)


@dataclass
class ModuleMatch:
    name: str  # as stored in the file
    target: Target
    tensors: dict[str, torch.Tensor]


@dataclass
class MatchReport:
    """How a network file fits a model. ``ok`` means it can be applied; ``problems`` say why not, per key."""

    network: str
    matched: list[ModuleMatch] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # module names that are no layer of this model
    problems: list[str] = field(default_factory=list)  # broken modules: unknown algorithm, NaN, shape, duplicate
    hint: str = ""
    # keys no algorithm reads (a bundled embedding's ``bundle_emb.*``, a stray tensor): left out, as the WebUI's Lora
    # extension leaves them, while the rest applies
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.matched) and not self.problems

    def message(self) -> str:
        lines = [f"{self.network}: {len(self.matched)} modules matched, {len(self.unmatched)} unmatched, {len(self.problems)} broken"]
        if self.hint:
            lines.append(self.hint)
        if self.unmatched:
            lines.append("unmatched: " + ", ".join(self.unmatched[:10]) + (" …" if len(self.unmatched) > 10 else ""))
        lines += self.problems[:20]
        if self.ignored:
            lines.append(self.ignored_note())
        return "\n".join(lines)

    def ignored_note(self, embeddings_loaded: bool = False) -> str:
        """What was left out; ``embeddings_loaded``: the host loads bundled embeddings itself (the WebUI), so they
        are not said."""
        embeddings = [] if embeddings_loaded else sorted({key.split(".")[1] for key in self.ignored
                                                          if key.startswith("bundle_emb.")})
        others = [key for key in self.ignored if not key.startswith("bundle_emb.")]
        if not embeddings and not others:
            return ""
        parts = ([f"its bundled embedding{'s' if len(embeddings) > 1 else ''} {', '.join(embeddings)} (not loaded here: "
                  "the WebUI loads them)"] if embeddings else [])
        if others:
            parts.append(f"{len(others)} key{'s' if len(others) > 1 else ''} no network algorithm reads: "
                         + ", ".join(others[:5]) + (" …" if len(others) > 5 else ""))
        return "left out " + "; ".join(parts)


_VERSION_PREFIXES = {"lora_te1": "SDXL", "lora_te2": "SDXL"}


def _version_hint(network: NetworkFile, unmatched: list[str], targets: dict[str, Target], model_label: str) -> str:
    base = network.metadata.get("ss_base_model_version", "")
    file_is_sdxl = base.startswith("sdxl") or any(name.startswith(("lora_te1_", "lora_te2_")) for name in unmatched)
    model_is_sdxl = any(t.component == "lora_te2" for t in targets.values())
    if file_is_sdxl and not model_is_sdxl:
        return f"this is an SDXL network and the model is {model_label}: pick an SDXL checkpoint or an {model_label} network"
    if model_is_sdxl and base.startswith(("sd_v1", "sd_v2")):
        return f"this network was trained on {base} and the model is SDXL: pick a matching checkpoint"
    return ""


def match_network(network: NetworkFile, targets: dict[str, Target], parameters, model_label: str = "this model") -> MatchReport:
    """Match a file's modules to ``targets``; ``parameters(target)`` returns the target's weight (its own rows of a
    fused q/k/v projection).

    Every module is checked (algorithm, finite values, and its delta's shape, computed on the meta device), so
    a report with no problems applies without failing half-way.
    """
    table = alias_table(targets)
    report = MatchReport(network.name)
    seen: dict[str, str] = {}
    report.ignored = list(network.unreadable_keys)
    for name, tensors in network.modules.items():
        target = table.get(canonical(name))
        if target is None:
            report.unmatched.append(name)
            continue
        if target.name in seen:
            report.problems.append(f"{name}: names the same layer as {seen[target.name]} (duplicate module)")
            continue
        seen[target.name] = name
        problem = _module_problem(name, tensors, target, parameters(target))
        if problem:
            report.problems.append(problem)
        else:
            report.matched.append(ModuleMatch(name, target, tensors))
    report.hint = _version_hint(network, report.unmatched, targets, model_label)
    if report.hint:  # some names can still match (SDXL's lora_te1_ reads as SD1's lora_te_): never apply half a file
        report.problems.append(report.hint)
    if not report.matched and not report.problems:
        report.problems.append("no module of this network matches a layer of the model" + (f" ({report.hint})" if report.hint else ""))
    return report


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The suffixes of a module's tensors that hold NaN or Inf (a diverged training's file)."""
    return [suffix for suffix, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def _module_problem(name: str, tensors: dict[str, torch.Tensor], target: Target, weight: torch.Tensor) -> str | None:
    try:
        find_algorithm(tensors)
    except ValueError as error:
        return f"{name}: {error}"
    bad = non_finite_tensors(tensors)
    if bad:
        return f"{name}: NaN or Inf in {', '.join(bad)} (the training diverged; use an earlier epoch)"
    shape = weight.shape
    try:
        meta = {k: v if v.dim() == 0 else v.to("meta") for k, v in tensors.items()}  # scalars stay readable
        delta = module_delta(meta, torch.empty(shape, device="meta"), 1.0)
    except (RuntimeError, ValueError, IndexError, KeyError) as error:
        return f"{name}: tensors do not fit the layer {target.module} of shape {tuple(shape)} ({error})"
    if delta.weight is not None and delta.weight.shape != shape:
        return f"{name}: makes a {tuple(delta.weight.shape)} change for the layer {target.module} of shape {tuple(shape)}"
    return None
