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
