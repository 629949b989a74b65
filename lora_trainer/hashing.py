"""The hashes the WebUI and civitai show for model files, cached by path, size and modification time."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from .errors import UserError
from .safe_io import write_text


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_TRAINER_CACHE", Path.home() / ".cache" / "lora_trainer"))


def file_sha256(path: str | Path) -> str:
    """Full SHA-256 of a file; the WebUI's "AutoV2" short hash is its first 10 hex digits."""
    return _cached(path, "", _whole_file_sha256)


def tensor_data_sha256(path: str | Path) -> str:
    """sha256 of the tensor-data section of a safetensors file: sd-scripts' ``sshs_model_hash`` of the file as it is.
    Cached as ``file_sha256`` is: a grid of 30 epoch files read every file through at each plan (15 s for SDXL's)."""
    return _cached(path, "|tensor data", _tensor_data_sha256)


def _cached(path: str | Path, kind: str, digest_of: Callable[[Path], str]) -> str:
    """``digest_of(path)``, kept in ``hashes.json`` under the file's resolved path, size and modification time (and
    ``kind``, for a digest other than the whole file's), so a file rewritten is read again."""
    path = Path(path).resolve()
    stat = path.stat()
    cache_file = cache_dir() / "hashes.json"
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}{kind}"
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    cache[key] = digest_of(path)
    try:
        write_text(cache_file, json.dumps(cache, indent=0))
    except (OSError, UserError):
        pass  # a read-only home, or the WebUI writing it as the trainer does (Windows refuses the rename): only a cache
    return cache[key]


def _whole_file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensor_data_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
        size = os.fstat(handle.fileno()).st_size
        if header > size - 8:
            raise UserError(f"{path} is not a whole safetensors file (its header claims {header} bytes, the file holds "
                            f"{size}): it is damaged or was cut short; save or download it again")
        handle.seek(8 + header)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def short_hash(path: str | Path) -> str:
    """What the WebUI writes as ``Model hash`` in infotext."""
    return file_sha256(path)[:10]


def legacy_model_hash(path: str | Path) -> str:
    """The WebUI's old 8-digit hash: SHA-256 of 64 KiB at offset 1 MiB (still shown for old images)."""
    with Path(path).open("rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def weights_fingerprint(*modules) -> str:
    """A digest of the weights that make a disk cache (the VAE's encoder for latents, the text encoders for their
    outputs), so a cache made by other weights is made again instead of trained on: up to 64 values of each tensor
    at an even stride, as float32 (a fine-tune or a merge moves every weight), milliseconds even for SDXL's encoders."""
    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
            digest.update(f"{index}.{name}{tuple(tensor.shape)}".encode())
            digest.update(sample.tobytes())
    return digest.hexdigest()[:16]
