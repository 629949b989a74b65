"""Presets and VRAM tiers fill options the trainer accepts; preset files and Kohya TOML round-trip."""

from __future__ import annotations

import pytest

from lora_trainer.app import presets
from lora_trainer.app.form import ALGORITHMS, form_to_options, parse_extra_options
from lora_trainer.errors import UserError
from lora_trainer.networks.spec import spec_from_kohya
from lora_trainer.training.options import options_from, read_config_file

PATHS = {"pretrained_model_name_or_path": "base.safetensors", "train_data_dir": "dataset"}


@pytest.mark.parametrize("name", list(presets.PRESETS))
@pytest.mark.parametrize("tier", [presets.NO_TIER, *presets.VRAM_TIERS])
def test_every_preset_and_tier_is_a_valid_run(name, tier):
    for sdxl in (False, True):
        options = options_from({**presets.preset_options(name, tier, sdxl), **PATHS})
        if tier in ("6 GB", "8 GB"):
            assert options.gradient_checkpointing and options.optimizer_type == "AdamW8bit"
            assert options.train_batch_size == (2 if tier == "8 GB" and not sdxl else 1)
        if sdxl:  # its native size; no clip skip (ignored there); a VAE that does not overflow in fp16
            assert options.resolution in ("640", "1024") and options.clip_skip is None
            assert options.no_half_vae == (options.mixed_precision == "fp16")


@pytest.mark.parametrize("name", list(presets.PRESETS))
@pytest.mark.parametrize("tier", list(presets.VRAM_TIERS))
def test_sdxl_tiers_fit_their_card_by_the_estimate_and_are_accepted_before_queueing(name, tier):
    """The 6 GB tier estimated 6.8–7.2 GiB, so Validate always said it was above 6 GB, and its advice (cache the text
    encoders' outputs) was refused with the presets' shuffled captions, only once the model had loaded."""
    from lora_trainer.app.estimate import vram_gib
    from lora_trainer.tiny_model.build import TINY_MODEL_PATH
    from lora_trainer.tiny_model.demo import SAMPLE_DATASET
    from lora_trainer.training.data import dataset_group
    from lora_trainer.training.trainer import check_before_queueing

    options = options_from({**presets.preset_options(name, tier, sdxl=True), "device": "cpu",
                            "pretrained_model_name_or_path": str(TINY_MODEL_PATH), "train_data_dir": str(SAMPLE_DATASET)})
    assert vram_gib(options, "sdxl") <= presets.tier_gib(tier)
    small = tier in ("6 GB", "8 GB", "12 GB")
    assert (options.fp8_base, options.cache_text_encoder_outputs, options.network_train_unet_only) == (small,) * 3
    check_before_queueing(options, dataset_group(options))  # the tiny model is SD1: the datasets' captions are checked


@pytest.mark.parametrize("sdxl", [False, True])
@pytest.mark.parametrize("tier", list(presets.VRAM_TIERS))
def test_every_tier_leaves_a_tenth_of_its_card_free_by_the_estimate(tier, sdxl):
    """The rule the tiers are made by: a desktop and other programs take about a tenth of the card (a 6 GB card under
    Windows has ≈ 5.3–5.6 GiB free), and SDXL's 6 GB tier was estimated at 6.0 GiB, its 16 GB one at 14.5."""
    from lora_trainer.app.estimate import vram_gib

    for name in presets.PRESETS:
        options = options_from({**presets.preset_options(name, tier, sdxl), **PATHS})
        estimated = vram_gib(options, "sdxl" if sdxl else "sd1")
        assert estimated <= presets.USABLE_SHARE * presets.tier_gib(tier), \
            f"{name} on {tier} ({'SDXL' if sdxl else 'SD1'}): {estimated} GiB"


@pytest.mark.parametrize("sdxl", [False, True])
def test_a_larger_tier_trains_more_than_the_one_below(sdxl):
    """SD1's 6 GB and 8 GB tiers were the same options: an 8 GB card trained at 6 GB's batch 1."""
    tiers = list(presets.VRAM_TIERS)
    for name in presets.PRESETS:
        for smaller, larger in zip(tiers, tiers[1:]):
            assert presets.preset_options(name, smaller, sdxl) != presets.preset_options(name, larger, sdxl), (smaller, larger)
    if not sdxl:
        assert presets.preset_options("character", "8 GB")["train_batch_size"] == 2


def test_sdxl_at_6_gb_keeps_the_presets_alpha_scale_at_rank_4_and_says_what_it_gives_up():
    options = presets.preset_options("character", "6 GB", sdxl=True)
    assert (options["network_dim"], options["network_alpha"], options["resolution"]) == (4, 2, "640")
    assert "shuffle_caption" not in options  # cached captions cannot be shuffled
    assert ("On 6 GB, SDXL trains at 640 px (its native size is 1024) and rank 4 at most"
            in presets.guidance("character", "6 GB", sdxl=True))
    assert presets.guidance("character", "6 GB") == presets.PRESETS["character"].guidance  # SD1 gives up nothing


def test_strength_guidance_matches_what_users_expect():
    weights = {name: preset.preferred_weight for name, preset in presets.PRESETS.items()}
    assert weights["character"] == 0.7 and weights["style"] == 0.45 and weights["object"] >= 1
    assert weights["clothing"] < weights["character"]
    assert "0.6–0.8" in presets.PRESETS["character"].guidance and "0.4–0.5" in presets.PRESETS["style"].guidance


def test_sd1_keeps_its_text_encoder_on_the_smallest_tier_and_sdxl_trains_its_unet_only():
    """SD1's text encoder costs ≈ 0.1 GiB at 6 GB (3.4 GiB estimated against 3.3): the tier gave it up for nothing."""
    from lora_trainer.app.estimate import vram_gib

    options = presets.preset_options("character", "6 GB")
    assert not options.get("network_train_unet_only") and options["text_encoder_lr"] == [5e-5]
    assert vram_gib(options_from({**options, **PATHS})) <= 6
    sdxl = presets.preset_options("character", "6 GB", sdxl=True)
    assert sdxl["network_train_unet_only"] and "text_encoder_lr" not in sdxl


def test_unknown_preset_or_tier_is_a_user_error():
    with pytest.raises(UserError, match="preset"):
        presets.preset_options("portrait")
    with pytest.raises(UserError, match="VRAM tier"):
        presets.preset_options("style", "4 GB")


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_each_algorithm_becomes_sd_scripts_network_options(algorithm):
    options = form_to_options({**PATHS, "checkpoint": "base.safetensors", "dataset": "d", "algorithm": algorithm,
                               "network_dim": 8, "network_alpha": 4}, "concept")
    spec = spec_from_kohya(options["network_module"], options["network_dim"], options["network_alpha"], options.get("network_args"))
    expected = {"LoRA": "lora", "LoCon": "lora", "LoHa": "loha", "LoKr": "lokr", "DyLoRA": "dylora", "DoRA": "lora"}[algorithm]
    assert spec.algorithm == expected
    assert spec.dora == (algorithm == "DoRA")
    assert (spec.conv_dim is not None and spec.conv_dim > 0) == (algorithm in ("LoCon", "LoHa", "LoKr"))


@pytest.mark.parametrize("dim, unit", [(8, 4), (6, 3), (5, 1)])
def test_dylora_from_the_form_gets_a_unit_that_divides_its_rank(dim, unit):
    options = form_to_options({**PATHS, "checkpoint": "base.safetensors", "dataset": "d", "algorithm": "DyLoRA",
                               "network_dim": dim}, "concept")
    assert spec_from_kohya(options["network_module"], dim, 1, options["network_args"]).unit == unit


def test_form_overrides_the_preset_and_the_advanced_box_overrides_the_form():
    options = form_to_options({"checkpoint": "m.safetensors", "dataset": "d", "epochs": "3", "network_dim": 4, "text_encoder_lr": 0,
                               "resolution": "64", "extra": "noise_offset = 0.05\nnetwork_dim = 2"}, "style", "24 GB")
    assert options["max_train_epochs"] == 3 and options["network_dim"] == 2 and options["noise_offset"] == 0.05
    assert options["network_train_unet_only"] and "text_encoder_lr" not in options
    assert options["min_bucket_reso"] == 64  # the bucket range follows a small resolution
    assert options["train_batch_size"] == 4  # from the tier
    options_from(options)


def test_advanced_box_errors_name_the_box():
    with pytest.raises(UserError, match="Advanced options"):
        parse_extra_options("noise_offset = ")
    assert parse_extra_options('{"seed": 3}') == {"seed": 3}
    with pytest.raises(UserError, match="whole number"):
        form_to_options({"epochs": "2.5"}, "style")


def test_preset_file_round_trip(tmp_path):
    source = presets.PresetFile("My character", presets.preset_options("character"), 0.7, "Use at 0.7.")
    path = presets.write_preset_file(source, tmp_path / "mine.preset.toml")
    loaded = presets.read_preset_file(path)
    assert loaded.options == source.options and loaded.preferred_weight == 0.7 and loaded.title == "My character"


def test_broken_preset_file_says_so(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[options]\nnetwork_dimm = 4\n", encoding="utf-8")
    with pytest.raises(UserError, match="did you mean network_dim"):
        presets.read_preset_file(path)


def test_kohya_toml_import_export_round_trip(tmp_path):
    kohya = tmp_path / "kohya.toml"
    kohya.write_text('[model_arguments]\npretrained_model_name_or_path = "base.safetensors"\n'
                     '[dataset_arguments]\ntrain_data_dir = "train"\nresolution = "512,512"\nshuffle_caption = true\n'
                     '[training_arguments]\nmax_train_epochs = 6\noptimizer_type = "AdamW8bit"\n'
                     '[network_arguments]\nnetwork_module = "networks.lora"\nnetwork_dim = 16\nnetwork_alpha = 8\n', encoding="utf-8")
    imported = presets.import_kohya_toml(kohya)
    exported = presets.export_kohya_toml(imported, tmp_path / "out.toml")
    assert read_config_file(exported) == imported
    command = presets.sd_scripts_command(imported)[0]
    assert command.startswith("accelerate launch train_network.py") and "--network_dim 16" in command
    assert presets.sd_scripts_command(imported, sdxl=True)[0].startswith("accelerate launch sdxl_train_network.py")


def test_kohya_dataset_config_imports_as_dataset_config(tmp_path):
    dataset = tmp_path / "dataset.toml"
    dataset.write_text('[general]\nshuffle_caption = true\n[[datasets]]\nresolution = 512\n[[datasets.subsets]]\n'
                       'image_dir = "img"\nnum_repeats = 10\n', encoding="utf-8")
    assert presets.import_kohya_toml(dataset) == {"dataset_config": str(dataset.resolve())}


def test_a_text_encoder_rate_in_advanced_trains_the_text_encoder_though_the_forms_field_is_0():
    """Advanced wins over the form: its rate was applied while the field's 0 kept the text encoder untrained."""
    form = {**PATHS, "checkpoint": "base.safetensors", "dataset": "d", "text_encoder_lr": 0}
    assert form_to_options(form, "character")["network_train_unet_only"] is True
    options = form_to_options({**form, "extra": "text_encoder_lr = 5e-5"}, "character")
    assert options["text_encoder_lr"] == 5e-5 and options["network_train_unet_only"] is False


def test_advanced_text_encoder_only_wins_over_an_sdxl_tiers_unet_only():
    """SDXL 8 GB trains the UNet only; asking for the text encoder only in Advanced was refused ("--network_train_unet_only
    and --network_train_text_encoder_only exclude each other"), the tier's UNet-only having been decided before
    Advanced was read."""
    options = form_to_options({"checkpoint": "m.safetensors", "dataset": "d", "text_encoder_lr": 5e-5,
                               "extra": "network_train_text_encoder_only = true"}, "character", "8 GB", sdxl=True)
    assert options["network_train_text_encoder_only"] is True and not options.get("network_train_unet_only")
    assert form_to_options({"checkpoint": "m.safetensors", "dataset": "d", "text_encoder_lr": 5e-5}, "character", "8 GB",
                           sdxl=True)["network_train_unet_only"] is True


def test_the_presets_shuffled_captions_come_back_when_an_sdxl_tiers_caching_gives_way():
    """The SDXL 8 GB tier encodes captions once and so sets the preset's shuffle_caption aside; following Validate's
    advice to train the text encoders (network_train_unet_only = false) dropped the caching but kept the shuffle off."""
    form = {"checkpoint": "m.safetensors", "dataset": "d", "text_encoder_lr": 5e-5}
    cached = form_to_options(form, "character", "8 GB", sdxl=True)
    assert cached["cache_text_encoder_outputs"] is True and not cached.get("shuffle_caption")
    trained = form_to_options({**form, "extra": "network_train_unet_only = false"}, "character", "8 GB", sdxl=True)
    assert "cache_text_encoder_outputs" not in trained
    assert trained.get("shuffle_caption") == form_to_options(form, "character", "16 GB", sdxl=True).get("shuffle_caption") is True
