"""Steps, VRAM/time and warnings before Start, with sd-scripts' arithmetic (batches inside buckets)."""

from __future__ import annotations

import dataclasses

from lora_trainer.app.estimate import estimate, planned_steps, samples_per_bucket, vram_gib, warnings_for
from lora_trainer.dataset.health import HealthSettings, check_dataset
from lora_trainer.tiny_model.demo import SAMPLE_DATASET
from lora_trainer.training.options import options_from

BASE = {"pretrained_model_name_or_path": "m", "train_data_dir": "d"}


def options(**values):
    return options_from({**BASE, **values})


def test_steps_round_up_per_bucket_and_follow_repeats_and_epochs():
    # two buckets of 10×3 and 5×3 samples at batch 4: ceil(30/4) + ceil(15/4) = 8 + 4 = 12 per epoch
    per_epoch, epochs, total = planned_steps([30, 15], options(train_batch_size=4, max_train_epochs=5))
    assert (per_epoch, epochs, total) == (12, 5, 60)
    per_epoch, _, _ = planned_steps([5, 5, 5], options(train_batch_size=4))
    assert per_epoch == 6  # each bucket's short last batch is its own step: 3 × ceil(5/4), not ceil(15/4) = 4


def test_gradient_accumulation_and_max_steps():
    per_epoch, epochs, total = planned_steps([40], options(train_batch_size=2, gradient_accumulation_steps=4, max_train_steps=100))
    assert (per_epoch, epochs, total) == (5, 20, 100)


def test_sample_dataset_estimate_counts_repeats():
    report = check_dataset(SAMPLE_DATASET, HealthSettings(resolution=(64, 64), batch_size=4, min_bucket_reso=64))
    assert sum(samples_per_bucket(report)) == 16 * 10
    result = estimate(options(resolution="64", train_batch_size=4, max_train_epochs=2, min_bucket_reso=64, enable_bucket=True), report)
    assert (result.images, result.samples_per_epoch, result.epochs) == (16, 160, 2)
    assert result.total_steps == result.steps_per_epoch * 2 and result.steps_per_epoch >= 40
    assert "16 images" in result.lines()[0]


def test_warnings_users_need_before_waiting():
    text = " ".join(warnings_for(options(network_dim=4, network_alpha=8, resolution="500", train_batch_size=8,
                                         save_every_n_epochs=5), images=3, total_steps=20, epochs=2))
    assert "alpha 8 is above dim 4" in text
    assert "only 3 image(s)" in text
    assert "larger than the 3 images" in text
    assert "only 20 steps" in text
    assert "not divisible by the bucket step 64" in text
    assert "only the final file" in text
    assert warnings_for(options(network_dim=16, network_alpha=8, resolution="512"), images=20, total_steps=1000, epochs=10) == []


def test_memory_switches_lower_the_vram_estimate():
    plain = vram_gib(options(resolution="512", train_batch_size=2))
    saving = vram_gib(options(resolution="512", train_batch_size=2, gradient_checkpointing=True, mixed_precision="fp16",
                              cache_latents=True, network_train_unet_only=True))
    assert saving < plain / 2
    assert vram_gib(options(resolution="1024", mixed_precision="bf16"), "sdxl") > vram_gib(options(resolution="512", mixed_precision="bf16"))
    sdxl = options(resolution="1024", mixed_precision="bf16", gradient_checkpointing=True)
    assert vram_gib(dataclasses.replace(sdxl, fp8_base=True), "sdxl") < vram_gib(sdxl, "sdxl") - 2
