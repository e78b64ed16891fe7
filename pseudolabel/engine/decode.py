"""Fetch and decode: manifest rows -> RGB uint8 pixels, or an error row.

Runs as CPU tasks. Rows of one batch that share a file (tar shard, Parquet file) are fetched with one
open of that file. The decoded image travels to the labeler as raw bytes (``pixels``, large_binary,
H*W*3 uint8, row-major) with ``width``/``height``, so no Arrow extension types are needed.
"""
from __future__ import annotations

import io
import posixpath
import tarfile
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from pseudolabel.engine.sources import PARQUET_ROW_PREFIX, image_column_of
from pseudolabel.schemas.spec import StorageSpec
from pseudolabel.schemas.tables import STATUS_ERROR, STATUS_OK
from pseudolabel.storage import filesystem


# decode_image checks the pixel count against the job's input.max_pixels from the header; Pillow's own
# (lower) decompression-bomb limit would otherwise refuse images the job allows.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """An image that cannot be used; the message goes into the row's ``error``."""


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB after EXIF orientation.

    Raises ImageError for empty, truncated or non-image bytes, and for more than ``max_pixels`` pixels
    (checked from the header, before the pixels are decoded).
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"too many pixels: {w}x{h} = {w * h} > max_pixels {max_pixels}")
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode != "RGB":
                if im.mode in ("RGBA", "LA", "P") and ("transparency" in im.info or im.mode != "P"):
                    im = im.convert("RGBA")
                    bg = Image.new("RGB", im.size, (255, 255, 255))
                    bg.paste(im, mask=im.split()[-1])
                    im = bg
                else:
                    im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("cannot decode image: not a recognised image format") from None
    except Exception as e:  # PIL raises many types for bad bytes
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _safe_member(name: str) -> bool:
    """Tar members must stay inside their shard: no absolute paths, no '..'."""
    norm = posixpath.normpath(name)
    return not (norm.startswith("/") or norm == ".." or norm.startswith("../"))


def _fetch_group(fs, path: str, members: list[str | None], image_column: str | None = None,
                 spans: list[tuple[int, int] | None] | None = None) -> list[bytes | Exception]:
    """Bytes for each member of one file (a plain file has the single member None).

    ``spans``: (offset, size) of each tar member where the manifest knows it; those are fetched with
    ranged reads (one request each, issued concurrently by fsspec), so a batch never streams a shard.
    """
    if members == [None] * len(members):
        try:
            with fs.open(path, "rb") as f:
                data = f.read()
        except Exception as e:
            return [e] * len(members)
        return [data] * len(members)
    if members[0] is not None and members[0].startswith(PARQUET_ROW_PREFIX):
        return _fetch_parquet_rows(fs, path, members, image_column)
    spans = spans or [None] * len(members)
    out: dict[str, bytes | Exception] = {m: ImageError(f"unsafe tar member name {m!r}")
                                         for m in members if not _safe_member(m)}
    ranged = [(m, span) for m, span in zip(members, spans) if span is not None and m not in out]
    if ranged:
        got = fs.cat_ranges([path] * len(ranged), [o for _, (o, _) in ranged], [o + n for _, (o, n) in ranged],
                            on_error="return")
        out.update({m: data for (m, _), data in zip(ranged, got)})
    rest = {m for m in members if m not in out}
    if rest:
        out.update(_stream_tar_members(fs, path, rest))
    return [out.get(m, ImageError(f"member {m!r} not found in {path}")) for m in members]


def _fetch_parquet_rows(fs, path: str, members: list[str], image_column: str | None) -> list[bytes | Exception]:
    """Image bytes of the wanted rows of one Parquet file, reading only the row groups that hold them."""
    out: dict[str, bytes] = {}
    rows = sorted({int(m[len(PARQUET_ROW_PREFIX):]) for m in members})
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            col = image_column_of(pf.schema_arrow, image_column)
            lo = 0
            for g in range(pf.num_row_groups):
                hi = lo + pf.metadata.row_group(g).num_rows
                wanted = [r for r in rows if lo <= r < hi]
                if wanted:
                    values = pf.read_row_group(g, columns=[col]).column(0)
                    for r in wanted:
                        v = values[r - lo].as_py()
                        if isinstance(v, dict):
                            v = v.get("bytes")
                        out[f"{PARQUET_ROW_PREFIX}{r}"] = v if v is not None else b""
                lo = hi
    except Exception as e:
        return [e] * len(members)
    return [out.get(m, ImageError(f"member {m!r} not found in {path}")) for m in members]


def _stream_tar_members(fs, path: str, wanted: set[str]) -> dict[str, bytes | Exception]:
    """Read a tar shard front to back until every wanted member is found (no offsets known)."""
    out: dict[str, bytes | Exception] = {}
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if info.name in wanted and info.isfile():
                    out[info.name] = tar.extractfile(info).read()
                    if len(out) == len(wanted):
                        break
    except Exception as e:
        return {m: out.get(m, e) for m in wanted}
    return out


def fetch_decode(batch: pa.Table, storage: StorageSpec | None, max_pixels: int,
                 image_column: str | None = None, max_batch_pixels: int | None = None) -> pa.Table:
    """map_batches task: manifest batch -> the same rows with pixels/width/height/status/error.

    A row whose bytes cannot be fetched or decoded gets status ``error``, a message, and no pixels.
    """
    uris = batch.column("uri").to_pylist()
    members = batch.column("member").to_pylist()
    offsets = batch.column("offset").to_pylist() if "offset" in batch.column_names else [None] * len(uris)
    sizes = batch.column("size").to_pylist() if "size" in batch.column_names else [None] * len(uris)
    spans = [(o, n) if o is not None and n is not None else None for o, n in zip(offsets, sizes)]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, u in enumerate(uris):
        groups[u].append(i)
    raw: list[bytes | Exception | None] = [None] * len(uris)
    for uri, idx in groups.items():
        fs, path = filesystem(uri, storage)
        got = _fetch_group(fs, path, [members[i] for i in idx], image_column, [spans[i] for i in idx])
        for i, g in zip(idx, got):
            raw[i] = g
    pixels, widths, heights, status, errors = [], [], [], [], []
    for data in raw:
        try:
            if isinstance(data, ImageError):
                raise data
            if isinstance(data, Exception):
                raise ImageError(f"fetch failed: {type(data).__name__}: {data}")
            arr = decode_image(data, max_pixels)
        except ImageError as e:
            pixels.append(b"")
            heights.append(0)
            widths.append(0)
            status.append(STATUS_ERROR)
            errors.append(str(e))
            continue
        pixels.append(arr.tobytes())
        heights.append(arr.shape[0])
        widths.append(arr.shape[1])
        status.append(STATUS_OK)
        errors.append(None)
    batch = batch.drop_columns([c for c in ("shard", "size", "offset") if c in batch.column_names])
    return (batch.append_column("pixels", pa.array(pixels, pa.large_binary()))
            .append_column("width", pa.array(widths, pa.int32()))
            .append_column("height", pa.array(heights, pa.int32()))
            .append_column("status", pa.array(status, pa.string()))
            .append_column("error", pa.array(errors, pa.string())))


def pixels_to_image(pixels: bytes, height: int, width: int) -> np.ndarray:
    """Raw ``pixels`` bytes -> (H, W, 3) uint8 view."""
    return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, 3)
