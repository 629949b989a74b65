"""SDXL training end to end on a tiny SDXL-layout checkpoint (two text encoders, size conditioning): Kohya's
lora_te1/lora_te2 names and sdxl metadata, and --cache_text_encoder_outputs(_to_disk) training the same weights as
encoding every step, with sd-scripts' <image>_te_outputs.npz beside the images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.errors import UserError
from lora_trainer.models.checkpoint import ARCHITECTURE_METADATA_KEY
from lora_trainer.safe_io import save_safetensors
from lora_trainer.tiny_model.build import TINY_MODEL_PATH
from lora_trainer.train_network import main as train_main

SAMPLE = Path(__file__).resolve().parents[1] / "lora_trainer" / "assets" / "sample-dataset" / "10_zkstar"


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(SAMPLE, root / "1_zkstar")
    for extra in list((root / "1_zkstar").glob("*.png"))[8:]:  # 8 images keep the run short
        extra.unlink()
        extra.with_suffix(".txt").unlink()
    return root


def train(model: Path, data: Path, out: Path, *extra: str) -> int:
    return train_main(["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
                       "--output_name", "star", "--resolution", "64", "--train_batch_size", "4", "--network_dim", "4",
                       "--network_alpha", "4", "--learning_rate", "1e-3", "--max_train_epochs", "1", "--cache_latents",
                       "--seed", "3", "--caption_extension", ".txt", "--max_data_loader_n_workers", "0", *extra])


def test_the_kohya_command_of_an_sdxl_checkpoint_names_sdxl_train_network(tiny_sdxl, dataset, tmp_path, capsys):
    """Told from the checkpoint (as Kohya GUI settings with sdxl = true are run here), not from the command's name."""
    assert train(tiny_sdxl, dataset, tmp_path, "--print-kohya-command") == 0
    assert capsys.readouterr().out.startswith("accelerate launch sdxl_train_network.py --pretrained_model_name_or_path")
    assert train(TINY_MODEL_PATH, dataset, tmp_path, "--print-kohya-command") == 0
    assert capsys.readouterr().out.startswith("accelerate launch train_network.py")
    # run as sdxl_train_network: still the checkpoint's script (sd-scripts' sdxl_train_network.py cannot load SD1)
    sdxl_entry = "python -m lora_trainer.sdxl_train_network"
    arguments = ["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", str(dataset),
                 "--output_dir", str(tmp_path), "--resolution", "64", "--max_train_steps", "1", "--caption_extension", ".txt"]
    assert train_main([*arguments, "--print-kohya-command"], prog=sdxl_entry) == 0
    assert capsys.readouterr().out.startswith("accelerate launch train_network.py")
    assert train_main([*arguments, "--print-kohya-command", "--pretrained_model_name_or_path", str(tmp_path / "gone.safetensors")],
                      prog=sdxl_entry) == 0  # unreadable: the command's own script
    assert capsys.readouterr().out.startswith("accelerate launch sdxl_train_network.py")
    assert train_main(arguments, prog=sdxl_entry) == 0  # trains SD1, and says so
    assert "was given a checkpoint that is not SDXL: it trains for the checkpoint's own version" in capsys.readouterr().err


def test_sdxl_run_writes_both_text_encoders_and_sdxl_metadata(tiny_sdxl, dataset, tmp_path):
    assert train(tiny_sdxl, dataset, tmp_path) == 0
    with safe_open(str(tmp_path / "star.safetensors"), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"


def test_a_second_text_encoder_rate_is_said_to_be_unused_as_sd_scripts_leaves_it(tiny_sdxl, dataset, tmp_path):
    """SDXL users give one rate per encoder; networks.lora takes the first for both, in sd-scripts as here: said."""
    from lora_trainer.training.events import read_events

    assert train(tiny_sdxl, dataset, tmp_path / "two", "--text_encoder_lr", "1e-5", "2e-5") == 0
    assert train(tiny_sdxl, dataset, tmp_path / "one", "--text_encoder_lr", "1e-5") == 0
    two, one = load_file(str(tmp_path / "two" / "star.safetensors")), load_file(str(tmp_path / "one" / "star.safetensors"))
    assert all(torch.equal(two[k], one[k]) for k in one)
    said = [e["message"] for e in read_events(tmp_path / "two" / "star.events.jsonl")[0] if e["event"] == "warning"]
    assert any("--text_encoder_lr 1e-05 2e-05: every text encoder trains at the first rate, 1e-05" in m for m in said)
    assert not [e for e in read_events(tmp_path / "one" / "star.events.jsonl")[0]
                if e["event"] == "warning" and "text_encoder_lr" in e["message"]]


def test_cached_text_encoder_outputs_train_what_encoding_every_step_trains(tiny_sdxl, dataset, tmp_path):
    assert train(tiny_sdxl, dataset, tmp_path / "live", "--network_train_unet_only") == 0
    assert train(tiny_sdxl, dataset, tmp_path / "cached", "--network_train_unet_only",
                 "--cache_text_encoder_outputs_to_disk") == 0
    live, cached = load_file(str(tmp_path / "live" / "star.safetensors")), load_file(str(tmp_path / "cached" / "star.safetensors"))
    assert live.keys() == cached.keys()
    assert all(torch.allclose(live[k].float(), cached[k].float(), atol=1e-3, rtol=1e-2) for k in live)

    npz = sorted((dataset / "1_zkstar").glob("*_te_outputs.npz"))
    assert len(npz) == 8
    with np.load(npz[0]) as arrays:  # sd-scripts' keys and layout: [77, 32] per encoder here, pool of the second
        assert arrays["hidden_state1"].shape == (77, 32) and arrays["hidden_state2"].shape == (77, 32)
        assert arrays["pool2"].shape == (32,)
    stamp = npz[0].stat().st_mtime_ns
    assert train(tiny_sdxl, dataset, tmp_path / "again", "--network_train_unet_only",
                 "--cache_text_encoder_outputs_to_disk") == 0
    assert npz[0].stat().st_mtime_ns == stamp  # read back, not encoded again
    # an SD1.5 preset's clip_skip = 2 changes nothing on SDXL: the same caches serve it
    assert train(tiny_sdxl, dataset, tmp_path / "skip", "--network_train_unet_only",
                 "--cache_text_encoder_outputs_to_disk", "--clip_skip", "2") == 0
    assert npz[0].stat().st_mtime_ns == stamp
    # another base model (a fine-tune of the text encoders): its captions are encoded again, never read from these
    with safe_open(str(tiny_sdxl), "pt") as handle:
        metadata = handle.metadata()
    tuned = {k: v * 1.01 if k.startswith("conditioner.") and v.is_floating_point() else v
             for k, v in load_file(str(tiny_sdxl)).items()}
    other = save_safetensors(tuned, tmp_path / "fine-tune.safetensors", metadata)
    before = np.load(npz[0])["hidden_state2"]
    assert train(other, dataset, tmp_path / "other", "--network_train_unet_only",
                 "--cache_text_encoder_outputs_to_disk") == 0
    assert not np.allclose(np.load(npz[0])["hidden_state2"], before)
    # sd-scripts' own caches (and ours before they recorded their encoders) say nothing of the model: read, and said
    from lora_trainer.training.events import read_events

    for path in npz:
        with np.load(path) as arrays:
            np.savez(path, **{k: arrays[k] for k in ("hidden_state1", "hidden_state2", "pool2")})
    assert train(other, dataset, tmp_path / "unmarked", "--network_train_unet_only",
                 "--cache_text_encoder_outputs_to_disk") == 0
    said = [e["message"] for e in read_events(tmp_path / "unmarked" / "star.events.jsonl")[0] if e["event"] == "warning"]
    assert any("text encoder output caches beside the images do not record which model made them" in m and
               "if the checkpoint or its text encoders changed since, delete them" in m for m in said), said
    assert train(other, dataset, tmp_path / "other live", "--network_train_unet_only") == 0
    other_cached, other_live = (load_file(str(tmp_path / name / "star.safetensors")) for name in ("other", "other live"))
    assert all(torch.allclose(other_live[k].float(), other_cached[k].float(), atol=1e-3, rtol=1e-2) for k in other_live)


def test_validation_conditions_on_the_held_out_images_captions_and_crops_as_training_does(tiny_sdxl, tmp_path,
                                                                                          monkeypatch):
    """A held-out 2:1 image is measured with its own crop conditioning (not (0, 0)) and the caption training builds:
    with cached text encoder outputs, the caption in its _te_outputs.npz carries the --caption_prefix trigger word."""
    from PIL import Image

    import lora_trainer.training.trainer as trainer

    folder = tmp_path / "data" / "1_zkstar"
    folder.mkdir(parents=True)
    for image in sorted(SAMPLE.glob("*.png"))[:4]:  # 128x64: fitted inside the 64x64 bucket with 16 px above and below
        Image.open(image).convert("RGB").resize((128, 64)).save(folder / image.name)
        (folder / image.with_suffix(".txt").name).write_text("red background", encoding="utf-8")
    crops, inside = [], []
    validation_loss, vector = trainer._validation_loss, trainer.sdxl_vector

    def validating(*args, **kwargs):
        inside.append(True)
        try:
            return validation_loss(*args, **kwargs)
        finally:
            inside.pop()

    def conditioning(pooled, original_sizes, crop_sizes, target_sizes):
        if inside:
            crops.extend(crop_sizes)
        return vector(pooled, original_sizes, crop_sizes, target_sizes)

    monkeypatch.setattr(trainer, "_validation_loss", validating)
    monkeypatch.setattr(trainer, "sdxl_vector", conditioning)
    assert train(tiny_sdxl, folder.parent, tmp_path / "out", "--network_train_unet_only", "--validation_split", "0.5",
                 "--cache_text_encoder_outputs_to_disk", "--caption_prefix", "zkstar") == 0
    assert crops and set(crops) == {(16, 0)}
    for npz in folder.glob("*_te_outputs.npz"):  # the held-out images' too
        with np.load(npz) as arrays:
            assert str(arrays["caption"]) == "zkstar red background"
    assert len(list(folder.glob("*_te_outputs.npz"))) == 4


def test_caching_refuses_what_would_make_captions_vary(tiny_sdxl, dataset, tmp_path, capsys):
    assert train(tiny_sdxl, dataset, tmp_path, "--cache_text_encoder_outputs") == 2
    assert "needs --network_train_unet_only" in capsys.readouterr().err
    assert train(tiny_sdxl, dataset, tmp_path, "--cache_text_encoder_outputs", "--network_train_unet_only",
                 "--shuffle_caption") == 2
    assert "shuffle_caption changes the captions" in capsys.readouterr().err


def test_clip_skip_leaves_sdxl_alone_as_sd_scripts_and_the_webui_do_and_says_so(tiny_sdxl, dataset, tmp_path):
    """SD1.5 presets often carry clip_skip = 2; on SDXL sd-scripts warns and ignores it, and the WebUI never applies it."""
    from lora_trainer.training.events import read_events

    assert train(tiny_sdxl, dataset, tmp_path / "plain") == 0
    assert train(tiny_sdxl, dataset, tmp_path / "skip", "--clip_skip", "2") == 0
    plain, skip = load_file(str(tmp_path / "plain" / "star.safetensors")), load_file(str(tmp_path / "skip" / "star.safetensors"))
    assert all(torch.equal(plain[k], skip[k]) for k in plain)
    events, _ = read_events(tmp_path / "skip" / "star.events.jsonl")
    assert any("--clip_skip 2 on an SDXL model" in e["message"] for e in events if e["event"] == "warning")


def test_a_v_prediction_sdxl_model_trains_with_sd_scripts_flags_and_says_so_in_the_file(tiny_sdxl, dataset, tmp_path):
    """NoobAI-XL v-pred and its kind: --v_parameterization --zero_terminal_snr on an SDXL checkpoint, as with sd-scripts."""
    assert train(tiny_sdxl, dataset, tmp_path, "--v_parameterization", "--zero_terminal_snr") == 0
    with safe_open(str(tmp_path / "star.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.prediction_type"] == "v"
    # what sd-scripts writes, and what the WebUI reads to list the file among SDXL networks
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_the_v_pred_and_ztsnr_markers_of_a_checkpoint_set_its_prediction_and_schedule(tiny_sdxl, dataset, tmp_path,
                                                                                           capsys):
    """v-prediction SDXL files carry empty v_pred/ztsnr tensors (ComfyUI reads them): loading follows the file, so a
    run and its samples use v-prediction on the zero-terminal-SNR schedule without being told."""
    from lora_trainer.models.checkpoint import load_checkpoint

    state = load_file(str(tiny_sdxl))
    with safe_open(str(tiny_sdxl), "pt") as handle:
        architecture = json.loads(handle.metadata()[ARCHITECTURE_METADATA_KEY])
    architecture.pop("prediction_type", None)  # the widths only: the markers say the rest
    metadata = {ARCHITECTURE_METADATA_KEY: json.dumps(architecture)}
    marked = save_safetensors({**state, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, tmp_path / "vpred.safetensors",
                              metadata)
    model = load_checkpoint(marked)
    assert model.config.prediction_type == "v_prediction" and model.config.schedule.zero_terminal_snr
    assert float(model.config.schedule.alphas_cumprod[-1]) < 1e-6  # pure noise at the last timestep
    assert train(marked, dataset, tmp_path / "out") == 0
    with safe_open(str(tmp_path / "out" / "star.safetensors"), "pt") as handle:
        assert handle.metadata()["modelspec.prediction_type"] == "v"
    # --v_parameterization (as sd-scripts needs it) keeps the file's schedule: the flag only repeats the marker
    assert load_checkpoint(marked, prediction_type="v_prediction").config.schedule.zero_terminal_snr
    # the loss options follow the prediction the file trains, not the flag: an eps-only weighting would divide by the
    # rescaled SNR of 0 at t=999 (an infinite loss); a v-only one trains
    assert train(marked, dataset, tmp_path / "like", "--v_pred_like_loss", "0.2") == 2
    assert ("--v_pred_like_loss is for epsilon-prediction models and this run trains v-prediction (vpred.safetensors: "
            "the file's v_pred marker)") in capsys.readouterr().err
    assert train(marked, dataset, tmp_path / "scaled", "--scale_v_pred_loss_like_noise_pred") == 0
    # a job is refused as it is queued (from the header: the marker), not after loading behind other jobs
    from lora_trainer.training.data import dataset_group
    from lora_trainer.training.options import options_from
    from lora_trainer.training.trainer import check_before_queueing

    for checkpoint, option, value, said in ((marked, "v_pred_like_loss", 0.2, "vpred.safetensors: the file.s v_pred marker"),
                                            (tiny_sdxl, "scale_v_pred_loss_like_noise_pred", True,
                                             f"{tiny_sdxl.name}: declared by the file")):
        options = options_from({"pretrained_model_name_or_path": str(checkpoint), "train_data_dir": str(dataset),
                                "resolution": "64", option: value})
        with pytest.raises(UserError, match=f"--{option} is for .* \\({said}\\)"):
            check_before_queueing(options, dataset_group(options))
    # the queue reads the file's declaration as the loader reads it (here our own architecture metadata)
    declared_v = save_safetensors(state, tmp_path / "declared-v.safetensors",
                                  {ARCHITECTURE_METADATA_KEY: json.dumps({**architecture, "prediction_type": "v_prediction"})})
    options = options_from({"pretrained_model_name_or_path": str(declared_v), "train_data_dir": str(dataset),
                            "resolution": "64", "scale_v_pred_loss_like_noise_pred": True})
    check_before_queueing(options, dataset_group(options))
    assert load_checkpoint(declared_v).config.prediction_type == "v_prediction"
    assert train(tiny_sdxl, dataset, tmp_path / "eps", "--scale_v_pred_loss_like_noise_pred") == 2
    assert "--scale_v_pred_loss_like_noise_pred is for v-prediction models" in capsys.readouterr().err


def test_text_encoders_set_aside_for_samples_encode_in_fp32_on_the_cpu(tiny_sdxl):
    """With cached outputs the encoders leave the GPU; in fp16 there, every sample round failed on the WebUI's torch
    2.1 ("LayerNormKernelImpl" not implemented for 'Half' on the CPU). sd-scripts parks them in fp32 too."""
    from lora_trainer.models.checkpoint import load_checkpoint
    from lora_trainer.models.conditioning import encode_prompts
    from lora_trainer.training.trainer import park_text_encoders

    model = load_checkpoint(tiny_sdxl, dtype=torch.float16)
    park_text_encoders(model.text_encoders, torch.device("cpu"))  # a CPU run: nothing to move
    assert {p.dtype for encoder in model.text_encoders for p in encoder.parameters()} == {torch.float16}
    park_text_encoders(model.text_encoders, torch.device("cuda"))
    assert {(p.device.type, p.dtype) for encoder in model.text_encoders for p in encoder.parameters()} == {("cpu", torch.float32)}
    context = encode_prompts(model.config, model.text_encoders, ["zkstar, white hair"]).context
    assert context.dtype == torch.float32 and context.isfinite().all()
    # fp8 encoders (--fp8_base) are parked as fp8, the rest of them in fp32: an fp32 copy of SDXL's took 3.3 GB of RAM
    from lora_trainer.models.fp8 import FP8, store_in_fp8

    model = load_checkpoint(tiny_sdxl, dtype=torch.float16)
    for encoder in model.text_encoders:
        store_in_fp8(encoder)
    park_text_encoders(model.text_encoders, torch.device("cuda"))
    dtypes = {p.dtype for encoder in model.text_encoders for p in encoder.parameters()}
    assert dtypes == {FP8, torch.float32}
    assert encode_prompts(model.config, model.text_encoders, ["zkstar, white hair"]).context.isfinite().all()
