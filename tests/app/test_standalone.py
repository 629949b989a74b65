"""The standalone app's shell (``python -m lora_trainer ui``): what it says at startup and in ``--help``."""

from __future__ import annotations

import pytest

from lora_trainer.app.settings import AppSettings
from lora_trainer.app.standalone import startup_line
from lora_trainer.cli import main


def test_ui_help_and_the_startup_line_name_the_data_folder_the_app_uses(tmp_path, monkeypatch, capsys):
    """Jobs and LoRAs live under ./lora-trainer-data: started from another folder the app showed an empty job list
    and Lora folder, and nothing said where it looked."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["ui", "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps the path at its hyphens
    assert "".join(str(tmp_path / "lora-trainer-data").split()) in help_text

    settings = AppSettings(lora_folder=tmp_path / "loras", data_folder=tmp_path / "lora-trainer-data",
                           dataset_roots=[], checkpoint_folders=[])
    assert startup_line("127.0.0.1", 7870, settings) == (
        f"LoRA Trainer: http://127.0.0.1:7870/ (jobs in {tmp_path / 'lora-trainer-data'}, LoRAs in {tmp_path / 'loras'})")
