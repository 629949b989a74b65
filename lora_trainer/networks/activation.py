"""``<lora:name:te:unet:dyn>`` tags as the WebUI reads them, and the LoRA files those names stand for.

Pure core: the WebUI hook, the standalone host and the grid all turn prompt tags into ``LoraCall``s here,
resolve names through one ``LoraLibrary`` and turn calls into ``apply.Strength``. Arguments are read exactly as
the built-in Lora extension reads them (positional te, unet, dyn; ``te=``, ``unet=``, ``dyn=`` override), plus
``lbw=`` block weights as the LoRA Block Weight extension writes them (a preset or a vector).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UserError
from ..grid.axes import is_step_file, run_files
from ..hashing import file_sha256, tensor_data_sha256
from ..models.configs import SD1, SDXL
from ..models.prompt import EXTRA_NETWORK
from ..safe_io import read_safetensors_metadata
from .apply import Strength
from .block_weights import PRESET_NAMES, block_layouts, parse_block_weights
from .files import NetworkFile, read_network

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
TAG_NAMES = ("lora", "lyco")  # the built-in Lora extension answers both

# The WebUI's extra-network syntax: <kind:arg1:arg2…> (modules/extra_networks.py, re_extra_net).
EPOCH_SUFFIX = re.compile(r"^(?P<run>.+)@e(?P<epoch>\d+)$")

# Vector lengths the block-weight extension accepts: the short form (blocks with attention) and every block.
_LAYOUT_BY_LENGTH = {len(layout): config.unet for config in (SD1, SDXL) for layout in block_layouts(config.unet)}


@dataclass(frozen=True)
class LoraCall:
    """One ``<lora:…>`` tag: which LoRA and how strongly."""

    name: str
    te: float = 1.0
    unet: float | None = None  # None: same as te, as in the WebUI
    dyn: int | None = None  # dynamic dim (the WebUI's ``dyn=``): use the first ``dyn`` ranks (``at_rank``)
    blocks: tuple[float, ...] | str | None = None  # lbw: numbers, or a preset name (its values depend on the model)

    @property
    def unet_multiplier(self) -> float:
        return self.te if self.unet is None else self.unet

    @property
    def has_effect(self) -> bool:
        """False at weight 0 for both parts, or ``dyn=0``, which keeps none of the ranks (the built-in slices them
        away): the LoRA is loaded and named in the infotext, its weights are left as they are."""
        return self.dyn != 0 and not (self.te == 0 and self.unet_multiplier == 0)


def _tag(items: list) -> str:
    return "<lora:" + ":".join(str(i) for i in items) + ">"


def _number(items: list, label: str, text, kind=float):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise UserError(f"{_tag(items)}: {label} {text!r} is not a number; write e.g. <lora:name:0.8>") from None


def parse_block_vector(text: str, tag: str = "lbw") -> tuple[float, ...] | str:
    """A block-weight preset name (``OUTD``, ``ALL0.5`` …, returned as the name: its values depend on the loaded
    model) or 17 (SD1/SD2) / 12 (SDXL) numbers, comma or space separated."""
    if text.strip() in PRESET_NAMES:
        return text.strip()
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        numbers = tuple(float(p) for p in parts)
    except ValueError:
        raise UserError(f"{tag}: block weights {text!r} are neither a preset ({', '.join(PRESET_NAMES)}) "
                        "nor numbers separated by commas") from None
    if len(numbers) not in _LAYOUT_BY_LENGTH:
        raise UserError(f"{tag}: block weights have {len(numbers)} values; write 17 (SD1/SD2) or 12 (SDXL) values "
                        f"(26 or 20 to list every block), or a preset such as {', '.join(PRESET_NAMES)}")
    return numbers


def parse_lora_call(items: list) -> LoraCall:
    """The colon-split arguments of one tag (the WebUI's ``ExtraNetworkParams.items``) → a LoraCall."""
    if not items or not str(items[0]).strip():
        raise UserError("<lora:…>: the tag names no LoRA; write <lora:name:weight>")
    positional, named = [], {}
    for item in items:
        parts = item.split("=", 2) if isinstance(item, str) else [item]  # as ExtraNetworkParams splits them
        if len(parts) == 2:
            named[parts[0].strip()] = parts[1].strip()
        else:
            positional.append(item)
    te = _number(items, "te weight", positional[1]) if len(positional) > 1 else 1.0
    te = _number(items, "te weight", named["te"]) if "te" in named else te
    unet = _number(items, "unet weight", positional[2]) if len(positional) > 2 else None
    unet = _number(items, "unet weight", named["unet"]) if "unet" in named else unet
    dyn = _number(items, "dyn", positional[3], int) if len(positional) > 3 else None
    dyn = _number(items, "dyn", named["dyn"], int) if "dyn" in named else dyn
    if dyn is not None and dyn < 0:
        raise UserError(f"{_tag(items)}: dyn {dyn} is below 0; give the number of ranks to use (dyn=8), or leave it out")
    blocks = parse_block_vector(named["lbw"], _tag(items)) if "lbw" in named else None
    return LoraCall(str(positional[0]).strip(), te, unet, dyn, blocks)


def lora_calls_in(prompt: str) -> tuple[str, list[LoraCall]]:
    """The prompt without its ``<lora:…>``/``<lyco:…>`` tags, and the calls in order. Other extra networks stay."""
    calls = []

    def take(match: re.Match) -> str:
        if match.group(1) not in TAG_NAMES:
            return match.group(0)
        calls.append(parse_lora_call(match.group(2).split(":")))
        return ""

    return EXTRA_NETWORK.sub(take, prompt), calls


def strength_of(call: LoraCall, unet_config=None) -> Strength:
    """The call's weights as ``apply.Strength``. Block vectors and presets map onto ``unet_config``'s blocks (a
    preset takes that model's values: SD1/SD2's 17 or SDXL's 12) when given; else vectors go by their length (SD1/SD2
    17 or 26 values, SDXL 12 or 20) and presets are SD1/SD2's."""
    blocks = None
    if isinstance(call.blocks, str):
        blocks = parse_block_weights(call.blocks, unet_config or SD1.unet)
    elif call.blocks is not None:
        blocks = parse_block_weights(list(call.blocks), unet_config or _LAYOUT_BY_LENGTH[len(call.blocks)])
    return Strength(call.te, call.unet, blocks)


# --- the files names stand for ----------------------------------------------------------------------------------


def sd_version_of(metadata: dict[str, str]) -> str:
    """"SD1", "SD2", "SDXL" or "unknown", from what sd-scripts and modelspec write. Unlike the built-in Lora extension,
    which takes any other metadata for SD1 (only to hide cards, never to refuse a tag), a file without them is
    "unknown": diffusers and converters write ``{"format": "pt"}`` into SDXL LoRAs too."""
    architecture = metadata.get("modelspec.architecture", "")
    base = str(metadata.get("ss_base_model_version", ""))
    if base.startswith("sdxl_") or architecture.startswith("stable-diffusion-xl"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True" or base.startswith("sd_v2") or architecture.startswith("stable-diffusion-v2"):
        return "SD2"
    if str(metadata.get("ss_v2", "")) == "False" or base.startswith("sd_v1") or architecture.startswith("stable-diffusion-v1"):
        return "SD1"
    return "unknown"


@dataclass(frozen=True)
class LoraEntry:
    name: str  # file stem: what <lora:name> is written with
    alias: str  # ss_output_name from the metadata (the name it was trained under), else the stem
    path: Path
    metadata: dict[str, str]
    sd_version: str  # "SD1", "SD2", "SDXL" or "unknown"

    @property
    def epoch(self) -> int | None:
        value = self.metadata.get("ss_epoch", "")
        return int(value) if value.isdigit() else None


def in_state_folder(path: Path) -> bool:
    """A training state's network (``<name>-state/model.safetensors``, sd-scripts' and ours, also while it is
    written to ``….tmp`` or replaced from ``….old``) is a run's snapshot, not a LoRA to list."""
    folder = path.parent
    return folder.name.removesuffix(".tmp").removesuffix(".old").endswith("-state") or (folder / "train_state.json").exists()


def natural_order(text: str) -> list:
    """The WebUI's natural sort key: numbers by value, text without case (``a9`` before ``a10``)."""
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(re.split(r"([0-9]+)", text))]  # odd: digits


def walked(folder: Path, list_hidden: bool = True) -> list[Path]:
    """The files below ``folder`` in the order of the WebUI's ``walk_files``: linked sub-folders followed (a folder
    linked twice is listed twice, as there), the folders in natural order of their paths (a folder's own files before
    its sub-folders'), each one's files in natural order; without ``list_hidden`` (its "list_hidden_files" setting,
    on by default) none in a folder below ``folder`` whose name starts with a dot. A link back to a folder it is in
    is not followed (the WebUI's walk goes round until the system's limit on links, several such links for good)."""
    real_of: dict[str, str] = {}  # each walked folder's real path, for its sub-folders' loop check
    parent_of: dict[str, str] = {}  # (not os.path.dirname: a drive or share root is its own dirname)
    rows = []
    for root, folders, files in os.walk(folder, followlinks=True):
        real = real_of[root] = os.path.realpath(root)
        parent = parent_of.get(root)
        while parent is not None and real_of[parent] != real:  # its chain of folders up to ``folder``
            parent = parent_of.get(parent)
        if parent is not None:
            folders[:] = []  # a loop: this folder is one it is in
            continue
        if not list_hidden:
            folders[:] = [name for name in folders if not name.startswith(".")]
        parent_of.update((os.path.join(root, name), root) for name in folders)
        rows.append((root, files))
    rows.sort(key=lambda row: natural_order(row[0]))
    return [Path(root, name) for root, files in rows for name in sorted(files, key=natural_order)]


class LoraLibrary:
    """The LoRA files in some folders (searched recursively), by name, by alias and by ``name@eN``.

    Listing is cheap (directory walk); metadata is read from a file's header when first needed and kept until the
    file's modification time changes. A file name found twice resolves as in the WebUI's Lora extension, to the
    last one listed (folders in order, each ``walked`` as the WebUI walks them: ``b/style`` over ``a/style`` over
    ``style``, ``a10/style`` over ``a9/style``, the LyCORIS folder over the Lora folder); an alias several files share
    (the epochs of one run) to the one with the highest ``ss_epoch``. macOS's ``._name`` companions are no LoRAs.
    """

    NETWORKS_KEPT = 16  # read files kept: a 10-epoch grid switches without re-reading

    def __init__(self, folders: list[Path], list_hidden: bool = True):
        self.folders = [Path(f) for f in folders]
        self.list_hidden = list_hidden
        self._files: list[tuple[Path, int]] | None = None
        self._metadata: dict[Path, tuple[int, dict[str, str]]] = {}
        self._short_hashes: dict[tuple[Path, int], str] = {}
        self._networks: dict[Path, tuple[int, NetworkFile]] = {}  # oldest use first

    def network(self, path: Path) -> NetworkFile:
        """The file's network: the same object while the file is unchanged, so that a strength change between two
        generations is a cheap update of the merged weights rather than a new merge."""
        path = Path(path)
        mtime = path.stat().st_mtime_ns
        cached = self._networks.pop(path, None)
        if cached is None or cached[0] != mtime:
            cached = (mtime, read_network(path))
        self._networks[path] = cached
        while len(self._networks) > self.NETWORKS_KEPT:
            self._networks.pop(next(iter(self._networks)))
        return cached[1]

    def refresh(self) -> None:
        files = []
        for folder in self.folders:
            if folder.is_dir():
                for path in walked(folder, self.list_hidden):
                    if path.suffix.lower() not in LORA_SUFFIXES or path.name.startswith("._") or in_state_folder(path):
                        continue
                    try:
                        files.append((path, path.stat().st_mtime_ns))
                    except (FileNotFoundError, NotADirectoryError):  # renamed away meanwhile (an atomic save)
                        continue
        self._files = files
        known = {p for p, _ in files}
        self._metadata = {p: m for p, m in dict(self._metadata).items() if p in known}  # (copied: another thread adds)

    def _listing(self) -> list[tuple[Path, int]]:
        if self._files is None:
            self.refresh()
        return self._files

    def metadata_of(self, path: Path, mtime: int | None = None) -> dict[str, str]:
        mtime = path.stat().st_mtime_ns if mtime is None else mtime
        cached = self._metadata.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, read_safetensors_metadata(path))
            self._metadata[path] = cached
        return cached[1]

    def _entry(self, path: Path, mtime: int) -> LoraEntry:
        metadata = self.metadata_of(path, mtime)
        return LoraEntry(path.stem, metadata.get("ss_output_name") or path.stem, path, metadata, sd_version_of(metadata))

    def entries(self) -> list[LoraEntry]:
        return [self._entry(p, m) for p, m in self._listing()]

    def entry(self, name: str) -> LoraEntry | None:
        path = self.resolve(name)
        return None if path is None else self._entry(path, path.stat().st_mtime_ns)

    def resolve(self, name: str) -> Path | None:
        """The file ``<lora:name>`` means: by file stem, then by alias, then ``run@eN`` = epoch N of a run."""
        name = name.strip()
        by_stem = next((p for p, _ in reversed(self._listing()) if p.stem == name), None)
        if by_stem is not None:
            return by_stem
        entries = self.entries()
        by_alias = [e for e in entries if e.alias == name]
        if by_alias:  # every file of a run carries its name: take the latest epoch (the final file)
            return max(by_alias, key=lambda e: (e.epoch or 0, e.path.stat().st_mtime_ns)).path
        match = EPOCH_SUFFIX.match(name)
        return self._epoch_file(match.group("run"), int(match.group("epoch")), entries) if match else None

    def _epoch_file(self, run: str, epoch: int, entries: list[LoraEntry]) -> Path | None:
        numbered = next((e.path for e in reversed(entries) if e.path.stem == f"{run}-{epoch:06d}"), None)
        if numbered is not None:
            return numbered
        named = [e for e in entries if e.alias == run or e.name == run]
        if named:
            # every file of that run, the numbered ones and the final one, with their ss_epoch (a step file's is the
            # epoch it was saved in, or completed: never that epoch's file)
            for file in run_files(named[0].path):
                if file.epoch == epoch and not is_step_file(file.path):
                    return file.path
        return next((e.path for e in named if e.epoch == epoch and not is_step_file(e.path)), None)

    def short_hash(self, path: Path) -> str:
        """The hash the WebUI writes into ``Lora hashes``: ``sshs_model_hash`` from the metadata, else the hash of
        the tensor data (the "addnet" hash) for safetensors, else of the whole file; 12 hex digits."""
        mtime = path.stat().st_mtime_ns
        key = (path, mtime)
        if key not in self._short_hashes:
            recorded = self.metadata_of(path, mtime).get("sshs_model_hash")
            if not recorded:  # the file says its hash: no need to read all of it
                recorded = tensor_data_sha256(path) if path.suffix.lower() == ".safetensors" else file_sha256(path)
            self._short_hashes[key] = recorded[:12]
        return self._short_hashes[key]


# --- rewriting tags (X/Y/Z axes, grids) ----------------------------------------------------------------------------


def edit_lora_tags(prompt: str, edit: Callable[[list[str]], list[str]], name: str | None = None) -> str:
    """``prompt`` with ``edit(items)`` applied to every ``<lora:…>`` tag naming ``name`` (default: the first tag's
    name). Raises UserError when the prompt has no such tag."""
    tags = [m for m in EXTRA_NETWORK.finditer(prompt) if m.group(1) in TAG_NAMES]
    if name is None and tags:
        name = tags[0].group(2).split(":")[0].strip()
    chosen = [m for m in tags if m.group(2).split(":")[0].strip() == name]
    if not chosen:
        raise UserError(f"the prompt has no <lora:{name or 'name'}:…> tag to change; add one, e.g. <lora:my_lora:1>")
    pieces, last = [], 0
    for m in chosen:
        items = edit(m.group(2).split(":"))
        pieces += [prompt[last:m.start()], f"<{m.group(1)}:{':'.join(items)}>"]
        last = m.end()
    return "".join(pieces) + prompt[last:]


def with_name(new_name: str) -> Callable[[list[str]], list[str]]:
    return lambda items: [new_name, *items[1:]]


def with_weight(weight: float) -> Callable[[list[str]], list[str]]:
    """Both weights (te and unet) set to ``weight``; dyn, lbw and other named arguments kept."""

    def edit(items: list[str]) -> list[str]:
        named = [i for i in items[1:] if "=" in i and i.split("=", 1)[0].strip() not in ("te", "unet")]
        positional = [i for i in items[1:] if "=" not in i]
        weights = [f"{weight:g}", f"{weight:g}", *positional[2:]] if len(positional) > 2 else [f"{weight:g}"]
        return [items[0], *weights, *named]

    return edit


def with_block_weights(value: str) -> Callable[[list[str]], list[str]]:
    """``lbw=value`` (a preset or a vector, written with commas) replacing any lbw the tag had."""
    parsed = parse_block_vector(value)
    text = parsed if isinstance(parsed, str) else ",".join(f"{v:g}" for v in parsed)
    return lambda items: [*(i for i in items if not i.startswith("lbw=")), f"lbw={text}"]


def run_name(name: str) -> str:
    """The training run a LoRA name belongs to: ``cats@e3`` and ``cats-000003`` → ``cats``."""
    if match := EPOCH_SUFFIX.match(name):
        return match.group("run")
    numbered = re.match(r"^(?P<run>.+?)-\d{6}$", name)
    return numbered.group("run") if numbered else name


def at_rank(network: NetworkFile, dyn: int | None) -> NetworkFile:
    """The network with only its first ``dyn`` ranks (DyLoRA's ``dyn=``), as the WebUI's built-in does it: up and
    down are cut, the scale stays alpha / full rank (so alpha is cut with them), CP-decomposed modules stay whole."""
    if not dyn or dyn < 1:
        return network
    if dyn not in network.ranks:
        modules = {}
        for name, tensors in network.modules.items():
            down, up = tensors.get("lora_down.weight"), tensors.get("lora_up.weight")
            if down is None or up is None or "lora_mid.weight" in tensors or dyn >= down.shape[0]:
                modules[name] = tensors
                continue
            cut = {**tensors, "lora_down.weight": down[:dyn], "lora_up.weight": up[:, :dyn]}
            if "alpha" in tensors:
                cut["alpha"] = tensors["alpha"] * (dyn / down.shape[0])
            modules[name] = cut
        network.ranks[dyn] = replace(network, modules=modules, ranks={})
    return network.ranks[dyn]


def merge_prompt_loras(prompt: str, library: LoraLibrary, merged, config) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """Merge exactly the prompt's LoRAs into ``merged`` (an ``apply.MergedNetworks`` of a ``config`` model; none when
    the prompt has no tags). Returns (name, file) of each applied, and (key, message) of each left out: not found, or
    not fitting the model (the key names the case, so a caller can say it once)."""
    _, calls = lora_calls_in(prompt)
    wanted, used, skipped = [], [], []
    for call in calls:
        path = library.resolve(call.name)
        if path is None:  # a file added since the folders were listed (a copied-in LoRA, a new epoch)
            library.refresh()
            path = library.resolve(call.name)
        if path is None:
            folders = ", ".join(str(f) for f in library.folders) or "no LoRA folder"
            skipped.append((f"missing:{call.name}", f"LoRA {call.name!r} not found in {folders}; generating without it"))
            continue
        path = Path(path).resolve()
        network = at_rank(library.network(path), call.dyn)
        report = merged.check(network)
        if not report.ok:
            skipped.append((f"unfit:{path}", f"LoRA {call.name!r} does not fit {config.label} and was skipped: "
                                             f"{report.message()}"))
            continue
        used.append((call.name, path))
        if not call.has_effect:
            continue  # unmerged rather than merged at 0: the base weights come back bit for bit
        wanted.append((network, strength_of(call, config.unet)))
    merged.set_networks(wanted)
    return used, skipped


def lora_hashes_infotext(used: list[tuple[str, Path]], library: LoraLibrary) -> dict[str, str]:
    """The WebUI's ``Lora hashes`` infotext entry for the LoRAs a generation used (none: {})."""
    if not used:
        return {}
    # quoted: the value holds commas and colons (the WebUI's infotext quotes it the same way)
    return {"Lora hashes": '"' + ", ".join(f"{name}: {library.short_hash(path)}" for name, path in used) + '"'}
