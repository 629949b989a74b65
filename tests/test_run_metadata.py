"""The ss_* metadata a run writes, value by value against the files sd-scripts wrote for the same runs (the
fixtures), without training: the options, the data plan and the metadata writer are what decide every value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from reference import REFERENCE, TINY_KOHYA_CHECKPOINT
from safetensors import safe_open

from lora_trainer.models.configs import SD1
from lora_trainer.networks.spec import spec_from_kohya
from lora_trainer.training.data import build_training_data
from lora_trainer.training.optimizers import optimizer_label
from lora_trainer.training.options import parse_args
from lora_trainer.training.outputs import RunMetadata

FIXTURES = REFERENCE / "kohya-fixtures"
# what differs between any two runs (times, the session's random id, the version) and the hashes of the trained tensors
DIFFERS_PER_RUN = {"ss_session_id", "ss_training_started_at", "ss_training_finished_at", "modelspec.date",
                   "modelspec.implementation_version", "sshs_model_hash", "sshs_legacy_hash"}


def sd_scripts_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def run_metadata(argv: list[str], epoch: int, step: int, num_epochs: int, total_steps: int) -> dict[str, str]:
    """The metadata of the file this command saves at ``epoch``/``step``, as the trainer builds it."""
    options, _ = parse_args(argv)
    seed = options.seed
    data = build_training_data(options, SD1, seed)
    spec = spec_from_kohya(options.network_module or "networks.lora", options.network_dim, options.network_alpha,
                           options.network_args, options.network_dropout)
    optimizer = optimizer_label(torch.optim.AdamW([torch.zeros(1)]), options.optimizer_args)
    return RunMetadata(options, SD1, None, spec, data, seed, 0.0, optimizer, num_epochs, total_steps).build(epoch, step)


def assert_same_values(ours: dict[str, str], theirs: dict[str, str], json_keys: tuple[str, ...] = ()) -> None:
    different = {key: (ours.get(key), value) for key, value in theirs.items()
                 if key not in DIFFERS_PER_RUN and key not in json_keys and ours.get(key) != value}
    assert different == {}
    for key in json_keys:
        assert _rounded(json.loads(ours[key])) == _rounded(json.loads(theirs[key])), key


def _rounded(value):
    """Floats to 12 digits: a mean summed in another order differs in its last digit."""
    if isinstance(value, float):
        return round(value, 12)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


@pytest.fixture
def fixture_dataset(tmp_path) -> Path:
    shutil.copytree(FIXTURES / "dataset", tmp_path / "dataset")
    return tmp_path / "dataset"


def baseline_command(dataset: Path, *extra: str) -> list[str]:
    """The fixture's baseline run (lora-baseline/): sd-scripts' options on the 10_shapes folder."""
    return ["--pretrained_model_name_or_path", str(TINY_KOHYA_CHECKPOINT), "--train_data_dir", str(dataset / "train"),
            "--resolution", "128", "--train_batch_size", "2", "--network_module", "networks.lora", "--network_dim", "4",
            "--network_alpha", "4", "--learning_rate", "1e-4", "--max_train_epochs", "2", "--cache_latents",
            "--seed", "42", "--output_name", "tinylora", "--caption_extension", ".txt", "--save_every_n_epochs", "1",
            *extra]


def test_a_folder_runs_metadata_has_the_values_sd_scripts_wrote_for_it(fixture_dataset):
    """Mode A (--train_data_dir): ss_dataset_dirs, ss_tag_frequency, ss_bucket_info, ss_resolution, the counts."""
    theirs = sd_scripts_metadata(FIXTURES / "lora-baseline" / "tinylora.safetensors")
    ours = run_metadata(baseline_command(fixture_dataset), epoch=2, step=160, num_epochs=2, total_steps=160)
    assert_same_values(ours, theirs, json_keys=("ss_tag_frequency",))


def test_a_dataset_config_runs_metadata_has_the_values_sd_scripts_wrote_for_it(tmp_path, fixture_dataset):
    """Mode B (--config_file with --dataset_config): ss_datasets with its subsets and buckets, the merged
    ss_dataset_dirs, the network args with their dropout, the text encoder's rate as one number."""
    for name in ("args.toml", "dataset.toml"):
        text = (FIXTURES / "configs" / name).read_text(encoding="utf-8")
        (tmp_path / name).write_text(text.replace("{FIXTURES}/dataset/", f"{fixture_dataset.as_posix()}/")
                                     .replace("{FIXTURES}/configs/dataset.toml", (tmp_path / "dataset.toml").as_posix())
                                     .replace("{FIXTURES}", FIXTURES.as_posix()).replace("{OUT}", tmp_path.as_posix()),
                                     encoding="utf-8")
    theirs = sd_scripts_metadata(FIXTURES / "lora-toml-variant" / "tinylora_toml.safetensors")
    ours = run_metadata(["--config_file", str(tmp_path / "args.toml")], epoch=2, step=40, num_epochs=2, total_steps=40)
    assert_same_values(ours, theirs, json_keys=("ss_datasets",))
    # a step file inside the first epoch: sd-scripts counts the epochs completed
    step_file = sd_scripts_metadata(FIXTURES / "lora-toml-variant" / "tinylora_toml-step00000010.safetensors")
    ours = run_metadata(["--config_file", str(tmp_path / "args.toml")], epoch=0, step=10, num_epochs=2, total_steps=40)
    assert (ours["ss_epoch"], ours["ss_steps"]) == (step_file["ss_epoch"], step_file["ss_steps"]) == ("0", "10")


def test_what_the_fixtures_leave_at_their_defaults_is_written_as_sd_scripts_writes_it(fixture_dataset, tmp_path):
    """Accumulation multiplies the total batch; only the given timestep end is the user's; the VAE by its file name;
    network_alpha "1" when not given (str of sd-scripts' default=1, which argparse leaves an int); the caption dropout given; Adafactor's own step records its schedule and no
    rates; no output name is str(None)."""
    vae = tmp_path / "models" / "my vae.safetensors"
    command = baseline_command(fixture_dataset, "--gradient_accumulation_steps", "2", "--min_timestep", "100",
                               "--vae", str(vae), "--caption_dropout_rate", "0.1")
    command[command.index("--network_alpha"):command.index("--network_alpha") + 2] = []
    ours = run_metadata(command, epoch=2, step=80, num_epochs=2, total_steps=80)
    assert ours["ss_total_batch_size"] == "4"  # batch_size × processes × gradient_accumulation_steps
    assert ours["modelspec.timestep_range"] == "100,1000"  # max_timestep's default is 1000
    assert ours["ss_vae_name"] == "my vae.safetensors"
    assert (ours["ss_network_alpha"], ours["ss_network_dim"]) == ("1", "4")  # argparse keeps its default=1 an int
    assert ours["ss_caption_dropout_rate"] == "0.1"  # the command line's, as sd-scripts records it
    command = baseline_command(fixture_dataset, "--optimizer_type", "Adafactor")
    command[command.index("--output_name"):command.index("--output_name") + 2] = []
    ours = run_metadata(command, 2, 160, 2, 160)
    assert ours["ss_output_name"] == "None"  # str(None), as sd-scripts writes every value
    assert (ours["ss_lr_scheduler"], ours["ss_learning_rate"], ours["ss_unet_lr"]) == ("adafactor:0.0001", "None", "None")


# sd-scripts' float options that its metadata records as str(args.X) (train_network.py's metadata dict; the text
# encoder's rate is its first)
WHOLE_FLOATS = {"learning_rate": "ss_learning_rate", "unet_lr": "ss_unet_lr", "text_encoder_lr": "ss_text_encoder_lr",
                "network_alpha": "ss_network_alpha", "network_dropout": "ss_network_dropout",
                "noise_offset": "ss_noise_offset", "adaptive_noise_scale": "ss_adaptive_noise_scale",
                "multires_noise_discount": "ss_multires_noise_discount", "max_grad_norm": "ss_max_grad_norm",
                "caption_dropout_rate": "ss_caption_dropout_rate", "caption_tag_dropout_rate": "ss_caption_tag_dropout_rate",
                "prior_loss_weight": "ss_prior_loss_weight", "min_snr_gamma": "ss_min_snr_gamma",
                "scale_weight_norms": "ss_scale_weight_norms", "ip_noise_gamma": "ss_ip_noise_gamma",
                "huber_scale": "ss_huber_scale", "huber_c": "ss_huber_c", "validation_split": "ss_validation_split"}


def test_whole_numbers_of_float_options_are_recorded_as_sd_scripts_records_them_from_a_file_and_the_command_line(
        fixture_dataset, tmp_path):
    """sd-scripts writes str(args.X): a --config_file's values bypass argparse's type=float, so a TOML's 5 is "5",
    where --min_snr_gamma 5 is "5.0" (and a TOML's 5.0 too). Every TOML's whole number but network_alpha's gave "5.0"
    here."""
    command = baseline_command(fixture_dataset)
    command[command.index("--network_alpha"):command.index("--network_alpha") + 2] = []
    command[command.index("--learning_rate"):command.index("--learning_rate") + 2] = []
    whole = {name: 0 if name in ("validation_split", "network_dropout") else 1 for name in WHOLE_FLOATS}
    whole["text_encoder_lr"] = [1]
    toml = "".join(f"{name} = {value}\n" for name, value in whole.items())
    for given, recorded in ((toml, {key: str(whole[name]).strip("[]") for name, key in WHOLE_FLOATS.items()}),
                            ("network_alpha = 8.0\nmin_snr_gamma = 5.0\n", {"ss_network_alpha": "8.0", "ss_min_snr_gamma": "5.0"}),
                            ("[network]\nnetwork_alpha = 2\n", {"ss_network_alpha": "2"})):
        (tmp_path / "args.toml").write_text(given, encoding="utf-8")
        ours = run_metadata([*command, "--config_file", str(tmp_path / "args.toml")], 2, 160, 2, 160)
        assert {key: ours[key] for key in recorded} == recorded, given
    ours = run_metadata([*command, "--network_alpha", "8", "--min_snr_gamma", "5", "--text_encoder_lr", "1"], 2, 160, 2, 160)
    assert (ours["ss_network_alpha"], ours["ss_min_snr_gamma"], ours["ss_text_encoder_lr"]) == ("8.0", "5.0", "1.0")
