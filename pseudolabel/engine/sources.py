"""List an input dataset once into a manifest.

Layouts (``input.format``):
- ``folder``: image files found recursively under ``input.uri``; ``member`` is null.
- ``webdataset``: ``.tar`` shards; ``member`` is the member's name inside the tar.
- ``parquet``: Parquet files with an image column; ``member`` is ``row:<index>`` within the file.
- ``coco``: a COCO JSON and the image root ``input.uri``; ids and file names come from the JSON, and the
  JSON's boxes become per-row prompts (``{"boxes_xyxy": [...], "categories": [...]}``).

Every row gets a stable ``image_id``: the COCO id, the Parquet ``id_column`` value, or else a hash of the
path relative to the input root (+ member), so the same dataset under another prefix (a local copy,
an S3 bucket) gets the same ids.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel.schemas.spec import InputSpec, StorageSpec
from pseudolabel.schemas.tables import MANIFEST_SCHEMA
from pseudolabel.storage import filesystem, to_uri

PARQUET_ROW_PREFIX = "row:"


class SourceError(ValueError):
    """The input cannot be listed (missing, empty, unknown layout)."""


def stable_image_id(relative_path: str, member: str | None = None) -> str:
    key = relative_path if member is None else f"{relative_path}#{member}"
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:20]


def _rel(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if path != root else posixpath.basename(path)


def detect_format(spec: InputSpec, files: list[str]) -> str:
    if spec.format != "auto":
        return spec.format
    if spec.coco_json:
        return "coco"
    exts = {posixpath.splitext(f)[1].lower() for f in files}
    if ".tar" in exts:
        return "webdataset"
    if ".parquet" in exts and not (exts & set(spec.extensions)):
        return "parquet"
    return "folder"


def _list_files(fs, root: str) -> dict[str, int | None]:
    """Every file under ``root`` (hidden ones left out) -> its size in bytes, in path order."""
    if fs.isfile(root):
        return {root: fs.size(root)}
    if not fs.exists(root):
        raise SourceError(f"input.uri: nothing found at {root}")
    found = fs.find(root, detail=True)
    return {p: found[p].get("size") for p in sorted(found) if not posixpath.basename(p).startswith(".")}


def tar_members(fs, path: str) -> list[tarfile.TarInfo]:
    """The regular-file members of a tar shard in order, read from their headers (the data is seeked
    over); each has ``name``, ``size`` and ``offset_data`` (where its bytes start, for ranged reads)."""
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return [info for info in tar if info.isfile()]


def image_column_of(schema: pa.Schema, wanted: str | None) -> str:
    if wanted:
        if wanted not in schema.names:
            raise SourceError(f"input.image_column: no column {wanted!r} (columns: {', '.join(schema.names)})")
        return wanted
    for field in schema:
        t = field.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return field.name
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return field.name
    raise SourceError("input.image_column: no binary or {bytes, path} column found; name it with input.image_column")


def list_input(spec: InputSpec, storage: StorageSpec | None = None) -> pa.Table:
    """List the input once; returns a table with MANIFEST_SCHEMA (rows in a stable order)."""
    fs, root = filesystem(spec.uri, storage)
    sizes = _list_files(fs, root)
    files = list(sizes)
    fmt = detect_format(spec, files)
    rows: list[dict] = []
    exts = tuple(e.lower() for e in spec.extensions)

    if fmt == "folder":
        images = [f for f in files if f.lower().endswith(exts)]
        parents = sorted({posixpath.dirname(f) for f in images})
        shard_of = {p: i for i, p in enumerate(parents)}
        for f in images:
            rel = _rel(f, root)
            rows.append(dict(image_id=stable_image_id(rel), uri=to_uri(fs, f), member=None,
                             shard=shard_of[posixpath.dirname(f)], size=sizes[f], file_name=rel, prompts=None))
    elif fmt == "webdataset":
        shards = [f for f in files if f.lower().endswith(".tar")]
        for shard, f in enumerate(shards):
            rel = _rel(f, root)
            for info in tar_members(fs, f):
                if info.name.lower().endswith(exts):
                    rows.append(dict(image_id=stable_image_id(rel, info.name), uri=to_uri(fs, f), member=info.name,
                                     shard=shard, size=info.size, offset=info.offset_data,
                                     file_name=f"{rel}/{info.name}", prompts=None))
    elif fmt == "parquet":
        parts = [f for f in files if f.lower().endswith(".parquet")]
        for shard, f in enumerate(parts):
            rel = _rel(f, root)
            with fs.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                schema = pf.schema_arrow
                image_column_of(schema, spec.image_column)
                cols = [c for c in (spec.id_column, spec.prompts_column, "file_name") if c and c in schema.names]
                for field in ("id_column", "prompts_column"):
                    column = getattr(spec, field)
                    if column and column not in schema.names:
                        raise SourceError(f"input.{field}: no column {column!r} in {rel}")
                meta = pf.read(columns=cols).to_pylist() if cols else [{} for _ in range(pf.metadata.num_rows)]
            for i, m in enumerate(meta):
                member = f"{PARQUET_ROW_PREFIX}{i}"
                image_id = str(m[spec.id_column]) if spec.id_column else stable_image_id(rel, member)
                prompts = m.get(spec.prompts_column) if spec.prompts_column else None
                if isinstance(prompts, dict):  # a struct column: keys another row set are null here
                    prompts = {k: v for k, v in prompts.items() if v is not None}
                if prompts is not None and not isinstance(prompts, str):
                    prompts = json.dumps(prompts)
                rows.append(dict(image_id=image_id, uri=to_uri(fs, f), member=member, shard=shard, size=None,
                                 file_name=m.get("file_name") or f"{rel}/{member}", prompts=prompts))
    elif fmt == "coco":
        from pseudolabel.storage import read_bytes

        coco = json.loads(read_bytes(spec.coco_json, storage))
        by_image: dict[int, list[dict]] = {}
        for ann in coco.get("annotations", []):
            by_image.setdefault(ann["image_id"], []).append(ann)
        names = {c["id"]: c["name"] for c in coco.get("categories", [])}
        for img in sorted(coco.get("images", []), key=lambda im: im["id"]):
            anns = by_image.get(img["id"], [])
            prompts = None
            if anns:
                boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
                prompts = json.dumps({"boxes_xyxy": boxes, "categories": [names.get(a["category_id"]) for a in anns]})
            path = posixpath.join(root, img["file_name"])
            rows.append(dict(image_id=str(img["id"]), uri=to_uri(fs, path), member=None, shard=0, size=None,
                             file_name=img["file_name"], prompts=prompts))
    else:  # pragma: no cover - the spec validator restricts the values
        raise SourceError(f"input.format: unknown format {fmt!r}")

    if not rows:
        raise SourceError(f"input.uri: no images found under {spec.uri} (format {fmt})")
    ids = [r["image_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise SourceError("input: image ids are not unique (duplicate COCO ids or id_column values)")
    if spec.limit:
        rows = rows[: spec.limit]
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    return table.replace_schema_metadata({b"pseudolabel.format": fmt.encode(), b"pseudolabel.input": spec.uri.encode()})
