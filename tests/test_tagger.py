from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.dataset.tagger import (
    Label,
    TagSelection,
    check_tagger_folder,
    merged_caption,
    prepare_image,
    propose_captions,
    select_tags,
    tag_folder,
    write_proposal,
)
from lora_trainer.dataset.tag_editor import find_images
from lora_trainer.errors import UserError

# selected_tags.csv of the tiny test model: 4 ratings first, as in SmilingWolf's files. Each tag's probability is a
# fixed mix of the mean blue, green and red of the model's input (BGR order, 0–1), so colours tell what it saw.
TAGS_CSV = """tag_id,name,category,count
1,general,9,100
2,sensitive,9,100
3,questionable,9,100
4,explicit,9,100
10,blue_sky,0,50
11,green_grass,0,50
12,red_hair,0,50
13,^_^,0,50
14,hatsune_miku,4,50
15,simple_background,0,50
"""
#                 general sensitive questionable explicit blue_sky green_grass red_hair ^_^ hatsune_miku simple_background
WEIGHTS = np.array(
    [
        [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1 / 3],  # blue
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1 / 3],  # green
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.9, 0.8, 1 / 3],  # red
    ],
    dtype=np.float32,
)
INPUT_SIZE = 16
LABELS = [Label(name, category) for name, category in [
    ("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9), ("blue_sky", 0), ("green_grass", 0),
    ("red_hair", 0), ("^_^", 0), ("hatsune_miku", 4), ("simple_background", 0),
]]


def expected_probabilities(bgr_means: tuple[float, float, float]) -> np.ndarray:
    return np.asarray(bgr_means, dtype=np.float32) @ WEIGHTS


def build_tiny_wd14_model(folder: Path, batch: int | str = "batch") -> Path:
    """A model with WD14's contract: input (N, 16, 16, 3) float32 BGR 0–255, output (N, tags) probabilities."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Div", ["input_1:0", "scale"], ["unit"]),
            helper.make_node("ReduceMean", ["unit"], ["means"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["means", "weights"], ["predictions_sigmoid"]),
        ],
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [batch, INPUT_SIZE, INPUT_SIZE, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, WEIGHTS.shape[1]])],
        [numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"), numpy_helper.from_array(WEIGHTS, "weights")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "selected_tags.csv").write_text(TAGS_CSV, encoding="utf-8")
    return folder


def solid(colour, size=(32, 32), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


# ------------------------------------------------------------------ preprocessing and tag selection (no onnxruntime)


def test_prepared_image_is_bgr_padded_square_on_white_at_the_model_size():
    wide_red = solid((255, 0, 0), size=(32, 16))
    prepared = prepare_image(wide_red, INPUT_SIZE)
    assert prepared.shape == (INPUT_SIZE, INPUT_SIZE, 3) and prepared.dtype == np.float32
    assert prepared[8, 8].tolist() == [0.0, 0.0, 255.0]  # BGR: red is the last channel
    assert prepared[0, 8].tolist() == [255.0, 255.0, 255.0]  # top band: white padding
    assert prepared[:3].mean() == 255.0 and prepared[-3:].mean() == 255.0  # row 4 is the blurred edge


def test_transparent_pixels_become_white_not_black():
    transparent = solid((255, 0, 0, 0), mode="RGBA")
    assert prepare_image(transparent, INPUT_SIZE).min() == 255.0


def test_a_16_bit_grey_image_is_tagged_as_the_grey_training_sees_not_as_white():
    grey = Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16))  # mid-grey in 16 bits (Pillow mode I;16)
    assert prepare_image(grey, 16).mean() == 128.0


def test_selection_drops_ratings_applies_both_thresholds_exclusions_and_keeps_kaomoji():
    probabilities = expected_probabilities((0.0, 0.0, 1.0))  # pure red: ratings 1.0, hatsune_miku 0.8
    assert select_tags(probabilities, LABELS, TagSelection()) == {"red hair": 1.0, "^_^": pytest.approx(0.9)}
    lower = TagSelection(character_threshold=0.7, excluded_tags=frozenset({"red hair"}))
    assert list(select_tags(probabilities, LABELS, lower)) == ["^_^", "hatsune miku"]
    assert "red_hair" in select_tags(probabilities, LABELS, TagSelection(underscores_to_spaces=False))


@pytest.mark.parametrize(
    "existing, mode, trigger, expected",
    [
        (("hand written",), "skip", None, None),
        ((), "skip", "zkstar", ("zkstar", "star", "yellow")),
        (("star", "mine"), "append", None, ("star", "mine", "yellow")),
        (("star", "mine"), "prepend", None, ("yellow", "star", "mine")),
        (("mine",), "overwrite", "zkstar", ("zkstar", "star", "yellow")),
        (("zkstar", "star", "yellow"), "append", "zkstar", None),  # nothing new: the file is left alone
        (("star", "zkstar"), "append", "zkstar", ("zkstar", "star", "yellow")),
    ],
)
def test_existing_captions_are_kept_extended_or_replaced_as_the_mode_says(existing, mode, trigger, expected):
    assert merged_caption(existing, ("star", "yellow"), mode, trigger) == expected


def test_tagger_folder_without_csv_or_model_names_the_folder_and_the_missing_file(tmp_path):
    folder = tmp_path / "wd-v1-4-convnext-tagger-v2"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"")
    with pytest.raises(UserError) as raised:
        check_tagger_folder(folder)
    assert str(folder) in str(raised.value) and "selected_tags.csv" in str(raised.value)
    (folder / "model.onnx").unlink()
    (folder / "selected_tags.csv").write_text(TAGS_CSV, encoding="utf-8")
    with pytest.raises(UserError, match="lacks model.onnx"):
        check_tagger_folder(folder)


# ------------------------------------------------------------------ tagging a folder, through the Tagger interface


class ColourTagger:
    """Stands in for any Tagger (the WebUI's DeepBooru, say): tags each image by its top-left pixel."""

    name = "colour"

    def __init__(self):
        self.seen = 0

    def tag(self, images):
        self.seen += len(images)
        names = {(255, 255, 0): ["star", "yellow"], (255, 0, 0): ["circle", "red"]}
        return [{tag: 1.0 for tag in names[image.convert("RGB").getpixel((0, 0))]} for image in images]


@pytest.fixture
def star_folder(tmp_path):
    folder = tmp_path / "10_zkstar"
    folder.mkdir()
    solid((255, 255, 0)).save(folder / "new.png")
    solid((255, 0, 0)).save(folder / "hand.png")
    (folder / "hand.txt").write_text("my careful caption", encoding="utf-8")
    solid((255, 255, 0)).save(folder / "empty.png")
    (folder / "empty.txt").write_text("", encoding="utf-8")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def test_default_mode_never_touches_a_hand_written_caption_and_reports_broken_images(star_folder):
    tagger = ColourTagger()
    result = tag_folder(star_folder, tagger, trigger_word="zkstar")
    assert (star_folder / "hand.txt").read_text(encoding="utf-8") == "my careful caption"
    assert (star_folder / "new.txt").read_text(encoding="utf-8") == "zkstar, star, yellow"
    assert (star_folder / "empty.txt").read_text(encoding="utf-8") == "zkstar, star, yellow"
    assert [path.name for path in result.skipped] == ["hand.png"]
    assert [path.name for path in result.unreadable] == ["broken.png"]
    assert not (star_folder / "broken.txt").exists()
    assert tagger.seen == 2  # the hand-captioned image is not even run through the model


def test_overwrite_keeps_the_old_caption_in_a_backup(star_folder):
    result = tag_folder(star_folder, ColourTagger(), mode="overwrite")
    assert (star_folder / "hand.txt").read_text(encoding="utf-8") == "circle, red"
    assert (result.backup_folder / "hand.txt").read_text(encoding="utf-8") == "my careful caption"
    assert result.backup_folder.parent == star_folder / ".caption-backups"


def test_appended_tags_go_on_the_first_line_and_the_lines_after_it_are_kept(star_folder):
    """The first line is what training reads; the others (wildcard alternatives) must not merge into it."""
    (star_folder / "hand.txt").write_text("zk, x\n{red|blue} hair, y\n", encoding="utf-8")
    tag_folder(star_folder, ColourTagger(), mode="append")
    assert (star_folder / "hand.txt").read_text(encoding="utf-8") == "zk, x, circle, red\n{red|blue} hair, y\n"


def test_a_caption_written_by_hand_during_tagging_is_not_overwritten(star_folder):
    proposal = propose_captions(find_images(star_folder), ColourTagger())
    (star_folder / "new.txt").write_text("written meanwhile", encoding="utf-8")
    with pytest.raises(UserError, match="changed on disk"):
        write_proposal(proposal, None)
    assert (star_folder / "new.txt").read_text(encoding="utf-8") == "written meanwhile"
    assert (star_folder / "empty.txt").read_text(encoding="utf-8") == ""  # all-or-nothing


def test_missing_onnxruntime_is_a_sentence_that_says_how_to_install_it(tmp_path, monkeypatch):
    folder = tmp_path / "tagger"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"")
    (folder / "selected_tags.csv").write_text(TAGS_CSV, encoding="utf-8")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    from lora_trainer.dataset.tagger import WD14Tagger

    with pytest.raises(UserError, match="pip install onnxruntime"):
        WD14Tagger(folder)


# ------------------------------------------------------------------ the ONNX path


def test_wd14_onnx_tagger_sees_bgr_white_padded_images_in_batches(tmp_path):
    pytest.importorskip("onnxruntime")
    from lora_trainer.dataset.tagger import WD14Tagger

    tagger = WD14Tagger(build_tiny_wd14_model(tmp_path / "tiny-wd14"), batch_size=2)
    images = [
        solid((255, 0, 0)),
        solid((255, 0, 0), size=(32, 16)),  # half of the square is white padding
        solid((0, 0, 255)),
        solid((0, 255, 0), size=(8, 8)),  # enlarged to the input size
        solid((255, 0, 0, 0), mode="RGBA"),  # fully transparent: white
    ]
    probabilities = tagger.probabilities(images)
    expected = [(0, 0, 1), (0.5, 0.5, 1), (1, 0, 0), (0, 1, 0), (1, 1, 1)]
    np.testing.assert_allclose(probabilities, [expected_probabilities(means) for means in expected], atol=1e-3)
    tags = tagger.tag(images)
    assert tags[0] == {"red hair": pytest.approx(1.0), "^_^": pytest.approx(0.9)}
    assert set(tags[1]) == {"red hair", "^_^", "blue sky", "green grass", "simple background"}
    assert all(not {"general", "sensitive", "questionable", "explicit"} & set(found) for found in tags)


def test_wd14_tagger_follows_a_fixed_batch_size_and_refuses_a_mismatched_csv(tmp_path):
    pytest.importorskip("onnxruntime")
    from lora_trainer.dataset.tagger import WD14Tagger

    folder = build_tiny_wd14_model(tmp_path / "fixed", batch=1)
    tagger = WD14Tagger(folder, batch_size=8)
    assert tagger.batch_size == 1 and tagger.input_size == INPUT_SIZE
    assert len(tagger.tag([solid((255, 0, 0))] * 3)) == 3
    (folder / "selected_tags.csv").write_text(TAGS_CSV + "16,extra,0,1\n", encoding="utf-8")
    with pytest.raises(UserError, match="different models"):
        WD14Tagger(folder)


def test_wd14_tagger_tags_a_folder_end_to_end(tmp_path):
    pytest.importorskip("onnxruntime")
    from lora_trainer.dataset.tagger import WD14Tagger

    folder = tmp_path / "5_hair"
    folder.mkdir()
    solid((255, 0, 0)).save(folder / "red.png")
    tagger = WD14Tagger(build_tiny_wd14_model(tmp_path / "model"))
    tag_folder(folder, tagger, trigger_word="zkhair")
    assert (folder / "red.txt").read_text(encoding="utf-8") == "zkhair, red hair, ^_^"
