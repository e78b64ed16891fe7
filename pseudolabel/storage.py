"""Every path goes through here: local folders, file:// and s3:// behave the same.

Credentials come from the job's ``storage`` section or the standard AWS environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION); they are never logged.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from typing import Any, Iterator

import fsspec
import pyarrow.fs as pafs

from pseudolabel.schemas.spec import StorageSpec


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def strip_protocol(uri: str) -> str:
    if "://" in uri:
        return uri.split("://", 1)[1]
    return os.path.abspath(os.path.expanduser(uri))


def storage_options(uri: str, storage: StorageSpec | None = None) -> dict[str, Any]:
    """fsspec keyword arguments for ``uri`` (only S3 takes any)."""
    storage = storage or StorageSpec()
    if protocol_of(uri) not in ("s3", "s3a"):
        return {}
    # No listing cache: fsspec shares one instance per set of options within a process, so a cached
    # listing taken early (say, of an empty labels/ folder) would hide files written later.
    opts: dict[str, Any] = {"use_listings_cache": False}
    endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    if storage.key:
        opts["key"] = storage.key
    if storage.secret:
        opts["secret"] = storage.secret
    if storage.region:
        opts["client_kwargs"] = {"region_name": storage.region}
    if storage.anon:
        opts["anon"] = True
    return opts


def filesystem(uri: str, storage: StorageSpec | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a URI or local path (``~`` expanded, made absolute)."""
    local = protocol_of(uri) == "file"
    fs, path = fsspec.core.url_to_fs(os.path.expanduser(uri) if local else uri, **storage_options(uri, storage))
    return fs, path.rstrip("/") or "/"


def arrow_filesystem(uri: str, storage: StorageSpec | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path) for pyarrow and Ray Data readers/writers."""
    fs, path = filesystem(uri, storage)
    if protocol_of(uri) == "file":
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its protocol."""
    if "://" in uri:
        proto, rest = uri.split("://", 1)
        return f"{proto}://" + posixpath.join(rest.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of ``filesystem``: a path inside ``fs`` back to a full URI (a local path stays a plain path)."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if proto in ("file", "local") else fs.unstrip_protocol(path)


def read_bytes(uri: str, storage: StorageSpec | None = None) -> bytes:
    fs, path = filesystem(uri, storage)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes, storage: StorageSpec | None = None) -> None:
    """Write ``data`` at ``uri``, creating local parent folders (an object store has no folders; its
    bucket must exist: s3fs would create a missing one silently)."""
    fs, path = filesystem(uri, storage)
    parent = posixpath.dirname(path)
    if parent and protocol_of(uri) == "file":
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def bucket_and_key(uri: str) -> tuple[str, str]:
    """(bucket, key prefix) of an ``s3://bucket/key`` URI."""
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return bucket, key


def s3_client(uri: str, storage: StorageSpec | None = None, timeout_s: float = 5.0):
    """A plain botocore S3 client for ``uri`` with the credentials, endpoint and region fsspec would use,
    one try per request and ``timeout_s`` to connect: for quick checks that must not sit in retries."""
    import botocore
    import botocore.session
    from botocore.config import Config

    opts = storage_options(uri, storage)
    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"total_max_attempts": 1},
                    signature_version=botocore.UNSIGNED if opts.get("anon") else None)
    return botocore.session.get_session().create_client(
        "s3", endpoint_url=opts.get("endpoint_url"), aws_access_key_id=opts.get("key"),
        aws_secret_access_key=opts.get("secret"), region_name=opts.get("client_kwargs", {}).get("region_name"),
        config=config)


def exists(uri: str, storage: StorageSpec | None = None) -> bool:
    fs, path = filesystem(uri, storage)
    return fs.exists(path)


@contextlib.contextmanager
def staged_dir(uri: str, storage: StorageSpec | None = None) -> Iterator[str]:
    """A local folder to write a directory tree into (a checkpoint, say), published at ``uri`` on exit.

    A local ``uri`` is the folder itself; for s3:// the tree is written to a temporary folder and
    uploaded file by file when the block ends without an error.
    """
    if protocol_of(uri) == "file":
        path = strip_protocol(uri)
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="pseudolabel-upload-") as tmp:
        yield tmp
        fs, root = filesystem(uri, storage)
        for folder, _, files in os.walk(tmp):
            rel = os.path.relpath(folder, tmp)
            for name in files:
                fs.put_file(os.path.join(folder, name),
                            posixpath.normpath(posixpath.join(root, rel.replace(os.sep, "/"), name)))
