"""The memory options as a user meets them in messages: WebUI switches typed here, options sd-scripts' LoRA scripts
do not run either, and the advice that follows an estimate above the card."""

from __future__ import annotations

import pytest

from lora_trainer.errors import UserError
from lora_trainer.training.options import options_from, parse_args

PATHS = {"pretrained_model_name_or_path": "base.safetensors", "train_data_dir": "dataset"}


def refusal(argv: list[str]) -> str:
    with pytest.raises(UserError) as refused:
        parse_args(["--pretrained_model_name_or_path", "base.safetensors", "--train_data_dir", "dataset", *argv])
    return str(refused.value)


@pytest.mark.parametrize("switch", ["--lowvram", "--medvram", "--medvram-sdxl"])
def test_the_webuis_memory_switches_are_named_as_such_with_the_trainers_own(switch):
    """"did you mean --lowram?" sent a WebUI habit to an option about system RAM."""
    message = refusal([switch])
    assert f"unknown option(s) {switch} (is a switch of the Stable Diffusion WebUI, not of training: here " \
           "--gradient_checkpointing, --cache_latents, --mixed_precision fp16 and --fp8_base lower the GPU memory, " \
           "and the Train tab's GPU memory tier sets them for a card's size)" in message
    assert "lowram" not in message


def test_a_webui_switch_in_a_file_or_beside_a_typo_keeps_each_ones_hint():
    with pytest.raises(UserError) as refused:
        options_from({**PATHS, "medvram": True, "learning_rat": 1e-4})
    assert "learning_rat (did you mean learning_rate?), medvram (is a switch of the Stable Diffusion WebUI" \
           in str(refused.value)


def test_cpu_offload_checkpointing_is_refused_without_sending_the_user_to_sd_scripts():
    """sd-scripts' SD1/SDXL UNet stops on it: its enable_gradient_checkpointing takes no cpu_offload."""
    message = refusal(["--gradient_checkpointing", "--cpu_offload_checkpointing"])
    assert "not supported: --cpu_offload_checkpointing (sd-scripts takes it for its Flux, SD3 and Lumina scripts; its " \
           "SD1/SDXL UNet stops on it" in message
    assert message.endswith("remove it to train here") and "run the same command with sd-scripts" not in message
    assert "run the same command with sd-scripts" in refusal(["--deepspeed"])  # which sd-scripts does run


def test_fused_backward_pass_runs_with_a_warning_as_sd_scripts_lora_scripts_leave_it_unused():
    """It was refused, though the refusal itself said sd-scripts' LoRA scripts take it and do nothing with it."""
    import torch

    from lora_trainer.networks.spec import NetworkSpec
    from lora_trainer.training import trainer

    options = options_from({**PATHS, "fused_backward_pass": True, "optimizer_type": "Adafactor"})
    warnings = trainer._option_warnings(options, NetworkSpec(), torch.device("cpu"), torch.float32)
    assert ("--fused_backward_pass has no effect here: it fuses a full fine-tune's optimizer step into the backward "
            "pass; for LoRA training it does nothing, as in sd-scripts (whose LoRA scripts take it with Adafactor only "
            "and leave it unused)") in warnings
    # sd-scripts stops on it with another optimizer (its get_optimizer asserts Adafactor): refused the same
    with pytest.raises(UserError, match="--fused_backward_pass: sd-scripts stops on it unless --optimizer_type Adafactor"):
        options_from({**PATHS, "fused_backward_pass": True, "optimizer_type": "AdamW"})


def test_a_refusal_of_several_options_says_which_ones_sd_scripts_would_run():
    """"--cpu_offload_checkpointing (…), --deepspeed; remove them to train here" lost --deepspeed's way out."""
    message = refusal(["--cpu_offload_checkpointing", "--deepspeed"])
    assert message.endswith("--deepspeed; remove them to train here (or remove --cpu_offload_checkpointing and run the "
                            "same command with sd-scripts)")
    assert refusal(["--deepspeed", "--zero_stage", "2"]).endswith(
        "not supported: --deepspeed, --zero_stage; remove them to train here (or run the same command with sd-scripts)")


def test_caching_the_text_encoders_outputs_with_shuffled_captions_is_refused_before_queueing():
    """It was refused as the trainer started, after the model had loaded (minutes for SDXL)."""
    from lora_trainer.tiny_model.build import TINY_MODEL_PATH
    from lora_trainer.tiny_model.demo import SAMPLE_DATASET
    from lora_trainer.training.data import dataset_group
    from lora_trainer.training.trainer import check_before_queueing

    options = options_from({"pretrained_model_name_or_path": str(TINY_MODEL_PATH), "train_data_dir": str(SAMPLE_DATASET),
                            "device": "cpu", "resolution": "64", "network_train_unet_only": True,
                            "cache_text_encoder_outputs": True,
                            "shuffle_caption": True, "caption_dropout_rate": 0.1})
    with pytest.raises(UserError) as refused:
        check_before_queueing(options, dataset_group(options))
    assert str(refused.value) == ("--cache_text_encoder_outputs encodes each caption once, but caption_dropout_rate, "
                                  "shuffle_caption change the captions between steps; turn them off (in the options or "
                                  "the dataset TOML) or drop the caching")
    assert refused.value.field == "caption_dropout_rate"


def test_the_memory_advice_says_which_caption_options_caching_turns_off():
    from lora_trainer.training.options import memory_advice

    advice = memory_advice(options_from({**PATHS, "shuffle_caption": True, "caption_tag_dropout_rate": 0.1}))
    assert ("--cache_text_encoder_outputs (with --network_train_unet_only, and --shuffle_caption, "
            "--caption_tag_dropout_rate off: cached captions cannot change between steps)") in advice
    assert "--cache_text_encoder_outputs (with --network_train_unet_only), " in memory_advice(options_from(PATHS))
