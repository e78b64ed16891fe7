"""Where weights come from: a hub id, a local directory, or an s3:// prefix.

An s3:// prefix is copied once per node into a local cache (a file lock keeps concurrent actors on
one node from copying it twice); the labeler then loads the local copy with ``from_pretrained``.
Loading rules every labeler follows: safetensors first, ``torch.load(weights_only=True)`` otherwise,
``trust_remote_code`` never.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
from pathlib import Path

from pseudolabel.schemas.spec import StorageSpec
from pseudolabel.storage import filesystem, protocol_of

CACHE_ENV = "PSEUDOLABEL_CACHE"


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "pseudolabel")
    return Path(root)


def resolve_weights(weights: str, storage: StorageSpec | None = None, revision: str | None = None) -> str:
    """A local directory for an s3:// (or other remote) prefix; local paths and hub ids unchanged."""
    proto = protocol_of(weights)
    if proto == "file":
        path = weights[len("file://"):] if weights.startswith("file://") else weights
        return os.path.expanduser(path) if os.path.exists(os.path.expanduser(path)) else weights
    fs, root = filesystem(weights, storage)
    key = hashlib.sha256(f"{weights}@{revision or ''}".encode()).hexdigest()[:16]
    target = cache_dir() / "weights" / f"{posixpath.basename(root.rstrip('/')) or 'model'}-{key}"
    done = target / ".complete"
    if done.exists():
        return str(target)
    target.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                files = [p for p in fs.find(root) if not fs.isdir(p)]
                if not files:
                    raise FileNotFoundError(f"no weights found under {weights}")
                for remote in files:
                    rel = posixpath.relpath(remote, root)
                    local = target / rel
                    local.parent.mkdir(parents=True, exist_ok=True)
                    fs.get(remote, str(local))
                done.write_text("ok")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(target)


#: a hub repository id, ``owner/name``
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_like_local_path(weights: str) -> bool:
    """True for what can only be meant as a local path: absolute, ``./``, ``../``, ``~``, ``file://``, or
    with a path separator but not of the hub's ``owner/name`` form."""
    if weights.startswith(("/", "./", "../", "~", "file://")):
        return True
    return any(sep and sep in weights for sep in (os.sep, os.altsep)) and not _HUB_ID.match(weights)


def is_hub_id(weights: str) -> bool:
    """True when ``weights`` names a hub repository: not a URI, not an existing or evident local path."""
    if (protocol_of(weights) != "file" or os.path.exists(os.path.expanduser(weights))
            or looks_like_local_path(weights)):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(weights)
    except HFValidationError:
        return False
    return True


def checkpoint_file(source: str, filename: str, revision: str | None = None) -> str | None:
    """Local path of one file of a checkpoint, or None when the checkpoint has no such file.

    Args:
        source: a local directory (what ``resolve_weights`` returns for local paths and s3:// prefixes)
            or a hub id (returned unchanged by ``resolve_weights``).
        filename: the file inside the checkpoint, e.g. ``preprocessor_config.json``.
        revision: hub revision (branch, tag or commit); ignored for local directories.

    A hub file is fetched with ``huggingface_hub.hf_hub_download`` (from the local hub cache when offline).
    It returns None only when the hub says the repository lacks the file; a file that cannot be fetched
    (offline and not cached, no network) raises, so a caller never silently falls back to defaults.
    """
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        return path if os.path.isfile(path) else None
    if not is_hub_id(source):
        return None
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return huggingface_hub.hf_hub_download(source, filename, revision=revision)
    except LocalEntryNotFoundError:
        raise
    except EntryNotFoundError:  # the repository (at that revision) has no such file
        return None
