"""Callback registration as in the WebUI: one list per category, run in registration order."""

import inspect
import os
from collections import namedtuple

from modules import errors

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])

callback_map = dict(
    callbacks_app_started=[],
    callbacks_model_loaded=[],
    callbacks_ui_tabs=[],
    callbacks_ui_train_tabs=[],
    callbacks_ui_settings=[],
    callbacks_before_ui=[],
    callbacks_script_unloaded=[],
    callbacks_before_reload=[],
    callbacks_infotext_pasted=[],
    callbacks_after_component=[],
)


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def add_callback(callbacks, fun, *, name=None, category="unknown", filename=None):
    if filename is None:
        filename = os.path.basename(inspect.stack()[2].filename)
    callbacks.append(ScriptCallback(filename, fun, name or f"{filename}/{category}"))


def _run(category, *args):
    results = []
    for c in callback_map[f"callbacks_{category}"]:
        try:
            results.append(c.callback(*args))
        except Exception as e:
            errors.display(e, f"{category} callback {c.name}")
    return results


def app_started_callback(demo, app):
    _run("app_started", demo, app)


def model_loaded_callback(sd_model):
    _run("model_loaded", sd_model)


def ui_tabs_callback():
    res = []
    for tabs in _run("ui_tabs"):
        res += tabs or []
    return res


def ui_settings_callback():
    _run("ui_settings")


def after_component_callback(component, **kwargs):
    """Called by the WebUI's patched gradio IOComponent.__init__ (modules/gradio_extensons.py) after each component,
    with the constructor's keyword arguments."""
    for c in callback_map["callbacks_after_component"]:
        try:
            c.callback(component, **kwargs)
        except Exception as e:
            errors.display(e, f"after_component callback {c.name}")


def before_ui_callback():
    _run("before_ui")


def script_unloaded_callback():
    _run("script_unloaded")


def on_app_started(callback, *, name=None):
    add_callback(callback_map["callbacks_app_started"], callback, name=name, category="app_started")


def on_model_loaded(callback, *, name=None):
    add_callback(callback_map["callbacks_model_loaded"], callback, name=name, category="model_loaded")


def on_ui_tabs(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_tabs"], callback, name=name, category="ui_tabs")


def on_ui_settings(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_settings"], callback, name=name, category="ui_settings")


def on_before_ui(callback, *, name=None):
    add_callback(callback_map["callbacks_before_ui"], callback, name=name, category="before_ui")


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name, category="script_unloaded")


def on_before_reload(callback, *, name=None):
    add_callback(callback_map["callbacks_before_reload"], callback, name=name, category="before_reload")


def on_infotext_pasted(callback, *, name=None):
    add_callback(callback_map["callbacks_infotext_pasted"], callback, name=name, category="infotext_pasted")


def on_after_component(callback, *, name=None):
    add_callback(callback_map["callbacks_after_component"], callback, name=name, category="after_component")
