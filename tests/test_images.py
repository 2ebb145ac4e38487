"""Odd colour modes convert correctly; hostile inputs fail with the right reason."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.sources.images import UndecodableImage, decode_rgb


def _bytes(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_cmyk_jpeg_becomes_rgb() -> None:
    rgb = Image.new("RGB", (16, 16), (255, 0, 0))
    out = decode_rgb(_bytes(rgb.convert("CMYK"), "JPEG", quality=95))
    assert out.mode == "RGB"
    r, g, b = np.asarray(out).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_16bit_grey_is_scaled_not_clipped() -> None:
    arr = np.full((8, 8), 32896, dtype=np.uint16)  # mid-grey in 16 bits
    img = Image.fromarray(arr)
    assert img.mode.startswith("I")
    out = np.asarray(decode_rgb(_bytes(img)))
    assert out.shape == (8, 8, 3)
    assert np.all(np.abs(out.astype(int) - 128) <= 1)  # PIL's plain convert would give 255


def test_palette_with_transparency_composites_on_white() -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0  # index 0 (black) fully transparent
    out = np.asarray(decode_rgb(_bytes(img)))
    assert np.all(out == 255)


def test_grey_alpha_composites_on_white() -> None:
    img = Image.new("LA", (4, 4), (0, 128))  # black at half opacity
    out = np.asarray(decode_rgb(_bytes(img)))
    assert np.all(np.abs(out.astype(int) - 127) <= 1)


def test_exif_rotation_is_applied() -> None:
    img = Image.new("RGB", (20, 10), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = decode_rgb(_bytes(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 20)


def test_one_bit_image() -> None:
    img = Image.new("1", (8, 8), 1)
    out = np.asarray(decode_rgb(_bytes(img)))
    assert out.shape == (8, 8, 3) and np.all(out == 255)


def _corrupt_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = bytearray(_bytes(Image.fromarray(noise)))
    data[200:400] = bytes(200)  # zero out compressed pixel data mid-stream
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"this is not an image at all", "not_an_image"),
        (_bytes(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:200], "truncated"),
        (_corrupt_png(), "corrupt"),
    ],
)
def test_hostile_inputs_are_named(data: bytes, reason: str) -> None:
    with pytest.raises(UndecodableImage) as info:
        decode_rgb(data)
    assert info.value.reason == reason


def test_a_non_image_is_named_by_its_bytes_not_by_a_python_object() -> None:
    with pytest.raises(UndecodableImage) as info:
        decode_rgb(b"<html>not pixels</html>")
    assert info.value.detail == "23 bytes in no image format PIL reads (they begin 3c 68 74 6d 6c 3e 6e 6f)"


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = _bytes(Image.new("RGB", (100, 100)))
    with pytest.raises(UndecodableImage) as info:
        decode_rgb(data, max_pixels=99 * 99)
    assert info.value.reason == "too_many_pixels"
    assert decode_rgb(data, max_pixels=100 * 100).size == (100, 100)
