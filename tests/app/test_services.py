"""The services the tabs and the API share: the host hears about jobs (GPU freed and given back, Lora list
refreshed) and a finished LoRA gets its Lora card (trigger words, preferred weight, SD version, summary)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import torch

from lora_trainer.app.services import Services, write_card_hints
from lora_trainer.app.settings import AppSettings, parse_api_auth
from lora_trainer.app.user_metadata import card_metadata, trigger_words, write_card_metadata
from lora_trainer.safe_io import save_safetensors
from lora_trainer.tiny_model.build import TINY_MODEL_PATH

FAKE_TRAINER = textwrap.dedent('''
    import json, sys, toml
    from pathlib import Path
    options = toml.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    def emit(kind, **fields):
        with open(options["events_file"], "a", encoding="utf-8") as events:
            events.write(json.dumps({"event": kind, **fields}) + "\\n")
    emit("start")
    out = Path(options["output_dir"]) / (options["output_name"] + ".safetensors")
    out.write_bytes(Path(options["training_comment"]).read_bytes())
    emit("saved", path=str(out))
    emit("end", files=[str(out)], epochs=4, steps=40, recommended_epoch=3, reason="lowest validation loss")
''')

RUN_METADATA = {
    "ss_tag_frequency": json.dumps({"10_zkstar": {"zkstar": 16, "yellow star": 16, "blue background": 5}}),
    "ss_dataset_dirs": json.dumps({"10_zkstar": {"n_repeats": 10, "img_count": 16}}),
    "ss_base_model_version": "sdxl_base_v1-0", "ss_sd_model_name": "tiny-sd.safetensors", "ss_num_train_images": "160",
    "ss_network_dim": "8", "ss_network_alpha": "8", "ss_learning_rate": "0.002",
}


class RecordingHost:
    name = "test"

    def __init__(self):
        self.calls: list[str] = []

    def refresh_loras(self):
        self.calls.append("refresh")

    def release_gpu(self):
        self.calls.append("release")

    def restore_gpu(self):
        self.calls.append("restore")


def lora_file(path: Path, metadata: dict[str, str]) -> Path:
    return save_safetensors({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, path, metadata)


def test_trigger_words_are_the_tags_every_image_carries_else_the_concept_name():
    assert trigger_words(RUN_METADATA) == ["zkstar", "yellow star"]
    uncaptioned = {"ss_tag_frequency": "{}", "ss_dataset_dirs": json.dumps({"5_ohwx person": {"img_count": 9}})}
    assert trigger_words(uncaptioned) == ["ohwx person"]


def test_card_says_the_version_the_webui_filters_on_and_summarises_the_run():
    card = card_metadata(RUN_METADATA, {"epochs": 4, "steps": 40, "recommended_epoch": 3, "reason": "lowest validation loss"}, 0.7)
    assert card["sd version"] == "SDXL" and card["preferred weight"] == 0.7
    assert card["activation text"] == "zkstar, yellow star"
    assert "160 images, 4 epochs, 40 steps" in card["description"] and "Recommended epoch: 3" in card["description"]


def test_the_card_says_the_rank_of_the_tensors_not_the_none_sd_scripts_writes_without_network_dim(tmp_path):
    unset = {**RUN_METADATA, "ss_network_dim": "None", "ss_network_alpha": "1.0"}
    assert "dim ? / alpha 1.0," in card_metadata(unset, {})["description"]
    card = json.loads(write_card_metadata(lora_file(tmp_path / "star.safetensors", unset), {}).read_text(encoding="utf-8"))
    assert "dim 1 / alpha 1," in card["description"]


def test_rewriting_the_card_keeps_what_the_user_typed(tmp_path):
    lora = lora_file(tmp_path / "star.safetensors", RUN_METADATA)
    (tmp_path / "star.json").write_text(json.dumps({"activation text": "my words", "notes": ""}), encoding="utf-8")
    card = json.loads(write_card_metadata(lora, {}).read_text(encoding="utf-8"))
    assert card["activation text"] == "my words" and card["notes"].startswith("Trained with the LoRA Trainer")


def test_a_resumed_runs_card_tells_the_whole_run_and_still_keeps_what_the_user_typed(tmp_path):
    """Paused after 13 steps and resumed to 40, the card must not keep saying "13 steps": what we wrote is ours to
    rewrite, what the user typed over it is not."""
    lora = lora_file(tmp_path / "star.safetensors", RUN_METADATA)
    write_card_metadata(lora, {"epochs": 1, "steps": 13})
    card = json.loads((tmp_path / "star.json").read_text(encoding="utf-8"))
    (tmp_path / "star.json").write_text(json.dumps({**card, "notes": "my notes"}), encoding="utf-8")  # edited in the WebUI
    card = json.loads(write_card_metadata(lora, {"epochs": 4, "steps": 40, "recommended_epoch": 3}).read_text(encoding="utf-8"))
    assert "4 epochs, 40 steps" in card["description"] and "Recommended epoch: 3" in card["description"]
    assert card["notes"] == "my notes" and card["activation text"] == "zkstar, yellow star"


def test_a_job_frees_the_hosts_gpu_refreshes_its_lora_list_and_fills_the_card(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER, encoding="utf-8")
    source = lora_file(tmp_path / "trained.safetensors", RUN_METADATA)
    settings = AppSettings(lora_folder=tmp_path / "Lora", data_folder=tmp_path / "data")
    settings.lora_folder.mkdir()
    host = RecordingHost()
    services = Services.create(settings, host, start=False,
                               command=lambda job: [sys.executable, str(script), str(job.config_path)], poll=0.05)
    (tmp_path / "images" / "1_star").mkdir(parents=True)
    (tmp_path / "images" / "1_star" / "a.png").write_bytes(b"")  # listed (not decoded) when the job is submitted
    job = services.runner.submit("star", {"pretrained_model_name_or_path": str(TINY_MODEL_PATH),
                                          "train_data_dir": str(tmp_path / "images"), "resolution": "64",
                                          "output_dir": str(settings.lora_folder), "output_name": "star",
                                          "training_comment": str(source)})
    write_card_hints(job, 0.45)  # the style preset's weight
    assert services.runner.run_next().status == "finished"
    assert host.calls[0] == "release" and host.calls[-1] == "restore" and "refresh" in host.calls
    card = json.loads((settings.lora_folder / "star.json").read_text(encoding="utf-8"))
    assert card["activation text"] == "zkstar, yellow star" and card["sd version"] == "SDXL"
    assert card["preferred weight"] == 0.45


def test_the_webuis_api_auth_flag_is_read_as_users_and_passwords():
    assert parse_api_auth("alice:pw1, bob:p:w2") == {"alice": "pw1", "bob": "p:w2"}
    assert parse_api_auth(None) == {}
