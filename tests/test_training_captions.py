"""``--weighted_captions``: sd-scripts' reading of ``(word:1.2)`` in captions — brackets are syntax, not text, and each
token's final text-encoder state is multiplied by its weight."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora_trainer.models.checkpoint import load_checkpoint
from lora_trainer.models.tokenizer import CLIPTokenizer
from lora_trainer.tiny_model.build import TINY_MODEL_PATH
from lora_trainer.train_network import main as train_main
from lora_trainer.training.text import CaptionEncoding, caption_chunks, encode_captions

SAMPLE = Path(__file__).resolve().parents[1] / "lora_trainer" / "assets" / "sample-dataset" / "10_zkstar"
TOKENIZER = CLIPTokenizer.default()


def test_weights_follow_the_tokens_of_each_bracketed_run():
    plain_ids, _ = caption_chunks("zkstar, red background", TOKENIZER, TOKENIZER.eos_id, None)
    ids, weights = caption_chunks("(zkstar:1.5), [red] background", TOKENIZER, TOKENIZER.eos_id, None, weighted=True)
    assert ids == plain_ids  # the brackets and the number are syntax, not tokens
    star = len(TOKENIZER.encode("zkstar"))
    row = weights[0]
    assert row[0] == 1.0 and row[1 : 1 + star] == [1.5] * star
    assert abs(row[1 + star + 1] - 1 / 1.1) < 1e-9  # after the comma: [red]
    assert set(row[1 + star + 2 :]) == {1.0}  # background, EOS, padding
    unweighted_ids, unweighted = caption_chunks("(zkstar:1.5)", TOKENIZER, TOKENIZER.eos_id, None)
    assert len(unweighted_ids[0]) == 77 and set(unweighted[0]) == {1.0}  # without the option brackets are text


def test_long_captions_keep_their_weights_in_every_chunk():
    caption = ", ".join(f"tag{i}" for i in range(30)) + ", (zkstar:2)"
    ids, weights = caption_chunks(caption, TOKENIZER, TOKENIZER.eos_id, 225, weighted=True)
    assert len(ids) == 3 and all(len(c) == 77 for c in ids)
    flat_ids = [t for chunk in ids for t in chunk[1:-1]]
    flat_weights = [w for chunk in weights for w in chunk[1:-1]]
    star = TOKENIZER.encode("zkstar")
    start = next(i for i in range(len(flat_ids)) if flat_ids[i : i + len(star)] == star)
    assert start > 75  # in the second chunk
    assert flat_weights[start : start + len(star)] == [2.0] * len(star)
    assert flat_weights.count(2.0) == len(star)


def test_weighted_states_are_the_plain_states_times_the_token_weights():
    model = load_checkpoint(TINY_MODEL_PATH)
    plain, pooled = encode_captions(model.config, model.text_encoders, ["zkstar, red background"], TOKENIZER)
    weighted, weighted_pooled = encode_captions(model.config, model.text_encoders, ["(zkstar:1.5), red background"],
                                                TOKENIZER, CaptionEncoding(weighted=True))
    star = len(TOKENIZER.encode("zkstar"))
    scale = torch.ones(plain.shape[1])
    scale[1 : 1 + star] = 1.5
    assert torch.allclose(weighted, plain * scale[None, :, None], atol=1e-6)
    assert (pooled is None) == (weighted_pooled is None)
    same, _ = encode_captions(model.config, model.text_encoders, ["zkstar, red background"], TOKENIZER,
                              CaptionEncoding(weighted=True))
    assert torch.equal(same, plain)  # a caption without the syntax encodes exactly as before


def _train(dataset: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    assert train_main([
        "--pretrained_model_name_or_path", str(TINY_MODEL_PATH), "--train_data_dir", str(dataset), "--output_dir", str(out),
        "--output_name", "star", "--resolution", "64", "--train_batch_size", "2", "--network_dim", "4",
        "--network_alpha", "4", "--learning_rate", "1e-3", "--max_train_steps", "4", "--seed", "5",
        "--caption_extension", ".txt", "--cache_latents", *extra]) == 0
    return load_file(str(out / "star.safetensors"))


def test_training_with_weighted_captions_changes_only_what_the_weights_touch(tmp_path):
    folder = tmp_path / "data" / "1_zkstar"
    folder.mkdir(parents=True)
    for image in sorted(SAMPLE.glob("*.png"))[:4]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    plain = _train(tmp_path / "data", tmp_path / "plain")
    assert all(torch.equal(plain[k], v) for k, v in _train(tmp_path / "data", tmp_path / "flag", "--weighted_captions").items())
    for caption in folder.glob("*.txt"):
        caption.write_text("(" + caption.read_text(encoding="utf-8").replace(",", ":1.4),", 1), encoding="utf-8")
    emphasised = _train(tmp_path / "data", tmp_path / "emphasised", "--weighted_captions")
    assert any(not torch.equal(plain[k], emphasised[k]) for k in plain)


def test_validation_measures_the_captions_training_builds_the_same_at_every_evaluation(tmp_path, monkeypatch):
    """The trigger word of --caption_prefix and a resolved wildcard, as the training steps see them; sd-scripts'
    validation dataset runs the same caption processing."""
    import lora_trainer.training.trainer as trainer

    folder = tmp_path / "data" / "1_shapes"
    folder.mkdir(parents=True)
    for image in sorted(SAMPLE.glob("*.png"))[:4]:
        shutil.copy(image, folder / image.name)
        (folder / image.with_suffix(".txt").name).write_text("{red|blue} shape;; flat", encoding="utf-8")
    measured: list[list[str]] = []
    inside = []
    validation_loss, encode = trainer._validation_loss, trainer.encode_captions

    def validating(*args, **kwargs):
        inside.append(True)
        measured.append([])
        try:
            return validation_loss(*args, **kwargs)
        finally:
            inside.pop()

    def encoding(config, text_encoders, captions, *args, **kwargs):
        if inside:
            measured[-1] += captions
        return encode(config, text_encoders, captions, *args, **kwargs)

    monkeypatch.setattr(trainer, "_validation_loss", validating)
    monkeypatch.setattr(trainer, "encode_captions", encoding)
    _train(tmp_path / "data", tmp_path / "out", "--caption_prefix", "zkstar", "--enable_wildcard",
           "--secondary_separator", ";;", "--validation_split", "0.5", "--max_train_steps", "2")
    assert len(measured) == 2 and measured[0] and measured[0] == measured[1]  # the same captions at every evaluation
    for caption in measured[0]:
        assert caption in ("zkstar red shape, flat", "zkstar blue shape, flat"), caption
