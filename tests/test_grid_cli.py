"""`python -m lora_trainer grid`: a run's epochs × strengths from the command line, planned as the Grid tab plans them,
its path the last line on stdout, and one sentence (exit 2) for each mistake."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.cli import main
from lora_trainer.grid.bench import make_epoch_files


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("Lora 模型")
    make_epoch_files(folder, "tinylora", epochs=2, seed=0)
    return folder


def grid(capsys, *argv):
    code = main(["grid", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def cell_prompts(grid_path) -> list[str]:
    """The prompts of the cells saved beside a grid, row by row."""
    cells = sorted(grid_path.parent.glob(f"{grid_path.stem}-r*-c*.png"))
    return [Image.open(cell).text["parameters"].split("\n")[0] for cell in cells]


def test_a_runs_epochs_by_strengths_are_drawn_and_the_grids_path_is_the_last_line_of_stdout(runs, tmp_path, capsys):
    code, out, err = grid(capsys, "tinylora", "--lora-dir", runs, "--x", "strength:0.5, 1", "--y", "epoch:1, 2",
                          "--no-baseline", "--steps", 1, "--out", tmp_path / "grids")
    assert code == 0, err
    path = Path(out.splitlines()[-1])
    assert path.parent == tmp_path / "grids" and path.suffix == ".png" and path.is_file()
    assert cell_prompts(path) == ["zkstar <lora:tinylora-000001:0.5>", "zkstar <lora:tinylora-000001:1>",
                                  "zkstar <lora:tinylora:0.5>", "zkstar <lora:tinylora:1>"]
    parameters = Image.open(path).text["parameters"]
    assert 'Grid X Type: strength, Grid X Values: "0.5, 1", Grid Y Type: epoch, Grid Y Values: "1, 2"' in parameters
    assert Image.open(path).size[1] > 2 * 64  # the labels' rows above the 2 × 2 cells of 64 px
    # the losses the trainer recorded, as the tab's table shows them, the recommended epoch starred
    lines = err.splitlines()
    assert lines[0].split() == ["epoch", "file", "training", "loss", "validation", "loss", "best", "epoch"]
    assert lines[1].split() == ["tinylora-000001", "0.1500", "0.1500", "★", "recommended"]
    assert lines[2].split() == ["tinylora", "0.1000", "0.1700"]


def test_labels_no_installed_font_draws_are_a_warning_on_stderr(runs, tmp_path, capsys, monkeypatch):
    """The grid command drew 蓝色背景 as boxes and said why only in a log line (once a process, if a handler showed
    it), not as the "warning: …" its other warnings are."""
    from lora_trainer.grid import render

    monkeypatch.setattr(render, "system_fallback_fonts", lambda: ())
    monkeypatch.setattr(render, "_said_no_font", ["an earlier drawing's labels"])
    code, out, err = grid(capsys, "tinylora", "--lora-dir", runs, "--x", "prompt:zkstar, 蓝色背景", "--y", "epoch:2",
                          "--no-baseline", "--steps", 1, "--out", tmp_path)
    assert code == 0, err
    said = [line for line in err.splitlines() if "蓝色背景" in line]
    assert len(said) == 1 and said[0].startswith("warning: no font installed here draws 蓝色背景 of the grid's labels"), err


def test_a_run_given_by_the_path_of_a_file_outside_the_lora_folders_finds_its_epochs_beside_it(runs, tmp_path, capsys):
    code, out, err = grid(capsys, runs / "tinylora.safetensors", "--lora-dir", tmp_path / "empty", "--x", "epoch",
                          "--y", "strength:0.8", "--steps", 1, "--out", tmp_path)
    assert code == 0, err
    assert cell_prompts(Path(out.splitlines()[-1])) == [
        "zkstar", "zkstar <lora:tinylora-000001:0.8>", "zkstar <lora:tinylora:0.8>"]  # the baseline column first


def test_axis_values_in_double_quotes_keep_their_commas(runs, tmp_path, capsys):
    code, out, err = grid(capsys, "tinylora", "--lora-dir", runs, "--prompt", "zkstar, shapes", "--x",
                          'prompt:"zkstar, shapes", "zkstar, circle"', "--y", "strength:1", "--no-baseline",
                          "--steps", 1, "--out", tmp_path)
    assert code == 0, err
    path = Path(out.splitlines()[-1])
    assert cell_prompts(path) == ["zkstar, shapes <lora:tinylora:1>", "zkstar, circle <lora:tinylora:1>"]
    assert 'Grid X Values: "\\"zkstar, shapes\\", \\"zkstar, circle\\""' in Image.open(path).text["parameters"]


@pytest.mark.parametrize("arguments, sentence", [
    (["--x", "strength:0,8"], "'0,8' reads as the two strengths 0 and 8: for 0.8 write a point (0.8), for two "
                              "strengths a space after the comma (0, 8)"),
    (["--y", "size:1, 2"], "axis kind 'size' is unknown; use one of epoch, strength, lora, prompt, seed, checkpoint"),
    (["--x", "strength:0-1 [25]", "--y", "seed:1-20"], "20 × 26 = 520 images; confirm grids of more than 400 cells: "
                                                       "add --yes to draw it"),
    (["--x", "strength:0-1 [25]", "--y", "seed:1-20", "--yes", "--width", 1024, "--height", 1024],
     "the grid would be 20 × 26 images of 1024×1024: 545 megapixels, over the limit of 200"),
    (["--sampler", "UniPC"], "--sampler: 'UniPC' is not a sampler here; use one of Euler, Euler a, DPM++ 2M Karras"),
    (["--strength", "0.5, 1"], "--strength 0.5, 1: give one strength, such as 0.8 (several go on an axis"),
    (["--steps", 0], "--steps: give a whole number from 1 to 150"),  # was a traceback from the sampler
    # said after the losses were printed, from the first cell, naming no option
    (["--width", 100], "--width: 100 is not a multiple of 8 (the image's sides must be); give 96 or 104"),
    (["--height", 2047], "--height: 2047 is not a multiple of 8 (the image's sides must be); give 2040"),
    (["--width", 0], "--width: give a whole number from 64 to 2048"),  # 0 was taken for "not given"
    (["--cfg", "nan"], "--cfg-scale: give a number from 0.0 to 100.0"),
    (["--y", "checkpoint:tiny-sd, missing.safetensors"],  # the bundled model by its name, as --model takes it
     "checkpoint axis: missing.safetensors: no such file; give a .safetensors or .ckpt file, a Diffusers model folder, "
     "or tiny-sd"),
])
def test_mistakes_are_one_sentence_and_exit_code_2_before_any_image(runs, tmp_path, capsys, arguments, sentence):
    code, out, err = grid(capsys, "tinylora", "--lora-dir", runs, *arguments, "--out", tmp_path)
    assert (code, out) == (2, "") and err.startswith(f"error: {sentence}") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_a_run_not_found_names_the_folders_searched(runs, tmp_path, capsys):
    code, _, err = grid(capsys, "tinylorra", "--lora-dir", runs, "--lora-dir", tmp_path / "more")
    assert code == 2 and err == (f"error: no LoRA or training run named 'tinylorra' in {runs} or {tmp_path / 'more'}; "
                                 "give its name there, the path of one of its files, or its folder with --lora-dir\n")
    code, _, err = grid(capsys, tmp_path / "gone.safetensors")
    assert code == 2 and err.startswith(f"error: {tmp_path / 'gone.safetensors'}: no such LoRA file")
    # a LoRA axis's name: the folders searched, and --lora-dir, not the tab's refresh
    code, _, err = grid(capsys, "tinylora", "--lora-dir", runs, "--x", "lora:stlye")
    assert code == 2 and err == (f"error: LoRA axis: no LoRA named 'stlye' in the Lora folder ({runs}); check the name, "
                                 "or add the folder that has it with --lora-dir\n")
    # an epoch the run has no file of: the epochs it has, not "no LoRA named"
    code, _, err = grid(capsys, "tinylora@e99", "--lora-dir", runs)
    assert code == 2 and err == "error: 'tinylora@e99': the run 'tinylora' has no epoch 99 (it has epochs 1, 2)\n"


def test_a_run_given_as_a_prompts_lora_tag_is_drawn_at_its_weight(runs, tmp_path, capsys):
    """<lora:tinylora:0.7>, copied from a prompt, was "no LoRA or training run named '<lora:tinylora:0.7>'"."""
    code, out, err = grid(capsys, "<lora:tinylora:0.7>", "--lora-dir", runs, "--x", "seed:1", "--y", "epoch:2",
                          "--no-baseline", "--steps", 1, "--out", tmp_path)
    assert code == 0, err
    assert cell_prompts(Path(out.splitlines()[-1])) == ["zkstar <lora:tinylora:0.7>"]


def test_a_run_file_shadowed_by_a_file_of_its_name_in_another_lora_dir_says_what_to_do_here(runs, tmp_path, capsys):
    """The sentence ended "…then refresh", the Grid tab's word: the command reads its folders afresh each time."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lora_trainer.safe_io import read_safetensors_metadata

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    for source in runs.glob("tinylora*.safetensors"):
        shutil.copy(source, tmp_path / "a" / source.name.replace("tinylora", "dup"))
    other = {**read_safetensors_metadata(runs / "tinylora.safetensors"), "ss_output_name": "other"}  # another run's
    save_file(load_file(runs / "tinylora.safetensors"), str(tmp_path / "b" / "dup-000001.safetensors"), other)
    code, out, err = grid(capsys, "dup", "--lora-dir", tmp_path / "a", "--lora-dir", tmp_path / "b", "--x", "strength:1",
                          "--out", tmp_path / "grids")
    assert (code, out) == (2, "") and err == (
        f"error: <lora:dup-000001> means {tmp_path / 'b' / 'dup-000001.safetensors'} to the generator, not "
        f"{tmp_path / 'a' / 'dup-000001.safetensors'} of this grid: rename or move one of the two files, then run the "
        "grid command again\n")


def diffusers_folder(folder: Path) -> Path:
    """A small random SD1-layout model in Diffusers' format (unet/, text_encoder/, vae/ with their configs)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                         cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                         ).save_pretrained(folder / "unet")
    CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=49408, max_position_embeddings=77, eos_token_id=49407)
                  ).save_pretrained(folder / "text_encoder")
    AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,  # 8× as SD's VAE
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, layers_per_block=1
                  ).save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text("{}", encoding="utf-8")
    return folder


def test_a_diffusers_model_folder_that_generate_takes_draws_the_grid(runs, tmp_path, capsys):
    """grid --model refused a Diffusers folder ("no checkpoint file there") that generate --model draws with."""
    model = diffusers_folder(tmp_path / "my model (diffusers)")
    code, out, err = grid(capsys, "tinylora", "--lora-dir", runs, "--model", model, "--x", "strength:1", "--y", "epoch:2",
                          "--no-baseline", "--steps", 1, "--out", tmp_path / "grids")
    assert code == 0, err
    cell = Image.open(Path(out.splitlines()[-1]).with_name(f"{Path(out.splitlines()[-1]).stem}-r00-c00.png"))
    assert cell.size == (512, 512)  # SD1's own size, as generate draws it from that folder
    assert ", Model: my model (diffusers)" in cell.text["parameters"]
    # a folder neither takes, both refuse in the same words
    refused = (f"error: --model {tmp_path} is a folder but not a Diffusers model (no unet/config.json); give a "
               ".safetensors or .ckpt file, a Diffusers model folder, or tiny-sd\n")
    assert grid(capsys, "tinylora", "--lora-dir", runs, "--model", tmp_path)[::2] == (2, refused)
    assert main(["generate", "--prompt", "x", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == refused


def test_the_size_defaults_to_the_models_own(runs, tmp_path, capsys, monkeypatch):
    """As `generate` sizes its images: an SDXL checkpoint's grid is 1024 px unless told (the host's default is 512)."""
    import dataclasses

    from lora_trainer.errors import UserError
    from lora_trainer.grid import plan
    from lora_trainer.models import checkpoint
    from lora_trainer.models.configs import SDXL

    model = tmp_path / "xl.safetensors"
    model.write_bytes(b"")
    monkeypatch.setattr(checkpoint, "detect_architecture", lambda source: (dataclasses.replace(SDXL), "stand-in"))
    monkeypatch.setattr(checkpoint, "open_tensors", lambda path: None)
    asked = []

    def planned(request, *args, **kwargs):
        asked.append((request.settings.width, request.settings.height))
        raise UserError("planned")

    monkeypatch.setattr(plan, "plan_for_host", planned)
    for size in ([], ["--width", 768]):
        assert grid(capsys, "tinylora", "--lora-dir", runs, "--model", model, *size)[0] == 2
    assert asked == [(1024, 1024), (768, 1024)]


def test_ctrl_c_stops_after_the_current_cell_and_saves_the_cells_drawn(runs, tmp_path, capsys, monkeypatch):
    from lora_trainer.app.standalone_host import StandaloneHost

    generate = StandaloneHost.generate

    def generate_then_ctrl_c(self, *args, **kwargs):
        image = generate(self, *args, **kwargs)
        signal.raise_signal(signal.SIGINT)
        return image

    monkeypatch.setattr(StandaloneHost, "generate", generate_then_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        main(["grid", "tinylora", "--lora-dir", str(runs), "--x", "strength:0.5, 1", "--y", "epoch:2", "--no-baseline",
              "--steps", "1", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert stopped.value.code == 130 and "interrupted after 1 of 2 images; the rest are grey" in err
    path = Path(out.splitlines()[-1])  # the grid with the cell drawn, the other grey, and that cell alone
    assert sorted(tmp_path.iterdir()) == sorted([path, path.with_name(f"{path.stem}-r00-c00.png")])
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C stops the process again


def ctrl_c_at(monkeypatch, presses_after_the_first_cell: int, presses_at_the_first_write: int) -> None:
    """Ctrl-C pressed (the handler called by a real SIGINT) after the first cell is drawn and as the save writes its
    first file."""
    from lora_trainer.app.standalone_host import StandaloneHost
    from lora_trainer.grid import render

    generate, write_png = StandaloneHost.generate, render.write_png
    pressed = []

    def generate_then_ctrl_c(self, *args, **kwargs):
        image = generate(self, *args, **kwargs)
        for _ in range(0 if pressed else presses_after_the_first_cell):
            signal.raise_signal(signal.SIGINT)
        pressed.append("cell")
        return image

    def ctrl_c_then_write(*args, **kwargs):
        for _ in range(0 if "save" in pressed else presses_at_the_first_write):
            pressed.append("save")
            signal.raise_signal(signal.SIGINT)
        return write_png(*args, **kwargs)

    monkeypatch.setattr(StandaloneHost, "generate", generate_then_ctrl_c)
    monkeypatch.setattr(render, "write_png", ctrl_c_then_write)


def test_ctrl_c_again_while_the_grid_is_saved_lets_the_save_finish(runs, tmp_path, capsys, monkeypatch):
    """A second Ctrl-C during the final save left the cells' PNGs and no grid."""
    ctrl_c_at(monkeypatch, 1, 1)
    with pytest.raises(SystemExit) as stopped:
        main(["grid", "tinylora", "--lora-dir", str(runs), "--x", "strength:0.5, 1", "--y", "epoch:2", "--no-baseline",
              "--steps", "1", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert stopped.value.code == 130 and "interrupted after 1 of 2 images; the rest are grey" in err
    # the first press said a second would save nothing, which held only while the cell was drawn
    assert "stopping after the current cell, then saving the cells drawn (Ctrl-C again while the cell is drawn" in err
    assert f"saving the grid in {tmp_path} first (Ctrl-C again stops, keeping what is saved by then)" in err
    path = Path(out.splitlines()[-1])
    assert sorted(tmp_path.iterdir()) == sorted([path, path.with_name(f"{path.stem}-r00-c00.png")])
    assert Image.open(path).text["parameters"].startswith("zkstar <lora:tinylora:0.5>")


def test_ctrl_c_twice_while_the_grid_is_saved_stops_and_says_where_the_files_are(runs, tmp_path, capsys, monkeypatch):
    ctrl_c_at(monkeypatch, 0, 2)  # at the grid's own file: nothing is written
    with pytest.raises(SystemExit) as stopped:
        main(["grid", "tinylora", "--lora-dir", str(runs), "--x", "strength:1", "--y", "epoch:2", "--no-baseline",
              "--steps", "1", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert (stopped.value.code, out) == (130, "") and err.endswith(
        f"interrupted while saving into {tmp_path}: what was written there by then stays (the grid is written first, "
        "then its cells)\n")
    assert not list(tmp_path.iterdir())


def test_without_lora_dir_the_apps_lora_folder_is_searched_too(runs, tmp_path, capsys, monkeypatch):
    """The app started in a folder keeps its LoRAs in lora-trainer-data/Lora; grid looked only in models/Lora."""
    import shutil

    shutil.copytree(runs, tmp_path / "lora-trainer-data" / "Lora")
    monkeypatch.chdir(tmp_path)
    code, out, err = grid(capsys, "tinylora", "--x", "strength:1", "--y", "epoch:2", "--no-baseline", "--steps", 1)
    assert code == 0, err
    assert Path(out.splitlines()[-1]).parent.resolve() == (tmp_path / "lora-trainer-data" / "grids").resolve()
