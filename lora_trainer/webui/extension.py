"""The extension's registration with the WebUI: settings, tabs, API routes, ``<lora:…>`` tags, X/Y/Z axes.

``scripts/lora_trainer.py`` calls ``register()`` at import. Everything heavy (gradio tabs, FastAPI routes, the job
runner) is built inside the callbacks, once, from the settings on the WebUI's Settings page.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from ..app.settings import AppSettings, parse_api_auth
from .detect import is_forge

log = logging.getLogger("lora_trainer")
EXTENSION_ROOT = Path(__file__).resolve().parents[2]
SECTION = ("lora_trainer", "LoRA Trainer")

_services = None
_lora_tags = None  # our ExtraNetworkLoraTrainer, when we own <lora:…>
_txt2img_form = None  # the WebUI's txt2img components (webui.txt2img_form), seen through on_after_component


def option_infos() -> dict:
    from modules import shared

    info = shared.OptionInfo
    return {
        "lora_trainer_output_folder": info("", "Folder for finished LoRAs (empty: the WebUI's Lora folder)").needs_restart(),
        "lora_trainer_data_folder": info("", "Folder for jobs, states and grids (empty: <webui data>/lora_trainer)").needs_restart(),
        "lora_trainer_dataset_roots": info("", "Folders datasets may be read and edited in (separated by commas, semicolons or lines; in double quotes a name may hold them)",
                                           onchange=_apply_live_settings),
        "lora_trainer_unload_checkpoint": info(True, "Unload the checkpoint from the GPU while training",
                                               onchange=_apply_live_settings),
        "lora_trainer_allow_unauthenticated_remote": info(False, "Allow the trainer API without --api-auth when listening remotely").needs_restart(),
        "lora_trainer_owns_lora_tags": info(True, "LoRA Trainer applies <lora:…> tags (off: the built-in Lora extension does)").needs_restart(),
    }


_LIVE_SETTINGS = ("dataset_roots", "unload_checkpoint_while_training")


def _apply_live_settings() -> None:
    """The settings that take effect without a restart, read again into the running services when applied."""
    if _services is not None:
        fresh = app_settings()
        for name in _LIVE_SETTINGS:
            setattr(_services.settings, name, getattr(fresh, name))


def _option(key: str):
    from modules import shared

    return getattr(shared.opts, key)


def lora_folders() -> list[Path]:
    from modules import shared

    folders = [getattr(shared.cmd_opts, "lora_dir", None), getattr(shared.cmd_opts, "lyco_dir_backcompat", None),
               _option("lora_trainer_output_folder")]
    unique = []
    for folder in folders:
        if folder and Path(folder) not in unique:
            unique.append(Path(folder))
    return unique


def folder_list(text: str, windows: bool = os.name == "nt") -> list[Path]:
    """The dataset folders as typed in Settings: one a line or separated by commas, or by semicolons as Windows lists
    folders (PATH), each perhaps in the double quotes Explorer's "Copy as path" puts around it (which keep a comma or
    semicolon in a folder's name). A quote without its pair at an item's start or end is the half of such a pair that
    editing left, dropped (the item ending at the next separator) where it cannot be the name's own: on Windows, whose
    names hold no quote, and elsewhere where the folder exists without it and not with it."""
    items = re.findall(r'\s*"([^"\n]*)"\s*(?=[,;\n]|$)|([^,;\n]+)', text or "")  # quotes count around a whole item only
    parts = [(quoted or _without_lost_quote(bare.strip(), windows)).strip() for quoted, bare in items]
    return [Path(part) for part in parts if part]


def _without_lost_quote(item: str, windows: bool) -> str:
    unquoted = item.strip('"')
    if windows or unquoted == item:
        return unquoted
    if item.startswith('"') and Path(item[1:].strip()).is_absolute():  # the quote begins no absolute path's name
        item = item[1:]
    return unquoted if Path(unquoted.strip()).is_dir() and not Path(item).is_dir() else item


def app_settings() -> AppSettings:
    from modules import paths_internal, shared

    checkpoint_folders = [Path(paths_internal.models_path) / "Stable-diffusion"]
    if getattr(shared.cmd_opts, "ckpt_dir", None):
        checkpoint_folders.append(Path(shared.cmd_opts.ckpt_dir))
    return AppSettings(
        lora_folder=Path(_option("lora_trainer_output_folder") or shared.cmd_opts.lora_dir),
        data_folder=Path(_option("lora_trainer_data_folder") or os.path.join(paths_internal.data_path, "lora_trainer")),
        dataset_roots=folder_list(_option("lora_trainer_dataset_roots")),
        checkpoint_folders=checkpoint_folders,
        unload_checkpoint_while_training=bool(_option("lora_trainer_unload_checkpoint")),
        allow_unauthenticated_remote=bool(_option("lora_trainer_allow_unauthenticated_remote")),
        api_credentials=parse_api_auth(getattr(shared.cmd_opts, "api_auth", None)),
        extras_folder=EXTENSION_ROOT / "extras",  # private: only the trainer subprocess uses it
        cuda_device=getattr(shared.cmd_opts, "device_id", None),
    )


def services():
    """The one Services object of this WebUI process (job runner started on first use)."""
    global _services
    if _services is None:
        from ..app.services import Services
        from .host import WebUIHost

        _services = Services.create(app_settings(), WebUIHost(on_refresh=_refresh_library, txt2img_form=txt2img_form()))
    return _services


def txt2img_form():
    global _txt2img_form
    if _txt2img_form is None:
        from .txt2img_form import Txt2ImgComponents

        _txt2img_form = Txt2ImgComponents()
    return _txt2img_form


def _refresh_library() -> None:
    if _lora_tags is not None:
        _lora_tags.refresh()


def _library():
    from ..networks.activation import LoraLibrary
    from .extra_network import list_hidden_files

    return _lora_tags.library if _lora_tags is not None else LoraLibrary(lora_folders(), list_hidden_files())


def owns_lora_tags() -> bool:
    """Exactly one handler per tag: ours for both lora and lyco when the setting is on (and not on Forge, whose
    own Lora code is built into its model patcher), else the built-in for both."""
    return bool(_option("lora_trainer_owns_lora_tags")) and not is_forge()


# --- callbacks --------------------------------------------------------------------------------------------------


def _ui_tabs():
    try:
        from ..app.ui import build_tabs
    except ImportError as error:
        log.warning("LoRA Trainer: tabs unavailable (%s)", error)
        return []
    return build_tabs(services())


def _app_started(demo, app):
    from modules import shared

    try:
        from ..app.api import register as register_api
    except ImportError as error:
        log.warning("LoRA Trainer: API unavailable (%s)", error)
        return
    register_api(app, services(), listening_remotely=bool(getattr(shared.cmd_opts, "listen", False)))


def _before_ui():
    global _lora_tags
    from modules import extra_networks

    if owns_lora_tags():
        if _lora_tags is None:
            from .extra_network import ExtraNetworkLoraTrainer

            _lora_tags = ExtraNetworkLoraTrainer(lora_folders)
        extra_networks.register_extra_network(_lora_tags)  # replaces the built-in's "lora", registered before us
        extra_networks.register_extra_network_alias(_lora_tags, "lyco")
    _register_axes()


def _after_component(component, **kwargs):
    txt2img_form().after_component(component, **kwargs)


def _register_axes():
    from . import xyz_axes  # imports the network core (torch): only once the WebUI runs callbacks or loads us

    xyz_axes.register(_library)


def _model_loaded(sd_model):
    if _lora_tags is not None:
        _lora_tags.forget_model(sd_model)


def _script_unloaded():
    global _services, _lora_tags
    if _lora_tags is not None:
        _lora_tags.restore()
        _lora_tags = None
    if _services is not None:
        # the WebUI runs this on Reload UI (a new Services follows); killed or stopped with Ctrl-C it runs nothing
        # (its SIGINT handler exits at once): the drafts are written 0.3 s after each edit, so only the last 0.3 s
        # of editing can be lost then
        from ..app.tag_sessions import unsaved_edits_at_exit

        for line in unsaved_edits_at_exit(_services.tag_sessions.unsaved_at_exit()):
            log.warning("LoRA Trainer: %s", line)
        _services.close()
        _services = None
    if _txt2img_form is not None:
        _txt2img_form.forget()


def register() -> None:
    from modules import script_callbacks, shared

    shared.options_templates.update(shared.options_section(SECTION, option_infos()))
    script_callbacks.on_ui_tabs(_ui_tabs)
    script_callbacks.on_app_started(_app_started)
    script_callbacks.on_before_ui(_before_ui)
    script_callbacks.on_after_component(_after_component)  # before create_ui builds txt2img, then the tabs
    script_callbacks.on_model_loaded(_model_loaded)
    script_callbacks.on_script_unloaded(_script_unloaded)
    _register_axes()  # now too: the API's X/Y/Z instance exists before on_before_ui (--nowebui)
    # extras installed on request (onnxruntime for the tag editor's WD14) become importable here too, last on the
    # path: whatever the WebUI already has always wins over a copy in extras/
    extras = str(EXTENSION_ROOT / "extras")
    if extras not in sys.path:
        sys.path.append(extras)


