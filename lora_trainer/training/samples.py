"""Sample images during training: sd-scripts' prompt files (.txt with --n --w --h --s --l --d --ss, .toml, .json)
and its file names, drawn with our own txt2img while the network is hooked in.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import toml_text
from ..errors import UserError
from ..safe_io import read_utf8
from ..sampling.samplers import is_stand_in, sampler_name
from ..sampling.txt2img import GenerationSettings, txt2img, write_png


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 30
    scale: float = 7.5
    seed: int | None = None
    sampler: str | None = None
    not_read: tuple[str, ...] = ()  # the line's options or the entry's keys that this trainer does not read
    read_partly: tuple[str, ...] = ()  # a warning per number option whose text after the number was ignored


_TXT_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "s": "steps", "l": "scale", "d": "seed", "ss": "sampler"}
# sd-scripts reads a number option by the number it starts with (re.match(r"w (\d+)", …)) and ignores the rest; its
# --d -1 reads no seed, a new one each time, which -1 asks of ours
_LEADING_NUMBER = {"w": re.compile(r"\d+"), "h": re.compile(r"\d+"), "s": re.compile(r"\d+"), "d": re.compile(r"-?\d+"),
                   "l": re.compile(r"[\d.]+")}
_EXAMPLES = {"w": "512", "h": "512", "s": "30", "d": "42", "l": "7.5"}
_TOML_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
              "sample_steps": "steps", "scale": "scale", "seed": "seed", "sample_sampler": "sampler"}
# sd-scripts reads these for its other models (FLUX, SD3, Lumina, ControlNet): known, and not drawn here
_OTHER_MODELS_TXT = {"g", "cn", "ctr", "rcfg", "fs"}
_OTHER_MODELS_KEYS = {"guidance_scale", "controlnet_image", "cfg_trunc_ratio", "renorm_cfg", "flow_shift", "enum"}


def not_read_warning(path: str | Path, number: int, prompt: SamplePrompt) -> str:
    """What a prompt asked for and is drawn without, said once when the run starts."""
    txt = str(path).lower().endswith(".txt") or not str(path).lower().endswith((".toml", ".json"))
    known = "--n --w --h --s --l --d --ss" if txt else ", ".join(_TOML_KEYS)
    return (f"{path} prompt {number}: {', '.join(prompt.not_read)} not read (this trainer reads {known}); the sample "
            "is drawn without them")


def _number(prompt: SamplePrompt, name: str, kind: type, where: str):
    value = getattr(prompt, name)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {name} {value!r} is not {'a whole number' if kind is int else 'a number'}") from None


def _fixed(prompt: SamplePrompt, where: str) -> SamplePrompt:
    prompt.width = max(64, _number(prompt, "width", int, where) // 8 * 8)
    prompt.height = max(64, _number(prompt, "height", int, where) // 8 * 8)
    prompt.steps = min(1000, max(1, _number(prompt, "steps", int, where)))
    prompt.scale = _number(prompt, "scale", float, where)
    seed = None if prompt.seed is None else _number(prompt, "seed", int, where)
    if seed is not None and seed >= 2**64:  # torch's generators take 64 bits: every sample would fail, hours in
        raise UserError(f"{where}: seed {seed} is larger than a seed can be (below 2^64); use a smaller number")
    prompt.seed = None if seed is None or seed < 0 else seed  # -1: a new seed each time, as in the WebUI
    if prompt.sampler:
        check_sampler(prompt.sampler, f"{where}: sampler")
    return prompt


def check_sampler(name: str, where: str) -> None:
    """An unknown sampler is refused when the prompts are read (sd-scripts draws it with DDIM without a word), not at
    the first sample, hours in."""
    try:
        sampler_name(name)
    except ValueError as error:
        raise UserError(f"{where}: {error}") from None


def parse_txt_line(line: str, default_size: int = 512, where: str = "sample prompt") -> SamplePrompt:
    """``a cat --n ugly --w 768 --d 5`` → SamplePrompt (options split on " --" and read in any case, as sd-scripts
    does)."""
    parts = line.split(" --")
    prompt = SamplePrompt(parts[0].strip(), width=default_size, height=default_size)
    not_read, read_partly = [], []
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        value = value.strip()
        if key.lower() in _TXT_OPTIONS:
            number = _LEADING_NUMBER.get(key.lower())
            match = number.match(value) if number else None
            if number and not match:
                what = ("is a negative number, which sd-scripts does not read" if value.startswith("-") else
                        "does not start with a number, so sd-scripts would not read it either")
                raise UserError(f"{where}: {f'--{key} {value}'.strip()} {what}; give one, such as "
                                f"--{key} {_EXAMPLES[key.lower()]}")
            if match and match.group() != value:
                read_partly.append(partly_read_warning(where, f"--{key} {value}", match.group(), value[match.end():],
                                                       decimal=key.lower() == "l"))
                value = match.group()
            setattr(prompt, _TXT_OPTIONS[key.lower()], value)
        else:
            not_read.append(f"--{key}" + (" (for sd-scripts' other models)" if key.lower() in _OTHER_MODELS_TXT else ""))
    prompt.not_read, prompt.read_partly = tuple(not_read), tuple(read_partly)
    return _fixed(prompt, where)


def partly_read_warning(where: str, option: str, number: str, ignored: str, decimal: bool = False) -> str:
    """``--l 7,5`` read as 7, as sd-scripts reads it: said, since a decimal comma would otherwise pass unseen (the
    decimal is named only where the option takes one: the scale)."""
    comma = re.match(r",(\d+)", ignored) if decimal else None
    hint = f"; for a decimal write {number}.{comma.group(1)}" if comma else ""
    return f"{where}: {option} is read as {number}, as sd-scripts reads it ({ignored!r} after the number is ignored{hint})"


def read_prompts(path: str | Path, default_size: int = 512) -> list[SamplePrompt]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: sample prompts file not found")
    text = read_utf8(path, "Sample prompts file")
    if path.suffix.lower() == ".toml":
        entries = _toml_entries(path, text)
    elif path.suffix.lower() == ".json":
        entries = _json_entries(path, text)
    else:
        return [parse_txt_line(line.strip(), default_size, f"{path} line {number}")
                for number, line in enumerate(text.splitlines(), 1) if line.strip() and not line.strip().startswith("#")]
    prompts = []
    for number, entry in enumerate(entries, 1):
        where = f"{path} prompt {number}"
        if isinstance(entry, str):  # a line as in a .txt file, options and all (sd-scripts reads it so)
            prompts.append(parse_txt_line(entry.strip(), default_size, where))
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise UserError(f"{where}: give each prompt as a table (an object in JSON) with prompt = \"…\", or as a "
                            "line of text with its --options")
        fields = {_TOML_KEYS[k]: v for k, v in entry.items() if k in _TOML_KEYS}
        not_read = tuple(k + (" (for sd-scripts' other models)" if k in _OTHER_MODELS_KEYS else "")
                         for k in entry if k not in _TOML_KEYS and k not in ("enum", "subset"))
        prompts.append(_fixed(SamplePrompt(**{"width": default_size, "height": default_size, **fields},
                                           not_read=not_read), where))
    return prompts


def _toml_entries(path: Path, text: str) -> list:
    """sd-scripts' layout: ``[prompt]`` with the defaults, then one ``[[prompt.subset]]`` per image."""
    data = toml_text.loads(text, str(path))
    prompt = data.get("prompt")
    if not isinstance(prompt, dict) or not isinstance(prompt.get("subset"), list):
        raise UserError(f"{path}: write the defaults under [prompt] and one [[prompt.subset]] table per sample, each "
                        "with prompt = \"…\" (sd-scripts' layout)")
    defaults = {k: v for k, v in prompt.items() if k != "subset"}
    return [{**defaults, **entry} if isinstance(entry, dict) else entry for entry in prompt["subset"]]


def _json_entries(path: Path, text: str) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: give a JSON list of prompts: objects with \"prompt\", or lines of text with their "
                        "--options")
    return data


def sample_path(folder: Path, name: str | None, index: int, seed: int | None, epoch: int | None, step: int) -> Path:
    """sd-scripts' sample names: ``<name>_e000001_00_<time>_<seed>.png`` or ``<name>_000050_00_<time>.png``."""
    when = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = time.strftime("%Y%m%d%H%M%S")
    seed_part = "" if seed is None else f"_{seed}"
    return folder / f"{(name + '_') if name else ''}{when}_{index:02d}_{stamp}{seed_part}.png"


@torch.no_grad()
def draw_samples(model, prompts: list[SamplePrompt], default_sampler: str, folder: Path, name: str | None,
                 epoch: int | None, step: int, clip_skip: int = 1,
                 failed: Callable[[int, Exception], None] | None = None,
                 drawn: Callable[[Path], None] | None = None) -> list[Path]:
    """Draw every prompt with the model as it is now (network hooks active); random state left untouched. A prompt
    that fails is given to ``failed`` (its number from 1), and the others are still drawn; without it, it raises.
    ``drawn`` hears of each file as it is written (a round can take minutes: the job runner and the UI follow it)."""
    folder.mkdir(parents=True, exist_ok=True)
    cpu_state = torch.get_rng_state()
    python_state = random.getstate()
    paths = []
    try:
        for index, prompt in enumerate(prompts):
            sampler = prompt.sampler or default_sampler
            settings = GenerationSettings(prompt.prompt, prompt.negative_prompt, prompt.steps, sampler_name(sampler),
                                          prompt.scale, -1 if prompt.seed is None else prompt.seed, prompt.width,
                                          prompt.height, clip_skip=clip_skip)
            if is_stand_in(sampler):
                settings.extra_infotext["Sampler note"] = f"{sampler} drawn with {sampler_name(sampler)}"
            try:
                image = txt2img(model, settings)[0]
                paths.append(write_png(image.image, sample_path(folder, name, index, prompt.seed, epoch, step),
                                       image.infotext))
            except Exception as error:
                if failed is None:
                    raise
                failed(index + 1, error)
                continue
            if drawn:
                drawn(paths[-1])
    finally:
        torch.set_rng_state(cpu_state)
        random.setstate(python_state)
    return paths

