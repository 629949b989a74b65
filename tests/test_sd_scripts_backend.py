"""--backend sd-scripts=PATH: the same options run on a user's sd-scripts checkout, its console output read back
as our events. The checkout here is a stand-in that prints what sd-scripts' train_network.py prints (a real
tqdm "steps" bar with avr_loss, "epoch N/M", "saving checkpoint: FILE")."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import toml

from lora_trainer.errors import UserError
from lora_trainer.tiny_model.build import TINY_MODEL_PATH
from lora_trainer.train_network import main as train_main
from lora_trainer.training.events import read_events
from lora_trainer.training.sd_scripts_backend import checkout_of, event_from_line

STAND_IN = textwrap.dedent('''
    import argparse, sys, time, toml
    from pathlib import Path
    from tqdm import tqdm
    parser = argparse.ArgumentParser()
    parser.add_argument("--config_file")
    options = toml.loads(Path(parser.parse_args().config_file).read_text(encoding="utf-8"))
    Path("seen-options.toml").write_text(toml.dumps(options), encoding="utf-8")
    if options.get("training_comment") == "crash":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    out = Path(options["output_dir"]); out.mkdir(parents=True, exist_ok=True)
    epochs, per_epoch = options["max_train_epochs"], 3
    bar = tqdm(range(epochs * per_epoch), smoothing=0, desc="steps")
    for epoch in range(epochs):
        print(f"\\nepoch {epoch + 1}/{epochs}", flush=True)
        for step in range(per_epoch):
            bar.update(1)
            bar.set_postfix(avr_loss=0.5 / (epoch * per_epoch + step + 1))
        name = options["output_name"] + ("" if epoch + 1 == epochs else f"-{epoch + 1:06d}") + ".safetensors"
        (out / name).write_bytes(b"weights")
        print(f"\\nsaving checkpoint: {out / name}", flush=True)
''')


@pytest.fixture
def checkout(tmp_path) -> Path:
    folder = tmp_path / "sd scripts 检出"
    folder.mkdir()
    (folder / "train_network.py").write_text(STAND_IN, encoding="utf-8")
    return folder


def train(checkout: Path, out: Path, *extra: str) -> int:
    return train_main(["--backend", f"sd-scripts={checkout}", "--pretrained_model_name_or_path", str(TINY_MODEL_PATH),
                       "--train_data_dir", str(out / "data"), "--output_dir", str(out), "--output_name", "star",
                       "--max_train_epochs", "2", "--network_dim", "8", *extra])


def test_the_run_goes_to_sd_scripts_with_our_options_and_comes_back_as_events(checkout, tmp_path):
    assert train(checkout, tmp_path) == 0
    seen = toml.loads((checkout / "seen-options.toml").read_text(encoding="utf-8"))
    assert seen["network_dim"] == 8 and seen["output_name"] == "star" and "backend" not in seen and "events_file" not in seen
    events, _ = read_events(tmp_path / "star.events.jsonl")
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 7)) and steps[0]["total"] == 6
    assert steps[-1]["average"] == pytest.approx(0.5 / 6, rel=1e-2)
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert [Path(e["path"]).name for e in events if e["event"] == "saved"] == ["star-000001.safetensors", "star.safetensors"]
    assert events[-1]["event"] == "end" and events[-1]["steps"] == 6 and len(events[-1]["files"]) == 2


def test_an_sd_scripts_crash_is_an_error_event_with_its_message(checkout, tmp_path, capsys):
    assert train(checkout, tmp_path, "--training_comment", "crash") == 2
    assert "CUDA out of memory" in capsys.readouterr().err
    events, _ = read_events(tmp_path / "star.events.jsonl")
    assert events[-1] == {**events[-1], "event": "error"} and "RuntimeError" in events[-1]["message"]


def test_a_wrong_backend_is_refused_with_how_to_write_it(tmp_path):
    with pytest.raises(UserError, match="sd-scripts=PATH"):
        checkout_of("kohya")
    with pytest.raises(UserError, match="holds no train_network.py"):
        checkout_of(f"sd-scripts={tmp_path}")


def test_console_lines_sd_scripts_prints_become_events():
    assert event_from_line("steps:  40%|████      | 4/10 [00:02<00:03,  1.9it/s, avr_loss=0.0812]") == {
        "event": "step", "step": 4, "total": 10, "average": 0.0812}
    assert event_from_line("saving checkpoint: D:\\我的 LoRA\\star-000002.safetensors") == {
        "event": "saved", "path": "D:\\我的 LoRA\\star-000002.safetensors"}
    assert event_from_line("epoch 3/10") == {"event": "epoch", "epoch": 2, "epochs": 10}  # epoch 2 is done
    assert event_from_line("steps:   0%|          | 0/10 [00:00<?, ?it/s]") is None
    assert event_from_line("prepare optimizer, data loader etc.") is None
