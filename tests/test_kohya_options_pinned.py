"""A Kohya user's command line and --config_file TOML, pinned to sd-scripts' own reading of them (48d368fa,
train_network.py's setup_parser and train_util's read_config_from_file, verify_training_args, prepare_dataset_args):
every option both have with its name, type, default and store_true kind; the ones it has that this trainer refuses;
what --print-config and --print-kohya-command print; network_args as the network modules read them. Nothing here
loads a checkpoint."""

from __future__ import annotations

import re

import pytest

from lora_trainer.errors import UserError
from lora_trainer.train_network import main as train_main
from lora_trainer.training.options import parse_args

COMMAND = ["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "d"]
PRINTED_FOR_COMMAND = ["pretrained_model_name_or_path = 'm.safetensors'", "train_data_dir = 'd'"]

# sd-scripts' parser (train_network.py setup_parser, 48d368fa), the options this trainer shares with it.
# action="store_true"
SWITCHES = """console_log_simple v2 v_parameterization cache_info shuffle_caption enable_wildcard color_aug flip_aug
random_crop cache_latents cache_latents_to_disk skip_cache_check enable_bucket bucket_no_upscale alpha_mask save_state
save_state_on_train_end mem_eff_attn torch_compile xformers sdpa persistent_data_loader_workers gradient_checkpointing
full_fp16 full_bf16 fp8_base ddp_gradient_as_bucket_view ddp_static_graph log_config noise_offset_random_strength
ip_noise_gamma_random_strength zero_terminal_snr lowram highvram sample_at_first output_config masked_loss use_8bit_adam
use_lion_optimizer fused_backward_pass scale_v_pred_loss_like_noise_pred debiased_estimation_loss weighted_captions
no_metadata fp8_base_unet network_train_unet_only network_train_text_encoder_only dim_from_weights no_half_vae
skip_until_initial_step""".split()
# type=int, and the default
INTS = {"keep_tokens": 0, "vae_batch_size": 1, "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64,
        "token_warmup_min": 1, "caption_dropout_every_n_epochs": 0, "dataset_repeats": 1, "save_every_n_epochs": None,
        "save_every_n_steps": None, "save_n_epoch_ratio": None, "save_last_n_epochs": None,
        "save_last_n_epochs_state": None, "save_last_n_steps": None, "save_last_n_steps_state": None,
        "train_batch_size": 1, "max_token_length": None, "max_train_steps": 1600, "max_train_epochs": None,
        "max_data_loader_n_workers": 8, "seed": None, "gradient_accumulation_steps": 1, "ddp_timeout": None,
        "clip_skip": None, "multires_noise_iterations": None, "min_timestep": None, "max_timestep": None,
        "sample_every_n_steps": None, "sample_every_n_epochs": None, "lr_scheduler_num_cycles": 1,
        "lr_scheduler_timescale": None, "network_dim": None, "initial_epoch": None, "initial_step": None,
        "validation_seed": None, "validate_every_n_steps": None, "validate_every_n_epochs": None,
        "max_validation_steps": None}
# type=float
FLOATS = {"token_warmup_step": 0, "caption_dropout_rate": 0.0, "caption_tag_dropout_rate": 0.0, "noise_offset": None,
          "ip_noise_gamma": None, "multires_noise_discount": 0.3, "adaptive_noise_scale": None, "huber_c": 0.1,
          "huber_scale": 1.0, "prior_loss_weight": 1.0, "learning_rate": 2e-06, "max_grad_norm": 1.0,
          "lr_scheduler_power": 1, "lr_scheduler_min_lr_ratio": None, "min_snr_gamma": None, "v_pred_like_loss": None,
          "unet_lr": None, "network_alpha": 1, "network_dropout": None, "scale_weight_norms": None,
          "validation_split": 0.0}
# type=train_util.int_or_float: a step count, or a fraction of the run below 1
STEPS_OR_FRACTIONS = {"lr_warmup_steps": 0, "lr_decay_steps": 0}
# nargs="*"
TEXT_LISTS = ("optimizer_args", "lr_scheduler_args", "network_args", "base_weights")
NUMBER_LISTS = ("text_encoder_lr", "base_weights_multiplier")
# type=str (dataset_config: Path); lr_scheduler_type's "" is its not given
TEXTS = {"console_log_level": None, "console_log_file": None, "pretrained_model_name_or_path": None,
         "tokenizer_cache_dir": None, "metadata_title": None, "metadata_author": None, "metadata_description": None,
         "metadata_license": None, "metadata_tags": None, "metadata_usage_hint": None, "metadata_thumbnail": None,
         "metadata_merged_from": None, "metadata_trigger_phrase": None, "metadata_preprocessor": None,
         "metadata_is_negative_embedding": None, "train_data_dir": None, "caption_separator": ",",
         "caption_extension": ".caption", "keep_tokens_separator": "", "secondary_separator": None,
         "caption_prefix": None, "caption_suffix": None, "face_crop_aug_range": None, "resolution": None,
         "resize_interpolation": None, "reg_data_dir": None, "in_json": None, "output_dir": None, "output_name": None,
         "save_precision": None, "resume": None, "dynamo_backend": "inductor", "vae": None, "mixed_precision": "no",
         "logging_dir": None, "log_with": None, "log_prefix": None, "log_tracker_name": None, "loss_type": "l2",
         "huber_schedule": "snr", "sample_prompts": None, "sample_sampler": "ddim", "config_file": None,
         "optimizer_type": "", "lr_scheduler_type": None, "lr_scheduler": "constant", "dataset_config": None,
         "save_model_as": "safetensors", "network_weights": None, "network_module": None, "training_comment": None}
# the options of sd-scripts' parser this trainer does not offer (DeepSpeed, hub uploads, W&B, …)
NOT_OFFERED = """async_upload conditioning_data_dir cpu_offload_checkpointing dataset_class debug_dataset deepspeed
fp16_master_weights_and_gradients huggingface_path_in_repo huggingface_repo_id huggingface_repo_type
huggingface_repo_visibility huggingface_token log_tracker_config offload_optimizer_device offload_optimizer_nvme_path
offload_param_device offload_param_nvme_path resume_from_huggingface save_state_to_huggingface wandb_api_key
wandb_run_name zero3_init_flag zero3_save_16bit_model zero_stage""".split()


def printed_config(capsys, *words: str) -> list[str]:
    assert train_main([*words, "--print-config"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("given", ["4.0,2.0", "2.0", "2.0,3.0,4.0", "two,four"])
def test_a_face_crop_range_sd_scripts_stops_on_is_refused_before_any_work(given):
    """prepare_dataset_args asserts two numbers, the smaller first; a reversed range trained at one fixed scale here."""
    with pytest.raises(UserError, match=re.escape(f"--face_crop_aug_range {given!r}: give two numbers, the smaller "
                                                  'first ("2.0,4.0"')):
        parse_args([*COMMAND, "--face_crop_aug_range", given])
    assert parse_args([*COMMAND, "--face_crop_aug_range", "2,2"])[0].face_crop_aug_range == "2,2"


def test_a_config_file_with_sd_scripts_old_spelling_caption_extention_reads_it_as_sd_scripts_does(tmp_path):
    """--caption_extention is an option of sd-scripts' parser (its --output_config writes it from an old command), and
    prepare_dataset_args puts it in place of caption_extension."""
    config = tmp_path / "args.toml"
    config.write_text('caption_extension = ".caption"\ncaption_extention = ".txt"\n', encoding="utf-8")
    assert parse_args([*COMMAND, "--config_file", str(config)])[0].caption_extension == ".txt"


def test_a_command_giving_every_sd_scripts_default_prints_the_same_config_as_leaving_them_out(capsys):
    """--print-config prints what differs from the defaults: sd-scripts' own defaults, given as its command line gives
    them, differ in nothing."""
    given = [word for name, default in {**INTS, **FLOATS, **STEPS_OR_FRACTIONS, **TEXTS}.items()
             if default is not None and name not in ("pretrained_model_name_or_path", "train_data_dir")
             for word in (f"--{name}", str(default))]
    assert printed_config(capsys, *COMMAND, *given) == PRINTED_FOR_COMMAND
    options = parse_args(COMMAND)[0]
    for name in [*SWITCHES, *INTS, *FLOATS, *STEPS_OR_FRACTIONS, *TEXT_LISTS, *NUMBER_LISTS, *TEXTS]:
        expected = False if name in SWITCHES else {**INTS, **FLOATS, **STEPS_OR_FRACTIONS, **TEXTS}.get(name)
        if name not in ("pretrained_model_name_or_path", "train_data_dir"):
            assert getattr(options, name) == expected, name


@pytest.mark.parametrize("name", [*INTS, *FLOATS, *STEPS_OR_FRACTIONS])
def test_each_number_option_reads_as_sd_scripts_parser_types_it(name):
    """A whole number where sd-scripts has type=int (2.5 refused, naming the option), any number where float."""
    whole = "150" if name == "max_token_length" else "3"  # its choices: 75 (ours: the default), 150, 225
    if name in INTS:
        value = getattr(parse_args([*COMMAND, f"--{name}", whole])[0], name)
        assert (value, type(value)) == (int(whole), int)
        with pytest.raises(UserError, match=re.escape(f"argument --{name}: invalid int value: '2.5'")):
            parse_args([*COMMAND, f"--{name}", "2.5"])
    else:
        fraction = "0.25"  # in range for every float option (validation_split, rates, dropout …)
        extra = ["--noise_offset", "0.1"] if name == "adaptive_noise_scale" else []
        extra += {"lr_decay_steps": ["--lr_scheduler", "warmup_stable_decay"],
                  "lr_warmup_steps": ["--lr_scheduler", "constant_with_warmup"]}.get(name, [])
        value = getattr(parse_args([*COMMAND, *extra, f"--{name}", fraction])[0], name)
        assert (value, type(value)) == (0.25, float)


def test_the_list_options_take_every_value_after_them_and_number_lists_read_numbers():
    options = parse_args([*COMMAND, "--text_encoder_lr", "1e-4", "5e-5", "--base_weights_multiplier", "1", "0.5",
                          "--optimizer_args", "weight_decay=0.01", "betas=0.9,0.99",
                          "--network_args", "conv_dim=4", "conv_alpha=1"])[0]
    assert options.text_encoder_lr == [1e-4, 5e-5] and all(type(v) is float for v in options.text_encoder_lr)
    assert options.base_weights_multiplier == [1.0, 0.5]
    assert (options.optimizer_args, options.network_args) == (["weight_decay=0.01", "betas=0.9,0.99"],
                                                            ["conv_dim=4", "conv_alpha=1"])


@pytest.mark.parametrize("name", SWITCHES)
def test_every_sd_scripts_switch_is_on_when_named_and_takes_no_value(name, tmp_path):
    """store_true: --name alone turns it on; `--name True` is a value sd-scripts' parser stops on, and so is it here;
    in a --config_file it is true or false."""
    context = {"full_fp16": ["--mixed_precision", "fp16", "--optimizer_type", "Adafactor"],  # AdamW: NaN in fp16
               "full_bf16": ["--mixed_precision", "bf16"], "fp8_base": ["--mixed_precision", "bf16"],
               "fp8_base_unet": ["--mixed_precision", "bf16"], "masked_loss": ["--alpha_mask"],
               "fused_backward_pass": ["--optimizer_type", "Adafactor"],
               "dim_from_weights": ["--network_weights", str(tmp_path / "n.safetensors")]}.get(name, [])
    (tmp_path / "n.safetensors").write_bytes(b"")
    on = [*COMMAND, *context, f"--{name}"]
    if name == "output_config":
        assert parse_args([*on, "--config_file", str(tmp_path / "new")])[0].output_config is True
        return
    assert getattr(parse_args(on)[0], name) is True
    with pytest.raises(UserError, match=re.escape("unexpected value(s) True")):
        parse_args([*on, "True"])
    config = tmp_path / "args.toml"
    config.write_text(f"{name} = true\n", encoding="utf-8")
    assert getattr(parse_args([*COMMAND, *context, "--config_file", str(config)])[0], name) is True


@pytest.mark.parametrize("name", NOT_OFFERED)
def test_each_sd_scripts_option_this_trainer_does_not_offer_is_refused_as_such_by_name(name):
    """Not "unknown" with another option's name suggested: the user is told it is sd-scripts' and to remove it."""
    with pytest.raises(UserError) as refusal:
        parse_args([*COMMAND, f"--{name}"])
    said = str(refusal.value)
    assert said.startswith(f"command line: not supported: --{name}") and "unknown" not in said, said


def test_print_config_prints_the_file_and_the_command_line_resolved_as_python_values(capsys, tmp_path):
    """Sections flattened, the command line over the file, each value as the run reads it; `--print_config` (sd-scripts'
    spelling of every other option) is the same switch."""
    config = tmp_path / "run.toml"
    config.write_text('[model]\npretrained_model_name_or_path = "m.safetensors"\n[dataset]\ntrain_data_dir = "d"\n'
                      '[network]\nnetwork_dim = 16\nnetwork_args = ["conv_dim=4", "conv_alpha=1"]\n'
                      "[optimizer]\nlearning_rate = 1e-4\n", encoding="utf-8")
    printed = printed_config(capsys, "--config_file", str(config.with_suffix("")), "--learning_rate", "5e-4",
                             "--shuffle_caption", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "10%")
    assert sorted(printed) == sorted([*PRINTED_FOR_COMMAND, "network_dim = 16",
                                      "network_args = ['conv_dim=4', 'conv_alpha=1']", "learning_rate = 0.0005",
                                      "shuffle_caption = True",
                                      "lr_scheduler = 'constant_with_warmup'", "lr_warmup_steps = 0.1"])
    assert train_main(["--config_file", str(config), "--print_config"]) == 0
    assert "network_dim = 16" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("name, value", [("learning_rate", "nan"), ("network_alpha", "inf"), ("max_grad_norm", "-inf")])
def test_a_number_that_is_not_finite_is_refused_from_the_command_line_and_a_file(name, value, tmp_path):
    """Python's float() (sd-scripts' type=float) and TOML both read nan and inf; no option means them."""
    with pytest.raises(UserError, match=re.escape(f"command line: {name} = {float(value)!r} is not a number")):
        parse_args([*COMMAND, f"--{name}={value}"])
    config = tmp_path / "args.toml"
    config.write_text(f"{name} = {value}\n", encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(f"{config}: {name} = {float(value)!r} is not a number")):
        parse_args([*COMMAND, "--config_file", str(config)])


def test_a_fraction_in_a_file_where_sd_scripts_has_type_int_is_refused_naming_the_file(tmp_path):
    """A file's value skips sd-scripts' argparse types: its 2.5 would reach the code as it is; never cut to 2 here."""
    config = tmp_path / "args.toml"
    config.write_text("keep_tokens = 2.5\n", encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(f"{config}: keep_tokens = 2.5 is not a whole number")):
        parse_args([*COMMAND, "--config_file", str(config)])


@pytest.mark.parametrize("written", ["9007199254740993", '"9007199254740993"'])
def test_a_whole_number_beyond_a_floats_precision_is_that_number_to_the_last_digit(written, tmp_path):
    """sd-scripts' type=int reads --seed 9007199254740993 as it is (a float would be off by one): this trainer said it
    was "not a whole number"; a file's number, or its text, reads as the command line reads it."""
    assert parse_args([*COMMAND, "--seed", "9007199254740993"])[0].seed == 9007199254740993
    config = tmp_path / "args.toml"
    config.write_text(f"seed = {written}\n", encoding="utf-8")
    assert parse_args([*COMMAND, "--config_file", str(config)])[0].seed == 9007199254740993


def test_the_timesteps_sd_scripts_draws_from_are_0_to_1000_with_the_upper_bound_exclusive():
    """--max_timestep 1000 is sd-scripts' default written out (torch.randint(min, max)), never a mistake."""
    options = parse_args([*COMMAND, "--min_timestep", "0", "--max_timestep", "1000"])[0]
    assert (options.min_timestep, options.max_timestep) == (0, 1000)
    with pytest.raises(UserError, match=re.escape("--max_timestep 1001: give 1 to 1000 (it is exclusive)")):
        parse_args([*COMMAND, "--max_timestep", "1001"])


@pytest.mark.parametrize("given, said", [
    (["--full_bf16", "--mixed_precision", "fp16"], "--full_bf16 needs --mixed_precision bf16"),  # as train_network.py
    (["--fp8_base"], "--fp8_base needs --mixed_precision fp16 or bf16"),
    (["--dataset_repeats", "0"], "--dataset_repeats 0 must be 1 or more"),  # an --in_json dataset of no images
    (["--vae_batch_size", "0"], "--vae_batch_size 0: give at least 1 image per VAE batch"),  # range(0, n, 0) there
    (["--cache_latents_to_disk", "--random_crop"], "--random_crop changes the pixels every step, so latents cannot be "
                                                   "cached: drop --cache_latents/--cache_latents_to_disk"),
    (["--face_crop_aug_range", "2.0,4.0", "--enable_bucket"], "--face_crop_aug_range cuts the fixed resolution around "
                                                             "the face and does not work with --enable_bucket"),
    (["--masked_loss"], "--masked_loss needs masks: add --alpha_mask"),
    (["--dim_from_weights"], "--dim_from_weights takes the network's shape from --network_weights"),
    (["--cache_text_encoder_outputs"], "--cache_text_encoder_outputs needs --network_train_unet_only"),
])
def test_options_sd_scripts_stops_on_together_are_refused_before_any_work_naming_them(given, said):
    with pytest.raises(UserError, match=re.escape(said)):
        parse_args([*COMMAND, *given])


def test_a_run_without_a_model_or_a_dataset_names_the_options_that_give_them():
    with pytest.raises(UserError) as refusal:
        parse_args(["--network_dim", "8"])
    assert str(refusal.value) == ("no dataset: give --train_data_dir (folders named <repeats>_<name>), --in_json or "
                                  "--dataset_config; no base model: give --pretrained_model_name_or_path")


def test_the_to_disk_switch_of_latent_caching_turns_caching_on_as_sd_scripts_says_it_does(capsys):
    """train_util.verify_training_args: "cache_latents_to_disk is enabled, so cache_latents is also enabled"."""
    assert "cache_latents = True" in printed_config(capsys, *COMMAND, "--cache_latents_to_disk")


def test_the_printed_sd1_command_leaves_out_both_text_encoder_caching_switches(capsys):
    """--cache_text_encoder_outputs_to_disk is sdxl_train_network.py's too: train_network.py stops on either."""
    assert train_main([*COMMAND, "--network_train_unet_only", "--cache_text_encoder_outputs_to_disk",
                       "--print-kohya-command"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("accelerate launch train_network.py") and "--cache_text_encoder" not in printed.out
    assert ("note: --cache_text_encoder_outputs, --cache_text_encoder_outputs_to_disk left out: sd-scripts' "
            "train_network.py does not take them (sdxl_train_network.py only)") in printed.err


def test_an_unknown_network_module_is_refused_naming_the_ones_there_are():
    with pytest.raises(UserError, match=re.escape("--network_module 'networks.oft' is not supported; use one of "
                                                  "networks.lora, networks.dylora, lycoris.kohya")):
        parse_args([*COMMAND, "--network_module", "networks.oft"])


def test_a_network_arg_is_split_at_its_first_equals_sign_as_sd_scripts_splits_it(tmp_path):
    """train_network.py: key, value = net_arg.split("=", 1); a LyCORIS preset file in a folder named dim=8 is read."""
    from lora_trainer.networks.spec import spec_from_kohya

    preset = tmp_path / "dim=8" / "linear.toml"
    preset.parent.mkdir()
    preset.write_text('unet_target_module = ["Transformer2DModel"]\ntext_encoder_target_module = []\n',
                      encoding="utf-8")
    spec = spec_from_kohya("lycoris.kohya", 4, 1, ["algo=locon", f"preset={preset}"])
    assert spec.preset == str(preset) and dict(spec.network_args)["preset"] == str(preset)


def test_what_this_project_writes_as_toml_reads_in_a_strict_reader_too():
    """TOML forbids a raw DEL in a string: the toml package (sd-scripts') reads one anyway, Python's tomllib not."""
    import tomllib

    from lora_trainer import toml_text

    data = {"training_comment": "del\x7f tab\t", "network_args": ["a=\x7f"]}
    assert tomllib.loads(toml_text.dumps(data)) == data


def test_the_printed_sdxl_command_keeps_the_options_only_sdxl_train_network_takes():
    from lora_trainer.training.options import kohya_command, sd_scripts_notes

    options = parse_args([*COMMAND, "--network_train_unet_only", "--cache_text_encoder_outputs_to_disk"])[0]
    words = kohya_command(options, "sdxl_train_network.py", windows=False).split()
    assert {"--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk"} <= set(words)
    assert not [note for note in sd_scripts_notes(options, "sdxl_train_network.py") if "left out" in note]


def test_networks_dylora_trains_one_block_of_ranks_a_step_as_sd_scripts_dylora_module_does():
    """--network_module networks.dylora --network_args unit=1: each step trains the ranks up to a drawn one, and only
    that rank gets a gradient (a plain LoRA would move all 4)."""
    import torch

    from lora_trainer.models.checkpoint import build_models
    from lora_trainer.networks.network import create_network
    from lora_trainer.networks.spec import spec_from_kohya
    from lora_trainer.tiny_model.build import tiny_config

    torch.manual_seed(0)
    config = tiny_config()
    _, text_encoders, _ = build_models(config, device="cpu")
    spec = spec_from_kohya("networks.dylora", 4, 4, ["unit=1"])
    network = create_network(config, None, text_encoders, spec, train_unet=False).train().apply_to()
    modules = list(network.values())
    with torch.no_grad():  # up starts at zero: give every rank a gradient path
        for module in modules:
            module.lora_up.load_state_dict({"weight": torch.randn(module.lora_up.weight.shape) * 0.1})
    before = [module.lora_down.weight.detach().clone() for module in modules]
    text_encoders[0](torch.randint(0, 49408, (2, 77))).hidden.square().mean().backward()
    torch.optim.SGD(network.parameters(), lr=1e-2).step()
    network.remove()
    moved = {int((m.lora_down.weight.detach() != old).any(dim=1).sum()) for m, old in zip(modules, before)}
    assert 1 in moved and moved <= {0, 1}, moved
