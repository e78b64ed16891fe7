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


def read_checkpoint_file(weights: str, filename: str, storage: StorageSpec | None = None,
                         revision: str | None = None) -> bytes | None:
    """The bytes of one small file of a checkpoint, wherever it lives, without copying the weights:
    a local directory or hub id through ``checkpoint_file``, an s3:// (or other remote) prefix read
    directly. None when the checkpoint has no such file. For host halves that need a checkpoint's
    settings (an image processor's size) but not its weights."""
    if protocol_of(weights) != "file":
        fs, root = filesystem(weights, storage)
        path = posixpath.join(root.rstrip("/"), filename)
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as f:
            return f.read()
    local = resolve_weights(weights, storage, revision)
    found = checkpoint_file(local, filename, revision)
    if found is None:
        return None
    with open(found, "rb") as f:
        return f.read()


def weights_problem(weights: str, storage: StorageSpec | None = None, revision: str | None = None) -> str | None:
    """Why ``weights`` cannot be loaded, in a few words with the way out, or None when it looks loadable.

    Checked without loading anything: a local path must be a non-empty directory; an s3:// (or other
    remote) prefix must hold files; a hub id must be in the local hub cache, or — unless the hub is
    switched off (``HF_HUB_OFFLINE``) — known to the hub. Meant for the driver, before any work starts.
    """
    proto = protocol_of(weights)
    if proto != "file":
        try:
            fs, root = filesystem(weights, storage)
            found = fs.exists(root) and any(not fs.isdir(p) for p in fs.find(root, maxdepth=2))
        except Exception as err:  # credentials, endpoint, bucket...
            return f"cannot list {weights} ({type(err).__name__}: {err})"
        return None if found else f"no files under {weights}"
    path = os.path.expanduser(weights[len("file://"):] if weights.startswith("file://") else weights)
    if os.path.exists(path) or looks_like_local_path(weights) or not is_hub_id(weights):
        if not os.path.exists(path):
            return f"{weights} does not exist (a local checkpoint directory, an s3:// prefix or a hub id owner/name)"
        if not os.path.isdir(path):
            return f"{weights} is a file; give the checkpoint's directory"
        if not os.listdir(path):
            return f"{weights} is an empty directory"
        return None
    import huggingface_hub
    from huggingface_hub import constants

    try:
        huggingface_hub.snapshot_download(weights, revision=revision, local_files_only=True,
                                          allow_patterns=["*.json"])
        return None
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        return (f"hub id {weights} is not in the local hub cache and HF_HUB_OFFLINE is set: download it first "
                f"(huggingface-cli download {weights}) or give a local directory or s3:// prefix")
    try:
        huggingface_hub.HfApi().model_info(weights, revision=revision, timeout=10)
    except Exception as err:
        return f"hub id {weights} cannot be reached ({type(err).__name__}); check the name and the network"
    return None
