"""Grid plans for every axis kind, run through the standalone host on the tiny model, and promoting the winner."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.app.standalone_host import StandaloneHost
from lora_trainer.errors import UserError
from lora_trainer.grid.bench import make_epoch_files
from lora_trainer.grid.plan import AxisSpec, GridRequest, plan_grid, promote, run_grid
from lora_trainer.networks.activation import LoraLibrary
from lora_trainer.sampling.txt2img import GeneratedImage, GenerationSettings

SETTINGS = GenerationSettings("zkstar, shapes", steps=1, sampler="Euler", cfg_scale=5.0, seed=7, width=64, height=64)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    make_epoch_files(folder, "tinylora", epochs=2, seed=0)
    make_epoch_files(folder, "style", epochs=1, seed=1)
    return folder


@pytest.fixture(scope="module")
def library(loras):
    return LoraLibrary([loras])


def request(x: AxisSpec, y: AxisSpec, **changes) -> GridRequest:
    return GridRequest(x, y, **{"settings": SETTINGS, "lora": "tinylora", **changes})


def prompts(plan) -> list[list[str]]:
    return [[cell.settings.prompt for cell in row] for row in plan.cells]


def test_a_baseline_beside_seed_columns_names_its_own_seed(library):
    """The "no LoRA" column of a seed X axis is drawn at the form's seed, which none of the columns has."""
    plan = plan_grid(request(AxisSpec("seed", ["1", "2"]), AxisSpec("strength", ["1"])), library)
    assert plan.column_labels == ["no LoRA, seed 7", "seed 1", "seed 2"]
    assert [cell.settings.seed for cell in plan.cells[0]] == [7, 1, 2]


def test_the_title_of_a_grid_with_a_seed_axis_names_no_single_seed(library):
    """It said "seed 7", the form's seed, which only the baseline was drawn at."""
    by_column = plan_grid(request(AxisSpec("seed", ["1", "2"]), AxisSpec("strength", ["1"])), library)
    by_row = plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("seed", ["1", "2"])), library)
    assert " | seeds per column | " in by_column.title and " | seeds per row | " in by_row.title
    assert "seed 7" not in by_column.title + by_row.title
    assert " | seed 7 | " in plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("epoch", [])), library).title


def test_epoch_by_strength_finds_the_run_files_and_adds_a_baseline_column(library):
    plan = plan_grid(request(AxisSpec("strength", ["0.5-1.0 (+0.5)"]), AxisSpec("epoch", [])), library)
    assert prompts(plan) == [
        ["zkstar, shapes", "zkstar, shapes <lora:tinylora-000001:0.5>", "zkstar, shapes <lora:tinylora-000001:1>"],
        ["zkstar, shapes", "zkstar, shapes <lora:tinylora:0.5>", "zkstar, shapes <lora:tinylora:1>"],
    ]
    assert {cell.settings.seed for row in plan.cells for cell in row} == {7}
    assert plan.column_labels == ["no LoRA", "strength 0.5", "strength 1"]
    # labels from ss_epoch/ss_steps, with the validation loss the trainer recorded under each epoch; the picture
    # marks the recommended one (lowest validation loss) as the Grid tab's table stars it
    assert plan.row_labels == ["epoch 1 (10 steps)\n* recommended\nval loss 0.1500", "epoch 2 (20 steps)\nval loss 0.1700"]
    assert plan.best_epoch.name == "tinylora-000001.safetensors"
    by_column = plan_grid(request(AxisSpec("epoch", []), AxisSpec("strength", ["1"])), library)
    assert by_column.column_labels[1:] == plan.row_labels
    assert plan.legend.startswith("tinylora-000001: ") and ", tinylora: " in plan.legend


def test_the_runs_own_tags_leave_the_prompt_and_other_loras_stay_in_every_cell(library):
    """``zkstar, <lora:char:0.8>`` kept the tag in every cell: the "no LoRA" baseline had it, the cells stacked two."""
    asked = request(AxisSpec("strength", ["0.5"]), AxisSpec("epoch", ["2"]),
                    settings=dataclasses.replace(SETTINGS, prompt="zkstar, <lora:tinylora-000001:0.8>, <lora:style:1>"))
    plan = plan_grid(asked, library)
    assert prompts(plan) == [["zkstar, , <lora:style:1>", "zkstar, , <lora:style:1> <lora:tinylora:0.5>"]]
    assert plan.notes == ["The grid took <lora:tinylora-000001:0.8> out of the prompt: it sets that LoRA in each cell "
                          "itself, and the baseline has none.", "<lora:style:1> stays in every cell, the baseline too.",
                          "The recommended epoch 1 is not on the epoch axis: add it."]
    by_alias = plan_grid(dataclasses.replace(asked, settings=dataclasses.replace(SETTINGS, prompt="zkstar <lora:tinylora@e1>")),
                         library)
    assert prompts(by_alias) == [["zkstar", "zkstar <lora:tinylora:0.5>"]]

def test_chosen_epochs_only_and_a_random_seed_is_fixed_once_for_every_cell(library):
    plan = plan_grid(request(AxisSpec("epoch", ["2"]), AxisSpec("strength", ["1"]),
                             settings=dataclasses.replace(SETTINGS, seed=-1), baseline=False), library)
    assert prompts(plan) == [["zkstar, shapes <lora:tinylora:1>"]]
    assert plan.cells[0][0].settings.seed >= 0


def test_lora_a_by_lora_b_combines_both_and_the_baseline_keeps_the_row_lora(library):
    plan = plan_grid(request(AxisSpec("lora", ["style"]), AxisSpec("lora", ["tinylora-000001", "tinylora"]), lora="",
                             strength=0.8), library)
    assert prompts(plan)[0] == ["zkstar, shapes <lora:tinylora-000001:0.8>",
                                "zkstar, shapes <lora:style:0.8> <lora:tinylora-000001:0.8>"]
    assert plan.column_labels == ["without style", "style"]


def test_a_lora_given_as_a_prompts_tag_is_drawn_at_its_weight(library):
    """<lora:name:weight> copied from a prompt was "no LoRA named '<lora:…>'": the run, or a LoRA axis's value, is
    read as the WebUI reads the tag, and its weight is the strength it is drawn at."""
    run = plan_grid(request(AxisSpec("seed", ["1"]), AxisSpec("epoch", ["1"]), lora="<lora:tinylora:0.7>",
                            baseline=False), library)
    assert prompts(run) == [["zkstar, shapes <lora:tinylora-000001:0.7>"]]
    with pytest.raises(UserError) as both:  # a strength given as well, and another: which one was meant?
        plan_grid(request(AxisSpec("seed", ["1"]), AxisSpec("epoch", []), lora="<lora:tinylora:0.7>", strength=1.0),
                  library)
    assert (str(both.value), both.value.field) == ("strength: 1, and <lora:tinylora:0.7> says 0.7: give one of them and leave the other out",
                                                   "strength")
    styled = plan_grid(request(AxisSpec("lora", ["<lora:style:0.5>", "style"]), AxisSpec("lora", ["tinylora"]), lora="",
                               strength=0.8), library)
    assert prompts(styled) == [["zkstar, shapes <lora:tinylora:0.8>", "zkstar, shapes <lora:style:0.5> <lora:tinylora:0.8>",
                                "zkstar, shapes <lora:style:0.8> <lora:tinylora:0.8>"]]
    assert styled.column_labels == ["without LoRA", "style:0.5", "style"]
    with pytest.raises(UserError, match="x: style:0.5 gives its LoRA a weight, and the strength axis sets each cell's"):
        plan_grid(request(AxisSpec("lora", ["<lora:style:0.5>"]), AxisSpec("strength", ["0.5, 1"])), library)
    with pytest.raises(UserError, match=r"<lora:style:1:0.5> sets more than one strength, and a grid draws each LoRA "
                                        r"at one: give <lora:style:1>"):
        plan_grid(request(AxisSpec("lora", ["<lora:style:1:0.5>"]), AxisSpec("seed", ["1"])), library)


def test_a_runs_epoch_it_has_no_file_of_is_said_with_the_epochs_it_has(library):
    """"tinylora@e99" said "no LoRA named 'tinylora@e99'", as if the run were missing."""
    with pytest.raises(UserError) as missing:
        plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("seed", ["1"]), lora="tinylora@e99"), library)
    assert (str(missing.value), missing.value.field) == (
        "LoRA: 'tinylora@e99': the run 'tinylora' has no epoch 99 (it has epochs 1, 2)", "lora")
    with pytest.raises(UserError, match="LoRA axis: 'style@e3': the run 'style' has no epoch 3 \\(it has epochs 1\\)"):
        plan_grid(request(AxisSpec("lora", ["style@e3"]), AxisSpec("seed", ["1"])), library)


def test_prompt_axis_replaces_the_first_value_like_prompt_sr_and_seed_axis_sets_row_seeds(library):
    plan = plan_grid(request(AxisSpec("prompt", ["shapes", "circle"]), AxisSpec("seed", ["1", "2"]), baseline=False),
                     library)
    assert prompts(plan)[0] == ["zkstar, shapes <lora:tinylora:1>", "zkstar, circle <lora:tinylora:1>"]
    assert [[c.settings.seed for c in row] for row in plan.cells] == [[1, 1], [2, 2]]
    with pytest.raises(UserError, match="does not occur in the prompt"):
        plan_grid(request(AxisSpec("prompt", ["square", "circle"]), AxisSpec("seed", ["1"])), library)
    # weighted tags written without quotes are split at their commas, as X/Y/Z splits them: said, not drawn broken
    from lora_trainer.grid.axes import split_values

    typed = split_values("(shapes, blue:1.2), (circle, red:1.2)")
    with pytest.raises(UserError, match=r"prompt axis: '\(shapes' opens a bracket it does not close"):
        plan_grid(request(AxisSpec("prompt", typed), AxisSpec("seed", ["1"])), library)


def test_checkpoint_axis_sends_each_column_to_its_checkpoint(library):
    plan = plan_grid(request(AxisSpec("checkpoint", ["base.safetensors", "finetune.safetensors"]),
                             AxisSpec("strength", ["1"])), library)
    assert [c.checkpoint for c in plan.cells[0]] == [None, "base.safetensors", "finetune.safetensors"]
    assert plan.column_labels == ["no LoRA", "base", "finetune"]


def test_a_grid_without_a_checkpoint_runs_on_the_runs_own_base_model_when_the_host_lists_it(loras, tmp_path):
    """Left empty, "current" was whatever model the host had loaded, of other widths than the run's: every LoRA was
    skipped and the grid of identical columns said "Grid saved"."""
    from safetensors.torch import load_file, save_file

    from lora_trainer.grid.plan import plan_on_base_model
    from lora_trainer.safe_io import read_safetensors_metadata

    for source in loras.glob("tinylora*.safetensors"):
        metadata = {**read_safetensors_metadata(source), "ss_sd_model_name": "tiny-sd15.safetensors"}
        save_file(load_file(source), str(tmp_path / source.name), metadata)
    library = LoraLibrary([tmp_path])
    checkpoints = {"demo (embedded)": tmp_path / "tiny.safetensors", "sd/tiny-sd15.safetensors": tmp_path / "tiny-sd15.safetensors"}
    asked = request(AxisSpec("strength", ["1"]), AxisSpec("epoch", []))
    plan, base = plan_on_base_model(asked, library, checkpoints)
    assert base == "sd/tiny-sd15.safetensors" and {c.checkpoint for row in plan.cells for c in row} == {base}
    plan, base = plan_on_base_model(dataclasses.replace(asked, checkpoint="demo (embedded)"), library, checkpoints)
    assert base is None and {c.checkpoint for row in plan.cells for c in row} == {"demo (embedded)"}  # asked: kept
    plan, base = plan_on_base_model(asked, library, {"demo (embedded)": tmp_path / "tiny.safetensors"})
    assert base is None and {c.checkpoint for row in plan.cells for c in row} == {None}  # not listed: the current one


def test_an_sdxl_lora_on_an_sd1_checkpoint_is_refused_before_the_first_image(loras, tmp_path):
    """Every cell equalled the baseline, and the host's warning came after the grid, once a session."""
    from safetensors.torch import load_file, save_file

    from lora_trainer.grid.plan import plan_on_base_model
    from lora_trainer.safe_io import read_safetensors_metadata
    from lora_trainer.tiny_model.build import TINY_MODEL_PATH

    for source in loras.glob("tinylora*.safetensors"):
        metadata = {**read_safetensors_metadata(source), "ss_base_model_version": "sdxl_base_v1-0"}
        save_file(load_file(source), str(tmp_path / source.name.replace("tinylora", "xlchar")), metadata)
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": torch.ones(())}, str(tmp_path / "bare.safetensors"))
    library, checkpoints = LoraLibrary([tmp_path]), {"demo (embedded)": TINY_MODEL_PATH}
    asked = request(AxisSpec("strength", ["1"]), AxisSpec("epoch", []), lora="xlchar", checkpoint="demo (embedded)")
    with pytest.raises(UserError, match=r"xlchar-000001.safetensors is an SDXL LoRA and the checkpoint tiny-sd.safetensors "
                                        r"is SD1: it fits none of its layers and every cell would equal the baseline"):
        plan_on_base_model(asked, library, checkpoints)
    bare = request(AxisSpec("strength", ["1"]), AxisSpec("seed", ["1"]), lora="bare")  # the host's current checkpoint
    with pytest.raises(UserError, match="bare.safetensors is an SDXL LoRA and the checkpoint tiny-sd.safetensors is SD1"):
        plan_on_base_model(bare, library, checkpoints, current=TINY_MODEL_PATH)
    plan, _ = plan_on_base_model(request(AxisSpec("strength", ["1"]), AxisSpec("epoch", [])), LoraLibrary([loras]),
                                 checkpoints, current=TINY_MODEL_PATH)  # SD1 on SD1
    assert plan.size == (2, 2)


def test_the_current_checkpoint_of_a_standalone_host_is_the_one_it_draws_on_before_its_first_image(loras):
    """The Grid tab and the API pass it, so that a grid left on "current" is checked too."""
    from lora_trainer.grid.plan import current_checkpoint
    from lora_trainer.tiny_model.build import TINY_MODEL_PATH

    assert current_checkpoint(StandaloneHost([], [loras])) == TINY_MODEL_PATH
    assert current_checkpoint(object()) is None  # a host that does not say

def counted_tensor_hashes(monkeypatch) -> list:
    """The files whose tensor data is read through to hash it (the addnet hash of a grid's legend), in order."""
    from lora_trainer import hashing

    hashed, digest_of = [], hashing._tensor_data_sha256
    monkeypatch.setattr(hashing, "_tensor_data_sha256", lambda path: hashed.append(path.name) or digest_of(path))
    return hashed


def test_planning_a_grid_again_reads_no_epoch_file_again_unless_it_was_rewritten(loras, tmp_path, monkeypatch):
    """Every plan hashed every epoch file's tensors: 30 SDXL-size epochs took 15 s before POST /grids answered."""
    import os

    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "Lora"
    run.mkdir()
    for source in loras.glob("tinylora*.safetensors"):
        shutil.copy2(source, run / source.name)
    library, hashed = LoraLibrary([run]), counted_tensor_hashes(monkeypatch)
    asked = request(AxisSpec("strength", ["1"]), AxisSpec("epoch", []))
    legend = plan_grid(asked, library).legend
    assert plan_grid(asked, library).legend == legend
    assert sorted(hashed) == ["tinylora-000001.safetensors", "tinylora.safetensors"]  # once each
    stat = (run / "tinylora.safetensors").stat()
    os.utime(run / "tinylora.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # saved again
    assert plan_grid(asked, library).legend == legend
    assert sorted(hashed) == ["tinylora-000001.safetensors", "tinylora.safetensors", "tinylora.safetensors"]


def test_a_grid_on_the_runs_base_model_is_planned_once(loras, tmp_path, monkeypatch):
    """Finding the base model planned the grid a second time, every epoch file hashed again where no cache can be
    written (a read-only home)."""
    from safetensors.torch import load_file, save_file

    from lora_trainer.grid.plan import plan_on_base_model
    from lora_trainer.safe_io import read_safetensors_metadata

    (tmp_path / "read-only home").write_text("", encoding="utf-8")
    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "read-only home"))  # a file: the cache is never kept
    run = tmp_path / "Lora"
    run.mkdir()
    for source in loras.glob("tinylora*.safetensors"):
        metadata = {**read_safetensors_metadata(source), "ss_sd_model_name": "tiny-sd15.safetensors"}
        save_file(load_file(source), str(run / source.name), metadata)
    hashed = counted_tensor_hashes(monkeypatch)
    checkpoints = {"sd/tiny-sd15.safetensors": tmp_path / "tiny-sd15.safetensors"}
    plan, base = plan_on_base_model(request(AxisSpec("strength", ["1"]), AxisSpec("epoch", [])), LoraLibrary([run]),
                                    checkpoints)
    assert base == "sd/tiny-sd15.safetensors" and {cell.checkpoint for row in plan.cells for cell in row} == {base}
    assert sorted(hashed) == ["tinylora-000001.safetensors", "tinylora.safetensors"]


def test_the_epoch_axis_takes_epochs_and_step_files_only_by_their_step(tmp_path):
    """Epoch 1 gave two rows, "epoch 1 (20 steps)" and a snapshot inside epoch 2 that sd-scripts saved with ss_epoch 1;
    step 10 showed as "epoch 0"."""
    from reference import REFERENCE
    from safetensors.torch import load_file, save_file

    from lora_trainer.safe_io import read_safetensors_metadata

    source = REFERENCE / "kohya-fixtures" / "lora-toml-variant"
    for path in source.glob("tinylora_toml*.safetensors"):
        shutil.copy(path, tmp_path / path.name)
    step_ten = source / "tinylora_toml-step00000010.safetensors"  # and step 30, as sd-scripts saves it inside epoch 2
    save_file(load_file(step_ten), str(tmp_path / "tinylora_toml-step00000030.safetensors"),
              {**read_safetensors_metadata(step_ten), "ss_epoch": "1", "ss_steps": "30"})
    library = LoraLibrary([tmp_path])
    asked = request(AxisSpec("strength", ["1"]), AxisSpec("epoch", ["1"]), lora="tinylora_toml")
    plan = plan_grid(asked, library)
    assert plan.row_labels == ["epoch 1 (20 steps)"]
    assert plan.notes == ["The run's files saved at steps (step 10, step 30) are not on the epoch axis: add them to it "
                          "as step 10."]
    plan = plan_grid(dataclasses.replace(asked, y=AxisSpec("epoch", ["step 10", "1", "2"])), library)
    assert [label.split("\n")[0] for label in plan.row_labels] == ["step 10", "epoch 1 (20 steps)", "epoch 2 (40 steps)"]
    assert plan.notes == []
    with pytest.raises(UserError, match=r"epoch axis: step 20 is not among the run's step files \(steps 10, 30\)"):
        plan_grid(dataclasses.replace(asked, y=AxisSpec("epoch", ["step 20"])), library)


def test_an_epoch_file_shadowed_by_a_file_of_the_same_name_in_another_folder_is_refused(loras, tmp_path):
    """a/dup-000001 was the row, b/dup-000001 the image: the label, losses and hash were a's."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    for source in loras.glob("tinylora*.safetensors"):
        shutil.copy(source, tmp_path / "a" / source.name.replace("tinylora", "dup"))
    shutil.copy(loras / "style.safetensors", tmp_path / "b" / "dup-000001.safetensors")
    with pytest.raises(UserError, match=r"<lora:dup-000001> means .*b/dup-000001.safetensors to the generator, not "
                                        r".*a/dup-000001.safetensors of this grid: rename or move one of the two files, "
                                        r"then refresh$"):  # the tab's Lora list: the grid command says its own
        plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("epoch", []), lora="dup"), LoraLibrary([tmp_path]))


def test_a_resized_copy_trained_under_the_runs_name_is_not_the_runs_final_file(loras, tmp_path):
    """A run still training (no final file yet) beside a resized copy ``zkstar r2`` (ss_output_name zkstar, newer):
    the run given by its name showed the copy as its final file, its last row and the file its strength grid drew."""
    from safetensors.torch import load_file, save_file

    from lora_trainer.safe_io import read_safetensors_metadata

    # epochs 1 and 2 trained as zkstar, then the copy of epoch 2 (the newest file)
    for source, target in (("tinylora-000001", "zkstar-000001"), ("tinylora", "zkstar-000002"), ("tinylora", "zkstar r2")):
        metadata = {**read_safetensors_metadata(loras / f"{source}.safetensors"), "ss_output_name": "zkstar"}
        save_file(load_file(loras / f"{source}.safetensors"), str(tmp_path / f"{target}.safetensors"), metadata)
    library = LoraLibrary([tmp_path])
    by_epoch = plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("epoch", []), lora="zkstar"), library)
    assert prompts(by_epoch) == [["zkstar, shapes", "zkstar, shapes <lora:zkstar-000001:1>"],
                                 ["zkstar, shapes", "zkstar, shapes <lora:zkstar-000002:1>"]]
    by_strength = plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("seed", ["1"]), lora="zkstar"), library)
    assert prompts(by_strength)[0][1] == "zkstar, shapes <lora:zkstar-000002:1>"
    # the copy named as itself is a LoRA of its own, drawn as it is
    by_name = plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("seed", ["1"]), lora="zkstar r2"), library)
    assert prompts(by_name)[0][1] == "zkstar, shapes <lora:zkstar r2:1>"


def test_a_final_file_renamed_after_training_is_still_the_runs_last_row_when_the_run_is_named(loras, tmp_path):
    """char.safetensors renamed char_v2 (trained further than char-000001, the same network): the run given as "char"
    lost its last epoch, and a strength grid drew char-000001, once a copy under the run's name was told apart."""
    from safetensors.torch import load_file, save_file

    from lora_trainer.safe_io import read_safetensors_metadata

    for source, target, alpha in (("tinylora-000001", "char-000001", "4.0"), ("tinylora", "char_v2", "4")):
        metadata = {**read_safetensors_metadata(loras / f"{source}.safetensors"), "ss_output_name": "char",
                    "ss_session_id": "222", "ss_network_alpha": alpha}  # resumed across the version writing "4"
        save_file(load_file(loras / f"{source}.safetensors"), str(tmp_path / f"{target}.safetensors"), metadata)
    library = LoraLibrary([tmp_path])
    by_epoch = plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("epoch", []), lora="char"), library)
    assert [row[1] for row in prompts(by_epoch)] == ["zkstar, shapes <lora:char-000001:1>", "zkstar, shapes <lora:char_v2:1>"]
    by_strength = plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("seed", ["1"]), lora="char"), library)
    assert prompts(by_strength)[0][1] == "zkstar, shapes <lora:char_v2:1>"
    # last week's final kept as char_v2, beside today's run of that name (another session): not today's last row
    metadata = {**read_safetensors_metadata(tmp_path / "char_v2.safetensors"), "ss_session_id": "111"}
    save_file(load_file(tmp_path / "char_v2.safetensors"), str(tmp_path / "char_v2.safetensors"), metadata)
    today = plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("seed", ["1"]), lora="char"), library)
    assert prompts(today)[0][1] == "zkstar, shapes <lora:char-000001:1>"


def test_bad_grids_are_refused_and_big_ones_need_confirmation(library, loras):
    with pytest.raises(UserError, match="no values"):
        plan_grid(request(AxisSpec("strength", [" "]), AxisSpec("epoch", [])), library)
    with pytest.raises(UserError, match="no LoRA named 'nosuch'"):
        plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("epoch", []), lora="nosuch"), library)
    # the folders searched are named (it said "in the Lora folder": which one, the CLI's --lora-dir or the WebUI's?)
    with pytest.raises(UserError) as unknown:
        plan_grid(request(AxisSpec("lora", ["nosuch"]), AxisSpec("strength", ["1"])), library)
    assert (str(unknown.value), unknown.value.field) == (
        f"LoRA axis: no LoRA named 'nosuch' in the Lora folder ({loras}); check the name (a file added since the list "
        "was read shows after a refresh)", "x")
    with pytest.raises(UserError, match=r"epoch axis: epochs 3, 99 are not among the run's files \(epochs 1, 2\)"):
        plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("epoch", ["1", "3", "99"])), library)  # not 1 row
    # one kind on both axes drew identical rows (or stacked two epochs): refused for the tab, the CLI and the API
    with pytest.raises(UserError) as twice:
        plan_grid(request(AxisSpec("epoch", []), AxisSpec("epoch", [])), library)
    assert (str(twice.value), twice.value.field) == (
        "y: both axes are epoch axes, and every cell would stack two epoch files of the run; pick another kind "
        "for y, or put every epoch on the x axis", "y")
    for kind, values in (("strength", ["1"]), ("seed", ["1"]), ("checkpoint", ["a.safetensors"])):
        with pytest.raises(UserError, match=f"the x axis's {kind}, so every row would be the same"):
            plan_grid(request(AxisSpec(kind, values), AxisSpec(kind, values)), library)
    big = request(AxisSpec("strength", ["0-1 [20]"]), AxisSpec("seed", [str(i) for i in range(20)]))
    with pytest.raises(UserError, match="confirm"):
        plan_grid(big, library)
    assert plan_grid(dataclasses.replace(big, confirmed=True), library).size == (20, 21)


def test_run_grid_on_the_tiny_model_gives_the_images_users_later_get(library, loras, tmp_path):
    host = StandaloneHost([], [loras])
    plan = plan_grid(request(AxisSpec("strength", ["0, 1"]), AxisSpec("epoch", ["2"])), library)
    seen = []
    result = run_grid(host, plan, tmp_path / "grid", progress=lambda done, total: seen.append((done, total)))
    baseline, zero, full = (np.asarray(image) for image in result.cells[0])
    assert np.array_equal(zero, baseline)  # strength 0 is the base model, bit for bit
    assert not np.array_equal(full, baseline)
    assert seen[-1] == (3, 3) and not result.stopped
    # a cell is what the same prompt gives when generated alone, on a fresh host
    alone = StandaloneHost([], [loras]).generate(plan.cells[0][2].settings)
    assert np.array_equal(np.asarray(alone.image), full)
    assert result.path.is_file() and len(result.cell_paths) == 3
    saved = Image.open(result.cell_paths[2]).text["parameters"]
    assert "<lora:tinylora:1>" in saved and 'Lora hashes: "tinylora: ' in saved and "Seed: 7" in saved
    assert 'Lora hashes: "tinylora: ' in Image.open(result.path).text["parameters"]


def test_an_interrupted_grid_keeps_the_cells_done(library, loras):
    host = StandaloneHost([], [loras])
    plan = plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("epoch", ["2"])), library)
    calls = []
    result = run_grid(host, plan, None, should_stop=lambda: calls.append(1) or len(calls) > 1)
    assert result.stopped and result.path is None
    assert np.asarray(result.cells[0][1]).std() == 0  # not generated: grey


class BatchHost:
    """A host with its own progress across a grid (``batch``) whose Interrupt/Skip can cut an image short."""

    def __init__(self, cut_short=(), interrupt_at=None):
        self.log, self.cut_short, self.interrupt_at, self.stopped = [], cut_short, interrupt_at, False

    @contextlib.contextmanager
    def batch(self, count, label, steps):
        self.log.append(("begin", count))
        yield
        self.log.append(("end",))

    def generate(self, settings, checkpoint=None, progress=None):
        self.log.append(("cell", settings.prompt))
        cell = sum(entry[0] == "cell" for entry in self.log)
        if cell == self.interrupt_at:
            self.stopped = True
        if cell in self.cut_short or self.stopped:
            return None
        return GeneratedImage(Image.new("RGB", (settings.width, settings.height), (0, 0, 255)), settings.seed, "drawn")

    def interrupted(self):
        return self.stopped


def test_a_host_batch_spans_the_grid_and_a_cut_short_cell_stays_grey(library, tmp_path):
    host = BatchHost(cut_short=(2,))
    plan = plan_grid(request(AxisSpec("strength", ["0.5, 1"]), AxisSpec("epoch", ["2"])), library)
    result = run_grid(host, plan, tmp_path / "grid")
    assert host.log[0] == ("begin", 3) and host.log[-1] == ("end",) and len(host.log) == 5
    assert [image.getpixel((0, 0)) == (128, 128, 128) for image in result.cells[0]] == [False, True, False]  # grey
    assert (result.finished, result.total, result.stopped) == (2, 3, False) and result.path.is_file()
    assert [p.name[-11:] for p in result.cell_paths] == ["r00-c00.png", "r00-c02.png"]  # no file for the grey cell


def test_an_interrupted_grid_counts_the_images_it_drew_as_the_grid_counts_them(library, tmp_path):
    """After Ctrl-C the grid command said "2 of 7 cells" (distinct cells) beside "grid of 3 × 3 images"."""
    from lora_trainer.grid.plan import unfinished_images

    plan = plan_grid(request(AxisSpec("epoch", []), AxisSpec("strength", ["0.25, 0.5, 1"])), library)
    result = run_grid(BatchHost(interrupt_at=3), plan, tmp_path / "grid")
    assert plan.size == (3, 3) and (result.finished, result.total) == (2, 7)
    assert unfinished_images(result, plan) == ("interrupted after 2 of 7 distinct images (the baseline cells share "
                                               "one); the rest are grey")
    whole = plan_grid(request(AxisSpec("epoch", []), AxisSpec("strength", ["1"]), baseline=False), library)
    result = run_grid(BatchHost(cut_short=(2,)), whole, tmp_path / "grid")
    assert unfinished_images(result, whole) == "1 of 2 images were skipped; they are grey"
    assert unfinished_images(run_grid(BatchHost(), whole, None), whole) is None


def test_a_cell_whose_lora_file_was_deleted_or_rewritten_during_the_grid_is_grey_and_says_why(loras, tmp_path):
    """The host drew without the deleted file (or with the rewritten file's weights) under the planned label."""
    run = tmp_path / "Lora"
    make_epoch_files(run, "char", epochs=3, seed=0)
    plan = plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("epoch", []), lora="char", baseline=False),
                     LoraLibrary([run]))
    host = BatchHost()
    drawn = host.generate

    def generate(settings, checkpoint=None, progress=None):
        if len(host.log) == 1:  # during the first cell: epoch 2 deleted, the final file saved again
            (run / "char-000002.safetensors").unlink()
            shutil.copy(run / "char-000001.safetensors", run / "char.safetensors")
        return drawn(settings, checkpoint, progress)

    host.generate = generate
    result = run_grid(host, plan, tmp_path / "grid")
    assert [entry[1] for entry in host.log if entry[0] == "cell"] == ["zkstar, shapes <lora:char-000001:1>"]
    assert (result.finished, result.total) == (1, 3)
    grey = [np.asarray(row[0]) for row in result.cells[1:]]
    assert all((image == 128).mean() > 0.5 and image.max() > 200 for image in grey)  # grey, with the reason on it
    assert len(result.cell_paths) == 1

def test_labels_and_a_grey_cell_no_font_draws_give_one_warning_naming_every_character(tmp_path, monkeypatch):
    """The grey cell's reason (角色-000002.safetensors was deleted) and the labels (蓝色背景 too) lacked different
    characters: two near-identical warnings, one naming 角色, the other 角色蓝背景."""
    from lora_trainer.grid import render

    monkeypatch.setattr(render, "system_fallback_fonts", lambda: ())
    monkeypatch.setattr(render, "_said_no_font", [])
    run = tmp_path / "Lora"
    make_epoch_files(run, "角色", epochs=2, seed=0)
    plan = plan_grid(request(AxisSpec("prompt", ["shapes", "蓝色背景"]), AxisSpec("epoch", []), lora="角色",
                             baseline=False),
                     LoraLibrary([run]))
    host = BatchHost()
    drawn = host.generate

    def generate(settings, checkpoint=None, progress=None):
        (run / "角色-000001.safetensors").unlink(missing_ok=True)  # during the first cell: the second is grey
        return drawn(settings, checkpoint, progress)

    host.generate = generate
    result = run_grid(host, plan, None)
    assert result.finished == 3 and len(result.warnings) == 1, result.warnings
    assert set("角色蓝背景") <= set(result.warnings[0].split(" of the grid's labels")[0]), result.warnings


def test_an_interrupt_during_the_first_cell_saves_nothing(library, tmp_path):
    host = BatchHost(interrupt_at=1)
    plan = plan_grid(request(AxisSpec("strength", ["0.5, 1"]), AxisSpec("epoch", ["2"])), library)
    result = run_grid(host, plan, tmp_path / "grid")
    assert [entry[0] for entry in host.log] == ["begin", "cell", "end"]
    assert result.stopped and result.finished == 0 and result.path is None and not (tmp_path / "grid").exists()


def test_promote_copies_the_epoch_and_writes_the_preferred_weight(loras, tmp_path):
    lora_folder = tmp_path / "Lora"
    lora_folder.mkdir()
    (lora_folder / "mychar.json").write_text(json.dumps({"activation text": "zkstar", "preferred weight": 1}),
                                             encoding="utf-8")
    copied = promote(loras / "tinylora-000001.safetensors", lora_folder, "mychar", 0.7).path
    assert copied == lora_folder / "mychar.safetensors"
    assert copied.read_bytes() == (loras / "tinylora-000001.safetensors").read_bytes()
    card = json.loads((lora_folder / "mychar.json").read_text(encoding="utf-8"))
    assert card == {"activation text": "zkstar", "preferred weight": 0.7}
    fresh = promote(loras / "style.safetensors", lora_folder, "newstyle", 0.9).path
    assert json.loads(fresh.with_suffix(".json").read_text(encoding="utf-8"))["preferred weight"] == 0.9
    with pytest.raises(UserError, match="plain file name"):
        promote(loras / "style.safetensors", lora_folder, "../evil", 1.0)


def test_promoting_over_the_runs_final_file_keeps_that_last_epoch_under_its_epoch_name(loras, tmp_path):
    """The grid's default final name is the run's: its final file holds the last epoch, saved under no other name,
    so replacing it would lose that epoch for good."""
    from lora_trainer.safe_io import save_safetensors

    lora_folder = tmp_path / "Lora"
    save_safetensors({"w": torch.ones(2)}, lora_folder / "mychar.safetensors", {"ss_epoch": "8"})
    last_epoch = (lora_folder / "mychar.safetensors").read_bytes()
    promote(loras / "tinylora-000001.safetensors", lora_folder, "mychar", 0.7)
    assert (lora_folder / "mychar-000008.safetensors").read_bytes() == last_epoch
    assert (lora_folder / "mychar.safetensors").read_bytes() == (loras / "tinylora-000001.safetensors").read_bytes()
    promote(loras / "tinylora-000001.safetensors", lora_folder, "mychar", 0.8)  # the same file again: nothing to keep
    assert sorted(p.name for p in lora_folder.glob("*.safetensors")) == ["mychar-000008.safetensors", "mychar.safetensors"]
    save_safetensors({"w": torch.zeros(2)}, lora_folder / "other.safetensors", {})  # no epoch: it cannot be kept
    with pytest.raises(UserError, match="other.safetensors would be replaced, and it cannot be kept as an epoch file "
                                        r"\(its epoch is unknown\); give another final name"):
        promote(loras / "tinylora-000001.safetensors", lora_folder, "other", 1.0)
    assert (lora_folder / "other.safetensors").exists()
    shutil.rmtree(lora_folder)


def test_promoting_over_a_final_file_another_program_holds_is_a_sentence_and_loses_nothing(loras, tmp_path, monkeypatch):
    """Windows refuses to rename a file the WebUI has open (after a grid drew with it): a traceback before."""
    import os

    from lora_trainer import safe_io
    from lora_trainer.safe_io import save_safetensors

    lora_folder = tmp_path / "Lora"
    save_safetensors({"w": torch.ones(2)}, lora_folder / "mychar.safetensors", {"ss_epoch": "8"})
    held = (lora_folder / "mychar.safetensors").read_bytes()

    def refused(source, target):
        raise PermissionError(13, "The process cannot access the file because it is being used by another process")

    monkeypatch.setattr(safe_io, "REPLACE_RETRY_SECONDS", (0,))
    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(UserError, match=r"promote: .*mychar.safetensors could not be renamed to mychar-000008.safetensors "
                                        r"\(The process cannot access the file.*\): another program has it open"):
        promote(loras / "tinylora-000001.safetensors", lora_folder, "mychar", 0.7)
    assert [p.name for p in lora_folder.iterdir()] == ["mychar.safetensors"]
    assert (lora_folder / "mychar.safetensors").read_bytes() == held


def test_promoting_another_epoch_after_a_first_promotion_and_never_over_another_run(tmp_path):
    """Changing one's mind after promoting epoch 1 was refused (its epoch file 'exists'); promoting over an unrelated
    LoRA's name turned that LoRA into an epoch of this run, and its card became this file's."""
    lora_folder = tmp_path / "Lora"
    make_epoch_files(lora_folder, "run", epochs=2, seed=0)
    make_epoch_files(lora_folder, "inkstyle", epochs=1, seed=1)
    epoch_one, epoch_two = (lora_folder / "run-000001.safetensors").read_bytes(), (lora_folder / "run.safetensors").read_bytes()
    promote(lora_folder / "run-000001.safetensors", lora_folder, "run", 0.7)
    assert (lora_folder / "run-000002.safetensors").read_bytes() == epoch_two
    promote(lora_folder / "run-000002.safetensors", lora_folder, "run", 0.8)  # the mind changed
    assert (lora_folder / "run.safetensors").read_bytes() == epoch_two
    assert (lora_folder / "run-000001.safetensors").read_bytes() == epoch_one
    with pytest.raises(UserError, match=r"inkstyle.safetensors is another LoRA \(trained as 'inkstyle'\)"):
        promote(lora_folder / "run-000001.safetensors", lora_folder, "inkstyle", 1.0)
    with pytest.raises(UserError, match="give the preferred weight as a number"):
        promote(lora_folder / "run-000001.safetensors", lora_folder, "run", "")


def test_promoting_a_run_in_a_subfolder_writes_beside_it_keeps_the_users_card_and_refuses_a_name_taken_elsewhere(tmp_path):
    """Lora/char.safetensors was written while <lora:char> still meant sub dir/char.safetensors, and its new card had
    lost the user's activation text."""
    lora_folder = tmp_path / "Lora"
    run = lora_folder / "sub dir"
    make_epoch_files(run, "char", epochs=3, seed=0)
    (run / "char.json").write_text(json.dumps({"activation text": "zkstar", "description": "mine", "preferred weight": 1}),
                                   encoding="utf-8")
    promotion = promote(run / "char-000002.safetensors", lora_folder, "char final", 0.8)
    assert promotion.path == run / "char final.safetensors" and not (lora_folder / "char final.safetensors").exists()
    card = json.loads((run / "char final.json").read_text(encoding="utf-8"))
    assert card == {"activation text": "zkstar", "description": "mine", "preferred weight": 0.8}
    assert promotion.message == (f"Promoted char-000002.safetensors to {run / 'char final.safetensors'} with preferred "
                                 "weight 0.8. Its card (activation text, description …) is a copy of char.json.")
    make_epoch_files(lora_folder / "other", "best", epochs=1, seed=1)
    with pytest.raises(UserError, match=r"promote: .*sub dir/best.safetensors would have the name of .*other/best.safetensors, "
                                        r"and <lora:best> would mean only one of them to the generator; give another "
                                        r"final name, or rename or move best.safetensors"):
        promote(run / "char-000002.safetensors", lora_folder, "best", 1.0)
    assert not (run / "best.safetensors").exists()
    # a run promoted before 2026-12-05 left its final file at the Lora folder's top: the refusal says so
    shutil.copy(run / "char.safetensors", lora_folder / "char.safetensors")
    with pytest.raises(UserError, match=r"char.safetensors is an earlier promotion of this run: Promote wrote to the "
                                        r"Lora folder's top before 2026-12-05"):
        promote(run / "char-000002.safetensors", lora_folder, "char", 1.0)


def test_promoting_another_epoch_to_a_name_in_use_says_what_the_earlier_file_became(tmp_path):
    """Epochs 1 then 2 promoted to "char final": the first became "char final-000001" and nothing said so."""
    lora_folder = tmp_path / "Lora"
    make_epoch_files(lora_folder, "char", epochs=3, seed=0)
    assert promote(lora_folder / "char-000001.safetensors", lora_folder, "char final", 1.0).kept is None
    promotion = promote(lora_folder / "char-000002.safetensors", lora_folder, "char final", 0.9)
    assert promotion.kept == lora_folder / "char final-000001.safetensors" and promotion.kept.is_file()
    assert promotion.message.endswith(" with preferred weight 0.9. The earlier char final.safetensors is kept as "
                                      "char final-000001.safetensors.")

def test_the_grid_stars_the_trainers_recommendation_and_a_step_file_shows_its_own_loss(tmp_path):
    """The grid recomputed the knee over the kept files only (epochs 2, 4, 6: a knee at 4) while the trainer had
    said epoch 2 from every epoch's loss; and a step file showed the validation loss of another epoch's weights."""
    from safetensors.torch import save_file

    from lora_trainer.grid.axes import run_files
    from lora_trainer.grid.plan import best_epoch, epoch_losses, recorded_losses

    training = dict(zip("123456", (0.2, 0.12, 0.11, 0.105, 0.1, 0.098)))
    recorded = json.dumps({"epoch_training_loss": training, "step_validation_loss": {"25": 0.31}})
    for stem, epoch, steps in (("run-000002", 2, 20), ("run-step00000025", 2, 25), ("run-000004", 4, 40), ("run", 6, 60)):
        save_file({"x": torch.zeros(1)}, str(tmp_path / f"{stem}.safetensors"),
                  {"ss_epoch": str(epoch), "ss_steps": str(steps), "lora_trainer.losses": recorded})
    files = run_files(tmp_path / "run.safetensors")
    notes = []
    assert best_epoch(files, files, recorded_losses(files), notes).name == "run-000002.safetensors" and notes == []
    losses = epoch_losses(files)
    assert losses[tmp_path / "run-step00000025.safetensors"].validation == 0.31
    assert losses[tmp_path / "run-step00000025.safetensors"].training is None
    assert losses[tmp_path / "run-000004.safetensors"].training == 0.105
    # epoch 2 not kept: no file is starred (the nearest kept one is not the recommendation), and the grid says so
    kept = [f for f in files if f.path.name != "run-000002.safetensors"]
    assert best_epoch(kept, kept, recorded_losses(kept), notes) is None
    assert notes == ["The recommended epoch is 2, and no file of epoch 2 was kept: to have it, save every epoch with "
                     "--save_every_n_epochs 1, and --save_last_n_epochs left out or as large as the epochs."]


def test_the_star_is_the_runs_recommended_epoch_and_an_axis_without_it_says_to_add_it(tmp_path):
    """``grid zkstar --y epoch:1,4`` starred epoch 1, the nearer of those shown to epoch 2, which training and
    ``lora inspect`` recommend; ``--y epoch:1`` starred 1 from its own losses alone."""
    from lora_trainer.grid.plan import loss_rows
    from lora_trainer.networks.tools.inspect import inspect_network

    make_epoch_files(tmp_path, "four", epochs=4)  # the validation loss is lowest at epoch 2
    assert inspect_network(tmp_path / "four.safetensors").recommended_epoch == 2
    library = LoraLibrary([tmp_path])
    for shown in (["1", "4"], ["1"], ["3-4"]):
        plan = plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("epoch", shown), lora="four"), library)
        assert plan.best_epoch is None and not any("recommended" in label for label in plan.row_labels)
        assert all(row[3] == "" for row in loss_rows(plan))  # the tab's table and the CLI's star none
        assert plan.notes == ["The recommended epoch 2 is not on the epoch axis: add it."]
    plan = plan_grid(request(AxisSpec("epoch", ["1", "2", "4"]), AxisSpec("strength", ["1"]), lora="four"), library)
    assert plan.best_epoch == tmp_path / "four-000002.safetensors" and plan.notes == []
    assert [label.split("\n")[1] for label in plan.column_labels[1:]] == ["val loss 0.1700", "* recommended", "val loss 0.1900"]
    assert [row[3] for row in loss_rows(plan)] == ["", "★ recommended", ""]


def test_an_earlier_runs_leftover_files_of_the_same_name_do_not_change_the_recommendation(tmp_path):
    """Trained again under the same name from the command line (the app moves earlier files aside): the 10-epoch
    run's epochs 5-10 stayed, and their losses, merged into the new run's, made the grid recommend epoch 5."""
    import os

    from lora_trainer.networks.tools.inspect import inspect_network

    earlier = make_epoch_files(tmp_path, "run", epochs=10, seed=1)
    for path in earlier:  # written an hour before the new run
        os.utime(path, (path.stat().st_atime - 3600, path.stat().st_mtime - 3600))
    make_epoch_files(tmp_path, "run", epochs=4, seed=0)
    assert inspect_network(tmp_path / "run.safetensors").recommended_epoch == 2
    plan = plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("epoch", ["1-4"]), lora="run"), LoraLibrary([tmp_path]))
    assert plan.best_epoch == tmp_path / "run-000002.safetensors" and plan.notes == []
    assert plan.row_labels[0].endswith("val loss 0.1700")  # the new run's epoch 1, not the earlier run's
    for path in tmp_path.glob("run*.safetensors"):  # equal times (FAT's 2 s, a touch): the final file decides
        os.utime(path, (1_700_000_000, 1_700_000_000))
    plan = plan_grid(request(AxisSpec("strength", ["1"]), AxisSpec("epoch", ["1-4"]), lora="run"), LoraLibrary([tmp_path]))
    assert plan.best_epoch == tmp_path / "run-000002.safetensors" and plan.notes == []


def test_a_grey_cells_reason_is_written_in_a_font_sized_to_the_cell():
    """The default 10 px font could not be read on a 1024 px cell once the grid was scaled to a screen."""
    from PIL import Image

    from lora_trainer.grid.plan import _grey_cell

    cell = _grey_cell(Image.new("RGB", (512, 512), (128, 128, 128)), "the file changed after planning")
    white = Image.eval(cell.convert("L"), lambda v: 255 if v > 200 else 0).getbbox()
    assert white is not None and white[3] - white[1] >= 20  # 32 px letters: a tenth of 512 or more is readable


# What an artist sees where a mutation review found no test: labels, order, the star, strengths, seeds.

def test_epochs_by_lora_rows_name_the_baseline_by_the_run_it_leaves_out(loras):
    """Epoch columns × style rows: the baseline keeps the row's style, so "no LoRA" above it was untrue."""
    plan = plan_grid(GridRequest(AxisSpec("epoch", []), AxisSpec("lora", ["style"]), SETTINGS, lora="tinylora"),
                     LoraLibrary([loras]))
    assert prompts(plan)[0][0] == "zkstar, shapes <lora:style:1>"
    assert plan.column_labels[0] == "without tinylora"
    by_strength = plan_grid(GridRequest(AxisSpec("epoch", []), AxisSpec("strength", ["1"]), SETTINGS, lora="tinylora"),
                            LoraLibrary([loras]))
    assert prompts(by_strength)[0][0] == "zkstar, shapes" and by_strength.column_labels[0] == "no LoRA"


def test_after_a_promotion_the_final_file_comes_before_its_epoch_copy_and_carries_the_star(tmp_path):
    """Promoting epoch 1 makes the final file a copy of it (same epoch, same steps): the grid shows the final file
    first and stars it, not the copy below it."""
    from lora_trainer.grid.axes import run_files
    from lora_trainer.grid.plan import promote

    make_epoch_files(tmp_path, "tinylora", epochs=2, seed=0)
    promote(tmp_path / "tinylora-000001.safetensors", tmp_path, "tinylora", 1.0)
    assert [f.path.name for f in run_files(tmp_path / "tinylora.safetensors")] == [
        "tinylora.safetensors", "tinylora-000001.safetensors", "tinylora-000002.safetensors"]
    plan = plan_grid(GridRequest(AxisSpec("strength", ["1"]), AxisSpec("epoch", []), SETTINGS, lora="tinylora"),
                     LoraLibrary([tmp_path]))
    assert plan.best_epoch.name == "tinylora.safetensors"
    assert ["* recommended" in label for label in plan.row_labels] == [True, False, False]


def test_a_bare_lora_tag_takes_the_grids_strength(loras):
    """<lora:style> gives no weight: it is drawn at the cell's strength and labelled by its name alone."""
    library = LoraLibrary([loras])
    run = plan_grid(GridRequest(AxisSpec("seed", ["1"]), AxisSpec("epoch", ["1"]), SETTINGS, lora="<lora:tinylora>",
                                strength=0.5, baseline=False), library)
    assert prompts(run) == [["zkstar, shapes <lora:tinylora-000001:0.5>"]]
    styled = plan_grid(GridRequest(AxisSpec("lora", ["<lora:style>"]), AxisSpec("lora", ["tinylora"]), SETTINGS, lora="",
                                   strength=0.8), library)
    assert styled.column_labels == ["without style", "style"]
    assert prompts(styled)[0][1] == "zkstar, shapes <lora:style:0.8> <lora:tinylora:0.8>"


def test_a_grid_of_exactly_400_cells_needs_no_confirmation():
    from lora_trainer.errors import UserError
    from lora_trainer.grid.axes import check_size

    check_size(20, 20)
    with pytest.raises(UserError, match="20 × 21 = 420 images; confirm grids of more than 400 cells"):
        check_size(20, 21)


def test_labels_are_an_eighth_of_the_cell_wide_centred_in_their_row_and_below_the_title_with_a_margin():
    from PIL import Image, ImageDraw

    from lora_trainer.grid.render import LINE_SPACING, MARGIN, grid_layout

    layout = grid_layout((512, 512), ["epoch 1"], ["no LoRA", "strength 1"], "zkstar | seed 7")
    if hasattr(layout.font, "size"):  # Pillow < 10.1 (the WebUI's 9.5) has one bitmap font of one size
        assert layout.font.size == 64 and grid_layout((64, 64), ["a"], ["b"]).font.size == 10
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    (_, row_top), text = layout.row_labels[0]
    text_height = measure.multiline_textbbox((0, 0), text, font=layout.font, spacing=LINE_SPACING)[3]
    cells_top = layout.cells_at[1]
    assert abs((row_top - cells_top) - (512 - text_height) / 2) <= 1  # as far from the row's top as from its bottom
    (_, title_top), title = layout.title
    title_bottom = title_top + measure.multiline_textbbox((0, 0), title, font=layout.font, spacing=LINE_SPACING)[3]
    assert layout.column_labels[0][0][1] - title_bottom >= MARGIN


def test_a_seed_axis_takes_the_seeds_the_seed_field_takes(loras):
    """-5 was drawn at a new random seed each time under the label "seed -5" (the standalone host takes any seed
    below 0 as random), where the seed field refuses it."""
    from lora_trainer.errors import UserError

    library = LoraLibrary([loras])
    for value in ("-5", "4294967296"):
        with pytest.raises(UserError, match=rf"seed axis: {value} is not a seed; give whole numbers from -1 \(random\) "
                                            r"to 4294967295"):
            plan_grid(GridRequest(AxisSpec("seed", ["1", value]), AxisSpec("epoch", []), SETTINGS, lora="tinylora"), library)
    plan = plan_grid(GridRequest(AxisSpec("seed", ["0", "4294967295"]), AxisSpec("epoch", ["1"]), SETTINGS, lora="tinylora"),
                     library)
    assert plan.column_labels[1:] == ["seed 0", "seed 4294967295"]
