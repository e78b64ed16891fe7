"""List an input dataset once into a manifest.

The layouts are the classes of ``pseudolabel.engine.formats`` (``folder``, ``webdataset``, ``parquet``,
``coco``, or a user's own): each turns the input into manifest rows. A file that cannot be read (a
damaged shard, an unreadable Parquet file, a path that leaves the root, a special file) becomes a row
with ``error`` set and the listing goes on; transient store faults are retried
(``input.fetch_retries`` / ``input.fetch_backoff_s``) and, when they last, fail the listing with one
line (nothing is written, so the next run lists again).

Every row gets a stable ``image_id``: the COCO id, the Parquet ``id_column`` value, or else a hash of the
path relative to the input root (+ member), so the same dataset under another prefix (a local copy,
an S3 bucket) gets the same ids. The format used is recorded in the table's schema metadata
(``pseudolabel.format``) and read back by ``fetch_decode`` and by readers of a finished run.
"""
from __future__ import annotations

import pyarrow as pa

from pseudolabel.engine.formats import (
    MANIFEST_FORMAT_KEY,
    PARQUET_ROW_PREFIX,
    SourceError,
    detect_format,
    format_class,
    format_ref,
    image_column_of,
    stable_image_id,
    tar_members,
)
from pseudolabel.engine.formats.base import list_files
from pseudolabel.engine.formats.transient import input_filesystem, is_transient, with_retries
from pseudolabel.schemas.spec import InputSpec, StorageSpec
from pseudolabel.schemas.tables import MANIFEST_SCHEMA

__all__ = ["MANIFEST_WITH_ERRORS", "PARQUET_ROW_PREFIX", "SourceError", "image_column_of", "list_input",
           "stable_image_id", "tar_members"]

#: the manifest as ``list_input`` returns it (its ``error`` column: a listing error, else null)
MANIFEST_WITH_ERRORS = MANIFEST_SCHEMA


def _list_once(spec: InputSpec, storage: StorageSpec | None) -> tuple[str, list[dict]]:
    fs, root = input_filesystem(spec.uri, storage)
    fmt = spec.format
    files: dict = {}
    if fmt == "auto" and spec.coco_json:
        fmt = "coco"
    if fmt == "auto" or format_class(fmt).needs_files:
        files = list_files(fs, root)
        fmt = detect_format(spec.model_copy(update={"format": fmt}), list(files))
    return fmt, format_class(fmt)().list(spec, storage, fs, root, files)


def list_input(spec: InputSpec, storage: StorageSpec | None = None) -> pa.Table:
    """List the input once; returns a table with ``MANIFEST_WITH_ERRORS`` (rows in a stable order) whose
    schema metadata records the format (``pseudolabel.format``) and the input uri.

    Raises SourceError (one line) for an input that cannot be listed at all: missing, empty, a setting
    that does not fit the data, non-unique ids, or a store that stayed unreachable through the retries.
    """
    try:
        fmt, rows = with_retries(lambda: _list_once(spec, storage), spec.fetch_retries, spec.fetch_backoff_s)
    except SourceError:
        raise
    except Exception as e:
        if is_transient(e):
            raise SourceError(f"input.uri: listing {spec.uri} failed after {spec.fetch_retries} tries "
                              f"({type(e).__name__}: {e}); run again when the store is reachable") from None
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise SourceError(f"input: cannot list {spec.uri}: {type(e).__name__}: {e}") from None
        raise
    if not rows:
        raise SourceError(f"input.uri: no images found under {spec.uri} (format {fmt})")
    ids = [r["image_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise SourceError("input: image ids are not unique (duplicate COCO ids or id_column values)")
    if spec.limit:
        rows = rows[: spec.limit]
    table = pa.Table.from_pylist(rows, schema=MANIFEST_WITH_ERRORS)
    return table.replace_schema_metadata({MANIFEST_FORMAT_KEY: format_ref(fmt).encode(),
                                          b"pseudolabel.input": spec.uri.encode()})
