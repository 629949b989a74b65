"""Dataset layouts: DreamBooth folders, captions by extension and fine-tuning metadata are found as sd-scripts finds them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from lora_trainer.dataset.buckets import select_bucket
from lora_trainer.dataset.config import load_dataset_config, resolve_dataset_config
from lora_trainer.dataset.health import check_dataset
from lora_trainer.dataset.layouts import (
    caption_fallback_notes,
    config_from_folders,
    config_from_metadata,
    dataset_images,
    dreambooth_images,
    list_images,
    parse_repeats_folder_name,
    regularization_repeats,
    scan_dreambooth_folders,
)
from lora_trainer.errors import UserError
from reference import REFERENCE

FIXTURES = REFERENCE / "kohya-fixtures"
CLI = {"resolution": "512", "caption_extension": ".txt"}


def image(path: Path, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def caption(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def only_subset(folder: Path, **options):
    group = resolve_dataset_config({"datasets": [{"subsets": [{"image_dir": str(folder), **options}]}]}, "test", CLI)
    return group.datasets[0].subsets[0]


@pytest.mark.parametrize(
    "name, parsed",
    [
        ("10_sks dog", (10, "sks dog")),
        ("10_my_dog", (10, "my_dog")),  # underscores after the first stay in the class tokens
        ("10_", (10, "")),  # repeats without class tokens: accepted, as sd-scripts does
        ("3", (3, "")),
        ("abc_dog", None),  # no number: skipped
        ("0_dog", None),  # fewer than 1 repeat: skipped
        ("-2_dog", None),
        ("1.5_dog", None),
    ],
)
def test_folder_names_give_repeats_and_class_tokens_like_sd_scripts(name, parsed):
    assert parse_repeats_folder_name(name) == parsed


def test_folder_scan_keeps_good_folders_and_says_how_to_rename_the_others(tmp_path):
    for name in ("10_zk star", "5_", "empty"):
        (tmp_path / name).mkdir()
    for index in range(40):
        image(tmp_path / "abc_dog" / f"{index}.png")
    image(tmp_path / "0_cat" / "a.png")
    image(tmp_path / "²_x" / "a.png")  # a digit to str.isdigit, not to int(): it crashed the scan
    (tmp_path / "notes.txt").write_text("not a folder", encoding="utf-8")
    scan = scan_dreambooth_folders(tmp_path)
    assert [(Path(s["image_dir"]).name, s["num_repeats"], s["class_tokens"]) for s in scan.subsets] == [("10_zk star", 10, "zk star"), ("5_", 5, "")]
    notes = " ".join(scan.notes)
    assert "'abc_dog' (40 image(s), rename it to 5_abc_dog)" in notes
    assert "'0_cat' (1 image(s), it asks for 0 repeats; rename it to 20_cat)" in notes
    assert "'empty' (no images)" in notes and "'²_x' (1 image(s), rename it to 20_²_x)" in notes
    assert "5_: the folder name gives no class tokens" in notes
    # the same names as dataset check suggests: one rule, not two hints that disagree
    findings = {f.path: f.message for f in check_dataset(tmp_path).findings if f.kind == "skipped-folder"}
    assert "rename it to 5_abc_dog." in findings["abc_dog"] and "rename it to 20_cat." in findings["0_cat"]


def test_images_directly_in_the_train_folder_are_explained(tmp_path):
    image(tmp_path / "a.png")
    with pytest.raises(UserError, match=r"holds 1 images directly.*10_mytrigger"):
        scan_dreambooth_folders(tmp_path)


def test_a_concept_folder_given_as_train_folder_says_to_give_its_parent_and_hidden_folders_are_passed_over(tmp_path):
    concept = tmp_path / "5_zkchar 女孩"
    image(concept / "a.png")
    with pytest.raises(UserError, match=r"5_zkchar 女孩 is itself a <repeats>_<name> folder \(5 repeats\): give the "
                                        r"folder that holds it, --train_data_dir " + str(tmp_path).replace("\\", "\\\\")):
        scan_dreambooth_folders(concept)
    (tmp_path / ".caption-backups" / "2026-12-04_10-00-00").mkdir(parents=True)  # the tag editor's, never a subset
    assert "caption-backups" not in " ".join(scan_dreambooth_folders(tmp_path).notes)


def test_images_in_sub_folders_of_an_image_folder_are_said_not_to_train(tmp_path):
    """sd-scripts reads an image folder's own files: outfits sorted into sub-folders would silently train nothing."""
    folder = tmp_path / "10_zk"
    for name in ("outfit 1/a.png", "outfit 1/b.png", "outfit 2/c.png", ".caption-backups/d.png"):
        image(folder / name)
    image(folder / "e.png")
    notes = " ".join(dreambooth_images(only_subset(folder)).notes)
    assert "3 images in its sub-folders (outfit 1, outfit 2) are not trained" in notes and "move them up into 10_zk" in notes


def test_a_blank_first_line_is_said_to_train_an_empty_caption(tmp_path):
    """sd-scripts trains on the first line, here empty (it stops only on a file without any line)."""
    folder = tmp_path / "1_x"
    image(folder / "a.png"), caption(folder / "a.txt", "\nzk, red star")
    loaded = dreambooth_images(only_subset(folder))
    assert loaded.images[0].caption == ""
    assert any("the first line of a.txt is empty" in note for note in loaded.notes)


def test_a_train_folder_with_only_badly_named_folders_lists_them(tmp_path):
    (tmp_path / "abc_dog").mkdir()
    with pytest.raises(UserError, match=r"no subfolder named <repeats>_<name>.*abc_dog"):
        scan_dreambooth_folders(tmp_path)


def test_a_missing_train_folder_is_named(tmp_path):
    with pytest.raises(UserError, match="--train_data_dir .*nope is not a folder"):
        scan_dreambooth_folders(tmp_path / "nope")


def test_folder_mode_config_uses_folder_repeats_and_marks_regularisation_folders(tmp_path):
    (tmp_path / "train" / "10_zk").mkdir(parents=True)
    (tmp_path / "reg" / "1_person").mkdir(parents=True)
    group = config_from_folders(tmp_path / "train", tmp_path / "reg", CLI)
    train, reg = group.datasets[0].subsets
    assert (train.num_repeats, train.class_tokens, train.is_reg, train.caption_extension) == (10, "zk", False, ".txt")
    assert (reg.num_repeats, reg.class_tokens, reg.is_reg) == (1, "person", True)


def test_images_are_listed_by_sd_scripts_extensions_in_lower_or_upper_case(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.webp", "d.bmp", "e.jpeg", "f.gif", ".hidden.png", "g.Png"):
        image(tmp_path / name)
    assert [path.name for path in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp", "d.bmp", "e.jpeg"]
    notes = dreambooth_images(only_subset(tmp_path)).notes
    assert any("g.Png skipped" in note for note in notes)


def test_captions_come_from_the_caption_extension_else_class_tokens(tmp_path):
    folder = tmp_path / "10_zk"
    image(folder / "a.png"), caption(folder / "a.txt", "zk, red star\nsecond line")
    image(folder / "b.png"), caption(folder / "b.caption", "ignored: wrong extension")
    loaded = dreambooth_images(only_subset(folder, class_tokens="zk"))
    assert [(entry.path.name, entry.caption) for entry in loaded.images] == [("a.png", "zk, red star"), ("b.png", "zk")]
    assert loaded.images[0].caption_file == folder / "a.txt" and loaded.images[1].caption_file is None
    # said by the trainer once it knows which images it can read (caption_fallback_notes), not while listing them
    assert not any("have no .txt caption" in note for note in loaded.notes)
    assert caption_fallback_notes(loaded.subset, loaded.images) == [
        f"{folder}: 1 images have no .txt caption and train with the class tokens 'zk': b.png. 1 of them have a "
        ".caption file beside them: add --caption_extension .caption to train with those."]
    assert caption_fallback_notes(loaded.subset, loaded.images[:1]) == []  # b.png left out: nothing to say
    # from a dataset TOML, whose subset value wins over the command line's: the fix is in that file
    assert caption_fallback_notes(loaded.subset, loaded.images, "data.toml")[0].endswith(
        'set caption_extension = ".caption" for this subset in data.toml to train with those.')


def test_wildcard_subsets_keep_every_non_empty_caption_line(tmp_path):
    folder = tmp_path / "1_x"
    image(folder / "a.png"), caption(folder / "a.txt", " one \n\n two \n")
    assert dreambooth_images(only_subset(folder, enable_wildcard=True)).images[0].caption == "one\ntwo"


def test_face_crop_images_use_the_caption_of_their_source(tmp_path):
    folder = tmp_path / "1_x"
    image(folder / "photo_120_80_40_40.png"), caption(folder / "photo.txt", "face")
    assert dreambooth_images(only_subset(folder)).images[0].caption == "face"


def test_an_empty_caption_file_names_the_file_and_the_fix(tmp_path):
    folder = tmp_path / "1_x"
    image(folder / "a.png"), caption(folder / "a.txt", b"")
    with pytest.raises(UserError, match=r"Empty caption files .*a\.txt.*delete"):
        dreambooth_images(only_subset(folder))


def test_a_gbk_caption_names_the_file_and_says_to_resave_as_utf8(tmp_path):
    folder = tmp_path / "1_x"
    image(folder / "a.png"), caption(folder / "a.txt", "红色的星星".encode("gbk"))
    with pytest.raises(UserError, match=r"a\.txt.*UTF-8"):
        dreambooth_images(only_subset(folder))


def test_duplicate_stems_are_reported_and_both_images_still_train(tmp_path):
    folder = tmp_path / "1_x"
    image(folder / "a.png"), image(folder / "a.jpg"), caption(folder / "a.txt", "star")
    loaded = dreambooth_images(only_subset(folder))
    assert [entry.caption for entry in loaded.images] == ["star", "star"]
    assert any("a.jpg and a.png" in note and "share the name 'a'" in note for note in loaded.notes)


def test_unicode_and_spaces_in_folder_and_file_names(tmp_path):
    train = tmp_path / "データ セット"
    folder = train / "10_猫 cat"
    image(folder / "画像 1.png"), caption(folder / "画像 1.txt", "猫, 白い背景")
    group = config_from_folders(train, None, CLI)
    loaded = dataset_images(group.datasets[0])
    (subset,) = loaded.subsets
    assert subset.subset.class_tokens == "猫 cat"
    assert [(entry.path.name, entry.caption) for entry in subset.images] == [("画像 1.png", "猫, 白い背景")]
    assert loaded.tag_frequency == {"10_猫 cat": {"猫": 1, "白い背景": 1}}


def test_folders_without_resolution_ask_for_the_option_not_for_a_file_to_set_it_in(tmp_path):
    image(tmp_path / "10_zk" / "a.png")
    with pytest.raises(UserError, match=r"^--train_data_dir .*: no --resolution; give the training size") as error:
        config_from_folders(tmp_path, None, {"caption_extension": ".txt"})
    assert "[[datasets]]" not in str(error.value) and error.value.field == "resolution"
    with pytest.raises(UserError, match=r"--resolution 96,128 is not a multiple of --bucket_reso_steps 64; use 64,128 or "
                                        r"128,128, or add --enable_bucket") as error:
        config_from_folders(tmp_path, None, {"resolution": "96,128"})
    assert "[[datasets]]" not in str(error.value)


def test_a_dataset_without_any_image_is_refused_with_the_folders_it_looked_in(tmp_path):
    (tmp_path / "10_zk").mkdir()
    group = config_from_folders(tmp_path, None, CLI)
    with pytest.raises(UserError, match=r"No training images found in .*10_zk; add images"):
        dataset_images(group.datasets[0])
    moved = dataclasses.replace(group.datasets[0].subsets[0], image_dir=tmp_path / "moved away")
    with pytest.raises(UserError, match=r"No training images found in .*moved away \(.*moved away: no such folder\); add"):
        dataset_images(dataclasses.replace(group.datasets[0], subsets=(moved,)))


def test_the_fixture_toml_counts_and_tag_frequency_match_sd_scripts_own_metadata(tmp_path):
    text = (FIXTURES / "configs" / "dataset.toml").read_text(encoding="utf-8").replace("{FIXTURES}", str(FIXTURES))
    (tmp_path / "dataset.toml").write_text(text, encoding="utf-8")
    dataset = load_dataset_config(tmp_path / "dataset.toml", {"caption_extension": ".caption"}).datasets[0]
    loaded = dataset_images(dataset)
    metadata = safe_open(str(FIXTURES / "lora-toml-variant" / "tinylora_toml.safetensors"), "pt").metadata()
    assert loaded.num_train_images == int(metadata["ss_num_train_images"]) == 40
    assert json.dumps(loaded.tag_frequency) == metadata["ss_tag_frequency"]  # same dict, same order

    # and the buckets sd-scripts logged for that run: {(64,192): 4, (128,128): 36} with repeats
    counts: dict[tuple[int, int], int] = {}
    errors = []
    for subset in loaded.subsets:
        for entry in subset.images:
            with Image.open(entry.path) as opened:
                choice = select_bucket(opened.size, dataset.bucket_settings)
            counts[choice.bucket] = counts.get(choice.bucket, 0) + subset.subset.num_repeats
            errors.append(abs(choice.aspect_error))
    bucket_info = json.loads(metadata["ss_datasets"])[0]["bucket_info"]
    assert counts == {tuple(b["resolution"]): b["count"] for b in bucket_info["buckets"].values()}
    assert sum(errors) / len(errors) == pytest.approx(bucket_info["mean_img_ar_error"])


def test_the_fixture_folder_mode_tag_frequency_matches_the_baseline_run():
    group = config_from_folders(FIXTURES / "dataset" / "train", None, {"resolution": "128", "caption_extension": ".txt"})
    loaded = dataset_images(group.datasets[0])
    metadata = safe_open(str(FIXTURES / "lora-baseline" / "tinylora.safetensors"), "pt").metadata()
    assert json.dumps(loaded.tag_frequency) == metadata["ss_tag_frequency"]
    assert loaded.num_train_images == int(metadata["ss_num_train_images"]) == 160


def test_fine_tuning_metadata_joins_caption_and_tags_and_counts_only_tags(tmp_path):
    image(tmp_path / "img" / "a.png"), image(tmp_path / "img" / "b.jpg")
    metadata = {"a.png": {"caption": "a red star", "tags": "star, red"}, "b": {"tags": "Blue"}}
    (tmp_path / "meta.json").write_text(json.dumps(metadata), encoding="utf-8")
    dataset = config_from_metadata(tmp_path / "img", tmp_path / "meta.json", CLI).datasets[0]
    loaded = dataset_images(dataset)
    entries = {entry.path.name: entry.caption for entry in loaded.subsets[0].images}
    # a key without extension (merge_captions_to_metadata without --full_path) finds b.jpg
    assert entries == {"a.png": "a red star,star, red", "b.jpg": "Blue"}
    assert loaded.tag_frequency == {"meta.json": {"star": 1, "red": 1, "blue": 1}}
    # each entry's own share of the count, for an image the trainer leaves out later
    counted = {entry.path.name: entry.counted_tags for entry in loaded.subsets[0].images}
    assert counted == {"a.png": "star, red", "b.jpg": "Blue"}


def test_fine_tuning_json_lines_and_sizes_from_metadata(tmp_path):
    image(tmp_path / "a.png")
    line = {"image_path": str(tmp_path / "a.png"), "caption": "star", "image_size": [640, 480]}
    (tmp_path / "meta.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
    dataset = config_from_metadata(None, tmp_path / "meta.jsonl", CLI).datasets[0]
    (entry,) = dataset_images(dataset).subsets[0].images
    assert (entry.caption, entry.image_size) == ("star", (640, 480))


def test_relative_metadata_keys_without_image_dir_say_what_to_set(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"a.png": {"caption": "x"}}), encoding="utf-8")
    dataset = config_from_metadata(None, tmp_path / "meta.json", CLI).datasets[0]
    with pytest.raises(UserError, match=r"relative path .*set image_dir"):
        dataset_images(dataset)


def test_broken_metadata_json_names_the_file_and_line(tmp_path):
    (tmp_path / "meta.json").write_text('{"a.png": {"caption": "x",}}', encoding="utf-8")
    dataset = config_from_metadata(tmp_path, tmp_path / "meta.json", CLI).datasets[0]
    with pytest.raises(UserError, match=r"meta\.json is not valid JSON.*line 1"):
        dataset_images(dataset)


@pytest.mark.parametrize(
    "train, reg, expected",
    [
        (10, [1, 1, 1], [4, 3, 3]),  # first pass uses each once, then one more each in turns until 10
        (5, [10, 1], [10, 0]),  # the first reg folder already covers the training samples: the second is unused
        (6, [2, 2], [3, 3]),
        (4, [], []),
    ],
)
def test_regularisation_repeats_are_balanced_to_the_training_samples(train, reg, expected):
    assert regularization_repeats(train, reg) == expected
