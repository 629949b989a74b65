import numpy as np
import torch
import pytest

from tests.webui.conftest import txt2img, use_checkpoint


def pixels(processed):
    return np.asarray(processed.images[0], dtype=np.int16)


def differs(a, b):
    return np.abs(pixels(a) - pixels(b)).sum() > 0


def test_lora_changes_the_image_and_the_next_prompt_without_it_is_bit_exact(webui):
    _, base = txt2img(webui, "a red circle")
    p, with_lora = txt2img(webui, "a red circle <lora:cats:1>")
    assert differs(base, with_lora)
    assert 'Lora hashes: "cats: ' in with_lora.infotexts[0]
    assert p.extra_generation_params["Lora hashes"].startswith("cats: ")
    _, after = txt2img(webui, "a red circle")
    assert np.array_equal(pixels(after), pixels(base))
    unet = webui.shared.sd_model.model.diffusion_model
    assert all(not p.requires_grad for p in unet.parameters())


def test_multipliers_named_arguments_and_block_weights_each_change_the_image(webui):
    variants = ["<lora:cats:1>", "<lora:cats:1:unet=0>", "<lora:cats:0:1>", "<lora:cats:1:lbw=INS>"]
    images = [pixels(txt2img(webui, f"a red circle {tag}")[1]) for tag in variants]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j]), (variants[i], variants[j])


def test_alias_epoch_and_lyco_tags_resolve_to_files(webui):
    by_alias = pixels(txt2img(webui, "a red circle <lora:dogs:1>")[1])
    by_file = pixels(txt2img(webui, "a red circle <lora:renamed_file:1>")[1])
    assert np.array_equal(by_alias, by_file)
    epoch1 = pixels(txt2img(webui, "a red circle <lora:cats@e1:1>")[1])
    numbered = pixels(txt2img(webui, "a red circle <lyco:cats-000001:1>")[1])
    assert np.array_equal(epoch1, numbered) and not np.array_equal(epoch1, by_file)


def test_missing_incompatible_or_malformed_loras_are_said_under_each_generation_once_in_the_console_and_it_goes_on(webui, caplog):
    _, base = txt2img(webui, "a red circle")
    for _ in range(2):  # said under each generation's images, as the built-in's "Lora not found"
        p, result = txt2img(webui, "a red circle <lora:nothing_here:1> <lora:xl_style:1> <lora:dogs:lots>")
        assert np.array_equal(pixels(result), pixels(base))
        assert "LoRA Trainer: Lora not found: nothing_here" in p.comments and len(p.comments) == 3
    handler = webui.extra_networks.extra_network_registry["lora"]
    assert handler.warnings[0] == "<lora:dogs:lots>: te weight 'lots' is not a number; write e.g. <lora:name:0.8>"
    assert handler.warnings[1:] == ["Lora not found: nothing_here",
                                    "<lora:xl_style> skipped: it was trained for SDXL, the loaded model is SD1"]
    assert sum("nothing_here" in r.message for r in caplog.records) == 1


def test_an_sdxl_lora_without_version_metadata_applies_to_an_sdxl_checkpoint(webui, sdxl_checkpoint, tmp_path):
    """diffusers and converters write {"format": "pt"} into SDXL LoRAs too: no sign of SD1, whatever the WebUI's
    card filter guesses from it."""
    from safetensors.torch import load_file, save_file

    from lora_trainer.models import checkpoint
    from lora_trainer.networks.spec import NetworkSpec
    from tests.webui.conftest import random_network, save_lora

    folder = tmp_path / "loras"
    folder.mkdir()
    webui.shared.opts.data["lora_trainer_output_folder"] = str(folder)
    use_checkpoint(webui, sdxl_checkpoint)
    model = checkpoint.load_checkpoint(sdxl_checkpoint)
    kohya = save_lora(random_network(model, NetworkSpec(dim=4, alpha=4), seed=5), folder / "xl.safetensors", model.config)
    save_file(load_file(kohya), str(folder / "xl_converted.safetensors"), {"format": "pt"})
    _, with_metadata = txt2img(webui, "a red circle <lora:xl:1>", size=32)
    _, converted = txt2img(webui, "a red circle <lora:xl_converted:1>", size=32)
    _, plain = txt2img(webui, "a red circle", size=32)
    assert np.array_equal(pixels(converted), pixels(with_metadata))
    assert not np.array_equal(pixels(converted), pixels(plain))  # applied, not both left out


def test_the_builtin_lora_settings_are_obeyed_while_we_own_the_tags(webui):
    """"Add network to prompt" (sd_lora) and "Add Lora hashes to infotext", registered by the built-in extension."""
    _, cats = txt2img(webui, "a red circle <lora:cats:1>")
    webui.shared.opts.data.update(sd_lora="cats", extra_networks_default_multiplier=1.0)
    p, always = txt2img(webui, "a red circle")
    assert np.array_equal(pixels(always), pixels(cats)) and p.all_prompts[0].endswith("<lora:cats:1.0>")
    webui.shared.opts.data.update(sd_lora="None", lora_add_hashes_to_infotext=False)
    p, without_hashes = txt2img(webui, "a red circle <lora:cats:1>")
    assert np.array_equal(pixels(without_hashes), pixels(cats)) and "Lora hashes" not in p.extra_generation_params


def test_dyn_0_keeps_no_rank_as_the_built_in_slices_them_away(webui):
    _, plain = txt2img(webui, "a red circle")
    p, none_kept = txt2img(webui, "a red circle <lora:cats:1:1:0>")
    assert np.array_equal(pixels(none_kept), pixels(plain)) and "cats: " in p.extra_generation_params["Lora hashes"]


def test_a_lora_with_a_bundled_embedding_or_a_stray_key_applies_the_rest_and_says_what_it_left_out(webui, lora_folder):
    """The WebUI's Lora extension applies what it can read and leaves the rest (bundle_emb: its embeddings)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(lora_folder / "cats.safetensors")
    with safe_open(str(lora_folder / "cats.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    extras = {"cats_bundle": {"bundle_emb.zkstar.string_to_param.*": torch.randn(1, 32)},
              "cats_stray": {"lora_unet_foo.some_extra": torch.zeros(1)}}
    for name, extra in extras.items():
        save_file({**tensors, **extra}, str(lora_folder / f"{name}.safetensors"), metadata)
    try:
        _, cats = txt2img(webui, "a red circle <lora:cats:1>")
        for name in extras:
            p, image = txt2img(webui, f"a red circle <lora:{name}:1>")
            assert np.array_equal(pixels(image), pixels(cats)), name
        assert not any("bundled embedding" in comment for comment in
                       txt2img(webui, "a red circle <lora:cats_bundle:1>")[0].comments)  # loaded, see the next test
        assert any("1 key no network algorithm reads: lora_unet_foo.some_extra" in comment for comment in p.comments)
    finally:
        for name in extras:
            (lora_folder / f"{name}.safetensors").unlink()


def test_a_loras_bundled_embeddings_are_the_webuis_embeddings_while_it_is_in_the_prompt(webui, lora_folder, monkeypatch):
    """The built-in Lora extension registers a LoRA's bundle_emb.* as textual-inversion embeddings before the prompt
    is encoded (pivotal-tuning LoRAs need their token); ours left them out."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from modules import sd_hijack
    from modules.textual_inversion.textual_inversion import Embedding

    database = sd_hijack.model_hijack.embedding_db
    seen = {}
    real_activate = webui.extra_networks.activate

    def activate(p, data):  # what a prompt encoded right after the activation could name
        real_activate(p, data)
        seen[p.prompt] = dict(database.word_embeddings)

    monkeypatch.setattr(webui.extra_networks, "activate", activate)
    tensors = load_file(lora_folder / "cats.safetensors")
    with safe_open(str(lora_folder / "cats.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    vector = torch.randn(2, 32)
    save_file({**tensors, "bundle_emb.zkpet.string_to_param.*": vector, "bundle_emb.zkbowl.string_to_param.*": vector[:1].clone()},
              str(lora_folder / "pet.safetensors"), metadata)
    folder_embedding = Embedding(torch.zeros(1, 32), "zkbowl")
    database.register_embedding(folder_embedding, None)  # the user's own embeddings folder has a zkbowl
    try:
        p, _ = txt2img(webui, "zkpet on a rug <lora:pet:1>")
        registered = seen[p.prompt]
        assert torch.equal(registered["zkpet"].vec, vector) and registered["zkpet"].vectors == 2
        assert registered["zkbowl"] is folder_embedding  # the folder's stays, and that is said
        assert any("bundled embedding zkbowl is not used: an embedding of that name is loaded from the embeddings "
                   "folder" in comment for comment in p.comments)
        p, _ = txt2img(webui, "zkpet on a rug")
        assert "zkpet" not in seen[p.prompt] and seen[p.prompt]["zkbowl"] is folder_embedding  # taken back, ours only
        database.expected_shape = 1024  # an SD2 model: a 32-wide embedding is skipped, as the WebUI skips it
        p, _ = txt2img(webui, "zkpet on a rug <lora:pet:1>")
        assert "zkpet" not in seen[p.prompt] and "zkpet" in database.skipped_embeddings
    finally:
        database.expected_shape = -1
        database.register_embedding_by_name(None, None, "zkbowl")
        (lora_folder / "pet.safetensors").unlink()


def test_new_checkpoint_weights_are_not_overwritten_by_a_stale_restore(webui):
    _, base = txt2img(webui, "a red circle")
    txt2img(webui, "a red circle <lora:cats:1>")
    webui.sd_models.reload_model_weights(forced_reload=True)  # fresh weights, on_model_loaded
    _, after = txt2img(webui, "a red circle")
    assert np.array_equal(pixels(after), pixels(base))


def test_a_checkpoint_kept_in_memory_and_switched_back_to_has_no_lora_left_in_it(webui):
    """"Maximum number of checkpoints loaded at the same time" above 1: loading B makes a new model object and keeps
    A; switching back to A reuses it without any callback."""
    a = webui.shared.sd_model
    _, base = txt2img(webui, "a red circle")
    txt2img(webui, "a red circle <lora:cats:1>")
    webui.sd_models.load_model(next(iter(webui.sd_models.checkpoints_list.values())))  # B: a new object
    assert webui.shared.sd_model is not a
    txt2img(webui, "a red circle")
    webui.shared.sd_model = a  # sd_models.reuse_model_from_already_loaded
    _, after = txt2img(webui, "a red circle")
    assert np.array_equal(pixels(after), pixels(base))


def test_the_same_lora_twice_adds_up_as_with_the_builtin(webui):
    """The WebUI applies each tag: strengths add (here up to fp32 rounding: ΔW/2 + ΔW/2 against ΔW)."""
    _, twice = txt2img(webui, "a red circle <lora:cats:0.5> <lora:cats:0.5>")
    _, once = txt2img(webui, "a red circle <lora:cats:1>")
    _, half = txt2img(webui, "a red circle <lora:cats:0.5>")
    _, by_alias_and_file = txt2img(webui, "a red circle <lora:dogs:0.5> <lora:renamed_file:0.5>")  # one file
    _, dogs = txt2img(webui, "a red circle <lora:dogs:1>")
    assert np.abs(pixels(twice) - pixels(once)).max() <= 2 and np.abs(pixels(twice) - pixels(half)).max() > 10
    assert np.abs(pixels(by_alias_and_file) - pixels(dogs)).max() <= 2


@pytest.mark.parametrize("own", [True, False])
def test_each_tag_has_exactly_one_owner(load_extension, webui_modules, own):
    w = webui_modules
    builtin = w.extra_networks.ExtraNetwork("lora")  # the built-in registers first (its on_before_ui runs earlier)
    w.script_callbacks.on_before_ui(lambda: (w.extra_networks.register_extra_network(builtin),
                                             w.extra_networks.register_extra_network_alias(builtin, "lyco")))
    w.shared.opts.data["lora_trainer_owns_lora_tags"] = own
    load_extension()
    owner = w.extra_networks.extra_network_registry["lora"]
    assert w.extra_networks.extra_network_aliases["lyco"] is owner
    assert (owner is builtin) is (not own)
    assert type(owner).__name__ == ("ExtraNetworkLoraTrainer" if own else "ExtraNetwork")


@pytest.mark.parametrize("listed", [True, False])
def test_loras_in_hidden_folders_resolve_as_the_webui_setting_says(load_extension, webui_modules, listed, tmp_path):
    """Settings → "Load models/files in hidden directories" (on by default) decides whether the WebUI's Lora list
    holds Lora/.old/x: <lora:x> must load what that list shows, and follow the setting when it changes."""
    from safetensors.torch import save_file

    w = webui_modules
    w.shared.cmd_opts.lora_dir = str(tmp_path / "Lora")  # not the session's shared folder
    hidden = tmp_path / "Lora" / ".old" / "kept aside.safetensors"
    hidden.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": torch.zeros(1)}, str(hidden))
    w.shared.opts.data["list_hidden_files"] = listed
    load_extension()
    owner = w.extra_networks.extra_network_registry["lora"]
    assert owner.library.resolve("kept aside") == (hidden if listed else None)
    from lora_trainer.webui.host import WebUIHost

    assert WebUIHost().list_hidden_files is listed  # what the grid's library of the output folder follows
    w.shared.opts.data["list_hidden_files"] = not listed
    owner.refresh()
    assert owner.library.resolve("kept aside") == (None if listed else hidden)


def test_on_forge_lora_tags_are_left_to_forge(load_extension, webui_modules, monkeypatch):
    import lora_trainer.webui.detect as detect

    real_find_spec = detect.importlib.util.find_spec
    monkeypatch.setattr(detect.importlib.util, "find_spec", lambda name, *a: object() if name == "modules_forge" else real_find_spec(name, *a))
    w = load_extension()
    assert "lora" not in w.extra_networks.extra_network_registry
    assert any(o.label == "[LoRA] Strength" for o in w.xyz.axis_options)  # the rest of the extension still works


def _built_in_pick(files: list[tuple[str, str]], name: str) -> str | None:
    """The file the built-in Lora extension loads for ``<lora:name>``, from (stem, alias) in its walk order
    (extensions-builtin/Lora/networks.py, list_available_networks and load_networks): one table filled with each
    file's stem and then its alias, a later file overwriting; an alias that is a key already when its file comes is
    barred (case-insensitively, as "none" and "Addams" are), and a barred name is looked up by stem alone."""
    by_stem, by_either, barred = {}, {}, {"none", "addams"}
    for stem, alias in files:
        by_stem[stem] = stem
        if alias in by_either:
            barred.add(alias.lower())
        by_either[stem] = by_either[alias] = stem
    return by_stem.get(name) if name.lower() in barred else by_either.get(name)


@pytest.mark.parametrize("files", [
    [("a", "b"), ("b", "b")],  # a's alias is b's name, a first
    [("a", "a"), ("b", "a")],  # b's alias is a's name, b later
    [("a", "x"), ("b", "a"), ("c", "y")],  # a's name taken as an alias, a third alias its own
    [("Art", "Art"), ("b", "art")],  # an alias differing from a name by case only
])
def test_a_name_that_is_another_files_alias_loads_what_the_built_in_loads(tmp_path, files):
    """The same <lora:…> must load the same file whether ours or the built-in handler answers it: a file's name
    wins over another file's alias in both (the built-in bars an alias that comes after the name it equals)."""
    from lora_trainer.networks.activation import LoraLibrary
    from lora_trainer.safe_io import save_safetensors

    for stem, alias in files:  # listed in this order: sorted names in one folder
        save_safetensors({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, tmp_path / f"{stem}.safetensors",
                         {"ss_output_name": alias})
    library = LoraLibrary([tmp_path])
    for name in {name for pair in files for name in pair}:
        expected = _built_in_pick(files, name)
        if expected is not None:  # names the built-in finds no file for are ours alone (a run's epochs, name@eN)
            assert library.resolve(name) == tmp_path / f"{expected}.safetensors", name
