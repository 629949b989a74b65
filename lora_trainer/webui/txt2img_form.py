"""The WebUI's txt2img settings as the grid's starting point: live, from its components, and saved, from its
ui-config.json.

Live: ``script_callbacks.on_after_component`` sees every gradio component the WebUI builds, with the keyword
arguments it was built with; the txt2img ones are kept by ``elem_id`` (WebUI 1.10: ``ui_toprow.py`` builds
``txt2img_prompt``/``txt2img_neg_prompt``; ``ui.py`` ``txt2img_width``/``txt2img_height``/``txt2img_cfg_scale``;
``processing_scripts/sampler.py`` ``txt2img_sampling``/``txt2img_steps``; ``processing_scripts/seed.py``
``txt2img_seed``). ``ui.create_ui`` builds the txt2img page before it asks extensions for their tabs, so when the
grid tab is built they are known and its "From txt2img" button takes them as inputs, as the WebUI's own Train tab
takes the txt2img preview parameters. Should a host build the tab first, the button is wired as soon as the
txt2img page is complete (every field seen, or the img2img page begun).

Saved: the WebUI writes the defaults of its pages to ``ui-config.json`` (``shared.cmd_opts.ui_config_file``) under
``<page>/<label>/value`` keys, prefixed ``customscript/<file>/`` for controls built by a script (the sampler and seed
since 1.6). Those are the values its txt2img page opens with, and so the honest defaults of a grid asked for over
the API.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

from ..sampling.txt2img import GenerationSettings

log = logging.getLogger("lora_trainer")

# GenerationSettings field → elem_id of the WebUI's txt2img component holding it
TXT2IMG_ELEM_IDS = {
    "prompt": "txt2img_prompt",
    "negative_prompt": "txt2img_neg_prompt",
    "seed": "txt2img_seed",
    "sampler": "txt2img_sampling",
    "scheduler": "txt2img_scheduler",
    "steps": "txt2img_steps",
    "width": "txt2img_width",
    "height": "txt2img_height",
    "cfg_scale": "txt2img_cfg_scale",
}
_FIELD_OF = {elem_id: field for field, elem_id in TXT2IMG_ELEM_IDS.items()}
_TXT2IMG_DONE = "img2img_prompt"  # ui.create_ui builds the img2img page right after the txt2img one

# GenerationSettings field → ui-config.json keys, newest WebUI first (before 1.6 the sampler and seed were not
# script controls, so their keys had no customscript/ prefix)
UI_CONFIG_KEYS = {
    "prompt": ("txt2img/Prompt/value",),
    "negative_prompt": ("txt2img/Negative prompt/value",),
    "seed": ("customscript/seed.py/txt2img/Seed/value", "txt2img/Seed/value"),
    "sampler": ("customscript/sampler.py/txt2img/Sampling method/value", "txt2img/Sampling method/value"),
    "scheduler": ("customscript/sampler.py/txt2img/Schedule type/value",),
    "steps": ("customscript/sampler.py/txt2img/Sampling steps/value", "txt2img/Sampling steps/value"),
    "width": ("txt2img/Width/value",),
    "height": ("txt2img/Height/value",),
    "cfg_scale": ("txt2img/CFG Scale/value",),
}


def form_value(field: str, value):
    """A txt2img value as the grid's field holds it, or None when it is unusable (empty seed box, wrong type)."""
    try:
        if field in ("prompt", "negative_prompt"):
            return "" if value is None else str(value)
        if field in ("sampler", "scheduler"):
            return value if isinstance(value, str) and value.strip() else None
        if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
            return None
        number = float(value)
        if field == "cfg_scale":
            return number if number > 0 else None
        whole = round(number)
        if field == "seed":
            return whole if whole >= -1 else None
        return whole if whole > 0 else None
    except (TypeError, ValueError):
        return None


def saved_txt2img_settings(ui_config_file: str | Path | None, fallback: GenerationSettings) -> GenerationSettings:
    """``fallback`` with every txt2img value the WebUI's ui-config.json holds; ``fallback`` itself when the file is
    missing or unreadable."""
    if not ui_config_file:
        return fallback
    path = Path(ui_config_file)
    try:
        saved = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        return fallback
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        log.warning("LoRA Trainer: %s is unreadable (%s); the grid starts from built-in settings", path, error)
        return fallback
    if not isinstance(saved, dict):
        return fallback
    changes = {}
    for field, keys in UI_CONFIG_KEYS.items():
        for key in keys:
            if key in saved:
                value = form_value(field, saved[key])
                if value is not None:
                    changes[field] = value
                break
    return dataclasses.replace(fallback, **changes)


class Txt2ImgComponents:
    """The txt2img components seen by ``on_after_component``, and buttons waiting for them."""

    def __init__(self):
        self.components: dict[str, object] = {}
        self._pending: list[tuple] = []

    def after_component(self, component, **kwargs) -> None:
        """The ``on_after_component`` callback: ``kwargs`` are the component's constructor arguments."""
        elem_id = kwargs.get("elem_id")
        field = _FIELD_OF.get(elem_id)
        if field is not None:
            self.components[field] = component
        if self._pending and (len(self.components) == len(TXT2IMG_ELEM_IDS) or elem_id == _TXT2IMG_DONE):
            pending, self._pending = self._pending, []
            for args in pending:
                self._wire(*args)

    def connect(self, button, targets: dict[str, object], fill: Callable[[list[str], list], list]) -> None:
        """On ``button`` click, ``fill(fields, values)`` gets the txt2img values of the fields found (in that order;
        None where the value is unusable) and returns the new values of ``targets[field]`` for those fields; fields
        not found are left alone."""
        if self.components:
            self._wire(button, targets, fill)
        else:  # the tab is built before the txt2img page: wire once that page exists
            self._pending.append((button, targets, fill))

    def _wire(self, button, targets: dict[str, object], fill) -> None:
        fields = [f for f in TXT2IMG_ELEM_IDS if f in self.components and f in targets]
        if not fields:
            return
        def on_click(*values):
            updates = fill(fields, [form_value(field, value) for field, value in zip(fields, values)])
            return updates[0] if len(updates) == 1 else updates  # gradio: one output takes the bare value

        button.click(on_click, inputs=[self.components[f] for f in fields], outputs=[targets[f] for f in fields],
                     queue=False)

    def forget(self) -> None:
        """The UI is rebuilt (Reload UI): its components will be new."""
        self.components.clear()
        self._pending.clear()
