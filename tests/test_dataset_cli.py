from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.cli import main


def make_image(path: Path, size: tuple[int, int], seed: int, caption: str | None = "zk, star") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = (np.random.default_rng(seed).random((6, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(blocks).resize(size, Image.Resampling.BILINEAR).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def test_check_prints_json_and_exits_0_on_a_healthy_folder(tmp_path, capsys):
    for index in range(3):
        make_image(tmp_path / "10_zk" / f"{index}.png", (768, 512), index)
    assert main(["dataset", "check", str(tmp_path), "--json", "--batch-size", "4", "--resolution", "512,512",
                 "--trigger", "zk"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps_per_epoch"] == 8  # 30 samples, one bucket, batch 4
    assert report["settings"]["trigger"] == "zk" and report["findings"] == []
    assert report["images"][0]["bucket"] == [640, 384]


def test_output_redirected_on_a_windows_code_page_is_written_in_utf_8(tmp_path):
    """`dataset check D:\\训练集 > report.txt` on Windows wrote in cp1252 and died on the first Chinese name; the
    trainer's `--events_file -` stopped echoing after its first event. A file or a pipe gets UTF-8."""
    import os
    import subprocess
    import sys

    from lora_trainer.tiny_model.build import TINY_MODEL_PATH

    make_image(tmp_path / "训练 集" / "10_角色" / "图.png", (64, 64), 0, caption="角色")
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    check = subprocess.run([sys.executable, "-m", "lora_trainer", "dataset", "check", str(tmp_path / "训练 集"),
                            "--resolution", "64"], capture_output=True, env=env)
    assert check.returncode == 0, check.stderr.decode("utf-8", "replace")
    assert "10_角色: 10 repeats x 1 images" in check.stdout.decode("utf-8")
    command = subprocess.run([sys.executable, "-m", "lora_trainer.train_network", "--pretrained_model_name_or_path",
                              str(TINY_MODEL_PATH), "--train_data_dir", str(tmp_path / "训练 集"), "--output_dir",
                              str(tmp_path / "输出"), "--print-kohya-command"], capture_output=True, env=env)
    assert command.returncode == 0 and "输出" in command.stdout.decode("utf-8"), command.stderr.decode("utf-8", "replace")


def test_check_takes_the_shuffling_options_of_the_run(tmp_path, capsys):
    make_image(tmp_path / "10_zk" / "a.png", (512, 512), 0, caption="score_9, zk, star")
    assert main(["dataset", "check", str(tmp_path), "--json", "--shuffle-caption", "--keep-tokens", "1"]) == 0
    assert "trigger-shuffled" in [f["kind"] for f in json.loads(capsys.readouterr().out)["findings"]]
    (tmp_path / "10_zk" / "a.txt").write_text("score_9, zk ||| star", encoding="utf-8")
    assert main(["dataset", "check", str(tmp_path), "--json", "--shuffle-caption", "--keep-tokens-separator", "|||"]) == 0
    assert "trigger-shuffled" not in [f["kind"] for f in json.loads(capsys.readouterr().out)["findings"]]


def test_check_reads_a_dataset_toml_whose_values_win_over_the_flags(tmp_path, capsys):
    for index in range(3):
        make_image(tmp_path / "pics" / f"{index}.png", (512, 512), index)
    config = tmp_path / "dataset.toml"
    config.write_text(f'[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "{(tmp_path / "pics").as_posix()}"\n'
                      'num_repeats = 4\ncaption_extension = ".txt"\n', encoding="utf-8")
    assert main(["dataset", "check", str(config), "--json", "--batch-size", "4", "--resolution", "512"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["samples_per_epoch"], report["steps_per_epoch"]) == (12, 6)  # the file's batch 2, not --batch-size 4


def test_check_without_buckets_takes_the_runs_random_crop_and_latent_caching(tmp_path, capsys):
    make_image(tmp_path / "10_zk" / "a.png", (640, 576), 1)
    with pytest.raises(SystemExit):
        main(["dataset", "check", str(tmp_path), "--no-buckets"])
    assert "error   wrong-size" in capsys.readouterr().out
    for flag in ("--random-crop", "--cache-latents"):
        assert main(["dataset", "check", str(tmp_path), "--no-buckets", flag]) == 0
        assert "wrong-size" not in capsys.readouterr().out
    (tmp_path / "10_zk" / "a.png").rename(tmp_path / "10_zk" / "a_320_300_120_140.png")  # sd-scripts' face-crop name
    assert main(["dataset", "check", str(tmp_path), "--no-buckets", "--face-crop"]) == 0
    assert "wrong-size" not in capsys.readouterr().out


def test_check_at_a_low_resolution_needs_no_bucket_limits(tmp_path, capsys):
    """--resolution 64 was refused ("min_bucket_reso 256 is larger than the shorter side"); the API's check lets the
    limits follow the resolution, and so does the command now."""
    make_image(tmp_path / "10_zk" / "a.png", (64, 64), 1)
    assert main(["dataset", "check", str(tmp_path), "--json", "--resolution", "64"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert (settings["min_bucket_reso"], settings["max_bucket_reso"]) == (64, 1024)


def test_check_exits_1_and_names_the_problem_when_training_would_fail(tmp_path, capsys):
    make_image(tmp_path / "10_zk" / "a.png", (512, 512), 1, caption="")
    with pytest.raises(SystemExit) as stopped:
        main(["dataset", "check", str(tmp_path)])
    assert stopped.value.code == 1
    out = capsys.readouterr().out
    assert "error   empty-caption" in out and "10_zk/a.txt" in out


def test_check_of_a_missing_folder_is_one_sentence(tmp_path, capsys):
    assert main(["dataset", "check", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_check_rejects_a_malformed_resolution(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["dataset", "check", str(tmp_path), "--resolution", "big"])
    assert stopped.value.code == 2 and "512,768" in capsys.readouterr().err


def test_prep_writes_the_new_folder_and_refuses_one_inside_the_source(tmp_path, capsys):
    source = tmp_path / "src"
    make_image(source / "10_zk" / "a.png", (800, 600), 1)
    out = tmp_path / "out"
    assert main(["dataset", "prep", str(source), str(out), "--size", "512", "--buckets", "--flip", "--quiet"]) == 0
    assert "Wrote 1 images, 1 flipped copies" in capsys.readouterr().out
    assert Image.open(out / "10_zk" / "a.png").size == (576, 448)
    assert (out / "10_zk" / "a_flip.txt").read_text(encoding="utf-8") == "zk, star"
    assert main(["dataset", "prep", str(source), str(source / "out"), "--quiet"]) == 2
    assert "inside the source" in capsys.readouterr().err
    assert main(["dataset", "prep", str(source), str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
