"""Tests for opening user images (vlm/images.py): every mode and every way a file can be wrong."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import finishes_within
from PIL import Image

from vlm.errors import VLMError
from vlm.images import list_images, load_image, max_pixels, to_rgb


def _rgb_pixels(img: Image.Image) -> set[tuple[int, int, int]]:
    assert img.mode == "RGB"
    return {tuple(int(v) for v in p) for p in np.asarray(img).reshape(-1, 3)}


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("grey.png", lambda: Image.new("L", (5, 3), 77), (77, 77, 77)),
        ("grey-alpha.png", lambda: Image.new("LA", (5, 3), (77, 255)), (77, 77, 77)),
        ("transparent-grey.png", lambda: Image.new("LA", (5, 3), (0, 0)), (255, 255, 255)),
        ("rgba.png", lambda: Image.new("RGBA", (5, 3), (200, 10, 20, 255)), (200, 10, 20)),
        ("transparent.png", lambda: Image.new("RGBA", (5, 3), (200, 10, 20, 0)), (255, 255, 255)),
        ("cmyk.jpg", lambda: Image.new("CMYK", (5, 3), (0, 255, 255, 0)), (255, 0, 0)),
        ("cmyk.tif", lambda: Image.new("CMYK", (5, 3), (0, 0, 0, 255)), (0, 0, 0)),
        ("bilevel.png", lambda: Image.new("1", (5, 3), 1), (255, 255, 255)),
        ("float.tif", lambda: Image.new("F", (5, 3), 0.0), (0, 0, 0)),
    ],
)
def test_modes_become_rgb(tmp_path, name, make, expected):
    make().save(tmp_path / name)
    img = load_image(tmp_path / name)
    assert img.size == (5, 3)
    if name.endswith(".jpg"):  # lossy: close enough
        assert np.abs(np.asarray(img, dtype=int) - expected).max() <= 3
    else:
        assert _rgb_pixels(img) == {expected}


def test_semi_transparent_pixels_blend_onto_white(tmp_path):
    Image.new("RGBA", (2, 2), (0, 0, 0, 128)).save(tmp_path / "half.png")
    value = 255 - round(255 * 128 / 255)
    (pixel,) = _rgb_pixels(load_image(tmp_path / "half.png"))
    assert all(abs(c - value) <= 1 for c in pixel)


def test_palette_images_with_and_without_transparency(tmp_path):
    palette = [10, 20, 30, 200, 0, 0] + [0] * (256 * 3 - 6)
    opaque = Image.new("P", (4, 4), 0)
    opaque.putpalette(palette)
    opaque.putpixel((0, 0), 1)
    opaque.save(tmp_path / "p.png")
    img = load_image(tmp_path / "p.png")
    assert img.getpixel((0, 0)) == (200, 0, 0) and img.getpixel((1, 1)) == (10, 20, 30)
    opaque.save(tmp_path / "p-transparent.png", transparency=0)  # colour 0 is see-through
    img = load_image(tmp_path / "p-transparent.png")
    assert img.getpixel((0, 0)) == (200, 0, 0) and img.getpixel((1, 1)) == (255, 255, 255)
    opaque.save(tmp_path / "p.gif")
    assert load_image(tmp_path / "p.gif").getpixel((0, 0)) == (200, 0, 0)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path, suffix):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / f"deep{suffix}")
    with Image.open(tmp_path / f"deep{suffix}") as raw:
        assert raw.mode.startswith("I;16")
    img = load_image(tmp_path / f"deep{suffix}")
    assert np.asarray(img)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_wide_integer_mode_is_scaled_by_its_maximum():
    img = to_rgb(Image.fromarray(np.array([[0, 1000, 4000]], dtype=np.int32)))
    assert np.asarray(img)[0, :, 1].tolist() == [0, 64, 255]


@pytest.mark.parametrize("fmt", ["gif", "png", "webp"])
def test_animations_give_their_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / f"anim.{fmt}"
    extra = {"lossless": True} if fmt == "webp" else {}
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    with Image.open(path) as raw:
        assert getattr(raw, "n_frames", 1) == 3
    assert _rgb_pixels(load_image(path)) == {(255, 0, 0)}


@pytest.mark.parametrize(("orientation", "top_row_colour"), [(6, "blue"), (8, "red")])
def test_exif_rotation_is_applied(tmp_path, orientation, top_row_colour):
    # 8x4, the left quarter blue: rotated a quarter turn it is 4x8 with blue on top (6) or at the bottom (8).
    img = Image.new("RGB", (8, 4), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 2, 4))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    loaded = load_image(tmp_path / "photo.jpg")
    assert loaded.size == (4, 8)
    arr = np.asarray(loaded, dtype=int)
    top, bottom = arr[0].mean(0), arr[-1].mean(0)
    blue_row, red_row = (top, bottom) if top_row_colour == "blue" else (bottom, top)
    assert blue_row[2] > 200 and blue_row[0] < 50
    assert red_row[0] > 200 and red_row[2] < 50


def _expect_error(path: Path, *words: str, **kwargs) -> str:
    with pytest.raises(VLMError) as err:
        load_image(path, **kwargs)
    message = str(err.value)
    assert err.value.exit_code == 2
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message
    return message


def test_missing_file_and_folder(tmp_path):
    _expect_error(tmp_path / "nope.png", "not found")
    _expect_error(tmp_path, "folder")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # opening it to read would block until a writer came
    message = finishes_within(30, lambda: _expect_error(tmp_path / "pipe.png"))
    assert message == f"image {tmp_path / 'pipe.png'} is a named pipe, not a regular file"


def test_a_name_longer_than_the_file_system_allows(tmp_path):
    message = _expect_error(tmp_path / ("x" * 300 + ".png"), "(304 bytes; the limit is 255)")
    assert message.startswith("image name too long")


@pytest.mark.parametrize(
    ("name", "content"),
    [("notes.png", b"hello, I am text\n"), ("empty.jpg", b""), ("random.png", bytes(range(256)) * 4)],
)
def test_not_an_image(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    _expect_error(tmp_path / name, "not an image")


@pytest.mark.parametrize(("fmt", "cut"), [("png", 0.5), ("png", 0.1), ("jpeg", 0.5), ("gif", 0.5)])
def test_truncated_images(tmp_path, fmt, cut):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    if fmt == "gif":
        img = img.convert("P")
    full = tmp_path / f"full.{fmt}"
    img.save(full)
    data = full.read_bytes()
    cut_path = tmp_path / f"cut.{fmt}"
    cut_path.write_bytes(data[: max(int(len(data) * cut), 40)])
    _expect_error(cut_path, "truncated")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [9000, 100_000])  # above our 64 MP limit; far above Pillow's own
def test_decompression_bomb_is_refused_from_the_header(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    _expect_error(path, "too large")


def test_pixel_limit_from_the_environment(tmp_path, monkeypatch):
    Image.new("RGB", (20, 10)).save(tmp_path / "img.png")
    monkeypatch.setenv("VLM_MAX_IMAGE_PIXELS", "199")
    message = _expect_error(tmp_path / "img.png", "too large", "20x10")
    assert "199" in message
    monkeypatch.setenv("VLM_MAX_IMAGE_PIXELS", "200")
    assert load_image(tmp_path / "img.png").size == (20, 10)
    _expect_error(tmp_path / "img.png", "too large", limit=100)


@pytest.mark.parametrize(
    ("value", "limit"), [("", 64_000_000), ("0", None), ("none", None), (" None ", None), ("1_000", 1000), ("1", 1)]
)
def test_pixel_limit_values(monkeypatch, value, limit):
    monkeypatch.setenv("VLM_MAX_IMAGE_PIXELS", value)
    assert max_pixels() == limit


@pytest.mark.parametrize("value", ["0", "none"])
def test_no_pixel_limit(tmp_path, monkeypatch, value):
    # A header claiming 9000x9000 pixels (81 MP, above the default) is not refused as too large: decoding is tried,
    # and fails only because the pixels are not there.
    path = tmp_path / "big.png"
    path.write_bytes(_png_header_only(9000, 9000))
    monkeypatch.setenv("VLM_MAX_IMAGE_PIXELS", value)
    message = _expect_error(path, "truncated")
    assert "too large" not in message


@pytest.mark.parametrize("value", ["lots", "-5", "1.5", "1e6", "64MP"])
def test_a_bad_pixel_limit_is_one_line_naming_the_variable(tmp_path, monkeypatch, value):
    Image.new("RGB", (20, 10)).save(tmp_path / "img.png")
    monkeypatch.setenv("VLM_MAX_IMAGE_PIXELS", value)
    with pytest.raises(VLMError) as err:
        load_image(tmp_path / "img.png")
    assert str(err.value) == (
        f"VLM_MAX_IMAGE_PIXELS={value!r} is not a pixel count: give a positive whole number, or 0 or none for no limit"
    )


def test_list_images(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.webp", "notes.txt", "data.jsonl", "z.tiff"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp", "z.tiff"]
