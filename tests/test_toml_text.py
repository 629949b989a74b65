"""The TOML this project writes reads back as written, whatever the strings hold."""

from __future__ import annotations

import toml

from lora_trainer import toml_text


def test_windows_paths_quotes_and_control_characters_read_back_as_written():
    data = {
        "pretrained_model_name_or_path": "D:\\models\\xxmix9realistic.safetensors",  # toml.dumps: "\x" unescaped
        "network_args": ["conv_dim=4", 'say "hi"', "it's", "tab\there", "del\x7f"],
        "datasets": [{"subsets": [{"image_dir": "D:\\训练 集\\x_角色", "num_repeats": 10}]}],
        "training_comment": "line one\nline two \\ end",
    }
    assert toml.loads(toml_text.dumps(data)) == data


def test_a_file_name_that_is_not_utf_8_is_written_not_a_crash():
    """A GBK name unpacked on Linux holds lone surrogates, which no TOML escape can carry."""
    text = toml_text.dumps({"image_dir": "/data/\udcb5\udcc4", "other": "\ud800x"})  # the latter: Windows' own
    assert toml.loads(text) == {"image_dir": "/data/\ufffd\ufffd", "other": "\ufffdx"}
    text.encode("utf-8")
