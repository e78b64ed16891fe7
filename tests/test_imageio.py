"""pseudolabel.imageio: one decode (EXIF, size guard, deep pixels scaled never clipped) and one PNG codec,
on real files written by Pillow and tifffile."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
import tifffile
from PIL import Image

from pseudolabel.imageio import ImageError, decode_image, decode_png, encode_png, image_size, to_uint8

BIG = 10**8


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _tiff(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def test_16bit_grey_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 32).astype(np.uint16).reshape(32, 64)
    data = _save(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # a real 16-bit PNG
    out = decode_image(data, BIG)
    assert out.shape == (32, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], (ramp >> 8).astype(np.uint8))
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 200  # clipping would give 2 values


def test_16bit_rgb_png_keeps_the_high_byte():
    rgb16 = np.zeros((8, 8, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 32768, 1000
    data = _tiff(rgb16, photometric="rgb")  # 16-bit RGB through tifffile/Pillow
    out = decode_image(data, BIG)
    assert out[0, 0].tolist() == [255, 128, 3]


def test_float_tiff_in_unit_range_and_other_ranges():
    unit = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    out = decode_image(_tiff(unit), BIG)
    assert np.array_equal(out[..., 0], np.rint(unit * 255).astype(np.uint8))
    wide = np.linspace(-5, 10, 100, dtype=np.float32).reshape(10, 10)
    out = decode_image(_tiff(wide), BIG)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255  # min-max, not clipped to [0, 1]
    assert len(np.unique(out)) > 90


def test_float_rgb_tiff_and_nan_is_an_error():
    rgb = np.random.default_rng(0).random((6, 7, 3)).astype(np.float32)
    out = decode_image(_tiff(rgb, photometric="rgb"), BIG)
    assert out.shape == (6, 7, 3) and np.array_equal(out, np.rint(rgb * 255).astype(np.uint8))
    bad = np.ones((4, 4), np.float32)
    bad[1, 1] = np.nan
    with pytest.raises(ImageError, match="NaN"):
        decode_image(_tiff(bad), BIG)


def test_grey_alpha_palette_and_cmyk():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert np.array_equal(decode_image(_save(Image.fromarray(grey), "PNG"), BIG)[..., 2], grey)
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 1] = 0  # fully transparent black -> white
    assert (decode_image(_save(Image.fromarray(la, "LA"), "PNG"), BIG) == 255).all()
    cmyk = Image.new("CMYK", (5, 5), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(_save(cmyk, "JPEG", quality=95), BIG)
    assert out.shape == (5, 5, 3) and out[2, 2, 0] > 200 and out[2, 2, 1] < 60
    pal = Image.fromarray(grey).convert("P")
    assert decode_image(_save(pal, "PNG"), BIG).shape == (8, 8, 3)


def test_exif_orientation_is_applied():
    im = Image.fromarray(np.zeros((10, 20, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    out = decode_image(_save(im, "JPEG", exif=exif), BIG)
    assert out.shape == (20, 10, 3)


def test_size_guard_reads_the_header_before_decoding():
    data = _save(Image.new("L", (9400, 9400)), "PNG")  # ~88 M pixels, a small file
    assert image_size(data) == (9400, 9400)
    started = time.perf_counter()
    with pytest.raises(ImageError, match="too many pixels"):
        decode_image(data, 10**6)
    assert time.perf_counter() - started < 0.5  # refused from the header, nothing decoded
    assert image_size(_tiff(np.zeros((3, 5), np.float32))) == (5, 3)


@pytest.mark.parametrize("bad", [b"", b"not an image", b"II*\x00garbage"])
def test_bad_bytes_are_image_errors(bad):
    with pytest.raises(ImageError):
        decode_image(bad, BIG)


@pytest.mark.parametrize("arr", [np.arange(12, dtype=np.uint8).reshape(3, 4),
                                 np.arange(36, dtype=np.uint8).reshape(3, 4, 3),
                                 np.arange(48, dtype=np.uint8).reshape(3, 4, 4),
                                 np.array([[0, 65535], [300, 7]], np.uint16)])
def test_png_round_trip_is_exact(arr):
    assert Image.open(io.BytesIO(encode_png(arr))).format == "PNG"
    back = decode_png(encode_png(arr))
    assert back.dtype == arr.dtype and np.array_equal(back, arr)


def test_to_uint8_rules():
    assert to_uint8(np.array([0, 65535, 256], np.uint16)).tolist() == [0, 255, 1]
    assert to_uint8(np.array([0, 1000], np.int32)).tolist() == [0, 3]
    assert to_uint8(np.array([-2.0, 2.0])).tolist() == [0, 255]
    assert to_uint8(np.array([7.0, 7.0])).tolist() == [0, 0]


def test_incontext_demo_decode_honours_exif():
    from pseudolabel.models.incontext.labeler import decode_image as demo_decode

    im = Image.fromarray(np.zeros((10, 20, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 8
    assert demo_decode(_save(im, "JPEG", exif=exif)).shape == (20, 10, 3)
    with pytest.raises(ValueError):
        demo_decode(b"nope")
