import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
import pytest

from lora_trainer.errors import UserError
from lora_trainer.app.extras import EXTRAS, install_extras, missing_distributions, pip_command, plan_command
from tests.webui.conftest import txt2img


def test_loading_the_script_registers_callbacks_settings_and_axes_once(load_extension):
    w = load_extension(before_ui=False)
    callbacks = w.script_callbacks.callback_map
    for category in ("ui_tabs", "app_started", "before_ui", "model_loaded", "script_unloaded"):
        assert len(callbacks[f"callbacks_{category}"]) == 1, category
    assert w.shared.opts.lora_trainer_owns_lora_tags is True
    assert w.shared.opts.data_labels["lora_trainer_dataset_roots"].section == ("lora_trainer", "LoRA Trainer")
    labels = [o.label for o in w.xyz.axis_options if o.label.startswith("[LoRA] ")]
    assert labels == ["[LoRA] Epoch", "[LoRA] Strength", "[LoRA] Name", "[LoRA] Block weights"]  # at import already
    w.script_callbacks.before_ui_callback()
    assert [o.label for o in w.xyz.axis_options if o.label.startswith("[LoRA] ")] == labels  # no doubles


def test_installed_extras_are_importable_in_the_webui_but_never_ahead_of_its_own_packages(load_extension, monkeypatch):
    import sys

    from lora_trainer.webui.extension import EXTENSION_ROOT

    monkeypatch.setattr(sys, "path", list(sys.path))  # the extension's change undone after the test
    load_extension(before_ui=False)
    extras = str(EXTENSION_ROOT / "extras")
    assert sys.path.count(extras) == 1 and sys.path[-1] == extras


def test_tabs_and_api_get_one_services_built_from_the_settings(load_extension, monkeypatch, tmp_path):
    w = load_extension()
    w.shared.cmd_opts.api_auth = "u:p,v:q"
    w.shared.cmd_opts.listen = True
    w.shared.cmd_opts.device_id = "1"
    w.shared.opts.data["lora_trainer_dataset_roots"] = f"{tmp_path / 'a'}, {tmp_path / 'b'}\n{tmp_path / 'c'}"
    w.shared.opts.data["lora_trainer_data_folder"] = str(tmp_path / "data")
    seen = {}
    monkeypatch.setitem(sys.modules, "lora_trainer.app.ui", types.SimpleNamespace(build_tabs=lambda s: seen.setdefault("ui", s) and [("blocks", "Train LoRA", "lora_trainer_train")]))
    monkeypatch.setitem(sys.modules, "lora_trainer.app.api", types.SimpleNamespace(register=lambda app, s, listening_remotely: seen.update(api=(app, s, listening_remotely))))
    assert w.script_callbacks.ui_tabs_callback() == [("blocks", "Train LoRA", "lora_trainer_train")]
    w.script_callbacks.app_started_callback(None, "the app")
    services = seen["ui"]
    assert seen["api"] == ("the app", services, True)
    settings = services.settings
    assert settings.dataset_roots == [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    assert settings.api_credentials == {"u": "p", "v": "q"}
    assert settings.lora_folder == Path(w.shared.cmd_opts.lora_dir) and settings.data_folder == tmp_path / "data"
    assert services.host.name == "webui"
    assert services.runner.cuda_device == "1"  # the trainer trains on the GPU the WebUI was started on


def test_dataset_folders_and_unloading_apply_without_a_restart(load_extension, monkeypatch, tmp_path):
    """A first user adds their dataset folder in Settings after the tab refused it: the next click must see it."""
    w = load_extension()
    w.shared.opts.data["lora_trainer_data_folder"] = str(tmp_path / "data")
    monkeypatch.setitem(sys.modules, "lora_trainer.app.ui", types.SimpleNamespace(build_tabs=lambda s: []))
    w.script_callbacks.ui_tabs_callback()
    from lora_trainer.webui import extension

    settings = extension.services().settings
    assert settings.dataset_roots == [] and settings.unload_checkpoint_while_training is True
    assert w.shared.opts.set("lora_trainer_dataset_roots", f"{tmp_path / '我的 数据集'}")  # as Settings → Apply does
    assert w.shared.opts.set("lora_trainer_unload_checkpoint", False)
    assert settings.dataset_roots == [tmp_path / "我的 数据集"] and settings.unload_checkpoint_while_training is False
    assert "requires restart" not in w.shared.opts.data_labels["lora_trainer_dataset_roots"].comment_after


def test_missing_tabs_module_gives_no_tabs_instead_of_breaking_the_webui(load_extension, monkeypatch, caplog):
    w = load_extension()
    monkeypatch.setitem(sys.modules, "lora_trainer.app.ui", types.SimpleNamespace())
    assert w.script_callbacks.ui_tabs_callback() == []
    assert "tabs unavailable" in caplog.text


def test_host_generates_through_the_webui_with_its_lora_handling(webui, monkeypatch):
    from lora_trainer.sampling.txt2img import GenerationSettings
    from lora_trainer.webui.host import WebUIHost

    refreshed = []
    host = WebUIHost(on_refresh=lambda: refreshed.append(True))
    assert list(host.checkpoints().values())[0].name == "tiny-sd.safetensors"
    image = host.generate(GenerationSettings("a red circle <lora:cats:1>", steps=1, width=64, height=64, seed=3, sampler="Euler"))
    assert image.seed == 3 and image.image.size == (64, 64) and "Lora hashes" in image.infotext
    assert not webui.shared.state.job  # state.end() ran
    monkeypatch.setitem(sys.modules, "networks", types.SimpleNamespace(list_available_networks=lambda: refreshed.append("builtin")))
    host.refresh_loras()
    assert refreshed == ["builtin", True]
    webui.shared.state.interrupt()
    assert host.interrupted()
    calls = []
    monkeypatch.setattr(webui.sd_models, "unload_model_weights", lambda: calls.append("unload"))
    monkeypatch.setattr(webui.sd_models, "reload_model_weights", lambda: calls.append("reload"))
    host.release_gpu()
    host.restore_gpu()
    assert calls == ["unload", "reload"]


def test_reload_ui_names_the_unsaved_tag_edits_and_the_next_services_bring_them_back(load_extension, tmp_path, caplog):
    """Reload UI builds new services, whose sessions start empty: the edits come back from their draft, and the
    console says so as the old ones go (Ctrl-C runs no callback: the drafts are written as the edits are made)."""
    from PIL import Image

    from lora_trainer.app import tag_sessions

    w = load_extension(before_ui=False)
    extension = w.script.extension  # the module the script registered
    folder = tmp_path / "datasets" / "数据 集"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "a.txt").write_text("zkchar, red", encoding="utf-8")
    w.shared.opts.data["lora_trainer_dataset_roots"] = str(tmp_path / "datasets")
    w.shared.opts.data["lora_trainer_data_folder"] = str(tmp_path / "data")
    session = extension.services().tag_sessions.open(folder)
    tag_sessions.apply_request(session, {"op": "add", "tags": ["solo"], "selection": "all"})
    w.script_callbacks.script_unloaded_callback()
    assert (f"LoRA Trainer: 1 unsaved caption edit(s) in {folder} are kept as a draft and come back when you open "
            "that folder again") in caplog.messages
    reopened = extension.services().tag_sessions.open(folder)
    assert reopened.editor.tags[folder / "a.png"] == ("zkchar", "red", "solo")


def test_unloading_the_script_restores_the_weights(webui):
    _, base = txt2img(webui, "a red circle")
    txt2img(webui, "a red circle <lora:cats:1>")
    weights = {k: v.clone() for k, v in webui.shared.sd_model.state_dict().items()}
    webui.script_callbacks.script_unloaded_callback()
    restored = webui.shared.sd_model.state_dict()
    assert any(not (weights[k] == restored[k]).all() for k in weights)
    _, after = txt2img(webui, "a red circle")
    assert np.array_equal(np.asarray(after.images[0]), np.asarray(base.images[0]))


def test_extras_install_into_the_private_folder_only(tmp_path):
    command = pip_command(["prodigyopt==1.1.2", "lion-pytorch==0.2.5"], tmp_path / "extras", python="py")
    assert command == ["py", "-m", "pip", "install", "--target", str(tmp_path / "extras"), "--no-deps", "--upgrade",
                       "--prefer-binary", "prodigyopt==1.1.2", "lion-pytorch==0.2.5"]
    assert set(EXTRAS) == {"onnxruntime", "bitsandbytes", "prodigyopt", "lion-pytorch", "dadaptation", "schedulefree"}
    with pytest.raises(UserError, match="unknown extra torch"):
        plan_command(["torch"])


def report(*distributions: tuple[str, str]) -> dict:
    """pip's --report for a dry run, as much of it as the install reads."""
    return {"version": "1", "install": [{"metadata": {"name": name, "version": version}} for name, version in distributions]}


def test_extras_put_only_what_the_webui_lacks_into_the_folder_never_torch_again(tmp_path, monkeypatch):
    """pip --target alone ignores the installed packages: for bitsandbytes it would download torch and CUDA again."""
    ran = []

    def pip(command, **arguments):
        ran.append(command)
        assert arguments["env"]["PYTHONIOENCODING"] == "utf-8"  # read as UTF-8: not the Windows console's code page
        planned = report(("bitsandbytes", "0.45.0")) if "--dry-run" in command else {}
        return subprocess.CompletedProcess(command, 0, json.dumps(planned), "")

    monkeypatch.setattr("lora_trainer.app.extras.subprocess.run", pip)
    assert install_extras(["bitsandbytes"], tmp_path / "extras") == ["bitsandbytes==0.45.0"]
    plan, install = ran
    assert "--dry-run" in plan and "--target" not in plan  # planned against the WebUI's environment, which has torch
    assert install[install.index("--target") + 1] == str(tmp_path / "extras") and "--no-deps" in install
    assert install[-1] == "bitsandbytes==0.45.0"


def test_an_extra_that_needs_another_torch_is_refused_naming_both_versions(tmp_path):
    with pytest.raises(UserError, match=r"need torch 9\.0\.0 \(the WebUI has \d.*\).*never replaced"):
        missing_distributions(report(("bitsandbytes", "9.9"), ("torch", "9.0.0")))
    assert missing_distributions(report(("onnxruntime", "1.20.1"), ("coloredlogs", "15.0.1"))) == [
        "onnxruntime==1.20.1", "coloredlogs==15.0.1"]
    assert missing_distributions(report()) == []  # the WebUI has them all: nothing to put in the folder


def test_dataset_folders_typed_the_windows_way_are_read():
    """A Windows user lists folders as PATH does (semicolons) and pastes them with Explorer's "Copy as path", which
    quotes them: each must become the folder itself, not a path with quotes in it."""
    from lora_trainer.webui.extension import folder_list

    typed = '"D:\\数据集\\char a";D:\\styles, E:\\pets\r\n\n"F:\\x"'
    assert folder_list(typed) == [Path("D:\\数据集\\char a"), Path("D:\\styles"), Path("E:\\pets"), Path("F:\\x")]
    assert folder_list("") == [] and folder_list(' ; "" ,') == []
    assert folder_list('"D:\\art, misc";"/data/sets;v2"\n/data/b') == [Path("D:\\art, misc"), Path("/data/sets;v2"),
                                                                        Path("/data/b")]
    assert folder_list('/data/my "best" set') == [Path('/data/my "best" set')]  # quotes inside a name are its own


def test_a_dataset_folder_whose_closing_quote_was_lost_is_the_folder_itself():
    """``"D:\\data\\a, D:\\b`` (a pasted path whose closing quote went while editing) allowed a folder named
    ``"D:\\data\\a``, which no path is below: Windows names hold no quote, so a lone one at an item's start or end is
    a lost half of Explorer's pair and the item ends at the next separator."""
    from lora_trainer.webui.extension import folder_list

    assert folder_list('"D:\\data\\a, D:\\b', windows=True) == [Path("D:\\data\\a"), Path("D:\\b")]
    assert folder_list('D:\\c";"E:\\d\n/data/e"', windows=True) == [Path("D:\\c"), Path("E:\\d"), Path("/data/e")]


def test_a_quote_at_the_end_of_a_folder_name_is_its_own_where_names_may_hold_one(tmp_path):
    """Linux and macOS names may end in a quote: the folder 'sets"' was read as 'sets', another folder (or none). Only
    where the folder exists without the quote and not with it is the quote a lost half of a pair."""
    from lora_trainer.webui.extension import folder_list

    (tmp_path / 'sets"').mkdir()
    (tmp_path / "data").mkdir()
    typed = f'{tmp_path}/sets", "{tmp_path}/data\n{tmp_path}/data", {tmp_path}/new"'
    assert folder_list(typed, windows=False) == [tmp_path / 'sets"', tmp_path / "data", tmp_path / "data",
                                                 tmp_path / 'new"']  # neither exists: as typed
    assert folder_list(typed, windows=True)[:2] == [tmp_path / "sets", tmp_path / "data"]
    # a quote before an absolute path is no part of its name, the folder there or not yet (a drive mounted later)
    assert folder_list(f'"{tmp_path}/later, {tmp_path}/data', windows=False) == [tmp_path / "later", tmp_path / "data"]


def test_a_lora_in_the_output_folder_wins_over_one_of_its_name_in_the_webuis_lora_folder(webui_modules, tmp_path):
    """The trainer saves into the output folder (Settings → LoRA Trainer): <lora:name> is the run just trained there,
    not an older file of that name in --lora-dir; the output folder set to --lora-dir itself lists each file once."""
    from safetensors.torch import save_file

    from lora_trainer.networks.activation import LoraLibrary
    from lora_trainer.webui.extension import lora_folders

    shared = webui_modules.shared
    webui_lora, lyco, output = (tmp_path / name for name in ("Lora", "LyCORIS", "trained"))
    for folder in (webui_lora, lyco, output):
        folder.mkdir()
        save_file({"x": torch.zeros(1)}, str(folder / "char.safetensors"))
    shared.cmd_opts.lora_dir, shared.cmd_opts.lyco_dir_backcompat = str(webui_lora), str(lyco)
    shared.opts.data["lora_trainer_output_folder"] = str(output)
    assert LoraLibrary(lora_folders()).resolve("char") == output / "char.safetensors"
    shared.opts.data["lora_trainer_output_folder"] = str(webui_lora)
    assert [entry.path for entry in LoraLibrary(lora_folders()).entries()] == [webui_lora / "char.safetensors",
                                                                              lyco / "char.safetensors"]
