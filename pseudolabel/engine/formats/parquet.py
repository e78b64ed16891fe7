"""``parquet``: Parquet files with an image column; ``member`` is ``row:<index>`` within the file.

The image column (one rule for every reader): ``input.image_column`` when set, else the first column
in schema order that is binary / large_binary or a struct with a ``bytes`` field (Hugging Face
``Image``). A value is the image's bytes; a struct whose ``bytes`` is null and a string column named
as ``image_column`` give a *path* instead, read relative to the Parquet file's folder and refused when
it leaves that folder. A file that cannot be read as Parquet becomes one error row (``image_id`` = the
hash of its path) and the other files are listed.
"""
from __future__ import annotations

import json
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel.engine.formats.base import (
    InputFormat,
    SourceError,
    check_regular,
    confine,
    error_row,
    is_local,
    local_problem,
    read_file,
    relative_to,
    stable_image_id,
)
from pseudolabel.engine.formats.transient import is_transient
from pseudolabel.imageio import ImageError
from pseudolabel.storage import to_uri

#: ``member`` of a Parquet row: ``row:<index within the file>``
PARQUET_ROW_PREFIX = "row:"


def row_member(index: int) -> str:
    return f"{PARQUET_ROW_PREFIX}{index}"


def row_index(member: str) -> int:
    return int(member[len(PARQUET_ROW_PREFIX):])


def image_column_of(schema: pa.Schema, wanted: str | None) -> str:
    """The image column of a Parquet schema (the rule in the module docstring); SourceError if none."""
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


class ParquetFormat(InputFormat):
    name = "parquet"

    @classmethod
    def claims(cls, spec, files) -> bool:
        exts = {posixpath.splitext(f)[1].lower() for f in files}
        return ".parquet" in exts and not (exts & {e.lower() for e in spec.extensions})

    @classmethod
    def owns(cls, uri, member) -> bool:
        # listing takes ``.parquet`` files only; member None is the file's own (listing error) row
        return str(uri).lower().endswith(".parquet") and (member is None or member.startswith(PARQUET_ROW_PREFIX))

    def list(self, spec, storage, fs, root, files):
        rows: list[dict] = []
        for shard, f in enumerate(f for f in files if f.lower().endswith(".parquet")):
            rel = relative_to(f, root)
            problem = local_problem(f, root) if is_local(fs) else None
            if problem:
                rows.append(error_row(stable_image_id(rel), to_uri(fs, root), rel, shard, problem))
                continue
            try:
                check_regular(fs, f)
                with fs.open(f, "rb") as fh:
                    pf = pq.ParquetFile(fh)
                    schema = pf.schema_arrow
                    image_column_of(schema, spec.image_column)
                    for field in ("id_column", "prompts_column"):
                        column = getattr(spec, field)
                        if column and column not in schema.names:
                            raise SourceError(f"input.{field}: no column {column!r} in {rel}")
                    cols = [c for c in (spec.id_column, spec.prompts_column, "file_name") if c and c in schema.names]
                    meta = pf.read(columns=cols).to_pylist() if cols else [{} for _ in range(pf.metadata.num_rows)]
            except SourceError:
                raise
            except Exception as e:
                if is_transient(e):
                    raise
                rows.append(error_row(stable_image_id(rel), to_uri(fs, f), rel, shard,
                                      f"unreadable Parquet file: {type(e).__name__}: {e}"))
                continue
            for i, m in enumerate(meta):
                member = row_member(i)
                image_id = str(m[spec.id_column]) if spec.id_column else stable_image_id(rel, member)
                prompts = m.get(spec.prompts_column) if spec.prompts_column else None
                if isinstance(prompts, dict):  # a struct column: keys another row set are null here
                    prompts = {k: v for k, v in prompts.items() if v is not None}
                if prompts is not None and not isinstance(prompts, str):
                    prompts = json.dumps(prompts)
                rows.append(dict(image_id=image_id, uri=to_uri(fs, f), member=member, shard=shard, size=None,
                                 file_name=m.get("file_name") or f"{rel}/{member}", prompts=prompts, error=None))
        return rows

    def fetch(self, fs, path, rows, image_column=None):
        """Image bytes of the wanted rows of one Parquet file, reading only the row groups that hold them."""
        values: dict[int, object] = {}
        wanted = sorted({row_index(r.member) for r in rows if r.member is not None})
        try:
            check_regular(fs, path)
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                col = image_column_of(pf.schema_arrow, image_column)
                lo = 0
                for g in range(pf.num_row_groups):
                    hi = lo + pf.metadata.row_group(g).num_rows
                    here = [r for r in wanted if lo <= r < hi]
                    if here:
                        column = pf.read_row_group(g, columns=[col]).column(0)
                        for r in here:
                            values[r] = column[r - lo].as_py()
                    lo = hi
        except Exception as e:
            return [e] * len(rows)
        out: list[bytes | Exception] = []
        for r in rows:
            if r.member is None:
                out.append(ImageError(f"unreadable Parquet file {path}"))
                continue
            k = row_index(r.member)
            out.append(self._value_bytes(fs, path, values[k]) if k in values
                       else ImageError(f"row {k} not found in {path}"))
        return out

    @staticmethod
    def _value_bytes(fs, path: str, value) -> bytes | Exception:
        """A cell of the image column -> bytes: the bytes themselves, or the file its path names."""
        ref = None
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return value["bytes"]
            ref = value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            return bytes(value)
        elif isinstance(value, str):
            ref = value
        if not ref:
            return b""
        folder = posixpath.dirname(path)
        try:
            target = confine(folder, ref)
            if is_local(fs):
                problem = local_problem(target, folder)
                if problem:
                    return ImageError(problem)
            return read_file(fs, target)
        except SourceError as e:
            return ImageError(str(e))
        except Exception as e:
            return e
