"""The Prompt-Lora-Grid tab inside the (stand-in) WebUI, prefilled from its txt2img page: live through "From
txt2img", saved through its ui-config.json."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json

import gradio as gr
import pytest

from lora_trainer.sampling.txt2img import GenerationSettings

# what the user has on the txt2img page (values as the browser sends them)
TXT2IMG = {
    "txt2img_prompt": (gr.Textbox, dict(label="Prompt"), "a red circle, night sky"),
    "txt2img_neg_prompt": (gr.Textbox, dict(label="Negative prompt"), "blurry"),
    "txt2img_steps": (gr.Slider, dict(minimum=1, maximum=150, step=1, label="Sampling steps"), 33),
    "txt2img_sampling": (gr.Dropdown, dict(label="Sampling method", choices=["DPM++ 2M", "Euler a", "Euler"]), "DPM++ 2M"),
    "txt2img_scheduler": (gr.Dropdown, dict(label="Schedule type", choices=["Automatic", "Karras", "Exponential"]), "Exponential"),
    "txt2img_width": (gr.Slider, dict(minimum=64, maximum=2048, step=8, label="Width"), 640),
    "txt2img_height": (gr.Slider, dict(minimum=64, maximum=2048, step=8, label="Height"), 768),
    "txt2img_cfg_scale": (gr.Slider, dict(minimum=1.0, maximum=30.0, step=0.5, label="CFG Scale"), 6.5),
    "txt2img_seed": (gr.Number, dict(label="Seed", precision=0), 1234),
}
GRID_LABELS = {"Prompt": "prompt", "Negative prompt": "negative", "Seed (-1: random, then the same in every cell)": "seed",
               "Sampler": "sampler", "Schedule type": "scheduler", "Steps": "steps", "Width": "width", "Height": "height", "CFG scale": "cfg"}


def build_page(w, txt2img_ids=tuple(TXT2IMG), tabs_first=False):
    """The page as ``modules/ui.py:create_ui`` builds it: the txt2img page (every component announced to
    ``on_after_component`` with its constructor arguments, as the WebUI's patched gradio does), the img2img page,
    then the extensions' tabs, all rendered into one demo. ``tabs_first`` builds our tabs before txt2img."""
    txt2img = {}

    def component(factory, **kwargs):
        made = factory(**kwargs)
        w.script_callbacks.after_component_callback(made, **kwargs)
        return made

    def webui_pages():
        with gr.Blocks() as txt2img_page:
            for elem_id in txt2img_ids:
                factory, kwargs, _ = TXT2IMG[elem_id]
                txt2img[elem_id] = component(factory, elem_id=elem_id, **kwargs)
            component(gr.Textbox, label="Batch count", elem_id="txt2img_batch_count")
        with gr.Blocks() as img2img_page:
            component(gr.Textbox, label="Prompt", elem_id="img2img_prompt")
        return [(txt2img_page, "txt2img", "txt2img"), (img2img_page, "img2img", "img2img")]

    if tabs_first:
        tabs = w.script_callbacks.ui_tabs_callback()
        interfaces = webui_pages() + tabs
    else:
        interfaces = webui_pages()
        interfaces += w.script_callbacks.ui_tabs_callback()
    with gr.Blocks() as demo, gr.Tabs():
        for interface, label, ifid in interfaces:
            with gr.TabItem(label, id=ifid):
                interface.render()
    return demo, txt2img


def click(demo, elem_id: str, browser_values: dict[int, object]) -> dict[str, object]:
    """Press the button with ``elem_id`` as the browser does: its inputs carry ``browser_values`` (by component id),
    the answer is returned by the grid field it goes to."""
    button = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)
    index, dependency = next((i, d) for i, d in enumerate(demo.dependencies)
                             if d["targets"] == [button._id] and d["trigger"] == "click")
    inputs = [browser_values.get(i, demo.blocks[i].value) for i in dependency["inputs"]]
    # in a thread of its own: an earlier test (Playwright's sync API) may have left this thread's event loop running
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(asyncio.run, demo.process_api(index, inputs, state={})).result()
    return {GRID_LABELS[demo.blocks[i].label]: value for i, value in zip(dependency["outputs"], answer["data"])}


def values_of(txt2img: dict) -> dict[int, object]:
    return {component._id: TXT2IMG[elem_id][2] for elem_id, component in txt2img.items()}


@pytest.mark.parametrize("tabs_first", [False, True], ids=["webui_order", "tab_built_first"])
def test_from_txt2img_fills_the_grid_form_with_what_txt2img_shows(load_extension, tabs_first):
    w = load_extension()
    demo, txt2img = build_page(w, tabs_first=tabs_first)
    filled = click(demo, "lora_trainer_grid_from_txt2img", values_of(txt2img))
    sampler = filled.pop("sampler")
    assert filled == {"prompt": "a red circle, night sky", "negative": "blurry", "seed": 1234, "steps": 33,
                      "width": 640, "height": 768, "cfg": 6.5, "scheduler": "Exponential"}
    assert sampler["value"] == "DPM++ 2M" and "DPM++ 2M" in sampler["choices"]  # a WebUI sampler the list lacked


def test_txt2img_fields_the_webui_lacks_keep_the_grid_values(load_extension):
    w = load_extension()
    demo, txt2img = build_page(w, txt2img_ids=("txt2img_prompt", "txt2img_steps"))
    filled = click(demo, "lora_trainer_grid_from_txt2img", values_of(txt2img))
    assert filled == {"prompt": "a red circle, night sky", "steps": 33}  # seed, size, CFG… are not written


def test_a_txt2img_page_with_only_a_prompt_fills_the_grid_prompt_with_its_text(load_extension):
    """One field found (a WebUI whose other txt2img fields have other names): gradio gives a button with one output
    the bare value, so the prompt must not get the list of one value."""
    w = load_extension()
    demo, txt2img = build_page(w, txt2img_ids=("txt2img_prompt",))
    assert click(demo, "lora_trainer_grid_from_txt2img", values_of(txt2img)) == {"prompt": "a red circle, night sky"}


def test_an_empty_seed_box_keeps_the_grid_seed(load_extension):
    w = load_extension()
    demo, txt2img = build_page(w)
    values = values_of(txt2img)
    values[txt2img["txt2img_seed"]._id] = None  # --use-textbox-seed with the box cleared
    filled = click(demo, "lora_trainer_grid_from_txt2img", values)
    assert "value" not in filled["seed"] and filled["steps"] == 33  # an update that changes nothing


UI_CONFIG_110 = {
    "txt2img/Prompt/value": "zkstar, 1girl",
    "txt2img/Negative prompt/value": "lowres",
    "customscript/sampler.py/txt2img/Sampling method/value": "DPM++ 2M",
    "customscript/sampler.py/txt2img/Sampling steps/value": 28,
    "customscript/sampler.py/txt2img/Schedule type/value": "Karras",
    "customscript/seed.py/txt2img/Seed/value": 77.0,
    "txt2img/Width/value": 768,
    "txt2img/Height/value": 1024,
    "txt2img/CFG Scale/value": 5.5,
    "img2img/Sampling steps/value": 99,
}


def write_ui_config(w, data):
    from pathlib import Path

    path = Path(w.shared.cmd_opts.ui_config_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_grid_defaults_are_the_webui_saved_txt2img_defaults(webui):
    from lora_trainer.app.api import grid_request
    from lora_trainer.webui.host import WebUIHost

    write_ui_config(webui, UI_CONFIG_110)
    defaults = WebUIHost().generation_defaults()
    assert (defaults.prompt, defaults.negative_prompt, defaults.sampler, defaults.scheduler, defaults.steps, defaults.seed,
            defaults.width, defaults.height, defaults.cfg_scale) == ("zkstar, 1girl", "lowres", "DPM++ 2M", "Karras", 28, 77,
                                                                     768, 1024, 5.5)
    # an API grid that gives no settings is drawn with them; what it gives wins
    request = grid_request({"x": {"kind": "strength", "values": ["1"]}, "y": {"kind": "seed", "values": ["1"]},
                            "settings": {"steps": 4}}, defaults, [])
    assert request.settings.prompt == "zkstar, 1girl" and request.settings.steps == 4 and request.settings.width == 768


def test_older_webui_keys_and_unusable_values(webui):
    from lora_trainer.webui.host import WebUIHost

    write_ui_config(webui, {"txt2img/Sampling steps/value": 40, "txt2img/Sampling method/value": "Euler",
                            "txt2img/Seed/value": "", "txt2img/Width/value": "wide"})
    defaults = WebUIHost().generation_defaults()
    assert (defaults.steps, defaults.sampler, defaults.seed, defaults.width) == (40, "Euler", -1, 512)


def test_saved_values_the_txt2img_page_cannot_show_keep_the_built_in_ones(webui):
    """A hand-edited ui-config.json: CFG 0 (the WebUI's CFG slider starts at 1, as the grid's does) and a checkbox's
    true where a number belongs (float(True) is 1: one sampling step) keep the built-in values."""
    from lora_trainer.webui.host import WebUIHost

    write_ui_config(webui, {"txt2img/CFG Scale/value": 0, "customscript/sampler.py/txt2img/Sampling steps/value": True,
                            "txt2img/Width/value": 512.0, "txt2img/Height/value": 767.6})
    defaults = WebUIHost().generation_defaults()
    assert (defaults.cfg_scale, defaults.steps, defaults.width, defaults.height) == (7.0, 20, 512, 768)


def test_without_a_ui_config_the_grid_starts_from_built_in_values(webui, caplog):
    from lora_trainer.webui.host import WebUIHost

    built_in = GenerationSettings(prompt="", steps=20, sampler="Euler a", cfg_scale=7.0, width=512, height=512)
    assert WebUIHost().generation_defaults() == built_in  # no file
    write_ui_config(webui, {}).write_text("{not json", encoding="utf-8")
    assert WebUIHost().generation_defaults() == built_in
    assert "unreadable" in caplog.text


def test_the_grid_draws_with_the_chosen_schedule_type(webui, monkeypatch):
    """WebUI 1.9+ names the schedule apart from the sampler: the grid passes it to txt2img as the page does."""
    from lora_trainer.webui.host import WebUIHost

    host = WebUIHost()
    assert host.scheduler_names()[:3] == ["Automatic", "Uniform", "Karras"]
    seen = []
    original = webui.processing.process_images
    monkeypatch.setattr(webui.processing, "process_images", lambda p: (seen.append((p.sampler_name, p.scheduler)), original(p))[1])
    for scheduler in ("Karras", ""):
        host.generate(GenerationSettings("a red circle", steps=2, sampler="Euler", width=64, height=64, seed=3,
                                         scheduler=scheduler))
    assert seen == [("Euler", "Karras"), ("Euler", None)]  # "" leaves the WebUI's Automatic
