"""What a network file is: algorithms, rank and alpha per block, base model, training tags, metadata, hashes."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...hashing import file_sha256, tensor_data_sha256
from ..files import NetworkFile
from ..lora import UP
from ..registry import Tensors, find_algorithm, modifiers_for
from .shared import non_finite, read_network_file

# shown in their own fields, not again in the metadata list
_SHOWN_KEYS = {"ss_tag_frequency", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
               "ss_network_args", "sshs_model_hash", "sshs_legacy_hash", "ss_datasets", "ss_bucket_info", "ss_dataset_dirs"}

_BASE_VERSIONS = {"sd_v1": "SD1", "sd_v2": "SD2", "sd_v1_v": "SD1-v", "sd_v2_v": "SD2-v", "sdxl_base_v1-0": "SDXL"}
_ARCHITECTURES = {"stable-diffusion-v1": "SD1", "stable-diffusion-v2-512": "SD2", "stable-diffusion-v2-768-v": "SD2-v",
                  "stable-diffusion-xl-v1-base": "SDXL"}


@dataclass
class BlockSummary:
    block: str  # TE, TE1, TE2, IN00…IN11, MID, OUT00…OUT11, or OTHER (conv_in, time embedding…)
    modules: int
    algorithms: list[str]
    ranks: list[int]  # distinct ranks; empty for algorithms without one (IA3, OFT, full …)
    alphas: list[float]


@dataclass
class NetworkSummary:
    path: str
    modules: int
    algorithms: dict[str, int]
    blocks: list[BlockSummary]
    base_model: str  # SD1, SD2, SDXL … or "unknown"
    base_model_source: str  # the metadata key or the key names it was read from
    network_module: str | None
    dim: str | None
    alpha: str | None
    network_args: dict
    top_tags: list[tuple[str, int]]
    metadata: dict[str, str]  # every other ss_* / modelspec.* / … key, as stored
    stored_model_hash: str | None  # sshs_model_hash as written by the trainer
    model_hash: str  # recomputed the same way (sha256 of the tensor data)
    autov2: str  # what the WebUI shows as the LoRA's short hash
    sha256: str
    problems: list[str] = field(default_factory=list)
    rank: int | None = None  # read from the tensors (the most common), as the WebUI applies it
    rank_alpha: float | None = None
    trigger_words: list[str] = field(default_factory=list)
    recommended_epoch: int | None = None  # from the losses this file records (its run up to its own epoch)
    recommendation: str | None = None
    training: dict[str, str] = field(default_factory=dict)  # the summary's training keys, as stored

    @property
    def hash_matches(self) -> bool | None:
        if self.stored_model_hash is None or not self.model_hash or self.stored_model_hash.lower().startswith("0x"):
            return None  # nothing to compare (LyCORIS's 0x… hash is computed over something else)
        return self.stored_model_hash.lower() == self.model_hash

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "hash_matches": self.hash_matches}, indent=2, ensure_ascii=False)

    def lines(self, every_key: bool = False) -> list[str]:
        """What a user asks first (the network, its shape, base model, run, tags, trigger words, recommended epoch,
        hashes); ``every_key``: the rank and alpha of each block and every other metadata key too."""
        out = [f"{self.path}",
               f"  algorithms: {', '.join(f'{n} ({c} modules)' for n, c in sorted(self.algorithms.items()))}",
               f"  base model: {self.base_model} (from {self.base_model_source})"
               + (f", trained on {self.training['ss_sd_model_name']}" if self.training.get("ss_sd_model_name") else "")]
        args = f", args {json.dumps(self.network_args, ensure_ascii=False)}" if self.network_args else ""
        if self.rank is not None:  # the shape the WebUI applies, which is the tensors'
            several = len({rank for block in self.blocks for rank in block.ranks}) > 1
            out.append(f"  trained as: {self.network_module or 'unknown module'}, rank {self.rank}, alpha "
                       f"{self.rank_alpha:g}{' (most modules)' if several else ''}{args}{self._metadata_shape()}")
        elif self.network_module:
            out.append(f"  trained as: {self.network_module}, dim {self.dim}, alpha {self.alpha}{args}")
        if run := self._run_line():
            out.append(f"  training: {run}")
        if every_key:
            out.append("  blocks:")
            for block in self.blocks:
                ranks = "/".join(map(str, block.ranks)) or "-"
                alphas = "/".join(f"{a:g}" for a in block.alphas) or "-"
                out.append(f"    {block.block:<6} {block.modules:>4} modules  rank {ranks:<8} alpha {alphas:<8} {', '.join(block.algorithms)}")
        if self.top_tags:
            out.append("  top tags: " + ", ".join(f"{tag} ({count})" for tag, count in self.top_tags))
        if self.trigger_words:
            out.append("  trigger words: " + ", ".join(self.trigger_words))
        if self.recommended_epoch is not None:  # an epoch file knows its run up to its own epoch
            epoch, epochs = self.training.get("ss_epoch"), self.training.get("ss_num_epochs")
            partial = f" as of this file's epoch {epoch} of {epochs}" if epoch and epochs and epoch != epochs else ""
            out.append(f"  recommended epoch: {self.recommended_epoch}{partial} ({self.recommendation})")
        out.append(f"  AutoV2 hash: {self.autov2}  sha256: {self.sha256}")
        if self.stored_model_hash is None:
            out.append(f"  model hash: {self.model_hash} (none stored in the file)")
        elif self.hash_matches:
            out.append(f"  model hash: {self.model_hash} (matches sshs_model_hash)")
        elif self.stored_model_hash.lower().startswith("0x"):
            out.append(f"  model hash: {self.model_hash} (stored {self.stored_model_hash} is LyCORIS's own hash, computed "
                       "differently: not comparable)")
        else:
            out.append(f"  model hash: {self.model_hash} — MISMATCH with stored sshs_model_hash {self.stored_model_hash}: "
                       "the tensors were changed after the trainer saved them (converted, pruned or edited)")
        out += [f"  problem: {p}" for p in self.problems]
        if every_key and self.metadata:
            out.append("  metadata:")
            out += [f"    {key}: {_shorten(value)}" for key, value in sorted(self.metadata.items())]
        elif not every_key:
            out.append(f"  (--all: rank and alpha of each of the {len(self.blocks)} blocks"
                       + (f" and the {len(self.metadata)} other metadata keys)" if self.metadata else ")"))
        return out

    def _metadata_shape(self) -> str:
        """What ss_network_dim/alpha say where it is not the tensors' shape: sd-scripts writes the command's values
        there ("None" where not given, the command's alpha under --dim_from_weights)."""
        if self.dim is None or (self.dim == str(self.rank) and _same_number(self.alpha, self.rank_alpha)):
            return ""
        if self.dim == "Dynamic":  # what a resize with a dynamic method writes (sd-scripts' resize_lora.py, ours)
            return " (its metadata says dim Dynamic: resized to a rank per module)"
        return f" (its metadata says dim {self.dim}, alpha {self.alpha}: the training command's values)"

    def _run_line(self) -> str:
        t = self.training
        parts = []
        if images := t.get("ss_num_train_images"):
            parts.append(f"{images} images (repeats counted)")
        if resolution := t.get("modelspec.resolution") or t.get("ss_resolution"):
            parts.append(f"at {resolution}")
        if epoch := t.get("ss_epoch"):
            parts.append(f"epoch {epoch}" + (f" of {t['ss_num_epochs']}" if t.get("ss_num_epochs") else ""))
        if steps := t.get("ss_steps"):
            parts.append(f"step {steps}" + (f" of {t['ss_max_train_steps']}" if t.get("ss_max_train_steps") else ""))
        return ", ".join(parts)


def _same_number(text: str | None, number: float | None) -> bool:
    try:
        return number is not None and float(text) == number
    except (TypeError, ValueError):
        return False


def _shorten(value: str, limit: int = 160) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= limit else value[:limit] + f"… ({len(value)} chars)"


def module_rank(tensors: Tensors) -> int | None:
    """The rank a module stores (LoRA down rows, LoHa/LoKr factor rows); None where the algorithm has none."""
    for suffix in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if suffix in tensors:
            return int(tensors[suffix].shape[0])
    return None


def rank_and_alpha(network: NetworkFile) -> tuple[int | None, float | None]:
    """The rank and alpha most of the file's modules have (a module without an alpha tensor has alpha = rank); None,
    None for algorithms without a rank. The network's shape as the WebUI reads it: sd-scripts' files hold the command's
    values in their ss_network_dim/alpha keys ("None" where not given), which the tensors need not have."""
    ranks = Counter(rank for tensors in network.modules.values() if (rank := module_rank(tensors)) is not None)
    if not ranks:
        return None, None
    rank = ranks.most_common(1)[0][0]
    alphas = Counter(float(tensors["alpha"]) for tensors in network.modules.values() if "alpha" in tensors)
    return rank, alphas.most_common(1)[0][0] if alphas else float(rank)


_DIFFUSERS_BLOCK = re.compile(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)_")
_SGM_BLOCK = re.compile(r"lora_unet_(input|output)_blocks_(\d+)_")


def block_of(name: str) -> str:
    """The block-weight label of a Kohya module name (SD1/SD2 Diffusers-style or SDXL SGM-style)."""
    for prefix, label in (("lora_te1_", "TE1"), ("lora_te2_", "TE2"), ("lora_te_", "TE")):
        if name.startswith(prefix):
            return label
    if "mid_block_" in name or "middle_block_" in name:
        return "MID"
    if match := _SGM_BLOCK.match(name):
        return ("IN" if match.group(1) == "input" else "OUT") + f"{int(match.group(2)):02d}"
    if match := _DIFFUSERS_BLOCK.match(name):
        side, block, kind, index = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        if side == "down":  # IN00 is conv_in; each down block holds 2 layers and a downsampler
            number = 3 * (block + 1) if kind == "downsamplers" else 3 * block + index + 1
            return f"IN{number:02d}"
        number = 3 * block + 2 if kind == "upsamplers" else 3 * block + index
        return f"OUT{number:02d}"
    return "OTHER"


def _block_order(label: str) -> tuple[int, int]:
    order = {"TE": 0, "TE1": 0, "TE2": 1, "IN": 2, "MID": 3, "OUT": 4, "OTHER": 5}
    match = re.match(r"([A-Z]+?)(\d\d)?$", label)
    head = match.group(1) if match and match.group(1) in order else label
    return order.get(head, 6), int(match.group(2)) if match and match.group(2) else 0


def summarise_blocks(network: NetworkFile) -> list[BlockSummary]:
    grouped: dict[str, list[Tensors]] = {}
    for name, tensors in network.modules.items():
        grouped.setdefault(block_of(name), []).append(tensors)
    blocks = []
    for label in sorted(grouped, key=_block_order):
        members = grouped[label]
        algorithms = Counter()
        for tensors in members:
            try:
                algorithms[find_algorithm(tensors).name + ("+dora" if modifiers_for(tensors) else "")] += 1
            except ValueError:
                algorithms["unknown"] += 1
        ranks = sorted({r for t in members if (r := module_rank(t)) is not None})
        alphas = sorted({float(t["alpha"]) for t in members if "alpha" in t})
        blocks.append(BlockSummary(label, len(members), sorted(algorithms), ranks, alphas))
    return blocks


def base_model_of(network: NetworkFile) -> tuple[str, str]:
    """(SD1/SD2/SDXL…, where that was read from): metadata first, then the key names and text-encoder width."""
    version = network.metadata.get("ss_base_model_version")
    if version:
        return _BASE_VERSIONS.get(version, version), "ss_base_model_version"
    architecture = network.metadata.get("modelspec.architecture", "").split("/")[0]
    if architecture:
        return _ARCHITECTURES.get(architecture, architecture), "modelspec.architecture"
    names = list(network.modules)
    if any(n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_")) for n in names):
        return "SDXL", "key names (lora_te1/lora_te2, SGM UNet names)"
    widths = {t["lora_down.weight"].shape[1] for n, t in network.modules.items()
              if n.startswith("lora_te_") and n.endswith("self_attn_q_proj") and "lora_down.weight" in t}
    if widths == {768}:
        return "SD1", "key names and text-encoder width 768"
    if widths == {1024}:
        return "SD2", "key names and text-encoder width 1024"
    if any(n.startswith("lora_unet_") for n in names):
        return "SD1 or SD2", "key names (Diffusers-style UNet names)"
    return "unknown", "nothing in the file says"


def tag_frequency(metadata: dict[str, str]) -> Counter:
    """ss_tag_frequency summed over the dataset folders ({folder: {tag: count}})."""
    counts: Counter = Counter()
    try:
        folders = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except json.JSONDecodeError:
        return counts
    for tags in folders.values() if isinstance(folders, dict) else ():
        if isinstance(tags, dict):
            counts.update({tag.strip(): int(count) for tag, count in tags.items() if isinstance(count, (int, float))})
    return counts


def trigger_words(metadata: dict[str, str], limit: int = 3) -> list[str]:
    """Tags present in every caption of a dataset folder (first folders first), else the folders' class names."""
    try:
        frequencies = json.loads(metadata.get("ss_tag_frequency") or "{}")
        folders = json.loads(metadata.get("ss_dataset_dirs") or "{}")
    except json.JSONDecodeError:
        return []
    words: list[str] = []
    for folder, tags in frequencies.items():
        images = (folders.get(folder) or {}).get("img_count") or max(tags.values(), default=0)
        for tag, count in sorted(tags.items(), key=lambda item: -item[1]):
            if images and count >= images and tag not in words:
                words.append(tag)
    if not words:
        for folder in folders:
            name = folder.split("_", 1)[1] if "_" in folder and folder.split("_", 1)[0].isdigit() else folder
            if name and name not in words:
                words.append(name)
    return words[:limit]


def recorded_recommendation(metadata: dict[str, str]):
    """The trainer's recommended epoch, made again from the epoch losses this file records (our trainer writes them;
    an epoch file holds its run up to its own epoch); None for a file without them (sd-scripts')."""
    from ...grid.plan import LOSSES_KEY
    from ...training.evaluation import recommended_from_recorded

    try:
        return recommended_from_recorded(json.loads(metadata.get(LOSSES_KEY) or "{}"))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None


_TRAINING_KEYS = ("ss_sd_model_name", "ss_num_train_images", "modelspec.resolution", "ss_resolution", "ss_epoch",
                  "ss_num_epochs", "ss_steps", "ss_max_train_steps")


def inspect_network(path: str | Path, top_tags: int = 20) -> NetworkSummary:
    """Everything a user asks about a LoRA-family file; UserError when the file is missing or not a network."""
    from ...training.options import join_command_line

    path = Path(path)
    command = join_command_line(["python", "-m", "lora_trainer", "model", "inspect", str(path)])
    network = read_network_file(path, finite=False,  # non-finite values: said among its problems instead
                                for_checkpoint=f"to see what it is, run: {command}")
    problems = [f"{key}: no known network tensor suffix" for key in network.unreadable_keys[:20]]
    problems += [f"{problem} (the training diverged; use an earlier epoch)" for problem in non_finite(network)[:20]]
    ups = [tensors[UP] for tensors in network.modules.values() if UP in tensors]
    if ups and all(not up.any() for up in ups):  # sd-scripts' check_lora_weights.py is run to spot this
        problems.append("every lora_up is zero: this file changes nothing (saved before its first training step, or "
                        "trained with a learning rate of 0)")
    base, source = base_model_of(network)
    metadata = network.metadata
    try:
        network_args = json.loads(metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        network_args = {"unparsed": metadata["ss_network_args"]}
    sha256 = file_sha256(path)
    rank, rank_alpha = rank_and_alpha(network)
    advice = recorded_recommendation(metadata)
    trigger_phrase = [metadata["modelspec.trigger_phrase"]] if metadata.get("modelspec.trigger_phrase") else []
    return NetworkSummary(
        path=str(path),
        modules=len(network.modules),
        algorithms=network.algorithms,
        blocks=summarise_blocks(network),
        base_model=base,
        base_model_source=source,
        network_module=metadata.get("ss_network_module"),
        dim=metadata.get("ss_network_dim"),
        alpha=metadata.get("ss_network_alpha"),
        network_args=network_args if isinstance(network_args, dict) else {"value": network_args},
        top_tags=tag_frequency(metadata).most_common(top_tags),
        metadata={k: v for k, v in metadata.items() if k not in _SHOWN_KEYS},
        stored_model_hash=metadata.get("sshs_model_hash"),
        model_hash=tensor_data_sha256(path) if path.suffix.lower() == ".safetensors" else "",
        autov2=sha256[:10],
        sha256=sha256,
        problems=problems,
        rank=rank,
        rank_alpha=rank_alpha,
        trigger_words=trigger_phrase or trigger_words(metadata),
        recommended_epoch=advice.epoch if advice else None,
        recommendation=advice.reason if advice else None,
        training={key: metadata[key] for key in _TRAINING_KEYS if metadata.get(key)},
    )
