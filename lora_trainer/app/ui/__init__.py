"""The three tabs, built from one ``Services``: the WebUI registers them as three top-level tabs, the standalone
app puts them in one page."""

from __future__ import annotations

import gradio as gr

from ..services import Services


def build_tabs(services: Services) -> list[tuple[gr.Blocks, str, str]]:
    """``(blocks, title, elem_id)`` for each tab, in the order the WebUI's ``on_ui_tabs`` expects."""
    from . import grid_tab, tag_editor_tab, train_tab

    return [(train_tab.build(services), train_tab.TITLE, "lora_trainer_train"),
            (tag_editor_tab.build(services), "Dataset Tag Editor", "lora_trainer_tags"),
            (grid_tab.build(services), "Prompt-Lora-Grid", "lora_trainer_grid")]
