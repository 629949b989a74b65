"""The training loop pinned where a slip would train something else without a word: the step's loss against a hand
computation on the tiny model, and what one small run saves, samples, validates and says when."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.dataset.buckets import BucketChoice
from lora_trainer.dataset.config import SubsetConfig
from lora_trainer.models.checkpoint import load_checkpoint
from lora_trainer.models.configs import SD1
from lora_trainer.models.tokenizer import CLIPTokenizer
from lora_trainer.models.vae import DiagonalGaussian
from lora_trainer.tiny_model.build import TINY_MODEL_PATH
from lora_trainer.train_network import main as train_main
from lora_trainer.training.data import Batch, ImageRecord, build_training_data
from lora_trainer.training.events import EventLog, read_events
from lora_trainer.training.options import options_from
from lora_trainer.training.text import caption_chunks, caption_tokens
from lora_trainer.training.trainer import _training_step

TOKENIZER = CLIPTokenizer.default()
SAMPLE = Path(__file__).resolve().parents[1] / "lora_trainer" / "assets" / "sample-dataset" / "10_zkstar"


def train(dataset: Path, out: Path, *extra: str) -> int:
    return train_main([
        "--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", str(dataset),
        "--output_dir", str(out), "--output_name", "star", "--resolution", "64", "--train_batch_size", "1",
        "--network_dim", "4", "--network_alpha", "4", "--seed", "11", "--caption_extension", ".txt",
        "--cache_latents", "--max_data_loader_n_workers", "0", *extra])


@pytest.fixture(scope="module")
def four_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("four")
    (root / "1_zkstar").mkdir()
    for image in sorted(SAMPLE.glob("*.png"))[:4]:
        shutil.copy(image, root / "1_zkstar" / image.name)
        shutil.copy(image.with_suffix(".txt"), root / "1_zkstar" / image.with_suffix(".txt").name)
    return root


@pytest.fixture(scope="module")
def small_run(four_images, tmp_path_factory) -> Path:
    """4 images, one held out: 3 batches of 1 an epoch at 2 batches a step, so each epoch ends with a step of one
    batch (2 steps an epoch, 6 in 3 epochs). SGD, so that --max_grad_norm bounds how far the weights move."""
    out = tmp_path_factory.mktemp("small") / "out"
    prompts = out.parent / "prompts.txt"
    prompts.write_text("zkstar --w 64 --h 64 --s 1 --d 3\n", encoding="utf-8")
    assert train(four_images, out, "--gradient_accumulation_steps", "2", "--max_train_epochs", "3",
                 "--validation_split", "0.25", "--validate_every_n_epochs", "2", "--validate_every_n_steps", "4",
                 "--save_every_n_epochs", "1", "--save_every_n_steps", "3", "--save_state_on_train_end",
                 "--sample_prompts", str(prompts), "--sample_every_n_steps", "4", "--clip_skip", "2",
                 "--optimizer_type", "SGD", "--learning_rate", "1", "--unet_lr", "1", "--text_encoder_lr", "0.5",
                 "--lr_scheduler", "linear", "--lr_warmup_steps", "0.5", "--max_grad_norm", "1e-6",
                 "--logging_dir", str(out.parent / "logs")) == 0
    return out


def events_of(out: Path, kind: str) -> list[dict]:
    return [event for event in read_events(out / "star.events.jsonl")[0] if event["event"] == kind]


def test_a_steps_loss_is_the_hand_computed_one_with_its_timesteps_input_noise_clip_skip_mask_and_prior_weight():
    """sd-scripts' step by hand: noise, timesteps in [--min_timestep, --max_timestep), the input noised with noise +
    γ·more noise (the target stays the noise), the text encoder's penultimate layer at --clip_skip 2, the loss masked,
    averaged per image and multiplied by the regularisation image's prior_loss_weight."""
    torch.manual_seed(0)
    model = load_checkpoint(TINY_MODEL_PATH)
    config = model.config
    options = options_from({"pretrained_model_name_or_path": str(TINY_MODEL_PATH), "train_data_dir": "d",
                            "min_timestep": 300, "max_timestep": 310, "ip_noise_gamma": 0.5, "clip_skip": 2})
    latents = torch.randn(2, 4, 8, 8)
    mask = torch.ones(2, 64, 64)
    mask[1, :, :32] = 0  # the left half of the second image teaches nothing
    records = [ImageRecord(Path(f"{n}.png"), "", SubsetConfig("dreambooth"), 0, (64, 64),
                           BucketChoice((64, 64), (64, 64), 0.0), 1) for n in ("a", "b")]
    batch = Batch(records, [False, False], latents,
                  loss_weights=torch.tensor([1.0, 0.25]), masks=mask)
    captions = ["zkstar, red background", "a star"]
    data = SimpleNamespace(encode=lambda batch, vae, device, rows: batch,
                           captions_for=lambda batch, epoch, step, total, generator: captions)
    ours = _training_step(batch, 0, 0, 1, model, config, None, options, TOKENIZER, config.schedule.alphas_cumprod,
                          False, torch.Generator().manual_seed(7), torch.device("cpu"), torch.float32, data, False)

    draws = torch.Generator().manual_seed(7)
    x0 = latents * config.vae.scaling_factor  # the checkpoint's own (0.18215 for SD1, 0.457 for the tiny VAE)
    noise = torch.randn(x0.shape, generator=draws)
    timesteps = torch.randint(300, 310, (2,), generator=draws)
    more = torch.randn(x0.shape, generator=draws)
    abar = config.schedule.alphas_cumprod[timesteps].view(2, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * (noise + 0.5 * more)
    ids = torch.tensor([caption_chunks(c, TOKENIZER, TOKENIZER.eos_id, None)[0][0] for c in captions])
    with torch.no_grad():
        context = model.text_encoders[0](ids, skip_layers=1).hidden  # clip skip 2: the penultimate layer
        prediction = model.unet(noisy, timesteps, context)
    grid = torch.ones(2, 1, 8, 8)
    grid[1, :, :, :4] = 0
    expected = (((prediction - noise) ** 2) * grid).mean(dim=(1, 2, 3)) * torch.tensor([1.0, 0.25])
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-7)


def test_break_in_a_weighted_caption_is_a_word_of_weight_one_as_sd_scripts_reads_it():
    """sd-scripts' caption weighting knows no BREAK: the word is text at weight 1, not the WebUI's chunk break."""
    tokens, weights = caption_tokens("zkstar BREAK (red:1.2)", TOKENIZER, 75, weighted=True)
    plain = TOKENIZER.encode("zkstar BREAK red")
    assert tokens == plain
    assert weights == [1.0] * (len(plain) - len(TOKENIZER.encode("red"))) + [1.2] * len(TOKENIZER.encode("red"))


def test_a_chunk_of_padding_alone_starts_with_eos_for_encoders_that_pad_with_another_token_as_sd_scripts_gives_it():
    """--max_token_length 150/225 on SD2 and SDXL's second encoder (OpenCLIP pads with 0, not EOS): a short caption's
    later chunks are BOS, EOS, padding in sd-scripts (``<BOS> <PAD>`` becomes ``<BOS> <EOS>``), not BOS and padding
    alone. CLIP-L pads with EOS: unchanged."""
    star = TOKENIZER.encode("a red star")
    eos, bos = TOKENIZER.eos_id, TOKENIZER.bos_id
    ids, weights = caption_chunks("a red star", TOKENIZER, 0, 225)
    assert ids[0] == [bos, *star, eos, *[0] * (75 - len(star))]
    assert ids[1] == ids[2] == [bos, eos, *[0] * 75]
    assert weights[1] == [1.0] * 77
    long = ", ".join(["star"] * 40)  # 79 tokens: the second chunk holds the caption's end
    second = caption_chunks(long, TOKENIZER, 0, 150)[0][1]
    assert second[:6] == [bos, *TOKENIZER.encode(long)[75:], eos] and set(second[6:]) == {0}
    ids, _ = caption_chunks("a red star", TOKENIZER, eos, 150)  # CLIP-L: padding is EOS already
    assert ids[1] == [bos, *[eos] * 76]


def test_an_epoch_that_ends_inside_an_accumulation_still_steps_and_the_steps_say_their_epoch(small_run):
    """ceil(3 batches / 2) = 2 steps an epoch, as sd-scripts counts them: 6 steps in 3 epochs, each saying the epoch
    it is in (the live view and the console show it), the epochs ending at steps 2, 4 and 6."""
    steps = events_of(small_run, "step")
    assert [(e["step"], e["total"], e["epoch"]) for e in steps] == [
        (1, 6, 1), (2, 6, 1), (3, 6, 2), (4, 6, 2), (5, 6, 3), (6, 6, 3)]
    epochs = events_of(small_run, "epoch")
    assert [(e["epoch"], e["step"]) for e in epochs] == [(1, 2), (2, 4), (3, 6)]
    losses = [e["loss"] for e in steps]
    for number, epoch in enumerate(epochs):  # each epoch's average is its own steps' mean
        assert epoch["average"] == pytest.approx(sum(losses[2 * number : 2 * number + 2]) / 2, rel=1e-6)
    with safe_open(str(small_run / "star.safetensors"), "pt") as handle:
        assert (handle.metadata()["ss_steps"], handle.metadata()["ss_epoch"]) == ("6", "3")


def test_the_learning_rate_warms_up_over_a_share_of_all_steps_and_decays_each_part_at_its_own_rate(small_run):
    """--lr_warmup_steps 0.5 of 6 steps: 3 steps of warm-up, then linear decay to 0 at step 6. Each step reports the
    rate the next step trains at (as sd-scripts logs it after the scheduler's step): text encoder 0.5, UNet 1."""
    factors = [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3, 0]
    rates = [e["lr"] for e in events_of(small_run, "step")]
    assert rates == [pytest.approx([0.5 * f, 1.0 * f]) for f in factors]


def test_max_grad_norm_bounds_every_step_of_the_update(small_run):
    """SGD moves the weights by lr × gradient: with the gradient clipped to 1e-6, the LoRA up weights (zero at the
    start) move by at most Σ lr × 1e-6 over the run, whatever the loss asked for."""
    ups = [t for key, t in load_file(str(small_run / "star.safetensors")).items() if key.endswith("lora_up.weight")]
    moved = torch.cat([t.float().flatten() for t in ups]).norm()
    assert 0 < moved <= (1 / 3 + 2 / 3 + 1 + 2 / 3 + 1 / 3) * 1e-6 * 1.001


def test_files_are_saved_at_the_epochs_and_steps_asked_and_a_state_at_the_end(small_run):
    names = sorted(p.name for p in small_run.iterdir())
    assert [n for n in names if n.endswith(".safetensors")] == [
        "star-000001.safetensors", "star-000002.safetensors", "star-step00000003.safetensors",
        "star-step00000006.safetensors", "star.safetensors"]  # the last epoch is the final file, as in sd-scripts
    assert [n for n in names if n.endswith("-state")] == ["star-state"]  # --save_state_on_train_end
    saved = {Path(e["path"]).name: (e["epoch"], e["step"]) for e in events_of(small_run, "saved")}
    assert saved == {"star-000001.safetensors": (1, 2), "star-step00000003.safetensors": (1, 3),
                     "star-000002.safetensors": (2, 4), "star-step00000006.safetensors": (2, 6),
                     "star.safetensors": (3, 6)}


def test_samples_are_drawn_at_the_step_asked_with_the_runs_clip_skip(small_run):
    (sample,) = (small_run / "sample").iterdir()
    assert sample.name.startswith("star_000004_00_") and sample.name.endswith("_3.png")
    assert [(e["epoch"], e["step"]) for e in events_of(small_run, "sample")] == [(None, 4)]
    assert "Clip skip: 2" in Image.open(sample).info["parameters"]  # drawn as the captions are encoded


def test_validation_runs_every_second_epoch_and_at_the_step_asked_and_the_epoch_is_recommended_from_it(small_run):
    validations = events_of(small_run, "validation")
    assert [(e.get("epoch"), e["step"]) for e in validations] == [(None, 4), (2, 4)]
    # the same weights measured twice (step 4 ends epoch 2) give the same loss: fixed noise, comparable across epochs
    assert validations[0]["loss"] == validations[1]["loss"]
    end = events_of(small_run, "end")[0]
    assert end["recommended_epoch"] == 2 and "lowest validation loss" in end["reason"]
    with safe_open(str(small_run / "star.safetensors"), "pt") as handle:
        losses = json.loads(handle.metadata()["lora_trainer.losses"])
    assert list(losses["epoch_validation_loss"]) == ["2"] and list(losses["step_validation_loss"]) == ["4"]


def test_tensorboard_gets_sd_scripts_tags_with_the_validation_divergence_above_the_training_average(small_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = (small_run.parent / "logs").glob("*/network_train")
    logs = EventAccumulator(str(folder))
    logs.Reload()
    tags = set(logs.Tags()["scalars"])
    assert {"loss/current", "loss/average", "lr/textencoder", "lr/unet", "lr/group1", "loss/epoch_average"} <= tags
    assert "lr/group0" not in tags  # sd-scripts numbers the groups after the text encoder's
    assert [e.step for e in logs.Scalars("loss/epoch_average")] == [1, 2, 3]
    (validation,) = logs.Scalars("loss/validation/step_average")
    (divergence,) = logs.Scalars("loss/validation/step_divergence")
    average = next(e.value for e in logs.Scalars("loss/average") if e.step == 4)
    assert validation.step == divergence.step == 4
    assert divergence.value == pytest.approx(validation.value - average, rel=1e-5)


# --- the data plan -----------------------------------------------------------------------------------------------

class PoolingVAE(torch.nn.Module):
    """A stand-in VAE whose latent is the image averaged over 8×8 cells, without spread: the latent of a mirrored
    image is the mirrored latent, so which image was encoded shows."""

    config = SimpleNamespace(downscale=8, z_channels=4)

    def __init__(self):
        super().__init__()
        self.encoder, self.quant_conv = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)  # what a disk cache fingerprints

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        cells = torch.nn.functional.avg_pool2d(images.float(), 8)
        mean = torch.cat([cells, cells[:, :1]], dim=1)
        return DiagonalGaussian(torch.cat([mean, torch.full_like(mean, -30.0)], dim=1))


def plan(dataset: Path, *extra: tuple[str, object]):
    options = options_from({"pretrained_model_name_or_path": str(TINY_MODEL_PATH), "train_data_dir": str(dataset),
                            "resolution": "64", "caption_extension": ".txt", "train_batch_size": 1, **dict(extra)})
    return build_training_data(options, SD1, 11)


@pytest.fixture(scope="module")
def wide_images(tmp_path_factory) -> Path:
    """Two sample images stretched to 96×64 (not mirror-symmetric, not square)."""
    root = tmp_path_factory.mktemp("wide")
    (root / "1_zkstar").mkdir()
    for image in sorted(SAMPLE.glob("*.png"))[:2]:
        Image.open(image).convert("RGB").resize((96, 64)).save(root / "1_zkstar" / image.name)
        shutil.copy(image.with_suffix(".txt"), root / "1_zkstar" / image.with_suffix(".txt").name)
    return root


def test_cached_flip_latents_are_the_mirrored_images_encoding_in_sd_scripts_npz_beside_the_image(wide_images):
    """--flip_aug with --cache_latents_to_disk: each image's ``<stem>_<W>x<H>_sd.npz`` (W×H its original size) holds
    sd-scripts' keys, ``latents_flipped`` being the mirrored image encoded (not the latents mirrored)."""
    data = plan(wide_images, ("flip_aug", True), ("cache_latents", True), ("cache_latents_to_disk", True))
    data.cache_latents(PoolingVAE(), torch.device("cpu"), EventLog(None))
    for record in data.records:
        cache = record.path.with_name(f"{record.path.stem}_0096x0064_sd.npz")
        with np.load(cache) as npz:
            assert {"latents", "latents_flipped", "original_size", "crop_ltrb"} <= set(npz.files)
            assert npz["original_size"].tolist() == [96, 64] and npz["latents"].shape == (4, 8, 8)
            latents, flipped = torch.from_numpy(npz["latents"]), torch.from_numpy(npz["latents_flipped"])
        torch.testing.assert_close(flipped, latents.flip(-1), atol=1e-5, rtol=0)  # the mirrored image's encoding
        assert not torch.allclose(flipped, latents, atol=1e-3)
        torch.testing.assert_close(record.latents_flipped, flipped)


def test_a_flipped_batch_trains_the_flipped_images_cached_latents_and_its_mask_mirrored(wide_images):
    """With cached latents a flipped sample takes the latents the VAE gave the mirrored image (sd-scripts'
    ``latents_flipped``), never the unflipped latents mirrored; its loss mask is mirrored with it."""
    data = plan(wide_images, ("flip_aug", True), ("cache_latents", True), ("alpha_mask", True))
    for number, record in enumerate(data.records):  # what caching gave, told apart
        record.latents = torch.full((4, 8, 8), 2.0 * number)
        record.latents_flipped = torch.full((4, 8, 8), 2.0 * number + 1)
        record.mask = torch.zeros(64, 64)
        record.mask[:, :16] = 1  # the left quarter is learnt
    seen = set()
    for epoch in range(6):
        for batch in data.epoch_batches(epoch):
            for row, (record, flipped) in enumerate(zip(batch.records, batch.flips)):
                number = data.records.index(record)
                assert float(batch.latents[row].mean()) == 2.0 * number + flipped
                assert torch.equal(batch.masks[row], record.mask.flip(-1) if flipped else record.mask)
                seen.add(flipped)
    assert seen == {False, True}


def test_each_epoch_draws_its_own_order_and_a_caption_dropout_epoch_counts_from_1(four_images):
    """sd-scripts shuffles with seed + epoch, so epochs differ; --caption_dropout_every_n_epochs 2 empties every
    caption in epochs 2 and 4 (its epochs count from 1), not in the first."""
    data = plan(four_images, ("caption_dropout_every_n_epochs", 2))
    orders = {tuple(str(batch.records[0].path) for batch in data.epoch_batches(epoch)) for epoch in range(4)}
    assert len(orders) > 1
    batch = data.epoch_batches(0)[0]
    captions = [data.captions_for(batch, epoch, 0, 10, torch.Generator().manual_seed(1)) for epoch in range(4)]
    assert captions[1] == captions[3] == [""] and captions[0] == captions[2] == [batch.records[0].caption]


def test_ctrl_c_on_any_torchrun_process_stops_every_process(monkeypatch):
    """A signal reaches one rank (a Ctrl-C in its console, a SIGTERM to one process): every rank stops and saves
    together, whatever rank 0 read from the control file, instead of the others waiting on it for ever."""
    from lora_trainer.training import distributed

    world = distributed.World(rank=1, size=2)
    monkeypatch.setattr(distributed, "_all_reduce", lambda tensor: tensor)  # the sum over ranks: only this one's counts
    assert distributed.agree_on_command(world, None, signalled=True) == "stop"
    assert distributed.agree_on_command(world, None, signalled=False) is None


@pytest.mark.parametrize("options, parts, rates", [
    (("--network_train_unet_only",), {"lora_unet"}, 1),
    (("--text_encoder_lr", "0"), {"lora_unet"}, 1),  # sd-scripts: a text-encoder rate of 0 trains the UNet alone
    (("--network_train_text_encoder_only",), {"lora_te"}, 1),
    ((), {"lora_te", "lora_unet"}, 2),
])
def test_the_parts_asked_for_are_trained_and_saved_and_no_other(four_images, tmp_path, options, parts, rates):
    assert train(four_images, tmp_path, "--max_train_steps", "1", "--learning_rate", "1e-3", *options) == 0
    with safe_open(str(tmp_path / "star.safetensors"), "pt") as handle:
        assert {key.split("_", 2)[0] + "_" + key.split("_", 2)[1] for key in handle.keys()} == parts
    (step,) = events_of(tmp_path, "step")
    assert len(step["lr"]) == rates


def test_sdxls_pooled_text_is_the_first_chunks_when_captions_take_several_chunks():
    """--max_token_length 150/225 on SDXL: the second encoder's pooled output, which conditions SDXL's y, is the first
    chunk's, as sd-scripts takes it (``pool2[::chunks]``), not a later chunk's, which may hold nothing but padding."""
    from lora_trainer.models.configs import SDXL
    from lora_trainer.training.text import CaptionEncoding, encode_captions

    class Encoder(torch.nn.Module):  # its pooled output names the chunk's first token
        def __init__(self, width: int, pools: bool):
            super().__init__()
            self.width, self.pools, self.weight = width, pools, torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, skip_layers=0, final_norm=True):
            return SimpleNamespace(hidden=torch.zeros(*ids.shape, self.width),
                                   pooled=ids[:, 1:2].float() if self.pools else None)

    encoders = [Encoder(slot.config.width, pools=index == 1) for index, slot in enumerate(SDXL.text_encoders)]
    caption = ", ".join(["star"] * 40)  # 79 tokens: two chunks at --max_token_length 150
    context, pooled = encode_captions(SDXL, encoders, [caption, "a star"], TOKENIZER,
                                      CaptionEncoding(max_token_length=150))
    assert context.shape == (2, 152, 768 + 1280)
    assert pooled.flatten().tolist() == [TOKENIZER.encode(caption)[0], TOKENIZER.encode("a star")[0]]


def test_samples_every_second_epoch_are_drawn_at_its_end_and_the_steps_setting_gives_way_to_it(four_images, tmp_path):
    """--sample_every_n_epochs 2 over 3 epochs: one round, after epoch 2 (named e000002); with it, sd-scripts leaves
    --sample_every_n_steps out, and so does this run (said at the start)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zkstar --w 64 --h 64 --s 1\n", encoding="utf-8")
    assert train(four_images, tmp_path / "out", "--max_train_epochs", "3", "--train_batch_size", "2",
                 "--sample_prompts", str(prompts), "--sample_every_n_epochs", "2", "--sample_every_n_steps", "1") == 0
    assert [(e["epoch"], e["step"]) for e in events_of(tmp_path / "out", "sample")] == [(2, 4)]
    (sample,) = (tmp_path / "out" / "sample").iterdir()
    assert sample.name.startswith("star_e000002_00_")


def test_max_train_steps_ends_the_run_inside_an_epoch_at_that_step(four_images, tmp_path):
    """4 steps an epoch, --max_train_steps 5: a second epoch is begun and left after its first step, as sd-scripts
    ends at max_train_steps."""
    assert train(four_images, tmp_path, "--max_train_steps", "5", "--learning_rate", "1e-3") == 0
    assert [e["step"] for e in events_of(tmp_path, "step")] == [1, 2, 3, 4, 5]
    with safe_open(str(tmp_path / "star.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_steps"] == "5"


def test_max_validation_steps_counts_batches_of_the_training_batch_size():
    """--max_validation_steps 1 with --train_batch_size 2 measures two held-out images, as sd-scripts' validation
    loader takes a batch of them, not one."""
    from lora_trainer.training.trainer import _validation_loss

    model = load_checkpoint(TINY_MODEL_PATH)
    config = model.config
    records = [ImageRecord(Path(f"{n}.png"), "zkstar", SubsetConfig("dreambooth"), 0, (64, 64),
                           BucketChoice((64, 64), (64, 64), 0.0), 1, latents=torch.randn(4, 8, 8)) for n in "abc"]
    data = SimpleNamespace(validation=records, validation_seed=5, validation_captions=lambda total: ["zkstar"] * 3)

    def measured(**values) -> float:
        options = options_from({"pretrained_model_name_or_path": str(TINY_MODEL_PATH), "train_data_dir": "d", **values})
        return _validation_loss(data, model, config, options, TOKENIZER, config.schedule.alphas_cumprod, False,
                                torch.device("cpu"), torch.float32, total_steps=10)

    two = measured(max_validation_steps=1, train_batch_size=2)
    assert two == measured(max_validation_steps=2, train_batch_size=1)
    assert two != measured(max_validation_steps=1, train_batch_size=1)


def test_a_run_continued_inside_an_accumulating_epoch_skips_the_batches_its_steps_took(four_images, tmp_path):
    """--initial_step 3 --skip_until_initial_step at 2 batches a step (4 batches, 2 steps an epoch): the second epoch's
    first step took its first 2 batches, so the run trains batches 3 and 4 as step 4, then the third epoch."""
    assert train(four_images, tmp_path, "--gradient_accumulation_steps", "2", "--max_train_epochs", "3",
                 "--initial_step", "3", "--skip_until_initial_step", "--learning_rate", "1e-3") == 0
    assert [(e["step"], e["epoch"]) for e in events_of(tmp_path, "step")] == [(4, 2), (5, 3), (6, 3)]


def test_regularisation_images_are_repeated_until_an_epoch_holds_as_many_as_training_images(four_images, tmp_path):
    """sd-scripts' balancing: 4 training samples an epoch and 2 regularisation images give each of those 2 repeats,
    so an epoch is 8 batches of 1, half of them regularisation at --prior_loss_weight."""
    (tmp_path / "reg" / "1_zkstar").mkdir(parents=True)
    for image in sorted(SAMPLE.glob("*.png"))[-2:]:
        shutil.copy(image, tmp_path / "reg" / "1_zkstar" / image.name)
    data = plan(four_images, ("reg_data_dir", str(tmp_path / "reg")), ("prior_loss_weight", 0.5))
    assert data.batches_per_epoch == 8 and [r.repeats for r in data.reg] == [2, 2]
    weights = sorted(float(batch.loss_weights[0]) for batch in data.epoch_batches(0))
    assert weights == [0.5] * 4 + [1.0] * 4


# --- what the VAE and the UNet are given ---------------------------------------------------------------------------

def test_an_uncached_flipped_sample_is_the_mirrored_image_in_the_vaes_range(tmp_path):
    """Without cached latents flip_aug mirrors the pixels before the VAE, which takes them in [-1, 1]."""
    (tmp_path / "1_halves").mkdir()
    halves = np.zeros((64, 64, 3), dtype=np.uint8)
    halves[:, 40:] = 255  # black left, white right: not mirror-symmetric
    for name in ("a", "b"):
        Image.fromarray(halves).save(tmp_path / "1_halves" / f"{name}.png")
        (tmp_path / "1_halves" / f"{name}.txt").write_text("halves", encoding="utf-8")
    data = plan(tmp_path, ("flip_aug", True))
    vae, seen = PoolingVAE(), set()
    for epoch in range(6):
        for batch in data.epoch_batches(epoch):
            (record,), (flipped,) = batch.records, batch.flips
            latents = data.encode(batch, vae, torch.device("cpu")).latents[0]
            unflipped = Batch([record], [False], augment_seed=batch.augment_seed)
            plain = data.encode(unflipped, vae, torch.device("cpu")).latents[0]
            torch.testing.assert_close(latents, plain.flip(-1) if flipped else plain, atol=1e-5, rtol=0)
            assert float(plain[0, :, 0].mean()) == pytest.approx(-1.0, abs=1e-5)  # black is -1 to the VAE
            assert float(plain[0, :, -1].mean()) == pytest.approx(1.0, abs=1e-5)  # white is 1
            seen.add(flipped)
    assert seen == {False, True}


def test_sdxls_crop_conditioning_of_a_flipped_image_is_measured_from_the_other_side():
    """sd-scripts gives a flipped image the crop left ``bucket width − crop right``: an image fitted into its bucket
    with margins of 6 and 7 pixels has its crop at 6 unflipped and 7 flipped."""
    from lora_trainer.training.data import sdxl_sizes

    record = ImageRecord(Path("a.png"), "", SubsetConfig("dreambooth"), 0, (102, 64),
                         BucketChoice((64, 32), (64, 40), 0.0), 1)  # 51 of 64 pixels wide at the bucket's height
    assert sdxl_sizes(record, flipped=False) == ((64, 102), (0, 6), (32, 64))
    assert sdxl_sizes(record, flipped=True) == ((64, 102), (0, 7), (32, 64))


def test_sdxls_size_vector_is_pooled_text_then_original_size_crop_and_target_size():
    """sd-scripts' (and SDXL's) order of the y vector: original (h, w), crop (top, left), target (h, w)."""
    from lora_trainer.models.unet import timestep_embedding
    from lora_trainer.training.text import sdxl_vector

    pooled = torch.randn(1, 1280)
    y = sdxl_vector(pooled, [(640, 960)], [(16, 32)], [(512, 768)])
    assert torch.equal(y[:, :1280], pooled)
    sizes = timestep_embedding(torch.tensor([640, 960, 16, 32, 512, 768]), 256).flatten()
    torch.testing.assert_close(y[0, 1280:], sizes)


def test_cached_text_encoder_outputs_of_another_clip_skip_or_caption_are_encoded_again(tmp_path):
    """A caption's disk cache (``<image>_te_outputs.npz``) made at --clip_skip 1 is not the one a --clip_skip 2 run
    trains on, nor one of a caption edited since: each is encoded again."""
    from lora_trainer.training.text import CaptionEncoding, TextEncoderCache, encode_captions

    model = load_checkpoint(TINY_MODEL_PATH)
    image = tmp_path / "a.png"
    for clip_skip in (1, 2):
        cache = TextEncoderCache(model.config)
        cache.fill(model.text_encoders, {image: "zkstar"}, TOKENIZER, CaptionEncoding(clip_skip), to_disk=True)
        with torch.no_grad():
            expected, _ = encode_captions(model.config, model.text_encoders, ["zkstar"], TOKENIZER,
                                          CaptionEncoding(clip_skip))
        torch.testing.assert_close(cache.encode(["zkstar"])[0], expected)
    assert (tmp_path / "a_te_outputs.npz").is_file()
    edited = TextEncoderCache(model.config)  # the caption file edited since: its new words are encoded
    edited.fill(model.text_encoders, {image: "a red star"}, TOKENIZER, CaptionEncoding(2), to_disk=True)
    with torch.no_grad():
        expected, _ = encode_captions(model.config, model.text_encoders, ["a red star"], TOKENIZER, CaptionEncoding(2))
    torch.testing.assert_close(edited.encode(["a red star"])[0], expected)


# --- validation ------------------------------------------------------------------------------------------------------

def test_validation_draws_from_validation_seed_gives_each_image_its_own_noise_and_full_captions(four_images):
    """The held-out images' noise comes from --validation_seed (another --seed measures the same), each image draws
    its own (two copies of one image are two measurements), and captions are built as after token warm-up."""
    from lora_trainer.training.trainer import _validation_loss

    model = load_checkpoint(TINY_MODEL_PATH)
    config = model.config

    def loss(data) -> float:
        options = options_from({"pretrained_model_name_or_path": str(TINY_MODEL_PATH), "train_data_dir": "d"})
        return _validation_loss(data, model, config, options, TOKENIZER, config.schedule.alphas_cumprod, False,
                                torch.device("cpu"), torch.float32, total_steps=10)

    def held_out(seed: int):
        data = build_training_data(options_from({
            "pretrained_model_name_or_path": str(TINY_MODEL_PATH), "train_data_dir": str(four_images),
            "resolution": "64", "caption_extension": ".txt", "validation_split": 0.5, "validation_seed": 5,
            "token_warmup_min": 1, "token_warmup_step": 5}), SD1, seed)
        for record in data.validation:
            record.latents = torch.ones(4, 8, 8)
        return data

    first, second = held_out(11), held_out(12)
    assert [r.path for r in first.validation] == [r.path for r in second.validation]
    captions = first.validation_captions(10)
    assert captions == [r.caption for r in first.validation] and all(", " in c for c in captions)  # every tag
    assert loss(first) == loss(second)
    def copies(count: int):
        return SimpleNamespace(validation=first.validation[:1] * count, validation_seed=5,
                               validation_captions=lambda total: first.validation_captions(total)[:1] * count)

    assert loss(copies(2)) != loss(copies(1))  # the same picture twice is measured at two draws of noise


def test_images_with_and_without_flip_aug_in_one_bucket_are_cached_each_as_its_subset_asks(tmp_path):
    """--vae_batch_size 4 over two subsets in one bucket, one with flip_aug: the VAE takes them in separate batches,
    so the flipped subset's images get their mirrored latents (sd-scripts batches by bucket and flip_aug)."""
    for folder in ("a_plain", "b_flipped"):
        (tmp_path / folder).mkdir()
        for image in sorted(SAMPLE.glob("*.png"))[:2]:
            shutil.copy(image, tmp_path / folder / image.name)
            shutil.copy(image.with_suffix(".txt"), tmp_path / folder / image.with_suffix(".txt").name)
    config = tmp_path / "dataset.toml"
    config.write_text("[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = 64\nbatch_size = 1\n"
                      f"  [[datasets.subsets]]\n  image_dir = '{(tmp_path / 'a_plain').as_posix()}'\n"
                      f"  [[datasets.subsets]]\n  image_dir = '{(tmp_path / 'b_flipped').as_posix()}'\n"
                      "  flip_aug = true\n", encoding="utf-8")
    data = plan(tmp_path, ("dataset_config", str(config)), ("cache_latents", True), ("vae_batch_size", 4))
    data.cache_latents(PoolingVAE(), torch.device("cpu"), EventLog(None))
    assert sorted((r.path.parent.name, r.latents_flipped is not None) for r in data.records) == [
        ("a_plain", False), ("a_plain", False), ("b_flipped", True), ("b_flipped", True)]


def test_each_images_loss_is_recorded_under_its_own_name(monkeypatch):
    """The per-image losses behind the end event's highest-loss images: each sample's loss goes to its own image."""
    from lora_trainer.training import trainer
    from lora_trainer.training.distributed import World
    from lora_trainer.training.trainer import NetworkGradScaler, RunState, TrainingRun

    weight = torch.zeros(1, requires_grad=True)
    monkeypatch.setattr(trainer, "_training_step", lambda batch, *rest: batch.values * weight.sum() + batch.values)
    run = object.__new__(TrainingRun)  # no model, data or optimizer: what _learn reads is given
    run.__dict__.update(
        options=SimpleNamespace(gradient_accumulation_steps=1), world=World(), state=RunState(), total_steps=1,
        network=SimpleNamespace(set_multiplier=lambda multiplier: None),
        data=SimpleNamespace(network_multiplier=lambda batch: 1.0), model=None, tokenizer=None,
        config=SimpleNamespace(schedule=SimpleNamespace(alphas_cumprod=None), prediction_type="epsilon"),
        generator=None, device=torch.device("cpu"), weight_dtype=torch.float32, train_te=False, text_cache=None,
        scaler=NetworkGradScaler("cpu", enabled=False), _step_losses=[], _losses_since_step=[])
    for values in ([1.0, 2.0, 3.0], [4.0, 6.0, 5.0]):
        records = [SimpleNamespace(path=f"{name}.png") for name in "abc"]
        run._learn(SimpleNamespace(values=torch.tensor(values), records=records), 0)
    assert run.state.per_image_loss == {"a.png": [1.0, 4.0], "b.png": [2.0, 6.0], "c.png": [3.0, 5.0]}
    assert run._step_losses == [2.0, 5.0]


def test_a_recommended_last_epoch_is_the_final_file_and_not_said_to_be_missing(four_images, tmp_path, monkeypatch):
    """The final file holds the last epoch: recommending it needs no epoch file, and nothing is said about keeping
    one."""
    from lora_trainer.training import trainer
    from lora_trainer.training.evaluation import Recommendation

    monkeypatch.setattr(trainer, "recommend_epoch", lambda *losses: Recommendation(2, "the knee"))
    assert train(four_images, tmp_path, "--max_train_epochs", "2", "--train_batch_size", "4",
                 "--learning_rate", "1e-3") == 0
    end = events_of(tmp_path, "end")[0]
    assert (end["recommended_epoch"], end["reason"]) == (2, "the knee")
