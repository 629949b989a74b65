"""`pip install .` without -e: the wheel must carry everything the code reads from disk, so the demo, the tokenizer
and the standalone app's styles work from site-packages as they do from a checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # build from a copy: setuptools writes build/ and *.egg-info into the tree it builds
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "style.css"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "lora_trainer", source / "lora_trainer", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out), str(source)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("lora_trainer-*.whl")
    return built


def test_the_wheel_carries_the_assets_and_the_stylesheet(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = [p for p in (ROOT / "lora_trainer" / "assets").rglob("*") if p.is_file()]
    missing = [p.relative_to(ROOT).as_posix() for p in tracked if p.relative_to(ROOT).as_posix() not in names]
    assert tracked and not missing
    assert zipfile.ZipFile(wheel).read("lora_trainer/assets/style.css") == (ROOT / "style.css").read_bytes()


def test_an_installed_copy_finds_its_model_dataset_vocabulary_and_styles(wheel, tmp_path):
    site = tmp_path / "site packages 站点"  # a wheel is a zip: unpacked, it is the installed package
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import lora_trainer\n"
        "from lora_trainer.app.standalone import _stylesheet\n"
        "from lora_trainer.models.tokenizer import CLIPTokenizer, read_merges\n"
        "from lora_trainer.tiny_model.build import TINY_MODEL_PATH\n"
        "from lora_trainer.tiny_model.demo import SAMPLE_DATASET\n"
        "print(lora_trainer.__file__)\n"
        "print(TINY_MODEL_PATH.stat().st_size, len(list(SAMPLE_DATASET.rglob('*.png'))))\n"
        "print(len(CLIPTokenizer(read_merges()).encode('zkstar, a yellow star')))\n"
        "print(_stylesheet())\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, encoding="utf-8",
                          env={"PYTHONPATH": str(site), "PATH": ""}, timeout=120)
    assert done.returncode == 0, done.stderr
    package, sizes, tokens, *css = done.stdout.splitlines()
    assert Path(package).is_relative_to(site)  # not the checkout's editable install
    model_bytes, images = map(int, sizes.split())
    assert model_bytes > 1_000_000 and images == 16
    assert int(tokens) > 2
    assert "\n".join(css).strip() == (ROOT / "style.css").read_text(encoding="utf-8").strip()


def _python_3_10() -> str | None:
    """The WebUI's own Python (3.10), where this machine has one: on PATH, or one pyenv keeps."""
    candidates = [shutil.which("python3.10"), *map(str, sorted(Path.home().glob(".pyenv/versions/3.10*/bin/python3.10")))]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:  # not a pyenv shim without it
            return candidate
    return None


@pytest.mark.skipif(_python_3_10() is None, reason="no Python 3.10 on this machine")
def test_every_file_compiles_under_the_webuis_python_3_10():
    """The WebUI 1.10 runs on Python 3.10 and loads the extension's scripts and the trainer with it: syntax only a
    newer Python reads (PEP 695 generics, nested f-string quotes, ``except*``) would break the extension on load."""
    files = [p for folder in ("lora_trainer", "scripts") for p in (ROOT / folder).rglob("*.py")] + [ROOT / "install.py"]
    probe = ("import sys\nfailed = []\nfor name in sys.stdin.read().splitlines():\n"
             "    try:\n        compile(open(name, encoding='utf-8').read(), name, 'exec')\n"
             "    except SyntaxError as error:\n        failed.append(f'{name}:{error.lineno}: {error.msg}')\n"
             "print('\\n'.join(failed))\n")
    done = subprocess.run([_python_3_10(), "-c", probe], input="\n".join(map(str, files)), capture_output=True,
                          text=True, encoding="utf-8", timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(files) > 100
    assert done.stdout.strip() == "", "syntax Python 3.10 cannot read:\n" + done.stdout
