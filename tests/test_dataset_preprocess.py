from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.dataset import focus, preprocess
from lora_trainer.dataset.focus import Interest, best_offset, saliency_map
from lora_trainer.dataset.preprocess import (
    PrepResult,
    PrepSettings,
    crop_target,
    face_folder_name,
    plan_crop,
    plan_face_crop,
    prepare_dataset,
)
from lora_trainer.errors import UserError


def make_image(path: Path, size: tuple[int, int], seed: int, caption: str | None = "zk, star") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = (np.random.default_rng(seed).random((6, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(blocks).resize(size, Image.Resampling.BILINEAR).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_square_centre_crop_plan_matches_sd_scripts_crop():
    plan = plan_crop((800, 600), PrepSettings(size=512))
    # cover: 600 → 512 (scale 0.8533), width 683; centre crop keeps resized x 85..597 → source x 99.6..699.6
    assert plan.output_size == (512, 512)
    assert plan.source_box == pytest.approx((85 / (683 / 800), 0, 597 / (683 / 800), 600))
    assert plan.scale == pytest.approx(683 / 800)


def test_buckets_and_no_upscale_targets():
    assert crop_target((800, 600), PrepSettings(size=512, buckets=True)).bucket == (576, 448)
    assert crop_target((600, 800), PrepSettings(size=512, buckets=True)).bucket == (448, 576)
    small = plan_crop((300, 200), PrepSettings(size=512, no_upscale=True))
    assert small.output_size == (200, 200) and small.scale == 1.0
    assert small.source_box == (50, 0, 250, 200)
    assert plan_crop((300, 200), PrepSettings(size=512)).scale > 2.5
    # with buckets, no-upscale keeps the image's own size floored to the 64-px step
    assert crop_target((300, 200), PrepSettings(size=512, buckets=True, no_upscale=True)).bucket == (256, 192)


def test_focal_crop_follows_the_interest_and_ties_stay_central():
    weights = np.zeros((6, 8))
    weights[:, 7] = 1.0  # everything interesting at the right edge
    plan = plan_crop((800, 600), PrepSettings(size=512, crop="focal"), weights)
    assert plan.source_box[2] == pytest.approx(800)
    assert plan_crop((800, 600), PrepSettings(size=512, crop="focal"), np.ones((6, 8))) == plan_crop((800, 600), PrepSettings(size=512))
    assert plan_crop((800, 600), PrepSettings(size=512, crop="centre"), weights) == plan_crop((800, 600), PrepSettings(size=512))
    assert best_offset(np.array([0, 0, 0, 5.0]), 400, 100) == 300
    assert best_offset(np.zeros(4), 400, 100) == 150
    assert best_offset(np.ones(4), 100, 200) == 0


def test_saliency_finds_a_subject_on_a_plain_background():
    picture = np.full((48, 64), 120.0)
    picture[10:26, 44:60] = np.random.default_rng(0).random((16, 16)) * 255
    saliency = saliency_map(picture)
    row, column = np.unravel_index(np.argmax(saliency), saliency.shape)
    assert 6 <= row <= 30 and 40 <= column <= 63
    assert not saliency_map(np.full((16, 16), 7.0)).any()


def test_face_close_up_plan():
    settings = PrepSettings(size=512)
    plan = plan_face_crop((1000, 800), (600, 200, 800, 400), settings)
    assert plan.source_box == (500, 100, 900, 500) and plan.output_size == (512, 512)
    edge = plan_face_crop((1000, 800), (900, 0, 1000, 100), settings)
    assert edge is None  # a 200-px close-up would be enlarged 2.56x
    kept = plan_face_crop((1000, 800), (850, 0, 1000, 150), settings)
    assert kept.source_box == (700, 0, 1000, 300)  # pushed inside the picture
    assert plan_face_crop((1000, 800), (850, 0, 1000, 150), PrepSettings(size=512, no_upscale=True)).output_size == (300, 300)
    assert face_folder_name(3, Path("10_zk star"), "src") == "3_zk star face"
    assert face_folder_name(3, Path("."), "my photos") == "3_my photos face"
    assert face_folder_name(3, Path("."), "10_") == "3_face"


def test_prepare_mirrors_folders_copies_captions_and_never_touches_sources(tmp_path):
    source = tmp_path / "原图 src"
    make_image(source / "10_zk star" / "a b.png", (800, 600), 1, caption="zk star, 黄色")
    bom = make_image(source / "10_zk star" / "c.jpg", (600, 900), 2, caption=None).with_suffix(".txt")
    bom.write_bytes("\ufeffzk star, tall".encode("utf-8"))
    make_image(source / "10_zk star" / "nocaption.webp", (512, 512), 3, caption=None)
    (source / "10_zk star" / "broken.png").write_bytes(b"garbage")
    make_image(source / "10_zk star" / "mixed.Jpg", (64, 64), 4, caption=None)  # never read by training: said
    make_image(source / "10_zk star" / "moving.gif", (64, 64), 5, caption=None)
    before = snapshot(source)
    out = tmp_path / "输出 out"
    result = prepare_dataset(source, out, PrepSettings(size=256, flip=True))
    assert snapshot(source) == before
    assert sorted(snapshot(out)) == sorted([
        "10_zk star/a b.png", "10_zk star/a b.txt", "10_zk star/a b_flip.png", "10_zk star/a b_flip.txt",
        "10_zk star/c.jpg", "10_zk star/c.txt", "10_zk star/c_flip.jpg", "10_zk star/c_flip.txt",
        "10_zk star/nocaption.webp", "10_zk star/nocaption_flip.webp"])
    assert (out / "10_zk star" / "c.txt").read_bytes() == "zk star, tall".encode("utf-8")  # BOM dropped
    assert (out / "10_zk star" / "a b_flip.txt").read_text(encoding="utf-8") == "zk star, 黄色"
    with Image.open(out / "10_zk star" / "a b.png") as written, Image.open(out / "10_zk star" / "a b_flip.png") as mirrored:
        assert written.size == (256, 256)
        assert np.array_equal(np.asarray(written)[:, ::-1], np.asarray(mirrored))
    assert (result.images, result.flipped, result.captions) == (3, 3, 4)
    assert [name for name, _ in result.skipped] == ["10_zk star/broken.png"]
    assert result.not_read == ("10_zk star/mixed.Jpg", "10_zk star/moving.gif") and "Not prepared" in result.summary()
    assert not list(out.rglob("*.tmp"))


def test_transparency_is_kept_where_the_format_holds_it_and_said_where_it_is_flattened(tmp_path, monkeypatch):
    """--alpha_mask trains with the transparency: a PNG or WebP keeps it; a format without any says it lost it."""
    picture = np.zeros((300, 400, 4), np.uint8)
    picture[..., 0] = 200
    picture[:, 200:, 3] = 255  # the left half transparent
    (tmp_path / "src").mkdir()
    for name in ("cut.png", "cut.webp"):
        Image.fromarray(picture, "RGBA").save(tmp_path / "src" / name)
    make_image(tmp_path / "src" / "plain.png", (400, 300), 1)
    result = prepare_dataset(tmp_path / "src", tmp_path / "out", PrepSettings(size=128, flip=True))
    for name in ("cut.png", "cut.webp", "cut_flip.png"):
        with Image.open(tmp_path / "out" / name) as written:
            alpha = np.asarray(written.convert("RGBA"))[..., 3]
            left, right = (alpha[:, :40], alpha[:, -40:]) if "flip" not in name else (alpha[:, -40:], alpha[:, :40])
            assert written.mode == "RGBA" and left.max() == 0 and right.min() == 255, name
    with Image.open(tmp_path / "out" / "plain.png") as plain:
        assert plain.mode == "RGB"
    assert result.flattened == ()
    monkeypatch.setattr(preprocess, "_KEEPS_TRANSPARENCY", (".png",))  # WebP standing for a format without it
    result = prepare_dataset(tmp_path / "src", tmp_path / "again", PrepSettings(size=128))
    with Image.open(tmp_path / "again" / "cut.webp") as flattened:
        assert flattened.mode == "RGB"
    assert result.flattened == ("cut.webp",) and "Transparent parts flattened onto white" in result.summary()


def test_a_picture_read_through_a_plug_in_is_written_as_png(tmp_path):
    """.avif/.jxl are listed where a Pillow plug-in reads them, which may not write them: prep stopped part-way."""
    from lora_trainer.dataset.preprocess import plan_outputs

    (item,) = plan_outputs(tmp_path / "src", tmp_path / "out", [tmp_path / "src" / "10_x" / "a.avif"], {}, PrepSettings())
    assert item.output == tmp_path / "out" / "10_x" / "a.png"


def test_bucket_output_sizes(tmp_path):
    make_image(tmp_path / "src" / "wide.png", (800, 600), 1)
    make_image(tmp_path / "src" / "small.png", (200, 150), 2)
    prepare_dataset(tmp_path / "src", tmp_path / "out", PrepSettings(size=512, buckets=True, no_upscale=True))
    # no-upscale shrinks 800x600 to the 512x512 area keeping its shape (sd-scripts' rounding), then floors to 64 px
    assert Image.open(tmp_path / "out" / "wide.png").size == (512, 384)
    assert Image.open(tmp_path / "out" / "small.png").size == (192, 128)


def test_output_folder_rules(tmp_path):
    source = tmp_path / "src"
    make_image(source / "a.png", (300, 300), 1)
    for inside in (source, source / "prepared"):
        with pytest.raises(UserError, match="inside the source"):
            prepare_dataset(source, inside)
    with pytest.raises(UserError, match="inside the output"):
        prepare_dataset(source, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        prepare_dataset(source, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    prepare_dataset(source, out, PrepSettings(size=128, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a.txt", "keep.txt"]
    assert source.with_name("src").is_dir() and snapshot(source)


def test_bad_sources_write_nothing(tmp_path):
    empty = tmp_path / "empty"
    (empty / "10_").mkdir(parents=True)
    (empty / "10_" / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="has no images"):
        prepare_dataset(empty, tmp_path / "out1")
    gbk = tmp_path / "gbk"
    make_image(gbk / "abc_dog" / "a.png", (300, 300), 1)
    make_image(gbk / "abc_dog" / "b.png", (300, 300), 2, caption=None).with_suffix(".txt").write_bytes("狗".encode("gbk"))
    with pytest.raises(UserError, match=r"b\.txt is not UTF-8"):
        prepare_dataset(gbk, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    with pytest.raises(UserError, match="crop"):
        PrepSettings(crop="middle")


def test_face_emphasis_adds_a_face_subset_with_its_own_repeats(tmp_path, monkeypatch):
    source = tmp_path / "src"
    make_image(source / "10_zk" / "face.png", (1000, 800), 1, caption="zk, portrait")
    make_image(source / "10_zk" / "noface.png", (1000, 800), 2)
    faces = {1: ((600, 200, 800, 400),), 2: ()}

    def fake_interest(image, use_faces):  # stands in for OpenCV's detector, which needs real faces
        seed = 1 if image.getpixel((0, 0)) == Image.open(source / "10_zk" / "face.png").convert("RGB").getpixel((0, 0)) else 2
        return Interest(np.ones((4, 5)), faces[seed])

    monkeypatch.setattr(preprocess, "interest_of", fake_interest)
    monkeypatch.setattr(preprocess, "require_face_detector", lambda: None)
    result = prepare_dataset(source, tmp_path / "out", PrepSettings(size=256, face_emphasis_repeats=3))
    face_folder = tmp_path / "out" / "3_zk face"
    assert sorted(p.name for p in face_folder.iterdir()) == ["face.png", "face.txt"]
    assert (face_folder / "face.txt").read_text(encoding="utf-8") == "zk, portrait"
    assert Image.open(face_folder / "face.png").size == (256, 256)
    assert result.without_face == ("10_zk/noface.png",) and result.face_folders == ("3_zk face",)


def test_face_emphasis_without_opencv_says_what_to_install(tmp_path, monkeypatch):
    make_image(tmp_path / "src" / "a.png", (300, 300), 1)
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now fails as if it were not installed
    with pytest.raises(UserError, match="opencv-python-headless"):
        prepare_dataset(tmp_path / "src", tmp_path / "out", PrepSettings(face_emphasis_repeats=2))
    assert not (tmp_path / "out").exists()
    # focal crops still work, on saliency
    prepare_dataset(tmp_path / "src", tmp_path / "out", PrepSettings(size=128, crop="focal"))
    assert Image.open(tmp_path / "out" / "a.png").size == (128, 128)


def drawn_face(side: int) -> Image.Image:
    """A plain frontal face (skin oval, brows, eyes, nose, mouth), softened: OpenCV's Haar cascade finds it."""
    from PIL import ImageDraw, ImageFilter

    image = Image.new("RGB", (side, side), (90, 120, 160))
    draw = ImageDraw.Draw(image)
    cx = cy = side // 2
    w, h = int(side * 0.42), int(side * 0.55)
    draw.ellipse([cx - w // 2, cy - h // 2, cx + w // 2, cy + h // 2], fill=(225, 185, 160))
    for side_sign in (-1, 1):
        ex = cx + side_sign * int(w * 0.22)
        draw.rectangle([ex - int(w * 0.13), cy - int(h * 0.2), ex + int(w * 0.13), cy - int(h * 0.16)], fill=(60, 40, 30))
        draw.ellipse([ex - int(w * 0.1), cy - int(h * 0.12), ex + int(w * 0.1), cy - int(h * 0.04)], fill=(40, 30, 30))
    draw.polygon([(cx, cy - int(h * 0.02)), (cx - int(w * 0.07), cy + int(h * 0.12)), (cx + int(w * 0.07), cy + int(h * 0.12))],
                 fill=(200, 150, 130))
    draw.rectangle([cx - int(w * 0.18), cy + int(h * 0.22), cx + int(w * 0.18), cy + int(h * 0.26)], fill=(150, 60, 60))
    return image.filter(ImageFilter.GaussianBlur(2))


def test_opencv_finds_a_drawn_face_and_the_focal_crop_keeps_it_whole(tmp_path):
    if not focus.face_detector_available():
        pytest.skip("opencv-python-headless<4.12 is not installed")
    noise = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)
    assert focus.detect_faces(noise) == ()
    # a wide picture: the face on the left, a black-and-white checkerboard on the right
    picture = Image.new("RGB", (700, 300), (90, 120, 160))
    picture.paste(drawn_face(300), (0, 0))
    board = (np.indices((300, 400)).sum(axis=0) // 20 % 2 * 255).astype(np.uint8)
    picture.paste(Image.fromarray(board).convert("RGB"), (300, 0))
    faces = focus.detect_faces(np.asarray(picture))
    assert len(faces) == 1 and (faces[0][0] + faces[0][2]) / 2 < 300
    (tmp_path / "src").mkdir()
    picture.save(tmp_path / "src" / "portrait.png")
    prepare_dataset(tmp_path / "src", tmp_path / "out", PrepSettings(size=256, crop="focal"))
    cropped = Image.open(tmp_path / "out" / "portrait.png")
    assert cropped.size == (256, 256) and len(focus.detect_faces(np.asarray(cropped.convert("RGB")))) == 1


def test_one_image_no_bucket_fits_is_skipped_and_the_rest_prepared_with_their_captions(tmp_path):
    """A 1×4000 sliver with --buckets --no-upscale stopped prep part-way: two pictures written, no caption at all
    (captions come last), the error naming no file, and a rerun needing --overwrite."""
    for name, size in (("a", (192, 256)), ("b_sliver", (1, 4000)), ("c", (256, 192))):
        make_image(tmp_path / "src" / f"{name}.png", size, 1, caption=f"zk, {name}")
    result = prepare_dataset(tmp_path / "src", tmp_path / "out", PrepSettings(size=128, buckets=True, no_upscale=True))
    assert result.images == 2 and result.captions == 2 and [name for name, _ in result.skipped] == ["b_sliver.png"]
    assert "less than one bucket step" in result.summary()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "a.txt", "c.png", "c.txt"]


def test_a_64_px_bucketed_prep_runs_as_sd_scripts_would_train_it(tmp_path):
    """Half the size (32) was below the bucket step: refused, naming min_bucket_reso, which prep has no option for."""
    make_image(tmp_path / "src" / "a.png", (96, 128), 1)
    assert prepare_dataset(tmp_path / "src", tmp_path / "out", PrepSettings(size=64, buckets=True)).images == 1


def test_captions_under_the_other_usual_extension_are_pointed_to(tmp_path):
    """sd-scripts' own default is .caption; prep (.txt, as the taggers write) wrote the images and no caption, silently."""
    make_image(tmp_path / "src" / "a.png", (96, 128), 1, caption=None)
    (tmp_path / "src" / "a.caption").write_text("zk, a", encoding="utf-8")
    result = prepare_dataset(tmp_path / "src", tmp_path / "out", PrepSettings(size=64))
    assert result.captions == 0 and "give --caption-extension .caption to copy those" in result.summary()
    again = prepare_dataset(tmp_path / "src", tmp_path / "again", PrepSettings(size=64, caption_extension=".caption"))
    assert again.captions == 1 and "No caption was carried along" not in again.summary()


def test_the_summary_of_a_large_folder_names_ten_pictures_of_each_list(tmp_path):
    """1500 phone photos smaller than the target made one line of 1300 names."""
    names = tuple(f"{index:04d}.jpg" for index in range(1300))
    summary = PrepResult(tmp_path, 1300, 0, 0, 0, enlarged=names,
                         skipped=tuple((name, "is truncated") for name in names[:30])).summary()
    assert "Enlarged (smaller than the target; --no-upscale keeps them small): 1300 pictures: 0000.jpg, 0001.jpg" in summary
    assert "0009.jpg and 1290 more" in summary and "0010.jpg" not in summary.split("Skipped")[0]
    assert summary.count("Skipped ") == 10 and summary.endswith("… and 20 more skipped (30 in all)")
    assert len(summary) < 1000
