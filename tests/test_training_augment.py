"""Training without cached latents: images encoded per batch with sd-scripts' crop/colour/flip augmentation, and
loss masks from the images' transparency (``--alpha_mask``), cached or not."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.dataset.buckets import BucketChoice
from lora_trainer.training import noise as N
from lora_trainer.training.data import Batch
from lora_trainer.dataset.layouts import face_in_name
from lora_trainer.training.pixels import color_augment, crop_box, face_crop_plan, training_pixels
from lora_trainer.train_network import main as train_main
from lora_trainer.tiny_model.build import TINY_MODEL_PATH

SAMPLE = Path(__file__).resolve().parents[1] / "lora_trainer" / "assets" / "sample-dataset" / "10_zkstar"


def train(dataset: Path, out: Path, *extra: str) -> int:
    return train_main([
        "--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", str(dataset),
        "--output_dir", str(out), "--output_name", "star", "--resolution", "64", "--train_batch_size", "2",
        "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3", "--max_train_epochs", "2",
        "--seed", "5", "--caption_extension", ".txt", "--max_data_loader_n_workers", "0", *extra,
    ])


@pytest.fixture(scope="module")
def wide_dataset(tmp_path_factory) -> Path:
    """Six of the sample images stretched to 96×64, so a 64×64 crop has room to move."""
    root = tmp_path_factory.mktemp("wide") / "数据 wide"
    folder = root / "1_zkstar"
    folder.mkdir(parents=True)
    for image in sorted(SAMPLE.glob("*.png"))[:6]:
        Image.open(image).convert("RGB").resize((96, 64)).save(folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    return root


def lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "star.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the pure pixel functions ----------------------------------------------------------------------------------


def test_random_crop_moves_inside_the_resized_image_and_repeats_with_the_seed():
    choice = BucketChoice(bucket=(64, 64), resized_size=(96, 64), aspect_error=0.0)
    assert crop_box(choice) == (16, 0, 80, 64)  # centre
    boxes = [crop_box(choice, True, random.Random(seed)) for seed in range(40)]
    assert all(0 <= left <= 32 and right - left == 64 and (top, bottom) == (0, 64) for left, top, right, bottom in boxes)
    assert len({b[0] for b in boxes}) > 10
    assert boxes == [crop_box(choice, True, random.Random(seed)) for seed in range(40)]


def test_colour_augmentation_changes_a_third_of_the_images_slightly():
    image = Image.fromarray(np.random.default_rng(0).integers(30, 200, (16, 16, 3), dtype=np.uint8), "RGB")
    before = np.asarray(image, dtype=np.float64)
    changes = [np.abs(np.asarray(color_augment(image, random.Random(seed)), dtype=np.float64) - before).mean()
               for seed in range(300)]
    changed = [c for c in changes if c > 0]
    assert 0.25 < len(changed) / len(changes) < 0.42  # sd-scripts: p = 0.33
    assert max(changed) < 40  # a nudge of hue or gamma, not a different picture


def test_flip_mirrors_the_pixels_and_the_alpha_mask(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, :4, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    choice = BucketChoice(bucket=(8, 8), resized_size=(8, 8), aspect_error=0.0)
    plain = training_pixels(tmp_path / "half.png", choice, alpha_mask=True)
    flipped = training_pixels(tmp_path / "half.png", choice, alpha_mask=True, flip=True)
    assert plain.mask[:, :4].eq(1).all() and plain.mask[:, 4:].eq(0).all()
    assert torch.equal(flipped.mask, plain.mask.flip(-1)) and torch.equal(flipped.pixels, plain.pixels.flip(-1))
    assert training_pixels(tmp_path / "half.png", choice).mask is None  # no alpha_mask: no mask


def test_the_loss_mask_zeroes_the_transparent_part_of_the_loss():
    loss = torch.ones(1, 4, 2, 2)
    mask = torch.zeros(1, 16, 16)
    mask[:, :, :8] = 1  # left half of the pixels → left column of latents
    out = N.masked(loss, mask)
    assert out[..., 0].eq(1).all() and out[..., 1].eq(0).all()
    assert torch.equal(N.masked(loss, None), loss)


def test_sdxl_crop_conditioning_is_mirrored_for_a_flipped_image():
    class Record:
        bucket, size, face = (64, 64), (128, 64), None  # a 2:1 image in a square bucket: fitted inside, 16 px margins
        choice = BucketChoice((64, 64), (128, 64), -1.0)

    crops = Batch([Record(), Record()], [False, True]).crops
    assert crops[0] == (16, 0) and crops[1] == (16, 0)  # symmetric margins mirror onto themselves
    Record.size = (100, 64)
    left = Batch([Record()], [False]).crops[0][1]
    right_margin = 64 - (left + 64)
    assert Batch([Record()], [True]).crops[0][1] == right_margin


def test_face_position_is_read_from_sd_scripts_face_crop_names():
    assert face_in_name(Path("anna_0003_120_80_40_48.png")) == (120, 80, 40, 48)
    assert face_in_name(Path("photo_2024_01_02_beach.png")) is None  # dates are not a face (sd-scripts crashes)
    assert face_in_name(Path("a_0_10_20_20.png")) is None  # centre x 0: sd-scripts' "no face"
    assert face_in_name(Path("a_1_2_3.png")) is None
    # sd-scripts reads the parts with int(): a face centred above the picture is a face, cropped at the top edge
    assert face_in_name(Path("a_5_-3_30_40.png")) == (5, -3, 30, 40)
    assert face_crop_plan((256, 256), (64, 64), (5, -3, 30, 40), (2.0, 2.0), False, random.Random(0))[1][:2] == (0, 0)
    assert face_in_name(Path("a_5_3_0_0.png")) is None  # a face of size 0 (sd-scripts divides by it): trained whole
    assert face_in_name(Path("a_²_3_4_5.png")) is None  # a digit that is not a number


def _face_image(path: Path, size=(256, 256), face=(180, 60, 32, 32)) -> Path:
    """White, with a red square "face" of the named size at the named centre."""
    image = Image.new("RGB", size, "white")
    cx, cy, w, h = face
    image.paste((255, 0, 0), (cx - w // 2, cy - h // 2, cx + w // 2, cy + h // 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def test_face_crop_cuts_the_resolution_around_the_face_at_the_asked_face_size(tmp_path):
    image = _face_image(tmp_path / "girl_180_60_32_32.png")
    choice = BucketChoice((64, 64), (64, 64), 0.0)
    # range 2,2: the face must be half the 64 px side, which it already is: no resize, the box is centred on it
    assert face_crop_plan((256, 256), (64, 64), (180, 60, 32, 32), (2.0, 2.0), False, random.Random(0)) == \
        ((256, 256), (148, 28, 212, 92))
    pixels = training_pixels(image, choice, face=(180, 60, 32, 32), face_range=(2.0, 2.0)).pixels
    red = (pixels[0] > 0.5) & (pixels[1] < -0.5)
    assert red[16:48, 16:48].all() and red.sum() == 32 * 32  # exactly the face, in the middle
    # range 2,4: the face ends up between a quarter and a half of the side, always inside the crop
    for seed in range(20):
        resized, box = face_crop_plan((256, 256), (64, 64), (180, 60, 32, 32), (2.0, 4.0), False, random.Random(seed))
        scale = resized[0] / 256
        assert 16 - 1 <= 32 * scale <= 32 + 1 and resized[0] >= 64
        assert box[0] <= 180 * scale <= box[2] and box[1] <= 60 * scale <= box[3]
        assert box[2] - box[0] == 64 and box[3] - box[1] == 64 and box[2] <= resized[0] and box[3] <= resized[1]


def test_face_crop_near_an_edge_stays_inside_and_a_small_image_is_enlarged_to_cover():
    resized, box = face_crop_plan((256, 256), (64, 64), (8, 250, 32, 32), (2.0, 2.0), False, random.Random(0))
    assert box == (0, 192, 64, 256)
    resized, box = face_crop_plan((48, 40), (64, 64), (24, 20, 16, 16), (2.0, 4.0), False, random.Random(0))
    assert resized[0] >= 64 and resized[1] >= 64 and box[2] - box[0] == 64


def test_face_crop_with_random_crop_wanders_but_keeps_the_face_in_the_middle_most_often():
    lefts = [face_crop_plan((512, 512), (64, 64), (256, 256, 32, 32), (2.0, 2.0), True, random.Random(seed))[1][0]
             for seed in range(400)]
    assert len(set(lefts)) > 50 and all(0 <= left <= 512 - 64 for left in lefts)
    centred = sum(abs(left - 224) < 64 for left in lefts)
    far = sum(abs(left - 224) >= 192 for left in lefts)
    assert centred > 2 * far  # a triangular spread around the face, as sd-scripts draws it


def test_sdxl_conditioning_of_a_face_crop_is_the_uncropped_target_as_sd_scripts_gives_it():
    class Record:
        bucket, size, face = (64, 64), (256, 128), (180, 60, 32, 32)
        choice = BucketChoice((64, 64), (128, 64), -1.0)

    batch = Batch([Record(), Record()], [False, True])
    # flipped: sd-scripts' crop (0, 0, 0, 0) mirrored, a left of the target's width (train_util.py's flipped crop_ltrb)
    assert batch.original_sizes == [(64, 64), (64, 64)] and batch.crops == [(0, 0), (0, 64)]


def test_face_crop_trains_uncached_without_buckets_and_is_refused_where_sd_scripts_ignores_it(tmp_path, capsys):
    folder = tmp_path / "脸 faces" / "2_zkgirl"
    for index, face in enumerate([(180, 60, 32, 32), (60, 190, 40, 40), (128, 128, 48, 48), (200, 200, 24, 24)]):
        _face_image(folder / f"girl{index}_{face[0]}_{face[1]}_{face[2]}_{face[3]}.png", face=face)
        (folder / f"girl{index}.txt").write_text("zkgirl, red face", encoding="utf-8")  # the face-crop source's caption
    assert train(folder.parent, tmp_path / "a", "--face_crop_aug_range", "2.0,4.0") == 0
    assert train(folder.parent, tmp_path / "b", "--face_crop_aug_range", "2.0,4.0") == 0
    assert same(lora(tmp_path / "a"), lora(tmp_path / "b"))
    assert train(folder.parent, tmp_path / "plain") == 0
    assert not same(lora(tmp_path / "a"), lora(tmp_path / "plain"))
    assert train(folder.parent, tmp_path / "c", "--face_crop_aug_range", "2.0,4.0", "--cache_latents") == 2
    assert "--face_crop_aug_range changes the pixels every step" in capsys.readouterr().err
    assert train(folder.parent, tmp_path / "c", "--face_crop_aug_range", "2.0,4.0", "--enable_bucket") == 2
    assert "does not work with --enable_bucket" in capsys.readouterr().err


def _fixed_resolution_data(tmp_path: Path, sizes: dict[str, tuple[int, int]], *extra: str):
    """The run's data plan at resolution 64 without buckets or cached latents, over one-pixel checkerboards."""
    from types import SimpleNamespace

    from lora_trainer.training.data import build_training_data
    from lora_trainer.training.options import options_from

    folder = tmp_path / "data" / "1_zkstar"
    folder.mkdir(parents=True)
    for name, (width, height) in sizes.items():
        board = (np.indices((height, width)).sum(0) % 2 * 255).astype(np.uint8)
        Image.fromarray(board).convert("RGB").save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text("zkstar", encoding="utf-8")
    values = {"pretrained_model_name_or_path": "m", "train_data_dir": str(folder.parent), "resolution": "64",
              "caption_extension": ".txt", "train_batch_size": 1, **{name: True for name in extra}}
    return build_training_data(options_from(values), SimpleNamespace(bucket_step_multiple=64, name="sdxl", label="SDXL"),
                               seed=3)


def test_random_crop_without_buckets_trains_native_patches_as_sd_scripts_does(tmp_path):
    """sd-scripts cuts the resolution out of a larger image at its own size: the one-pixel checkerboard stays sharp
    (resized to cover, it would average to grey), and SDXL is told the patch is the original, crop (0, 0) or
    (0, width) when flipped."""
    data = _fixed_resolution_data(tmp_path, {"board": (160, 128)}, "random_crop", "flip_aug")
    batches = data.epoch_batches(0) + data.epoch_batches(1) + data.epoch_batches(2)
    for batch in data.loaded(batches, workers=1):
        assert batch.pixels[0].pixels.shape == (3, 64, 64)
        assert batch.pixels[0].pixels.abs().min() > 0.99  # every pixel still black or white
        assert batch.original_sizes == [(64, 64)] and batch.target_sizes == [(64, 64)]
        assert batch.crops == [(0, 64) if batch.flips[0] else (0, 0)]
    assert {b.flips[0] for b in batches} == {False, True}
    assert not [note for note in data.notes if "sd-scripts would stop" in note]


def test_images_sd_scripts_stops_on_without_buckets_are_resized_and_said_once(tmp_path):
    data = _fixed_resolution_data(tmp_path, {"large": (160, 128), "small": (48, 48), "exact": (64, 64)})
    said = [note for note in data.notes if "sd-scripts would stop" in note]
    assert len(said) == 1 and "(and 1 more image)" in said[0]
    assert "160x128 is larger than the resolution 64x64 and neither buckets nor random_crop are on" in said[0]
    assert "This run resizes such images to cover 64x64 and crops them instead" in said[0]
    batch = next(data.loaded(data.epoch_batches(0)[:1], workers=1))
    assert batch.pixels[0].pixels.shape == (3, 64, 64)  # resized to cover and cropped, as before
    data = _fixed_resolution_data(tmp_path / "crop", {"small": (48, 48)}, "random_crop")
    assert any("48x48 is smaller than the resolution 64x64" in note for note in data.notes)


# --- training end to end --------------------------------------------------------------------------------------


def test_training_without_cached_latents_is_reproducible_and_augmentations_change_what_is_learnt(wide_dataset, tmp_path):
    assert train(wide_dataset, tmp_path / "a") == 0
    assert train(wide_dataset, tmp_path / "b") == 0
    assert same(lora(tmp_path / "a"), lora(tmp_path / "b"))  # per-batch encoding is seeded too
    assert train(wide_dataset, tmp_path / "crop", "--random_crop", "--color_aug", "--flip_aug") == 0
    assert train(wide_dataset, tmp_path / "crop2", "--random_crop", "--color_aug", "--flip_aug") == 0
    assert same(lora(tmp_path / "crop"), lora(tmp_path / "crop2"))
    assert not same(lora(tmp_path / "a"), lora(tmp_path / "crop"))


def test_an_uncached_run_resumed_mid_epoch_draws_the_same_augmentations_and_ends_with_the_same_weights(wide_dataset, tmp_path):
    augment = ("--random_crop", "--color_aug", "--flip_aug")
    assert train(wide_dataset, tmp_path / "whole", *augment, "--save_state", "--save_every_n_steps", "2") == 0
    state = tmp_path / "whole" / "star-step00000002-state"  # 3 batches per epoch: step 2 is mid-epoch
    assert state.is_dir()
    assert train(wide_dataset, tmp_path / "resumed", *augment, "--resume", str(state)) == 0
    assert same(lora(tmp_path / "whole"), lora(tmp_path / "resumed"))


def _transparent_copy(tmp_path: Path, alpha: int) -> Path:
    folder = tmp_path / f"alpha{alpha}" / "1_zkstar"
    folder.mkdir(parents=True)
    for image in sorted(SAMPLE.glob("*.png"))[:4]:
        rgba = Image.open(image).convert("RGBA")
        rgba.putalpha(alpha)
        rgba.save(folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    return folder.parent


@pytest.mark.parametrize("caching", [(), ("--cache_latents_to_disk",)], ids=["per-batch", "cached"])
def test_fully_transparent_images_teach_nothing_with_alpha_mask(tmp_path, caching):
    dataset = _transparent_copy(tmp_path, alpha=0)
    assert train(dataset, tmp_path / "masked", "--alpha_mask", "--masked_loss", *caching) == 0
    ups = [t for k, t in lora(tmp_path / "masked").items() if k.endswith("lora_up.weight")]
    assert ups and all(t.eq(0).all() for t in ups)  # zero loss everywhere: the LoRA stays a no-op
    assert train(dataset, tmp_path / "unmasked", *caching) == 0
    assert any(t.ne(0).any() for k, t in lora(tmp_path / "unmasked").items() if k.endswith("lora_up.weight"))
    if caching:
        caches = list((dataset / "1_zkstar").glob("*_sd.npz"))
        assert caches and all("alpha_mask" in np.load(c).files for c in caches)


def test_augmentations_that_cannot_be_cached_are_refused_before_training(wide_dataset, tmp_path, capsys):
    assert train(wide_dataset, tmp_path, "--cache_latents", "--color_aug") == 2
    assert "--color_aug changes the pixels every step, so latents cannot be cached" in capsys.readouterr().err
    config = tmp_path / "dataset.toml"
    config.write_text(f'[general]\nresolution = 64\ncaption_extension = ".txt"\n[[datasets]]\n[[datasets.subsets]]\n'
                      f'image_dir = "{(wide_dataset / "1_zkstar").as_posix()}"\nrandom_crop = true\n', encoding="utf-8")
    assert train_main(["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--dataset_config", str(config),
                       "--output_dir", str(tmp_path / "out"), "--cache_latents"]) == 2
    err = capsys.readouterr().err
    assert "1_zkstar: random_crop changes the pixels every step" in err and "drop --cache_latents" in err
    assert train(wide_dataset, tmp_path, "--masked_loss") == 2
    assert "--masked_loss needs masks: add --alpha_mask" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


# --- zero terminal SNR ----------------------------------------------------------------------------------------


def test_loss_weights_under_zero_terminal_snr_read_the_snr_before_the_rescale_as_sd_scripts_does():
    """sd-scripts computes all_snr before rescaling the betas (kohya-ss/sd-scripts#1263): its min-SNR, v-prediction
    scaling and debiased weights use the plain schedule's SNR while the noising uses the rescaled one. The same
    options weigh timesteps the same here (v + min-SNR 5 at t=900 weighed 0.2× sd-scripts' weight with the rescaled
    SNR), and the weights stay finite at the last timestep, whose rescaled SNR is 0."""
    from lora_trainer.sampling.schedule import NoiseSchedule

    rescaled, plain = NoiseSchedule(zero_terminal_snr=True), NoiseSchedule()
    assert rescaled.alphas_cumprod[-1] == 0 and plain.alphas_cumprod[-1] > 0
    torch.testing.assert_close(rescaled.loss_weighting_snr, plain.loss_weighting_snr)
    timesteps = torch.tensor([250, 500, 900, 999])
    snr = plain.alphas_cumprod[timesteps].double() / (1 - plain.alphas_cumprod[timesteps].double())
    weights = N.loss_weights(timesteps, rescaled.loss_weighting_snr, True, min_snr_gamma=5)
    torch.testing.assert_close(weights, (snr.clamp(max=5) / (snr + 1)).float())
    abar = rescaled.alphas_cumprod[timesteps].double()
    rescaled_snr = abar / (1 - abar)
    assert float(weights[2]) > 4 * float(rescaled_snr[2].clamp(max=5) / (rescaled_snr[2] + 1))  # not the rescaled SNR's
    for v_prediction in (False, True):
        for option in ({"min_snr_gamma": 5}, {"debiased_estimation_loss": True}, {"v_pred_like_loss": 0.2},
                       {"scale_v_pred_loss_like_noise_pred": True}):
            assert torch.isfinite(N.loss_weights(timesteps, rescaled.loss_weighting_snr, v_prediction, **option)).all()


def test_zero_terminal_snr_trains_on_the_rescaled_schedule(wide_dataset, tmp_path, capsys):
    from safetensors import safe_open
    from lora_trainer.training.events import read_events

    common = ("--cache_latents", "--v_parameterization", "--min_snr_gamma", "5", "--min_timestep", "990")
    assert train(wide_dataset, tmp_path / "zt", "--zero_terminal_snr", *common) == 0
    assert train(wide_dataset, tmp_path / "plain", *common) == 0
    with safe_open(str(tmp_path / "zt" / "star.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_zero_terminal_snr"] == "True"
    zt, plain = lora(tmp_path / "zt"), lora(tmp_path / "plain")
    assert all(torch.isfinite(t).all() for t in zt.values()) and not same(zt, plain)
    events, _ = read_events(tmp_path / "zt" / "star.events.jsonl")
    assert not [e for e in events if e["event"] == "warning" and "zero_terminal_snr" in e["message"]]
    assert train(wide_dataset, tmp_path / "eps", "--zero_terminal_snr", "--cache_latents", "--max_train_steps", "1",
                 "--max_train_epochs", "1") == 0
    events, _ = read_events(tmp_path / "eps" / "star.events.jsonl")
    assert any(e["event"] == "warning" and "--zero_terminal_snr on an epsilon-prediction model" in e["message"] for e in events)
    # an eps model on the rescaled schedule with 1/SNR weights trains (finite: sd-scripts' SNR), as with sd-scripts
    assert train(wide_dataset, tmp_path / "debiased", "--zero_terminal_snr", "--debiased_estimation_loss", "--cache_latents",
                 "--min_timestep", "999", "--max_train_steps", "2", "--max_train_epochs", "1") == 0


# --- base weights ---------------------------------------------------------------------------------------------


def test_base_weights_are_merged_before_training_so_the_new_lora_learns_on_top_of_them(wide_dataset, tmp_path, capsys):
    """Training on (base + LoRA A) is training on a checkpoint that has A baked in: same weights either way."""
    from lora_trainer.networks.apply import Strength
    from lora_trainer.networks.tools.bake import bake

    assert train(wide_dataset, tmp_path / "a", "--cache_latents", "--max_train_epochs", "1") == 0
    first = tmp_path / "a" / "star.safetensors"
    baked = tmp_path / "baked.safetensors"
    bake(TINY_MODEL_PATH, [(first, Strength(0.5))], baked, precision="float")
    assert train(wide_dataset, tmp_path / "on_base", "--cache_latents", "--base_weights", str(first),
                 "--base_weights_multiplier", "0.5") == 0
    assert train_main(["--pretrained_model_name_or_path", str(baked), "--train_data_dir", str(wide_dataset),
                       "--output_dir", str(tmp_path / "on_baked"), "--output_name", "star", "--resolution", "64",
                       "--train_batch_size", "2", "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3",
                       "--max_train_epochs", "2", "--seed", "5", "--caption_extension", ".txt", "--cache_latents"]) == 0
    on_base, on_baked = lora(tmp_path / "on_base"), lora(tmp_path / "on_baked")
    assert all(torch.allclose(on_base[k], on_baked[k], atol=1e-5) for k in on_baked)
    assert not same(on_base, lora(tmp_path / "a"))
    assert train(wide_dataset, tmp_path / "missing", "--base_weights", str(tmp_path / "nope.safetensors")) == 2
    assert "--base_weights" in capsys.readouterr().err


# --- resize filters -------------------------------------------------------------------------------------------


def test_resize_filter_follows_sd_scripts_default_and_the_chosen_interpolation(tmp_path, capsys):
    from PIL import Image as PILImage

    from lora_trainer.training.pixels import resize_filter

    assert resize_filter((1024, 768), (512, 384)) == PILImage.Resampling.BOX  # shrinking: area
    assert resize_filter((300, 300), (512, 512)) == PILImage.Resampling.LANCZOS  # enlarging: lanczos
    assert resize_filter((1024, 768), (512, 384), "bicubic") == PILImage.Resampling.BICUBIC
    stripes = np.zeros((64, 96, 3), dtype=np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: area averages them to grey, nearest keeps black or white
    PILImage.fromarray(stripes).save(tmp_path / "stripes.png")
    choice = BucketChoice(bucket=(32, 32), resized_size=(48, 32), aspect_error=0.0)
    area = training_pixels(tmp_path / "stripes.png", choice).pixels
    nearest = training_pixels(tmp_path / "stripes.png", choice, interpolation="nearest").pixels
    assert area.abs().max() < 0.2 and nearest.abs().min() > 0.9
    config = tmp_path / "args.toml"
    config.write_text('resize_interpolation = "cubik"\n', encoding="utf-8")
    assert train_main(["--config_file", str(config), "--pretrained_model_name_or_path", str(TINY_MODEL_PATH),
                       "--train_data_dir", str(tmp_path)]) == 2
    assert f"--resize_interpolation 'cubik' (in {config}) is not one of lanczos" in capsys.readouterr().err


def test_an_uncached_batch_mixing_masked_and_unmasked_subsets_trains(tmp_path):
    """A subset with alpha_mask beside one without: their images share batches, the unmasked ones count everywhere."""
    masked = _transparent_copy(tmp_path, alpha=255) / "1_zkstar"
    plain = tmp_path / "plain"
    plain.mkdir()
    for image in sorted(SAMPLE.glob("*.png"))[4:8]:
        shutil.copy(image, plain / image.name)
        shutil.copy(image.with_suffix(".txt"), plain / image.with_suffix(".txt").name)
    config = tmp_path / "dataset.toml"
    config.write_text(f'[general]\nresolution = 64\ncaption_extension = ".txt"\nbatch_size = 4\n[[datasets]]\n'
                      f'[[datasets.subsets]]\nimage_dir = "{masked.as_posix()}"\nalpha_mask = true\n'
                      f'[[datasets.subsets]]\nimage_dir = "{plain.as_posix()}"\n', encoding="utf-8")
    assert train_main(["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--dataset_config", str(config),
                       "--output_dir", str(tmp_path / "out"), "--output_name", "star", "--network_dim", "4",
                       "--max_train_epochs", "1", "--seed", "5", "--masked_loss"]) == 0
    assert any(t.ne(0).any() for k, t in lora(tmp_path / "out").items() if k.endswith("lora_up.weight"))


def test_disk_caches_are_reused_and_never_taken_from_the_other_model_family(tmp_path, monkeypatch):
    """SD and SDXL caches of one image share a folder and a latent shape (`_sd.npz`, `_sdxl.npz`) but come from
    different VAEs: an SD run must read only its own, and read it back on the next run unless the image changed since;
    an image read back from its cache is not decoded at the start either (the run never reads its pixels)."""
    from lora_trainer.training import data as training_data

    decoded = []
    checked = training_data.checked_image_size
    monkeypatch.setattr(training_data, "checked_image_size", lambda path: decoded.append(path.name) or checked(path))
    folder = tmp_path / "data" / "1_zkstar"
    folder.mkdir(parents=True)
    for image in sorted(SAMPLE.glob("*.png"))[:6]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
        np.savez(folder / f"{image.stem}_0064x0064_sdxl.npz", latents=np.full((4, 8, 8), 50.0, dtype=np.float32),
                 original_size=np.array([64, 64]), crop_ltrb=np.zeros(4))
    assert train(folder.parent, tmp_path / "memory", "--cache_latents") == 0
    assert train(folder.parent, tmp_path / "disk", "--cache_latents_to_disk") == 0
    assert same(lora(tmp_path / "disk"), lora(tmp_path / "memory"))
    own = sorted(folder.glob("*_0064x0064_sd.npz"))
    assert len(own) == 6
    stamps = [path.stat().st_mtime_ns for path in own]
    decoded.clear()
    assert train(folder.parent, tmp_path / "again", "--cache_latents_to_disk") == 0
    assert decoded == []
    assert [path.stat().st_mtime_ns for path in own] == stamps  # read back, not encoded again
    assert same(lora(tmp_path / "again"), lora(tmp_path / "memory"))
    # an image painted over after it was cached (same size, so the same cache name) is encoded again, the rest not
    edited = folder / own[0].name.replace("_0064x0064_sd.npz", ".png")
    Image.new("RGB", (64, 64), (255, 0, 255)).save(edited)
    os.utime(edited, ns=(stamps[0] + 10**9, stamps[0] + 10**9))
    before = np.load(own[0])["latents"]
    assert train(folder.parent, tmp_path / "edited", "--cache_latents_to_disk") == 0
    assert decoded == [edited.name]  # checked before it is encoded again
    assert not np.array_equal(np.load(own[0])["latents"], before)
    assert [path.stat().st_mtime_ns for path in own[1:]] == stamps[1:]


def test_an_older_stem_npz_beside_the_image_is_read_as_sd_scripts_reads_it_and_encoded_again_into_it(tmp_path):
    """sd-scripts still reads a latent cache under its older name ``<stem>.npz`` (``get_latents_npz_path``) before
    ``<stem>_WWWWxHHHH_sd.npz``, and encodes again into that same file one that does not fit: a dataset cached by an
    older sd-scripts trains from its files, and no second cache is written beside them."""
    folder = tmp_path / "data" / "1_zkstar"
    folder.mkdir(parents=True)
    for image in sorted(SAMPLE.glob("*.png"))[:6]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    assert train(folder.parent, tmp_path / "memory", "--cache_latents") == 0
    assert train(folder.parent, tmp_path / "first", "--cache_latents_to_disk") == 0
    for ours in sorted(folder.glob("*_0064x0064_sd.npz")):  # as sd-scripts writes them: its keys only
        with np.load(ours) as data:
            np.savez(folder / ours.name.replace("_0064x0064_sd.npz", ".npz"), latents=data["latents"],
                     original_size=data["original_size"], crop_ltrb=data["crop_ltrb"])
        ours.unlink()
    older = sorted(folder.glob("*.npz"))
    np.savez(older[0], latents=np.zeros((4, 4, 4), dtype=np.float32), original_size=np.array([64, 64]),
             crop_ltrb=np.zeros(4))  # cached at another resolution: it does not fit this run's bucket
    stamps = [path.stat().st_mtime_ns for path in older]
    assert train(folder.parent, tmp_path / "older", "--cache_latents_to_disk") == 0
    assert sorted(folder.glob("*.npz")) == older  # no _0064x0064_sd.npz beside them
    assert [path.stat().st_mtime_ns for path in older[1:]] == stamps[1:]  # read, not encoded again
    assert np.load(older[0])["latents"].shape == (4, 8, 8)  # encoded again, into the same file
    assert same(lora(tmp_path / "older"), lora(tmp_path / "memory"))
    from lora_trainer.training.events import read_events

    # SD and SDXL latents have the same shape and sd-scripts' older files do not say which VAE made them: said
    warnings = [e["message"] for e in read_events(tmp_path / "older" / "star.events.jsonl")[0] if e["event"] == "warning"]
    assert any(m.startswith("5 latent caches beside the images do not record which model made them (sd-scripts' own, or "
                            "this trainer's before 2026-12-05) and were read as this run's") and "if the checkpoint or VAE "
               "(for <image>.npz, sd-scripts' older name, also if they were made for SD where this run is SDXL, or the "
               "reverse) changed since, delete them" in m for m in warnings), warnings


def test_latents_cached_by_another_vae_encoder_are_encoded_again_and_a_decoder_only_vae_keeps_them(tmp_path):
    """Switching to a checkpoint or --vae with another encoder must not train on the old latents (sd-scripts would:
    it checks only their shape); a VAE whose decoder alone was tuned (as sd-vae-ft-mse is) makes the same latents."""
    folder = tmp_path / "data" / "1_zkstar"
    folder.mkdir(parents=True)
    for image in sorted(SAMPLE.glob("*.png"))[:4]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    vae = {k.removeprefix("first_stage_model."): v for k, v in load_file(str(TINY_MODEL_PATH)).items()
           if k.startswith("first_stage_model.")}
    from lora_trainer.safe_io import save_safetensors

    decoder_tuned = save_safetensors({k: v * 1.01 if k.startswith("decoder.") else v for k, v in vae.items()},
                                     tmp_path / "decoder tuned.safetensors")
    encoder_tuned = save_safetensors({k: v * 1.01 if k.startswith("encoder.") else v for k, v in vae.items()},
                                     tmp_path / "encoder tuned.safetensors")
    assert train(folder.parent, tmp_path / "first", "--cache_latents_to_disk") == 0
    caches = sorted(folder.glob("*_sd.npz"))
    stamps, latents = [c.stat().st_mtime_ns for c in caches], np.load(caches[0])["latents"]
    assert train(folder.parent, tmp_path / "decoder", "--cache_latents_to_disk", "--vae", str(decoder_tuned)) == 0
    assert [c.stat().st_mtime_ns for c in caches] == stamps
    assert train(folder.parent, tmp_path / "encoder", "--cache_latents_to_disk", "--vae", str(encoder_tuned)) == 0
    assert all(c.stat().st_mtime_ns != stamp for c, stamp in zip(caches, stamps))
    assert not np.allclose(np.load(caches[0])["latents"], latents)
    assert train(folder.parent, tmp_path / "in memory", "--cache_latents", "--vae", str(encoder_tuned)) == 0
    assert same(lora(tmp_path / "encoder"), lora(tmp_path / "in memory"))


def test_loader_threads_read_ahead_without_changing_what_is_trained(wide_dataset, tmp_path):
    """Without cached latents the next batches are read and augmented by threads: the same crops, colours and flips as
    reading them in the training loop, since each batch draws from its own seed."""
    augmented = ("--flip_aug", "--color_aug", "--random_crop")
    assert train(wide_dataset, tmp_path / "inline", *augmented) == 0
    assert train(wide_dataset, tmp_path / "threads", *augmented, "--max_data_loader_n_workers", "3") == 0
    assert same(lora(tmp_path / "threads"), lora(tmp_path / "inline"))


def test_caching_several_images_per_vae_batch_caches_what_one_at_a_time_caches(wide_dataset, tmp_path):
    """--vae_batch_size only groups the VAE's work: every image (and its flipped copy) gets the draw it gets alone,
    so the caches agree up to the rounding of a batched convolution."""
    caches = {}
    for size in ("1", "4"):
        dataset = tmp_path / f"data {size}"
        shutil.copytree(wide_dataset, dataset)
        assert train(dataset, tmp_path / size, "--cache_latents_to_disk", "--flip_aug", "--vae_batch_size", size) == 0
        caches[size] = {p.name: dict(np.load(p)) for p in (dataset / "1_zkstar").glob("*_sd.npz")}
    assert len(caches["1"]) == 6 and caches["1"].keys() == caches["4"].keys()
    for name, one in caches["1"].items():
        for key in ("latents", "latents_flipped"):
            assert np.allclose(one[key], caches["4"][name][key], atol=1e-5)


def test_a_half_written_disk_cache_is_encoded_again_and_an_unwritable_folder_is_named(tmp_path, capsys, monkeypatch):
    """Another tool's crash can leave a truncated .npz beside an image: it is read as no cache (not a crash), and
    rewritten whole. A folder that takes no cache says so, with the in-memory alternative."""
    folder = tmp_path / "data" / "1_zkstar"
    folder.mkdir(parents=True)
    for image in sorted(SAMPLE.glob("*.png"))[:4]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    broken = folder / f"{sorted(SAMPLE.glob('*.png'))[0].stem}_0064x0064_sd.npz"
    broken.write_bytes(b"PK\x03\x04 cut short")
    assert train(folder.parent, tmp_path / "memory", "--cache_latents") == 0
    assert train(folder.parent, tmp_path / "disk", "--cache_latents_to_disk") == 0
    assert same(lora(tmp_path / "disk"), lora(tmp_path / "memory"))
    assert np.load(broken)["latents"].shape == (4, 8, 8)
    assert not list(folder.glob(".*.tmp"))

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    for cache in folder.glob("*.npz"):
        cache.unlink()
    monkeypatch.setattr(np, "savez", refused)
    assert train(folder.parent, tmp_path / "read-only", "--cache_latents_to_disk") == 2
    err = capsys.readouterr().err
    assert "cannot write the latent cache" in err and "Permission denied" in err and "--cache_latents without" in err


# --- mask folders (conditioning_data_dir with --masked_loss) ---------------------------------------------------


def _masked_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Six sample images two ways: RGBA whose alpha is the mask, and RGB with the mask as the red channel of an image
    of the same name in a mask folder. The masked-out part is white in both, so the VAE sees the same pixels (an
    alpha image is composited on white) and only the source of the mask differs."""
    alpha_dir, rgb_dir, mask_dir = tmp_path / "alpha", tmp_path / "rgb", tmp_path / "masks 蒙版"
    for folder in (alpha_dir, rgb_dir, mask_dir):
        folder.mkdir()
    for index, image in enumerate(sorted(SAMPLE.glob("*.png"))[:6]):
        rgb = Image.open(image).convert("RGB")
        mask = Image.new("L", rgb.size, 0)
        mask.paste(255, (0, 0, 20 + 6 * index, rgb.size[1]))  # a left part, wider image by image: flips show
        white = Image.composite(rgb, Image.new("RGB", rgb.size, "white"), mask)
        rgba = white.copy()
        rgba.putalpha(mask)
        rgba.save(alpha_dir / image.name)
        white.save(rgb_dir / image.name)
        black = Image.new("L", rgb.size, 0)
        Image.merge("RGB", (mask, black, black)).save(mask_dir / f"{image.stem}.png")
        for folder in (alpha_dir, rgb_dir):
            shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    return alpha_dir, rgb_dir, mask_dir


def _masked_run(tmp_path: Path, name: str, subset: str, *extra: str) -> int:
    config = tmp_path / f"{name}.toml"
    config.write_text(f'[general]\nresolution = 64\ncaption_extension = ".txt"\nflip_aug = true\n[[datasets]]\n'
                      f'batch_size = 2\n[[datasets.subsets]]\n{subset}\n', encoding="utf-8")
    return train_main(["--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--dataset_config", str(config),
                       "--output_dir", str(tmp_path / name), "--output_name", "star", "--network_dim", "4",
                       "--learning_rate", "1e-3", "--max_train_epochs", "1", "--seed", "5", "--masked_loss", *extra])


@pytest.mark.parametrize("caching", [(), ("--cache_latents_to_disk",)], ids=["per-batch", "cached"])
def test_a_mask_folder_masks_the_loss_as_the_same_mask_in_the_alpha_channel_does(tmp_path, caching):
    """The Kohya GUI's masked-loss datasets: ``conditioning_data_dir`` per subset, its images' red channel the mask."""
    alpha_dir, rgb_dir, mask_dir = _masked_pair(tmp_path)
    assert _masked_run(tmp_path, "alpha", f'image_dir = "{alpha_dir.as_posix()}"\nalpha_mask = true', *caching) == 0
    folder_subset = f'image_dir = "{rgb_dir.as_posix()}"\nconditioning_data_dir = "{mask_dir.as_posix()}"'
    assert _masked_run(tmp_path, "folder", folder_subset, *caching) == 0
    assert same(lora(tmp_path / "folder"), lora(tmp_path / "alpha"))
    if caching:  # the second run reads its latents back; the masks still come from the folder, not the cache
        assert all("alpha_mask" not in np.load(c).files for c in rgb_dir.glob("*_sd.npz"))
        assert _masked_run(tmp_path, "again", folder_subset, *caching) == 0
        assert same(lora(tmp_path / "again"), lora(tmp_path / "alpha"))
    with safe_open(str(tmp_path / "folder" / "star.safetensors"), "pt") as handle:
        subsets = json.loads(handle.metadata()["ss_datasets"])[0]["subsets"]
    assert subsets[0]["conditioning_data_dir"] == "masks 蒙版" and subsets[0]["image_dir"] == "rgb"


def test_images_without_a_mask_in_the_mask_folder_are_named_before_any_work(tmp_path, capsys):
    _, rgb_dir, mask_dir = _masked_pair(tmp_path)
    removed = sorted(mask_dir.iterdir())[0]
    removed.unlink()
    subset = f'image_dir = "{rgb_dir.as_posix()}"\nconditioning_data_dir = "{mask_dir.as_posix()}"'
    assert _masked_run(tmp_path, "out", subset) == 2
    error = capsys.readouterr().err
    assert f"no mask for 1 of the images in {rgb_dir}" in error and removed.name in error
    events = tmp_path / "out" / "star.events.jsonl"
    assert "caching latents" not in (events.read_text(encoding="utf-8") if events.exists() else "")


def test_a_damaged_mask_is_named_before_any_work(tmp_path, capsys):
    """A mask says which pixels are learnt; one cut short must not stop the run mid-epoch (or train unmasked)."""
    _, rgb_dir, mask_dir = _masked_pair(tmp_path)
    damaged = sorted(mask_dir.iterdir())[1]
    size = Image.open(damaged).size
    Image.fromarray(np.random.default_rng(0).integers(0, 256, size[::-1], dtype=np.uint8), "L").save(damaged)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # the header reads, the pixels do not
    subset = f'image_dir = "{rgb_dir.as_posix()}"\nconditioning_data_dir = "{mask_dir.as_posix()}"'
    assert _masked_run(tmp_path, "out", subset) == 2
    error = capsys.readouterr().err
    assert f"conditioning_data_dir {mask_dir}: 1 masks cannot be read" in error and f"{damaged} is truncated" in error
    events = tmp_path / "out" / "star.events.jsonl"
    assert "caching latents" not in (events.read_text(encoding="utf-8") if events.exists() else "")


def test_a_metadata_entry_with_a_fresh_latent_cache_trains_from_it_when_its_picture_no_longer_reads(tmp_path):
    """sd-scripts never opens the picture of a metadata entry whose cache is fresh: the header read added for SDXL's
    original size skipped it where its header no longer read (damaged, or moved to a slow disk and replaced by a stub)."""
    from lora_trainer.dataset import buckets as B
    from lora_trainer.dataset.buckets import BucketSettings
    from lora_trainer.dataset.layouts import ImageEntry
    from lora_trainer.errors import UserError
    from lora_trainer.training.data import _sized_image

    picture = tmp_path / "photo.png"
    picture.write_bytes(b"not a picture any more")
    cache = tmp_path / "photo_0080x0064_sd.npz"
    np.savez(cache, latents=np.zeros((4, 8, 8), dtype=np.float32))
    os.utime(picture, (cache.stat().st_mtime - 60,) * 2)  # the cache is newer than the picture
    settings = BucketSettings((64, 64), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=8)
    size, choice = _sized_image(ImageEntry(picture, "zkstar", image_size=(80, 64)), settings, "sd")
    assert size == (80, 64) and choice.bucket == B.select_bucket((80, 64), settings).bucket
    assert isinstance(_sized_image(ImageEntry(picture, "zkstar"), settings, "sd"), UserError)  # no size listed: skipped
