"""Optional trainer extras (8-bit optimizers, Prodigy, Lion, the ONNX tagger) installed on request into a private
folder of the extension, never into the WebUI's own environment: only the trainer subprocess puts that folder on
its path, so nothing here can change the packages the WebUI runs on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..errors import UserError

EXTRAS = {
    "onnxruntime": "WD14 tagger",
    "bitsandbytes": "8-bit optimizers (AdamW8bit, Lion8bit…)",
    "prodigyopt": "Prodigy optimizer",
    "lion-pytorch": "Lion optimizer",
}


def pip_command(packages: list[str], target: Path, python: str = sys.executable) -> list[str]:
    unknown = [p for p in packages if p not in EXTRAS]
    if unknown:
        raise UserError(f"unknown extra {', '.join(unknown)}; choose from {', '.join(EXTRAS)}")
    if not packages:
        raise UserError("choose at least one extra to install")
    return [python, "-m", "pip", "install", "--target", str(target), "--upgrade", "--prefer-binary", *packages]


def install_extras(packages: list[str], target: Path) -> str:
    """Run pip for ``packages`` into ``target``; returns its output, raises UserError with pip's last lines on failure."""
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(pip_command(packages, target), capture_output=True, text=True, encoding="utf-8", errors="replace")
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise UserError(f"pip could not install {', '.join(packages)} into {target}:\n{tail}")
    return result.stdout
