"""Image loading never surprises: upright, RGB on a chosen background, bad files reported while the rest loads."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from lora_trainer.dataset.images import (
    ImageError,
    checked_image_size,
    load_image,
    load_images,
    read_image_size,
    read_image_sizes,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def pixels(image: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in pixel) for pixel in np.asarray(image).reshape(-1, 3)]


def marked_image(size: tuple[int, int] = (6, 4)) -> Image.Image:
    """Distinct pixels so any rotation or flip shows."""
    pixels = np.arange(size[0] * size[1] * 3, dtype=np.uint8).reshape(size[1], size[0], 3) * 3
    return Image.fromarray(pixels, "RGB")


def with_orientation(path: Path, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    marked_image().save(path, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillows_exif_transpose(tmp_path, orientation):
    path = with_orientation(tmp_path / f"o{orientation}.png", orientation)
    with Image.open(path) as opened:
        expected = ImageOps.exif_transpose(opened).convert("RGB")
    loaded = load_image(path)
    assert np.array_equal(np.asarray(loaded), np.asarray(expected))
    # the size from the header is the size of the upright picture, so its bucket fits the pixels
    assert read_image_size(path) == loaded.size == ((4, 6) if orientation >= 5 else (6, 4))


def test_exif_orientation_of_a_jpeg_turns_a_portrait_photo_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # camera held upright, sensor landscape
    Image.new("RGB", (32, 16), RED).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert read_image_size(tmp_path / "phone.jpg") == (16, 32)
    assert load_image(tmp_path / "phone.jpg").size == (16, 32)


def test_rgba_is_composited_on_white_by_default_and_on_a_chosen_colour(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    rgba.save(tmp_path / "a.png")
    assert pixels(load_image(tmp_path / "a.png")) == [(255, 255, 255), (255, 127, 127)]
    assert pixels(load_image(tmp_path / "a.png", background=(0, 0, 0))) == [(0, 0, 0), (128, 0, 0)]


def test_la_greyscale_with_alpha_is_composited(tmp_path):
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    la.save(tmp_path / "la.png")
    assert pixels(load_image(tmp_path / "la.png")) == [(255, 255, 255), (0, 0, 0)]


def test_palette_with_a_transparent_index_is_composited_not_black(tmp_path):
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    assert pixels(load_image(tmp_path / "p.png")) == [(255, 255, 255), (0, 255, 0)]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "print.jpg", quality=100)
    loaded = load_image(tmp_path / "print.jpg")
    assert loaded.mode == "RGB"
    red, green, blue = loaded.getpixel((4, 4))
    assert red > 230 and green < 30 and blue < 30


def test_sixteen_bit_greyscale_keeps_its_tones_instead_of_clipping_to_white(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "scan.png")
    assert [pixel[0] for pixel in pixels(load_image(tmp_path / "scan.png"))] == [0, 128, 255]


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    assert load_image(tmp_path / "anim.gif").getpixel((0, 0)) == RED


def test_an_image_over_the_pixel_limit_is_refused_with_its_size_and_the_limit(tmp_path):
    Image.new("RGB", (300, 200), RED).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"big\.png is 300x200 \(0\.1 megapixels\), over the limit of 0\.0 megapixels"):
        load_image(tmp_path / "big.png", max_pixels=1000)


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose header claims a huge size: a decompression bomb if anyone decoded it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0\0\0")) + chunk(b"IEND", b""))
    return path


def test_a_huge_header_is_refused_before_decoding(tmp_path):
    bomb = png_claiming_size(tmp_path / "bomb.png", 12_000, 12_000)  # 144 MP: over our limit, under Pillow's
    scan = read_image_sizes([bomb])
    assert scan.sizes == {}
    assert "12000x12000 (144 megapixels), over the limit of 100 megapixels" in scan.problems[0].reason
    huge = png_claiming_size(tmp_path / "huge.png", 100_000, 100_000)  # over Pillow's own guard too
    with pytest.raises(ImageError, match=r"huge\.png is too large to decode safely \(10000 megapixels\)"):
        load_image(huge)


def test_bad_files_are_reported_and_the_good_ones_still_load(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), RED).save(good)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image", encoding="utf-8")
    truncated = tmp_path / "cut.jpg"
    marked_image((64, 64)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:1000])  # header intact, scan data cut
    later = tmp_path / "later.png"
    Image.new("RGB", (8, 8), BLUE).save(later)

    result = load_images([good, empty, text, truncated, later])
    assert [path for path, _ in result.images] == [good, later]
    reasons = {problem.path.name: problem.reason for problem in result.problems}
    assert set(reasons) == {"empty.png", "notes.png", "cut.jpg"}
    assert "empty file" in reasons["empty.png"]
    assert "not an image" in reasons["notes.png"]
    assert "truncated" in reasons["cut.jpg"]
    assert all(problem.message.startswith(str(problem.path)) for problem in result.problems)


@pytest.mark.parametrize("name", ["cut.jpg", "cut.png"])
def test_a_truncated_file_has_a_size_from_its_header_but_fails_the_checked_size(tmp_path, name):
    """Its header still reads, so the size alone cannot find it: the check a dataset makes before training decodes
    the pixels, and names the file and what is wrong, as loading it would part-way through the run."""
    truncated = tmp_path / name
    marked_image((64, 48)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    assert read_image_sizes([truncated]).sizes == {truncated: (64, 48)}
    with pytest.raises(ImageError, match=f"{name} is truncated \\(the file ends early\\); re-export or re-download"):
        checked_image_size(truncated)


def test_a_checked_size_refuses_corrupt_data_after_a_good_header_and_keeps_the_upright_size(tmp_path):
    good = with_orientation(tmp_path / "turned.jpg", 6)
    assert checked_image_size(good) == read_image_size(good) == (4, 6)
    corrupt = tmp_path / "corrupt.png"
    marked_image((64, 48)).save(corrupt)
    data = bytearray(corrupt.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start : start + 16] = bytes(16)  # the compressed pixels zeroed, the file's length unchanged
    corrupt.write_bytes(bytes(data))
    assert read_image_size(corrupt) == (64, 48)
    with pytest.raises(ImageError, match="corrupt.png cannot be decoded"):
        checked_image_size(corrupt)


def test_unicode_and_spaces_in_paths(tmp_path):
    folder = tmp_path / "写真 フォルダ" / "10_猫 cat"
    folder.mkdir(parents=True)
    path = folder / "my photo ✓.png"
    Image.new("RGB", (12, 10), RED).save(path)
    assert read_image_size(path) == (12, 10)
    assert load_image(path).getpixel((0, 0)) == RED
    assert read_image_sizes([path]).sizes == {path: (12, 10)}
