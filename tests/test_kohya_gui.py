"""The Kohya GUI's saved settings (its own JSON, "Save config" in bmaltais/kohya_ss) run here as the GUI runs them:
the same sd-scripts options the GUI would write into its TOML, and what is not carried over is said."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from lora_trainer.app import presets
from lora_trainer.errors import UserError
from lora_trainer.tiny_model.build import TINY_MODEL_PATH
from lora_trainer.train_network import main as train_main
from lora_trainer.training.events import read_events
from lora_trainer.training.options import parse_args

SAMPLE = Path(__file__).resolve().parents[1] / "lora_trainer" / "assets" / "sample-dataset" / "10_zkstar"

# A GUI settings file as the GUI saves it: its field names, its strings for numbers, "" for unset
GUI_SETTINGS = {
    "LoRA_type": "Standard", "LyCORIS_preset": "full", "adaptive_noise_scale": 0, "additional_parameters": "",
    "block_alphas": "", "block_dims": "", "bucket_reso_steps": 64, "cache_latents": True, "caption_extension": ".txt",
    "clip_skip": "1", "conv_alpha": 1, "conv_dim": 1, "enable_bucket": False, "epoch": 3, "factor": -1,
    "gradient_accumulation_steps": "1", "keep_tokens": "0", "learning_rate": 0.0001, "lora_network_weights": "",
    "lr_scheduler": "cosine", "lr_scheduler_args": "", "lr_scheduler_num_cycles": "", "lr_warmup": 10,
    "max_data_loader_n_workers": "0", "max_resolution": "512,512", "max_train_epochs": "", "max_train_steps": "",
    "min_snr_gamma": 5, "mixed_precision": "fp16", "model_list": "custom", "module_dropout": 0,
    "multires_noise_discount": 0.3, "multires_noise_iterations": 6, "network_alpha": 8, "network_dim": 16,
    "network_dropout": 0, "noise_offset": 0.05, "noise_offset_type": "Original", "num_cpu_threads_per_process": 2,
    "optimizer": "AdamW8bit", "optimizer_args": "weight_decay=0.05 betas=0.9,0.99", "output_dir": "out",
    "output_name": "mychar", "pretrained_model_name_or_path": "model.safetensors", "rank_dropout": 0,
    "sample_prompts": "zkstar, a yellow star --w 512 --h 512", "save_every_n_epochs": 1, "save_precision": "fp16",
    "scale_weight_norms": 0, "sdxl": True, "sdxl_cache_text_encoder_outputs": False, "sdxl_no_half_vae": True,
    "seed": "", "stop_text_encoder_training_pct": 0, "text_encoder_lr": 5e-05, "train_batch_size": 2,
    "train_data_dir": "data", "unet_lr": 0.0001, "unit": 1, "up_lr_weight": "", "use_cp": False, "use_wandb": False,
    "v2": False, "v_parameterization": False, "vae_batch_size": 0, "xformers": "sdpa",
}


def read(tmp_path: Path, **changes) -> tuple[dict, list[str]]:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({**GUI_SETTINGS, **changes}), encoding="utf-8")
    options, actions = parse_args(["--config_file", str(path)])
    return options, actions.notes


def tiny_run(tmp_path: Path, name: str, **changes) -> Path:
    """GUI_SETTINGS for a short run of the tiny model on the sample dataset (one epoch of 4 steps), written to
    ``name``: the settings file's path."""
    data = tmp_path / "数据 set"
    shutil.copytree(SAMPLE, data / "1_zkstar")
    settings = {**GUI_SETTINGS, "pretrained_model_name_or_path": str(TINY_MODEL_PATH), "train_data_dir": str(data),
                "output_dir": str(tmp_path / "out"), "max_resolution": "64,64", "epoch": 1, "train_batch_size": 4,
                "optimizer": "AdamW", "mixed_precision": "no", "sdxl": False, "max_data_loader_n_workers": "0",
                "lr_scheduler": "constant", "lr_warmup": 0, **changes}
    path = tmp_path / name
    path.write_text(json.dumps(settings, indent=4), encoding="utf-8")
    return path


def test_gui_settings_become_the_options_the_gui_hands_sd_scripts(tmp_path):
    options, notes = read(tmp_path)
    assert (options.optimizer_type, options.resolution, options.network_module, options.network_args) == (
        "AdamW8bit", "512,512", "networks.lora", [])
    assert options.optimizer_args == ["weight_decay=0.05", "betas=0.9,0.99"]
    assert options.max_train_epochs == 3  # the GUI counts its steps from "epoch" when no maximum is given
    assert options.lr_warmup_steps == pytest.approx(0.1)  # 10 % of the steps, sd-scripts' ratio
    assert options.lr_scheduler_num_cycles == 3  # the GUI's default: one cycle per epoch
    assert options.text_encoder_lr == [5e-05] and options.unet_lr == 0.0001
    assert (options.clip_skip, options.min_snr_gamma, options.noise_offset) == (1, 5, 0.05)
    assert options.multires_noise_iterations is None  # "Original" noise: the multires fields are not passed
    assert options.sdpa and not options.xformers and options.no_half_vae
    assert options.seed is None and options.scale_weight_norms is None  # "" and 0 are unset in the GUI
    # the GUI keeps the prompts' text and writes it into a file as it starts: so does the reader
    assert Path(options.sample_prompts).read_text(encoding="utf-8") == "zkstar, a yellow star --w 512 --h 512\n"
    assert not any("sample_prompts" in n for n in notes)
    assert any("epoch is not read" in n for n in notes) is False  # consumed, not a front-end leftover


def test_gui_rates_noise_and_unset_values_read_as_the_gui_reads_them(tmp_path):
    unet_only, _ = read(tmp_path, text_encoder_lr=0)
    assert unet_only.network_train_unet_only and not unet_only.network_train_text_encoder_only
    te_only, _ = read(tmp_path, unet_lr=0)
    assert te_only.network_train_text_encoder_only and not te_only.network_train_unet_only
    multires, _ = read(tmp_path, noise_offset_type="Multires")
    assert (multires.multires_noise_iterations, multires.multires_noise_discount, multires.noise_offset) == (6, 0.3, None)
    assert read(tmp_path, seed="0")[0].seed is None and read(tmp_path, seed="42")[0].seed == 42  # "0" is unset there
    assert read(tmp_path, dataset_config="my dataset.toml")[0].dataset_config == "my dataset.toml"
    assert not read(tmp_path, lr_scheduler="constant", lr_warmup=10)[0].lr_warmup_steps  # the GUI zeroes it there
    whole = read(tmp_path, lr_warmup=100)[0]  # 100 %: the whole run warms up, not one step
    assert whole.lr_warmup_steps == 1.0 and isinstance(whole.lr_warmup_steps, float)


def test_gui_lycoris_types_carry_their_network_args_and_drop_what_lycoris_ignores(tmp_path):
    lokr, _ = read(tmp_path, LoRA_type="LyCORIS/LoKr", conv_dim=8, conv_alpha=4, factor=8, use_cp=True,
                   rank_dropout_scale=True, bypass_mode=False)
    assert lokr.network_module == "lycoris.kohya"
    assert {"preset=full", "algo=lokr", "conv_dim=8", "conv_alpha=4", "factor=8", "use_cp=True"} <= set(lokr.network_args)
    ia3, notes = read(tmp_path, LoRA_type="LyCORIS/iA3", network_dropout=0.3, train_on_input=True)
    assert ia3.network_dropout is None and any("network_dropout is not carried over" in n for n in notes)
    loha, notes = read(tmp_path, LoRA_type="LyCORIS/LoHa", network_dropout=0.1)  # as the GUI's locon-AdamW.json has it
    assert loha.network_dropout is None
    assert any("network_dropout is not carried over (LyCORIS's loha has no neuron dropout" in n for n in notes)
    kohya_locon, _ = read(tmp_path, LoRA_type="Kohya LoCon", conv_dim=4, conv_alpha=2, down_lr_weight="0,0,0,0,0,0,1,1,1,1,1,1")
    assert kohya_locon.network_args == ["conv_dim=4", "conv_alpha=2", "down_lr_weight=0,0,0,0,0,0,1,1,1,1,1,1"]
    with pytest.raises(UserError, match="LoRA_type 'Flux1' is not trained here"):
        read(tmp_path, LoRA_type="Flux1")


def test_gui_kohya_dylora_drops_the_standard_lora_fields_sd_scripts_dylora_does_not_read(tmp_path):
    """The GUI passes its block and dropout fields to networks.dylora as well, which reads none of them: carried
    over they would be refused, so they are left out and said."""
    dylora, notes = read(tmp_path, LoRA_type="Kohya DyLoRA", conv_dim=16, unit=4, network_dropout=0.1, rank_dropout=0.1,
                         block_dims=",".join(["8"] * 23), up_lr_weight="cosine")
    assert dylora.network_module == "networks.dylora" and dylora.network_dropout is None
    assert dylora.network_args == ["conv_dim=16", "conv_alpha=1", "unit=4"]
    assert any("up_lr_weight, block_dims, rank_dropout are not carried over: sd-scripts' networks.dylora does not read "
               "them, so they changed nothing there" in note for note in notes), notes
    assert any("network_dropout is not carried over (sd-scripts' networks.dylora has no dropout" in note for note in notes)


def test_gui_additional_parameters_are_read_as_the_command_line_reads_them(tmp_path):
    options, _ = read(tmp_path, additional_parameters="--network_train_unet_only --clip_skip 2 --max_grad_norm 0.5")
    assert (options.network_train_unet_only, options.clip_skip, options.max_grad_norm) == (True, 2, 0.5)
    with pytest.raises(UserError, match="not supported: --deepspeed"):
        read(tmp_path, additional_parameters="--deepspeed")
    (tmp_path / "other.json").write_text('{"learning_rate": 1e-4}', encoding="utf-8")
    with pytest.raises(UserError, match="a JSON config here is a Kohya GUI LoRA config"):
        parse_args(["--config_file", str(tmp_path / "other.json")])
    # the GUI's DreamBooth tab saves the same kind of file, without LoRA_type (its test/config/Standard-AdamW.json)
    (tmp_path / "dreambooth.json").write_text('{"learning_rate_te": 1e-5, "max_resolution": "512,512"}', encoding="utf-8")
    with pytest.raises(UserError, match="from its DreamBooth or fine-tuning tab, which trains the whole model"):
        parse_args(["--config_file", str(tmp_path / "dreambooth.json")])


def test_a_gui_settings_file_trains_here_and_imports_into_the_form(tmp_path):
    path = tiny_run(tmp_path, "my settings.json", xformers="xformers")
    assert train_main(["--config_file", str(path)]) == 0
    with safe_open(str(tmp_path / "out" / "mychar.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    # the GUI hands sd-scripts its 8 in a TOML, as it is: recorded "8"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"], metadata["ss_epoch"]) == ("16", "8", "1")
    events, _ = read_events(tmp_path / "out" / "mychar.events.jsonl")
    assert not any("sample_prompts is not carried over" in e["message"] for e in events if e["event"] == "warning")
    imported = presets.import_kohya_toml(path)  # the Train tab's import takes the same file
    assert (imported["optimizer_type"], imported["resolution"], imported["max_train_epochs"]) == ("AdamW", "64,64", 1)


# the TOML the GUI writes for sd-scripts (its values filtered as it filters them), here for a LyCORIS/LoCon run
GUI_TOML = """bucket_reso_steps = 64
cache_latents = true
caption_dropout_every_n_epochs = 0
caption_dropout_rate = 0.05
caption_extension = ".txt"
clip_skip = 1
dynamo_backend = "no"
enable_bucket = true
epoch = 1
gradient_accumulation_steps = 1
huber_c = 0.1
huber_schedule = "snr"
keep_tokens = 0
learning_rate = 0.0001
loss_type = "l2"
lr_scheduler = "constant"
lr_scheduler_args = []
lr_scheduler_num_cycles = 1
max_bucket_reso = 2048
max_data_loader_n_workers = 0
max_grad_norm = 1
max_timestep = 1000
max_token_length = 75
max_train_steps = 4
min_bucket_reso = 64
min_snr_gamma = 5
mixed_precision = "no"
network_alpha = 4
network_args = [ "preset=full", "conv_dim=2", "conv_alpha=1", "use_tucker=False", "rank_dropout=0", "bypass_mode=False", "dora_wd=False", "module_dropout=0", "use_tucker=False", "use_scalar=False", "rank_dropout_scale=False", "algo=locon", "train_norm=False",]
network_dim = 4
network_module = "lycoris.kohya"
noise_offset_type = "Original"
optimizer_args = []
optimizer_type = "AdamW"
output_dir = "{out}"
output_name = "last"
pretrained_model_name_or_path = "{model}"
prior_loss_weight = 1
resolution = "64,64"
sample_sampler = "euler_a"
save_every_n_epochs = 1
save_model_as = "safetensors"
save_precision = "fp16"
sdpa = true
text_encoder_lr = [ 5e-05, 5e-05,]
train_batch_size = 4
train_data_dir = "{data}"
unet_lr = 0.0001
wandb_run_name = "last"
"""


def test_the_toml_the_gui_hands_sd_scripts_for_a_lycoris_run_trains_here(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data / "1_zkstar")
    config = tmp_path / "config_lora-20261202.toml"
    config.write_text(GUI_TOML.format(out=(tmp_path / "out").as_posix(), model=TINY_MODEL_PATH.as_posix(),
                                      data=data.as_posix()), encoding="utf-8")
    assert train_main(["--config_file", str(config)]) == 0
    with safe_open(str(tmp_path / "out" / "last.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_network_module"] == "lycoris.kohya"
        assert any(".lora_down." in k for k in handle.keys())
    events, _ = read_events(tmp_path / "out" / "last.events.jsonl")
    said = " ".join(e["message"] for e in events if e["event"] == "warning")
    assert "epoch is not read" in said and "noise_offset_type is not read" in said
    assert "wandb_run_name is not read" in said  # written by the GUI (v25 on) into every file it hands sd-scripts


def test_a_gui_config_with_a_dataset_config_and_no_step_count_trains_sd_scripts_default_steps(tmp_path):
    """lora_gui.py passes neither max_train_steps nor max_train_epochs then (its epoch field is for folders)."""
    options, notes = read(tmp_path, dataset_config="dataset.toml", train_data_dir="")
    assert options.max_train_epochs is None and options.max_train_steps == 1600
    assert any("epoch is not carried over: with a dataset_config the GUI passes" in note for note in notes)
    assert read(tmp_path)[0].max_train_epochs == 3  # folders: the GUI counts its steps from the epochs


def test_a_gui_config_counting_epochs_says_it_trains_whole_epochs_where_the_gui_counted_steps(tmp_path):
    """lora_gui.py passed max_train_steps = ceil(Σ repeats × images / batch / accumulation × epoch × reg factor),
    counted from the folder at its Start: with buckets, sd-scripts' epochs have more batches, and that run stopped
    before the last epoch's end. Here the epochs are trained whole (the folder may be another by then), and said."""
    options, notes = read(tmp_path)
    assert options.max_train_epochs == 3 and options.max_train_steps == 1600  # sd-scripts' default, overridden
    assert any("epoch = 3 trains 3 whole epochs (max_train_epochs); the GUI passed max_train_steps counted from the "
               "folder's images instead" in note for note in notes)
    assert not any("whole epochs" in note for note in read(tmp_path, max_train_steps="320")[1])


def test_config_files_of_other_tools_read_as_sd_scripts_reads_them(tmp_path, capsys):
    """LyCORIS's example configs write resume = false (no resume, to sd-scripts); a dataset config handed to
    --config_file says where it goes; sd-scripts' hub options on the command line are named, not 'unknown'."""
    config = tmp_path / "loha_config.toml"
    config.write_text('[Basics]\npretrained_model_name_or_path = "m.safetensors"\ntrain_data_dir = "data"\n'
                      'resolution = "64,64"\n[Save]\noutput_dir = "out"\nresume = false\n', encoding="utf-8")
    assert parse_args(["--config_file", str(config)])[0].resume is None
    datasets = tmp_path / "dataset.toml"
    datasets.write_text('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "data"\n', encoding="utf-8")
    with pytest.raises(UserError, match="is a dataset config \\(\\[\\[datasets\\]\\]\\): give it with --dataset_config"):
        parse_args(["--config_file", str(datasets)])
    assert train_main(["--config_file", str(config), "--huggingface_repo_type", "model"]) == 2
    assert "not supported: --huggingface_repo_type" in capsys.readouterr().err


def test_the_guis_ia3_preset_with_scale_weight_norms_trains_and_says_what_is_left_alone(tmp_path):
    """The GUI's iA3 preset sets scale_weight_norms = 1, which LyCORIS skips for iA3: it runs, with a warning."""
    path = tiny_run(tmp_path, "ia3.json", LoRA_type="LyCORIS/iA3", scale_weight_norms=1, learning_rate=1e-2,
                    unet_lr=1e-2, text_encoder_lr=1e-2)
    assert train_main(["--config_file", str(path)]) == 0
    events, _ = read_events(tmp_path / "out" / "mychar.events.jsonl")
    assert any("the ia3 changes are left as they are" in e["message"] for e in events if e["event"] == "warning")
    with safe_open(str(tmp_path / "out" / "mychar.safetensors"), "pt") as handle:
        assert any(key.endswith(".weight") and handle.get_tensor(key).abs().max() > 0 for key in handle.keys())


def test_the_guis_torch_scheduler_in_additional_parameters_sets_the_learning_rates(tmp_path):
    """The GUI's "SDXL - 1 image LoRA" preset puts --lr_scheduler_type "CosineAnnealingLR" --lr_scheduler_args ...
    in additional_parameters; sd-scripts then builds torch's scheduler instead of --lr_scheduler's."""
    path = tiny_run(tmp_path, "one image.json", optimizer_args="", learning_rate=1e-3, unet_lr=1e-3, text_encoder_lr=1e-3,
                    lr_scheduler="cosine", additional_parameters=
                    '--lr_scheduler_type "CosineAnnealingLR" --lr_scheduler_args "T_max=2" "eta_min=0e-0"')
    assert train_main(["--config_file", str(path)]) == 0
    events, _ = read_events(tmp_path / "out" / "mychar.events.jsonl")
    rates = [e["lr"][0] for e in events if e["event"] == "step"]
    # down to 0 in two steps and up again, not the GUI's own lr_scheduler "cosine" (a step reports the rate after
    # its scheduler step, as sd-scripts logs get_last_lr())
    assert rates == pytest.approx([5e-4, 0.0, 5e-4, 1e-3], abs=1e-9)


# An early GUI's LoRA save (v21.1 and older, as its presets/lora/lion_optimizer.json still was at v21.5.0): no
# LoRA_type, no optimizer field (use_8bit_adam instead), numbers as text
EARLY_GUI_SETTINGS = {
    "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5", "v2": False, "v_parameterization": False,
    "logging_dir": "D:\\dataset\\lora/log", "train_data_dir": "D:\\dataset\\lora\\img", "reg_data_dir": "",
    "output_dir": "D:/lora/sd1.5", "max_resolution": "512,512", "learning_rate": "0.00003333", "lr_scheduler": "cosine",
    "lr_warmup": "0", "train_batch_size": 8, "epoch": "1", "save_every_n_epochs": "1", "mixed_precision": "bf16",
    "save_precision": "fp16", "seed": "1234", "num_cpu_threads_per_process": 2, "cache_latents": False,
    "caption_extension": "", "enable_bucket": True, "stop_text_encoder_training": 0, "use_8bit_adam": True,
    "xformers": True, "save_model_as": "safetensors", "text_encoder_lr": "0.000016666", "unet_lr": "0.00003333",
    "network_dim": 128, "lora_network_weights": "", "clip_skip": "1", "gradient_accumulation_steps": 1.0,
    "output_name": "mrtmcfl_v2.0", "model_list": "runwayml/stable-diffusion-v1-5", "max_token_length": "75",
    "max_train_epochs": "", "max_data_loader_n_workers": "0", "network_alpha": 128, "keep_tokens": "0",
    "lr_scheduler_num_cycles": "", "lr_scheduler_power": "", "bucket_reso_steps": 64.0,
}


def test_an_early_gui_lora_file_without_lora_type_trains_as_the_gui_opens_it(tmp_path):
    """The GUI opens a file without LoRA_type as Standard, and use_8bit_adam as the AdamW8bit optimizer
    (common_gui.update_my_data); it was refused here as a DreamBooth config."""
    path = tmp_path / "lion_optimizer.json"
    path.write_text(json.dumps(EARLY_GUI_SETTINGS), encoding="utf-8")
    options, actions = parse_args(["--config_file", str(path)])
    assert (options.network_module, options.network_dim, options.network_alpha) == ("networks.lora", 128, 128)
    assert options.optimizer_type == "AdamW8bit" and not options.use_8bit_adam
    assert options.max_train_epochs == 1 and options.seed == 1234 and options.xformers
    assert any("no LoRA_type" in note and "trained as a Standard LoRA" in note for note in actions.notes)
    path.write_text(json.dumps({**EARLY_GUI_SETTINGS, "use_8bit_adam": False}), encoding="utf-8")
    assert parse_args(["--config_file", str(path)])[0].optimizer_type == "AdamW"


def test_an_early_gui_loha_file_s_use_cp_trains_with_tucker_as_it_did_there(tmp_path):
    """GUIs before use_tucker (v21.x) passed use_cp=… for LoHa, which LyCORIS reads as its Tucker switch."""
    loha, notes = read(tmp_path, LoRA_type="LyCORIS/LoHa", conv_dim=4, conv_alpha=2, use_cp=True)
    assert "use_tucker=True" in loha.network_args
    assert any("use_cp = true is LyCORIS's Tucker switch" in note for note in notes)
    newer, _ = read(tmp_path, LoRA_type="LyCORIS/LoHa", conv_dim=4, conv_alpha=2, use_cp=True, use_tucker=False)
    assert "use_tucker=False" in newer.network_args  # a GUI with use_tucker passed that, not use_cp
    dylora, notes = read(tmp_path, LoRA_type="LyCORIS/DyLoRA", conv_dim=4, conv_alpha=2, use_cp=True)
    assert not any("use_tucker" in arg for arg in dylora.network_args)
    assert any("use_cp = true is not carried over: LyCORIS's DyLoRA has no Tucker form" in note for note in notes)


def test_flux_switches_left_in_an_sd_file_are_not_passed_as_the_gui_does_not_pass_them(tmp_path):
    """The GUI passes fp8_base_unet, cpu_offload_checkpointing … only with flux1_checkbox ticked; they stopped an SDXL
    run here ("not supported: --fp8_base_unet"), naming the command line that did not set them."""
    options, notes = read(tmp_path, fp8_base_unet=True, cpu_offload_checkpointing=True, guidance_scale=3.5,
                          flux1_checkbox=False)
    assert options.network_module == "networks.lora"
    assert any("cpu_offload_checkpointing, fp8_base_unet, guidance_scale are Flux.1 settings, which the GUI passes "
               "only with flux1_checkbox ticked" in note for note in notes)
    with pytest.raises(UserError, match="saved for Flux.1 \\(flux1_checkbox\\)"):
        read(tmp_path, fp8_base_unet=True, flux1_checkbox=True)
    # what only the file asks for is said as the file's, not the command line's
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({**GUI_SETTINGS, "additional_parameters": "--deepspeed"}), encoding="utf-8")
    with pytest.raises(UserError) as refused:
        parse_args(["--config_file", str(path)])
    assert str(refused.value).startswith(f"{path}: not supported: --deepspeed")
    with pytest.raises(UserError, match="^command line and .*not supported: --debug_dataset, --deepspeed"):
        parse_args(["--config_file", str(path), "--debug_dataset"])
