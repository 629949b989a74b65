"""The three tabs, built from one ``Services``: the WebUI registers them as three top-level tabs, the standalone
app puts them in one page."""

from __future__ import annotations

import importlib

import gradio as gr

from ..services import Services

TABS = (("Train LoRA", "lora_trainer_train"), ("Dataset Tag Editor", "lora_trainer_tags"), ("Prompt-Lora-Grid", "lora_trainer_grid"))


def _placeholder(title: str) -> gr.Blocks:
    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.Markdown(f"The {title} tab is not installed in this version yet.")
    return blocks


def build_tabs(services: Services) -> list[tuple[gr.Blocks, str, str]]:
    """``(blocks, title, elem_id)`` for each tab, in the order the WebUI's ``on_ui_tabs`` expects."""
    from . import train_tab

    builders = [train_tab.build]
    for module in ("tag_editor_tab", "grid_tab"):
        try:
            builders.append(importlib.import_module(f"{__name__}.{module}").build)
        except ModuleNotFoundError as error:  # the other tabs land separately; until then the page says so
            if error.name != f"{__name__}.{module}":
                raise
            builders.append(None)
    return [(build(services) if build else _placeholder(title), title, elem_id)
            for build, (title, elem_id) in zip(builders, TABS)]
