"""Where user input becomes the typed options: sd-scripts' command line, its --config_file TOML, the values it
refuses, and the sd-scripts command printed back. Pure: nothing here loads a model."""

from __future__ import annotations

import re

import pytest

from lora_trainer.errors import UserError
from lora_trainer.training.options import kohya_command, options_from, parse_args, split_command_line

BASE = {"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d"}
COMMAND = ["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "d"]


def refused(said: str, **values) -> None:
    with pytest.raises(UserError, match=re.escape(said)):
        options_from({**BASE, **values})


def test_a_key_in_two_sections_of_a_config_file_takes_the_later_one_as_sd_scripts_flattens_it(tmp_path):
    """sd-scripts merges the tables in file order, each key overwriting an earlier one."""
    config = tmp_path / "args.toml"
    config.write_text("[optimizer]\nlearning_rate = 1e-4\n[training]\nlearning_rate = 2e-4\n", encoding="utf-8")
    assert parse_args([*COMMAND, "--config_file", str(config)])[0].learning_rate == 2e-4


def test_what_config_files_write_for_not_given_and_for_one_value_reads_as_the_command_line_reads_it(tmp_path):
    """LyCORIS' example configs write resume = false; older ones a single text_encoder_lr; a dataset TOML's
    resolution is a list of one or two sides."""
    config = tmp_path / "args.toml"
    config.write_text('resume = false\nvae = ""\ntext_encoder_lr = 5e-5\nnetwork_args = "conv_dim=4"\n'
                      "resolution = [512]\n", encoding="utf-8")
    options = parse_args([*COMMAND, "--config_file", str(config)])[0]
    assert (options.resume, options.vae, options.text_encoder_lr) == (None, None, [5e-5])
    assert (options.network_args, options.resolution) == (["conv_dim=4"], "512")


def test_values_sd_scripts_cannot_train_are_refused_naming_the_option():
    refused("--mixed_precision 'fp32' is not one of no, fp16, bf16", mixed_precision="fp32")  # a TOML skips argparse
    refused("--validation_split 1.0 must be in [0, 1)", validation_split=1.0)  # nothing would be left to train
    refused('--resolution \'512,512,512\': give "512" or "512,768"', resolution="512,512,512")
    refused("--initial_epoch 0: epochs count from 1", initial_epoch=0)
    refused("--network_train_unet_only and --network_train_text_encoder_only exclude each other",
            network_train_unet_only=True, network_train_text_encoder_only=True)
    refused("--log_with all: Weights & Biases is not supported here", log_with="all")
    refused("--fused_backward_pass: sd-scripts stops on it unless --optimizer_type Adafactor with "
            "--gradient_accumulation_steps 1", fused_backward_pass=True, optimizer_type="Adafactor",
            gradient_accumulation_steps=2)


def test_epoch_and_step_counts_stop_where_sd_scripts_file_names_stop_and_zero_epochs_is_not_set():
    """name-000001 holds 6 digits of epoch, name-step00000050 8 of step; the Kohya GUI writes 0 epochs for "not set"."""
    assert options_from({**BASE, "max_train_epochs": 999999}).max_train_epochs == 999999
    refused("--max_train_epochs 1000000 is more than the 999999", max_train_epochs=1000000)
    assert options_from({**BASE, "max_train_steps": 10**8 - 1}).max_train_steps == 10**8 - 1
    refused("--max_train_steps 100000000 is more than the 99999999", max_train_steps=10**8)
    assert options_from({**BASE, "max_train_epochs": 0}).max_train_epochs == 0
    refused("--max_train_epochs -1: give 1 or more epochs, or 0", max_train_epochs=-1)


def test_samples_every_zero_or_fewer_steps_or_epochs_are_none_as_sd_scripts_reads_them():
    """-1 would draw samples at every step (step % -1 is 0)."""
    options = options_from({**BASE, "sample_every_n_steps": -1, "sample_every_n_epochs": 0})
    assert (options.sample_every_n_steps, options.sample_every_n_epochs) == (None, None)


def test_the_old_legacy_spellings_still_read():
    """sd-scripts keeps --caption_extention (its old misspelling) beside --caption_extension."""
    assert parse_args([*COMMAND, "--caption_extention", ".txt"])[0].caption_extension == ".txt"
    assert parse_args([*COMMAND, "--use_8bit_adam"])[0].optimizer == "AdamW8bit"
    assert parse_args([*COMMAND, "--use_lion_optimizer"])[0].optimizer == "Lion"


@pytest.mark.parametrize("given, said", [
    (["--use_8bit_adam", "--optimizer_type", "Lion"], "--use_8bit_adam and --optimizer_type Lion"),
    (["--use_lion_optimizer", "--optimizer_type", "AdamW"], "--use_lion_optimizer and --optimizer_type AdamW"),
    (["--use_8bit_adam", "--use_lion_optimizer"], "--use_8bit_adam and --use_lion_optimizer"),
])
def test_two_ways_of_choosing_the_optimizer_at_once_are_refused_as_sd_scripts_stops_on_them(given, said):
    """sd-scripts' get_optimizer asserts that only one of them is given; this trainer took one without a word."""
    with pytest.raises(UserError, match=re.escape(said)):
        parse_args([*COMMAND, *given])


def test_a_refusal_names_where_the_refused_option_was_given(tmp_path):
    """The file where the file gave the value (the user edits it there), the command line where that did."""
    config = tmp_path / "args.toml"

    def said(toml: str, *more: str) -> str:
        config.write_text(toml, encoding="utf-8")
        with pytest.raises(UserError) as refusal:
            parse_args([*COMMAND, "--config_file", str(config), *more])
        return str(refusal.value)

    assert said("learning_rate = 1e-4\n", "--deepspeed").startswith("command line: not supported: --deepspeed")
    assert said("deepspeed = true\n").startswith(f"{config}: not supported: --deepspeed")
    assert said('learning_rate = "abc"\n') == f"{config}: learning_rate = 'abc' is not a number"
    with pytest.raises(UserError, match=re.escape(f"{config}: learning_rate = 'abc'")):  # named as read: .toml added
        parse_args([*COMMAND, "--config_file", str(config.with_suffix(""))])
    assert said('resolution = "100,100,3"\n') == f'--resolution \'100,100,3\' (in {config}): give "512" or "512,768"'
    assert said("adaptive_noise_scale = 0.1\n") == f"--adaptive_noise_scale (in {config}) needs --noise_offset"
    assert said('mixed_precision = "fp32"\n').startswith(f"--mixed_precision 'fp32' (in {config}) is not one of")
    assert said("learning_rate = -1e-4\n").startswith(f"--learning_rate -0.0001 (in {config}): a learning rate is")
    # the command line beats the file: its value is said as before
    assert said("adaptive_noise_scale = 0.2\n", "--adaptive_noise_scale", "0.1") == \
        "--adaptive_noise_scale needs --noise_offset"
    # every option of the file a refusal is about, not only its first; one it names as the fix is not the file's value
    assert said("min_timestep = 800\nmax_timestep = 200\n") == (
        f"--min_timestep 800 (in {config}) is above --max_timestep 200 (in {config}): swap them (for one fixed "
        "timestep t, give both as t)")
    assert said("min_timestep = 800\n", "--max_timestep", "200").startswith(
        f"--min_timestep 800 (in {config}) is above --max_timestep 200: swap them")
    assert said("network_train_unet_only = true\nnetwork_train_text_encoder_only = true\n") == (
        f"--network_train_unet_only (in {config}) and --network_train_text_encoder_only (in {config}) exclude each other")
    fp16 = said('full_fp16 = true\nmixed_precision = "bf16"\n')
    assert fp16.startswith(f"--full_fp16 (in {config}) needs --mixed_precision fp16; ")
    assert "or --mixed_precision bf16 --full_bf16, or drop" in fp16  # a fix, after the statement's colon


def test_the_printed_kohya_command_holds_switches_bare_and_none_of_this_trainers_own_options():
    """sd-scripts' store_true switches take no value, and it has no --backend, --device or --events_file: its
    parser would stop on either."""
    options, _ = parse_args([*COMMAND, "--cache_latents", "--flip_aug", "--device", "cpu", "--events_file", "e.jsonl",
                             "--backend", "sd-scripts=/opt/sd-scripts", "--state_dir", "states"])
    words = split_command_line(kohya_command(options, windows=False), windows=False)
    after = [*words, "--"][words.index("--cache_latents") + 1]
    assert after.startswith("--")  # not --cache_latents True
    assert not {"--device", "--events_file", "--backend", "--state_dir", "--stop_file"} & set(words)
    assert parse_args(words[3:])[0].flip_aug is True


def test_a_file_given_to_resume_is_said_for_what_it_is_with_what_to_give_instead(tmp_path):
    """--resume takes a state folder; a user who gives the network file, or a file in the folder, is told the fix."""
    state = tmp_path / "name-state"
    state.mkdir()
    for part in ("model.safetensors", "train_state.pt", "train_state.json"):
        (state / part).write_bytes(b"x")
    network, notes = tmp_path / "name-000002.safetensors", tmp_path / "notes.txt"
    network.write_bytes(b"x")
    notes.write_text("x", encoding="utf-8")
    for part in ("model.safetensors", "train_state.json"):
        refused(f"--resume {state / part}: a file inside a state folder; give its folder, {state}",
                resume=str(state / part))
    refused(f"--resume {network}: a network file: continue it with --network_weights {network}", resume=str(network))
    with pytest.raises(UserError) as refusal:  # a job's states are in its own folder: no folder beside it is named
        options_from({**BASE, "resume": str(network)})
    assert "state folder" not in str(refusal.value)
    (tmp_path / "name-000002-state").mkdir()
    refused(f"--resume {network}: a network file: continue it with --network_weights {network} (or give its state "
            f"folder, {tmp_path / 'name-000002-state'})", resume=str(network))
    refused(f"--resume {notes}: not a state folder", resume=str(notes))
    refused(f"--resume {tmp_path / 'gone'}: no such folder", resume=str(tmp_path / "gone"))
    assert options_from({**BASE, "resume": str(state)}).resume == str(state)


def test_the_printed_kohya_command_says_which_of_this_trainers_own_options_it_left_out(capsys):
    """--state_dir, --stop_file … were dropped without a word; stdout stays the one line to paste."""
    from lora_trainer.train_network import main as train_main

    assert train_main([*COMMAND, "--state_dir", "states", "--stop_file", "stop", "--device", "cpu",
                       "--print-kohya-command"]) == 0
    printed = capsys.readouterr()
    assert printed.out.count("\n") == 1 and printed.out.startswith("accelerate launch train_network.py")
    assert ("note: --device, --stop_file, --state_dir left out (this trainer's own: sd-scripts has no such option)"
            in printed.err)
    assert train_main([*COMMAND, "--print-kohya-command"]) == 0
    assert "left out" not in capsys.readouterr().err


def test_a_printed_windows_command_says_the_values_powershell_would_expand_in_single_quotes():
    """The line is quoted for cmd.exe; PowerShell expands $name and `x inside its double quotes."""
    from lora_trainer.training.options import kohya_command_notes

    options, _ = parse_args([*COMMAND, "--output_name", "it's $5", "--sample_prompts", "`prompts.txt"])
    assert kohya_command_notes(options, windows=True) == [
        "in PowerShell (not cmd), give --output_name 'it''s $5', --sample_prompts '`prompts.txt' in single quotes: "
        "it expands $ and ` inside double quotes and unquoted words"]
    assert kohya_command_notes(options, windows=False) == []  # POSIX quoting already keeps them
    assert kohya_command_notes(parse_args(COMMAND)[0], windows=True) == []


def test_a_value_a_refusal_shows_is_named_with_its_file_only_where_it_is_the_whole_value():
    """A file's 8 (alpha kept whole, as sd-scripts keeps it) is not the start of a message's "8.0": the file's name
    went inside the number ("8 (in a.toml).0")."""
    from lora_trainer.training.options import _with_file

    options = options_from({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "network_alpha": 8})
    said = _with_file("--network_alpha 8.0 is above --network_dim 4", options, {"network_alpha": "a.toml"})
    assert "(in a.toml).0" not in said and said.startswith("--network_alpha (in a.toml) 8.0 is above"), said
    said = _with_file("--network_alpha 8. Lower it", options, {"network_alpha": "a.toml"})
    assert said == "--network_alpha 8 (in a.toml). Lower it"
