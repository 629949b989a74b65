"""The command line as a user meets it: PNGs with infotext, `model inspect`, and one clear sentence per bad input."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from reference import TINY_KOHYA_CHECKPOINT

from lora_trainer.cli import main
from lora_trainer.safe_io import save_safetensors
from lora_trainer.tiny_model.build import BuildSettings, build


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("模型 with spaces")
    return build(folder / "quick model.safetensors", BuildSettings.quick())


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_pngs_with_webui_infotext(quick_model, tmp_path, capsys):
    out_dir = tmp_path / "输出 folder"
    code, out, err = run(capsys, "generate", "--model", quick_model, "--prompt", "(red:1.2) circle", "--negative", "blurry",
                         "--steps", 3, "--seed", 42, "--sampler", "euler_a", "--batch-size", 2, "--out", out_dir, "--quiet")
    assert code == 0, err
    files = sorted(out_dir.glob("*.png"))
    assert [f.name for f in files] == ["00000-42.png", "00001-43.png"]
    assert out.splitlines() == [str(f) for f in files]
    text = Image.open(files[1]).text["parameters"]
    prompt, negative, parameters = text.split("\n")
    assert prompt == "(red:1.2) circle" and negative == "Negative prompt: blurry"
    assert parameters.startswith("Steps: 3, Sampler: Euler a, CFG scale: 7, Seed: 43, Size: 64x64, Model hash: ")
    assert parameters.endswith("Model: quick model")


def test_generate_applies_the_prompts_lora_tags_and_says_which_it_cannot_find(quick_model, tmp_path, capsys):
    """A LoRA trained without the WebUI is tried as in the WebUI: <lora:name:weight> in the prompt."""
    from lora_trainer.models.checkpoint import load_checkpoint
    from lora_trainer.networks.network import create_network, save_network
    from lora_trainer.networks.spec import spec_from_kohya

    model = load_checkpoint(quick_model)
    network = create_network(model.config, model.unet, model.text_encoders, spec_from_kohya("networks.lora", 4, 4, []))
    with torch.no_grad():
        for parameter in network.parameters():  # a trained network: its change is not zero
            parameter.add_(torch.randn_like(parameter) * 0.5)
    save_network(network.file_tensors(), tmp_path / "loras" / "我的 lora.safetensors", {})

    def generated(prompt: str, *extra) -> tuple:
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        code, _, err = run(capsys, "generate", "--model", quick_model, "--prompt", prompt, "--steps", 3, "--seed", 7,
                           "--out", out, "--quiet", *extra)
        assert code == 0, err
        image = Image.open(next(out.glob("*.png")))
        return torch.tensor(list(image.getdata()), dtype=torch.float32), image.text["parameters"], err

    plain, _, _ = generated("circle")
    with_lora, infotext, _ = generated("circle <lora:我的 lora:1>", "--lora-dir", tmp_path / "loras")
    assert (with_lora - plain).abs().mean() > 1
    assert infotext.startswith("circle <lora:我的 lora:1>\n") and 'Lora hashes: "我的 lora: ' in infotext
    missing, _, err = generated("circle <lora:nosuch:1>", "--lora-dir", tmp_path / "loras")
    assert torch.equal(missing, plain)
    assert "warning: LoRA 'nosuch' not found in" in err and "generating without it" in err


def test_unbalanced_brackets_warn_with_the_position_and_still_generate(quick_model, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--model", quick_model, "--prompt", "(red circle, blue", "--steps", 1,
                       "--out", tmp_path, "--quiet")
    assert code == 0
    assert "warning:" in err and "'('" in err
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_generate_refuses_settings_out_of_range_before_loading_the_model(tmp_path, capsys):
    """--steps 0 ended in a ValueError traceback from the sampler, after the model had loaded."""
    for option, value, said in (("--steps", 0, "--steps 0: give 1 or more"),
                                ("--cfg-scale", -1, "--cfg-scale -1: give 0 or more"),
                                ("--batch", 0, "--batch-size 0: give 1 or more"),  # shortened, as argparse lets it
                                ("--seed", -2, "--seed -2: give -1 or more"),
                                ("--cfg-scale", "nan", "--cfg-scale nan: give 0 or more"),
                                ("--sampler", "Euler b", "unknown sampler 'Euler b': use one of Euler, ")):
        code, _, err = run(capsys, "generate", "--model", tmp_path / "not loaded.safetensors", "--prompt", "circle",
                           option, value, "--out", tmp_path)
        assert code == 2 and (err == f"error: {said}\n" if option != "--sampler" else
                              err.startswith(f"error: {said}") and err.count("\n") == 1)
    assert not list(tmp_path.glob("*.png"))


def test_inspect_names_architecture_parts_and_hashes(capsys):
    code, out, _ = run(capsys, "model", "inspect", TINY_KOHYA_CHECKPOINT)
    assert code == 0
    assert "architecture:  SD1" in out
    assert "fp16" in out and "UNet" in out and "VAE" in out and "text encoder (CLIP ViT-L)" in out
    assert "AutoV2" in out and "other (schedule buffers" in out


def test_the_bundled_model_is_named_tiny_sd_or_by_its_title_wherever_a_command_takes_a_checkpoint(capsys):
    """The API took the tiny model by its title; the command line took only its path inside the package."""
    from lora_trainer.tiny_model.build import EMBEDDED_TITLE, TINY_MODEL_PATH
    from lora_trainer.train_network import main as train_main

    for name in ("tiny-sd", EMBEDDED_TITLE):
        code, out, err = run(capsys, "model", "inspect", name, "--no-hash")
        assert code == 0, err
        assert f"file:          {TINY_MODEL_PATH}" in out and "architecture:  SD1" in out
    assert train_main(["--pretrained_model_name_or_path", "tiny-sd", "--train_data_dir", ".",
                       "--print-kohya-command"]) == 0
    assert f"--pretrained_model_name_or_path {TINY_MODEL_PATH}" in capsys.readouterr().out


def test_model_inspect_of_a_lora_says_so_and_gives_the_lora_command(tmp_path, capsys):
    path = save_safetensors({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                             "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
                            tmp_path / "my lora.safetensors")
    code, out, _ = run(capsys, "model", "inspect", path, "--no-hash")
    assert code == 0
    assert "architecture:  LoRA/LyCORIS network, not a checkpoint" in out
    import shlex

    command = out.split("training and tags run: ", 1)[1].splitlines()[0]
    assert shlex.split(command) == ["python", "-m", "lora_trainer", "lora", "inspect", str(path)]  # pasted as it is
    path = path.rename(tmp_path / "Tom's.safetensors")  # no space, yet a quote the shell reads
    command = run(capsys, "model", "inspect", path, "--no-hash")[1].split("training and tags run: ", 1)[1].splitlines()[0]
    assert shlex.split(command)[-1] == str(path)


def test_inspect_says_unknown_and_why_for_a_flux_file(tmp_path, capsys):
    path = save_safetensors({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, tmp_path / "flux.safetensors")
    code, out, _ = run(capsys, "model", "inspect", path, "--no-hash")
    assert code == 0
    assert "architecture:  unknown" in out and "Flux" in out
    assert "not a model's part         1 tensors" in out and "schedule buffers" not in out  # not a model's buffers


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: d / "missing.safetensors", "no such file"),
        (lambda d: (d / "half.safetensors").write_bytes(b"\x10\x00\x00") and d / "half.safetensors", "not a readable"),
        (lambda d: d, "is a folder"),
    ],
    ids=["missing", "truncated", "folder"],
)
def test_bad_model_paths_give_one_sentence_and_exit_code_2(tmp_path, capsys, make, fragment):
    code, out, err = run(capsys, "generate", "--model", make(tmp_path), "--prompt", "x", "--out", tmp_path / "o")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and fragment in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_unknown_sampler_lists_the_valid_ones(quick_model, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--model", quick_model, "--prompt", "x", "--sampler", "UniPC", "--out", tmp_path)
    assert code == 2 and "DPM++ 2M Karras" in err and "Traceback" not in err


def test_the_app_without_its_extra_says_what_to_install(capsys, monkeypatch):
    """The base install (what the WebUI's venv gets) has no gradio, fastapi or uvicorn: `ui` says how to add them."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("uvicorn", "fastapi") else real(name, *a))
    code, _, err = run(capsys, "ui", "--port", 7899)
    assert code == 2
    assert 'the standalone app needs fastapi, uvicorn, which this install lacks: pip install -e ".[ui]"' in err


def test_underscored_options_are_read_as_the_command_named_spells_them(capsys):
    """sd-scripts' spelling (--caption_extension) is ours with hyphens; only the named command's options are
    rewritten, so a mistake is said in the user's own spelling, not as another command's option."""
    import pytest

    from lora_trainer.cli import hyphenated, parser

    commands = parser()
    assert hyphenated(["dataset", "tags", "D", "--caption_extension", ".caption", "--add_front=zk"], commands) == \
        ["dataset", "tags", "D", "--caption-extension", ".caption", "--add-front=zk"]
    # --no-hash is model inspect's, not generate's; values after = and after -- stay as typed
    assert hyphenated(["generate", "--no_hash"], commands) == ["generate", "--no_hash"]
    assert hyphenated(["bench", "train", "--sd-scripts-arg=--tokenizer_cache_dir=X", "--", "--a_b"], commands) == \
        ["bench", "train", "--sd-scripts-arg=--tokenizer_cache_dir=X", "--", "--a_b"]
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--no_hash"])
    assert "unrecognized arguments: --no_hash" in capsys.readouterr().err
