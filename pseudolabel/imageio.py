"""Image bytes in and out, in one place: one decode for every reader of input images, one PNG codec.

``decode_image(data, max_pixels)`` turns encoded bytes (JPEG, PNG, WebP, BMP, TIFF, ...) into an
(H, W, 3) uint8 RGB array after EXIF orientation. The pixel count is checked from the header, before
any pixel is decoded (a decompression bomb never allocates its pixels).

Pixel rules (deeper than 8 bits is scaled, never clipped):

- 8-bit grey, palette, CMYK -> RGB; grey+alpha, RGBA and palette with transparency -> composited over
  white.
- 16-bit (PNG 16-bit grey, 16-bit TIFF): ``value >> 8`` (65535 -> 255). Pillow already reduces 16-bit
  RGB(A) PNGs to their high byte, which is the same rule.
- 32-bit integer: non-negative values up to 65535 are treated as 16-bit; any other range is min-max
  scaled to [0, 255].
- float (TIFF float32/float64): values within [0, 1] -> ``round(v * 255)``; any other range is min-max
  scaled to [0, 255] (a constant image outside [0, 1] becomes 0); NaN or infinity -> ImageError.

``encode_png(array)`` / ``decode_png(data)`` write and read PNG layers exactly (no scaling): (H, W) grey,
(H, W, 3) RGB or (H, W, 4) RGBA, uint8 (uint16 grey is kept as 16-bit). Every PNG the package writes or
reads (layers, exports, ground truth) goes through these two.
"""
from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageOps

# The job's own ``max_pixels`` is checked from the header; Pillow's lower default bomb limit would
# otherwise refuse images the job allows.
Image.MAX_IMAGE_PIXELS = None

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class ImageError(ValueError):
    """Bytes that cannot be used as an image; the message goes into the row's ``error``."""


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Any-depth pixels -> uint8 of the same shape, by the module's rules (scaled, never clipped).

    Args:
        arr: (H, W) or (H, W, C) array of uint8, uint16, int32/int64 or float.
    Raises:
        ImageError: NaN or infinite values.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            return (arr.astype(np.uint32) >> 8).astype(np.uint8)
        return _min_max(arr.astype(np.float64), lo, hi)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError("float image with NaN or infinite values")
        flo, fhi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if flo >= 0.0 and fhi <= 1.0:
            return np.rint(arr * 255.0).astype(np.uint8)
        return _min_max(arr.astype(np.float64), flo, fhi)
    raise ImageError(f"unsupported pixel type {arr.dtype}")


def _min_max(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1..4) uint8 -> (H, W, 3) uint8; alpha composited over white."""
    if arr.ndim == 2:
        arr = arr[..., None]
    c = arr.shape[2]
    if c in (2, 4):
        alpha = arr[..., -1:].astype(np.float32) / 255.0
        colour = arr[..., :-1].astype(np.float32)
        arr = np.rint(colour * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        c -= 1
    if c == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif c != 3:
        raise ImageError(f"unsupported channel count {c}")
    return arr


def _check_size(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise ImageError(f"too many pixels: {w}x{h} = {w * h} > max_pixels {max_pixels}")
    if w <= 0 or h <= 0:
        raise ImageError(f"empty image {w}x{h}")


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header before EXIF orientation, or None when the header is not readable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:
        pass
    if data[:4] in _TIFF_MAGIC:
        try:
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                page = tif.pages.first
                return int(page.imagewidth), int(page.imagelength)
        except Exception:
            return None
    return None


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB after EXIF orientation.

    Raises ImageError for empty, truncated or non-image bytes, for NaN/infinite float pixels and for
    more than ``max_pixels`` pixels (checked from the header, before the pixels are decoded).
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        arr = _decode_pillow(data, max_pixels)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        arr = None
    except Exception as e:  # Pillow raises many types for bad bytes
        if data[:4] not in _TIFF_MAGIC:
            raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from None
        arr = None
    if arr is None:
        if data[:4] not in _TIFF_MAGIC:
            raise ImageError("cannot decode image: not a recognised image format")
        arr = _decode_tifffile(data, max_pixels)  # float/multi-sample TIFFs Pillow cannot read
    arr = _to_rgb(to_uint8(arr))
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _decode_pillow(data: bytes, max_pixels: int) -> np.ndarray:
    """Pillow decode: (H, W) or (H, W, C) array of the image's own depth, EXIF orientation applied."""
    with Image.open(io.BytesIO(data)) as opened:
        _check_size(*opened.size, max_pixels)
        opened.load()
        im: Image.Image = ImageOps.exif_transpose(opened)
        mode = im.mode
        if mode in ("RGB", "L", "RGBA", "LA"):
            return np.asarray(im)
        if mode == "P":
            return np.asarray(im.convert("RGBA" if "transparency" in im.info else "RGB"))
        if mode == "PA":
            return np.asarray(im.convert("RGBA"))
        if mode.startswith("I;16"):
            return np.asarray(im).astype(np.uint16)
        if mode in ("I", "F"):
            return np.asarray(im)
        if mode == "1":
            return np.asarray(im.convert("L"))
        return np.asarray(im.convert("RGB"))  # CMYK, YCbCr, LAB, HSV ...


_ORIENT = {  # TIFF Orientation tag -> operations on an (H, W, ...) array
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
    7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1], 8: lambda a: np.swapaxes(a, 0, 1)[::-1],
}


def _decode_tifffile(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            _check_size(int(page.imagewidth), int(page.imagelength), max_pixels)
            arr = page.asarray()
            tag = page.tags.get("Orientation")
            orient = int(tag.value) if tag is not None else 1
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from None
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar samples
    if arr.ndim not in (2, 3):
        raise ImageError(f"unsupported TIFF layout {arr.shape}")
    return _ORIENT.get(orient, lambda a: a)(arr)


def encode_png(image: np.ndarray) -> bytes:
    """(H, W) bool/uint8/uint16 grey, (H, W, 3) RGB or (H, W, 4) RGBA uint8 -> PNG bytes (lossless).

    Bool is written as 0/255. OpenCV's encoder (fast, default compression): the layers of every image
    of a run go through here.
    """
    arr = np.ascontiguousarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    elif arr.ndim == 3 and arr.shape[2] == 4 and arr.dtype == np.uint8:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA)
    elif not (arr.ndim == 2 and arr.dtype in (np.uint8, np.uint16)):
        raise ValueError(f"encode_png: unsupported array {arr.shape} {arr.dtype} "
                         "(grey uint8/uint16, RGB or RGBA uint8)")
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any lossless image) bytes -> the stored array, unscaled: (H, W) uint8/uint16 grey,
    (H, W, 3) RGB or (H, W, 4) RGBA uint8 (palette images expanded to RGB/RGBA)."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            im: Image.Image = opened
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode == "LA":
                im = im.convert("RGBA")
            elif im.mode == "1":
                im = im.convert("L")
            arr = np.asarray(im)
            if im.mode.startswith("I;16") or im.mode == "I":
                arr = arr.astype(np.uint16)
            return arr
    except Exception as e:
        raise ImageError(f"cannot decode PNG: {type(e).__name__}: {e}") from None
