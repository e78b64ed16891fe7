"""Fetch and decode: manifest rows -> RGB uint8 pixels, or an ``error`` / ``retry`` row.

Runs as CPU tasks. Rows of one batch that share a file (tar shard, Parquet file) are fetched with one
call of their format's ``fetch`` (``pseudolabel.engine.formats``). The decoded image travels to the
labeler as raw bytes (``pixels``, large_binary, H*W*3 uint8, row-major) with ``width``/``height``, so
no Arrow extension types are needed.

Faults: a row whose manifest ``error`` is set (a listing error) is an error row and is never fetched.
A transient store fault (network, throttling, 5xx, timeouts) is tried again with backoff
(``fetch_retries`` tries, ``fetch_backoff_s`` doubling, see ``formats.transient``); still failing, the
row gets status ``retry`` and the next run labels it again. Anything else (missing object, bad bytes,
too many pixels) is an ``error`` row.

Memory: with ``max_batch_pixels`` set, no output block holds more decoded pixels than that (sizes are
read from the image headers before decoding); an image larger than the budget is alone in its block.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from pseudolabel.engine.formats import FetchRow, format_class, format_of_row, manifest_format
from pseudolabel.engine.formats.transient import backoff_delays, input_filesystem, is_transient
from pseudolabel.imageio import ImageError, decode_image, image_size
from pseudolabel.schemas.spec import InputSpec, StorageSpec
from pseudolabel.schemas.tables import STATUS_ERROR, STATUS_OK, STATUS_RETRY

__all__ = ["ImageError", "decode_image", "fetch_decode", "fetch_rows", "pixel_blocks", "pixels_to_image"]

_RETRIES: int = InputSpec.model_fields["fetch_retries"].default
_BACKOFF_S: float = InputSpec.model_fields["fetch_backoff_s"].default
_MANIFEST_ONLY = ("shard", "size", "offset", "error")


class _Transient(Exception):
    """A transient fault that outlived the retries (the row becomes ``retry``)."""


def fetch_rows(rows: list[tuple[str, str | None, int | None, int | None]], storage: StorageSpec | None,
               input_format: str | None = None, image_column: str | None = None,
               fetch_retries: int = _RETRIES, fetch_backoff_s: float = _BACKOFF_S,
               sleep=time.sleep) -> list[bytes | Exception]:
    """Encoded bytes (or the exception that stopped it) of each (uri, member, offset, size) row.

    Rows of one file are fetched with one call of the format's ``fetch``; rows that failed transiently
    are fetched again after each backoff, and those still failing come back as ``_Transient``.
    ``input_format``: a format name or ``module:Class``; None: each row's built-in format by its shape.
    """
    out: list[bytes | Exception | None] = [None] * len(rows)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, (uri, member, _, _) in enumerate(rows):
        groups[(uri, input_format or format_of_row(uri, member))].append(i)
    pending = {key: idx for key, idx in groups.items()}
    delays = backoff_delays(fetch_retries, fetch_backoff_s)
    for attempt in range(len(delays) + 1):
        retry: dict[tuple[str, str], list[int]] = {}
        for (uri, fmt), idx in pending.items():
            try:
                fs, path = input_filesystem(uri, storage)
                got = format_class(fmt)().fetch(fs, path, [FetchRow(*rows[i][1:]) for i in idx], image_column)
            except Exception as e:  # a format that raises instead of returning per-row errors
                got = [e] * len(idx)
            for i, g in zip(idx, got):
                out[i] = g
                if isinstance(g, Exception) and is_transient(g):
                    retry.setdefault((uri, fmt), []).append(i)
        if not retry:
            break
        if attempt < len(delays):
            sleep(delays[attempt])
        pending = retry
    for idx in pending.values():
        for i in idx:
            last = out[i]
            if isinstance(last, Exception) and is_transient(last):
                out[i] = _Transient(f"fetch failed after {fetch_retries} tries: {type(last).__name__}: {last}")
    return out  # type: ignore[return-value]


def pixel_blocks(pixels: list[int], budget: int | None) -> list[list[int]]:
    """Consecutive row positions grouped so each group's decoded pixels (H*W per row) sum to at most
    ``budget``; a row over the budget is a group of its own; ``budget`` None: one group; no rows: none.

    >>> pixel_blocks([4, 4, 4, 9, 1], 8)
    [[0, 1], [2], [3], [4]]
    """
    if budget is None:
        return [list(range(len(pixels)))] if pixels else []
    blocks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, n in enumerate(pixels):
        if current and total + n > budget:
            blocks.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        blocks.append(current)
    return blocks


def _header_pixels(data) -> int:
    if not isinstance(data, (bytes, bytearray)):
        return 0
    size = image_size(bytes(data))
    return size[0] * size[1] if size else 0


def fetch_decode(batch: pa.Table, storage: StorageSpec | None, max_pixels: int,
                 image_column: str | None = None, max_batch_pixels: int | None = None,
                 input_format: str | None = None, fetch_retries: int = _RETRIES,
                 fetch_backoff_s: float = _BACKOFF_S) -> pa.Table | Iterator[pa.Table]:
    """map_batches task: manifest batch -> the same rows with pixels/width/height/status/error.

    Returns one table when the batch's decoded pixels fit ``max_batch_pixels`` (or it is None), else a
    generator of tables each within it (Ray's map_batches takes either). A row whose bytes cannot be
    fetched or decoded gets status ``error`` (``retry`` for a transient fault), a message, no pixels.

    ``input_format``: the format name (or ``module:Class``) the manifest was listed with; default: the
    batch's schema metadata, else each row's built-in format by its shape.
    """
    # 1. Fetch every row's bytes (listing errors are not fetched).
    n = batch.num_rows
    cols: dict[str, list] = {c: (batch.column(c).to_pylist() if c in batch.column_names else [None] * n)
                             for c in ("uri", "member", "offset", "size", "error")}
    fmt = input_format or manifest_format(batch.schema)
    todo = [i for i in range(n) if cols["error"][i] is None]
    got = fetch_rows([(cols["uri"][i], cols["member"][i], cols["offset"][i], cols["size"][i]) for i in todo],
                     storage, fmt, image_column, fetch_retries, fetch_backoff_s)
    raw: list[bytes | Exception] = [ImageError(e) if e is not None else b"" for e in cols["error"]]
    for i, g in zip(todo, got):
        raw[i] = g
    # 2. Plan output blocks from the header sizes, then decode block by block.
    table = batch.drop_columns([c for c in _MANIFEST_ONLY if c in batch.column_names])
    plan = pixel_blocks([_header_pixels(r) for r in raw], max_batch_pixels) or [[]]
    if len(plan) == 1:
        return _decode_block(table, raw, plan[0], max_pixels)
    return (_decode_block(table, raw, idx, max_pixels) for idx in plan)


def _decode_block(table: pa.Table, raw: list, idx: list[int], max_pixels: int) -> pa.Table:
    pixels: list[bytes] = []
    widths: list[int] = []
    heights: list[int] = []
    status: list[str] = []
    errors: list[str | None] = []
    for i in idx:
        data = raw[i]
        try:
            if isinstance(data, _Transient):  # outlived the retries: the next run labels it again
                failed = (STATUS_RETRY, str(data))
            elif isinstance(data, ImageError):
                failed = (STATUS_ERROR, str(data))
            elif isinstance(data, Exception):
                failed = (STATUS_ERROR, f"fetch failed: {type(data).__name__}: {data}")
            else:
                arr = decode_image(data, max_pixels)
                failed = None
        except ImageError as e:
            failed = (STATUS_ERROR, str(e))
        if failed is not None:
            pixels.append(b"")
            heights.append(0)
            widths.append(0)
            status.append(failed[0])
            errors.append(failed[1])
            continue
        pixels.append(arr.tobytes())
        heights.append(arr.shape[0])
        widths.append(arr.shape[1])
        status.append(STATUS_OK)
        errors.append(None)
        del arr
    out = table.take(pa.array(idx, pa.int64())) if len(idx) != table.num_rows else table
    return (out.append_column("pixels", pa.array(pixels, pa.large_binary()))
            .append_column("width", pa.array(widths, pa.int32()))
            .append_column("height", pa.array(heights, pa.int32()))
            .append_column("status", pa.array(status, pa.string()))
            .append_column("error", pa.array(errors, pa.string())))


def pixels_to_image(pixels: bytes, height: int, width: int) -> np.ndarray:
    """Raw ``pixels`` bytes -> (H, W, 3) uint8 view."""
    return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, 3)
