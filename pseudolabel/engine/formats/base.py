"""What every input format shares: the class protocol, manifest rows, paths kept under the input root.

A format lists an input once into manifest rows and later fetches the bytes of a group of those rows
(all rows of one file: a tar shard, a Parquet file, or one image file).

Manifest row (``pseudolabel.schemas.tables.MANIFEST_SCHEMA`` plus ``error``)::

    image_id  str    stable id (COCO id, Parquet id column, else a hash of the path under the root + member)
    uri       str    the file that holds the image (a listing-error row names the file that failed, or the
                     input root for a path that was refused)
    member    str    where in that file: tar member name, ``row:<i>`` for Parquet, null for a plain file
    shard     int    files are numbered in listing order
    size      int    bytes of the image where known (tar member, file), else null
    offset    int    tar members: where the member's bytes start (ranged reads), else null
    file_name str    the path under the input root (``shard.tar/member``, ``part.parquet/row:3``)
    prompts   str    per-row hints as JSON, or null
    error     str    a listing error: the row becomes an ``error`` row without any fetch; null otherwise

Paths from data (COCO ``file_name``, a Parquet path column) are resolved under their root and refused
otherwise, with one message whether or not the target exists; local symlinks are followed only when
they stay under the root, and only regular files are ever opened. Hidden names (any path component
starting with ``.``) are skipped in folders, tar shards and Parquet folders alike.
"""
from __future__ import annotations

import builtins
import hashlib
import os
import posixpath
import stat
from typing import Any, ClassVar, NamedTuple

from pseudolabel.imageio import ImageError
from pseudolabel.schemas.spec import InputSpec, StorageSpec

#: message of every path from data that would leave its root (the same whether or not it exists)
OUTSIDE_ROOT = "path {name!r} is outside the input root; only relative paths under it are read"
NOT_REGULAR = "not a regular file (a FIFO, device, socket or dangling link); it was not opened"


class SourceError(ValueError):
    """The input cannot be listed (missing, empty, unknown layout, a setting that does not fit the data)."""


class FetchRow(NamedTuple):
    """What a format's ``fetch`` gets for one manifest row of a file."""

    member: str | None
    offset: int | None
    size: int | None


def stable_image_id(relative_path: str, member: str | None = None) -> str:
    """20 hex digits of sha1(``relative_path`` or ``relative_path#member``): the same dataset under
    another prefix (a local copy, an S3 bucket) gets the same ids."""
    key = relative_path if member is None else f"{relative_path}#{member}"
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:20]


def is_hidden(relative: str) -> bool:
    """True when any component of a relative path starts with ``.`` (``.git/x.png``, ``a/.DS_Store``)."""
    return any(part.startswith(".") for part in relative.split("/") if part not in ("", ".", ".."))


def relative_to(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if path != root else posixpath.basename(path)


def is_local(fs) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")


def confine(root: str, name: str) -> str:
    """``root/name`` when ``name`` is a relative path that stays under ``root``; else SourceError.

    Refused: absolute paths (``/x``, ``/otherbucket/key``), URLs (``s3://...``), Windows drive or
    backslash paths, and any ``..`` that climbs above ``root``. Nothing is looked up, so the answer
    (and its message) never depends on whether the target exists.
    """
    bad = (not isinstance(name, str) or not name or name.startswith("/") or "://" in name or "\\" in name
           or (len(name) > 1 and name[1] == ":") or "\x00" in name)
    joined = "" if bad else posixpath.normpath(posixpath.join(root, name))
    if bad or not joined.startswith(root.rstrip("/") + "/"):
        raise SourceError(OUTSIDE_ROOT.format(name=name))
    return joined


def local_problem(path: str, root: str) -> str | None:
    """Why a local ``path`` under ``root`` must not be opened (a link leaving the root, a special file),
    or None. Uses lstat/stat only: a FIFO is never opened."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        return OUTSIDE_ROOT.format(name=relative_to(path, root))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None  # a missing file fails at fetch like on any store
    except OSError as e:
        return f"cannot stat: {type(e).__name__}"
    return None if stat.S_ISREG(mode) else NOT_REGULAR


def check_regular(fs, path: str) -> None:
    """Raise ImageError when a local ``path`` is not a regular file (checked with stat, never opened)."""
    if not is_local(fs):
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(path) from None
    if not stat.S_ISREG(mode):
        raise ImageError(NOT_REGULAR)


def read_file(fs, path: str) -> bytes:
    """All bytes of one regular file (special files refused before opening)."""
    check_regular(fs, path)
    with fs.open(path, "rb") as f:
        return f.read()


def list_files(fs, root: str) -> dict[str, dict[str, Any]]:
    """Every entry under ``root`` -> its info (``size``, ``type``), in path order; hidden names left out.

    Local special files and symlinks are kept (type ``other``) so the formats can turn those that look
    like inputs into error rows; directories are left out.
    """
    if fs.isfile(root):
        return {root: fs.info(root)}
    if not fs.exists(root):
        raise SourceError(f"input.uri: nothing found at {root}")
    found = fs.find(root, detail=True)
    return {p: found[p] for p in sorted(found) if not is_hidden(relative_to(p, root))}


def error_row(image_id: str, uri: str, file_name: str, shard: int, error: str, member: str | None = None) -> dict:
    """A manifest row that becomes an ``error`` row without any fetch."""
    return dict(image_id=image_id, uri=uri, member=member, shard=shard, size=None, file_name=file_name,
                prompts=None, error=error)


class InputFormat:
    """One input layout. Subclasses set ``name`` and implement ``list`` and ``fetch``.

    - ``list(spec, storage, fs, root, files)`` -> manifest rows (dicts, see the module docstring); a file
      that cannot be read becomes one row with ``error`` set (and a stable ``image_id``), never an
      exception, unless the failure is transient (network): then raise it and the listing is retried.
    - ``fetch(fs, path, rows, image_column)`` -> for each ``FetchRow`` of one file, its encoded image bytes
      or the exception that stopped it (ImageError for bad data, the store's error otherwise).
    - ``claims(spec, files)`` -> True when ``input.format: auto`` should pick this format (built-ins only).
    - ``owns(uri, member)`` -> True when a labels row (``uri``, ``member``) was listed by this format, for
      readers that do not know the run's format.
    """

    name: ClassVar[str] = ""
    #: False for formats that do not need the files under the root listed (COCO names its files)
    needs_files: ClassVar[bool] = True

    @classmethod
    def claims(cls, spec: InputSpec, files: list[str]) -> bool:
        return False

    @classmethod
    def owns(cls, uri: str, member: str | None) -> bool:
        return False

    def list(self, spec: InputSpec, storage: StorageSpec | None, fs, root: str,
             files: dict[str, dict[str, Any]]) -> builtins.list[dict]:
        raise NotImplementedError

    def fetch(self, fs, path: str, rows: builtins.list[FetchRow],
              image_column: str | None = None) -> builtins.list[bytes | Exception]:
        raise NotImplementedError
