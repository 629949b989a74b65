"""The X/Y/Z plot's "[LoRA] …" axes: each rewrites the ``<lora:…>`` tag of the prompt, so the grid's cells run
through the WebUI's own generation and our ``<lora:…>`` handler (or the built-in one).

Registered when our script is imported (the API's X/Y/Z instance is built before ``on_before_ui`` under
``--nowebui``) and again in ``on_before_ui``; the label prefix guards against doubles after a script reload.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import UserError
from ..networks.activation import LoraLibrary, edit_lora_tags, parse_block_vector, run_name, with_block_weights, with_name, with_weight

PREFIX = "[LoRA] "


def find_xyz_module():
    """The WebUI's loaded ``scripts/xyz_grid.py`` module (loaded by path, so found by its module name)."""
    from modules import scripts

    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid"):
            return data.module
    return None


def epoch_file(library: LoraLibrary, name: str, epoch: int) -> str:
    """The file stem of epoch ``epoch`` of the run ``name`` belongs to: what both our handler and the built-in one
    look up (the built-in knows file stems and aliases, not our ``run@eN``)."""
    run = run_name(name)
    path = library.resolve(f"{run}@e{epoch}")
    if path is None:
        library.refresh()  # an epoch file written since the last scan
        path = library.resolve(f"{run}@e{epoch}")
    if path is None:
        raise UserError(f"{PREFIX}Epoch {epoch}: the Lora folders hold no file of epoch {epoch} of {run!r} "
                        f"({run}-{epoch:06d}.safetensors, or a file of that run whose ss_epoch is {epoch})")
    return path.stem


def epoch_axis(library: Callable[[], LoraLibrary]) -> tuple[Callable, Callable]:
    def apply(p, x, xs):
        name = _first_name(p.prompt)
        p.prompt = edit_lora_tags(p.prompt, with_name(epoch_file(library(), name, int(x))), name)

    def confirm(p, xs):  # every epoch found before the first image is made
        name = _first_name(p.prompt)
        for x in xs:
            epoch_file(library(), name, int(x))

    return apply, confirm


def apply_strength(p, x, xs):
    p.prompt = edit_lora_tags(p.prompt, with_weight(float(x)))


def apply_name(p, x, xs):
    p.prompt = edit_lora_tags(p.prompt, with_name(str(x).strip()))


def apply_block_weights(p, x, xs):
    p.prompt = edit_lora_tags(p.prompt, with_block_weights(str(x)))


def confirm_block_weights(p, xs):
    for value in xs:
        parse_block_vector(str(value), f"{PREFIX}Block weights")  # a UserError before any image is made


def _first_name(prompt: str) -> str:
    names = []
    edit_lora_tags(prompt, lambda items: names.append(items[0].strip()) or items)
    return names[0]


def axis_options(xyz, library: Callable[[], LoraLibrary]) -> list:
    def names():
        current = library()
        current.refresh()
        return sorted({entry.name for entry in current.entries()}, key=str.lower)

    apply_epoch, confirm_epochs = epoch_axis(library)
    return [
        xyz.AxisOption(f"{PREFIX}Epoch", int, apply_epoch, format_value=xyz.format_value_add_label, cost=0.3,
                       confirm=confirm_epochs),
        xyz.AxisOption(f"{PREFIX}Strength", float, apply_strength, format_value=xyz.format_value_add_label),
        xyz.AxisOption(f"{PREFIX}Name", str, apply_name, format_value=xyz.format_value, choices=names, cost=0.3),
        xyz.AxisOption(f"{PREFIX}Block weights", str, apply_block_weights, format_value=xyz.format_value_add_label,
                       confirm=confirm_block_weights),
    ]


def register(library: Callable[[], LoraLibrary]) -> bool:
    """Add the axes to the X/Y/Z plot once; False when the plot is not loaded (or the axes are already there)."""
    xyz = find_xyz_module()
    if xyz is None or any(option.label.startswith(PREFIX) for option in xyz.axis_options):
        return False
    xyz.axis_options.extend(axis_options(xyz, library))
    return True
