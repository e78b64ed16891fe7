"""Read a finished run back: the ``labels`` Parquet table, ``summary.json`` and source images.

A run's output folder (local path, ``file://`` or ``s3://``) holds::

    {output}/labels/*.parquet   the labels table (pseudolabel.schemas.tables.LABELS_SCHEMA)
    {output}/summary.json       {"run_id", "images", "ok", "error", "seconds", "images_per_s",
                                 "output_uri", "categories": [{"id", "name", "labeler"}...], "labelers"}
    {output}/job.json           the validated job spec

Everything here goes through ``pseudolabel.storage`` so local folders and S3 behave the same.
"""
from __future__ import annotations

import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pseudolabel import storage as st
from pseudolabel.schemas.coco import category_table
from pseudolabel.schemas.spec import StorageSpec
from pseudolabel.schemas.tables import LABELS_SCHEMA


def _labels_files(output_uri: str, storage: StorageSpec | None) -> tuple[list[str], object]:
    """(Parquet file paths under {output}/labels, pyarrow filesystem); hidden/underscore files skipped."""
    afs, root = st.arrow_filesystem(st.join(output_uri, "labels"), storage)
    import pyarrow.fs as pafs

    info = afs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return [], afs
    infos = afs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = []
    for i in infos:
        if i.type != pafs.FileType.File or not i.path.endswith(".parquet"):
            continue
        rel = posixpath.relpath(i.path, root)
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        files.append(i.path)
    return sorted(files), afs


def read_labels(output_uri: str, storage: StorageSpec | None = None, columns: list[str] | None = None,
                filter: ds.Expression | None = None) -> pa.Table:
    """All rows of ``{output_uri}/labels/*.parquet`` as one table.

    Args:
        output_uri: the run's output folder (local path, file:// or s3://).
        storage: endpoint/credentials for s3:// (default: the standard AWS environment).
        columns: columns to read (default: all of LABELS_SCHEMA's columns present in the files).
        filter: optional pyarrow.dataset expression, e.g. ``pc.field("image_id").isin(ids)``.

    Returns:
        a pyarrow Table; an empty table with LABELS_SCHEMA (or the asked columns) when the run wrote
        no Parquet files. Non-Parquet files and hidden (``.``) or ``_``-prefixed files are ignored.
    """
    files, afs = _labels_files(str(output_uri), storage)
    if not files:
        schema = LABELS_SCHEMA if columns is None else pa.schema([LABELS_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    dataset = ds.dataset(files, format="parquet", filesystem=afs)
    if columns is not None:
        missing = [c for c in columns if c not in dataset.schema.names]
        if missing:
            raise KeyError(f"labels table has no column(s) {missing}; it has {dataset.schema.names}")
    return dataset.to_table(columns=columns, filter=filter)


def read_summary(output_uri: str, storage: StorageSpec | None = None) -> dict:
    """``{output_uri}/summary.json`` as a dict; {} when the run wrote none (e.g. it was interrupted)."""
    uri = st.join(str(output_uri), "summary.json")
    if not st.exists(uri, storage):
        return {}
    return json.loads(st.read_bytes(uri, storage))


def read_job(output_uri: str, storage: StorageSpec | None = None) -> dict:
    """``{output_uri}/job.json`` (the validated job spec) as a dict; {} when absent."""
    uri = st.join(str(output_uri), "job.json")
    if not st.exists(uri, storage):
        return {}
    return json.loads(st.read_bytes(uri, storage))


def categories(output_uri: str, storage: StorageSpec | None = None, labels: pa.Table | None = None) -> list[dict]:
    """The run's categories (``schemas.coco.category_table``): summary.json's ontology, plus any
    (category_id, category) pair seen only in the annotations, sorted by id.

    ``labels`` (a table with an ``annotations`` column) adds its annotations; without it the table is
    read only when summary.json lists no categories (an older run).
    """
    declared = read_summary(output_uri, storage).get("categories") or []
    if labels is None and not declared:
        labels = read_labels(output_uri, storage, columns=["annotations"])
    anns = ([a for row in labels.column("annotations").to_pylist() for a in row or []]
            if labels is not None else [])
    return category_table(declared, anns)


def run_source(output_uri: str, storage: StorageSpec | None = None) -> dict:
    """How a run read its input: ``{"input_format": ..., "image_column": ...}``.

    The format is the one recorded in the run's manifest (``input.format: auto`` resolved at listing),
    the image column the job's ``input.image_column``; either is None when the run did not record it.
    """
    from pseudolabel.engine.formats import manifest_format

    out: dict = {"input_format": None, "image_column": None}
    spec_input = (read_job(output_uri, storage).get("spec") or {}).get("input") or {}
    out["image_column"] = spec_input.get("image_column")
    fs, root = st.filesystem(st.join(str(output_uri), "manifest"), storage)
    try:
        parts = sorted(fs.glob(root.rstrip("/") + "/part-*.parquet"))
        if parts:
            with fs.open(parts[0], "rb") as f:
                out["input_format"] = manifest_format(pq.ParquetFile(f).schema_arrow)
    except (OSError, pa.ArrowInvalid):
        pass
    if out["input_format"] is None and spec_input.get("format") not in (None, "auto"):
        out["input_format"] = spec_input["format"]
    return out


def load_image_bytes(uri: str, member: str | None = None, storage: StorageSpec | None = None,
                     image_column: str | None = None, input_format: str | None = None) -> bytes:
    """Encoded bytes of one source image, as the labels row's ``uri``/``member`` name it.

    Read through the run's input format (``pseudolabel.engine.formats``), exactly as the engine read
    it: ``member`` is None for a plain file, the member name inside a ``.tar`` shard, or ``row:<index>``
    for a Parquet input (the image column is ``image_column`` or the format's one rule).
    ``input_format``: the run's format (see ``run_source``); None: told from the row's shape.
    """
    from pseudolabel.engine.decode import fetch_rows

    (got,) = fetch_rows([(str(uri), member, None, None)], storage, input_format, image_column)
    if isinstance(got, Exception):
        raise got
    return got


def load_image(uri: str, member: str | None = None, storage: StorageSpec | None = None,
               image_column: str | None = None, max_pixels: int = 89_478_485,
               input_format: str | None = None) -> np.ndarray:
    """Source image of a labels row -> (H, W, 3) uint8 RGB, decoded as the engine decodes it
    (``pseudolabel.imageio``: EXIF orientation, alpha over white, deep pixels scaled)."""
    from pseudolabel.imageio import decode_image

    return decode_image(load_image_bytes(uri, member, storage, image_column, input_format), max_pixels)


def rle_counts(rle: dict) -> np.ndarray:
    """Uncompressed run lengths of a COCO RLE (``counts`` str, bytes or already a list), int64.

    Runs alternate 0/1 starting with 0, in column-major (Fortran) pixel order, as pycocotools defines them.
    The string form (pycocotools' ``rleToString``): each value in 5-bit groups, least significant first,
    as characters ``48 + group`` with bit 0x20 set on every group but the last and bit 0x10 of the last
    the sign; from the fourth value on, each is stored as its difference from the value two before.
    Strings up to ``SHORT_RLE`` characters are decoded one character at a time (cheaper than array set-up
    for the typical small token), longer ones for all values at once.
    """
    counts = rle["counts"]
    if isinstance(counts, list):
        return np.asarray(counts, dtype=np.int64)
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    if len(data) <= SHORT_RLE:
        return _rle_counts_short(data)
    # 1. characters -> 5-bit groups; a value ends at each group without the continuation bit
    c = np.frombuffer(data, dtype=np.uint8).astype(np.int64) - 48
    last = (c & 0x20) == 0
    value_of = np.concatenate([[0], np.cumsum(last)[:-1]])  # the value each group belongs to
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    k = np.arange(len(c)) - starts[value_of]  # the group's position inside its value
    x = np.zeros(int(last.sum()), dtype=np.int64)
    np.add.at(x, value_of, (c & 0x1F) << (5 * k))
    # 2. sign: bit 0x10 of a value's last group extends ones above its groups
    ends = np.flatnonzero(last)
    negative = (c[ends] & 0x10) != 0
    x[negative] |= -1 << (5 * (k[ends[negative]] + 1))
    # 3. differences: value i > 2 is stored as value i - value i - 2 (two chains, by parity)
    out = x.copy()
    if len(out) > 3:
        out[3::2] = x[1] + np.cumsum(x[3::2])
    if len(out) > 4:
        out[4::2] = x[2] + np.cumsum(x[4::2])
    return out


#: RLE strings up to this many characters are decoded in a Python loop (measured crossover ~150-230)
SHORT_RLE = 160


def _rle_counts_short(data: bytes) -> np.ndarray:
    """``rle_counts`` of a short string, one character at a time."""
    out: list[int] = []
    p, n = 0, len(data)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return np.asarray(out, dtype=np.int64)


def rles_to_label_map(rles: list[dict], shape: tuple[int, int]) -> np.ndarray:
    """Paint RLE masks into an (H, W) int32 label map: mask k gets k + 1, 0 where no mask.

    Where masks overlap the earlier mask wins (a later one never overwrites). The runs are read from
    the RLE strings directly, so the cost is the painted pixels, never N full (H, W) masks.

    Args:
        rles: COCO RLEs (``counts`` str or bytes) of size [H, W].
        shape: (H, W) of the image.
    """
    h, w = (int(s) for s in shape)
    flat = np.zeros(h * w, dtype=np.int32)  # column-major, like the RLE runs
    for k in range(len(rles) - 1, -1, -1):  # last first, so earlier masks overwrite later ones
        rle = rles[k]
        if [int(s) for s in rle["size"]] != [h, w]:
            raise ValueError(f"RLE size {list(rle['size'])} does not match image shape {[h, w]}")
        counts = rle_counts(rle)
        ends = np.cumsum(counts)
        starts, lengths = (ends - counts)[1::2], counts[1::2]
        keep = lengths > 0
        starts, lengths = starts[keep], lengths[keep]
        if len(lengths) == 0:
            continue
        total = int(lengths.sum())
        idx = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
        flat[idx] = k + 1
    return flat.reshape(w, h).T.copy()
