"""Access to ../shared/reference: the ecosystem's key lists and fixtures (read-only facts, never copied into the package)."""

from __future__ import annotations

import ast
import os
from functools import cache
from pathlib import Path

import pytest

REFERENCE = Path(os.environ.get("LORA_TRAINER_REFERENCE", Path(__file__).resolve().parents[1].parent / "shared" / "reference"))
if not REFERENCE.is_dir():  # a checkout outside the workspace: the tests that need the reference facts say so
    pytest.skip(f"reference facts not found at {REFERENCE} (set LORA_TRAINER_REFERENCE)", allow_module_level=True)
TINY_KOHYA_CHECKPOINT = REFERENCE / "kohya-fixtures" / "model" / "tiny-sd15.safetensors"


@cache
def reference_keys(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of a reference list such as ``sd15-checkpoint-keys.txt``."""
    shapes = {}
    for line in (REFERENCE / name).read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, _dtype = line.split("\t")
        shapes[key] = tuple(ast.literal_eval(shape))
    return shapes


def keys_under(name: str, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: v for k, v in reference_keys(name).items() if k.startswith(prefix)}


def shapes_of(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}
