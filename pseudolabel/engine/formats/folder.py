"""``folder``: image files found recursively under ``input.uri`` (``member`` is null).

Files whose extension is in ``input.extensions`` are images; one shard per parent folder. A local
symlink that leads out of the root, a FIFO, device or socket with an image extension becomes an error
row without being opened; a symlinked folder is not descended into.
"""
from __future__ import annotations

import posixpath

from pseudolabel.engine.formats.base import (
    FetchRow,
    InputFormat,
    error_row,
    is_local,
    local_problem,
    read_file,
    relative_to,
    stable_image_id,
)
from pseudolabel.storage import to_uri


def image_rows(fs, root: str, paths: list[str], sizes: dict[str, int | None], shard_of) -> list[dict]:
    """Manifest rows of plain image files under ``root`` (local ones checked with stat first)."""
    rows = []
    local = is_local(fs)
    for f in paths:
        rel = relative_to(f, root)
        problem = local_problem(f, root) if local else None
        if problem:
            rows.append(error_row(stable_image_id(rel), to_uri(fs, root), rel, shard_of(f), problem))
            continue
        rows.append(dict(image_id=stable_image_id(rel), uri=to_uri(fs, f), member=None, shard=shard_of(f),
                         size=sizes.get(f), file_name=rel, prompts=None, error=None))
    return rows


def fetch_plain(fs, path: str, rows: list[FetchRow]) -> list[bytes | Exception]:
    """The bytes of one plain file for each row (a plain file has the single member None)."""
    try:
        data = read_file(fs, path)
    except Exception as e:
        return [e] * len(rows)
    return [data] * len(rows)


class FolderFormat(InputFormat):
    name = "folder"

    @classmethod
    def claims(cls, spec, files) -> bool:
        return True  # the fallback when nothing more specific matches

    @classmethod
    def owns(cls, uri, member) -> bool:
        return member is None

    def list(self, spec, storage, fs, root, files):
        exts = tuple(e.lower() for e in spec.extensions)
        images = [f for f, info in files.items() if f.lower().endswith(exts)]
        parents = sorted({posixpath.dirname(f) for f in images})
        shard = {p: i for i, p in enumerate(parents)}
        sizes = {f: (files[f].get("size") if files[f].get("type") == "file" else None) for f in images}
        return image_rows(fs, root, images, sizes, lambda f: shard[posixpath.dirname(f)])

    def fetch(self, fs, path, rows, image_column=None):
        return fetch_plain(fs, path, rows)
