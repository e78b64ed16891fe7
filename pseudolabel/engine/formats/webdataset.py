"""``webdataset``: uncompressed ``.tar`` shards; ``member`` is the member's name inside the tar.

Listing reads each shard's headers (the data is seeked over) and records every image member's
offset and size, so fetching is one ranged read per member. A shard that cannot be read as a tar
(0 bytes, not a tar, cut short) gives the members listed before the damage plus one error row for the
shard (``image_id`` = the hash of the shard's path); a member cut short by the end of the file is an
error row of its own, and so is a member whose name would leave the shard (absolute, ``..``); hidden
members are skipped.
"""
from __future__ import annotations

import posixpath
import tarfile
from typing import Final

from pseudolabel.engine.formats.base import (
    InputFormat,
    check_regular,
    error_row,
    is_hidden,
    is_local,
    local_problem,
    relative_to,
    stable_image_id,
)
from pseudolabel.engine.formats.transient import is_transient
from pseudolabel.imageio import ImageError
from pseudolabel.storage import to_uri

#: seekable reads (listing, by headers) and front-to-back reads (a member without a known offset)
TAR_SEEK_MODE: Final = "r:"
TAR_STREAM_MODE: Final = "r|"


def safe_member(name: str) -> bool:
    """Tar members must stay inside their shard: no absolute paths, no '..'."""
    norm = posixpath.normpath(name)
    return not (norm.startswith("/") or norm == ".." or norm.startswith("../"))


def tar_members(fs, path: str) -> list[tarfile.TarInfo]:
    """The regular-file members of a tar shard in order, read from their headers (the data is seeked
    over); each has ``name``, ``size`` and ``offset_data`` (where its bytes start, for ranged reads).
    Raises tarfile.ReadError for a shard that is empty, not a tar, or damaged."""
    check_regular(fs, path)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode=TAR_SEEK_MODE) as tar:
        return [info for info in tar if info.isfile()]


class _Partial(Exception):
    def __init__(self, members, error):
        super().__init__(str(error))
        self.members, self.error = members, error


def _members_until_damage(fs, path: str) -> list[tarfile.TarInfo]:
    """Like ``tar_members``, but a read error after some members raises _Partial with those members."""
    check_regular(fs, path)
    found: list[tarfile.TarInfo] = []
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode=TAR_SEEK_MODE) as tar:
            for info in tar:
                if info.isfile():
                    found.append(info)
            # tarfile ends quietly at a header cut short: what follows the last member must be zeros
            f.seek(tar.offset)
            if f.read(2 * tarfile.BLOCKSIZE).strip(b"\0"):
                raise tarfile.ReadError(f"damaged or cut short after byte {tar.offset}")
    except Exception as e:
        if is_transient(e):
            raise
        raise _Partial(found, e) from None
    return found


class WebDatasetFormat(InputFormat):
    name = "webdataset"

    @classmethod
    def claims(cls, spec, files) -> bool:
        return any(f.lower().endswith(".tar") for f in files)

    @classmethod
    def owns(cls, uri, member) -> bool:
        return str(uri).lower().endswith(".tar")  # member None: the shard's own (listing error) row

    def list(self, spec, storage, fs, root, files):
        exts = tuple(e.lower() for e in spec.extensions)
        rows: list[dict] = []
        for shard, f in enumerate(f for f in files if f.lower().endswith(".tar")):
            rel = relative_to(f, root)
            problem = local_problem(f, root) if is_local(fs) else None
            if problem:
                rows.append(error_row(stable_image_id(rel), to_uri(fs, root), rel, shard, problem))
                continue
            damage = None
            try:
                members = _members_until_damage(fs, f)
            except _Partial as p:
                members, damage = p.members, p.error
            except ImageError as e:
                members, damage = [], e
            end = files[f].get("size")
            if damage is not None and members and end is not None and members[-1].offset_data + members[-1].size > end:
                damage = None  # the shard ends inside its last member: that member's row tells it
            for info in members:
                if not info.name.lower().endswith(exts) or is_hidden(info.name):
                    continue
                row = dict(image_id=stable_image_id(rel, info.name), uri=to_uri(fs, f), member=info.name,
                           shard=shard, size=info.size, offset=info.offset_data, file_name=f"{rel}/{info.name}",
                           prompts=None, error=None)
                if not safe_member(info.name):
                    row["error"] = f"unsafe tar member name {info.name!r}"
                elif end is not None and info.offset_data + info.size > end:
                    short = info.offset_data + info.size - end
                    row["error"] = f"tar member cut short: the shard ends {short} bytes early"
                rows.append(row)
            if damage is not None:
                rows.append(error_row(stable_image_id(rel), to_uri(fs, f), rel, shard,
                                      f"unreadable tar shard: {type(damage).__name__}: {damage}"))
        return rows

    def fetch(self, fs, path, rows, image_column=None):
        out: dict[int, bytes | Exception] = {}
        ranged = []
        for k, r in enumerate(rows):
            if r.member is None:  # the shard's own error row (when its listing error was not carried)
                out[k] = ImageError(f"unreadable tar shard {path}")
            elif not safe_member(r.member):
                out[k] = ImageError(f"unsafe tar member name {r.member!r}")
            elif r.offset is not None and r.size is not None:
                ranged.append(k)
        if ranged:
            try:
                check_regular(fs, path)
                got = fs.cat_ranges([path] * len(ranged), [rows[k].offset for k in ranged],
                                    [rows[k].offset + rows[k].size for k in ranged], on_error="return")
            except Exception as e:
                got = [e] * len(ranged)
            for k, data in zip(ranged, got):
                if isinstance(data, bytes) and len(data) != rows[k].size:
                    data = ImageError(f"tar member cut short: {len(data)} of {rows[k].size} bytes")
                out[k] = data
        rest = [k for k in range(len(rows)) if k not in out]
        if rest:
            streamed = self._stream(fs, path, {rows[k].member for k in rest})
            for k in rest:
                out[k] = streamed.get(rows[k].member, ImageError(f"member {rows[k].member!r} not found in {path}"))
        return [out[k] for k in range(len(rows))]

    @staticmethod
    def _stream(fs, path: str, wanted: set[str]) -> dict[str, bytes | Exception]:
        """Read a shard front to back until every wanted member is found (no offsets known)."""
        out: dict[str, bytes | Exception] = {}
        try:
            check_regular(fs, path)
            with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode=TAR_STREAM_MODE) as tar:
                for info in tar:
                    member = tar.extractfile(info) if info.name in wanted and info.isfile() else None
                    if member is not None:
                        out[info.name] = member.read()
                        if len(out) == len(wanted):
                            break
        except Exception as e:
            return {m: out.get(m, e) for m in wanted}
        return out
