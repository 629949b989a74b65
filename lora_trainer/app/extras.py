"""Optional trainer extras (8-bit optimizers, Prodigy, Lion, the ONNX tagger) installed on request into a private
folder of the extension, never into the WebUI's own environment: only the trainer subprocess puts that folder on
its path, so nothing here can change the packages the WebUI runs on.

pip's ``--target`` ignores what is installed already, so asked for bitsandbytes it would download torch and its
CUDA libraries (gigabytes) into the folder again. The install is planned first instead: pip's dry run against the
WebUI's environment says which distributions that environment lacks, and only those are put into the folder, pinned
and without their dependencies. A plan that would replace one of the WebUI's core packages (a newer torch) is refused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from ..errors import UserError

EXTRAS = {
    "onnxruntime": "WD14 tagger",
    "bitsandbytes": "8-bit optimizers (AdamW8bit, Lion8bit…)",
    "prodigyopt": "Prodigy optimizer",
    "dadaptation": "D-Adaptation optimizers (DAdaptAdam…)",
    "schedulefree": "schedule-free optimizers (AdamWScheduleFree…)",
    "lion-pytorch": "Lion optimizer",
}

# the packages the WebUI itself runs on: a second copy beside them would be gigabytes, or a version the WebUI's
# own copy shadows (the folder comes last on the trainer's path), so the extra would not run against it anyway
_HOST_CORE = {"torch", "torchvision", "torchaudio", "xformers", "numpy", "gradio", "transformers", "diffusers",
              "accelerate", "safetensors", "pillow"}


def _checked(packages: list[str]) -> list[str]:
    unknown = [p for p in packages if p not in EXTRAS]
    if unknown:
        raise UserError(f"unknown extra {', '.join(unknown)}; choose from {', '.join(EXTRAS)}")
    if not packages:
        raise UserError("choose at least one extra to install")
    return packages


def plan_command(packages: list[str], python: str = sys.executable) -> list[str]:
    """pip's dry run in the WebUI's environment: its JSON report lists what that environment lacks for ``packages``."""
    return [python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", "--prefer-binary", *_checked(packages)]


def pip_command(requirements: list[str], target: Path, python: str = sys.executable) -> list[str]:
    """Exactly the planned distributions into ``target``, none of their dependencies (the plan holds those it needs)."""
    return [python, "-m", "pip", "install", "--target", str(target), "--no-deps", "--upgrade", "--prefer-binary",
            *requirements]


def missing_distributions(report: dict) -> list[str]:
    """``name==version`` of each distribution pip's install report would install; refuses a core package of the host."""
    planned = {item["metadata"]["name"]: item["metadata"]["version"] for item in report.get("install", [])}
    core = sorted(name for name in planned if re.sub(r"[-_.]+", "-", name).lower() in _HOST_CORE)
    if core:
        found = ", ".join(f"{name} {planned[name]} (the WebUI has {_installed(name)})" for name in core)
        raise UserError(f"these extras need {found}; the WebUI's own packages are never replaced or duplicated. "
                        "Update the WebUI (or install an older release of the extra by hand into the extras folder).")
    return [f"{name}=={version}" for name, version in planned.items()]


def _installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def _run_pip(command: list[str], failure: str) -> subprocess.CompletedProcess:
    # pip's output in UTF-8, as it is read: on Windows it would be the console's code page (a Chinese user folder)
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace",
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise UserError(f"{failure}:\n{tail}")
    return result


def install_extras(packages: list[str], target: Path) -> list[str]:
    """Install what the WebUI's environment lacks for ``packages`` into ``target``; returns the distributions put
    there (none when the environment has them all); raises UserError with pip's last lines on failure."""
    plan = _run_pip(plan_command(packages), f"pip could not work out what {', '.join(packages)} need")
    try:
        report = json.loads(plan.stdout)
    except ValueError:
        raise UserError("pip gave no install report (it needs pip 22.2 or newer); update it in the WebUI's venv with "
                        "`python -m pip install -U pip`, then install the extras again") from None
    needed = missing_distributions(report)
    if needed:
        target.mkdir(parents=True, exist_ok=True)
        _run_pip(pip_command(needed, target), f"pip could not install {', '.join(needed)} into {target}")
    return needed
