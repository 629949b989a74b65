import os
from pathlib import Path

import pytest
import torch

from lora_trainer.errors import UserError
from lora_trainer.models.configs import SD1, SDXL
from lora_trainer.networks.activation import LoraCall, LoraLibrary, lora_calls_in, parse_lora_call, sd_version_of, strength_of
from lora_trainer.networks.block_weights import SD1_SCHEME, SDXL_SCHEME
from lora_trainer.networks.naming import Target
from lora_trainer.safe_io import save_safetensors


def test_positional_weights_as_the_webui_reads_them():
    assert parse_lora_call(["style"]) == LoraCall("style", 1.0, None)
    assert parse_lora_call(["style", "0.7"]) == LoraCall("style", 0.7, None)
    call = parse_lora_call(["style", "0.7", "0.2", "8"])
    assert (call.te, call.unet, call.dyn) == (0.7, 0.2, 8)
    assert parse_lora_call(["style", "0.7"]).unet_multiplier == 0.7  # unet defaults to te
    assert parse_lora_call(["style", "-1.5", "2.5"]).unet_multiplier == 2.5  # negative and >1 allowed


def test_named_arguments_override_positional_ones():
    call = parse_lora_call(["style", "0.7", "unet=0.3", "te=0.1", "dyn=4"])
    assert (call.te, call.unet, call.dyn) == (0.1, 0.3, 4)
    # items the WebUI adds itself are numbers, not strings
    assert parse_lora_call(["style", 0.5]) == LoraCall("style", 0.5)


def test_malformed_weight_names_the_tag():
    with pytest.raises(UserError, match=r"<lora:style:strong>.*te weight 'strong'"):
        parse_lora_call(["style", "strong"])
    with pytest.raises(UserError, match="names no LoRA"):
        parse_lora_call([""])


def test_lbw_presets_and_vectors():
    outd = strength_of(parse_lora_call(["s", "1", "lbw=OUTD"]), SD1.unet).blocks
    assert [outd[b] for b in SD1_SCHEME.blocks] == [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    half = strength_of(parse_lora_call(["s", "lbw=ALL0.5"]), SD1.unet).blocks
    assert [half[b] for b in SD1_SCHEME.blocks] == [0.5] * 17
    spaced = parse_lora_call(["s", "lbw=1 0 0 0 0 1 1 1 1 1 1 1"]).blocks
    assert spaced == (1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(UserError, match=r"<lora:s:lbw=1,0,1>.*3 values.*17 \(SD1/SD2\) or 12 \(SDXL\)"):
        parse_lora_call(["s", "lbw=1,0,1"])
    with pytest.raises(UserError, match="neither a preset"):
        parse_lora_call(["s", "lbw=OUTSIDE"])


def test_prompt_tags_are_removed_and_other_extra_networks_kept():
    prompt, calls = lora_calls_in("a cat <lora:style:0.5>, <lyco:detail:1:0.2> <hypernet:h:1> sitting")
    assert prompt == "a cat ,  <hypernet:h:1> sitting"  # tags become "", as in the WebUI
    assert calls == [LoraCall("style", 0.5), LoraCall("detail", 1.0, 0.2)]


def test_strength_maps_weights_and_blocks():
    unet_target = Target("lora_unet_x", "lora_unet", "output_blocks.3.1.proj_in", block="OUT03")
    text_target = Target("lora_te_x", "lora_te", "x")
    strength = strength_of(parse_lora_call(["s", "0.5", "2", "lbw=OUTD"]))
    assert strength.for_target(text_target) == 0.5  # BASE = 1
    assert strength.for_target(unet_target) == 2.0  # OUT03 = 1 in OUTD
    ind = strength_of(parse_lora_call(["s", "1", "lbw=IND"]))
    assert ind.for_target(unet_target) == 0.0
    assert strength_of(parse_lora_call(["s", "0.3"])).blocks is None
    # a 12-value vector is SDXL's layout: its 7th value is OUT00
    xl = strength_of(parse_lora_call(["s", "lbw=1,0,0,0,0,0,0.25,0,0,0,0,0"]))
    assert xl.blocks["OUT00"] == 0.25 and xl.blocks["IN04"] == 0.0
    with pytest.raises(UserError, match="17 values.*this model takes 12"):
        strength_of(parse_lora_call(["s", "lbw=" + ",".join("1" * 17)]), SDXL.unet)


def test_presets_take_the_loaded_models_blocks():
    """The same preset name means the same levels on SD1 and on SDXL, with each model's own block count."""
    sd1 = {name: strength_of(parse_lora_call(["s", f"lbw={name}"]), SD1.unet).blocks for name in ("ALL", "OUTD", "IND")}
    xl = {name: strength_of(parse_lora_call(["s", f"lbw={name}"]), SDXL.unet).blocks for name in ("ALL", "OUTD", "IND")}
    assert [xl["ALL"][b] for b in SDXL_SCHEME.blocks] == [1.0] * 12
    assert [b for b in SDXL_SCHEME.blocks if xl["OUTD"][b]] == ["BASE", "OUT00", "OUT01", "OUT02", "OUT03"]
    assert [b for b in SD1_SCHEME.blocks if sd1["OUTD"][b]] == ["BASE", "OUT03", "OUT04", "OUT05", "OUT06"]
    assert [b for b in SDXL_SCHEME.blocks if xl["IND"][b]] == ["BASE", "IN05", "IN07", "IN08"]
    assert [b for b in SD1_SCHEME.blocks if sd1["IND"][b]] == ["BASE", "IN05", "IN07", "IN08"]
    assert all(len(SDXL_SCHEME.presets[name].split(",")) == 12 for name in SDXL_SCHEME.presets)
    assert SDXL_SCHEME.presets.keys() == SD1_SCHEME.presets.keys()


def _lora(path, **metadata):
    save_safetensors({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, path, {k: str(v) for k, v in metadata.items()})
    return path


def test_library_resolves_stem_alias_and_epochs(tmp_path):
    (tmp_path / "sub").mkdir()
    final = _lora(tmp_path / "cats.safetensors", ss_output_name="cats", ss_epoch=3)
    one = _lora(tmp_path / "cats-000001.safetensors", ss_output_name="cats", ss_epoch=1)
    renamed = _lora(tmp_path / "sub" / "dogs_v2_final.safetensors", ss_output_name="dogs", ss_epoch=2,
                    ss_base_model_version="sdxl_base_v1-0")
    _lora(tmp_path / "sub" / "dogs_v2_e1.safetensors", ss_output_name="dogs", ss_epoch=1)
    (tmp_path / "old.pt").write_bytes(b"not a safetensors file")
    library = LoraLibrary([tmp_path])
    assert library.resolve("cats") == final
    assert library.resolve("old") == tmp_path / "old.pt"
    assert library.resolve("dogs") == renamed  # by ss_output_name: the run's latest epoch
    assert library.resolve("cats@e1") == one
    assert library.resolve("cats@e3") == final
    assert library.resolve("dogs@e1") == tmp_path / "sub" / "dogs_v2_e1.safetensors"
    assert library.resolve("cats@e7") is None and library.resolve("nothing") is None
    _lora(tmp_path / "cats-step00000030.safetensors", ss_output_name="cats", ss_epoch=2)  # saved inside epoch 2
    assert LoraLibrary([tmp_path]).resolve("cats@e2") is None  # a snapshot inside the epoch is not the epoch's file
    entry = library.entry("dogs")
    assert (entry.name, entry.alias, entry.sd_version, entry.epoch) == ("dogs_v2_final", "dogs", "SDXL", 2)
    assert {e.name for e in library.entries()} == {"cats", "cats-000001", "dogs_v2_final", "dogs_v2_e1", "old"}
    assert library.entry("old").metadata == {} and library.entry("old").sd_version == "unknown"


def test_library_sees_new_files_after_refresh_and_rereads_changed_metadata(tmp_path):
    library = LoraLibrary([tmp_path, tmp_path / "missing"])
    assert library.entries() == []
    path = _lora(tmp_path / "a.safetensors", ss_output_name="first")
    assert library.resolve("a") is None
    library.refresh()
    assert library.entry("a").alias == "first"
    _lora(path, ss_output_name="second")
    os.utime(path, ns=(1, path.stat().st_mtime_ns + 10**9))
    library.refresh()
    assert library.entry("a").alias == "second"


def test_library_leaves_out_training_states_and_files_renamed_away_while_it_looks(tmp_path, monkeypatch):
    """Training writes its states beside the LoRAs (models/Lora/<name>-state/model.safetensors, renamed into place
    from ….tmp): they are no LoRAs, and a file that vanishes between the walk and its stat is not an error (it once
    stopped the job queue's thread mid-run)."""
    import pathlib

    _lora(tmp_path / "star.safetensors", ss_output_name="star")
    for state in ("star-000002-state", "star-step00000010-state.tmp", "star-state.old", "custom"):
        (tmp_path / state).mkdir()
        _lora(tmp_path / state / "model.safetensors")
    (tmp_path / "custom" / "train_state.json").write_text('{"current_epoch": 1, "current_step": 4}', encoding="utf-8")
    vanishing = _lora(tmp_path / "star-000001.safetensors", ss_output_name="star")
    real_stat, looked = pathlib.Path.stat, []

    def stat(path, *args, **kwargs):  # the walk lists the file, then it is renamed away before its stat
        if path == vanishing:
            looked.append(path)
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_stat(path, *args, **kwargs)

    library = LoraLibrary([tmp_path])
    monkeypatch.setattr(pathlib.Path, "stat", stat)
    library.refresh()
    assert len(looked) == 1
    assert [e.name for e in library.entries()] == ["star"]


def test_short_hash_is_the_recorded_one_or_the_tensor_data_hash(tmp_path, monkeypatch):
    from lora_trainer.networks import activation

    library = LoraLibrary([tmp_path])
    recorded = _lora(tmp_path / "r.safetensors", sshs_model_hash="abcdef0123456789ff")
    read = []
    hashed = activation.tensor_data_sha256
    monkeypatch.setattr(activation, "tensor_data_sha256", lambda path: read.append(path) or hashed(path))
    assert library.short_hash(recorded) == "abcdef012345"
    assert read == []  # a recorded hash is taken as it is, without reading the file's tensors
    # the tensor-data hash ignores the header, so metadata edits keep it
    a = _lora(tmp_path / "a.safetensors", ss_output_name="x")
    b = _lora(tmp_path / "b.safetensors", ss_output_name="a much longer name")
    assert library.short_hash(a) == library.short_hash(b) and len(library.short_hash(a)) == 12


def test_a_name_found_twice_resolves_to_the_file_the_webui_picks(tmp_path):
    """The WebUI's Lora extension walks each folder as its walk_files does (sub-folders in natural order of their
    paths, a folder's own files first, hidden folders listed by its default) and the last file of a name wins: the
    same <lora:style> must load the same file in both."""
    from safetensors.torch import save_file

    for path in ("Lora/a_old/style", "Lora/b_new/style", "Lora/b_new/pose", "LyCORIS/pose", "Lora/.trash/style",
                 "Lora/style", "Lora/.hidden", "Lora/v9/look", "Lora/v10/look", "Lora/Z/look"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"x": torch.zeros(1)}, str(tmp_path / f"{path}.safetensors"))
    library = LoraLibrary([tmp_path / "Lora", tmp_path / "LyCORIS"])
    assert library.resolve("style") == tmp_path / "Lora/b_new/style.safetensors"  # over Lora/style, listed first
    assert library.resolve(".hidden") == tmp_path / "Lora/.hidden.safetensors"
    assert library.resolve("pose") == tmp_path / "LyCORIS/pose.safetensors"
    assert library.resolve("look") == tmp_path / "Lora/Z/look.safetensors"  # v9 < v10 < Z: by number, without case
    (tmp_path / "Lora/Z/look.safetensors").unlink()
    library.refresh()
    assert library.resolve("look") == tmp_path / "Lora/v10/look.safetensors"  # as text, v10 came before v9
    (tmp_path / "Lora/b_new/style.safetensors").unlink()
    (tmp_path / "Lora/a_old/style.safetensors").unlink()
    library.refresh()
    assert library.resolve("style") == tmp_path / "Lora/.trash/style.safetensors"  # a hidden folder is listed


def test_a_lora_in_a_linked_folder_is_found_as_the_webui_finds_it(tmp_path):
    """The WebUI walks its Lora folder following linked sub-folders (a LoRA collection on another drive, linked in);
    a link back up the tree is walked once; macOS's ._name companions beside copied files are no LoRAs; with the
    WebUI's "list_hidden_files" off, hidden folders are left out."""
    from safetensors.torch import save_file

    elsewhere = tmp_path / "other drive" / "styles"
    elsewhere.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(elsewhere / "ink.safetensors"))
    (elsewhere / "._ink.safetensors").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    lora = tmp_path / "Lora"
    (lora / ".old").mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(lora / ".old" / "aside.safetensors"))
    try:
        (lora / "linked").symlink_to(elsewhere, target_is_directory=True)
        (elsewhere / "back up").symlink_to(tmp_path / "other drive", target_is_directory=True)
    except OSError:
        pytest.skip("this system makes no folder links for this user")
    library = LoraLibrary([lora])
    assert library.resolve("ink") == lora / "linked" / "ink.safetensors"
    assert [e.path.name for e in library.entries()].count("ink.safetensors") == 1  # the loop is walked once
    assert library.resolve("._ink") is None and library.resolve("aside") == lora / ".old" / "aside.safetensors"
    assert LoraLibrary([lora], list_hidden=False).resolve("aside") is None
    (lora / "again").symlink_to(elsewhere, target_is_directory=True)  # linked twice: listed twice, as in the WebUI
    library.refresh()
    assert [e.path for e in library.entries() if e.path.name == "ink.safetensors"] == [
        lora / "again" / "ink.safetensors", lora / "linked" / "ink.safetensors"]


def test_a_lora_folder_at_a_drive_root_is_walked(monkeypatch):
    """--lora-dir L:\\ or a share's root: such a folder is its own parent by os.path.dirname, and the loop check
    took it for a link back to itself and listed nothing."""
    from lora_trainer.networks import activation

    def walk(top, followlinks):
        yield "/", ["styles"], ["a.safetensors"]
        yield os.path.join("/", "styles"), [], ["b.safetensors"]

    monkeypatch.setattr(activation.os, "walk", walk)
    monkeypatch.setattr(activation.os.path, "realpath", lambda path: path)
    assert activation.walked(Path("/")) == [Path("/a.safetensors"), Path("/styles/b.safetensors")]


def test_sd_version_from_metadata():
    assert sd_version_of({"ss_base_model_version": "sdxl_base_v1-0"}) == "SDXL"
    assert sd_version_of({"ss_v2": "True"}) == "SD2"
    assert sd_version_of({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}) == "SDXL"
    assert sd_version_of({"ss_v2": "False"}) == "SD1"
    assert sd_version_of({"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora"}) == "SD1"
    assert sd_version_of({}) == "unknown"
    assert sd_version_of({"format": "pt"}) == "unknown"  # diffusers' save_lora_weights, SDXL LoRAs included


def test_dyn_uses_the_first_ranks_at_the_full_ranks_scale_as_the_webui_does():
    import torch

    from lora_trainer.networks.activation import at_rank
    from lora_trainer.networks.files import NetworkFile
    from lora_trainer.networks.registry import module_delta

    torch.manual_seed(0)
    down, up = torch.randn(8, 16), torch.randn(32, 8)
    network = NetworkFile({"lora_unet_x": {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(4.0)}})
    cut = at_rank(network, 2)
    delta = module_delta(cut.modules["lora_unet_x"], torch.zeros(32, 16), 1.0).weight
    assert torch.allclose(delta, (4.0 / 8) * up[:, :2] @ down[:2], atol=1e-6)
    assert at_rank(network, 2) is cut  # the same object: a strength change stays an incremental update
    assert at_rank(network, 8) is not network and at_rank(network, None) is network
    assert torch.equal(at_rank(network, 8).modules["lora_unet_x"]["lora_down.weight"], down)
    assert parse_lora_call(["dylora", "1", "1", "2"]).dyn == 2
    # dyn=0 keeps no rank: the built-in's slice up[:, :0] applies nothing (here it applied the whole network)
    assert not parse_lora_call(["dylora", "1", "dyn=0"]).has_effect and parse_lora_call(["dylora", "1"]).has_effect
    with pytest.raises(UserError, match="dyn -1 is below 0"):
        parse_lora_call(["dylora", "1", "dyn=-1"])


def test_library_keeps_a_read_network_until_its_file_changes_and_only_the_most_recent_files(tmp_path):
    """A strength change between generations reuses the same network object (a cheap update of the merge)."""
    def lora(path, scale):
        save_safetensors({"lora_unet_x.lora_down.weight": torch.ones(1, 2), "lora_unet_x.lora_up.weight": torch.ones(2, 1) * scale,
                          "lora_unet_x.alpha": torch.tensor(1.0)}, path, {})
        return path

    library = LoraLibrary([tmp_path])
    path = lora(tmp_path / "a.safetensors", 1.0)
    first = library.network(path)
    assert library.network(path) is first
    lora(path, 2.0)
    os.utime(path, ns=(1, path.stat().st_mtime_ns + 10**9))
    changed = library.network(path)
    assert changed is not first and torch.equal(changed.modules["lora_unet_x"]["lora_up.weight"], torch.full((2, 1), 2.0))
    others = [lora(tmp_path / f"b{i}.safetensors", 1.0) for i in range(LoraLibrary.NETWORKS_KEPT)]
    for other in others:
        library.network(other)
    assert library.network(others[-1]) is library.network(others[-1])
    assert library.network(path) is not changed  # pushed out by 16 newer files: read again


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc (Linux)")
def test_a_network_the_webui_keeps_does_not_hold_its_file(tmp_path):
    """Windows cannot replace a file that is memory-mapped: the 16 networks the library keeps after a generation or a
    grid made training that name again, or promoting an epoch, fail ("could not be replaced"), losing the last epoch."""
    path = save_safetensors({"lora_unet_x.lora_down.weight": torch.ones(1, 2), "lora_unet_x.lora_up.weight": torch.ones(2, 1),
                             "lora_unet_x.alpha": torch.tensor(1.0)}, tmp_path / "held lora.safetensors", {})
    kept = LoraLibrary([tmp_path]).network(path)
    assert str(path) not in Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    assert torch.equal(kept.modules["lora_unet_x"]["lora_up.weight"], torch.ones(2, 1))

