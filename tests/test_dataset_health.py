from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.dataset.health import (
    HealthSettings,
    check_dataset,
    crop_in_image_pixels,
    mentions,
    near_duplicate_groups,
    perceptual_hash,
    steps_per_epoch,
)
from lora_trainer.errors import UserError
from lora_trainer.models.tokenizer import CLIPTokenizer


def make_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A distinct picture per seed: coarse random blocks, so perceptual hashes differ between seeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = (np.random.default_rng(seed).random((6, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(blocks).resize(size, Image.Resampling.BILINEAR).save(path)
    return path


def caption(image: Path, text: str) -> Path:
    target = image.with_suffix(".txt")
    target.write_text(text, encoding="utf-8")
    return target


def kinds(report, path: str | None = None) -> set[str]:
    return {finding.kind for finding in report.findings if path is None or finding.path == path}


def test_steps_per_epoch_batch_inside_each_bucket(tmp_path):
    for index in range(3):
        caption(make_image(tmp_path / "10_wide" / f"w{index}.png", (800, 600), index), "zk, wide")
    for index in range(2):
        caption(make_image(tmp_path / "2_tall" / f"t{index}.png", (600, 800), 10 + index), "zk, tall")
    report = check_dataset(tmp_path, HealthSettings(batch_size=4))
    assert [(f.path, f.repeats, f.image_count, f.samples) for f in report.concept_folders] == [
        ("10_wide", 10, 3, 30), ("2_tall", 2, 2, 4)]
    # 30 samples in 576x448 → 8 batches of 4; 4 samples in 448x576 → 1 batch (batches never mix buckets)
    assert report.samples_per_epoch == 34
    assert report.steps_per_epoch == 9
    assert steps_per_epoch([30, 4], 4) == 9
    assert report.bucket_histogram == (("576x448", 3), ("448x576", 2))
    assert report.resolution_histogram == (("800x600", 3), ("600x800", 2))
    with pytest.raises(UserError, match="batch"):
        steps_per_epoch([1], 0)


def test_each_image_gets_its_bucket_and_the_box_its_crop_keeps(tmp_path):
    caption(make_image(tmp_path / "5_zk" / "a.png", (800, 600), 0), "zk")
    image = check_dataset(tmp_path).images[0]
    # 800x600 → cover 576x448 at 597x448 → 21 px excess, 10 cut on the left, 11 on the right (resized pixels)
    assert image.bucket == (576, 448) and image.resized_size == (597, 448)
    assert image.crop_box == (13, 0, 785, 600)
    assert image.cut_off == pytest.approx(1 - 772 / 800, abs=1e-4)
    assert crop_in_image_pixels((512, 512), (512, 512), (512, 512)) == (0, 0, 512, 512)


def test_enlarged_and_too_small_images_are_named(tmp_path):
    folder = tmp_path / "10_zk"
    for name, size, seed in (("tiny.png", (200, 200), 1), ("small.png", (400, 400), 2), ("big.png", (1024, 1024), 3)):
        caption(make_image(folder / name, size, seed), "zk")
    report = check_dataset(tmp_path)
    assert "too-small" in kinds(report, "10_zk/tiny.png")
    assert "upscaled" in kinds(report, "10_zk/small.png")
    assert not kinds(report, "10_zk/big.png")
    no_upscale = check_dataset(tmp_path, HealthSettings(bucket_no_upscale=True))
    assert not {"too-small", "upscaled"} & kinds(no_upscale)
    assert {image.path: image.bucket for image in no_upscale.images}["10_zk/tiny.png"] == (192, 192)


def test_without_buckets_images_of_another_size_are_errors(tmp_path):
    caption(make_image(tmp_path / "10_zk" / "exact.png", (512, 512), 1), "zk")
    caption(make_image(tmp_path / "10_zk" / "other.png", (640, 480), 2), "zk")
    report = check_dataset(tmp_path, HealthSettings(enable_bucket=False))
    assert [(f.kind, f.path) for f in report.errors] == [("wrong-size", "10_zk/other.png")]


def test_without_buckets_random_crop_trains_a_larger_image_and_cached_latents_any_size(tmp_path):
    """As training plans it: with random_crop a larger image gives a patch at its own size (no error, not resized),
    a smaller one is still an error; cached latents are resized like a bucket, so neither is one."""
    from lora_trainer.dataset.health import check_dataset_config

    caption(make_image(tmp_path / "10_zk" / "large.png", (640, 576), 1), "zk")
    caption(make_image(tmp_path / "10_zk" / "small.png", (480, 480), 2), "zk")
    report = check_dataset(tmp_path, HealthSettings(enable_bucket=False, random_crop=True))
    assert [(f.kind, f.path) for f in report.errors] == [("wrong-size", "10_zk/small.png")]
    large = {image.path: image for image in report.images}["10_zk/large.png"]
    assert (large.bucket, large.resized_size, large.scale) == ((512, 512), (640, 576), 1.0)
    assert large.crop_box == (64, 32, 576, 544)
    cached = check_dataset(tmp_path, HealthSettings(enable_bucket=False, cache_latents=True))
    assert not cached.errors and "upscaled" in kinds(cached, "10_zk/small.png")
    config = tmp_path / "datasets.toml"  # a subset's own random_crop
    config.write_text(f'[[datasets]]\nresolution = 512\nenable_bucket = false\n[[datasets.subsets]]\n'
                      f'image_dir = "{(tmp_path / "10_zk").as_posix()}"\ncaption_extension = ".txt"\n'
                      'random_crop = true\n', encoding="utf-8")
    from_config = check_dataset_config(config, HealthSettings())
    assert [(f.kind, f.path) for f in from_config.errors] == [("wrong-size", "10_zk/small.png")]


def test_without_buckets_a_face_crop_trains_a_larger_image_named_with_its_face(tmp_path):
    """With the run's face_crop_aug_range, training cuts the resolution around the face a file's name gives
    (sd-scripts' name_<cx>_<cy>_<w>_<h>): a larger such image is no wrong size; one without a face in its name, or a
    smaller one (sd-scripts never enlarges it), still is; a TOML subset's own face_crop_aug_range does the same."""
    from lora_trainer.dataset.health import check_dataset_config

    caption(make_image(tmp_path / "10_zk" / "portrait_320_300_120_140.png", (640, 576), 1), "zk")
    caption(make_image(tmp_path / "10_zk" / "unnamed.png", (640, 576), 2), "zk")
    caption(make_image(tmp_path / "10_zk" / "small_200_200_80_80.png", (480, 480), 3), "zk")
    plain = check_dataset(tmp_path, HealthSettings(enable_bucket=False))
    assert sorted(f.path for f in plain.errors if f.kind == "wrong-size") == [
        "10_zk/portrait_320_300_120_140.png", "10_zk/small_200_200_80_80.png", "10_zk/unnamed.png"]
    face_crop = check_dataset(tmp_path, HealthSettings(enable_bucket=False, face_crop=True))
    assert sorted((f.kind, f.path) for f in face_crop.errors) == [("wrong-size", "10_zk/small_200_200_80_80.png"),
                                                                  ("wrong-size", "10_zk/unnamed.png")]
    unnamed = next(f.message for f in face_crop.errors if f.path == "10_zk/unnamed.png")
    assert "face_crop_aug_range crops only an image whose name gives its face (<name>_<cx>_<cy>_<w>_<h>" in unnamed
    config = tmp_path / "datasets.toml"
    config.write_text(f'[[datasets]]\nresolution = 512\nenable_bucket = false\n[[datasets.subsets]]\n'
                      f'image_dir = "{(tmp_path / "10_zk").as_posix()}"\ncaption_extension = ".txt"\n'
                      'face_crop_aug_range = [2.0, 4.0]\n', encoding="utf-8")
    from_config = check_dataset_config(config, HealthSettings())
    assert sorted(f.path for f in from_config.errors) == ["10_zk/small_200_200_80_80.png", "10_zk/unnamed.png"]


def test_bucket_options_that_contradict_the_resolution_are_one_error_not_one_per_image(tmp_path):
    for seed in range(3):
        caption(make_image(tmp_path / "10_zk" / f"{seed}.png", (64, 64), seed), "zk")
    with pytest.raises(UserError, match="min_bucket_reso 256 is larger than the shorter side of the resolution 64x64"):
        check_dataset(tmp_path, HealthSettings(resolution=(64, 64)))
    report = check_dataset(tmp_path, HealthSettings(resolution=(64, 64), min_bucket_reso=64, max_bucket_reso=128))
    assert not report.errors


def test_a_bucket_step_only_sdxl_takes_is_said_and_one_no_model_takes_is_an_error(tmp_path):
    """The check does not know the model: 32 px steps pass for SDXL and are refused by SD1/SD2 training."""
    caption(make_image(tmp_path / "10_zk" / "a.png", (512, 384), 1), "zk")
    kinds = lambda report: [(f.severity, f.kind) for f in report.findings if f.kind.startswith("bucket-step")]
    assert kinds(check_dataset(tmp_path, HealthSettings())) == []
    assert kinds(check_dataset(tmp_path, HealthSettings(bucket_reso_steps=32))) == [("note", "bucket-step-sdxl-only")]
    assert kinds(check_dataset(tmp_path, HealthSettings(bucket_reso_steps=48))) == [("error", "bucket-step")]
    assert kinds(check_dataset(tmp_path, HealthSettings(bucket_reso_steps=48, enable_bucket=False))) == []


def test_on_windows_a_mixed_case_extension_is_trained_as_sd_scripts_trains_it_there(tmp_path, monkeypatch):
    """sd-scripts globs *.jpg and *.JPG; Windows' file system ignores case, so there a.Jpg is trained, and was
    skipped here with a note claiming sd-scripts skips it too."""
    from lora_trainer.dataset import layouts
    from lora_trainer.dataset.tag_editor import open_folder

    monkeypatch.setattr(layouts, "CASE_FOLDING_FILE_SYSTEM", True)
    folder = tmp_path / "10_zk"
    caption(make_image(folder / "a.png", (512, 512), 1), "zk, a")
    caption(make_image(folder / "Mixed.Jpg", (512, 512), 3), "zk, b")
    report = check_dataset(tmp_path)
    assert sorted(image.path for image in report.images) == ["10_zk/Mixed.Jpg", "10_zk/a.png"]
    assert not [f for f in report.findings if f.kind == "unread-case"]
    assert [p.name for p in open_folder(folder).images] == ["Mixed.Jpg", "a.png"]


def test_images_the_trainer_skips_are_reported_and_a_wrong_caption_extension_is_named(tmp_path):
    """What the trainer warns about, the report says before: images in sub-folders of an image folder and an image
    extension in mixed case (both never read); captions under the other usual extension point at the option."""
    folder = tmp_path / "10_zk"
    caption(make_image(folder / "a.png", (512, 512), 1), "zk, a")
    make_image(folder / "outfit 1" / "b.png", (512, 512), 2)
    make_image(folder / "Mixed.Jpg", (512, 512), 3)
    report = check_dataset(tmp_path, HealthSettings(caption_extension=".caption"))
    by_path = {(f.kind, f.path): f.message for f in report.findings}
    assert "1 images in its sub-folders (outfit 1) are not trained" in by_path[("nested-images", "10_zk")]
    assert "Mixed.Jpg skipped" in by_path[("unread-case", "10_zk")]
    assert "its captions are .txt files: check with --caption-extension .txt" in by_path[("missing-caption", "10_zk/a.png")]


def test_caption_problems_name_the_file_and_the_fix(tmp_path):
    folder = tmp_path / "10_sks dog"
    make_image(folder / "missing.png", (512, 512), 1)
    caption(make_image(folder / "empty.png", (512, 512), 2), "")
    caption(make_image(folder / "blank.png", (512, 512), 5), "  \nsks dog, on the second line")
    make_image(folder / "gbk.png", (512, 512), 3).with_suffix(".txt").write_bytes("一只狗, 草地".encode("gbk"))
    caption(make_image(folder / "lines.png", (512, 512), 4), "sks dog, grass\nsecond line")
    make_image(folder / "bom.png", (512, 512), 6).with_suffix(".txt").write_bytes("\ufeffsks dog, bom".encode("utf-8"))
    make_image(folder / "wide.png", (512, 512), 7).with_suffix(".txt").write_bytes("sks dog, wide".encode("utf-16"))
    report = check_dataset(tmp_path)
    by_path = {(f.kind, f.path): f.message for f in report.findings}
    assert "class tokens 'sks dog'" in by_path[("missing-caption", "10_sks dog/missing.png")]
    # sd-scripts asserts on a file without lines; a blank first line is its (empty) caption: trained, not stopped
    assert "assertion" in by_path[("empty-caption", "10_sks dog/empty.txt")]
    assert "empty first line" in by_path[("blank-first-line", "10_sks dog/blank.txt")]
    assert "UTF-8" in by_path[("caption-not-utf8", "10_sks dog/gbk.txt")]
    assert ("multi-line-caption", "10_sks dog/lines.txt") in by_path
    # read right here, misread by sd-scripts (and so by --backend sd-scripts): said as a note
    assert "byte-order mark, which sd-scripts keeps glued to the first tag" in by_path[("caption-encoding", "10_sks dog/bom.txt")]
    assert "UTF-16, which stops sd-scripts" in by_path[("caption-encoding", "10_sks dog/wide.txt")]
    assert {f.kind for f in report.errors} == {"empty-caption", "caption-not-utf8"}
    trained = {image.path: (image.caption, image.caption_source) for image in report.images}
    assert trained["10_sks dog/missing.png"] == ("sks dog", "class tokens")
    assert trained["10_sks dog/lines.png"] == ("sks dog, grass", "file")
    assert trained["10_sks dog/bom.png"] == ("sks dog, bom", "file") and trained["10_sks dog/wide.png"][0] == "sks dog, wide"


def test_long_captions_are_graded_by_token_windows(tmp_path):
    folder = tmp_path / "1_zk"
    tokenizer = CLIPTokenizer.default()
    lengths = {"short": 10, "over75": 80, "over150": 160, "over225": 230}
    for seed, (name, count) in enumerate(lengths.items()):
        text = ", ".join(["cat"] * (count // 2))  # "cat" and "," are one token each
        assert len(tokenizer.encode(text)) == count - 1
        caption(make_image(folder / f"{name}.png", (512, 512), seed), text)
    report = check_dataset(tmp_path)
    assert not kinds(report, "1_zk/short.png")
    assert kinds(report, "1_zk/over75.png") == {"caption-over-75"}
    assert kinds(report, "1_zk/over150.png") == {"caption-over-150"}
    assert kinds(report, "1_zk/over225.png") == {"caption-over-225"}
    assert {image.path: image.tokens for image in report.images}["1_zk/over75.png"] == 79
    # a run that reads 225 tokens: only what it still cuts (it warned "cut at 75" for every long caption)
    report = check_dataset(tmp_path, HealthSettings(max_token_length=225))
    assert [(f.kind, f.path) for f in report.findings if f.kind.startswith("caption-over")] == [("caption-over-225", "1_zk/over225.png")]
    report = check_dataset(tmp_path, HealthSettings(max_token_length=150))
    assert "needs --max_token_length 225, else it is cut at 150" in {f.path: f.message for f in report.findings}["1_zk/over150.png"]
    assert not kinds(report, "1_zk/over75.png")
    with pytest.raises(UserError, match="max_token_length 100: sd-scripts reads 75, 150 or 225 tokens"):
        HealthSettings(max_token_length=100)


def test_tag_frequency_and_trigger_coverage(tmp_path):
    folder = tmp_path / "10_zkstar"
    caption(make_image(folder / "a.png", (512, 512), 1), "zkstar, Yellow Star, sky")
    caption(make_image(folder / "b.png", (512, 512), 2), "yellow star, ZKSTAR")
    caption(make_image(folder / "c.png", (512, 512), 3), "yellow star, zkstars")  # another word, not the trigger
    make_image(folder / "d.png", (512, 512), 4)  # no caption: trains on the class tokens "zkstar"
    report = check_dataset(tmp_path, HealthSettings(trigger="zkstar"))
    assert report.tag_frequency == (("yellow star", 3), ("zkstar", 3), ("sky", 1), ("zkstars", 1))
    assert report.images_without_trigger == ("10_zkstar/c.png",)
    assert "missing-trigger" in kinds(report, "10_zkstar/c.png")
    assert "zkstar" in report.to_text() and "in 3 of 4 captions" in report.to_text()
    assert mentions("a photo of Sks Dog, grass", "sks dog") and not mentions("sks doggo", "sks dog")


def test_a_trigger_that_shuffling_would_move_is_said(tmp_path):
    """Pony captions start with score tags: under keep_tokens 1 the trigger behind them is shuffled like any tag."""
    folder = tmp_path / "10_zkchar"
    caption(make_image(folder / "a.png", (512, 512), 1), "score_9, score_8_up, score_7_up, zkchar, 1girl, smile")
    caption(make_image(folder / "b.png", (512, 512), 2), "zkchar, 1girl, smile")
    caption(make_image(folder / "c.png", (512, 512), 3), "score_9, zkchar ||| 1girl, smile")
    shuffled = lambda **values: [f.message for f in check_dataset(tmp_path, HealthSettings(**values)).findings
                                 if f.kind == "trigger-shuffled"]
    [message] = shuffled(shuffle_caption=True, keep_tokens=1)  # the folder's class tokens are the trigger
    assert message.startswith("2 caption(s) have the trigger behind the tags kept in place (keep_tokens 1)")
    assert "e.g. 10_zkchar/a.png: 'zkchar' is tag 4); put it first, keep more tags in place (keep_tokens 4)" in message
    assert shuffled(shuffle_caption=True, keep_tokens=1, keep_tokens_separator="|||")[0].startswith("1 caption(s)")
    assert shuffled(shuffle_caption=True, keep_tokens=4) == [] and shuffled(keep_tokens=1) == []
    assert shuffled(shuffle_caption=True, keep_tokens=1, trigger="smile")[0].startswith("3 caption(s)")


def test_class_tokens_ignored_when_captions_exist(tmp_path):
    folder = tmp_path / "10_ohwx woman"
    caption(make_image(folder / "a.png", (512, 512), 1), "a woman, smiling")
    caption(make_image(folder / "b.png", (512, 512), 2), "ohwx woman, outdoors")
    report = check_dataset(tmp_path)
    [finding] = [f for f in report.findings if f.kind == "class-tokens-ignored"]
    assert finding.path == "10_ohwx woman" and "a.png" in finding.message and "b.png" not in finding.message
    caption(folder / "a.png", "ohwx woman, smiling")
    assert not kinds(check_dataset(tmp_path))


def test_folder_names_sd_scripts_skips_or_misreads(tmp_path):
    make_image(tmp_path / "10_" / "a.png", (512, 512), 1)
    make_image(tmp_path / "abc_dog" / "b.png", (512, 512), 2)
    make_image(tmp_path / "loose.png", (512, 512), 3)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    report = check_dataset(tmp_path)
    messages = {(f.kind, f.path): f.message for f in report.findings}
    assert "rename it to 20_abc_dog" in messages[("skipped-folder", "abc_dog")]
    assert "empty caption" in messages[("missing-caption", "10_/a.png")]
    assert ("loose-images", ".") in messages
    assert [image.path for image in report.images] == ["10_/a.png"]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing moved or written


def test_flat_folder_is_checked_and_told_what_to_rename(tmp_path):
    folder = tmp_path / "my photos"
    for index in range(4):
        caption(make_image(folder / f"{index}.jpg", (640, 640), index), "me")
    report = check_dataset(folder)
    [finding] = [f for f in report.findings if f.kind == "flat-folder"]
    assert "rename the folder to 20_my photos" in finding.message
    assert report.concept_folders[0].repeats == 1 and report.samples_per_epoch == 4
    concept = tmp_path / "5_me"
    folder.rename(concept)
    report = check_dataset(concept)
    assert kinds(report) == {"concept-folder-given"} and report.samples_per_epoch == 20


def test_zero_valid_images_and_corrupt_files(tmp_path):
    (tmp_path / "10_zk").mkdir()
    (tmp_path / "10_zk" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "10_zk" / "zero.jpg").write_bytes(b"")
    report = check_dataset(tmp_path)
    assert {(f.kind, f.path) for f in report.errors} == {
        ("corrupt-image", "10_zk/broken.png"), ("corrupt-image", "10_zk/zero.jpg"), ("no-images", ".")}
    broken = next(f for f in report.errors if f.path == "10_zk/broken.png")
    assert broken.message.endswith("; re-export it or remove it: sd-scripts stops on it."), broken.message  # not "it. ("
    good = make_image(tmp_path / "10_zk" / "good.png", (512, 512), 1)
    truncated = tmp_path / "10_zk" / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    report = check_dataset(tmp_path)
    assert [image.path for image in report.images] == ["10_zk/good.png"]
    assert "corrupt-image" in kinds(report, "10_zk/truncated.png") and "no-images" not in kinds(report)
    with pytest.raises(UserError, match="not a folder"):
        check_dataset(tmp_path / "nope")


def test_near_duplicates_are_grouped_and_distinct_images_are_not(tmp_path):
    folder = tmp_path / "10_zk"
    original = make_image(folder / "a.png", (800, 600), 1)
    Image.open(original).resize((400, 300)).save(folder / "a small.jpg", quality=85)
    for index in range(8):
        make_image(folder / f"other{index}.png", (800, 600), 100 + index)
    report = check_dataset(tmp_path)
    assert report.near_duplicates == (("10_zk/a small.jpg", "10_zk/a.png"),)
    assert near_duplicate_groups({"x": 0b0, "y": 0b111, "z": 0b111111 << 20}, 3) == (("x", "y"),)
    gradient = np.add.outer(np.arange(32.0), np.arange(32.0) * 2) + 20
    assert perceptual_hash(gradient) == perceptual_hash(gradient + 40)  # brightness alone changes nothing
    assert perceptual_hash(gradient) != perceptual_hash(gradient[::-1])
    assert perceptual_hash(np.full((32, 32), 10.0)) == perceptual_hash(np.full((32, 32), 200.0))  # blank is blank


def test_shared_captions_and_unread_formats(tmp_path):
    folder = tmp_path / "10_zk"
    caption(make_image(folder / "a.png", (512, 512), 1), "zk")
    make_image(folder / "a.jpg", (512, 512), 2)
    make_image(folder / "anim.gif", (64, 64), 3)
    report = check_dataset(tmp_path)
    assert "shared-caption" in kinds(report, "10_zk/a.txt")
    assert "unread-format" in kinds(report, "10_zk/anim.gif")


def test_report_is_stable_json_and_text_with_unicode_paths(tmp_path):
    folder = tmp_path / "数据 集" / "3_猫 cat"
    caption(make_image(folder / "图 1.png", (768, 512), 1), "猫, cat")
    caption(make_image(folder / "图 2.png", (512, 768), 2), "")
    first = check_dataset(tmp_path / "数据 集", HealthSettings(resolution=(512, 512), batch_size=2, trigger="cat"))
    second = check_dataset(tmp_path / "数据 集", HealthSettings(resolution=(512, 512), batch_size=2, trigger="cat"))
    assert first == second and first.to_json() == second.to_json()
    data = json.loads(first.to_json())
    assert [image["path"] for image in data["images"]] == ["3_猫 cat/图 1.png", "3_猫 cat/图 2.png"]
    assert data["images"][0]["crop_box"] == list(first.images[0].crop_box)
    assert data["findings"][0]["severity"] == "error"
    text = first.to_text()
    assert "3_猫 cat: 3 repeats x 2 images = 6 samples" in text
    assert "steps per epoch at batch size 2: 4" in text  # two buckets of 3 samples: 2 + 2 batches
    assert "error   empty-caption" in text


def test_a_dataset_toml_is_checked_subset_by_subset_each_dataset_at_its_batch_size(tmp_path):
    """sd-scripts sums the datasets' batches: 3 × 4 samples at batch 2 and 5 samples in two buckets at batch 1 are
    6 + 5 steps; a regularisation subset is trained but not counted here, and said."""
    from lora_trainer.dataset.health import check_dataset_config

    for index in range(4):
        caption(make_image(tmp_path / "chars" / f"a{index}.png", (64, 64), index), f"zkchar, pose {index}")
    for index in range(5):
        make_image(tmp_path / "style" / f"b{index}.png", (64, 32) if index % 2 else (32, 64), 10 + index)
    make_image(tmp_path / "reg" / "r.png", (64, 64), 99)
    config = tmp_path / "datasets.toml"
    config.write_text(
        '[general]\ncaption_extension = ".txt"\nenable_bucket = true\nmin_bucket_reso = 32\nbucket_reso_steps = 32\n'
        f'[[datasets]]\nresolution = 64\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "{(tmp_path / "chars").as_posix()}"\n'
        f'num_repeats = 3\n[[datasets.subsets]]\nimage_dir = "{(tmp_path / "reg").as_posix()}"\nis_reg = true\n'
        f'[[datasets]]\nresolution = 64\nbatch_size = 1\n[[datasets.subsets]]\nimage_dir = "{(tmp_path / "style").as_posix()}"\n'
        'class_tokens = "zkstyle"\n', encoding="utf-8")
    report = check_dataset_config(config, HealthSettings())
    assert [(f.path, f.repeats, f.class_tokens, f.image_count) for f in report.concept_folders] == [
        ("chars", 3, "", 4), ("style", 1, "zkstyle", 5)]
    assert report.samples_per_epoch == 17 and report.steps_per_epoch == 6 + 5
    assert "not-counted" in kinds(report, (tmp_path / "reg").as_posix()) and report.folder == str(config)
    assert report.settings.batch_size == 2 and report.settings.resolution == (64, 64)  # the first dataset's header


def test_a_caption_that_cannot_be_read_is_a_finding_naming_it_not_a_traceback(tmp_path):
    """No read permission (or, here, a folder with the caption's name) raised out of check, prep, the tag editor
    and training as a raw OSError."""
    from lora_trainer.dataset import tag_editor

    make_image(tmp_path / "10_zk" / "a.png", (64, 64), 1)
    caption(make_image(tmp_path / "10_zk" / "b.png", (64, 64), 2), "zk")
    (tmp_path / "10_zk" / "a.txt").mkdir()
    report = check_dataset(tmp_path, HealthSettings(resolution=(64, 64), min_bucket_reso=64))
    assert "caption-unreadable" in kinds(report, "10_zk/a.txt") and "cannot be read" in report.to_text()
    editor = tag_editor.open_folder(tmp_path / "10_zk")
    assert "a.txt: cannot be read" in editor.unreadable[tmp_path / "10_zk" / "a.png"]


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="symlinks need privileges on Windows")
def test_images_that_are_links_to_nothing_are_said_by_check_training_and_prep(tmp_path):
    """A library on a drive that is not mounted: the links were dropped without a word (prep gave the wrong reason);
    sd-scripts lists them and stops at the first."""
    from lora_trainer.dataset.config import SubsetConfig
    from lora_trainer.dataset.layouts import dreambooth_images
    from lora_trainer.dataset.preprocess import PrepSettings, prepare_dataset

    folder = tmp_path / "data" / "10_zk"
    caption(make_image(folder / "a.png", (64, 64), 1), "zk")
    os.symlink(tmp_path / "unmounted" / "b.png", folder / "b.png")
    report = check_dataset(tmp_path / "data", HealthSettings(resolution=(64, 64), min_bucket_reso=64))
    said = "b.png links to a file that is not there (a drive not mounted?): not trained here, and sd-scripts stops"
    assert "broken-link" in kinds(report, "10_zk") and said in report.to_text()
    assert any(said in note for note in dreambooth_images(SubsetConfig("dreambooth", image_dir=folder,
                                                                       caption_extension=".txt")).notes)
    prepared = prepare_dataset(tmp_path / "data", tmp_path / "out", PrepSettings(size=64))
    assert prepared.skipped == (("10_zk/b.png", "a link to a file that is not there (a drive not mounted?)"),)
    assert not prepared.not_read


def test_pictures_sd_scripts_trains_otherwise_are_noted_per_folder(tmp_path):
    """The check says "what sd-scripts will do": a phone photo shows upright (and trains so here), sd-scripts trains
    it sideways; 16-bit and transparent pictures differ too."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "10_zk").mkdir()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(tmp_path / "10_zk" / "photo.jpg", exif=exif.tobytes())
    caption(tmp_path / "10_zk" / "photo.jpg", "zk, photo")
    caption(make_image(tmp_path / "10_zk" / "plain.png", (64, 64), 3), "zk")
    report = check_dataset(tmp_path, HealthSettings(resolution=(64, 64), min_bucket_reso=64))
    note = next(f.message for f in report.findings if f.kind == "sd-scripts-reads-otherwise")
    assert note.startswith("1 picture(s) sd-scripts trains otherwise than shown here (and trained here), e.g. photo.jpg "
                           "has an EXIF orientation, which sd-scripts ignores")
    assert next(i for i in report.images if i.path.endswith("photo.jpg")).size == (64, 96)  # upright, as trained here


def test_a_large_jpeg_is_decoded_at_an_eighth_of_its_size_and_a_truncated_one_is_still_found(tmp_path, monkeypatch):
    """A 12-megapixel phone photo took a quarter of a second to decode whole; its size comes from the header and its
    thumbnail from a decode at an eighth of the size, which still reads the file to its end."""
    from PIL import ImageFile

    folder = tmp_path / "10_zk"
    photo = make_image(folder / "photo.jpg", (2048, 1536), 1)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the check reports it upright and hashes it upright
    Image.open(photo).rotate(90, expand=True).save(folder / "turned.jpg", exif=exif.tobytes(), quality=95)
    (folder / "truncated.jpg").write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    decoded: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def counting_load(image):
        decoded.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    report = check_dataset(tmp_path)
    assert {image.path: image.size for image in report.images} == {"10_zk/photo.jpg": (2048, 1536),
                                                                    "10_zk/turned.jpg": (2048, 1536)}
    assert decoded and all(max(size) <= 256 for size in decoded)  # an eighth of 2048 (the turned photo: 192 × 256)
    truncated = next(f for f in report.findings if f.path == "10_zk/truncated.jpg")
    assert truncated.kind == "corrupt-image" and "truncated" in truncated.message
    assert report.near_duplicates == (("10_zk/photo.jpg", "10_zk/turned.jpg"),)


def test_a_second_check_of_an_unchanged_folder_opens_no_image_again(tmp_path, monkeypatch):
    """The Train tab's Validate checks the folder and Start checks it again: the second reads only what changed
    (and what could not be read, which may have been fixed since)."""
    opened: list[str] = []
    open_image = Image.open

    def counting_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return open_image(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    folder = tmp_path / "10_zk"
    for index in range(4):
        caption(make_image(folder / f"{index}.png", (256, 256), index), "zk")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    first = check_dataset(tmp_path)
    assert {"0.png", "3.png", "broken.png"} <= set(opened)
    opened.clear()
    assert check_dataset(tmp_path) == first
    assert opened == ["broken.png"]
    opened.clear()
    make_image(folder / "2.png", (320, 256), 9)
    os.utime(folder / "2.png", ns=(1, 1))  # a copy that keeps another modification time is read again too
    second = check_dataset(tmp_path)
    assert sorted(set(opened)) == ["2.png", "broken.png"]
    assert {image.path: image.size for image in second.images}["10_zk/2.png"] == (320, 256)


def test_a_file_replaced_by_one_of_the_same_size_and_modification_time_is_read_again(tmp_path):
    """On FAT (2-second times) or after a copy that keeps the source's time, a replaced picture kept its old size,
    bucket and hash in the report."""
    folder = tmp_path / "10_zk"
    picture = caption(make_image(folder / "a.bmp", (64, 48), 1), "zk").with_suffix(".bmp")
    assert [image.size for image in check_dataset(tmp_path).images] == [(64, 48)]
    replacement = make_image(tmp_path / "copy" / "a.bmp", (48, 64), 2)  # BMP rows of 192 and 144 bytes: same size
    assert replacement.stat().st_size == picture.stat().st_size
    os.utime(replacement, ns=(picture.stat().st_atime_ns, picture.stat().st_mtime_ns))
    os.replace(replacement, picture)
    assert [image.size for image in check_dataset(tmp_path).images] == [(48, 64)]


def test_the_text_of_a_large_dataset_names_the_commonest_sizes_and_a_few_files_of_each_kind(tmp_path):
    """1500 phone photos made 4957 lines (a line per size and per finding); the JSON keeps every one."""
    from dataclasses import replace

    from lora_trainer.dataset.health import Finding, report_lines

    caption(make_image(tmp_path / "10_zk" / "a.png", (512, 512), 1), "zk")
    names = [f"10_zk/{index:04d}.png" for index in range(1500)]
    report = replace(
        check_dataset(tmp_path),
        resolution_histogram=(("4032x3024", 12),) + tuple((f"{600 + index}x800", 1) for index in range(1488)),
        near_duplicates=tuple((names[index], names[index + 1]) for index in range(0, 60, 2)) + (tuple(names[100:140]),),
        findings=tuple(Finding("warning", "too-small", name, "is enlarged 4.0x") for name in names)
        + tuple(Finding("warning", "missing-trigger", name, "the caption lacks the trigger word") for name in names[:600]))
    lines = report_lines(report)
    assert len(lines) < 60 and max(map(len, lines)) < 400
    assert lines[lines.index("Image sizes:") + 1].split() == ["4032x3024", "12"]
    assert "  … and 1479 more sizes (1479 images)" in lines
    assert "  … and 21 more groups" in lines
    assert [line for line in lines if "too-small" in line][5:] == [
        "  warning too-small            … and 1495 more (1500 in all)"]
    assert "  warning missing-trigger      … and 595 more (600 in all)" in lines
    data = json.loads(report.to_json())
    assert len(data["findings"]) == 2100 and len(data["resolution_histogram"]) == 1489


def test_near_duplicate_groups_are_every_pair_within_the_bits_joined_transitively():
    """The groups of a fixed random set with planted near-copies and a chain (a ~ b ~ c, a and c further apart) are
    those of comparing every pair bit by bit."""
    rng = np.random.default_rng(7)
    values = rng.integers(0, 2**63, 400, dtype=np.uint64) * 2 + rng.integers(0, 2, 400, dtype=np.uint64)  # all 64 bits
    hashes = {f"img{index:03d}": int(value) for index, value in enumerate(values)}
    for index in range(0, 60, 3):  # near-copies 1 to 6 bits from an original; 7 and 8 bits away are other pictures
        original = hashes[f"img{index:03d}"]
        for copy, flipped in enumerate(((63,), (0, 5, 9), (1, 2, 3, 4, 60, 61), range(20, 27), range(56, 64))):
            hashes[f"img{index:03d}-{copy}"] = original ^ sum(1 << bit for bit in flipped)
    hashes["chain-a"], hashes["chain-b"], hashes["chain-c"] = 0, (1 << 6) - 1, (1 << 12) - 1
    hashes["top"] = 2**64 - 1  # every bit set
    hashes["top-copy"] = 2**64 - 1 - (1 << 63)

    names = sorted(hashes)
    parent = {name: name for name in names}

    def root(name):
        while parent[name] != name:
            name = parent[name]
        return name

    for first in names:
        for second in names:
            if first < second and bin(hashes[first] ^ hashes[second]).count("1") <= 6:
                parent[root(second)] = root(first)
    expected = {}
    for name in names:
        expected.setdefault(root(name), []).append(name)
    groups = near_duplicate_groups(hashes, 6)
    assert groups == tuple(sorted(tuple(group) for group in expected.values() if len(group) > 1))
    assert ("chain-a", "chain-b", "chain-c") in groups and ("top", "top-copy") in groups
    assert ("img000", "img000-0", "img000-1", "img000-2") in groups  # 7 bits away is another picture
